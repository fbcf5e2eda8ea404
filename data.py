"""CellPuzzles data: load the released rows, build new puzzles from a labelled expression matrix, teacher traces,
and the small tokenizer of the CPU model. The released format is that of the Cell-o1 release (HF `ncbi/CellPuzzles`).

A puzzle (released format, HF `ncbi/CellPuzzles`, splits train / test / reasoning) is a row of three strings:
  system_msg     the fixed instruction SYSTEM_MSG (the "N" in it is literally the letter N);
  user_msg       "Context: {context}\\n\\nCell 1: g1, g2, ...\\n...\\nCell N: ...\\n\\n"
                 "Match the cells above to one of the following cell types:\\n{type}\\n{type}..." where the context
                 ends with a space, each cell lists its top 50 genes by descending expression and the candidates
                 are the N gold types in Python `sorted()` (case-sensitive) order;
  assistant_msg  the gold types in cell order joined by " | " (train, test), or a full
                 "<think>...</think>\\n<answer>t1 | ... | tN</answer>" trace (reasoning).
The N cells come from one donor and have N distinct types, one cell each, so the answer is a permutation of the
candidates. Released N is 8-15.

Where our builder differs from the released pipeline (data/match_qa.py), on purpose:
  - cells are split into train and test *before* any puzzle is built (stratified by type, every type has test
    cells), so no test cell is in a train puzzle. The released split is by puzzle: only 604 of the 1,095 released
    test puzzles share no cell with train;
  - sampling is seeded with a numpy Generator over sorted type lists: same seed -> byte-identical puzzles. The
    released match_qa.py sampled types from a Python `set`, whose order changes between runs;
  - a context with no sex / age / ethnicity reads "The cell is from the {tissue}." instead of the released,
    malformed "The cell is from, originating from the {tissue}.";
  - only expressed genes (value > 0) are listed; ties in expression keep the matrix's column order (stable sort).
    The released code used argpartition, whose tie order is unspecified, and could list zero-valued genes;
  - for the small CPU model the defaults are shorter (CPU below: 20 genes, N 3-8) and train cells are re-drawn by
    binomial down-sampling of their UMI counts every time a train puzzle is built (augment): a new, faithful top-gene
    list of the same cell. Test cells are never augmented. RELEASED holds the released settings (50 genes, N 8-15).

Your own cells: `python data.py build --h5ad FILE ... --out DIR` reads labelled AnnData files (anndata, an optional
dependency; CELLxGENE obs/var names by default, see ObsKeys), keeps each cell's top genes (read in row chunks, never
the whole matrix dense), splits the cells as above (test, GRPO's, SFT's) and writes the released layout with
export_rows, plus cells.tsv (each cell's split) and a summary. `python data.py export OUT` writes the embedded data's.

Teacher traces (SFT data where there is no reasoning split): a marker model fitted on train cells only (log-odds
of a gene being in a type's top-gene lists vs the other types'), one-to-one assignment by the Hungarian algorithm,
and a short trace in the paper's spirit (marker genes per cell, the constraint settling conflicts). As in the
paper, a trace is kept only when its answer is fully correct (rejection sampling).
"""
import argparse
import glob
import hashlib
import json
import math
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field

import numpy as np

ROOT = os.path.dirname(os.path.abspath(__file__))
PBMC_PATH = os.path.join(ROOT, "assets", "pbmc68k_reduced.npz")
TOKENIZER_PATH = os.path.join(ROOT, "assets", "tokenizer.json")
SPLITS = ("train", "test", "reasoning")
FIELDS = ("system_msg", "user_msg", "assistant_msg")

SYSTEM_MSG = (
    "You are an expert assistant specialized in cell type annotation. You will be given a batch of N cells from the "
    "same donor, where each cell represents a unique cell type. For each cell, the top expressed genes are provided "
    "in descending order of expression. Using both the gene expression data and donor information, determine the "
    "correct cell type for each cell. You will also receive a list of N candidate cell types, and each candidate "
    "must be assigned to exactly one cell. Ensure that you consider all cells and candidate types together, rather "
    "than annotating each cell individually. Include your detailed reasoning within <think> and </think> tags, and "
    "provide your final answer within <answer> and </answer> tags. The final answer should be a single string "
    "listing the assigned cell types in order, separated by ' | '.")
MATCH_LINE = "Match the cells above to one of the following cell types:"


# ----------------------------------------------------------------------------- puzzles

@dataclass
class Puzzle:
    system: str
    user: str
    assistant: str            # assistant_msg as stored: the gold answer, or a full trace
    context: str              # with its trailing space
    cells: list[list[str]]    # top genes of cell i, descending expression
    candidates: list[str]     # sorted()
    gold: list[str]           # type of cell i
    cell_ids: list[int] | None = None  # rows of the source matrix (built puzzles only; not written out)
    source: str | None = None          # "file row k" (loaded puzzles only): where an error about it points

    @property
    def n(self) -> int:
        return len(self.cells)

    @property
    def answer(self) -> str:
        return " | ".join(self.gold)

    def row(self) -> dict:
        return {"system_msg": self.system, "user_msg": self.user, "assistant_msg": self.assistant}


def render_user(context: str, cells: list[list[str]], candidates: list[str]) -> str:
    lines = "\n".join(f"Cell {i}: {', '.join(genes)}" for i, genes in enumerate(cells, 1))
    return f"Context: {context}\n\n{lines}\n\n{MATCH_LINE}\n" + "\n".join(candidates)


def make_puzzle(context: str, cells: list[list[str]], types: list[str], cell_ids=None) -> Puzzle:
    """A released-format puzzle: cell i has gold type types[i]; candidates are sorted() (case-sensitive)."""
    cands = sorted(types)
    return Puzzle(SYSTEM_MSG, render_user(context, cells, cands), " | ".join(types), context, cells, cands,
                  list(types), cell_ids)


def split_items(text: str) -> list[str]:
    return [t for t in map(str.strip, text.split("|")) if t]


def parse_user(user: str) -> tuple[str, list[list[str]], list[str]]:
    """user_msg -> (context, cell gene lists, candidates); ValueError naming what is malformed."""
    head, sep, tail = user.partition(f"\n\n{MATCH_LINE}\n")
    if not sep:
        raise ValueError(f"no '{MATCH_LINE}' line")
    i = head.find("Cell 1: ")
    if i < 0:
        raise ValueError("no 'Cell 1: ' line")
    context = head[:i].removesuffix("\n\n")
    if context and not context.startswith("Context: "):
        raise ValueError("text before the cells does not start with 'Context: '")
    cells = []
    for k, line in enumerate(head[i:].split("\n"), 1):
        prefix = f"Cell {k}: "
        if not line.startswith(prefix):
            raise ValueError(f"line {line[:30]!r} should start with {prefix!r}")
        cells.append(line[len(prefix):].split(", "))
    cands = tail.rstrip("\n").split("\n")
    if any(not c.strip() for c in cands):
        raise ValueError("empty candidate line")
    return context.removeprefix("Context: "), cells, cands


