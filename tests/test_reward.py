"""Tests for reward.py: hand-computed rewards for every rule of the authors' compute_score (reference §2.2, including
its quirks), a fuzz test against a naive spec oracle plus hostile inputs under a time budget, and hand-computed
eval.py metrics (reference §3.2)."""
import json
import random
import re
import time

import pytest

from reward import failure, format_table, metrics, parse, score

GOLD = "A | B | C"


def T(answer: str, think: str = "x") -> str:
    return f"<think>{think}</think>\n<answer>{answer}</answer>"


# (completion, mixed reward, batch reward), all against GOLD. Mixed = (correct/3 + exact)/2.
CASES = {
    "perfect": (T("A | B | C"), 1.0, 1.0),
    "no spaces": (T("A|B|C"), 1.0, 1.0),
    "padded": (T("   A |B  | C "), 1.0, 1.0),
    "case-insensitive match": (T("a | b | c"), 1.0, 1.0),
    "one wrong": (T("A | B | D"), 1 / 3, 0.0),
    "off-list label": (T("A | B | Z"), 1 / 3, 0.0),
    "permutation": (T("B | A | C"), 1 / 6, 0.0),
    "all wrong": (T("C | A | B"), 0.0, 0.0),
    "case-variant duplicate not penalised": (T("A | a | C"), 1 / 3, 0.0),
    "NUL inside an item": (T("A | B\x00 | C"), 1 / 3, 0.0),
    "empty item dropped": (T("A | | B | C"), 1.0, 1.0),
    "trailing pipe dropped": (T("A | B | C |"), 1.0, 1.0),
    "leading pipe dropped": (T("| A | B | C"), 1.0, 1.0),
    "too few": (T("A | B"), -1.0, -1.0),
    "too many": (T("A | B | C | D"), -1.0, -1.0),
    "duplicate": (T("A | A | C"), -1.0, -1.0),
    "duplicate that would be correct": (T("A | B | B"), -1.0, -1.0),
    "no pipe": (T("A B C"), -1.0, -1.0),
    "one trailing newline tolerated": (T("A | B | C") + "\n", 1.0, 1.0),
    "two trailing newlines": (T("A | B | C") + "\n\n", -1.0, -1.0),
    "trailing space": (T("A | B | C") + " ", -1.0, -1.0),
    "text after": (T("A | B | C") + "done", -1.0, -1.0),
    "text before": ("ok " + T("A | B | C"), -1.0, -1.0),
    "leading space": (" " + T("A | B | C"), -1.0, -1.0),
    "leading newline": ("\n" + T("A | B | C"), -1.0, -1.0),
    "no newline between blocks": ("<think>x</think><answer>A | B | C</answer>", -1.0, -1.0),
    "two newlines between blocks": ("<think>x</think>\n\n<answer>A | B | C</answer>", -1.0, -1.0),
    "space between blocks": ("<think>x</think>\n <answer>A | B | C</answer>", -1.0, -1.0),
    "no think": ("<answer>A | B | C</answer>", -1.0, -1.0),
    "empty think is fine": (T("A | B | C", think=""), 1.0, 1.0),
    "two answers": (T("A | B | C") + "\n<answer>A | B | C</answer>", -1.0, -1.0),
    "nested think": (T("A | B | C", think="<think>y</think>"), -1.0, -1.0),
    "tag inside answer": (T("A | B | C<think>"), -1.0, -1.0),
    "blocks swapped": ("<answer>A | B | C</answer>\n<think>x</think>", -1.0, -1.0),
    "unclosed answer": ("<think>x</think>\n<answer>A | B | C", -1.0, -1.0),
    "empty": ("", -1.0, -1.0),
    # Multi-line answers go through the first-'|'-line fallback (reference §2.2 table and its consequences).
    "answer on its own lines": (T("\nA | B | C\n"), 1.0, 1.0),
    "fallback keeps the closing tag": (T("\nA | B | C"), 1 / 3, 0.0),  # items A, B, "C</answer>"
    "fallback picks a think line (wrong count)": (T("\nA | B | C\n", think="x | y"), -1.0, -1.0),
    "fallback picks a think line (scored)": (T("\nC | B | A\n", think="\nA | B | C\n"), 1.0, 1.0),
    "answer split over lines": (T("A | B\nC"), -1.0, -1.0),  # candidate is "A | B"
    "closing tag on next line": (T("A | B | C\n"), 1.0, 1.0),
    "CRLF before closing tag": (T("A | B | C\r\n"), 1.0, 1.0),
    # Lines are str.splitlines() lines, so U+2028 ends the answer line: candidate "A | B | C", not "... | Cjunk".
    "unicode line separator ends the line": (T("A | B | C\u2028junk"), 1.0, 1.0),
}


