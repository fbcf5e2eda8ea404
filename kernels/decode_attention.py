"""Decode attention over a two-segment KV cache: one new query token per row against its prompt group's shared
prompt K/V and its own generated-token K/V.

    decode_attention(q, k_prompt, v_prompt, prompt_lens, groups, k_gen, v_gen, slots, gen_lens)

q (B, H, D); k_prompt, v_prompt (G, Tp, Hkv, D): the prompt segment, stored once per prompt group and shared by every
row of the group; prompt_lens (G,): valid prompt keys of each group; groups (B,): the prompt group of each row;
k_gen, v_gen (S, Tg, Hkv, D): the generated segment, one slot per row; slots (B,): the slot of each row; gen_lens
(B,): valid generated keys of each row (the current token's key already written). Row b attends to keys
0..prompt_lens[groups[b]]-1 of k_prompt[groups[b]] followed by keys 0..gen_lens[b]-1 of k_gen[slots[b]], one softmax
over both. Query head h reads kv head h // (H // Hkv). Returns (B, H, D) in q's dtype; a row with no key at all
gets zeros.

Why two segments: the n samples of a prompt share its K/V. With one copy per row the prompt is read n times per
decode step, which dominated the step; here the reference stacks each group's rows into one query block and reads
the group's prompt K/V once, then attends each row to its own generated keys and merges the two partial softmaxes by
their log-sum-exps in fp32.

Two implementations with the same signature: a Triton split-K ("flash-decoding") kernel pair for the GPU and a
PyTorch reference (the CPU path, and the oracle the kernel is tested against)."""
import math
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _attend_range(q, acc, m_i, l_i, K, V, stride_kt, stride_kd, stride_vt, stride_vd, start, end, offset, qk_scale,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online softmax of q (BLOCK_G, D) over virtual key positions [start, end), stored at K/V row (pos - offset)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(start, end, BLOCK_N):
        cur_n = start_n + offs_n
        in_range = cur_n < end
        t = cur_n - offset
        k = tl.load(K + t[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                    mask=in_range[:, None], other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (BLOCK_G, BLOCK_N), log2 domain
        s = tl.where(in_range[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + t[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                    mask=in_range[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _decode_split_kernel(
    Q, KP, VP, PromptLens, Groups, KG, VG, Slots, GenLens, MidO, MidLse, qk_scale,
    stride_qb, stride_qh, stride_qd,
    stride_kpg, stride_kpt, stride_kph, stride_kpd,
    stride_vpg, stride_vpt, stride_vph, stride_vpd,
    stride_kgs, stride_kgt, stride_kgh, stride_kgd,
    stride_vgs, stride_vgt, stride_vgh, stride_vgd,
    split_size,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One program = one (row, kv head, split). The row's keys form one virtual sequence, its prompt (positions
    0..Lp-1, in its group's prompt segment) then its generated tokens (Lp..Lp+Lg-1, in its slot, stored at pos - Lp);
    the program streams virtual positions [split*split_size, min((split+1)*split_size, Lp+Lg)) with an online
    softmax, first the part in the prompt segment, then the part in the generated segment. All GROUP query heads
    sharing the kv head are handled together, so each K/V tile is read once per GQA group. Writes the normalised
    partial output and log2-sum-exp to fp32 scratch; `_decode_combine_kernel` merges the splits.
    (The n rows of a prompt group each read the group's prompt tiles; on a GPU those reads mostly hit L2.)"""
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    grp = tl.load(Groups + b).to(tl.int64)  # int64: index * stride can pass 2**31 on a large cache
    slot = tl.load(Slots + b).to(tl.int64)
    Lp = tl.load(PromptLens + grp).to(tl.int32)
    Lg = tl.load(GenLens + b).to(tl.int32)

    offs_g = tl.arange(0, BLOCK_G)  # GROUP padded up to BLOCK_G (>= 16, the smallest tl.dot tile)
    offs_d = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + offs_g
    g_mask = offs_g < GROUP
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=g_mask[:, None], other=0.0).to(tl.float32)

    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)  # finite: see prefill kernel
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)

    lo = split * split_size
    hi = tl.minimum(lo + split_size, Lp + Lg)  # a split past the row's length runs no iteration
    acc, m_i, l_i = _attend_range(q, acc, m_i, l_i, KP + grp * stride_kpg + kvh * stride_kph,
                                  VP + grp * stride_vpg + kvh * stride_vph, stride_kpt, stride_kpd, stride_vpt,
                                  stride_vpd, lo, tl.minimum(hi, Lp), 0, qk_scale, BLOCK_N, HEAD_DIM, DOT_PREC)
    acc, m_i, l_i = _attend_range(q, acc, m_i, l_i, KG + slot * stride_kgs + kvh * stride_kgh,
                                  VG + slot * stride_vgs + kvh * stride_vgh, stride_kgt, stride_kgd, stride_vgt,
                                  stride_vgd, tl.maximum(lo, Lp), hi, Lp, qk_scale, BLOCK_N, HEAD_DIM, DOT_PREC)

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
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty (no key): all weights 0, output 0, no nan
    w = tl.exp2(lse - m)
    denom = tl.sum(w, axis=0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d * stride_od, out.to(Out.dtype.element_ty))


def _pick_num_splits(B, Hkv, Tmax):
    """Split the sequence only as far as needed to fill the GPU (~512 programs, a few per SM) and keep >= 128 keys
    per split, where the partial-result traffic stays small next to the K/V reads. Based on the cache length Tmax,
    not the row lengths, so picking it never syncs with the GPU. Rounded down to a power of two to bound recompiles."""
    n = max(1, min(triton.cdiv(512, max(1, B * Hkv)), triton.cdiv(Tmax, 128), 64))
    return 1 << (n.bit_length() - 1)


def _decode_triton(q, k_prompt, v_prompt, prompt_lens, groups, k_gen, v_gen, slots, gen_lens, scale,
                   num_splits=None, block_n=64):
    B, H, D = q.shape
    Hkv = k_prompt.shape[2]
    assert D >= 16 and D & (D - 1) == 0, f"head_dim must be a power of two >= 16, got {D}"
    group = H // Hkv
    Tmax = k_prompt.shape[1] + k_gen.shape[1]  # the longest virtual sequence (prompt + generated)
    num_splits = num_splits or _pick_num_splits(B, Hkv, Tmax)
    # Each split covers a whole number of key blocks of the virtual sequence.
    split_size = triton.cdiv(triton.cdiv(Tmax, num_splits), block_n) * block_n
    mid_o = torch.empty(B, H, num_splits, D, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(B, H, num_splits, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    if B == 0:
        return out
    dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"  # see prefill: upcast operands, keep them exact
    dev = q.device
    _decode_split_kernel[(B, Hkv, num_splits)](
        q, k_prompt, v_prompt, prompt_lens.to(dev), groups.to(dev), k_gen, v_gen, slots.to(dev), gen_lens.to(dev),
        mid_o, mid_lse, scale * 1.4426950408889634,  # log2(e): softmax in exp2
        *q.stride(), *k_prompt.stride(), *v_prompt.stride(), *k_gen.stride(), *v_gen.stride(), split_size,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, HEAD_DIM=D,
        NUM_SPLITS=num_splits, DOT_PREC=dot_prec, num_warps=4, num_stages=2,
    )
    _decode_combine_kernel[(B, H)](
        mid_o, mid_lse, out, *out.stride(),
        NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits), HEAD_DIM=D, num_warps=1,
    )
    return out


# ----------------------------------------------------------------------------------------------------------------------
# PyTorch reference

# The CPU flash-attention op behind F.scaled_dot_product_attention, called directly because it also returns the
# log-sum-exp that merging two segments needs. Where it is missing (or on other devices) `_attend` does the math.
_cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _take(k_cache, v_cache, idx, T):
    """k_cache[idx, :T] and v_cache[idx, :T] as (N, Hkv, T, D): views when idx == arange(len(idx)), else
    index_select of just the first T positions."""
    n = idx.shape[0]
    if n <= k_cache.shape[0] and torch.equal(idx, torch.arange(n, device=idx.device, dtype=idx.dtype)):
        k, v = k_cache[:n, :T], v_cache[:n, :T]
    else:
        k, v = k_cache[:, :T].index_select(0, idx), v_cache[:, :T].index_select(0, idx)
    return k.transpose(1, 2), v.transpose(1, 2)


def _attend(q, k, v, lens, scale):
    """q (N, Hkv, M, D), k/v (N, Hkv, T, D), lens (N,): softmax attention of every query row of batch entry i over
    keys 0..lens[i]-1 -> (out (N, Hkv, M, D), finite, in q's dtype; lse (N, Hkv, M) fp32, -inf for an entry with no
    key). The keys past lens must be finite (allocate caches with torch.zeros)."""
    T = k.shape[2]
    if T == 0:
        return torch.zeros_like(q), torch.full(q.shape[:-1], float("-inf"), device=q.device)
    mask = None  # additive, in q's dtype (what the CPU flash op takes); None when every entry uses all T keys
    if not bool((lens == T).all()):
        hide = torch.arange(T, device=q.device) >= lens[:, None]
        mask = torch.zeros(hide.shape, dtype=q.dtype, device=q.device).masked_fill_(hide, float("-inf"))[:, None, None]
    if _cpu_flash is not None and q.device.type == "cpu":
        o, lse = _cpu_flash(q, k, v, attn_mask=mask, scale=scale)  # fp32 softmax inside; no key: o = 0, lse = 0
    else:
        s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
        if mask is not None:
            s = s + mask.float()
        lse = torch.logsumexp(s, -1)
        o = torch.matmul(torch.exp(s - lse[..., None]), v.float()).nan_to_num_(0.0).to(q.dtype)  # no key: nan -> 0
    return o, lse.masked_fill_((lens == 0)[:, None, None], float("-inf"))


def decode_attention_ref(q, k_prompt, v_prompt, prompt_lens, groups, k_gen, v_gen, slots, gen_lens, scale=None):
    """PyTorch reference (and CPU production path), same contract as `decode_attention`.

    Prompt segment: the rows are packed by group, (Gu groups in use, Hkv, R * H/Hkv, D) with R the most rows of one
    group (missing rows are zero queries), so each group's prompt K/V is read once for all its rows and GQA heads.
    Generated segment: each row's query heads against its own slot, (B, Hkv, H/Hkv, D). Each part gives an output and
    a log-sum-exp in fp32; they are merged by their log-sum-exps in fp32. Slots / groups equal to arange read the caches through
    views, others through index_select of the first max(lens) positions. Masked cache positions must be finite."""
    B, H, D = q.shape
    Hkv = k_prompt.shape[2]
    rep = H // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if B == 0:
        return torch.empty_like(q)
    dev = k_prompt.device
    groups, slots, prompt_lens, gen_lens = groups.to(dev), slots.to(dev), prompt_lens.to(dev), gen_lens.to(dev)
    q4 = q.reshape(B, Hkv, rep, D)

    # prompt segment: row b is query block rank[b] of packed group inv[b]
    used, inv, counts = torch.unique(groups, return_inverse=True, return_counts=True)  # sorted
    R = int(counts.max())
    if R == 1:  # one row per group: no packing, the rows keep their order
        used, qp = groups, q4
    else:
        order = torch.argsort(inv, stable=True)
        rank = torch.empty_like(inv)
        rank[order] = torch.arange(B, device=dev) - (counts.cumsum(0) - counts)[inv[order]]
        qp = q.new_zeros(len(used), R, Hkv, rep, D)
        qp[inv, rank] = q4
        qp = qp.transpose(1, 2).reshape(len(used), Hkv, R * rep, D)
    plens = prompt_lens[used]
    Tp = int(plens.max())
    o_p, lse_p = _attend(qp, *_take(k_prompt, v_prompt, used, Tp), plens, scale)
    if R > 1:
        o_p = o_p.reshape(len(used), Hkv, R, rep, D).transpose(1, 2)[inv, rank]  # (B, Hkv, rep, D)
        lse_p = lse_p.reshape(len(used), Hkv, R, rep).transpose(1, 2)[inv, rank]  # (B, Hkv, rep)

    # generated segment: each row against its own slot
    Tg = int(gen_lens.max())
    o_g, lse_g = _attend(q4, *_take(k_gen, v_gen, slots, Tg), gen_lens, scale)

    # merge in fp32: weights exp(lse_p - lse), exp(lse_g - lse) with lse = logaddexp(lse_p, lse_g), i.e. the
    # generated part's weight is sigmoid(lse_g - lse_p) (nan when neither part has a key: weight 0, output 0)
    w_g = torch.sigmoid(lse_g - lse_p).nan_to_num_(0.0)[..., None]
    return torch.lerp(o_p.float(), o_g.float(), w_g).reshape(B, H, D).to(q.dtype)


def decode_attention(q, k_prompt, v_prompt, prompt_lens, groups, k_gen, v_gen, slots, gen_lens, scale=None,
                     backend="auto", *, num_splits=None):
    """Grouped-query attention of one new token per row over a two-segment KV cache (see the module docstring).

    q: (B, H, D); k_prompt, v_prompt: (G, Tp, Hkv, D), one layer's prompt segment; prompt_lens: (G,) int;
    groups: (B,) int, prompt group of each row; k_gen, v_gen: (S, Tg, Hkv, D), one layer's generated segment;
    slots: (B,) int, slot of each row; gen_lens: (B,) int, valid generated keys of each row (may be 0).
    H % Hkv == 0. Returns (B, H, D) in q's dtype. scale defaults to 1/sqrt(D).
    backend: "auto" (Triton for CUDA tensors, reference otherwise), "triton" or "torch".
    num_splits: Triton only, number of chunks of the (prompt + generated) sequence processed in parallel
    (default: a heuristic)."""
    B, H, D = q.shape
    G, _, Hkv, _ = k_prompt.shape
    assert k_prompt.shape == v_prompt.shape and k_gen.shape == v_gen.shape, (k_prompt.shape, k_gen.shape)
    assert k_prompt.shape[2:] == k_gen.shape[2:] == (Hkv, D) and H % Hkv == 0, (q.shape, k_prompt.shape, k_gen.shape)
    assert groups.shape == slots.shape == gen_lens.shape == (B,) and prompt_lens.shape == (G,), \
        (groups.shape, slots.shape, gen_lens.shape, prompt_lens.shape)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
    args = (q, k_prompt, v_prompt, prompt_lens, groups, k_gen, v_gen, slots, gen_lens, scale)
    if backend == "torch":
        return decode_attention_ref(*args)
    if backend == "triton":
        assert q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1", "Triton on CPU needs TRITON_INTERPRET=1"
        return _decode_triton(*args, num_splits)
    raise ValueError(f"unknown backend {backend!r}")