def parse_row(row: dict, split: str = "test") -> Puzzle:
    """One released row -> Puzzle, validated. For the reasoning split (or any trace) the gold answer is the text
    inside <answer>...</answer>. Raises ValueError describing the problem (the caller adds file and row)."""
    if not isinstance(row, dict):
        raise ValueError(f"row is a {type(row).__name__}, not an object")
    for f in FIELDS:
        if not isinstance(row.get(f), str):
            raise ValueError(f"missing or non-string field {f!r}")
    text = row["assistant_msg"]
    if split == "reasoning" or "<think>" in text:
        m = re.search(r"<answer>(.*?)</answer>", text, re.DOTALL)
        if not m:
            raise ValueError("trace without <answer>...</answer>")
        text = m.group(1)
    gold = split_items(text)
    if not gold:
        raise ValueError("empty answer")
    context, cells, cands = parse_user(row["user_msg"])
    if not (len(cells) == len(cands) == len(gold)):
        raise ValueError(f"{len(cells)} cells, {len(cands)} candidates, {len(gold)} answer items (must be equal)")
    if len(set(cands)) != len(cands):
        raise ValueError(f"duplicate candidates: {sorted(c for c in set(cands) if cands.count(c) > 1)}")
    missing = [g for g in gold if g not in cands]
    if missing:
        raise ValueError(f"gold types not among the candidates: {missing}")
    if len(set(gold)) != len(gold):  # the reward would score every answer -1: a puzzle is a one-to-one assignment
        raise ValueError(f"the answer repeats a type: {sorted(g for g in set(gold) if gold.count(g) > 1)}")
    return Puzzle(row["system_msg"], row["user_msg"], row["assistant_msg"], context, cells, cands, gold)


# ----------------------------------------------------------------------------- loading

def read_rows(path: str) -> list[dict]:
    """Rows of one .json (a list of rows), .jsonl or .parquet file."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(f"reading {path} needs pyarrow, which is not installed: pip install pyarrow") from e
        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            rows = []
            for k, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path} line {k}: not JSON ({e})") from e
            return rows
        rows = json.load(f)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of rows, got a {type(rows).__name__}")
    return rows


def split_files(folder: str, split: str) -> list[str]:
    """Files of `split` under folder, at any depth: {split}.ext or {split}-*.ext
    (the HF layout is data/train-00000-of-00001.parquet)."""
    found = {}
    for ext in ("parquet", "jsonl", "json"):
        files = [f for pat in (f"{split}.{ext}", f"{split}-*.{ext}")
                 for f in glob.glob(os.path.join(folder, "**", pat), recursive=True)]
        if files:
            found[ext] = sorted(set(files))
    if len(found) > 1:
        raise ValueError(f"{folder}: split {split!r} is stored in several formats {sorted(found)}; keep one")
    if not found:
        raise FileNotFoundError(f"{folder}: no file for split {split!r} ({split}.json/.jsonl/.parquet or {split}-*)")
    return next(iter(found.values()))


def load_puzzles(source: str = "ncbi/CellPuzzles", split: str = "test",
                 skip_bad: bool = False) -> tuple[list[Puzzle], int]:
    """Puzzles of one split from a file, a folder of split files, or a hub dataset id (default ncbi/CellPuzzles).
    A malformed row raises ValueError naming file and row index; with skip_bad it is skipped and counted.
    Returns (puzzles, number skipped)."""
    if os.path.isfile(source):
        files = [source]
    else:
        if not os.path.isdir(source):
            if not re.fullmatch(r"[\w.-]+/[\w.-]+", source) or source.endswith((".json", ".jsonl", ".parquet")):
                raise FileNotFoundError(f"{source}: no such file or folder (and not a hub id like ncbi/CellPuzzles)")
            from huggingface_hub import snapshot_download
            source = snapshot_download(repo_id=source, repo_type="dataset",
                                       allow_patterns=[f"*{split}.*", f"*{split}-*"])
        files = split_files(source, split)
    puzzles, skipped = [], 0
    for path in files:
        for k, row in enumerate(read_rows(path)):
            try:
                puzzles.append(parse_row(row, split))
                puzzles[-1].source = f"{path} row {k}"
            except ValueError as e:
                if not skip_bad:
                    raise ValueError(f"{path} row {k}: {e}") from None
                skipped += 1
    if skipped:
        print(f"load_puzzles: skipped {skipped} malformed rows of {source} [{split}]")
    return puzzles, skipped


def write_jsonl(puzzles: list[Puzzle], path: str) -> None:
    """Released fields only, so load_puzzles reads ours and theirs alike. Stable bytes: sorted keys, UTF-8."""
    with open(path, "w", encoding="utf-8") as f:
        for p in puzzles:
            f.write(json.dumps(p.row(), ensure_ascii=False, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- building puzzles from a matrix

@dataclass
class CellData:
    """A labelled expression matrix: values[c, g] of cell c, gene g (UMI counts when `counts`)."""
    values: np.ndarray
    genes: np.ndarray         # str, one per column
    labels: np.ndarray        # str, cell type per row
    donors: np.ndarray        # str, donor per row; a puzzle never mixes donors
    contexts: np.ndarray      # str, context sentence per row (donor information, trailing space)
    counts: bool = False      # integer counts: required for augmentation by down-sampling


@dataclass(frozen=True)
class PuzzleConfig:
    n_genes: int = 20                           # genes listed per cell (released: 50)
    n_range: tuple[int, int] = (3, 8)           # N drawn uniformly in [lo, hi] (released: 8-15)
    augment: bool = True                        # down-sample train cells afresh for every train puzzle
    p_range: tuple[float, float] = (0.3, 1.0)   # kept fraction of UMIs, uniform per draw (1: the cell as is)
    test_frac: float = 0.3                      # cells held out per type (evaluation only)
    rl_frac: float = 0.3                        # of the remaining cells per type, kept from SFT for GRPO's prompts
    split_seed: int = 0


CPU = PuzzleConfig()
RELEASED = PuzzleConfig(n_genes=50, n_range=(8, 15), augment=False)


def context_sentence(tissue=None, disease=None, sex=None, development_stage=None, ethnicity=None, extra=()) -> str:
    """Donor context in the released pattern (data/build_context.py), ending with a space. One fix: without sex,
    age and ethnicity the released text was malformed ("The cell is from, originating from the lung.")."""
    who = "".join([f" a {sex}" if sex else "", f" at the {development_stage}" if development_stage else "",
                   f" with {ethnicity} background" if ethnicity else ""])
    s = "The cell is from" + who
    if tissue:
        s += (", originating from the " if who else " the ") + tissue
    if disease == "normal":
        s += ". The patient is healthy with no diagnosed disease."
    elif disease:
        s += f". The patient has been diagnosed with {disease}."
    else:
        s += "."
    return " ".join([s, *extra]) + " "


# The pbmc68k donor: 10x "Fresh 68k PBMCs (Donor A)", a healthy donor; sex and age are not given.
PBMC_CONTEXT = context_sentence(tissue="peripheral blood", disease="normal")


def load_pbmc(path: str = PBMC_PATH) -> CellData:
    """The embedded default: 700 PBMCs of one donor, 765 genes, 10 types (see assets/README.md)."""
    z = np.load(path)
    n = len(z["labels"])
    return CellData(z["counts"].astype(np.int64), z["genes"], z["labels"], np.full(n, str(z["donor"])),
                    np.full(n, PBMC_CONTEXT), counts=True)


def top_genes(values: np.ndarray, genes: np.ndarray, k: int) -> list[str]:
    """The k highest-valued genes of one cell, descending; ties keep column order; zeros are never listed."""
    order = np.argsort(-values, kind="stable")
    return [str(genes[g]) for g in order[:k] if values[g] > 0]


def downsample(counts: np.ndarray, rng: np.random.Generator, p_range=(0.3, 0.8)) -> np.ndarray:
    """Binomial thinning: each UMI kept with probability p ~ U(p_range), i.e. the same cell sequenced less deeply."""
    return rng.binomial(counts, rng.uniform(*p_range))


@dataclass
class CellSplit:
    """Row indices of three disjoint sets of cells. `train`: SFT's puzzles (with teacher traces); `rl`: train cells
    kept away from SFT, GRPO's prompts (empty: GRPO draws from `train`); `test`: held out, evaluation only."""
    data: CellData
    train: np.ndarray
    test: np.ndarray
    rl: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def labelled(self) -> np.ndarray:
        """Every cell whose label training may use (train and rl): what the teacher is fitted on."""
        return np.sort(np.concatenate([self.train, self.rl]))


