"""Prefill attention: causal, grouped-query, over right-padded rows of ragged length.

`prefill_attention(q, k, v, seq_lens)` with q (B, T, H, D), k/v (B, T, Hkv, D) returns (B, T, H, D) in q's dtype.
Query head h reads kv head h // (H // Hkv). Row b holds seq_lens[b] valid tokens followed by padding; a valid query
attends to keys 0..t of its own row, and padded query rows (t >= seq_lens[b]) come out as zeros.

Two implementations with the same signature: a Triton flash-attention kernel (the GPU path) and a PyTorch SDPA
reference (the CPU path, and the oracle the kernel is tested against)."""
import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _prefill_block(q, acc, m_i, l_i, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, offs_m, start_n, hi,
                   qk_scale, MASK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                   NATIVE: tl.constexpr, DOT_PREC: tl.constexpr):
    """One key block of the online softmax. MASK=False: every key is valid and visible to every query (the blocks
    left of the diagonal): no masks at all, and no loads past the row's length."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_range = offs_n < hi
    k_ptrs = k_base + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd
    v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
    if MASK:
        k = tl.load(k_ptrs, mask=in_range[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
    if not NATIVE:
        k = k.to(tl.float32)
    # scale is folded with log2(e) so the softmax can use exp2 (a single MUFU op on GPU).
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if MASK:
        s = tl.where((offs_n[None, :] <= offs_m[:, None]) & in_range[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if MASK:
        v = tl.load(v_ptrs, mask=in_range[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    if not NATIVE:
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    Q, K, V, Out, SeqLens, qk_scale,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ob, stride_ot, stride_oh, stride_od,
    T,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    NATIVE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One program = one block of BLOCK_M queries of one head of one row. Flash-attention: stream key blocks,
    keep a running max m, running sum l and unnormalised output acc (online softmax), all in fp32.
    NATIVE: the dots take the input dtype (bf16 tensor cores, fp32 accumulation; the GPU path); otherwise the
    operands are upcast to fp32 first (the interpreter, whose bf16 dot is wrong, and fp32 inputs)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # int64 base offsets: B*T*H*D can pass 2**31 on long batches
    kvh = h // GROUP
    L = tl.load(SeqLens + b).to(tl.int32)

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    valid_m = offs_m < L

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=valid_m[:, None], other=0.0)
    if not NATIVE:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh

    # Finite initial max (not -inf): exp2(m_old - m_new) never sees (-inf) - (-inf) = nan, even for a query row
    # that has no valid key yet.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Keys this block can see: causality stops at the block's last query, and padding keys (>= L) are never read,
    # so garbage in the padded part of k/v cannot leak in. A block wholly inside the padding does no work at all.
    # Keys [0, start_m) are visible to all the block's queries and all valid (start_m < L): unmasked blocks. Then
    # the diagonal blocks [start_m, hi) with the causal and length masks.
    hi = tl.minimum(start_m + BLOCK_M, L)
    hi = tl.where(start_m < L, hi, 0)
    lo = tl.where(start_m < L, start_m, 0)
    for start_n in range(0, lo, BLOCK_N):
        acc, m_i, l_i = _prefill_block(q, acc, m_i, l_i, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                       offs_m, start_n, hi, qk_scale, False, BLOCK_N, HEAD_DIM, NATIVE, DOT_PREC)
    for start_n in range(lo, hi, BLOCK_N):
        acc, m_i, l_i = _prefill_block(q, acc, m_i, l_i, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                       offs_m, start_n, hi, qk_scale, True, BLOCK_N, HEAD_DIM, NATIVE, DOT_PREC)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out = tl.where(valid_m[:, None], out, 0.0)  # contract: padded query rows are zeros
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m < T)[:, None])


def _pick_blocks(D: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Measured on an H200, bf16, 16 rows of <= 2048 tokens
    (scripts/bench_kernels.py --sweep): 64x64 / 4 warps / 3 stages was the fastest of 7 configurations for both
    D = 64 and D = 128 (128x64 / 8 warps: 5% slower at D = 128, 10% at D = 64)."""
    return 64, 64, 4, 3


def _prefill_triton(q, k, v, seq_lens, scale, block_m=None, block_n=None, num_warps=None, num_stages=None):
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    assert D >= 16 and D & (D - 1) == 0, f"head_dim must be a power of two >= 16, got {D}"
    bm, bn, nw, ns = _pick_blocks(D)
    block_m, block_n = block_m or bm, block_n or bn
    assert block_m % block_n == 0, "the unmasked key blocks must end where the query block starts"
    out = torch.empty_like(q)
    # On GPU bf16/fp16 operands go to the tensor cores as they are (fp32 accumulation). fp32 inputs, and every
    # input in the interpreter (its bf16 dot is wrong), are upcast, with IEEE dots: tf32 would drop mantissa bits.
    native = q.is_cuda and q.dtype != torch.float32 and os.environ.get("TRITON_INTERPRET") != "1"
    grid = (triton.cdiv(T, block_m), H, B)
    _prefill_kernel[grid](
        q, k, v, out, seq_lens.to(q.device), scale * 1.4426950408889634,  # log2(e)
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), T,
        GROUP=H // Hkv, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=D, NATIVE=native, DOT_PREC="ieee",
        num_warps=num_warps or nw, num_stages=num_stages or ns,
    )
    return out


def prefill_attention_ref(q, k, v, seq_lens, scale=None):
    """PyTorch reference (and CPU production path), same contract as `prefill_attention`.

    Plain causal SDPA needs no padding mask: a valid query t < L only sees keys <= t, all valid. The padded query
    rows see padding keys and are then overwritten with zeros. Padding must be finite (a nan in a padded key or
    value poisons the SDPA sums of valid rows); the Triton kernel never reads it."""
    B, T, H, D = q.shape
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale,
        enable_gqa=H != k.shape[2],
    ).transpose(1, 2)
    valid = torch.arange(T, device=q.device)[None, :] < seq_lens.to(q.device)[:, None]  # (B, T)
    return torch.where(valid[:, :, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))


def prefill_attention(q, k, v, seq_lens, scale=None, backend="auto"):
    """Causal grouped-query attention over right-padded rows.

    q: (B, T, H, D); k, v: (B, T, Hkv, D) with H % Hkv == 0; seq_lens: (B,) int32/int64, valid tokens per row.
    Returns (B, T, H, D) in q's dtype; rows t >= seq_lens[b] are zeros. scale defaults to 1/sqrt(D).
    backend: "auto" (Triton for CUDA tensors, reference otherwise), "triton" or "torch"."""
    B, T, H, D = q.shape
    assert k.shape == v.shape == (B, T, k.shape[2], D) and H % k.shape[2] == 0, (q.shape, k.shape, v.shape)
    assert seq_lens.shape == (B,), seq_lens.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
    if backend == "torch":
        return prefill_attention_ref(q, k, v, seq_lens, scale)
    if backend == "triton":
        assert q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1", "Triton on CPU needs TRITON_INTERPRET=1"
        return _prefill_triton(q, k, v, seq_lens, scale)
    raise ValueError(f"unknown backend {backend!r}")
