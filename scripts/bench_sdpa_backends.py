"""Why model.py keeps cuDNN out of training attention: SDPA forward + backward on packed-style sequences, a new length
almost every call, with SDPA's default backends (on Hopper: cuDNN first) against model.SDPA_BACKENDS (flash,
memory-efficient, math), then the defaults again once every length has been seen.

On an H200 (results/2026-11-26-h200-graphs/sdpa_backends.log): 160 ms per call with the defaults on new lengths
(cuDNN builds an execution plan per shape), 1.5 ms without cuDNN, 0.4 ms with the defaults once the plans are cached.

    python scripts/bench_sdpa_backends.py          # needs CUDA
"""
import argparse
import contextlib
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import SDPA_BACKENDS  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=60, help="sequences, one SDPA forward + backward each")
    ap.add_argument("--min-len", type=int, default=150, help="shortest sequence")
    ap.add_argument("--max-len", type=int, default=450, help="longest sequence (exclusive)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_sdpa_backends needs a CUDA GPU")
    torch.manual_seed(0)
    lens = torch.randint(args.min_len, args.max_len, (args.calls,)).tolist()

    def run(ctx) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        for L in lens:  # the tiny model's heads: 4 query / 2 key-value heads of 64, bf16
            q, k, v = (torch.randn(1, h, L, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for h in (4, 2, 2))
            with ctx():
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            o.sum().backward()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / len(lens) * 1e3

    first = run(contextlib.nullcontext)
    ours = run(lambda: sdpa_kernel(SDPA_BACKENDS))
    again = run(contextlib.nullcontext)
    print(f"{args.calls} lengths in [{args.min_len}, {args.max_len}), ms per forward + backward: default backends "
          f"{first:.2f} (new lengths), SDPA_BACKENDS {ours:.2f}, default backends again {again:.2f} (lengths seen)")


if __name__ == "__main__":
    main()