INVALID_FORMAT = {"no pipe", "two trailing newlines", "trailing space", "text after", "text before", "leading space",
                  "leading newline", "no newline between blocks", "two newlines between blocks", "space between blocks",
                  "no think", "two answers", "nested think", "tag inside answer", "blocks swapped", "unclosed answer",
                  "empty"}


@pytest.mark.parametrize("name", CASES)
def test_score_cases(name):
    completion, mixed, batch = CASES[name]
    assert score(completion, GOLD) == pytest.approx(mixed, abs=1e-12)
    assert score(completion, GOLD, mode="mixed") == pytest.approx(mixed, abs=1e-12)
    assert score(completion, GOLD, mode="batch") == batch
    assert (parse(completion) is None) == (name in INVALID_FORMAT)


def test_parse_items():
    assert parse(T(" A |  | b |C ")) == ["A", "b", "C"]
    assert parse(T("\nC | B | A\n", think="\nA | B | C\n")) == ["A", "B", "C"]


def test_gold_handling():
    assert score(T("A | B"), "") == -1.0  # no gold items
    assert score(T("A | B"), " | ") == -1.0
    assert score(T("x | A"), "|A|") == -1.0  # gold empties dropped too: 1 gold item vs 2
    assert score(T("q | A"), " q|a  |") == 1.0
    assert score(T("a | b"), "A | B", mode="batch") == 1.0


def test_line_breaks_are_those_of_splitlines():
    from reward import _BREAKS
    assert {chr(c) for c in range(0x10000) if len(f"a{chr(c)}b".splitlines()) == 2} == set(_BREAKS)


def test_unknown_mode_raises_before_parsing():
    for completion in ("", "garbage", T("A | B | C")):
        with pytest.raises(ValueError):
            score(completion, GOLD, mode="cell")


# ----------------------------------------------------------------------------- fuzz

def oracle(resp: str, gold: str, mode: str) -> float:
    """Naive transcription of reference §2.2, with no shortcuts, to compare reward.score against."""
    lines = resp.splitlines()
    with_answer = [line for line in lines if "<answer>" in line]
    cand = with_answer[0].split("<answer>", 1)[1].strip() if with_answer else ""
    if cand.endswith("</answer>"):
        cand = cand.replace("</answer>", "").strip()
    if not cand:
        cand = next((line.strip() for line in lines if "|" in line), "")
    ok = all(resp.count(t) == 1 for t in ("<think>", "</think>", "<answer>", "</answer>"))
    ok = ok and re.match(r"^<think>.*?</think>\n<answer>.*?</answer>$", resp, re.DOTALL) and "|" in cand
    g = [s.strip() for s in gold.split("|") if s.strip()]
    c = [s.strip() for s in cand.split("|") if s.strip()]
    if not ok or not g or len(g) != len(c) or len(set(c)) != len(c):
        return -1.0
    correct = sum(x.lower() == y.lower() for x, y in zip(c, g))
    return float(correct == len(g)) if mode == "batch" else (correct / len(g) + (correct == len(g))) / 2


PIECES = ["<think>", "</think>", "<answer>", "</answer>", "|", " | ", "\n", "\n\n", "\r", "\r\n", "\x00", " ", "A",
          "B", "C", "a", "<", ">", "/", "\u2028", "\x85", "\x0b", "<think", "answer>", "é"]


def rand_text(rng, k):
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, k)))


def test_fuzz_matches_spec_oracle():
    rng = random.Random(0)
    golds = [GOLD, "A|a|B", "A", "B | A", "c | b | a"]
    hits = 0
    for _ in range(3000):
        kind = rng.random()
        k = rng.randint(1, 4)
        labels = rng.choice([" | ", "|", " || ", "\n| "]).join(rng.choices("ABCDabcZ", k=k))
        if kind < 0.3:  # arbitrary soup
            resp = rand_text(rng, 30)
        elif kind < 0.7:  # well framed, random labels and think: exercises the scoring paths
            resp = T(labels, think=rand_text(rng, 4)) + rng.choice(["", "\n", "\n\n"])
        else:  # well framed with stray pieces spliced in
            resp = T(labels)
            i = rng.randint(0, len(resp))
            resp = resp[:i] + rand_text(rng, 3) + resp[i:]
        gold = rng.choice(golds) if rng.random() < 0.3 else " | ".join(rng.sample("ABCD", k))
        for mode in ("mixed", "batch"):
            got = score(resp, gold, mode)
            assert got == oracle(resp, gold, mode), (resp, gold, mode)
            hits += got >= 0
    assert hits > 300  # the fuzz really reaches the scoring paths, not just -1


