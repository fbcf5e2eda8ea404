"""Attention kernel timing on a GPU: each Triton kernel next to its PyTorch peer, same inputs, one run.

Prefill (the sampler's prompt pass): B right-padded rows of T tokens, lengths uniform in [T/2, T].
  peer: the reference, causal SDPA with GQA (PyTorch picks flash / memory-efficient attention).
Decode (one new token per row, GRPO shape): G prompts of Tp tokens, n samples each sharing the prompt K/V, every
row at a different generated length <= Tg.
  peer 1: the reference (PyTorch: the prompt K/V read once per group, then the generated keys per row);
  peer 2: a plain contiguous cache, each row's prompt copied in (what an unshared KV cache does), SDPA with a mask.
Heads default to Qwen2.5-7B's (28 query / 4 kv heads, D 128), bf16. Times are triton.testing.do_bench medians.

    python scripts/bench_kernels.py            # needs CUDA
"""
import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", type=int, default=28, help="query heads")
    ap.add_argument("--kv-heads", type=int, default=4, help="key/value heads")
    ap.add_argument("--head-dim", type=int, default=128, help="head dimension")
    ap.add_argument("--batch", type=int, default=16, help="prefill rows")
    ap.add_argument("--seq", type=int, default=2048, help="prefill row length T (padded)")
    ap.add_argument("--groups", type=int, default=16, help="decode: prompts")
    ap.add_argument("--n", type=int, default=8, help="decode: samples per prompt")
    ap.add_argument("--prompt-len", type=int, default=1024, help="decode: prompt tokens")
    ap.add_argument("--gen-len", type=int, default=1024, help="decode: most generated tokens of a row")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="input dtype")
    ap.add_argument("--sweep", action="store_true", help="also time the prefill kernel at other block sizes / warps")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("bench_kernels needs a CUDA GPU and compiled Triton (TRITON_INTERPRET unset or 0)")
    from triton.testing import do_bench
    from kernels.decode_attention import decode_attention, decode_attention_ref
    from kernels.prefill_attention import prefill_attention, prefill_attention_ref

    dev, dt = "cuda", getattr(torch, args.dtype)
    H, Hkv, D = args.heads, args.kv_heads, args.head_dim
    g = torch.Generator(device=dev).manual_seed(0)
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | heads {H}/{Hkv} D {D} {args.dtype}")

    # prefill
    B, T = args.batch, args.seq
    q = torch.randn(B, T, H, D, device=dev, generator=g, dtype=dt)
    k, v = (torch.randn(B, T, Hkv, D, device=dev, generator=g, dtype=dt) for _ in range(2))
    lens = torch.randint(T // 2, T + 1, (B,), device=dev, generator=g)
    err = (prefill_attention(q, k, v, lens, backend="triton").float() - prefill_attention_ref(q, k, v, lens).float())
    t_tri = do_bench(lambda: prefill_attention(q, k, v, lens, backend="triton"))
    t_ref = do_bench(lambda: prefill_attention_ref(q, k, v, lens))
    flops = 4 * D * H * float((lens.float() * (lens.float() + 1) / 2).sum())  # causal QK^T + PV over valid tokens
    print(f"prefill B={B} T={T}: triton {t_tri:.3f} ms ({flops / t_tri / 1e9:.0f} TFLOP/s) | SDPA reference "
          f"{t_ref:.3f} ms | triton/SDPA time {t_tri / t_ref:.2f}x | max abs diff {err.abs().max().item():.2e}")

    if args.sweep:  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
        from kernels.prefill_attention import _prefill_triton
        for bm, bn, nw, ns in [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3),
                               (128, 32, 4, 3), (128, 64, 8, 4)]:
            t = do_bench(lambda: _prefill_triton(q, k, v, lens, 1 / math.sqrt(D), bm, bn, nw, ns))
            print(f"  prefill blocks {bm}x{bn} warps {nw} stages {ns}: {t:.3f} ms ({flops / t / 1e9:.0f} TFLOP/s)")

    # decode
    G, n, Tp, Tg = args.groups, args.n, args.prompt_len, args.gen_len
    Bd = G * n
    qd = torch.randn(Bd, H, D, device=dev, generator=g, dtype=dt)
    kp, vp = (torch.randn(G, Tp, Hkv, D, device=dev, generator=g, dtype=dt) for _ in range(2))
    kg, vg = (torch.randn(Bd, Tg, Hkv, D, device=dev, generator=g, dtype=dt) for _ in range(2))
    plens = torch.full((G,), Tp, device=dev, dtype=torch.int32)
    groups = torch.arange(G, device=dev).repeat_interleave(n)
    slots = torch.arange(Bd, device=dev)
    glens = torch.randint(1, Tg + 1, (Bd,), device=dev, generator=g)
    dargs = (qd, kp, vp, plens, groups, kg, vg, slots, glens)
    err = decode_attention(*dargs, backend="triton").float() - decode_attention_ref(*dargs).float()
    t_tri = do_bench(lambda: decode_attention(*dargs, backend="triton"))
    t_ref = do_bench(lambda: decode_attention_ref(*dargs))
    # peer 2: one contiguous (Tp + Tg) cache per row, the prompt copied n times, SDPA with a boolean key mask
    kc = torch.cat([kp[groups], kg], 1).transpose(1, 2)  # (Bd, Hkv, Tp + Tg, D)
    vc = torch.cat([vp[groups], vg], 1).transpose(1, 2)
    pos = torch.arange(Tp + Tg, device=dev)
    mask = ((pos < Tp) | (pos - Tp < glens[:, None]))[:, None, None, :]  # (Bd, 1, 1, Tp + Tg)
    t_flat = do_bench(lambda: F.scaled_dot_product_attention(qd[:, :, None], kc, vc, attn_mask=mask,
                                                             scale=1 / math.sqrt(D), enable_gqa=True))
    read = (G * Tp + float(glens.sum())) * Hkv * D * 2 * qd.element_size()  # K and V bytes the kernel must read
    print(f"decode {G} prompts x n={n}, Tp={Tp}, gen <= {Tg}: triton {t_tri:.3f} ms ({read / t_tri / 1e9:.2f} TB/s "
          f"of K/V) | reference {t_ref:.3f} ms | flat-cache SDPA {t_flat:.3f} ms | triton/reference time "
          f"{t_tri / t_ref:.2f}x | triton/flat SDPA {t_tri / t_flat:.2f}x | max abs diff {err.abs().max().item():.2e}")


if __name__ == "__main__":
    main()
