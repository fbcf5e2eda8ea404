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


def naive_decode(q, k_cache, v_cache, slots, seq_lens, scale):
    """repeat_interleave the kv heads, explicit softmax over the row's valid keys."""
    B, H, D = q.shape
    group = H // k_cache.shape[2]
    out = torch.zeros_like(q)
    for b in range(B):
        L, s = int(seq_lens[b]), int(slots[b])
        kk = k_cache[s, :L].repeat_interleave(group, dim=1)  # (L, H, D)
        vv = v_cache[s, :L].repeat_interleave(group, dim=1)
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


def make_decode(H, Hkv, D=32, S=4, Tmax=320, slots=(3, 0, 2), seq_lens=(300, 1, 129), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = len(slots)
    q = torch.randn(B, H, D, generator=g).to(dtype)
    kc = torch.randn(S, Tmax, Hkv, D, generator=g).to(dtype)
    vc = torch.randn(S, Tmax, Hkv, D, generator=g).to(dtype)
    return q, kc, vc, torch.tensor(slots), torch.tensor(seq_lens, dtype=torch.int64)


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
@pytest.mark.parametrize("block", [16, 64])  # 16: several query and key blocks with a partial last one
def test_prefill_triton_matches_ref(H, Hkv, block):
    q, k, v, sl = make_prefill(H, Hkv)
    out = _prefill_triton(q, k, v, sl, 1 / math.sqrt(16), block_m=block, block_n=block)
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


@pytest.mark.parametrize("H,Hkv", HEADS)
def test_decode_ref_matches_naive(H, Hkv):
    q, kc, vc, slots, sl = make_decode(H, Hkv)
    scale = 0.3
    out = decode_attention_ref(q, kc, vc, slots, sl, scale)
    torch.testing.assert_close(out, naive_decode(q, kc, vc, slots, sl, scale), atol=ATOL, rtol=0)


def test_decode_ref_identity_slots_take_the_view_path():
    q, kc, vc, _, sl = make_decode(4, 2, slots=(0, 1, 2))
    slots = torch.arange(3)
    out = decode_attention_ref(q, kc, vc, slots, sl, 0.2)
    torch.testing.assert_close(out, naive_decode(q, kc, vc, slots, sl, 0.2), atol=ATOL, rtol=0)


@pytest.mark.parametrize("H,Hkv", HEADS)
@pytest.mark.parametrize("num_splits", [1, 4, None])  # 4 -> splits of 128 keys over Tmax=320, the last one empty
def test_decode_triton_matches_ref(H, Hkv, num_splits):
    q, kc, vc, slots, sl = make_decode(H, Hkv)
    out = decode_attention(q, kc, vc, slots, sl, backend="triton", num_splits=num_splits)
    torch.testing.assert_close(out, decode_attention_ref(q, kc, vc, slots, sl), atol=ATOL, rtol=0)


def test_decode_triton_small_blocks_and_zero_length_row():
    """Many key blocks per split (block_n=16), lengths off every block boundary, and a seq_len-0 row -> zeros."""
    q, kc, vc, slots, sl = make_decode(7, 1, D=16, Tmax=100, seq_lens=(99, 0, 17))
    out = _decode_triton(q, kc, vc, slots, sl, 0.25, num_splits=3, block_n=16)
    torch.testing.assert_close(out, naive_decode(q, kc, vc, slots, sl, 0.25), atol=ATOL, rtol=0)
    assert out[1].eq(0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decode_ignores_cache_beyond_seq_len(backend):
    q, kc, vc, slots, sl = make_decode(4, 2)
    base = decode_attention(q, kc, vc, slots, sl, backend=backend)
    bad = float("nan") if backend == "triton" else 1e4  # the SDPA reference needs a finite cache
    kc2, vc2 = kc.clone(), vc.clone()
    for s, L in zip(slots.tolist(), sl.tolist()):
        kc2[s, L:], vc2[s, L:] = bad, bad
    kc2[1], vc2[1] = bad, bad  # slot 1 is used by no row
    out = decode_attention(q, kc2, vc2, slots, sl, backend=backend)
    torch.testing.assert_close(out, base, atol=ATOL, rtol=0)


def test_decode_triton_bf16():
    q, kc, vc, slots, sl = make_decode(4, 2, dtype=torch.bfloat16)
    out = decode_attention(q, kc, vc, slots, sl, backend="triton", num_splits=4)
    assert out.dtype == torch.bfloat16
    ref = decode_attention_ref(q.float(), kc.float(), vc.float(), slots, sl)
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
    qd, kc, vc, slots, sld = make_decode(4, 2)
    torch.testing.assert_close(decode_attention(qd, kc, vc, slots, sld),
                               decode_attention_ref(qd, kc, vc, slots, sld), atol=0, rtol=0)
    with pytest.raises(AssertionError, match="Triton path"):
        prefill_attention(q, k, v, sl, backend="triton")
    with pytest.raises(AssertionError, match="Triton path"):
        decode_attention(qd, kc, vc, slots, sld, backend="triton")
    with pytest.raises(ValueError):
        prefill_attention(q, k, v, sl, backend="cuda")
    assert kernels.prefill_attention is prefill_attention and kernels.decode_attention is decode_attention
