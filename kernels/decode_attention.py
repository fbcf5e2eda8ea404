"""Decode attention: one new query token per sequence against that sequence's slot of a KV cache.

`decode_attention(q, k_cache, v_cache, slots, seq_lens)` with q (B, H, D), caches (S, Tmax, Hkv, D) returns
(B, H, D) in q's dtype. Row b attends to keys 0..seq_lens[b]-1 of cache slot slots[b]; query head h reads kv head
h // (H // Hkv).

Two implementations with the same signature: a Triton split-K ("flash-decoding") kernel pair for the GPU and a
PyTorch SDPA reference (the CPU path, and the oracle the kernels are tested against)."""
import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _decode_split_kernel(
    Q, K, V, Slots, SeqLens, MidO, MidLse, qk_scale,
    stride_qb, stride_qh, stride_qd,
    stride_ks, stride_kt, stride_kh, stride_kd,
    stride_vs, stride_vt, stride_vh, stride_vd,
    split_size,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One program = one (row, kv head, split). All GROUP query heads sharing the kv head are handled together, so
    each K/V tile is read from memory once per group, not once per query head (decode is bandwidth-bound). The
    program streams keys [split*split_size, min((split+1)*split_size, L)) with an online softmax and writes its
    normalised partial output and log2-sum-exp to fp32 scratch; `_decode_combine_kernel` merges the splits."""
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    slot = tl.load(Slots + b).to(tl.int64)  # int64: slot * stride_ks can pass 2**31 on a large cache
    L = tl.load(SeqLens + b).to(tl.int32)

    offs_g = tl.arange(0, BLOCK_G)  # GROUP padded up to BLOCK_G (>= 16, the smallest tl.dot tile)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + offs_g
    g_mask = offs_g < GROUP

    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=g_mask[:, None], other=0.0).to(tl.float32)
    k_base = K + slot * stride_ks + kvh * stride_kh
    v_base = V + slot * stride_vs + kvh * stride_vh

    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)  # finite: see prefill kernel
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)

    lo = split * split_size
    hi = tl.minimum(lo + split_size, L)  # a split past the row's length runs no iteration
    for start_n in range(lo, hi, BLOCK_N):
        cur_n = start_n + offs_n
        in_range = cur_n < hi
        k = tl.load(k_base + cur_n[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                    mask=in_range[:, None], other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (BLOCK_G, BLOCK_N), log2 domain
        s = tl.where(in_range[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cur_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                    mask=in_range[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PREC)
        m_i = m_new

    # An empty split (past the row's length) stores lse = -inf and o = 0, i.e. weight 0 in the combine.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
    o = acc / l_safe[:, None]
    mid = (b * tl.num_programs(1) * GROUP + heads) * NUM_SPLITS + split  # MidLse is contiguous (B, H, NUM_SPLITS)
    tl.store(MidLse + mid, lse, mask=g_mask)
    tl.store(MidO + mid[:, None] * HEAD_DIM + offs_d[None, :], o, mask=g_mask[:, None])


@triton.jit
def _decode_combine_kernel(MidO, MidLse, Out, stride_ob, stride_oh, stride_od,
                           NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One program = one (row, query head): out = sum_s 2^(lse_s - M) * o_s / sum_s 2^(lse_s - M), M = max lse."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_mask = offs_s < NUM_SPLITS
    mid = (b * tl.num_programs(1) + h) * NUM_SPLITS + offs_s
    lse = tl.load(MidLse + mid, mask=s_mask, other=float("-inf"))
    o = tl.load(MidO + mid[:, None] * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None], other=0.0)
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty (seq_len 0): all weights 0, output 0, no nan
    w = tl.exp2(lse - m)
    denom = tl.sum(w, axis=0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d * stride_od, out.to(Out.dtype.element_ty))


def _pick_num_splits(B, Hkv, Tmax):
    """Split the sequence only as far as needed to fill the GPU (~512 programs, a few per SM) and keep >= 128 keys
    per split, where the partial-result traffic stays small next to the K/V reads. Based on the cache length Tmax,
    not max(seq_lens), so picking it never syncs with the GPU. Rounded down to a power of two to bound recompiles."""
    n = max(1, min(triton.cdiv(512, max(1, B * Hkv)), triton.cdiv(Tmax, 128), 64))
    return 1 << (n.bit_length() - 1)


def _decode_triton(q, k_cache, v_cache, slots, seq_lens, scale, num_splits=None, block_n=64):
    B, H, D = q.shape
    S, Tmax, Hkv, _ = k_cache.shape
    assert D >= 16 and D & (D - 1) == 0, f"head_dim must be a power of two >= 16, got {D}"
    group = H // Hkv
    num_splits = num_splits or _pick_num_splits(B, Hkv, Tmax)
    # Each split covers a whole number of key blocks, so only a row's last block is partial.
    split_size = triton.cdiv(triton.cdiv(Tmax, num_splits), block_n) * block_n
    mid_o = torch.empty(B, H, num_splits, D, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(B, H, num_splits, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"  # see prefill: upcast operands, keep them exact
    _decode_split_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, slots.to(q.device), seq_lens.to(q.device), mid_o, mid_lse,
        scale * 1.4426950408889634,  # log2(e): softmax in exp2
        *q.stride(), *k_cache.stride(), *v_cache.stride(), split_size,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, HEAD_DIM=D,
        NUM_SPLITS=num_splits, DOT_PREC=dot_prec, num_warps=4, num_stages=2,
    )
    _decode_combine_kernel[(B, H)](
        mid_o, mid_lse, out, *out.stride(),
        NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits), HEAD_DIM=D, num_warps=1,
    )
    return out


def decode_attention_ref(q, k_cache, v_cache, slots, seq_lens, scale=None):
    """PyTorch reference (and CPU production path), same contract as `decode_attention`.

    Reads only the first max(seq_lens) positions of each slot: a slice view when slots == arange(B) (the common
    case of one sequence per slot), otherwise index_select of just those positions (much faster on CPU than
    advanced indexing). GQA is packed like the kernel: the group's query heads become G query rows against their
    single kv head, (B, Hkv, G, D) x (B, Hkv, L, D), so no kv head is ever repeated. A boolean key mask hides each
    row's positions >= seq_lens[b]. A row with seq_len 0 (not a valid call) returns zeros instead of nan.
    The masked positions must hold finite values (a nan there poisons the SDPA sums), so allocate caches with
    torch.zeros, not torch.empty; the Triton kernel never reads them."""
    B, H, D = q.shape
    Hkv = k_cache.shape[2]
    maxlen = int(seq_lens.max()) if B > 0 else 0
    slots = slots.to(k_cache.device)
    if B <= k_cache.shape[0] and torch.equal(slots, torch.arange(B, device=slots.device, dtype=slots.dtype)):
        k, v = k_cache[:B, :maxlen], v_cache[:B, :maxlen]
    else:
        k, v = k_cache[:, :maxlen].index_select(0, slots), v_cache[:, :maxlen].index_select(0, slots)
    valid = torch.arange(maxlen, device=q.device)[None, :] < seq_lens.to(q.device)[:, None]  # (B, maxlen)
    out = F.scaled_dot_product_attention(
        q.reshape(B, Hkv, H // Hkv, D), k.transpose(1, 2), v.transpose(1, 2), attn_mask=valid[:, None, None, :],
        scale=scale,
    ).reshape(B, H, D)
    has_keys = (seq_lens.to(q.device) > 0)[:, None, None]
    return torch.where(has_keys, out, torch.zeros((), dtype=out.dtype, device=out.device))


def decode_attention(q, k_cache, v_cache, slots, seq_lens, scale=None, backend="auto", *, num_splits=None):
    """Grouped-query attention of one new token per sequence over a KV cache.

    q: (B, H, D); k_cache, v_cache: (S, Tmax, Hkv, D), one layer's cache, H % Hkv == 0; slots: (B,) int, cache slot
    of each row; seq_lens: (B,) int, valid keys of each row (positions 0..seq_lens-1, the current token's key
    already written). Returns (B, H, D) in q's dtype. scale defaults to 1/sqrt(D).
    backend: "auto" (Triton for CUDA tensors, reference otherwise), "triton" or "torch".
    num_splits: Triton only, number of sequence chunks processed in parallel (default: a heuristic)."""
    B, H, D = q.shape
    assert k_cache.shape == v_cache.shape and k_cache.shape[3] == D and H % k_cache.shape[2] == 0, \
        (q.shape, k_cache.shape, v_cache.shape)
    assert slots.shape == seq_lens.shape == (B,), (slots.shape, seq_lens.shape)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
    if backend == "torch":
        return decode_attention_ref(q, k_cache, v_cache, slots, seq_lens, scale)
    if backend == "triton":
        assert q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1", "Triton on CPU needs TRITON_INTERPRET=1"
        return _decode_triton(q, k_cache, v_cache, slots, seq_lens, scale, num_splits)
    raise ValueError(f"unknown backend {backend!r}")
