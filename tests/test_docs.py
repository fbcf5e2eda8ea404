"""The user documentation's own rules: the README at most 20,000 bytes, and every repository path it or the
experiment log links to exists (a renamed file leaves no dead link)."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_size_and_links():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert len(text.encode()) <= 20_000, len(text.encode())
    for doc in ("README.md", os.path.join("docs", "experiments.md")):
        body = open(os.path.join(ROOT, doc), encoding="utf-8").read()
        base = os.path.dirname(os.path.join(ROOT, doc))
        for target in re.findall(r"\]\(([^)#\s]+)\)", body):
            if "://" in target:
                continue
            assert os.path.exists(os.path.normpath(os.path.join(base, target))), f"{doc} links to missing {target}"
