"""Baselines on held-out puzzles, scored with reward.metrics on rendered `<think></think>\\n<answer>...</answer>`
completions (the same scorer as everywhere else). Prints a markdown table per N and overall.

  random   a random permutation of the candidates (seeded)
  argmax   the teacher's marker score, best candidate per cell, no uniqueness
  teacher  the same scores, one-to-one by the Hungarian algorithm

    python scripts/baselines.py                          # embedded PBMC, CPU defaults (20 genes, N 3-8)
    python scripts/baselines.py --n-genes 50 --n-range 8 10
    python scripts/baselines.py --source ncbi/CellPuzzles   # released data: teacher fitted on its train split
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
import reward  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="", help="file, folder or hub id of released-format data (default: embedded)")
    ap.add_argument("--n-genes", type=int, default=data.CPU.n_genes)
    ap.add_argument("--n-range", type=int, nargs=2, default=data.CPU.n_range)
    ap.add_argument("--per-n", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    if args.source:
        train, _ = data.load_puzzles(args.source, "train", skip_bad=True)
        test, _ = data.load_puzzles(args.source, "test", skip_bad=True)
        teacher = data.fit_teacher([c for p in train for c in p.cells], [t for p in train for t in p.gold])
    else:
        cfg = data.PuzzleConfig(n_genes=args.n_genes, n_range=tuple(args.n_range))
        split = data.embedded(cfg)
        teacher = data.fit_embedded_teacher(split, cfg)
        test = data.test_puzzles(split, cfg, args.per_n, args.seed)
        print(f"embedded PBMC: {len(split.train)} train / {len(split.test)} test cells, {len(test)} test puzzles, "
              f"{cfg.n_genes} genes, N {cfg.n_range[0]}-{cfg.n_range[1]}\n")

    methods = data.baselines(teacher, args.seed)
    answers = [p.answer for p in test]
    rows = {name: reward.metrics([data.render_completion("", f(p)) for p in test], answers)
            for name, f in methods.items()}
    print(reward.format_table(rows, keys=("count", "cell_acc", "batch_acc")))
    accepted = sum(teacher.accepted_trace(p) is not None for p in test)
    print(f"\nteacher traces accepted (fully correct) on these puzzles: {accepted}/{len(test)}")


if __name__ == "__main__":
    main()