def split_cells(data: CellData, test_frac: float = 0.3, seed: int = 0, min_test: int = 2,
                rl_frac: float = 0.0) -> CellSplit:
    """Split cells (not puzzles) per type: round(test_frac * n) test cells, at least min_test, and at least one
    train cell, so every type appears on both sides and no cell is on both. With rl_frac > 0, round(rl_frac * m) of
    a type's m remaining cells (at least one, and never all) go to `rl` instead of `train`. The test cells do not
    depend on rl_frac (the same permutation, test cells first)."""
    rng = np.random.default_rng(seed)
    train, test, rl = [], [], []
    for t in sorted(set(data.labels.tolist())):
        idx = rng.permutation(np.flatnonzero(data.labels == t))
        if len(idx) < min_test + 1 + (rl_frac > 0):
            raise ValueError(f"type {t!r} has {len(idx)} cells; need {min_test + 1 + (rl_frac > 0)} to split it")
        k = min(max(min_test, round(test_frac * len(idx))), len(idx) - 1)
        r = min(max(1, round(rl_frac * (len(idx) - k))), len(idx) - k - 1) if rl_frac > 0 else 0
        test += idx[:k].tolist()
        rl += idx[k:k + r].tolist()
        train += idx[k + r:].tolist()
    return CellSplit(data, np.array(sorted(train)), np.array(sorted(test)), np.array(sorted(rl), dtype=np.int64))


class PuzzleSampler:
    """Draws puzzles from a pool of cells: a donor with >= N types in the pool, N of its types, one cell of each.
    Cell order = the order the types were drawn. Every choice goes through the given numpy Generator."""

    def __init__(self, data: CellData, pool: np.ndarray, n_genes: int, augment: bool = False, p_range=(0.3, 0.8),
                 mix: float = 0.0, ambient: float = 0.0):
        if augment and not data.counts:
            raise ValueError("augment needs integer counts (CellData.counts)")
        if (mix or ambient) and not augment:
            raise ValueError("mix and ambient build new UMI counts: they need augment")
        self.data, self.n_genes, self.augment, self.p_range = data, n_genes, augment, p_range
        self.mix, self.ambient = mix, ambient
        self.groups: dict[str, dict[str, list[int]]] = {}   # donor -> type -> cells
        for c in np.sort(pool):
            self.groups.setdefault(str(data.donors[c]), {}).setdefault(str(data.labels[c]), []).append(c)
        self.donors = sorted(self.groups)
        self.cache = {} if augment else {int(c): top_genes(data.values[c], data.genes, n_genes) for c in pool}

    def max_n(self) -> int:
        return max(len(g) for g in self.groups.values())

    def genes_of(self, c: int, rng: np.random.Generator, mates=(), strangers=()) -> list[str]:
        """Cell c's top genes; augmented: thinned afresh. Two ways to make new cells for a small model to learn the
        markers from (the teacher's trace is computed on whatever genes result):
        - with probability `mix` (and a mate: another pool cell of c's type and donor) c's counts are pooled with the
          mate's and thinned to half the depth, a new cell of the type at a depth like the others';
        - with probability `ambient` (and a stranger: a pool cell of another type, same donor) a random 5-30% of the
          stranger's UMIs are added, like ambient RNA or a partial doublet."""
        if not self.augment:
            return self.cache[c]
        counts, depth = self.data.values[c], 1.0
        if self.mix and len(mates) > 1 and rng.random() < self.mix:
            others = [m for m in mates if m != c]
            counts, depth = counts + self.data.values[others[rng.integers(len(others))]], 0.5
        if self.ambient and len(strangers) and rng.random() < self.ambient:
            counts = counts + rng.binomial(self.data.values[strangers[rng.integers(len(strangers))]],
                                           rng.uniform(0.05, 0.3))
        p_range = (self.p_range[0] * depth, self.p_range[1] * depth)
        genes = top_genes(downsample(counts, rng, p_range), self.data.genes, self.n_genes)
        return genes or top_genes(self.data.values[c], self.data.genes, self.n_genes)

    def sample(self, n: int, rng: np.random.Generator) -> Puzzle:
        donors = [d for d in self.donors if len(self.groups[d]) >= n]
        if not donors:
            raise ValueError(f"no donor has {n} cell types in this pool (max {self.max_n()})")
        group = self.groups[donors[rng.integers(len(donors))]]
        types = sorted(group)
        types = [types[i] for i in rng.choice(len(types), size=n, replace=False)]
        ids = [int(group[t][rng.integers(len(group[t]))]) for t in types]
        strangers = {t: [x for u in group if u != t for x in group[u]] for t in types} if self.ambient else {}
        cells = [self.genes_of(c, rng, group[t], strangers.get(t, ())) for c, t in zip(ids, types)]
        return make_puzzle(str(self.data.contexts[ids[0]]), cells, types, ids)


def test_puzzles(split: CellSplit, cfg: PuzzleConfig = CPU, per_n: int = 50, seed: int = 0) -> list[Puzzle]:
    """A fixed held-out set: per_n puzzles for every N in cfg.n_range, test cells only, never augmented."""
    sampler = PuzzleSampler(split.data, split.test, cfg.n_genes)
    rng = np.random.default_rng(seed)
    lo, hi = cfg.n_range
    return [sampler.sample(n, rng) for n in range(lo, min(hi, sampler.max_n()) + 1) for _ in range(per_n)]


