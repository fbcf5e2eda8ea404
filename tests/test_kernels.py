"""Attention kernels: each Triton kernel (run in the interpreter, TRITON_INTERPRET=1 from conftest) equals its PyTorch
reference, and each reference equals a naive loop implementation written straight from the contract."""
import importlib
import math

import pytest
import torch

import kernels
from kernels import decode_attention, prefill_attention
from kernels.decode_attention import _decode_triton, _pick_num_splits, decode_attention_ref
from kernels.prefill_attention import _prefill_triton, prefill_attention_ref

ATOL = 1e-5
HEADS = [(2, 2), (4, 2), (7, 1)]  # GQA ratios 1, 2, 7


def naive_prefill(q, k, v, seq_lens, scale):
    """Explicit loops over rows and heads, explicit causal mask and softmax."""
    B, T, H, D = q.shape
    group = H // k.shape[2]
    out = torch.zeros_like(q)
    for b in range(B):
        L = int(seq_lens[b])
        for h in range(H):
            kh, vh = k[b, :L, h // group], v[b, :L, h // group]
            s = (q[b, :L, h] @ kh.T) * scale  # (L, L)
            s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
            out[b, :L, h] = torch.softmax(s, dim=-1) @ vh
    return out


def naive_decode(q, kp, vp, prompt_lens, groups, kg, vg, slots, gen_lens, scale):
    """Per row: concatenate its group's prompt K/V and its own generated K/V, repeat_interleave the kv heads,
    explicit softmax over the valid keys (a row with no key -> zeros)."""
    B, H, D = q.shape
    group = H // kp.shape[2]
    out = torch.zeros_like(q)
    for b in range(B):
        g, s = int(groups[b]), int(slots[b])
        Lp, Lg = int(prompt_lens[g]), int(gen_lens[b])
        if Lp + Lg == 0:
            continue
        kk = torch.cat([kp[g, :Lp], kg[s, :Lg]]).repeat_interleave(group, dim=1)  # (L, H, D)
        vv = torch.cat([vp[g, :Lp], vg[s, :Lg]]).repeat_interleave(group, dim=1)
        p = torch.softmax(torch.einsum("hd,lhd->hl", q[b], kk) * scale, dim=-1)
        out[b] = torch.einsum("hl,lhd->hd", p, vv)
    return out


def make_prefill(H, Hkv, D=16, T=37, seq_lens=(1, 5, 37), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = len(seq_lens)
    q = torch.randn(B, T, H, D, generator=g).to(dtype)
    k = torch.randn(B, T, Hkv, D, generator=g).to(dtype)
    v = torch.randn(B, T, Hkv, D, generator=g).to(dtype)
    return q, k, v, torch.tensor(seq_lens, dtype=torch.int32)


# Rows of one call: group 2 has three rows at different generated lengths (one of them 0), group 1 one row, group 3
# none; lengths are off every block boundary and the (prompt + generated) sequences cross split boundaries.
DECODE_ROWS = dict(groups=(2, 0, 2, 1, 2), slots=(5, 0, 3, 1, 2), gen_lens=(33, 90, 0, 17, 1),
                   prompt_lens=(150, 1, 77, 20))


def make_decode(H, Hkv, D=32, G=4, Tp=160, S=6, Tg=96, groups=DECODE_ROWS["groups"], slots=DECODE_ROWS["slots"],
                gen_lens=DECODE_ROWS["gen_lens"], prompt_lens=DECODE_ROWS["prompt_lens"], dtype=torch.float32,
                seed=0):
    """-> the argument tuple of decode_attention without scale."""
    g = torch.Generator().manual_seed(seed)
    B = len(slots)
    q = torch.randn(B, H, D, generator=g).to(dtype)
    kp, vp = (torch.randn(G, Tp, Hkv, D, generator=g).to(dtype) for _ in range(2))
    kg, vg = (torch.randn(S, Tg, Hkv, D, generator=g).to(dtype) for _ in range(2))
    return (q, kp, vp, torch.tensor(prompt_lens, dtype=torch.int32), torch.tensor(groups), kg, vg,
            torch.tensor(slots), torch.tensor(gen_lens, dtype=torch.int64))


# ----------------------------------------------------------------------------------------------------- prefill


@pytest.mark.parametrize("H,Hkv", HEADS)
def test_prefill_ref_matches_naive(H, Hkv):
    q, k, v, sl = make_prefill(H, Hkv)
    scale = 0.3  # not the default, so a dropped scale would show
    out = prefill_attention_ref(q, k, v, sl, scale)
    torch.testing.assert_close(out, naive_prefill(q, k, v, sl, scale), atol=ATOL, rtol=0)
    for b, L in enumerate(sl.tolist()):  # padded rows are exact zeros
        assert out[b, L:].eq(0).all()


@pytest.mark.parametrize("H,Hkv", HEADS)
# (16, 16): several query and key blocks with a partial last one; (32, 16): two key blocks on the diagonal, unmasked
# blocks left of it; (128, 64): one partial query block with two key blocks
@pytest.mark.parametrize("block_m,block_n", [(16, 16), (64, 64), (32, 16), (128, 64)])
def test_prefill_triton_matches_ref(H, Hkv, block_m, block_n):
    q, k, v, sl = make_prefill(H, Hkv)
    out = _prefill_triton(q, k, v, sl, 1 / math.sqrt(16), block_m=block_m, block_n=block_n)
    torch.testing.assert_close(out, prefill_attention_ref(q, k, v, sl), atol=ATOL, rtol=0)
    for b, L in enumerate(sl.tolist()):
        assert out[b, L:].eq(0).all()


def test_prefill_triton_dispatch_default_scale_and_head_dim():
    q, k, v, sl = make_prefill(4, 2, D=32, T=20, seq_lens=(20, 0, 13))  # a row with no valid token at all
    out = prefill_attention(q, k, v, sl, backend="triton")
    torch.testing.assert_close(out, naive_prefill(q, k, v, sl, 1 / math.sqrt(32)), atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_prefill_ignores_padding_content(backend):
    """Valid outputs do not depend on padded keys/values (even nan there), padded outputs are finite zeros."""
    q, k, v, sl = make_prefill(4, 2, T=21, seq_lens=(7, 21))
    base = prefill_attention(q, k, v, sl, backend=backend)
    bad = float("nan") if backend == "triton" else 1e4  # the SDPA reference needs finite padding
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[0, 7:] = bad
    out = prefill_attention(q2, k2, v2, sl, backend=backend)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, base, atol=ATOL, rtol=0)
    assert out[0, 7:].eq(0).all()


def test_prefill_triton_bf16():
    """bf16 in, bf16 out; the kernel computes in fp32, so it matches fp32 math on the same inputs up to output
    rounding."""
    q, k, v, sl = make_prefill(4, 2, D=32, dtype=torch.bfloat16)
    out = _prefill_triton(q, k, v, sl, 1 / math.sqrt(32), block_m=16, block_n=16)
    assert out.dtype == torch.bfloat16
    ref = prefill_attention_ref(q.float(), k.float(), v.float(), sl)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=1e-2)


# ------------------------------------------------------------------------------------------------------ decode


@pytest.fixture(params=["cpu_flash", "math"])
def ref_path(request, monkeypatch):
    """Run the reference through the CPU flash op and through its plain-math fallback (the non-CPU path)."""
    if request.param == "math":
        monkeypatch.setattr(importlib.import_module("kernels.decode_attention"), "_cpu_flash", None)
    return request.param


@pytest.mark.parametrize("H,Hkv", HEADS)
def test_decode_ref_matches_naive(H, Hkv, ref_path):
    args = make_decode(H, Hkv)
    scale = 0.3
    torch.testing.assert_close(decode_attention_ref(*args, scale), naive_decode(*args, scale), atol=ATOL, rtol=0)


@pytest.mark.parametrize("rows", [
    dict(groups=(0, 0, 0, 1, 1, 1), slots=tuple(range(6)), gen_lens=(7,) * 6, prompt_lens=(150, 150)),  # sampler
    dict(groups=(1, 0, 1, 0, 1), slots=(0, 1, 2, 3, 4), gen_lens=(5, 9, 9, 96, 3), prompt_lens=(160, 31)),
    dict(groups=(2, 0, 1), slots=(4, 0, 2), gen_lens=(0, 0, 0), prompt_lens=(3, 160, 1)),  # one row per group
    dict(groups=(0, 0), slots=(0, 1), gen_lens=(4, 0), prompt_lens=(0,)),  # no prompt key; a row with no key at all
])
def test_decode_ref_layouts(rows, ref_path):
    """Identity slots and groups (the view paths), equal lengths (no mask), one row per group, empty segments."""
    args = make_decode(4, 2, G=len(rows["prompt_lens"]), **rows)
    out = decode_attention_ref(*args, 0.2)
    torch.testing.assert_close(out, naive_decode(*args, 0.2), atol=ATOL, rtol=0)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("H,Hkv", HEADS)
@pytest.mark.parametrize("num_splits", [1, 4, None])  # 4 -> splits of 64 keys over Tp + Tg = 256
def test_decode_triton_matches_ref(H, Hkv, num_splits):
    args = make_decode(H, Hkv)
    out = decode_attention(*args, backend="triton", num_splits=num_splits)
    torch.testing.assert_close(out, decode_attention_ref(*args), atol=ATOL, rtol=0)


def test_decode_triton_small_blocks_and_zero_length_rows():
    """Many key blocks per split (block_n=16), splits that straddle the prompt / generated boundary, a row with no
    generated key and a row with no key at all (-> zeros)."""
    args = make_decode(7, 1, D=16, G=2, Tp=40, S=3, Tg=30, groups=(0, 1, 0, 0), slots=(2, 1, 0, 1),
                       gen_lens=(29, 0, 0, 5), prompt_lens=(37, 0))
    out = _decode_triton(*args, 0.25, num_splits=3, block_n=16)
    torch.testing.assert_close(out, naive_decode(*args, 0.25), atol=ATOL, rtol=0)
    assert out[1].eq(0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decode_ignores_cache_beyond_lengths(backend):
    args = make_decode(4, 2)
    base = decode_attention(*args, backend=backend)
    q, kp, vp, plens, groups, kg, vg, slots, glens = args
    bad = float("nan") if backend == "triton" else 1e4  # the reference needs a finite cache
    kp2, vp2, kg2, vg2 = kp.clone(), vp.clone(), kg.clone(), vg.clone()
    for g, L in enumerate(plens.tolist()):
        kp2[g, L:], vp2[g, L:] = bad, bad
    for s, L in zip(slots.tolist(), glens.tolist()):
        kg2[s, L:], vg2[s, L:] = bad, bad
    kp2[3], vp2[3] = bad, bad  # group 3 and slot 4 are used by no row
    kg2[4], vg2[4] = bad, bad
    out = decode_attention(q, kp2, vp2, plens, groups, kg2, vg2, slots, glens, backend=backend)
    torch.testing.assert_close(out, base, atol=ATOL, rtol=0)


def test_decode_triton_bf16():
    args = make_decode(4, 2, dtype=torch.bfloat16)
    out = decode_attention(*args, backend="triton", num_splits=4)
    assert out.dtype == torch.bfloat16
    ref = decode_attention_ref(*(a.float() if a.is_floating_point() else a for a in args))
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=1e-2)


def test_decode_ref_bf16():
    """The CPU production path in bf16: fp32 softmax inside, close to fp32 math on the same inputs."""
    args = make_decode(4, 2, dtype=torch.bfloat16)
    out = decode_attention_ref(*args)
    assert out.dtype == torch.bfloat16
    ref = naive_decode(*(a.float() if a.is_floating_point() else a for a in args), 1 / math.sqrt(32))
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=1e-2)