def test_failure_names_the_cause_of_every_minus_one():
    """failure() is None exactly when score() >= 0 (the fuzz of the oracle test), and names the rule by hand."""
    assert failure(T("A | B | C"), GOLD) is None
    assert failure("<answer>A | B | C</answer>", GOLD) == "format"
    assert failure(T("A | B"), GOLD) == "count"
    assert failure(T("A | A | C"), GOLD) == "repeat"
    rng = random.Random(2)
    kinds = set()
    for _ in range(2000):
        labels = " | ".join(rng.choices("ABCDa", k=rng.randint(1, 4)))
        resp = T(labels) if rng.random() < 0.7 else rand_text(rng, 20)
        gold = " | ".join(rng.sample("ABCD", rng.randint(1, 4)))
        why = failure(resp, gold)
        assert (why is None) == (oracle(resp, gold, "mixed") >= 0), (resp, gold, why)
        kinds.add(why)
    assert kinds == {None, "format", "count", "repeat"}


def hostile():
    rng = random.Random(1)
    mb = 10**6
    items = [f"type {i}" for i in range(10**5)]
    yield "<think>" * mb, GOLD, -1.0
    yield "\x00" * 2 * mb, GOLD, -1.0
    yield "|" * mb, GOLD, -1.0
    yield "\n" * mb, GOLD, -1.0
    yield "<think>" * 1000 + "</think>" * 1000 + "\n<answer>" * 1000 + "</answer>" * 1000, GOLD, -1.0
    yield T(" | ".join(items)), " | ".join(items), 1.0  # 10^5 items, all right
    yield T(" | ".join(items[::-1])), " | ".join(items), 0.0  # 10^5 items, all wrong
    yield T(" | ".join(items[:-1] + items[:1])), " | ".join(items), -1.0  # one duplicate among 10^5
    yield T("|" * mb), GOLD, -1.0  # valid format, no items
    yield T("A | B | C", think="\n" * mb), GOLD, 1.0
    yield T("\n" + "x\n" * mb + "A | B | C\n", think="\n" * mb), GOLD, 1.0  # fallback after 2M lines
    yield T("A | B | C", think="|\n" * mb), GOLD, 1.0
    # one of each tag, but laid out so the lazy DOTALL scans must run to the end and fail
    yield "<think>" + "a" * mb + "</think>" + "b" * mb + "\n<answer>" + "c" * mb + "</answer>" + "d" * mb, GOLD, -1.0
    yield "<think>" + "<" * mb + "</think>\n<answer>" + "/" * mb + "</answer>\n\n", GOLD, -1.0
    yield "<think>" + "</thin" * (mb // 6) + "</think>\n<answer>" + "</answe" * (mb // 7) + "</answer>", GOLD, -1.0
    yield "".join(rng.choices(PIECES, k=mb)), GOLD, None
    yield T("A | B | C", think="".join(rng.choices(PIECES[4:], k=mb))), GOLD, None


def test_fuzz_hostile_is_fast_and_never_raises():
    # CPU time of this process (other processes on the machine do not count) of the mixed-mode calls: ~0.3 s here;
    # anything quadratic in these megabyte inputs would take minutes
    total = 0.0
    for resp, gold, want in hostile():
        t0 = time.process_time()
        got = score(resp, gold)
        total += time.process_time() - t0
        assert got == -1.0 or 0.0 <= got <= 1.0
        assert score(resp, gold, mode="batch") in (-1.0, 0.0, 1.0)
        if want is not None:
            assert got == want, resp[:50]
            assert score(resp, gold, mode="batch") == (want if want < 0 else float(want == 1.0))
    assert total < 1.0, f"score() took {total:.3f} s on the hostile set"


# ----------------------------------------------------------------------------- metrics

SET = [  # (completion, gold, hand values: correct, exact, valid, uniqueness)
    (T("A | B | C"), "A | B | C", 3, 1, 1, 1.0),
    (T("B | A | C"), "A | B | C", 1, 0, 1, 1.0),
    ("A | B | C", "A | B | C", 0, 0, 0, 0.0),  # no tags: all 3 cells wrong although they match
    (T("A | A"), "A | B", 1, 0, 1, 0.5),  # duplicates are scored in metrics (reward would be -1)
    (T("a | b | X"), "A | B", 2, 1, 1, 1.0),  # extra item ignored (reward would be -1)
    (T("A | B"), "A | B | C | D", 2, 0, 1, 1.0),  # missing items wrong
]
LENGTHS = [10, 20, 30, 40, 50, 60]


def test_metrics_hand_computed():
    comps, golds = [s[0] for s in SET], [s[1] for s in SET]
    m = metrics(comps, golds, LENGTHS)
    approx = lambda d: pytest.approx(d, abs=1e-12)
    assert {k: m[k] for k in m if k != "by_n"} == approx(
        {"count": 6, "cell_acc": 9 / 17, "batch_acc": 2 / 6, "format_rate": 5 / 6, "uniqueness": 4.5 / 6,
         "mean_len": 35.0, "len_unit": "tokens"})
    assert list(m["by_n"]) == [2, 3, 4]
    assert m["by_n"][3] == approx({"count": 3, "cell_acc": 4 / 9, "batch_acc": 1 / 3, "format_rate": 2 / 3,
                                   "uniqueness": 2 / 3, "mean_len": 20.0})
    assert m["by_n"][2] == approx({"count": 2, "cell_acc": 3 / 4, "batch_acc": 1 / 2, "format_rate": 1.0,
                                   "uniqueness": 0.75, "mean_len": 45.0})
    assert m["by_n"][4] == approx({"count": 1, "cell_acc": 0.5, "batch_acc": 0.0, "format_rate": 1.0,
                                   "uniqueness": 1.0, "mean_len": 60.0})
    chars = metrics(comps, golds)
    assert chars["len_unit"] == "chars" and chars["mean_len"] == sum(map(len, comps)) / 6


def test_metrics_edges():
    assert metrics([], [])["count"] == 0 and metrics([], [])["by_n"] == {}
    with pytest.raises(ValueError):
        metrics(["x"], ["A | B", "A"])
    with pytest.raises(ValueError):
        metrics(["x"], ["A | B"], [1, 2])
    with pytest.raises(ValueError):
        metrics(["x"], [" | "])  # no gold items: a data bug
    m = metrics([T("|")] + [r for r, _, _ in list(hostile())[:3]], [GOLD] * 4)  # hostile input does not raise
    # T("|") has a valid format (its candidate holds a '|') but no items: uniqueness 0, not a division by zero
    assert m["format_rate"] == 0.25 and m["cell_acc"] == 0.0 and m["uniqueness"] == 0.0


def test_format_table():
    m = metrics([s[0] for s in SET], [s[1] for s in SET], LENGTHS)
    rand = metrics([T("C | B | A"), "junk"], ["A | B | C", "A | B | C | D | E"], [5, 7])
    table = format_table({"SFT": json.loads(json.dumps(m)), "random": rand})  # JSON turns the N keys into strings
    lines = table.splitlines()
    assert lines[0] == "| N | method | puzzles | cell acc | batch acc | format ok | uniqueness | mean len (tokens) |"
    assert lines[1] == "|---|---|---:|---:|---:|---:|---:|---:|"
    assert lines[2:] == [
        "| 2 | SFT | 2 | 0.750 | 0.500 | 1.000 | 0.750 | 45.0 |",
        "| 3 | SFT | 3 | 0.444 | 0.333 | 0.667 | 0.667 | 20.0 |",
        "| 3 | random | 1 | 0.333 | 0.000 | 1.000 | 1.000 | 5.0 |",
        "| 4 | SFT | 1 | 0.500 | 0.000 | 1.000 | 1.000 | 60.0 |",
        "| 5 | random | 1 | 0.000 | 0.000 | 0.000 | 0.000 | 7.0 |",
        "| all | SFT | 6 | 0.529 | 0.333 | 0.833 | 0.750 | 35.0 |",
        "| all | random | 2 | 0.125 | 0.000 | 0.500 | 0.500 | 6.0 |",
    ]
    mixed_units = format_table({"SFT": m, "chars": metrics([T("A|B")], ["A|B"])}, keys=("mean_len",), per_n=False)
    assert mixed_units.splitlines()[0] == "| N | method | mean len |"  # no single unit to name
    short = format_table({"SFT": m}, keys=("cell_acc",), per_n=False).splitlines()
    assert short == ["| N | method | cell acc |", "|---|---|---:|", "| all | SFT | 0.529 |"]