class PuzzleStream:
    """Train puzzle i of a run, a pure function of (seed, i), so a resumed run needs only its step count. The one
    stream behind SFT examples, GRPO prompts and the export:
      - rows (released puzzles): row i is the rows in a permutation seeded by (seed, epoch), epochs wrapping forever;
      - cells (a CellSplit): a fresh puzzle of train cells (augmented afresh when cfg.augment; `mix`, `ambient`: see
        PuzzleSampler.genes_of) drawn with rng(seed, *key, i). N is drawn in cfg.n_range (capped by the donors),
        uniformly or with P(N) proportional to N (`n_weights` "linear"); with `ramp` > 0 the largest N grows from the
        smallest to the largest over the first `ramp` puzzles (a curriculum). With a `teacher`, assistant is its
        accepted `trace_order` trace (puzzles whose trace is wrong are redrawn with a new N, as the paper's rejection
        sampling), and a puzzle that is not `Teacher.hard` is kept with probability `easy_keep` (redrawn, same N).
    `key` separates streams of one seed (GRPO prompts use (1,): prompt i is not SFT example i). `pool` names the
    cells drawn from: "train" (SFT's), "rl" (kept for GRPO) or "labelled" (both)."""

    def __init__(self, seed: int, rows: list[Puzzle] | None = None, cells: CellSplit | None = None,
                 cfg: PuzzleConfig = None, key: tuple = (), mix: float = 0.0, ambient: float = 0.0,
                 n_weights: str = "uniform", ramp: int = 0, teacher=None, trace_order: str = "fix",
                 easy_keep: float = 1.0, pool: str = "train"):
        if (rows is None) == (cells is None):
            raise ValueError("PuzzleStream takes rows or cells, not both")
        self.seed, self.rows, self.key, self.n_weights, self.ramp = seed, rows, tuple(key), n_weights, ramp
        self.teacher, self.trace_order, self.easy_keep = teacher, trace_order, easy_keep
        if cells is not None:
            cfg = cfg or CPU
            cell_ids = getattr(cells, pool)
            if not len(cell_ids):
                raise ValueError(f"the {pool!r} pool of this cell split is empty")
            self.sampler = PuzzleSampler(cells.data, cell_ids, cfg.n_genes, cfg.augment, cfg.p_range, mix, ambient)
            self.pool_ids = np.sort(cell_ids)
            self.n_range = (cfg.n_range[0], min(cfg.n_range[1], self.sampler.max_n()))

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else 0  # 0: endless

    def fingerprint(self) -> str:
        """sha256 (16 hex digits) of what the stream draws from: the rows (released-format JSON), or the pool's cells
        (ids, counts, genes, labels, donors, contexts). A resumed run compares it with its checkpoint's: the same
        path may hold other content."""
        h = hashlib.sha256()
        if self.rows is not None:
            for p in self.rows:
                h.update(json.dumps(p.row(), sort_keys=True).encode())
        else:
            d, ids = self.sampler.data, self.pool_ids
            for a in (ids, d.values[ids], d.genes, d.labels[ids], d.donors[ids], d.contexts[ids]):
                h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]

    def _draw_n(self, i: int, rng: np.random.Generator) -> int:
        lo, hi = self.n_range
        if self.ramp:  # curriculum: the largest N grows linearly from lo to hi over the first `ramp` puzzles
            hi = lo + math.ceil((hi - lo) * min(1.0, i / self.ramp))
        if self.n_weights == "uniform":
            return int(rng.integers(lo, hi + 1))
        ns = np.arange(lo, hi + 1)
        return int(rng.choice(ns, p=ns / ns.sum()))  # "linear": P(N) proportional to N

    def __getitem__(self, i: int) -> Puzzle:
        if self.rows is not None:
            epoch, j = divmod(i, len(self.rows))
            return self.rows[np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))[j]]
        rng = np.random.default_rng([self.seed, *self.key, i])
        n = self._draw_n(i, rng)
        while True:
            p = self.sampler.sample(n, rng)
            if self.teacher is None:
                return p
            trace = self.teacher.accepted_trace(p, self.trace_order)
            if trace is None:
                n = self._draw_n(i, rng)
                continue
            if self.easy_keep < 1 and not self.teacher.hard(p) and rng.random() >= self.easy_keep:
                continue  # same N: the easy ones are thinned at every N alike
            p.assistant = trace
            return p


def embedded(cfg: PuzzleConfig = CPU) -> CellSplit:
    """The default data: embedded PBMCs split by cell into SFT, GRPO and test cells."""
    return split_cells(load_pbmc(), cfg.test_frac, cfg.split_seed, rl_frac=cfg.rl_frac)


def export_rows(split: CellSplit, cfg: PuzzleConfig = CPU, n_train: int = 5000, per_n: int = 50,
                seed: int = 0) -> dict[str, list[Puzzle]]:
    """The puzzles of a released-layout folder: train (gold answers: GRPO's rows, drawn from the rl cells when the
    split has them), reasoning (accepted teacher traces on puzzles of the SFT cells, none of them the same draw as a
    train row) and test."""
    teacher = fit_embedded_teacher(split, cfg, seed=seed)
    train = PuzzleStream(seed, cells=split, cfg=cfg, pool="rl" if len(split.rl) else "train")
    reasoning = PuzzleStream(seed + 1, cells=split, cfg=cfg, teacher=teacher)
    return {"train": [train[i] for i in range(n_train)], "reasoning": [reasoning[i] for i in range(n_train)],
            "test": test_puzzles(split, cfg, per_n, seed)}


def export(split: CellSplit, out_dir: str, cfg: PuzzleConfig = CPU, n_train: int = 5000, per_n: int = 50,
           seed: int = 0) -> dict[str, int]:
    """Write export_rows() as train.jsonl, reasoning.jsonl and test.jsonl under out_dir. Returns row counts."""
    os.makedirs(out_dir, exist_ok=True)
    rows = export_rows(split, cfg, n_train, per_n, seed)
    for name, puzzles in rows.items():
        write_jsonl(puzzles, os.path.join(out_dir, f"{name}.jsonl"))
    return {k: len(v) for k, v in rows.items()}


# ----------------------------------------------------------------------------- puzzles from labelled AnnData (.h5ad)

# CELLxGENE obs columns of the donor context, in context_sentence's argument order.
CONTEXT_KEYS = ("tissue", "disease", "sex", "development_stage", "self_reported_ethnicity")
MISSING = {"", "nan", "unknown", "none", "na"}   # obs values that say nothing (case-insensitive): left out


@dataclass(frozen=True)
class ObsKeys:
    """Where a .h5ad file keeps what a puzzle needs: obs columns, the gene-name column of var ("index": var_names)
    and the matrix (".X", a layer name, or "raw" for .raw.X with .raw.var). A context key "-" leaves that field out."""
    label: str = "cell_type"
    donor: str = "donor_id"
    gene: str = "feature_name"
    layer: str = ".X"
    context: tuple[str, ...] = CONTEXT_KEYS


def import_anndata():
    try:
        import anndata
    except ImportError:
        raise ImportError("reading .h5ad files needs anndata, which is not installed: pip install anndata") from None
    return anndata


