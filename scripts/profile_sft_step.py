"""Where a tiny SFT step's time goes on this CPU, against what its arithmetic would take at the machine's own matmul
rate: the default recipe's step (global batch 8 packed into one micro-batch, bf16 autocast where the CPU has native
bf16, Muon + AdamW, FSDP2 on 1 rank) on late-curriculum puzzles (N up to 8), timed, then profiled by op.

    python scripts/profile_sft_step.py            # alone on the machine: a second job changes every number

Printed: ms per step, tokens/s, the step's model FLOPs (6 x matmul weights x tokens + causal attention) and the
share of the peak, where the peak is a 2048^3 matmul in the training dtype measured in the same run; then the share
of the profiled time per op family (matmuls, attention, elementwise, optimizer, the rest).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import train_sft  # noqa: E402
from model import load_tokenizer  # noqa: E402
from train_common import build_model, infer_dtype, init_distributed, shard, system_turn, tokenizer_source  # noqa: E402

FAMILIES = {"matmul": ("mm", "addmm", "bmm", "linear", "matmul"), "attention": ("attention", "sdpa", "flash"),
            "optimizer": ("optimizer", "muon", "lerp", "addcdiv", "addcmul"),
            "elementwise": ("mul", "add", "sub", "div", "silu", "rsqrt", "pow", "mean", "neg", "cat", "copy",
                            "to", "cos", "sin", "softmax", "cross_entropy", "nll", "sum", "where", "fill")}


def peak_gflops(dtype: torch.dtype, size: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up: oneDNN picks its kernel
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * size ** 3 * reps / (time.perf_counter() - t0) / 1e9


def step_flops(model, batch) -> float:
    """6 x (matmul weights, lm_head included) per token + causal attention (QK^T and AV, forward x 3) per sequence."""
    c = model.config
    blocks = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and ".layers." in n)
    per_token = 6 * (blocks + c.vocab_size * c.hidden_size)
    attn = sum(3 * 2 * len(ids) ** 2 * c.num_attention_heads * c.head_dim * c.num_hidden_layers for ids, _ in batch)
    return per_token * sum(len(ids) for ids, _ in batch) + attn


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES.items():
        if any(k in low for k in keys):
            return fam
    return "other"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps (after 3 warm-up steps); 5 are profiled")
    ap.add_argument("--at", type=int, default=1000, help="step of the default run whose batches are used (the "
                    "curriculum has reached N = 8 by step 700)")
    args = ap.parse_args()
    targs = train_sft.parse_args(["--out", "unused", "--no-progress"])
    _, _, device = init_distributed()
    tok = load_tokenizer(tokenizer_source(targs.model, targs.tokenizer))
    end = tok.token_to_id("<|im_end|>")
    stream = train_sft.examples(targs)
    stream.ramp = int(targs.curriculum * targs.steps * targs.batch_size)
    system = system_turn(targs.system)
    model, _ = build_model(targs.model, tok, device, 0)
    shard(model, device)
    dtype = infer_dtype(device, targs.precision)
    optim = train_sft.make_optimizer(model, targs.optim, targs.lr, targs.weight_decay, targs.muon_lr, dtype)
    bs = targs.batch_size
    batches = [train_sft.examples_at(stream, s * bs, bs, tok, end, targs.max_len, system)
               for s in range(args.at, args.at + args.steps + 3)]
    for b in batches[:3]:
        train_sft.train_step(model, optim, b, targs, device)
    t0 = time.perf_counter()
    for b in batches[3:]:
        train_sft.train_step(model, optim, b, targs, device)
    dt = (time.perf_counter() - t0) / args.steps
    tokens = sum(len(ids) for b in batches[3:] for ids, _ in b) / args.steps
    flops = sum(step_flops(model, b) for b in batches[3:]) / args.steps
    peak = peak_gflops(dtype)
    print(f"SFT step ({dtype}, {torch.get_num_threads()} threads): {dt * 1000:.0f} ms, {tokens:.0f} tokens, "
          f"{tokens / dt:,.0f} tokens/s; {flops / 1e9:.1f} GFLOP -> {flops / dt / 1e9:.0f} GFLOP/s against a "
          f"{peak:.0f} GFLOP/s 2048^3 matmul: {flops / dt / 1e9 / peak:.0%} of the peak, "
          f"{flops / 1e9 / peak * 1000:.0f} ms at it")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in batches[3:8]:
            train_sft.train_step(model, optim, b, targs, device)
    shares: dict[str, float] = {}
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in top)
    for e in top:
        shares[family(e.key)] = shares.get(family(e.key), 0) + e.self_cpu_time_total / total
    print("| op family | share of self CPU time |\n|---|---|")
    for fam, v in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"| {fam} | {v:.0%} |")
    print("\ntop ops:", ", ".join(f"{e.key} {e.self_cpu_time_total / total:.0%}" for e in top[:12]))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
