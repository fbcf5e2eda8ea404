"""Diagnostic: does GRPO on cells the SFT model never saw raise greedy accuracy on *other* unseen cells?

The embedded test cells are split in two halves by cell (stratified by type): GRPO prompts are puzzles of half A,
the scoring sets puzzles of half B (test cells only on both sides; the SFT model saw neither). A yes says that RL
prompts from a cell split of the train pool (kept away from SFT) would let the reward measure reading instead of
memory; a no says the limit is elsewhere. Not a product default: it spends test cells on training.

    python scripts/unseen_cells_rl.py --sft runs/main/sft/model --out runs/unseen [--rl-args "--steps 50"]
"""
import argparse
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

import data  # noqa: E402


def halves(split: data.CellSplit, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The test cells in two halves, every type on both sides."""
    rng = np.random.default_rng(seed)
    a, b = [], []
    labels = split.data.labels[split.test]
    for t in sorted(set(labels)):
        cells = rng.permutation(split.test[labels == t])
        a += cells[:len(cells) // 2].tolist()
        b += cells[len(cells) // 2:].tolist()
    return np.array(sorted(a)), np.array(sorted(b))


def puzzles(split: data.CellSplit, pool: np.ndarray, per_n: int, seed: int) -> list[data.Puzzle]:
    """Held-out puzzles (data.test_puzzles) of the cells in `pool` only."""
    return data.test_puzzles(data.CellSplit(split.data, split.train, pool), data.CPU, per_n=per_n, seed=seed)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sft", required=True, help="the SFT model folder")
    ap.add_argument("--out", default="runs/unseen", help="folder: data/ (the two halves' puzzles), rl/, scores")
    ap.add_argument("--rl-args", default="--steps 50 --eval-every 25 --eval-puzzles 60",
                    help="train_rl.py flags (the data and model are set here)")
    ap.add_argument("--sets", type=int, default=3, help="scoring sets of half-B puzzles")
    ap.add_argument("--per-n", type=int, default=100, help="puzzles per N in each scoring set")
    ap.add_argument("--seed", type=int, default=0, help="seed of the split and of the GRPO run")
    args = ap.parse_args()
    split = data.embedded()
    a, b = halves(split, args.seed)
    folder = os.path.join(args.out, "data")
    if not os.path.exists(os.path.join(folder, "test.jsonl")):
        os.makedirs(folder, exist_ok=True)
        data.write_jsonl(puzzles(split, a, 500, args.seed), os.path.join(folder, "train.jsonl"))
        data.write_jsonl(puzzles(split, b, 10, args.seed + 1), os.path.join(folder, "test.jsonl"))
    rl = os.path.join(args.out, "rl")
    if not os.path.exists(os.path.join(rl, "model", "config.json")):
        cmd = [sys.executable, os.path.join(ROOT, "train_rl.py"), "--model", args.sft, "--data", folder, "--out", rl,
               "--seed", str(args.seed), "--resume", "--no-progress", *shlex.split(args.rl_args)]
        print(f"== {shlex.join(cmd)}", flush=True)
        if subprocess.call(cmd, cwd=ROOT):
            raise SystemExit("the GRPO run failed; run the same command again: it resumes")
    from pipeline import decode_model
    sets = [puzzles(split, b, args.per_n, 2000 + j) for j in range(args.sets)]
    print(f"half A {len(a)} cells (GRPO prompts), half B {len(b)} cells ({args.sets} sets x {len(sets[0])} puzzles)")
    print("| model | cell acc per set | batch acc per set | mean cell / batch |\n|---|---|---|---|")
    for name, model in (("SFT", args.sft), ("SFT + GRPO on half A", os.path.join(rl, "model"))):
        ms = [decode_model(model, s, 512)[0] for s in sets]
        cell, batch = [m["cell_acc"] for m in ms], [m["batch_acc"] for m in ms]
        print(f"| {name} | {' / '.join(f'{x:.3f}' for x in cell)} | {' / '.join(f'{x:.3f}' for x in batch)} | "
              f"{np.mean(cell):.3f} / {np.mean(batch):.3f} |", flush=True)


if __name__ == "__main__":
    main()