def known(value: str) -> str | None:
    """An obs value, or None when it is one of MISSING (nan, unknown, none, na, empty; any case)."""
    return None if value.strip().lower() in MISSING else value


def obs_column(adata, key: str, path: str, flag: str) -> np.ndarray:
    """obs[key] as str (a missing categorical value reads "nan"); ValueError naming the column and file if absent."""
    if key not in adata.obs.columns:
        columns = ", ".join(map(str, adata.obs.columns))
        raise ValueError(f"{path}: obs has no column {key!r} ({flag}; columns: {columns})")
    return adata.obs[key].astype(str).to_numpy()


def expression_matrix(adata, layer: str, gene_key: str, path: str):
    """(matrix, gene names as str): .X, a layer or .raw.X (dense, CSR or CSC; in memory or backed)."""
    if layer == "raw":
        if adata.raw is None:
            raise ValueError(f"{path} has no .raw matrix (--layer raw)")
        matrix, var = adata.raw.X, adata.raw.var
    elif layer in (".X", "X"):
        matrix, var = adata.X, adata.var
    elif layer in adata.layers:
        matrix, var = adata.layers[layer], adata.var
    else:
        raise ValueError(f"{path} has no layer {layer!r} (--layer; layers: {', '.join(adata.layers) or 'none'}; "
                         f"'.X' or 'raw' for the others)")
    if gene_key == "index":
        return matrix, np.asarray(var.index).astype(str)
    if gene_key not in var.columns:
        raise ValueError(f"{path}: var has no column {gene_key!r} (--gene-key; 'index' uses var_names)")
    return matrix, var[gene_key].astype(str).to_numpy()


def dense_rows(matrix, rows: np.ndarray, chunk: int = 512):
    """Yield float64 blocks of len(rows[i:i + chunk]) x genes for the sorted row indices `rows`: one contiguous slice
    of the (possibly sparse, possibly backed) matrix per chunk, its wanted rows taken while still sparse and only they
    densified, so a large matrix is never dense."""
    for lo in range(0, len(rows), chunk):
        idx = rows[lo:lo + chunk]
        block = matrix[int(idx[0]):int(idx[-1]) + 1][idx - idx[0]]
        yield np.asarray(block.toarray() if hasattr(block, "toarray") else block, dtype=np.float64)


def top_columns(block: np.ndarray, k: int | None) -> list[np.ndarray]:
    """Per row of a cells x genes block, the columns top_genes(row, genes, k) lists (descending, ties in column
    order, zeros never); k None: every expressed column, in column order."""
    if k is None:
        return [np.flatnonzero(r > 0) for r in block]
    order = np.argsort(-block, axis=1, kind="stable")[:, :k]
    return [o[r[o] > 0] for o, r in zip(order, block)]


@dataclass
class SparseCells:
    """Cells of one file reduced to the entries a puzzle can list: per cell its columns (into genes) and values."""
    genes: np.ndarray
    cols: list[np.ndarray]
    vals: list[np.ndarray]
    labels: np.ndarray
    donors: np.ndarray
    contexts: np.ndarray
    names: np.ndarray          # obs_names
    integer: bool              # every value a non-negative integer (UMI counts)


def context_sentences(adata, keys: tuple[str, ...], path: str) -> np.ndarray:
    """context_sentence() per cell from the obs columns `keys` (CONTEXT_KEYS order; "-": none); MISSING values out."""
    cols = [obs_column(adata, k, path, "--context-keys; '-' leaves a field out") if k != "-" else None for k in keys]
    fields = [tuple(known(c[i]) if c is not None else None for c in cols) for i in range(adata.n_obs)]
    sentence = {f: context_sentence(*f) for f in set(fields)}
    return np.array([sentence[f] for f in fields], dtype=object).astype(str)


def read_h5ad_cells(path: str, keys: ObsKeys = ObsKeys(), n_genes: int | None = 50) -> SparseCells:
    """One .h5ad file -> its labelled cells, each reduced to its top n_genes entries (None: all expressed). Kept:
    cells with a known label (not MISSING), and when obs has `suspension_type` only "cell" rows (the authors'
    filter: no single nuclei). The matrix is read in row chunks (dense_rows): memory is one chunk plus the result."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    anndata = import_anndata()
    try:
        adata = anndata.read_h5ad(path, backed="r")
    except OSError as e:  # h5py's message does not name the file
        raise OSError(f"{path} is not a readable .h5ad file ({e})") from None
    labels = obs_column(adata, keys.label, path, "--label-key")
    donors = obs_column(adata, keys.donor, path, "--donor-key")
    contexts = context_sentences(adata, keys.context, path)
    matrix, genes = expression_matrix(adata, keys.layer, keys.gene, path)
    keep = np.array([known(t) is not None for t in labels])
    if "suspension_type" in adata.obs.columns:
        keep &= obs_column(adata, "suspension_type", path, "") == "cell"
    rows = np.flatnonzero(keep)
    if not len(rows):
        raise ValueError(f"{path}: no labelled cell left (obs {keys.label!r} known and suspension_type 'cell')")
    cols, vals, integer = [], [], True
    for block in dense_rows(matrix, rows):
        integer &= bool(np.all(block >= 0) and np.array_equal(block, np.round(block)))
        for r, c in zip(block, top_columns(block, n_genes)):
            cols.append(c)
            vals.append(r[c])
    names = np.asarray(adata.obs_names).astype(str)[rows]
    if getattr(adata, "file", None) is not None and adata.isbacked:
        adata.file.close()
    return SparseCells(genes, cols, vals, labels[rows], donors[rows], contexts[rows], names, integer)


def merge_cells(parts: list[SparseCells], ranks: bool = True) -> CellData:
    """One CellData over the genes any cell keeps: the first file's in its column order, then each next file's new
    ones in its order. ranks (cells read with a top-K, no augmentation): a row holds K, K-1, ... (int16: signed, as
    top_genes negates) on the cell's listed genes and 0 elsewhere, so top_genes of it is exactly its file's list
    whatever the files' gene orders, at 2 bytes per cell x gene; `counts` is then False (ranks cannot be
    down-sampled). Else a row holds the cell's values (int64 when every value of every file is an integer: `counts`;
    else float64)."""
    index: dict[str, int] = {}
    for part in parts:
        for g in part.genes[np.unique(np.concatenate(part.cols))]:   # the file's column order
            index.setdefault(str(g), len(index))
    integer = all(p.integer for p in parts) and not ranks
    dtype = np.int16 if ranks else np.int64 if integer else np.float64
    values = np.zeros((sum(len(p.cols) for p in parts), len(index)), dtype=dtype)
    row = 0
    for part in parts:
        for c, v in zip(part.cols, part.vals):
            values[row, [index[str(g)] for g in part.genes[c]]] = np.arange(len(c), 0, -1) if ranks else v
            row += 1
    labels, donors, contexts = (np.concatenate([getattr(p, k) for p in parts])
                                for k in ("labels", "donors", "contexts"))
    return CellData(values, np.array(list(index), dtype=str), labels, donor_groups(donors, contexts), contexts,
                    counts=integer)


def donor_groups(donors: np.ndarray, contexts: np.ndarray) -> np.ndarray:
    """The sampler's donor per cell: the donor id, or "id | context" for a donor seen with several context sentences
    (two tissues, two files), so a puzzle's cells share their donor and their context."""
    many = {d for d in set(donors.tolist()) if len(set(contexts[donors == d].tolist())) > 1}
    return np.array([f"{d} | {x.strip()}" if d in many else d for d, x in zip(donors, contexts)])


