"""CellPuzzles reward and evaluation metrics, as in the authors' `compute_score.py` and `scripts/eval.py` of the
Cell-o1 release.

A completion must be exactly `<think>...</think>\\n<answer>t1 | t2 | ... | tN</answer>`:
  1. each of the four tags occurs exactly once;
  2. the whole string matches `^<think>.*?</think>\\n<answer>.*?</answer>$` (DOTALL; Python's `$` also matches
     before one final newline, so one trailing "\\n" is tolerated, two are not);
  3. the candidate holds a `|`. Candidate = the text after `<answer>` on its line (lines as in `str.splitlines`),
     stripped, minus a `</answer>` suffix; if that is empty (answer on its own lines), the first line anywhere
     holding a `|`, stripped. That fallback may pick a `|` line inside <think>: a quirk we keep.
Items = candidate split on `|`, stripped, empties dropped. Reward (`score`), -1 when any of these fails:
  4. as many items as gold items, all distinct (case-sensitive, so `A | a` passes, another quirk we keep);
  5. correct = positions whose items match case-insensitively; exact = correct == N;
     mode "mixed" (authors' released default) -> (correct/N + exact) / 2; mode "batch" (the paper's
     batch-level reward) -> exact.
Metrics (`metrics`) use the same format check (1-3) but not rule 4: matching is positional over zip(items, gold),
so missing items are wrong and extra ones ignored; an invalid completion counts all its N cells wrong.
"""
import re
from collections import defaultdict

MODES = ("mixed", "batch")
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_FORMAT = re.compile(r"^<think>.*?</think>\n<answer>.*?</answer>$", re.DOTALL)
# The line boundaries of str.splitlines (\r\n is \r then \n, which gives the same line ends). Finding the one line
# we need with these is O(n) in C, where splitlines + a Python loop costs ~0.1 s on a megabyte of newlines.
_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_BREAK = re.compile(f"[{_BREAKS}]")


def _line_bounds(s: str, i: int) -> tuple[int, int]:
    """Start and end of the splitlines() line that holds index i (s[i] must not be a line break)."""
    end = _BREAK.search(s, i)
    return max(s.rfind(c, 0, i) for c in _BREAKS) + 1, end.start() if end else len(s)


def split_items(text: str) -> list[str]:
    return [t for t in map(str.strip, text.split("|")) if t]


def _candidate(completion: str) -> str:
    """The authors' extract_solution, for a completion known to hold exactly one <answer> (so its first line
    with <answer> is the line of that one) and one </answer> (so removing the suffix = removing all)."""
    i = completion.find("<answer>")
    cand = completion[i + len("<answer>"):_line_bounds(completion, i)[1]].strip()
    if cand.endswith("</answer>"):
        cand = cand[: -len("</answer>")].strip()
    if not cand and (j := completion.find("|")) >= 0:  # the first line holding a '|' is the line of the first '|'
        cand = completion[slice(*_line_bounds(completion, j))].strip()
    return cand


def parse(completion: str) -> list[str] | None:
    """The predicted items if the format is valid (rules 1-3), else None. Cheap O(n) tag counts come first so the
    DOTALL regex only ever sees strings with one of each tag, where its lazy scans are linear."""
    if any(completion.count(t) != 1 for t in _TAGS) or not _FORMAT.match(completion):
        return None
    cand = _candidate(completion)
    return split_items(cand) if "|" in cand else None


def n_correct(items: list[str], gold: list[str]) -> int:
    return sum(p.lower() == g.lower() for p, g in zip(items, gold))


def failure(completion: str, answer: str) -> str | None:
    """Why `score` gives -1: "format" (rules 1-3), "count" (not N items), "repeat" (a type named twice), or None."""
    items = parse(completion)
    if items is None:
        return "format"
    if len(items) != len(split_items(answer)):
        return "count"
    return "repeat" if len(set(items)) != len(items) else None


