"""Train the small byte-level BPE of the CPU model and write assets/tokenizer.json.

Corpus (train cells only, never test cells): the system message, Qwen's default system prompt and the ChatML role
names, plus --puzzles train puzzles of the embedded PBMC data with their accepted teacher traces, at the CPU
defaults (20 genes, N 3-8) and a fifth at the released gene count (50 genes, N 8-10) so longer gene lists are covered.
Special tokens: <|endoftext|>, <|im_start|>, <|im_end|> (Qwen's strings, so model.render_chat renders the same text).
Deterministic: same corpus -> same file.

    python scripts/train_tokenizer.py                      # writes assets/tokenizer.json (vocab 2048)
    python scripts/train_tokenizer.py --sizes 1024 2048 4096 --out ''   # only compare sizes
"""
import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np  # noqa: E402

import data  # noqa: E402
from model import QWEN_DEFAULT_SYSTEM  # noqa: E402


def corpus(split: data.CellSplit, teacher: data.Teacher, n_puzzles: int, seed: int = 0) -> list[str]:
    cpu, wide = data.PuzzleStream(seed, cells=split, teacher=teacher), data.PuzzleConfig(n_genes=50, n_range=(8, 10),
                                                                                          augment=True)
    long = data.PuzzleStream(seed + 1, cells=split, cfg=wide)
    cpu, long = (cpu[i] for i in range(n_puzzles)), (long[i] for i in range(n_puzzles // 5))
    texts = []
    for p in itertools.chain(cpu, long):
        # the system message and ChatML roles are in every sequence: weight them as often as they occur
        texts += [data.SYSTEM_MSG, "system\nuser\nassistant\n", p.user, p.assistant]
    return texts + [QWEN_DEFAULT_SYSTEM]


def lengths_per_n(tok, puzzles: list[data.Puzzle], teacher: data.Teacher) -> None:
    """Mean tokens per N: user_msg, teacher trace, and the whole ChatML sequence (system + user + trace)."""
    from model import render_chat
    print("| N | user_msg | trace | system+user+trace (ChatML) |\n|---|---:|---:|---:|")
    for n in sorted({p.n for p in puzzles}):
        ps = [p for p in puzzles if p.n == n]
        user = [len(tok.encode(p.user).ids) for p in ps]
        trace = [len(tok.encode(teacher.trace(p)[0]).ids) for p in ps]
        chats = [[{"role": "system", "content": p.system}, {"role": "user", "content": p.user},
                  {"role": "assistant", "content": teacher.trace(p)[0]}] for p in ps]
        full = [len(tok.encode(render_chat(c)).ids) for c in chats]
        print(f"| {n} | {np.mean(user):.0f} | {np.mean(trace):.0f} | {np.mean(full):.0f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--puzzles", type=int, default=3000)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048])
    ap.add_argument("--out", default=data.TOKENIZER_PATH, help="written for the first size; '' to skip")
    args = ap.parse_args()

    split = data.embedded()
    teacher = data.fit_embedded_teacher(split)
    texts = corpus(split, teacher, args.puzzles)
    # measure on held-out puzzles (test cells) with their teacher traces
    test = data.test_puzzles(split, data.CPU, per_n=20, seed=1)
    for k, size in enumerate(args.sizes):
        tok = data.train_tokenizer(texts, size)
        prompt = [len(tok.encode(p.user).ids) for p in test]
        trace = [len(tok.encode(teacher.trace(p)[0]).ids) for p in test]
        genes = sorted({g for p in test for c in p.cells for g in c})
        per_gene = np.mean([len(tok.encode(", " + g).ids) for g in genes])
        print(f"vocab {tok.get_vocab_size()}: user_msg {np.mean(prompt):.0f} tokens, trace {np.mean(trace):.0f}, "
              f"system {len(tok.encode(data.SYSTEM_MSG).ids)}, tokens per ', gene' {per_gene:.2f}")
        if k == 0:
            lengths_per_n(tok, test, teacher)
        if k == 0 and args.out:
            tok.save(args.out)
            print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