def check_n_range(split: CellSplit, n_range: tuple[int, int]) -> None:
    """Every pool needs a donor with at least the smallest N types: ValueError naming the pool and its best donor."""
    d = split.data
    for pool in ("train", "rl", "test"):
        ids = getattr(split, pool)
        if not len(ids):
            continue
        per_donor = {str(x): len(set(d.labels[ids][d.donors[ids] == x].tolist())) for x in set(d.donors[ids].tolist())}
        best = max(per_donor, key=per_donor.get)
        if per_donor[best] < n_range[0]:
            raise ValueError(f"no donor has {n_range[0]} cell types among its {pool} cells (the most: donor {best!r} "
                             f"with {per_donor[best]}): lower --n-range or add cells")


def build_summary(split: CellSplit, rows: dict[str, list[Puzzle]], cfg: PuzzleConfig, files: list[str],
                  integer: bool) -> dict:
    """Cells, types and donors per split, puzzles per N, and the teacher's and per-cell argmax baselines on test
    (reward.metrics of their answers, as pipeline.baselines scores them). integer: the matrix read is counts."""
    import reward
    d = split.data
    test = rows["test"]
    methods = baselines(fit_embedded_teacher(split, cfg))
    scored = {name: reward.metrics([render_completion("", methods[name](p)) for p in test],
                                   [p.answer for p in test], [0] * len(test))
              for name in ("per-cell argmax", "teacher (Hungarian)")}
    pools = {"test": split.test, "rl (train.jsonl)": split.rl, "sft (reasoning.jsonl)": split.train}
    return {"files": [os.path.basename(f) for f in files], "cells": len(d.labels), "genes": len(d.genes),
            "types": {str(t): int((d.labels == t).sum()) for t in sorted(set(d.labels.tolist()))},
            "donors": len(set(d.donors.tolist())), "integer_counts": integer, "config": asdict(cfg),
            "cells_per_split": {k: len(v) for k, v in pools.items()},
            "puzzles_per_n": {k: {str(n): sum(p.n == n for p in v) for n in sorted({p.n for p in v})}
                              for k, v in rows.items()},
            "baselines_test": {k: {m: v[m] for m in ("cell_acc", "batch_acc")} for k, v in scored.items()}}


def summary_markdown(s: dict) -> str:
    types = ", ".join(f"{t} {k}" for t, k in s["types"].items())
    matrix = "integer counts" if s["integer_counts"] else "not integer counts"
    lines = [f"# CellPuzzles built from {', '.join(s['files'])}", "",
             f"{s['cells']} cells, {s['genes']} genes listed, {len(s['types'])} types, {s['donors']} donor groups; "
             f"{matrix}.", "", f"Types (cells): {types}.", "",
             "Cells per split: " + ", ".join(f"{k} {v}" for k, v in s["cells_per_split"].items()) + ".", ""]
    lines += [f"Puzzles per N, {k}: " + ", ".join(f"N={n}: {c}" for n, c in v.items()) + "."
              for k, v in s["puzzles_per_n"].items()]
    lines += ["", "Baselines on test: " + "; ".join(f"{k}: cell_acc {v['cell_acc']:.3f}, batch_acc {v['batch_acc']:.3f}"
                                                  for k, v in s["baselines_test"].items()) + "."]
    return "\n".join(lines) + "\n"


def write_cell_table(split: CellSplit, names: np.ndarray, sources: np.ndarray, path: str) -> None:
    """cells.tsv: file, obs_name, label, donor group, split (test / rl / sft) of every kept cell, in matrix order."""
    where = np.full(len(names), "sft", dtype=object)
    where[split.test], where[split.rl] = "test", "rl"
    d = split.data
    with open(path, "w", encoding="utf-8") as f:
        f.write("file\tobs_name\tlabel\tdonor\tsplit\n")
        for i in range(len(names)):
            f.write(f"{sources[i]}\t{names[i]}\t{d.labels[i]}\t{d.donors[i]}\t{where[i]}\n")


