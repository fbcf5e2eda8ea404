"""One-off converter: scanpy's bundled `pbmc68k_reduced` -> `assets/pbmc68k_reduced.npz` (the embedded default data).

Source: `scanpy.datasets.pbmc68k_reduced()`, the file `scanpy/datasets/10x_pbmc68k_reduced.h5ad` shipped inside the
scanpy wheel (no download). It is a 700-cell, 765-gene subset of Zheng et al. 2017, "Massively parallel digital
transcriptional profiling of single cells", Nat. Commun. 8:14049, i.e. the 10x Genomics dataset "Fresh 68k PBMCs
(Donor A)". One donor. Labels: `obs['bulk_labels']` (10 types, assigned in the paper by correlation with FACS-sorted
bulk profiles). Licenses: 10x Genomics datasets are CC BY 4.0; scanpy (which packaged the subset) is BSD-3-Clause.

What is stored: `.raw.X` holds log1p(count * s_c) per cell (s_c = 1e4 / total counts; values rounded to 3 decimals).
We recover integer UMI counts per cell: the smallest nonzero value of a cell is a count of 1, so
s_c = expm1(min_nonzero_x) and counts = round(expm1(x) / s_c). The script prints how far the unrounded values are from
integers (the residue comes from the 3-decimal rounding of the stored log values) and refuses to write if it is large.

Rebuild (needs scanpy; the product itself never imports it):
    python scripts/build_pbmc.py            # writes assets/pbmc68k_reduced.npz
"""
import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402  (the .h5ad reader of `data.py build`; no torch)


def recover_counts(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """x: cells x genes log1p-normalised values -> (integer counts, per-cell scale, max and mean distance of the
    unrounded counts to an integer)."""
    x = x.astype(np.float64)
    min_nz = np.where(x > 0, x, np.inf).min(axis=1)
    scale = np.expm1(min_nz)                       # value of one UMI in this cell
    raw = np.expm1(x) / scale[:, None]
    counts = np.rint(raw)
    dev = np.abs(raw - counts)[x > 0]
    return counts.astype(np.int64), scale, float(dev.max()), float(dev.mean())


def pbmc_arrays(ad, source: str) -> dict[str, np.ndarray]:
    """The arrays of the .npz from the AnnData `ad`, read through data.py's .h5ad reader (`.raw.X` in row chunks,
    `obs['bulk_labels']`); prints the checks and refuses (AssertionError) values that are not log1p of scaled counts."""
    path = "pbmc68k_reduced"
    matrix, genes = data.expression_matrix(ad, "raw", "index", path)
    x = np.concatenate(list(data.dense_rows(matrix, np.arange(ad.n_obs))))
    counts, scale, max_dev, mean_dev = recover_counts(x)
    print(f"cells x genes: {x.shape}; nonzeros per cell: {(counts > 0).sum(1).mean():.1f}")
    print(f"distance of recovered counts to the nearest integer: max {max_dev:.4f}, mean {mean_dev:.5f}")
    # cross-check: the per-cell scale should be 1e4 / total UMI count (obs n_counts, over all genes before subsetting)
    rel = np.abs(scale / (1e4 / ad.obs["n_counts"].to_numpy()) - 1)
    print(f"scale vs 1e4/n_counts: max relative difference {rel.max():.4f}")
    assert max_dev < 0.25, "values do not look like log1p of scaled integer counts"
    assert (counts > 0).sum() == (x > 0).sum(), "a nonzero value rounded to zero counts"
    assert counts.max() < 2**16

    labels = data.obs_column(ad, "bulk_labels", path, "labels")
    types, n = np.unique(labels, return_counts=True)
    print("types:", ", ".join(f"{t} ({k})" for t, k in zip(types, n)))
    return dict(
        counts=counts.astype(np.uint16),           # cells x genes UMI counts (over the 765 stored genes)
        genes=np.array(genes, dtype=str),
        labels=labels.astype(str),
        barcodes=np.array(ad.obs_names, dtype=str),
        donor=np.array("pbmc68k_donor_A"),
        source=np.array(source),
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "assets", "pbmc68k_reduced.npz"), help="the .npz to write")
    args = ap.parse_args()

    import scanpy as sc                            # build-time only
    from importlib.metadata import version

    arrays = pbmc_arrays(sc.datasets.pbmc68k_reduced(),
                         f"scanpy {version('scanpy')} datasets.pbmc68k_reduced() .raw.X, bulk_labels")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
