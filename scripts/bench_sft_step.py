"""One SFT training step on the embedded data, packed micro-batch (train_sft.pack) against the right-padded layout
it replaced, in one run: forward + backward time per step and padding share, side by side.

    python scripts/bench_sft_step.py                 # the tiny model, global batch 8, N = 3..8 (the default's 2nd half)
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from model import load_tokenizer  # noqa: E402
from sampler import pad64  # noqa: E402
from train_common import SHORT_SYSTEM, autocast, build_model, init_distributed, shard, tokenizer_source  # noqa: E402
from train_sft import pack, tokenize  # noqa: E402
import data  # noqa: E402


def padded(batch):
    """The old layout: rows right-padded to a multiple of 64, loss on the completion tokens."""
    T = pad64(max(len(ids) for ids, _ in batch))
    x = torch.zeros(len(batch), T, dtype=torch.long)
    y = torch.full((len(batch), T), -100, dtype=torch.long)
    for b, (ids, n) in enumerate(batch):
        x[b, :len(ids)] = torch.tensor(ids)
        y[b, n - 1:len(ids) - 1] = torch.tensor(ids[n:])
    return x, y


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per layout (after 3 warm-up steps)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step (one micro-batch)")
    args = ap.parse_args()
    _, _, device = init_distributed()
    tok = load_tokenizer(tokenizer_source("tiny", None))
    end = tok.token_to_id("<|im_end|>")
    cells = data.embedded()
    ex = data.PuzzleStream(0, cells=cells, mix=0.5, ambient=0.5, teacher=data.fit_embedded_teacher(cells))
    model, _ = build_model("tiny", tok, device, 0)
    shard(model, device)
    puzzles = [ex[i] for i in range((args.steps + 3) * args.batch)]
    batches = [[tokenize(tok, p, p.assistant, end, 4096, "bench", SHORT_SYSTEM) for p in puzzles[s:s + args.batch]]
               for s in range(0, len(puzzles), args.batch)]

    def step_packed(batch):
        x, y, sel, pos, lens = pack(batch, device)
        with autocast(device):
            logits = model(x, logits_at=sel, positions=pos, packed=lens)
        F.cross_entropy(logits.float(), y[sel], ignore_index=-100).backward()
        return x.numel()

    def step_padded(batch):
        x, y = padded(batch)
        sel = y >= 0
        with autocast(device):
            logits = model(x, logits_at=sel)
        F.cross_entropy(logits.float(), y[sel], ignore_index=-100).backward()
        return x.numel()

    res = {}
    for name, fn in [("padded", step_padded), ("packed", step_packed)]:
        for b in batches[:3]:
            fn(b)
        t0, cells = time.perf_counter(), 0
        for b in batches[3:]:
            cells += fn(b)
            model.zero_grad(set_to_none=True)
        res[name] = ((time.perf_counter() - t0) / args.steps, cells)
    real = sum(len(ids) for b in batches[3:] for ids, _ in b)
    print("| layout | forward + backward per step | positions computed | padding |")
    print("|---|---|---|---|")
    for name, (t, cells) in res.items():
        print(f"| {name} | {t * 1000:.0f} ms | {cells} | {1 - real / cells:.0%} |")
    print(f"packed / padded time: {res['packed'][0] / res['padded'][0]:.2f}x")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
