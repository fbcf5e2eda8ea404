"""Where a tiny SFT model's cell errors come from, per N, on the embedded data (greedy decoding, our sampler):

  cell      cell accuracy of the answer; argmax / teacher: the per-cell marker argmax and the Hungarian teacher
  in cell   share of the markers quoted on "Cell i: type (m1, m2)" lines that are genes of cell i (reading)
  other     share of quoted markers that are not cell i's genes but another cell's (reading the wrong line)
  cand      share of named types on those lines that are candidates of the puzzle
  missed    share of puzzles whose first N "Cell i" lines name a type twice but whose trace says "Every type is
            used once" (the repeat check of the fix-order trace)
  dup ans   share of answers that name a type twice (each costs at least one cell)
  -argmax   correct cells of the model minus those of the argmax (issue 5's bar: >= 0 at every N)
  train     cell accuracy on puzzles of *train* cells at full depth, next to the argmax's there: a large gap to
            the held-out column means the model learned the train cells, not the types (generalisation)

A second table splits the held-out cells by the teacher's margin (its best candidate's score minus the runner-up's,
in nats): how often the model's first-pass line names the argmax's type, and how often each is right. It says
whether the model misreads clear cells or only the ones where the argmax itself is near chance.

    python scripts/sft_diagnostics.py runs/main/sft/model
"""
import argparse
import os
import re
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
import pipeline  # noqa: E402
import reward  # noqa: E402


def reading(puzzles, texts) -> dict:
    """Per N: counts of "Cell i: type (m1, m2)" lines, named types that are candidates, quoted markers, and those
    in cell i / in another cell of the puzzle."""
    stats = {n: Counter() for n in sorted({p.n for p in puzzles})}
    for p, text in zip(puzzles, texts):
        c = stats[p.n]
        lines = re.findall(r"Cell (\d+): (.*?) \(([^)]*)\)", text)
        for k, typ, quoted in lines:
            i = int(k) - 1
            if i >= p.n:
                continue
            c["lines"] += 1
            c["cand"] += typ in p.candidates
            for g in quoted.split(", "):
                c["quoted"] += 1
                c["in cell"] += g in p.cells[i]
                c["other"] += g not in p.cells[i] and any(g in cell for cell in p.cells)
        first = [typ for _, typ, _ in lines[:p.n]]  # the first pass: one line per cell
        if len(set(first)) < len(first):
            c["repeat lines"] += 1
            c["missed"] += "Every type is used once" in text
        answer = reward.parse(text) or []
        c["dup ans"] += len(set(answer)) < len(answer)
        c["puzzles"] += 1
    return stats


MARGINS = [2, 5, 10, 20, 40]   # bucket edges in nats


def by_margin(teacher: data.Teacher, puzzles, texts) -> dict:
    """Per margin bucket: cells, first-pass lines naming the argmax's type, argmax right, first pass right."""
    stats = {b: Counter() for b in range(len(MARGINS) + 1)}
    for p, text in zip(puzzles, texts):
        s = teacher.scores(p)
        top2 = np.sort(s, 1)[:, -2:]
        first = {}
        for k, typ in re.findall(r"Cell (\d+): (.*?) \(", text):
            first.setdefault(int(k) - 1, typ)
        for i in range(p.n):
            c = stats[int(np.searchsorted(MARGINS, top2[i, 1] - top2[i, 0]))]
            best = p.candidates[int(s[i].argmax())]
            c["cells"] += 1
            c["agree"] += first.get(i) == best
            c["argmax right"] += best == p.gold[i]
            c["first right"] += first.get(i) == p.gold[i]
    return stats


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="final model folder of a train_sft.py run on the embedded data")
    ap.add_argument("--per-n", type=int, default=50, help="held-out puzzles per N (the results table uses 50)")
    ap.add_argument("--train-per-n", type=int, default=20, help="train-cell puzzles per N")
    ap.add_argument("--seed", type=int, default=0, help="seed of the held-out puzzles (0: the results table's set; "
                    "others: independent sets of the same held-out cells)")
    args = ap.parse_args()
    split = data.embedded()
    test = data.test_puzzles(split, data.CPU, per_n=args.per_n, seed=args.seed)
    rng = np.random.default_rng(0)
    sampler = data.PuzzleSampler(split.data, split.train, data.CPU.n_genes)  # not augmented: full depth
    train = [sampler.sample(n, rng) for n in range(data.CPU.n_range[0], data.CPU.n_range[1] + 1)
             for _ in range(args.train_per_n)]
    cell = lambda m: {n: v["cell_acc"] for n, v in m["by_n"].items()}
    ours, texts = pipeline.decode_model(args.model, test, 512)
    ours_tr = pipeline.decode_model(args.model, train, 512)[0]
    base, base_tr = pipeline.baselines(test), pipeline.baselines(train)
    ours, ours_tr = cell(ours), cell(ours_tr)
    argmax, hung, argmax_tr = cell(base["per-cell argmax"]), cell(base["teacher (Hungarian)"]), \
        cell(base_tr["per-cell argmax"])
    print("| N | cell | argmax | teacher | -argmax | in cell | other | cand | missed | dup ans | train cell | "
          "train argmax |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n, c in reading(test, texts).items():
        share = lambda k, d: c[k] / max(c[d], 1)
        gain = round((ours[n] - argmax[n]) * n * c["puzzles"])  # in cells
        print(f"| {n} | {ours[n]:.2f} | {argmax[n]:.2f} | {hung[n]:.2f} | {gain:+d} | "
              f"{share('in cell', 'quoted'):.2f} | {share('other', 'quoted'):.2f} | {share('cand', 'lines'):.2f} | "
              f"{share('missed', 'repeat lines'):.2f} | {share('dup ans', 'puzzles'):.2f} | {ours_tr.get(n, 0):.2f} | "
              f"{argmax_tr.get(n, 0):.2f} |")
    print("\n| teacher margin (nats) | cells | first pass = argmax | argmax right | first pass right |")
    print("|---|---|---|---|---|")
    edges = [0] + MARGINS + [None]
    for b, c in by_margin(data.fit_embedded_teacher(split), test, texts).items():
        k = max(c["cells"], 1)
        span = f"{edges[b]}-{edges[b + 1]}" if edges[b + 1] else f">= {edges[b]}"
        print(f"| {span} | {c['cells']} | {c['agree'] / k:.2f} | {c['argmax right'] / k:.2f} | "
              f"{c['first right'] / k:.2f} |")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