def score(completion: str, answer: str, mode: str = "mixed") -> float:
    """The RL reward: -1 for a bad format, count or duplicate; else in [0, 1] (see module docstring)."""
    if mode not in MODES:
        raise ValueError(f"unknown reward mode {mode!r}, expected one of {MODES}")
    items, gold = parse(completion), split_items(answer)
    if items is None or not gold or len(items) != len(gold) or len(set(items)) != len(items):
        return -1.0
    correct = n_correct(items, gold)
    exact = float(correct == len(gold))
    return exact if mode == "batch" else (correct / len(gold) + exact) / 2


# ----------------------------------------------------------------------------- metrics

KEYS = ("count", "cell_acc", "batch_acc", "format_rate", "uniqueness", "mean_len")


def _summary(recs: list[dict]) -> dict:
    n, cells = len(recs), sum(r["n"] for r in recs)
    mean = lambda k: sum(r[k] for r in recs) / n if n else 0.0
    return {"count": n, "cell_acc": sum(r["correct"] for r in recs) / cells if cells else 0.0,
            "batch_acc": mean("exact"), "format_rate": mean("valid"), "uniqueness": mean("uniq"),
            "mean_len": mean("len")}


def metrics(completions: list[str], answers: list[str], lengths: list[int] | None = None) -> dict:
    """Evaluation metrics of eval.py over a set of puzzles, overall and per N (number of gold cells):
    cell_acc = sum(correct) / sum(N), micro over cells; batch_acc = share of puzzles with all N correct;
    format_rate = share of valid completions; uniqueness = mean len(set(items)) / len(items) (0 when invalid);
    mean_len = mean of `lengths` (token counts, as the paper) if given, else of len(completion) in characters,
    recorded in "len_unit"; count = number of puzzles. Empty gold is a data bug here and raises."""
    if len(completions) != len(answers) or (lengths is not None and len(lengths) != len(answers)):
        raise ValueError("completions, answers and lengths must have the same length")
    recs = []
    for k, (completion, answer) in enumerate(zip(completions, answers)):
        gold, items = split_items(answer), parse(completion)
        if not gold:
            raise ValueError(f"answer {k} has no items: {answer!r}")
        correct = n_correct(items, gold) if items is not None else 0
        recs.append({"n": len(gold), "correct": correct, "exact": float(correct == len(gold)),
                     "valid": float(items is not None), "uniq": len(set(items)) / len(items) if items else 0.0,
                     "len": lengths[k] if lengths is not None else len(completion)})
    by_n = defaultdict(list)
    for r in recs:
        by_n[r["n"]].append(r)
    return {**_summary(recs), "len_unit": "tokens" if lengths is not None else "chars",
            "by_n": {n: _summary(by_n[n]) for n in sorted(by_n)}}


_TITLES = {"count": "puzzles", "cell_acc": "cell acc", "batch_acc": "batch acc", "format_rate": "format ok",
           "uniqueness": "uniqueness", "mean_len": "mean len"}


def format_table(rows: dict[str, dict], keys: tuple[str, ...] = KEYS, per_n: bool = True) -> str:
    """Markdown table of metrics() dicts keyed by method name: one line per (N, method), N ascending, then the
    overall lines. by_n keys may be ints or, after a JSON round trip, strings."""
    by_n = {name: {int(n): m for n, m in r.get("by_n", {}).items()} for name, r in rows.items()}
    units = {r.get("len_unit") for r in rows.values()} - {None}  # name the unit only when all rows share it
    unit = f" ({units.pop()})" if len(units) == 1 else ""
    titles = [_TITLES.get(k, k) + (unit if k == "mean_len" else "") for k in keys]
    fmt = lambda k, v: str(v) if k == "count" else f"{v:.1f}" if k == "mean_len" else f"{v:.3f}"
    lines = ["| N | method | " + " | ".join(titles) + " |", "|---|---|" + "---:|" * len(keys)]
    groups = [(str(n), {name: b[n] for name, b in by_n.items() if n in b})
              for n in sorted(set().union(*by_n.values()))] if per_n else []
    for label, ms in groups + [("all", rows)]:
        lines += [f"| {label} | {name} | " + " | ".join(fmt(k, m[k]) for k in keys) + " |" for name, m in ms.items()]
    return "\n".join(lines)
