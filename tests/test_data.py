"""Tests for data.py: the released text format byte for byte (expected strings written by hand from the reference,
section 1.2), seeded reproducibility, the cell-level train/test split (also under augmentation), row validation,
JSON / JSONL / folder / parquet loading, the Hungarian solver against brute force, teacher traces against the
reward, the committed PBMC file and tokenizer."""
import itertools
import json
import sys

import numpy as np
import pytest

import data
import reward

# Verbatim from the reference (data/split_train_test.py); "N" is literally the letter N.
SYSTEM = ("You are an expert assistant specialized in cell type annotation. You will be given a batch of N cells from "
          "the same donor, where each cell represents a unique cell type. For each cell, the top expressed genes are "
          "provided in descending order of expression. Using both the gene expression data and donor information, "
          "determine the correct cell type for each cell. You will also receive a list of N candidate cell types, and "
          "each candidate must be assigned to exactly one cell. Ensure that you consider all cells and candidate types "
          "together, rather than annotating each cell individually. Include your detailed reasoning within <think> "
          "and </think> tags, and provide your final answer within <answer> and </answer> tags. The final answer "
          "should be a single string listing the assigned cell types in order, separated by ' | '.")

# 4 cells x 6 genes. Cell 0 has a tie (G2 = G4 = 5: column order), cell 2 a single expressed gene (zeros are not
# listed), cell 3 a three-way tie at 1 (G1, G2 before G3). Types mix cases: sorted() puts "Zeta" first.
GENES = np.array(["G1", "G2", "G3", "G4", "G5", "G6"])
VALUES = np.array([[0, 5, 1, 5, 0, 2],
                   [3, 0, 0, 1, 7, 0],
                   [0, 0, 0, 0, 0, 4],
                   [1, 1, 1, 2, 0, 0]])
TYPES = np.array(["beta", "Zeta", "gamma cell", "alpha"])
CONTEXT = ("The cell is from a female at the 30-year-old stage, originating from the blood. "
           "The patient is healthy with no diagnosed disease. ")
USER = ("Context: The cell is from a female at the 30-year-old stage, originating from the blood. The patient is "
        "healthy with no diagnosed disease. \n\n"
        "Cell 1: G2, G4, G6\n"
        "Cell 2: G5, G1, G4\n"
        "Cell 3: G6\n"
        "Cell 4: G4, G1, G2\n\n"
        "Match the cells above to one of the following cell types:\n"
        "Zeta\nalpha\nbeta\ngamma cell")
ANSWER = "beta | Zeta | gamma cell | alpha"


def tiny() -> data.CellData:
    return data.CellData(VALUES, GENES, TYPES, np.array(["d1"] * 4), np.array([CONTEXT] * 4), counts=True)


def test_puzzle_text_byte_for_byte():
    assert data.SYSTEM_MSG == SYSTEM
    assert data.context_sentence(tissue="blood", disease="normal", sex="female",
                                 development_stage="30-year-old stage") == CONTEXT
    p = data.make_puzzle(CONTEXT, [data.top_genes(v, GENES, 3) for v in VALUES], list(TYPES))
    assert p.user == USER
    assert p.assistant == p.answer == ANSWER
    assert p.row() == {"system_msg": SYSTEM, "user_msg": USER, "assistant_msg": ANSWER}


def test_sampler_renders_each_cell_like_the_literal():
    lines = {0: "G2, G4, G6", 1: "G5, G1, G4", 2: "G6", 3: "G4, G1, G2"}
    sampler = data.PuzzleSampler(tiny(), np.arange(4), n_genes=3)
    p = sampler.sample(4, np.random.default_rng(0))
    assert sorted(p.cell_ids) == [0, 1, 2, 3] and p.candidates == ["Zeta", "alpha", "beta", "gamma cell"]
    expected = "\n".join(f"Cell {i}: {lines[c]}" for i, c in enumerate(p.cell_ids, 1))
    assert p.user == f"Context: {CONTEXT}\n\n{expected}\n\n{data.MATCH_LINE}\nZeta\nalpha\nbeta\ngamma cell"
    assert p.gold == [str(TYPES[c]) for c in p.cell_ids]