def test_pick_num_splits():
    assert _pick_num_splits(B=64, Hkv=8, Tmax=4096) == 1  # 512 programs already fill the GPU
    assert _pick_num_splits(B=1, Hkv=2, Tmax=100) == 1  # too short to split
    n = _pick_num_splits(B=2, Hkv=2, Tmax=4096)
    assert n & (n - 1) == 0 and 1 < n <= 32


# ---------------------------------------------------------------------------------------------------- dispatch


def test_auto_on_cpu_uses_reference(monkeypatch):
    """Even under TRITON_INTERPRET=1, "auto" on CPU tensors must not launch the (interpreted) kernels."""
    def boom(*a, **kw):
        raise AssertionError("Triton path taken")

    # The package re-exports functions named like their modules, so reach the modules through importlib.
    monkeypatch.setattr(importlib.import_module("kernels.prefill_attention"), "_prefill_triton", boom)
    monkeypatch.setattr(importlib.import_module("kernels.decode_attention"), "_decode_triton", boom)
    q, k, v, sl = make_prefill(4, 2)
    torch.testing.assert_close(prefill_attention(q, k, v, sl), prefill_attention_ref(q, k, v, sl), atol=0, rtol=0)
    dargs = make_decode(4, 2)
    torch.testing.assert_close(decode_attention(*dargs), decode_attention_ref(*dargs), atol=0, rtol=0)
    with pytest.raises(AssertionError, match="Triton path"):
        prefill_attention(q, k, v, sl, backend="triton")
    with pytest.raises(AssertionError, match="Triton path"):
        decode_attention(*dargs, backend="triton")
    with pytest.raises(ValueError):
        prefill_attention(q, k, v, sl, backend="cuda")
    assert kernels.prefill_attention is prefill_attention and kernels.decode_attention is decode_attention
