"""data.py build: CellPuzzles from a labelled AnnData (.h5ad). The expected values are recomputed here from the
matrix the test writes (top genes by a plain sort), or written by hand (context sentences)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import data

anndata = pytest.importorskip("anndata")
sparse = pytest.importorskip("scipy.sparse")
pd = pytest.importorskip("pandas")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
TYPES = ["B cell", "T cell", "NK cell", "monocyte", "platelet"]
# Donor A's context fields name every part; donor B's sex, age and ethnicity say nothing (unknown, NA, nan).
CONTEXT_A = ("The cell is from a female at the 40-year-old stage, originating from the lung. The patient is healthy "
             "with no diagnosed disease. ")
CONTEXT_B = "The cell is from the lung. The patient has been diagnosed with chronic obstructive pulmonary disease. "


def cellxgene_like(per_type: int = 14, nuclei: int = 3, seed: int = 0):
    """Two donors x 5 types x per_type cells, 40 genes (feature_name G00..G39, var_names ENSG ids), CSR counts
    with 4 marker genes per type, plus `nuclei` rows of suspension_type "nucleus" of a sixth type."""
    rng = np.random.default_rng(seed)
    rows, obs = [], []
    for donor in ("A", "B"):
        for t, name in enumerate(TYPES + ["nucleus only"]):
            for _ in range(nuclei if name == "nucleus only" else per_type):
                lam = rng.uniform(0, 6, 40)
                lam[4 * t:4 * t + 4] += 25
                rows.append(rng.poisson(lam))
                obs.append({"cell_type": name, "donor_id": donor, "tissue": "lung",
                            "suspension_type": "nucleus" if name == "nucleus only" else "cell",
                            "disease": "normal" if donor == "A" else "chronic obstructive pulmonary disease",
                            "sex": "female" if donor == "A" else "unknown",
                            "development_stage": "40-year-old stage" if donor == "A" else "NA",
                            "self_reported_ethnicity": "na" if donor == "A" else np.nan})
    obs = pd.DataFrame(obs, index=[f"cell{i}" for i in range(len(obs))]).astype("category")
    var = pd.DataFrame({"feature_name": [f"G{g:02d}" for g in range(40)]}, index=[f"ENSG{g:04d}" for g in range(40)])
    counts = np.array(rows, dtype=np.float32)
    return anndata.AnnData(sparse.csr_matrix(counts), obs=obs, var=var), counts


def oracle_top(counts_row: np.ndarray, k: int, reversed_columns: bool = False) -> list[str]:
    """Top-k genes by a plain sort on (-value, column): the independent recompute of the rule. reversed_columns: the
    file stores the genes in reverse order, so ties go to the later gene."""
    order = sorted(range(len(counts_row)), key=lambda g: (-counts_row[g], -g if reversed_columns else g))
    return [f"G{g:02d}" for g in order[:k] if counts_row[g] > 0]


@pytest.fixture
def h5ad(tmp_path):
    ad, counts = cellxgene_like()
    path = str(tmp_path / "cells.h5ad")
    ad.write_h5ad(path)
    return path, ad, counts


def build_cmd(path, out, *extra):
    return [sys.executable, os.path.join(ROOT, "data.py"), "build", "--h5ad", path, "--out", str(out), "--n-range",
            "3", "4", "--n-genes", "6", "--train", "12", "--per-n", "3", *extra]


def test_build_writes_released_rows_from_cells_only_of_their_split(h5ad, tmp_path, tiny_dir):
    path, ad, counts = h5ad
    out = tmp_path / "puzzles"
    r = subprocess.run(build_cmd(path, out), env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Baselines on test" in r.stdout
    cell = (ad.obs["suspension_type"] == "cell").to_numpy()
    lists = {i: oracle_top(counts[i], 6) for i in np.flatnonzero(cell)}
    owner = {tuple(v): i for i, v in lists.items()}
    assert len(owner) == len(lists)          # precondition: a gene list names its cell
    table = [ln.rstrip("\n").split("\t") for ln in open(out / "cells.tsv")][1:]
    split_of = {int(name.removeprefix("cell")): s for _, name, _, _, s in table}
    assert sorted(split_of) == sorted(lists)  # every "cell" row, no nucleus
    want_split = {"train": "rl", "reasoning": "sft", "test": "test"}
    for split in ("train", "reasoning", "test"):
        puzzles, skipped = data.load_puzzles(str(out), split)
        assert skipped == 0 and len(puzzles) == (12 if split != "test" else 6)
        for p in puzzles:
            cells = [owner[tuple(g)] for g in p.cells]       # KeyError: a list that is no cell's top 6
            assert {split_of[c] for c in cells} == {want_split[split]}
            donor = {ad.obs["donor_id"].iloc[c] for c in cells}
            assert len(donor) == 1 and p.context == (CONTEXT_A if donor == {"A"} else CONTEXT_B)
            assert p.gold == [ad.obs["cell_type"].iloc[c] for c in cells]
            assert p.candidates == sorted(p.gold) and p.system == data.SYSTEM_MSG
            assert p.user.endswith("\n".join(sorted(p.gold))) and f"Context: {p.context}\n\nCell 1: " in p.user
    summary = json.load(open(out / "summary.json"))
    assert summary["cells"] == len(lists) and sorted(summary["types"]) == sorted(TYPES) and summary["donors"] == 2
    run = subprocess.run([sys.executable, os.path.join(ROOT, "train_sft.py"), "--model", tiny_dir, "--data", str(out),
                          "--steps", "2", "--batch-size", "2", "--micro-batch", "2", "--eval-puzzles", "1",
                          "--eval-max-new-tokens", "4", "--no-progress", "--out", str(tmp_path / "sft")],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [json.loads(ln)["step"] for ln in open(tmp_path / "sft" / "sft_log.jsonl")] == [1, 2, 2]


def test_reader_lists_each_cells_top_genes_from_a_layer_and_raw(tmp_path):
    ad, counts = cellxgene_like(per_type=3, nuclei=0)
    ad.layers["counts"] = sparse.csc_matrix(counts)      # CSC: read in row chunks all the same
    ad.X = sparse.csr_matrix(np.log1p(counts))
    ad.raw = anndata.AnnData(sparse.csr_matrix(counts * 2), var=ad.var)
    path = str(tmp_path / "x.h5ad")
    ad.write_h5ad(path)
    for layer, scale, integer in (("counts", 1, True), ("raw", 2, True), (".X", None, False)):
        cells = data.read_h5ad_cells(path, data.ObsKeys(layer=layer), n_genes=5)
        got = [list(cells.genes[c]) for c in cells.cols]
        assert got == [oracle_top(row, 5) for row in counts] and cells.integer == integer
        if scale:
            assert all(np.array_equal(v, scale * counts[i][c]) for i, (c, v) in enumerate(zip(cells.cols, cells.vals)))
    merged = data.merge_cells([data.read_h5ad_cells(path, data.ObsKeys(layer="counts"), n_genes=5)])
    assert [data.top_genes(merged.values[i], merged.genes, 5) for i in range(len(counts))] == \
        [oracle_top(row, 5) for row in counts]


@pytest.mark.parametrize("case", ["missing label column", "too few cells", "missing layer", "not counts"])
def test_bad_input_is_one_sentence_and_writes_nothing(h5ad, tmp_path, case):
    path, ad, counts = h5ad
    extra = {"missing label column": ["--label-key", "celltype"], "missing layer": ["--layer", "spliced"],
             "not counts": ["--augment", "--layer", "logs"], "too few cells": []}[case]
    if case in ("too few cells", "not counts"):
        keep = (ad.obs["suspension_type"] == "cell").to_numpy()
        if case == "too few cells":   # 3 of the nucleus rows become cells: a split needs 4 (2 test, 1 rl, 1 sft)
            keep[np.flatnonzero(~keep)[:3]] = True
            ad.obs["suspension_type"] = "cell"
        ad = ad[keep].copy()
        ad.layers["logs"] = np.log1p(ad.X.toarray())
        path = str(tmp_path / "bad.h5ad")
        ad.write_h5ad(path)
    out = tmp_path / "puzzles"
    r = subprocess.run(build_cmd(path, out, *extra), env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and not out.exists() and not (tmp_path / "puzzles.tmp").exists()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    word = {"missing label column": "'celltype'", "missing layer": "'spliced'", "not counts": "integer counts",
            "too few cells": "'nucleus only'"}[case]
    assert word in lines[0]


def test_export_command_writes_what_export_writes(tmp_path):
    a, b = tmp_path / "cli", tmp_path / "fn"
    for argv in (["export", str(a)], [str(a) + "_old"]):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), *argv, "--train", "6", "--per-n", "1"],
                           env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    data.export(data.embedded(), str(b), n_train=6, per_n=1)
    for name in ("train", "reasoning", "test"):
        want = (b / f"{name}.jsonl").read_bytes()
        assert (a / f"{name}.jsonl").read_bytes() == want == (tmp_path / "cli_old" / f"{name}.jsonl").read_bytes()


def test_reader_on_a_hand_written_matrix(tmp_path):
    x = np.array([[0, 3, 1, 3], [5, 0, 0, 2]], dtype=np.float32)
    obs = pd.DataFrame({"cell_type": ["a", "b"], "donor_id": ["d", "d"]}, index=["c0", "c1"])
    ad = anndata.AnnData(sparse.csr_matrix(x), obs=obs, var=pd.DataFrame(index=["A", "B", "C", "D"]))
    ad.write_h5ad(tmp_path / "h.h5ad")
    cells = data.read_h5ad_cells(str(tmp_path / "h.h5ad"), data.ObsKeys(gene="index", context=("-",) * 5), 3)
    # ties keep column order (B before D), zeros are never listed
    assert [list(cells.genes[c]) for c in cells.cols] == [["B", "D", "C"], ["A", "D"]]


def test_build_pbmc_recovers_counts_through_the_reader():
    import importlib.util
    spec = importlib.util.spec_from_file_location("build_pbmc", os.path.join(ROOT, "scripts", "build_pbmc.py"))
    build_pbmc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_pbmc)
    rng = np.random.default_rng(1)
    counts = rng.poisson(3, (6, 12)) * (rng.random((6, 12)) < 0.6)
    counts[:, 0] = 1                                  # the smallest nonzero count of every cell is 1
    total = counts.sum(1) + 100                       # n_counts covers genes outside the stored ones
    logs = np.round(np.log1p(counts * (1e4 / total)[:, None]), 3).astype(np.float32)
    obs = pd.DataFrame({"bulk_labels": list("xyxyxz"), "n_counts": total.astype(float)},
                       index=[f"bc{i}" for i in range(6)])
    genes = pd.DataFrame(index=[f"g{i}" for i in range(12)])
    ad = anndata.AnnData(np.zeros((6, 12), dtype=np.float32), obs=obs, var=genes)
    ad.raw = anndata.AnnData(sparse.csr_matrix(logs), obs=obs, var=genes)
    z = build_pbmc.pbmc_arrays(ad, "test")
    assert np.array_equal(z["counts"], counts) and z["counts"].dtype == np.uint16
    assert list(z["genes"]) == list(genes.index) and list(z["labels"]) == list("xyxyxz")
    assert list(z["barcodes"]) == list(obs.index) and str(z["donor"]) == "pbmc68k_donor_A"


def test_build_pools_the_cells_of_several_files(tmp_path):
    ad, counts = cellxgene_like(nuclei=0)
    paths = []
    for donor in ("A", "B"):
        part = ad[(ad.obs["donor_id"] == donor).to_numpy()].copy()
        if donor == "B":                                   # another gene order in file 2
            part = part[:, part.var.index[::-1]].copy()
        paths.append(str(tmp_path / f"{donor}.h5ad"))
        part.write_h5ad(paths[-1])
    split, rows, summary = data.build(paths, str(tmp_path / "out"), cfg=data.PuzzleConfig(n_genes=6, n_range=(3, 4),
                                      augment=False), n_train=4, per_n=1)
    assert summary["cells"] == len(counts) and summary["donors"] == 2
    table = [ln.split("\t") for ln in open(tmp_path / "out" / "cells.tsv")][1:]
    assert [f for f, *_ in table] == ["A.h5ad"] * (len(counts) // 2) + ["B.h5ad"] * (len(counts) // 2)
    # a cell's listed genes are its top 6, ties in its own file's column order
    for i, (file, name, *_) in enumerate(table):
        row = counts[int(name.removeprefix("cell"))]
        want = oracle_top(row, 6, reversed_columns=file == "B.h5ad")
        assert data.top_genes(split.data.values[i], split.data.genes, 6) == want


@pytest.mark.parametrize("kind", ["csr", "csc", "dense"])
def test_dense_rows_in_chunks_is_the_selected_rows(kind):
    x = np.random.default_rng(2).poisson(1, (50, 9)).astype(np.float32)
    matrix = {"csr": sparse.csr_matrix, "csc": sparse.csc_matrix, "dense": np.asarray}[kind](x)
    rows = np.array([0, 3, 4, 17, 18, 30, 49])
    blocks = list(data.dense_rows(matrix, rows, chunk=3))
    assert [b.shape for b in blocks] == [(3, 9), (3, 9), (1, 9)] and all(b.dtype == np.float64 for b in blocks)
    assert np.array_equal(np.concatenate(blocks), x[rows])