def build(files: list[str], out_dir: str, keys: ObsKeys = ObsKeys(), cfg: PuzzleConfig = RELEASED,
          n_train: int = 5000, per_n: int = 50, seed: int = 0) -> tuple[CellSplit, dict[str, list[Puzzle]], dict]:
    """CellPuzzles from labelled .h5ad files into out_dir (which must not exist): train.jsonl, reasoning.jsonl and
    test.jsonl as export() writes them (cells split per type by split_cells with cfg's test_frac and rl_frac),
    cells.tsv, summary.json and summary.md. Every check runs before anything is written, and the files are written
    into out_dir.tmp, renamed to out_dir at the end: a failure leaves no out_dir. Returns (split, rows, summary)."""
    if os.path.exists(out_dir):
        raise FileExistsError(f"{out_dir} already exists: remove it or choose another --out")
    if not 1 <= cfg.n_genes < 2**15 or not 2 <= cfg.n_range[0] <= cfg.n_range[1]:
        raise ValueError(f"--n-genes {cfg.n_genes} must be 1..32767 and --n-range {cfg.n_range} 2 <= LO <= HI")
    parts = [read_h5ad_cells(f, keys, None if cfg.augment else cfg.n_genes) for f in files]
    data = merge_cells(parts, ranks=not cfg.augment)
    if cfg.augment and not data.counts:
        raise ValueError(f"--augment down-samples UMI counts, but the {keys.layer} matrix of {', '.join(files)} is not "
                         "integer counts: name a counts layer (--layer) or leave --augment out")
    split = split_cells(data, cfg.test_frac, cfg.split_seed, rl_frac=cfg.rl_frac)
    check_n_range(split, cfg.n_range)
    rows = export_rows(split, cfg, n_train, per_n, seed)
    summary = build_summary(split, rows, cfg, files, all(p.integer for p in parts))
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        for name, puzzles in rows.items():
            write_jsonl(puzzles, os.path.join(tmp, f"{name}.jsonl"))
        sources = np.concatenate([np.full(len(p.cols), os.path.basename(f)) for p, f in zip(parts, files)])
        write_cell_table(split, np.concatenate([p.names for p in parts]), sources, os.path.join(tmp, "cells.tsv"))
        with open(os.path.join(tmp, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        with open(os.path.join(tmp, "summary.md"), "w") as f:
            f.write(summary_markdown(summary))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.rename(tmp, out_dir)
    return split, rows, summary


# ----------------------------------------------------------------------------- teacher

def hungarian(score: np.ndarray) -> np.ndarray:
    """Maximum-score one-to-one assignment of a square matrix: returns col[i] for row i. The O(n^3) shortest
    augmenting path method with potentials (Kuhn-Munkres, as in e-maxx), 1-based internally, column 0 a sentinel."""
    cost = -np.asarray(score, dtype=np.float64)
    n = cost.shape[0]
    u, v = np.zeros(n + 1), np.zeros(n + 1)
    match = np.zeros(n + 1, dtype=np.int64)      # match[j] = row (1-based) on column j, 0 = free
    way = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        match[0], j0 = i, 0
        minv, used = np.full(n + 1, np.inf), np.zeros(n + 1, dtype=bool)
        while True:                               # grow a shortest-path tree until it reaches a free column
            used[j0] = True
            i0 = match[j0]
            red = cost[i0 - 1] - u[i0] - v[1:]    # reduced costs from row i0 to columns 1..n
            better = ~used[1:] & (red < minv[1:])
            minv[1:][better], way[1:][better] = red[better], j0
            j1 = int(np.argmin(np.where(used[1:], np.inf, minv[1:]))) + 1
            delta = minv[j1]
            u[match[used]] += delta
            v[used] -= delta
            minv[~used] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:                                 # flip the augmenting path
            match[j0] = match[way[j0]]
            j0 = way[j0]
    col = np.empty(n, dtype=np.int64)
    col[match[1:] - 1] = np.arange(n)
    return col


def render_completion(think: str, types: list[str]) -> str:
    return f"<think>{think}</think>\n<answer>{' | '.join(types)}</answer>"


@dataclass
class Teacher:
    """Marker model: weight[t, g] = log-odds of gene g being listed for a cell of type t vs a cell of another type.
    A cell's score for t = sum of weight[t, g] over its listed genes; types it never saw score 0."""
    types: list[str]
    vocab: dict[str, int]
    weight: np.ndarray        # types x genes

    def type_scores(self, p: Puzzle) -> np.ndarray:
        """cells x known types (self.types)."""
        s = np.zeros((p.n, len(self.types)))
        for i, genes in enumerate(p.cells):
            g = [self.vocab[x] for x in genes if x in self.vocab]
            for t in range(len(self.types)):
                s[i, t] = self.weight[t, g].sum()
        return s

    def scores(self, p: Puzzle, type_scores: np.ndarray | None = None) -> np.ndarray:
        """cells x candidates (from `type_scores` when given, else computed); a type it never saw scores 0."""
        a = self.type_scores(p) if type_scores is None else type_scores
        s = np.zeros((p.n, len(p.candidates)))
        for j, t in enumerate(p.candidates):
            if t in self.types:
                s[:, j] = a[:, self.types.index(t)]
        return s

    def argmax(self, p: Puzzle) -> list[str]:
        """Per-cell best candidate, no uniqueness (a baseline)."""
        return [p.candidates[j] for j in self.scores(p).argmax(1)]

    def solve(self, p: Puzzle) -> list[str]:
        return [p.candidates[j] for j in hungarian(self.scores(p))]

    def hard(self, p: Puzzle) -> bool:
        """True when the per-cell argmax repeats a type or some cell's best type among all known types is not a
        candidate: the puzzles where the candidates and the one-to-one rule change an answer."""
        a = self.type_scores(p)
        repeat = len(set(self.scores(p, a).argmax(1).tolist())) < p.n
        return repeat or any(self.types[t] not in p.candidates for t in a.argmax(1))

    def markers(self, genes: list[str], t: str, k: int = 2) -> list[str]:
        """The k listed genes that point most to type t (ties: higher in the list first)."""
        if t not in self.types:
            return genes[:k]
        w = [self.weight[self.types.index(t), self.vocab[g]] if g in self.vocab else -math.inf for g in genes]
        return [genes[i] for i in sorted(range(len(genes)), key=lambda i: -w[i])[:k]]

    def trace(self, p: Puzzle, order: str = "fix") -> tuple[str, list[str]]:
        """(completion, its types in cell order). Each line names a type, then the 2 listed genes that point to it
        most: "type (markers)", the decision first (one decision per line, then the evidence: easier for a small
        model than evidence first). order="fix": see _fix_trace. order="cell": cells 1..N in turn; a cell whose best
        type belongs to another cell says so ("but cell k fits it better") and takes its assigned type; each line
        ends with the candidates still free."""
        say = lambda i, t: f"{t} ({', '.join(self.markers(p.cells[i], t))})"  # noqa: E731
        s = self.scores(p)
        col = hungarian(s)
        best = s.argmax(1)
        types = [p.candidates[j] for j in col]
        sep = "; " if any("," in c for c in p.candidates) else ", "   # released names can hold commas
        if order == "fix":
            return self._fix_trace(p, col, best, say, sep, types), types
        if order != "cell":
            raise ValueError(f"unknown trace order {order!r} (fix or cell)")
        owner = {int(j): i for i, j in enumerate(col)}
        free, lines = list(p.candidates), []
        for i in range(p.n):
            t = p.candidates[col[i]]
            line = f"Cell {i + 1}: "
            if best[i] != col[i]:
                line += f"{say(i, p.candidates[best[i]])}, but cell {owner[int(best[i])] + 1} fits it better; "
            line += f"{say(i, t)}."
            free.remove(t)
            if free:
                line += f" Left: {sep.join(free)}"
            lines.append(line)
        return render_completion("\n".join(lines), types), types

    def _fix_trace(self, p: Puzzle, col, best, say, sep: str, types: list[str]) -> str:
        """order="fix": first every cell's best fit on its own (the per-cell argmax, one local decision per line,
        marked "as cell k" when cell k named that type before), then the types named twice, the unused ones, and a
        new line for each cell the one-to-one optimum moves. A cell's last line is its answer. No lookahead is needed
        before a line is written: conflicts are resolved once they are all on the page."""
        line = lambda i, j: f"Cell {i + 1}: {say(i, p.candidates[j])}"
        lines, claims = [], {}
        for i, j in enumerate(best):
            # A repeat is flagged on the line that makes it ("as cell k", k = the first cell that named the type):
            # a local check against the lines above. Without it, "Every type is used once" is a global comparison
            # of all N lines, which a small model gets wrong on most held-out puzzles with a repeat.
            again = f", as cell {claims[int(j)][0] + 1}" if int(j) in claims else ""
            lines.append(line(i, j) + again)
            claims.setdefault(int(j), []).append(i)
        twice = [(j, cs) for j, cs in sorted(claims.items(), key=lambda kv: kv[1][0]) if len(cs) > 1]
        if not twice:
            lines.append("Every type is used once")
        else:
            dup = "; ".join(f"{p.candidates[j]} (cells {', '.join(str(i + 1) for i in cs)})" for j, cs in twice)
            unused = sep.join(c for j, c in enumerate(p.candidates) if j not in claims)
            lines.append(f"Repeated: {dup}. Unused: {unused}")
            lines += [line(i, j) for i, j in enumerate(col) if j != best[i]]
        return render_completion("\n".join(lines) + ".", types)

    def accepted_trace(self, p: Puzzle, order: str = "fix") -> str | None:
        """The trace if its answer is fully correct (the paper's rejection rule), else None."""
        completion, types = self.trace(p, order)
        return completion if types == p.gold else None


def baselines(teacher: Teacher, seed: int = 0) -> dict:
    """The reference methods of the baseline and results tables, name -> (puzzle -> types in cell order): a random
    one-to-one assignment (seeded), the teacher's per-cell argmax (no uniqueness), the teacher (Hungarian)."""
    rng = np.random.default_rng(seed)
    return {"random": lambda p: [p.candidates[j] for j in rng.permutation(p.n)],
            "per-cell argmax": teacher.argmax, "teacher (Hungarian)": teacher.solve}


def fit_teacher(cells: list[list[str]], labels: list[str], alpha: float = 0.25) -> Teacher:
    """Fit on top-gene lists of train cells: rate[t, g] = (lists of type t holding g + alpha) / (n_t + 2 alpha),
    the same for the other types; weight = logit(rate_t) - logit(rate_others). Cells are weighted so every type
    counts the same in "other types" (types are very unbalanced: 8 to 240 cells in pbmc68k)."""
    types = sorted(set(labels))
    vocab = {g: k for k, g in enumerate(sorted({g for genes in cells for g in genes}))}
    hits = np.zeros((len(types), len(vocab)))
    n = np.zeros(len(types))
    for genes, t in zip(cells, labels):
        ti = types.index(t)
        hits[ti, [vocab[g] for g in set(genes)]] += 1
        n[ti] += 1
    rate = (hits + alpha) / (n[:, None] + 2 * alpha)
    other = (rate.sum(0, keepdims=True) - rate) / max(len(types) - 1, 1)
    logit = lambda x: np.log(x) - np.log1p(-x)
    return Teacher(types, vocab, logit(rate) - logit(other))


def fit_embedded_teacher(split: CellSplit, cfg: PuzzleConfig = CPU, draws: int = 8, seed: int = 0) -> Teacher:
    """Teacher fitted on the labelled cells (train and rl; never test): their top-gene lists, plus `draws`
    down-sampled lists each when cfg.augment (so it also knows what shallower cells look like). It sees every label
    that SFT and GRPO together see, so a student that passes it has not merely been given more data."""
    rng = np.random.default_rng(seed)
    d = split.data
    cells, labels = [], []
    for c in split.labelled:
        cells.append(top_genes(d.values[c], d.genes, cfg.n_genes))
        for _ in range(draws if cfg.augment else 0):
            cells.append(top_genes(downsample(d.values[c], rng, cfg.p_range), d.genes, cfg.n_genes))
        labels += [str(d.labels[c])] * (1 + (draws if cfg.augment else 0))
    return fit_teacher(cells, labels)


# ----------------------------------------------------------------------------- tokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]   # same strings as Qwen, so ChatML is identical
# Pre-tokens: a word with the ", " or " " before it (", LYZ", " CD14+", "HLA-DRA"), a comma, or a run of
# whitespace. Gene and type names are never split at "-", "+", "/" or digits, and the separator rides with the
# name, so BPE can learn ", LYZ" as one token: a gene list costs about one token per gene.
PRETOKEN = r"(?:, | )?[^\s,]+|,|\s+"


def train_tokenizer(texts, vocab_size: int = 2048):
    """Byte-level BPE over PRETOKEN pieces with Qwen's special tokens. Deterministic for the same texts."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKEN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def parse_args(argv: list[str]) -> argparse.Namespace:
    """`export OUT` (the embedded PBMC puzzles; the old form `OUT` still works) or `build --h5ad FILE ... --out DIR`."""
    ap = argparse.ArgumentParser(description="Write CellPuzzles as train/reasoning/test JSONL files that "
                                             "load_puzzles(out, split) reads like the released data.")
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="puzzles of the embedded PBMC cells (CPU defaults)")
    ex.add_argument("out", help="folder to write (created; files in it are overwritten)")
    ex.add_argument("--n-genes", type=int, default=CPU.n_genes, help="top genes listed per cell")
    ex.add_argument("--n-range", type=int, nargs=2, default=CPU.n_range, metavar=("LO", "HI"), help="cells per puzzle")
    ex.add_argument("--no-augment", action="store_true", help="list train cells as they are (no down-sampling)")
    b = sub.add_parser("build", help="puzzles of the labelled cells of .h5ad files (released defaults: 50 genes, N "
                                     "8-15, no augmentation)")
    b.add_argument("--h5ad", nargs="+", required=True, metavar="FILE", help="AnnData files; their cells are pooled")
    b.add_argument("--out", required=True, help="folder to create (must not exist)")
    b.add_argument("--label-key", default="cell_type", help="obs column of the cell type")
    b.add_argument("--donor-key", default="donor_id", help="obs column of the donor (a puzzle never mixes donors)")
    b.add_argument("--gene-key", default="feature_name", help="var column of gene names; 'index': var_names")
    b.add_argument("--layer", default=".X", help="matrix to rank genes by: '.X', a layer name, or 'raw' (.raw.X)")
    b.add_argument("--context-keys", nargs=5, default=CONTEXT_KEYS, metavar="KEY", help="obs columns of tissue, "
                   "disease, sex, development stage and ethnicity for the context sentence; '-' leaves one out")
    b.add_argument("--n-genes", type=int, default=RELEASED.n_genes, help="top genes listed per cell")
    b.add_argument("--n-range", type=int, nargs=2, default=RELEASED.n_range, metavar=("LO", "HI"),
                   help="cells per puzzle")
    b.add_argument("--augment", action="store_true", help="down-sample train cells afresh for every train puzzle "
                   "(needs integer counts; keeps every cell's full row in memory)")
    for p in (ex, b):
        p.add_argument("--train", type=int, default=5000, help="rows of train.jsonl and of reasoning.jsonl")
        p.add_argument("--per-n", type=int, default=50, help="test.jsonl puzzles per N")
        p.add_argument("--seed", type=int, default=0, help="seed of the puzzles (the cell split has its own)")
    if argv and argv[0] not in ("export", "build", "-h", "--help"):
        argv = ["export", *argv]   # the old form: python data.py OUT [flags]
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    if a.command == "export":
        cfg = PuzzleConfig(n_genes=a.n_genes, n_range=tuple(a.n_range), augment=not a.no_augment)
        print(export(embedded(cfg), a.out, cfg, a.train, a.per_n, a.seed))
        return
    keys = ObsKeys(a.label_key, a.donor_key, a.gene_key, a.layer, tuple(a.context_keys))
    cfg = PuzzleConfig(n_genes=a.n_genes, n_range=tuple(a.n_range), augment=a.augment)
    try:
        _, _, summary = build(a.h5ad, a.out, keys, cfg, a.train, a.per_n, a.seed)
    except (OSError, ValueError, ImportError) as e:  # one sentence, no traceback: a bad input, not a bug
        sys.exit(f"error: {e}")
    print(summary_markdown(summary), end="")


if __name__ == "__main__":
    main()
