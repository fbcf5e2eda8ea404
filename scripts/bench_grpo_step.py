"""The GRPO training pass (forward + backward of every micro-batch of one rollout batch) on the embedded default's
shape, in one run: each group's prompt packed once with its n completions (train_rl.pack_rollouts, the trainer's
layout) against one right-padded row per rollout (the layout it replaced). Time per step and positions computed.

    python scripts/bench_grpo_step.py           # the tiny model, 16 prompts x 8 samples, micro-batches of 16

Completions are the embedded teacher traces of each puzzle cut at random lengths (60-100%), as the sampled ones vary.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
from model import encode_chat, load_tokenizer  # noqa: E402
from sampler import pad64  # noqa: E402
from train_common import SHORT_SYSTEM, build_model, messages, tokenizer_source  # noqa: E402
from train_common import Rollout  # noqa: E402
from train_rl import micro_logits, pack_rollouts  # noqa: E402


def padded_logits(model, rows):
    """The old layout: one row per rollout, right-padded to a multiple of 64, lm_head at the completion positions."""
    T = pad64(max(len(r.prompt) + len(r.tokens) for r in rows))
    x, sel = torch.zeros(len(rows), T, dtype=torch.long), torch.zeros(len(rows), T, dtype=torch.bool)
    for b, r in enumerate(rows):
        x[b, :len(r.prompt) + len(r.tokens)] = torch.tensor(r.prompt + r.tokens)
        sel[b, len(r.prompt) - 1:len(r.prompt) + len(r.tokens) - 1] = True
    return model(x, logits_at=sel), x.numel()


def packed_logits(model, rows):
    m = pack_rollouts(rows, "cpu")
    return micro_logits(model, m), m.x.numel()


def rollout_batches(tok, steps: int, prompts: int, n: int) -> list[list[Rollout]]:
    cells = data.embedded()
    stream = data.PuzzleStream(0, cells=cells, pool="rl", key=(1,), teacher=data.fit_embedded_teacher(cells))
    rng, out = np.random.default_rng(0), []
    for g in range(steps * prompts):
        p = stream[g]
        ids = encode_chat(tok, messages(p, SHORT_SYSTEM), add_generation_prompt=True)
        trace = tok.encode(p.assistant, add_special_tokens=False).ids
        for _ in range(n):
            cut = trace[:max(1, int(len(trace) * rng.uniform(0.6, 1.0)))]
            out.append(Rollout(g, ids, cut, [0.0] * len(cut), False))
    return [out[s:s + prompts * n] for s in range(0, len(out), prompts * n)]


def training_pass(model, fn, rows, micro_batch: int) -> int:
    """Forward + backward of every micro-batch of one rollout batch; -> positions computed."""
    cells = 0
    for j in range(0, len(rows), micro_batch):
        logits, c = fn(model, rows[j:j + micro_batch])
        torch.log_softmax(logits.float(), -1).mean().backward()
        cells += c
    model.zero_grad(set_to_none=True)
    return cells


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="timed rollout batches per layout (after one warm-up)")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per step")
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--micro-batch", type=int, default=16, help="rollouts per forward")
    args = ap.parse_args()
    tok = load_tokenizer(tokenizer_source("tiny", None))
    model, _ = build_model("tiny", tok, torch.device("cpu"), 0)
    batches = rollout_batches(tok, args.steps + 1, args.prompts, args.n)
    real = sum(len(r.prompt) + len(r.tokens) for b in batches[1:] for r in b)
    res = {}
    for name, fn in [("one row per rollout", padded_logits), ("prompt once per group", packed_logits)]:
        training_pass(model, fn, batches[0], args.micro_batch)  # warm-up: oneDNN builds its kernels
        t0 = time.perf_counter()
        cells = sum(training_pass(model, fn, rows, args.micro_batch) for rows in batches[1:])
        res[name] = ((time.perf_counter() - t0) / args.steps, cells)
    print(f"GRPO training pass, {args.prompts} prompts x {args.n} samples, micro-batches of {args.micro_batch}, "
          f"{torch.get_num_threads()} threads; {real // args.steps} sequence tokens per step")
    print("| layout | forward + backward per step | positions computed | sequence tokens / s |")
    print("|---|---|---|---|")
    for name, (t, cells) in res.items():
        print(f"| {name} | {t:.2f} s | {cells // args.steps} | {real / args.steps / t:,.0f} |")
    (t_old, _), (t_new, _) = res.values()
    print(f"speed-up (one row per rollout / prompt once): {t_old / t_new:.2f}x")


if __name__ == "__main__":
    main()