def test_context_sentences():
    assert data.PBMC_CONTEXT == ("The cell is from the peripheral blood. "
                                 "The patient is healthy with no diagnosed disease. ")
    assert data.context_sentence(tissue="lung", disease="chronic obstructive pulmonary disease", sex="female",
                                 development_stage="73-year-old stage", extra=["The patient is a smoker."]) == (
        "The cell is from a female at the 73-year-old stage, originating from the lung. The patient has been "
        "diagnosed with chronic obstructive pulmonary disease. The patient is a smoker. ")


def test_parse_round_trip():
    p = data.parse_row({"system_msg": SYSTEM, "user_msg": USER, "assistant_msg": ANSWER}, "test")
    assert p.context == CONTEXT
    assert p.cells == [["G2", "G4", "G6"], ["G5", "G1", "G4"], ["G6"], ["G4", "G1", "G2"]]
    assert p.candidates == ["Zeta", "alpha", "beta", "gamma cell"] and p.gold == ANSWER.split(" | ") and p.n == 4


@pytest.fixture(scope="module")
def pbmc():
    split = data.embedded()
    return split, data.fit_embedded_teacher(split)


def take(stream, k):
    return [stream[i] for i in range(k)]


def test_same_seed_same_puzzles_and_bytes(pbmc, tmp_path):
    split, _ = pbmc
    a, b, c = (data.test_puzzles(split, per_n=5, seed=s) for s in (7, 7, 8))
    for name, ps in (("a", a), ("b", b), ("c", c)):
        data.write_jsonl(ps, tmp_path / f"{name}.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert (tmp_path / "a.jsonl").read_bytes() != (tmp_path / "c.jsonl").read_bytes()
    s1, s2, s3 = (take(data.PuzzleStream(s, cells=split), 20) for s in (1, 1, 2))
    assert [p.row() for p in s1] == [p.row() for p in s2]
    assert [p.row() for p in s1] != [p.row() for p in s3]
    assert data.split_cells(split.data, seed=3).test.tolist() != split.test.tolist()


def test_no_test_cell_in_train_puzzles(pbmc):
    split, _ = pbmc
    train, test, rl = set(split.train.tolist()), set(split.test.tolist()), set(split.rl.tolist())
    assert not train & test and not rl & test and not rl & train and len(train | test | rl) == 700
    labels = split.data.labels
    assert set(labels[split.test]) == set(labels[split.train]) == set(labels[split.rl]) == set(labels)  # every side
    stream = take(data.PuzzleStream(0, cells=split), 300)
    assert all(set(p.cell_ids) <= train for p in stream)
    assert all(set(p.cell_ids) <= rl for p in take(data.PuzzleStream(0, cells=split, pool="rl"), 100))
    both = take(data.PuzzleStream(0, cells=split, pool="labelled"), 300)
    assert set().union(*(p.cell_ids for p in both)) & rl and all(set(p.cell_ids) <= train | rl for p in both)
    assert all(set(p.cell_ids) <= test for p in data.test_puzzles(split, per_n=10))
    assert {p.n for p in stream} == set(range(3, 9))
    # augmentation is on: the same train cell shows different gene lists, test cells never do
    seen = {}
    for p in stream:
        for c, genes in zip(p.cell_ids, p.cells):
            seen.setdefault(c, set()).add(tuple(genes))
    assert max(len(v) for v in seen.values()) > 1
    for p in data.test_puzzles(split, per_n=5):
        for c, genes in zip(p.cell_ids, p.cells):
            assert genes == data.top_genes(split.data.values[c], split.data.genes, data.CPU.n_genes)


def test_rl_share_by_hand(pbmc):
    """Per type of m cells: k = round(0.3 m) test cells (at least 2), then round(rl_frac (m - k)) rl cells (at least
    one, never all); the test cells are those of the split without an rl share, and the teacher is fitted on the
    same cells either way (train and rl: every label training uses)."""
    split, teacher = pbmc
    plain = data.split_cells(split.data, data.CPU.test_frac, data.CPU.split_seed)
    assert split.test.tolist() == plain.test.tolist() and split.labelled.tolist() == plain.train.tolist()
    labels = split.data.labels
    for t in set(labels.tolist()):
        m = int((labels == t).sum())
        k = max(2, round(0.3 * m))
        r = max(1, round(0.3 * (m - k)))
        assert ((labels[split.test] == t).sum(), (labels[split.rl] == t).sum()) == (k, r)
    assert np.array_equal(teacher.weight, data.fit_embedded_teacher(plain).weight)
    with pytest.raises(ValueError, match="empty"):
        data.PuzzleStream(0, cells=plain, pool="rl")
    # the bounds, on a small share: 7 cells -> 2 test, round(0.1 x 5) = 0 -> 1 rl; 4 cells -> 2 test, 1 rl, 1 train
    few = data.CellData(np.ones((11, 1), dtype=np.int64), np.array(["g"]), np.array(["a"] * 7 + ["b"] * 4),
                        np.full(11, "d"), np.full(11, "c "))
    small = data.split_cells(few, 0.3, 0, rl_frac=0.1)
    assert [len(x) for x in (small.test, small.rl, small.train)] == [4, 2, 5]
    assert set(few.labels[small.rl]) == set(few.labels[small.train]) == {"a", "b"}


def test_fingerprint_follows_content(pbmc):
    """Equal for equal content (another object, another seed), different for one changed row or another pool."""
    split, _ = pbmc
    rows = take(data.PuzzleStream(0, cells=split), 5)
    same = [data.parse_row(p.row(), "train") for p in rows]
    assert data.PuzzleStream(0, rows=rows).fingerprint() == data.PuzzleStream(7, rows=same).fingerprint()
    same[2].user = same[2].user.replace("Cell 1:", "Cell 1 :")
    assert data.PuzzleStream(0, rows=rows).fingerprint() != data.PuzzleStream(0, rows=same).fingerprint()
    cells = {pool: data.PuzzleStream(0, cells=split, pool=pool).fingerprint() for pool in ("train", "rl")}
    assert cells["train"] != cells["rl"] and cells["rl"] == data.PuzzleStream(5, cells=split, pool="rl").fingerprint()


@pytest.fixture
def downsample_calls(monkeypatch):
    """The (counts, p_range) of every data.downsample call, in order, the real thinning still done."""
    calls, real = [], data.downsample

    def spy(counts, rng, p_range):
        calls.append((counts.copy(), p_range))
        return real(counts, rng, p_range)

    monkeypatch.setattr(data, "downsample", spy)
    return calls


@pytest.mark.parametrize("mix", [0.0, 0.5, 1.0])
def test_mix_pools_a_cell_with_a_mate_of_its_type_and_donor(pbmc, downsample_calls, mix):
    """PuzzleSampler(mix=...): each augmented cell is thinned from its own counts (p_range as given) or, with
    probability mix, from its counts plus those of another pool cell of its type and donor (p_range halved)."""
    split, _ = pbmc
    d = split.data
    calls = downsample_calls
    sampler = data.PuzzleSampler(d, split.train, 20, augment=True, p_range=(0.3, 1.0), mix=mix)
    rng = np.random.default_rng(0)
    train = set(split.train.tolist())
    pooled = 0
    for _ in range(60):
        calls.clear()
        p = sampler.sample(5, rng)
        assert len(calls) == p.n
        for c, (counts, p_range) in zip(p.cell_ids, calls):
            rest = counts - d.values[c]
            if not rest.any():
                assert p_range == (0.3, 1.0)
                continue
            pooled += 1
            assert p_range == (0.15, 0.5)
            mates = [m for m in train if m != c and (d.values[m] == rest).all()]
            assert mates and all(d.labels[m] == d.labels[c] and d.donors[m] == d.donors[c] for m in mates)
    assert pooled == 0 if mix == 0 else 0.3 * 300 * mix < pooled <= 300 * mix + 30
    with pytest.raises(ValueError, match="augment"):
        data.PuzzleSampler(d, split.train, 20, augment=False, mix=0.5)


def test_ambient_adds_part_of_a_stranger_of_another_type(pbmc, downsample_calls):
    """PuzzleSampler(ambient=1): every cell gets up to 30% of the UMIs of one pool cell of another type, same donor,
    before the usual thinning (p_range unchanged)."""
    split, _ = pbmc
    d = split.data
    calls = downsample_calls
    sampler = data.PuzzleSampler(d, split.train, 20, augment=True, p_range=(0.3, 1.0), ambient=1.0)
    rng = np.random.default_rng(0)
    train = split.train.tolist()
    for _ in range(30):
        calls.clear()
        p = sampler.sample(4, rng)
        for c, (counts, p_range) in zip(p.cell_ids, calls):
            extra = counts - d.values[c]
            assert p_range == (0.3, 1.0) and extra.min() >= 0 and extra.any()
            strangers = [s for s in train if d.labels[s] != d.labels[c] and d.donors[s] == d.donors[c]
                         and (extra <= d.values[s]).all() and extra.sum() <= 0.45 * d.values[s].sum()]
            assert strangers, "the added UMIs are not part of one cell of another type"


def test_split_needs_cells_on_both_sides():
    with pytest.raises(ValueError, match="type .Zeta. has 1 cells; need 3"):
        data.split_cells(tiny())


def good_row(i=0):
    p = data.make_puzzle(CONTEXT, [data.top_genes(v, GENES, 3) for v in np.roll(VALUES, i, 0)],
                         list(np.roll(TYPES, i)))
    return p.row()


def bad_rows():
    def edit(**kw):
        r = good_row()
        r.update(kw)
        return r
    missing = good_row()
    del missing["user_msg"]
    return {
        "missing or non-string field 'user_msg'": missing,
        "empty answer": edit(assistant_msg=" | "),
        "4 cells, 4 candidates, 3 answer items": edit(assistant_msg="beta | Zeta | alpha"),
        "duplicate candidates": edit(user_msg=USER.replace("\ngamma cell", "\nbeta"),
                                     assistant_msg="beta | Zeta | beta | alpha"),
        "gold types not among the candidates": edit(assistant_msg="beta | Zeta | delta | alpha"),
        "the answer repeats a type: ['beta']": edit(assistant_msg="beta | Zeta | beta | alpha"),
        "5 cells, 4 candidates": edit(user_msg=USER.replace("Cell 4: G4, G1, G2", "Cell 4: G4, G1, G2\nCell 5: G3")),
    }


@pytest.mark.parametrize("problem", list(bad_rows()))
def test_malformed_row_names_file_row_and_problem(tmp_path, problem):
    rows = [good_row(0), good_row(1), bad_rows()[problem], good_row(2)]
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError) as e:
        data.load_puzzles(str(path))
    assert f"{path} row 2: " in str(e.value) and problem in str(e.value)
    puzzles, skipped = data.load_puzzles(str(path), skip_bad=True)
    assert skipped == 1 and [p.row() for p in puzzles] == [rows[0], rows[1], rows[3]]


def test_json_jsonl_and_folder_layouts(tmp_path):
    rows = [good_row(i) for i in range(3)]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    for name in ("rows.json", "rows.jsonl"):
        puzzles, skipped = data.load_puzzles(str(tmp_path / name))
        assert [p.row() for p in puzzles] == rows and skipped == 0
    hf = tmp_path / "hf" / "data"       # Hugging Face layout, sharded
    hf.mkdir(parents=True)
    (hf / "train-00000-of-00002.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (hf / "train-00001-of-00002.jsonl").write_text(json.dumps(rows[1]) + "\n" + json.dumps(rows[2]) + "\n")
    (hf / "test.json").write_text(json.dumps(rows[:1]))
    assert [p.row() for p in data.load_puzzles(str(tmp_path / "hf"), "train")[0]] == rows
    assert len(data.load_puzzles(str(tmp_path / "hf"), "test")[0]) == 1
    with pytest.raises(FileNotFoundError, match="reasoning"):
        data.load_puzzles(str(tmp_path / "hf"), "reasoning")
    (hf / "test.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(ValueError, match="several formats"):
        data.load_puzzles(str(tmp_path / "hf"), "test")
    with pytest.raises(FileNotFoundError):
        data.load_puzzles(str(tmp_path / "nope.json"))


def test_reasoning_rows_take_the_answer_from_the_trace(tmp_path):
    row = dict(good_row(), assistant_msg=f"<think>Cell 1 ... | ...</think>\n<answer>{ANSWER}</answer>")
    (tmp_path / "reasoning.json").write_text(json.dumps([row, dict(row, assistant_msg="<think>x</think>")]))
    with pytest.raises(ValueError, match="row 1: trace without <answer>"):
        data.load_puzzles(str(tmp_path), "reasoning")
    puzzles, skipped = data.load_puzzles(str(tmp_path), "reasoning", skip_bad=True)
    assert skipped == 1 and puzzles[0].gold == ANSWER.split(" | ") and puzzles[0].assistant == row["assistant_msg"]


def test_parquet_loading(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow not installed (optional)")
    import pyarrow as pa
    rows = [good_row(i) for i in range(3)]
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / "test-00000-of-00001.parquet")
    assert [p.row() for p in data.load_puzzles(str(tmp_path))[0]] == rows


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)          # makes `import pyarrow...` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "test.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(ImportError, match="pip install pyarrow"):
        data.load_puzzles(str(path))


def test_hungarian_matches_brute_force():
    rng = np.random.default_rng(0)
    for n in range(1, 8):
        for _ in range(15):
            s = rng.normal(size=(n, n)) if n % 2 else rng.integers(-3, 4, size=(n, n)).astype(float)
            col = data.hungarian(s)
            assert sorted(col.tolist()) == list(range(n))
            best = max(sum(s[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
            assert np.isclose(s[np.arange(n), col].sum(), best)


@pytest.mark.parametrize("order", ["cell", "fix"])
def test_accepted_traces_score_one(pbmc, order):
    split, teacher = pbmc
    puzzles = take(data.PuzzleStream(3, cells=split), 100) + data.test_puzzles(split, per_n=10)
    accepted = rejected = 0
    for p in puzzles:
        completion, types = teacher.trace(p, order)
        assert reward.parse(completion) == types                 # every trace is well formed
        assert "|" not in completion.split("</think>")[0]      # no '|' line for the reward's fallback to pick
        lines = completion.split("</think>")[0].removeprefix("<think>").split("\n")
        if order == "fix":  # N lines then the conflicts: test_fix_trace_is_argmax_then_the_moves_of_the_optimum
            lines = lines[:p.n]
        assert len(lines) == p.n and sorted(ln.split(":")[0] for ln in lines) == sorted(f"Cell {i + 1}" for i in range(p.n))
        if order == "cell":
            assert [ln.split(":")[0] for ln in lines] == [f"Cell {i + 1}" for i in range(p.n)]
        # the decision first: "Cell i: <type> (<marker>, <marker>)"
        assert all(ln.split(": ", 1)[1].split(" (")[0] in p.candidates for ln in lines)
        trace = teacher.accepted_trace(p, order)
        if trace is None:
            rejected += 1
            assert reward.score(completion, p.answer, "batch") == 0.0
        else:
            accepted += 1
            assert reward.score(trace, p.answer, "mixed") == reward.score(trace, p.answer, "batch") == 1.0
    assert accepted > 50 and rejected > 0
    stream = take(data.PuzzleStream(4, cells=split, teacher=teacher), 20)
    assert all(reward.score(p.assistant, p.answer, "batch") == 1.0 for p in stream)


def test_fix_trace_is_argmax_then_the_moves_of_the_optimum(pbmc):
    """order="fix": N lines of per-cell argmax in cell order, a repeat marked "as cell k" (the first cell that named
    the type); then "Every type is used once" or the repeated types with their cells, the unused types, and one line
    per cell that the Hungarian optimum moves."""
    split, teacher = pbmc
    puzzles = take(data.PuzzleStream(5, cells=split), 100) + data.test_puzzles(split, per_n=10)
    moved_any = 0
    for p in puzzles:
        completion, types = teacher.trace(p, "fix")
        assert reward.parse(completion) == types == teacher.solve(p)
        lines = completion.split("</think>")[0].removeprefix("<think>").removesuffix(".").split("\n")
        named = lambda ln: ln.split(": ", 1)[1].split(" (")[0]
        assert [ln.split(":")[0] for ln in lines[:p.n]] == [f"Cell {i + 1}" for i in range(p.n)]
        argmax = teacher.argmax(p)
        assert [named(ln) for ln in lines[:p.n]] == argmax
        first = {t: argmax.index(t) for t in argmax}
        assert [ln.rpartition(")")[2] for ln in lines[:p.n]] == [
            f", as cell {first[t] + 1}" if first[t] < i else "" for i, t in enumerate(argmax)]
        repeated = sorted({t for t in argmax if argmax.count(t) > 1})
        if not repeated:
            assert lines[p.n:] == ["Every type is used once"] and types == argmax
            continue
        head = lines[p.n]
        assert head.startswith("Repeated: ") and all(f"{t} (cells " in head for t in repeated)
        assert head.split("Unused: ")[1].split(", ") == [t for t in p.candidates if t not in argmax]
        moved = [i for i in range(p.n) if types[i] != argmax[i]]
        assert [ln.split(":")[0] for ln in lines[p.n + 1:]] == [f"Cell {i + 1}" for i in moved]
        assert [named(ln) for ln in lines[p.n + 1:]] == [types[i] for i in moved]
        moved_any += bool(moved)
    assert moved_any > 10


def test_hard_is_a_repeat_or_a_best_type_outside_the_candidates(pbmc):
    """Teacher.hard against an independent reading: each cell scored alone against all ten types (a one-cell
    puzzle whose candidates are every type) for its best type, and the per-cell argmax for repeats."""
    split, teacher = pbmc
    puzzles = take(data.PuzzleStream(6, cells=split), 150) + data.test_puzzles(split, per_n=10)
    kinds = set()
    for p in puzzles:
        best = []
        for genes in p.cells:
            alone = data.make_puzzle(p.context, [genes] + [[]] * (len(teacher.types) - 1), teacher.types)
            best.append(alone.candidates[int(teacher.scores(alone)[0].argmax())])
        repeat = len(set(teacher.argmax(p))) < p.n
        outside = any(t not in p.candidates for t in best)
        assert teacher.hard(p) == (repeat or outside)
        kinds.add((repeat, outside))
    assert kinds == {(False, False), (False, True), (True, False), (True, True)}


def test_teacher_beats_argmax_beats_random(pbmc):
    split, teacher = pbmc
    test = data.test_puzzles(split, per_n=30)
    rng = np.random.default_rng(0)
    batch = {name: np.mean([f(p) == p.gold for p in test]) for name, f in (
        ("random", lambda p: [p.candidates[j] for j in rng.permutation(p.n)]),
        ("argmax", teacher.argmax), ("teacher", teacher.solve))}
    assert batch["teacher"] > batch["argmax"] + 0.1 and batch["argmax"] > batch["random"] + 0.05


def test_committed_pbmc_file():
    d = data.load_pbmc()
    assert d.values.shape == (700, 765) and len(d.genes) == 765 and len(set(d.genes.tolist())) == 765
    labels, n = np.unique(d.labels, return_counts=True)
    assert len(labels) == 10 and dict(zip(labels, n))["CD4+/CD45RA+/CD25- Naive T"] == 8
    assert d.values.dtype.kind == "i" and d.values.min() == 0
    assert (d.values == 1).any(axis=1).all()        # every cell's smallest nonzero count is 1 by construction
    assert len(set(d.donors.tolist())) == 1 and d.counts


def test_committed_tokenizer():
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(data.TOKENIZER_PATH)
    assert [tok.token_to_id(t) for t in data.SPECIAL_TOKENS] == [0, 1, 2]
    text = f"<|im_start|>user\n{USER}<|im_end|>\n"
    ids = tok.encode(text).ids
    assert ids[0] == 1 and ids[-2] == 2 and tok.decode(ids, skip_special_tokens=False) == text
    assert len(tok.encode(", LYZ, CD74, HLA-DRA").ids) == 3                 # frequent genes are single tokens
    texts = ["a, b", "ab, b"] * 5
    assert data.train_tokenizer(texts, 300).to_str() == data.train_tokenizer(texts, 300).to_str()


def test_export_is_read_back_by_the_loader(pbmc, tmp_path):
    split, _ = pbmc
    counts = data.export(split, str(tmp_path), n_train=20, per_n=2, seed=5)
    assert counts == {"train": 20, "reasoning": 20, "test": 12}
    expected = data.test_puzzles(split, per_n=2, seed=5)
    test, skipped = data.load_puzzles(str(tmp_path), "test")
    key = lambda ps: [(p.cells, p.gold, p.context) for p in ps]
    assert skipped == 0 and key(test) == key(expected)
    for p in data.load_puzzles(str(tmp_path), "reasoning")[0]:
        assert reward.score(p.assistant, p.answer, "batch") == 1.0



# The first row of the released test split (reference section 1.3: user_msg and answer of HF `test` row 0).
REF_USER = (
    'Context: The cell is from a female at the 73-year-old stage, originating from the lung. The patient '
    'has been diagnosed with chronic obstructive pulmonary disease. The patient is a smoker. There is no '
    'cancer present. \n'
    '\n'
    'Cell 1: MT2A, ACTB, MT1X, MTATP6P29, MYL9, MTND4LP30, CRIP1, DSTN, MTND2P13, MTCO2P22, S100A6, '
    'MTCYBP19, MALAT1, VIM, RPLP1, RGS5, TPT1, LGALS1, TPM2, MTND3P6, MTND1P22, PTMA, TMSB4X, STEAP1B, '
    'MT1M, LPP, RPL21, RPL32, HSPB1, RPL18A, RPL10, EEF1A1, RBFOX2, RPL41, IFITM3, CTNNB1, MYH11, RPL34, '
    'RPS3A, RPS27, CALD1, IL6ST, RPS18, RPS27L, IGFBP7, B2M, TPM1, DTWD2, MYL6, RPL39\n'
    'Cell 2: MALAT1, FTL, MTCO2P22, TMSB4X, B2M, MTND4LP30, IL6ST, RPS19, RBFOX2, CCSER1, RPL41, RPS27, '
    'RPL10, ACTB, MTATP6P29, MTND2P13, RPS12, STEAP1B, RPL13A, S100A4, RPL34, TMSB10, RPL28, RPL32, '
    'RPL39, RPL13, RPL21, RPS15A, RPL36A, DGKI, SAT1, RPS2, RPS29, PLEKHA7, DUSP1, EEF1A1, RPS17, RPS4X, '
    'RPLP1, RPS6, RPS9, TYROBP, NAMPT, MTCYBP19, RPS3A, S100A6, RPL27A, MTND3P6, RPS16, RPLP2\n'
    'Cell 3: SCGB3A1, SCGB1A1, SLPI, WFDC2, TPT1, MTCO2P22, B2M, RPS18, RPS4X, RPS6, MTND4LP30, RPL34, '
    'RPS14, RPL31, STEAP1B, LCN2, RPLP1, IL6ST, S100A6, RPL21, RPL37A, ADGRL3, RPL37, RBFOX2, RPL41, '
    'RARRES1, RPL19, MTATP6P29, BPIFB1, ITM2B, EEF1A1, RPLP2, RPS27, RPS19, RPL32, SAA1, CXADR, RPL29, '
    'FTL, MTND3P6, RPS28, RPS17, RPL13, PIGR, RPL18A, RPL11, RPL13A, SAT1, RPS8, RPS29\n'
    'Cell 4: MT2A, TMSB10, ACTB, MT1M, EMP1, IGFBP7, MTCO2P22, B2M, DEPP1, MTND4LP30, HLA-B, TMSB4X, '
    'IFITM2, TM4SF1, RPL10, EPAS1, PTPRG, RPLP2, MTND2P13, ACTG1, RPL37A, STEAP1B, RPS6, TPT1, RPS8, '
    'PECAM1, IFITM3, MT1E, CCSER1, H3-3B, FTL, CD93, RPL13A, MTATP6P29, S1PR1, CAV1, MTND3P6, IL6ST, '
    'TIMP3, NES, NAMPT, RPS12, PDZD2, MTND5P17, SYN3, RPL8, RPL18, RPS27, RPL28, RPL41\n'
    'Cell 5: MALAT1, MTCO2P22, MTND4LP30, MTATP6P29, FTL, CXCL8, B2M, MTCYBP19, MTND3P6, ACTB, MTND2P13, '
    'HLA-DRA, NFKB1, MAP4K4, TMSB4X, RPL10, AREG, SAT1, LGALS1, IL6ST, RBFOX2, KYNU, TPT1, RPL28, CD74, '
    'RPLP1, RPL34, CXCL2, RPL41, MTND1P22, VIM, CD44, NEAT1, RPS12, RPL39, DOCK4, NBPF14, CCSER1, NUMB, '
    'HLA-B, RPS24, RPS17, RPL13, NBPF19, ALCAM, NBPF26, SOD2, CSF2RA_ENSG00000198223, RPL12, SRGN\n'
    'Cell 6: MALAT1, MTATP6P29, ZSWIM6, MTCO2P22, MTCYBP19, MT2A, MTND1P22, MACF1, MACROD2, SFTPB, '
    'FHIP1A-DT, MTND2P13, VMP1, MTND3P6, IL1R1, RPLP1, RPL13, ALCAM, PALLD, DST, MTND4LP30, HNRNPH1, '
    'IL6ST, NEDD4L, RPL10, SGPP2, RBFOX2, SMYD3, APP, RPL41, RPS18, SIK3, ITGA2, EFNA5, NXN, '
    'F3_ENSG00000117525, RPS27, WWTR1, STAT3, ZFAND3, ACBD3, RPS12, TXNRD1, DENND5A, MTUS1, AOPEP, '
    'CXCL2, GCLC, SDK1, RPL35A\n'
    'Cell 7: TMSB4X, MALAT1, CCSER1, RPL10, FN1, RPL13A, IL6ST, TPT1, RBFOX2, RPS27, MTCO2P22, RPL34, '
    'RPL41, MGP, RPS15A, RPL37A, FTL, RPS18, RPS12, CFD, RPS27A, RPLP1, RPS8, BCAS4, RPL7, RPLP2, RPL21, '
    'MTATP6P29, FOS, DDX5, MTND4LP30, RPS14, PTMA, RPL3, RPL32, ACTB, RPS4X, RPL5, RPL13, B2M, RPL11, '
    'RPL31, RPL9, STEAP1B, RPL8, MTCYBP19, RPS6, FOSB, ULK4, H3-3B\n'
    'Cell 8: CCL21, MALAT1, MT2A, TMSB4X, RPL10, STEAP1B, VIM, RPL21, ASAP1, EEF1A1, RPS27, MTCO2P22, '
    'RPL32, TPT1, MTND4LP30, FTL, RHOJ, TM4SF1, CCSER1, RPLP1, RPL34, RPL13A, IL6ST, MARCHF3, MTND2P13, '
    'RPL37A, MTATP6P29, RPS14, DLC1, RPS12, RPS27A, MTCYBP19, RBFOX2, TMSB10, MTND1P22, B2M, FOS, TGFB2, '
    'RPS3A, RPS28, RPS6, ZFP36, RPL41, RPS15A, RPL39, MIR4435-2HG, RPL18A, PTMA, RPS18, RPS8\n'
    'Cell 9: FTL, MTATP6P29, MTND2P13, TMSB4X, MTCO2P22, MTND4LP30, CCSER1, APOC1, MTCYBP19, MTND3P6, '
    'MT2A, B2M, RPS19, BCAS4, CCDC30, CCL18, RPS9, ADGRL3, S100A6, MTND1P22, ACTB, RPS18, MTND5P17, '
    'LGALS1, APOE, CD52, COLEC11, RPLP2, RPL34, RPL39, MT1X, RPL3, RPL27A, HSPA4, TBCA, RBMS1, IFI27, '
    'PRDX1, JPT1, R3HDM2, COX5B, NSA2, TMSB10, RPS25, S100A10, SELENOW, HLA-DRA, RPS6, S100A9, ELOB\n'
    '\n'
    'Match the cells above to one of the following cell types:\n'
    'classical monocyte\n'
    'endothelial cell of lymphatic vessel\n'
    'epithelial cell of lung\n'
    'fibroblast of lung\n'
    'macrophage\n'
    'malignant cell\n'
    'non-classical monocyte\n'
    'pulmonary artery endothelial cell\n'
    'smooth muscle cell')
REF_ANSWER = ("smooth muscle cell | non-classical monocyte | epithelial cell of lung | pulmonary artery endothelial cell"
              " | classical monocyte | malignant cell | fibroblast of lung | endothelial cell of lymphatic vessel"
              " | macrophage")


def test_released_row_parses_and_renders_back_byte_for_byte():
    p = data.parse_row({"system_msg": SYSTEM, "user_msg": REF_USER, "assistant_msg": REF_ANSWER}, "test")
    assert p.n == 9 and all(len(c) == 50 for c in p.cells) and p.candidates == sorted(p.candidates)
    assert "CSF2RA_ENSG00000198223" in p.cells[4] and p.context.endswith("There is no cancer present. ")
    q = data.make_puzzle(p.context, p.cells, p.gold)
    assert q.user == REF_USER and q.answer == REF_ANSWER
