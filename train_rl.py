"""GRPO with the authors' reward on FSDP2 (Cell-o1's second stage), hand-written, resumable, same launch as SFT.

    python train_rl.py --model runs/sft/model                  # the tiny SFT model on embedded PBMC puzzles (CPU)
    torchrun --nproc_per_node 8 train_rl.py --model runs/sft/model --data ncbi/CellPuzzles --out runs/rl

One step (`grpo_step`), top to bottom:
  1. prompts: step s uses prompts s*P .. s*P+P-1 of the run (P = --prompts-per-step); prompt i is a pure function
     of (seed, i) (a fresh embedded puzzle, or a file row in a seeded per-epoch order, epochs wrapping forever), so
     resuming needs only the step. Rank r takes a contiguous share; the n samples of a prompt (its group) stay there;
  2. rollouts: the trained weights are copied into a plain inference model every step (`sync_weights`: no stale
     copy) and `Sampler` draws n samples per prompt at --temperature. One generate call covers the prompts of one
     --rollout-chunk and is seeded from (seed, step, its first prompt), so the samples are the same for any number of
     ranks whose share is a multiple of the chunk. A completion ends at the first of any stop id, which stays in it;
  3. rewards: `reward.score` of the decoded text (special tokens skipped) against the gold answer;
  4. advantages (`group_advantages`): (r - mean_group) / (std_group + 1e-6), unbiased std as verl, or r - mean_group
     (Dr. GRPO, --no-adv-std-norm); a group whose rewards are all equal gets exactly 0, and is left out of the loss
     with --drop-equal-groups (DAPO's dynamic sampling, without refilling);
  5. loss per completion token (`token_loss`): -min(ratio A, clip(ratio, 1-low, 1+high) A) + kl_coef KL(pi||ref)
     - entropy_coef H(pi), ratio = pi / pi_old, aggregated over the global mini-batch
     (`aggregate`); the rollout batch is split into --mini-batches, each one optimizer step, for --ppo-epochs.
Facts this file implements:
  - trainer log-probs are log_softmax(logits / T) at the sampling temperature (scoring at T = 1 while sampling at
    T = 0.7 was a bug TRL and verl shipped), computed only at completion positions (`logits_at`) and in row chunks,
    so no (tokens x vocab) log_softmax of a whole batch exists at once (`token_logprobs_and_entropy`);
  - the stop token is in the loss with the rest of the completion: the model must learn to stop. Nothing after the
    first stop id is ever trained on (`trim_at_stop`); the loss mask comes from lengths, never from a pad id;
  - pi_old is the trainer's own log-prob before any update of the step: a no-grad pass when there is more than one
    update per rollout batch, else the detached log-prob of the loss pass itself. Either way the first update's
    ratio is 1 (on policy); the sampler's log-probs serve only for the logged sampler-trainer gap;
  - token-mean / seq-mean / constant normalisers count the *global* mini-batch (all micro-batches, all ranks,
    counted by all_reduce first), and FSDP2's gradient average is undone by x world: 1 micro-batch == k
    micro-batches, 1 rank == N ranks. Mini-batch m holds the groups g with g % M == m, whatever the rank count;
  - the reference model (the frozen start model) exists only when --kl-coef > 0;
  - a non-finite loss or gradient norm skips the optimizer step; --max-bad-steps bad steps in a row stop the run;
    a checkpoint is never written from non-finite weights.
The recipes (RECIPE; train_common.pick_recipe chooses the column): `paper` = the published recipe for a real model:
n 5, 64 prompts per step, T 1.0, lr 1e-6 constant, clip 0.2, k3 KL coefficient 0.001, entropy 0, token-mean, one
optimizer step per rollout batch, 3000 new tokens; `tiny` (the CPU default): 16 prompts x n 8, lr 5e-5, no KL, 512
new tokens, half of the prompt cells made new (--new-cells 0.5).
"""
from __future__ import annotations

import argparse
import gc
import importlib
import math
import os
import runpy
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import data
import reward
from model import compiled, encode_chat, fp32_or_wider, load_tokenizer, stop_token_ids
from sampler import pad64
from train_common import (CpuThreads, Evaluator, Log, Rollout, all_reduce, autocast, build_model, check_data,
                          check_resume, eval_puzzles, eval_source, generate_rollouts, guarded, infer_dtype,
                          inference_copy, init_distributed, load_checkpoint, load_rows, local, lr_at, messages,
                          model_card, note_compiled, parse_run_args, prepare_run_dir, publish_model, reduced, run_flags,
                          save_checkpoint, shard, sync_weights, system_turn, tokenizer_source, world_size)

# The recipes: flag -> (tiny, paper).
RECIPE = {"prompts_per_step": (16, 64), "n": (8, 5), "max_new_tokens": (512, 3000), "kl_coef": (0.0, 1e-3),
          "micro_batch": (16, 2), "lr": (5e-5, 1e-6), "eval_every": (25, 100), "eval_puzzles": (20, 200),
          "eval_max_new_tokens": (512, 3500), "save_every": (25, 100), "warmup": (0, 0),
          "schedule": ("constant", "constant"), "weight_decay": (0.01, 0.01),  # verl's actor: constant lr, decay 0.01
          "new_cells": (0.5, 0.0),  # tiny: GRPO's 147 cells made new as SFT's are, else the policy learns them by heart
          "compile": (False, False)}
# The flags that define the run's prompts, samples and rewards: a resumed run must keep them.
DATA_FLAGS = ("seed", "data", "split", "prompts", "new_cells", "prompts_per_step", "n", "temperature",
              "max_new_tokens", "reward_mode", "reward_fn")
RL_STREAM = (1,)  # the key of the embedded prompt stream: RL prompt i is not SFT example i of the same --seed


# ----------------------------------------------------------------------------------------------------------------------
# The math, as small pure functions

def group_advantages(rewards: torch.Tensor, std_norm: bool = True, eps: float = 1e-6):
    """rewards (G, n) -> (advantages (G, n) fp32, equal (G,) bool). A group whose rewards are all equal (to 1e-6, or
    n == 1) gets exactly 0: r - mean is not exactly 0 in floating point, and a tiny std would blow it up."""
    r = rewards.double()
    equal = (r.amax(1) - r.amin(1)) <= 1e-6 if r.shape[1] > 1 else torch.ones(len(r), dtype=torch.bool)
    adv = r - r.mean(1, keepdim=True)
    if std_norm and r.shape[1] > 1:
        adv = adv / (r.std(1, keepdim=True) + eps)  # unbiased std, as verl's GRPO
    return torch.where(equal[:, None], 0.0, adv).float(), equal


def policy_loss(logp, old_logp, adv, clip_low: float, clip_high: float):
    """PPO's clipped surrogate per token: -min(ratio A, clip(ratio, 1 - low, 1 + high) A) (DAPO's clip-higher when
    high > low). -> (loss, ratio, clipped mask)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    return loss, ratio.detach(), (clipped > unclipped).detach()


def kl_k3(logp, ref_logp):
    """Per-token estimate of KL(pi || ref) on tokens sampled from pi: k3 = exp(ref - logp) - (ref - logp) - 1 (>= 0,
    low variance; verl's low_var_kl, clamped as there; as a loss its expected gradient is that of KL(ref || pi)).
    Not k1 = logp - ref: unbiased as an estimate, but as a loss its expected gradient is 0."""
    d = (ref_logp - logp).clamp(-20, 20)
    return (d.exp() - d - 1).clamp(-10, 10)


def token_loss(logp, old_logp, adv, args, ref_logp=None, entropy=None):
    """The per-token loss of the module docstring. -> (loss, ratio, clipped, kl or None)."""
    loss, ratio, clipped = policy_loss(logp, old_logp, adv, args.clip_low, args.clip_high)
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else None
    if args.kl_coef:
        loss = loss + args.kl_coef * kl
    if args.entropy_coef:
        loss = loss - args.entropy_coef * entropy
    return loss, ratio, clipped, kl


def aggregate(values, seq_len, mode: str, n_tokens: float, n_seqs: float, constant: float | None = None):
    """Sum of per-token `values` with weights that make the loss of the whole mini-batch: token-mean 1 / n_tokens;
    seq-mean 1 / (own sequence length * n_seqs) (mean within a sequence, then over sequences); constant 1 / constant
    (Dr. GRPO; default n_seqs * max_new_tokens, set by the caller). seq_len 0 marks filler positions (weight 0).
    n_tokens and n_seqs count the global mini-batch, so splitting it into micro-batches or ranks changes nothing."""
    if mode == "token-mean":
        w = torch.full_like(values, 1.0 / n_tokens)
    elif mode == "seq-mean":
        w = 1.0 / (seq_len.clamp(min=1) * n_seqs)
    elif mode == "constant":
        w = torch.full_like(values, 1.0 / constant)
    else:
        raise ValueError(f"unknown --loss-agg {mode!r}")
    return (values * torch.where(seq_len > 0, w, 0.0)).sum()


def _logprob_entropy(logits, targets, temperature: float):
    z = fp32_or_wider(logits) / temperature
    lse = torch.logsumexp(z, -1)
    logp = z.gather(-1, targets[:, None])[:, 0] - lse
    entropy = lse - (torch.softmax(z, -1) * z).sum(-1)
    return logp, entropy


def token_logprobs_and_entropy(logits, targets, temperature: float, chunk: int = 512, fused: bool = False):
    """logits (K, V) -> (log_softmax(logits / T)[targets] (K,), entropy of softmax(logits / T) (K,)), fp32, `chunk`
    rows at a time. With gradients each chunk is checkpointed: backward keeps only the logits and recomputes the
    chunk's fp32 softmax, so a 152k vocabulary costs one chunk of fp32 at a time, never K x V of it. `fused`
    (--compile): each chunk's softmax work is one torch.compile'd pass."""
    f = compiled(_logprob_entropy) if fused else _logprob_entropy
    grad = torch.is_grad_enabled() and logits.requires_grad
    parts = [checkpoint(f, logits[i:i + chunk], targets[i:i + chunk], temperature, use_reentrant=False)
             if grad else f(logits[i:i + chunk], targets[i:i + chunk], temperature)
             for i in range(0, len(targets), chunk)] or [f(logits, targets, temperature)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# ----------------------------------------------------------------------------------------------------------------------
# Rollouts and micro-batches

@dataclass
class Micro:
    """One packed row of rollouts for `model(x, positions=pos, prefix_groups=segments)`: the rollouts of one prompt
    that sit next to each other share one copy of it, a segment (P, n, C) (see model.shared_prefix_attention), so a
    group of n samples costs P + n C tokens instead of n (P + C). The per-token tensors (K,) follow `at`, the row
    positions whose logits predict a completion token (plus fillers with seq_len 0, see `pack_rollouts`)."""
    x: torch.Tensor           # (1, T) token ids
    pos: torch.Tensor         # (1, T) positions: a prompt from 0, each of its completions from P
    segments: list            # [(P, n, C)], covering T
    at: torch.Tensor          # (K,) the position whose logits predict each token
    targets: torch.Tensor     # (K,) the completion token
    seq_len: torch.Tensor     # (K,) completion length of the token's rollout; 0: filler (weight 0)
    adv: torch.Tensor         # (K,)
    sampler_lp: torch.Tensor  # (K,)
    row: torch.Tensor         # (K,) index of the token's rollout in the packed list; -1: filler
    old: torch.Tensor | None = None
    ref: torch.Tensor | None = None


def pack_rollouts(rows: list[Rollout], device, dummy: bool = False) -> Micro:
    """Pack rollouts into one row; runs of the same group become one segment (completions right-padded to the run's
    longest). T and K are rounded up to multiples of 64 with `pad64` (a filler segment, filler tokens), as
    train_sft.pack: on CPU oneDNN caches a kernel per matmul shape. `dummy`: an all-filler micro-batch for a rank
    with fewer micro-batches than another (FSDP2 needs every rank to run the same forwards and backwards)."""
    ids, pos, segments, at, tok = [], [], [], [], {"targets": [], "seq_len": [], "adv": [], "sampler_lp": [], "row": []}
    b = 0
    while b < len(rows):
        e = b + 1
        while e < len(rows) and rows[e].group == rows[b].group:
            e += 1
        P, C, start = len(rows[b].prompt), max(len(r.tokens) for r in rows[b:e]), len(ids)
        ids += rows[b].prompt
        pos += range(P)
        for i, r in enumerate(rows[b:e]):
            c, L = start + P + i * C, len(r.tokens)  # where completion i starts in the row, its length
            ids += r.tokens + [0] * (C - L)
            pos += range(P, P + C)
            at += [start + P - 1] + list(range(c, c + L - 1))  # the prompt's last token predicts the first
            for k, v in (("targets", r.tokens), ("seq_len", [0 if dummy else L] * L), ("adv", [r.advantage] * L),
                         ("sampler_lp", r.logprobs), ("row", [b + i] * L)):
                tok[k] += v
        segments.append((P, e - b, C))
        b = e
    if pad64(len(ids)) > len(ids):
        filler = pad64(len(ids)) - len(ids)
        segments.append((filler, 0, 0))
        ids, pos = ids + [0] * filler, pos + list(range(filler))
    filler = pad64(len(at)) - len(at)
    at += [0] * filler
    for k, v in (("targets", 0), ("seq_len", 0), ("adv", 0.0), ("sampler_lp", 0.0), ("row", -1)):
        tok[k] += [v] * filler
    t = {k: torch.tensor(v, dtype=torch.long if k in ("targets", "row") else torch.float32).to(device)
         for k, v in tok.items()}
    return Micro(torch.tensor([ids], device=device), torch.tensor([pos], device=device), segments,
                 torch.tensor(at, device=device), **t)


def micro_logits(model, m: Micro):
    """Logits (K, vocab) at the positions `m.at` only (lm_head nowhere else)."""
    return model(m.x, logits_at=(torch.zeros_like(m.at), m.at), positions=m.pos, prefix_groups=m.segments)


def micro_logprobs(model, m: Micro, args):
    """Trainer log-probs and entropies (K,) of a micro-batch at the sampling temperature."""
    with autocast(m.x.device, args.precision):
        logits = micro_logits(model, m)
    return token_logprobs_and_entropy(logits, m.targets, args.temperature, args.logprob_chunk, args.compile)


def finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # an empty min / max (no token) is logged as null


class Meter:
    """Sums, minima and maxima over tokens / rows, reduced over ranks in three all_reduces. The key lists are fixed
    so every rank reduces the same vectors, even one that saw no token."""
    SUMS = ("tokens", "ratio", "clipped", "kl", "entropy", "gap", "gap_tokens")
    MINS = ("ratio_min",)
    MAXS = ("ratio_max", "gap_max")

    def __init__(self):
        self.v = {k: 0.0 for k in self.SUMS} | {k: math.inf for k in self.MINS} | {k: -math.inf for k in self.MAXS}

    def add(self, **kw):
        for k, x in kw.items():
            x = float(x)
            self.v[k] = min(self.v[k], x) if k in self.MINS else max(self.v[k], x) if k in self.MAXS else self.v[k] + x

    def reduce(self, device) -> dict:
        out = {}
        for keys, op in ((self.SUMS, "SUM"), (self.MINS, "MIN"), (self.MAXS, "MAX")):
            out.update(reduced({k: self.v[k] for k in keys}, device, op))
        return out


# ----------------------------------------------------------------------------------------------------------------------
# One GRPO step

@torch.no_grad()
def adam_update_ratio(optim: torch.optim.AdamW, device) -> float:
    """||the last AdamW update|| / ||weights|| over all parameters and ranks, recomputed from the optimizer state
    (lr * m_hat / (sqrt(v_hat) + eps), as torch applies it; weight decay's small share left out): how far one step
    moves the model, with no copy of the weights. 0 for an optimizer without Adam's state (the tests' SGD)."""
    sq = torch.zeros(2, dtype=torch.float64, device=device)
    for g in optim.param_groups:
        if "betas" not in g:
            continue
        (b1, b2), lr, eps = g["betas"], g["lr"], g["eps"]
        for p in g["params"]:
            st = optim.state.get(p)
            if not st:
                continue
            t = float(st["step"])
            m, v = local(st["exp_avg"]).double(), local(st["exp_avg_sq"]).double()
            u = lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
            sq += torch.stack([u.pow(2).sum(), local(p).double().pow(2).sum()])
    sq = all_reduce(sq).tolist()
    return math.sqrt(sq[0] / max(sq[1], 1e-30))


def minibatch_backward(model, micros: list[Micro], args, n_tokens: float, n_seqs: float, meter: Meter,
                       first_epoch: bool, poison: bool = False) -> float:
    """Forward + backward of every micro-batch of one mini-batch; returns this rank's share of the loss."""
    world, total = world_size(), 0.0
    constant = args.loss_constant or n_seqs * args.max_new_tokens
    for m in micros:
        logp, entropy = micro_logprobs(model, m, args)
        old = m.old if m.old is not None else logp.detach()  # one update per batch: pi_old is the current policy
        per_token, ratio, clipped, kl = token_loss(logp, old, m.adv, args, m.ref, entropy)
        loss = aggregate(per_token, m.seq_len, args.loss_agg, n_tokens, n_seqs, constant)
        if poison:  # --inject-nan: a test of the skip logic
            loss = loss * float("nan")
        (loss * world).backward()  # FSDP2 averages gradients over ranks; x world makes it the global sum
        total += loss.item()
        v = m.seq_len > 0
        if not v.any():
            continue
        meter.add(tokens=v.sum(), ratio=ratio[v].sum(), clipped=clipped[v].sum(), entropy=entropy.detach()[v].sum(),
                  ratio_min=ratio[v].min(), ratio_max=ratio[v].max(), kl=kl.detach()[v].sum() if kl is not None else 0)
        if first_epoch:  # the sampler-trainer gap, each token once
            gap = (old - m.sampler_lp)[v].abs()
            meter.add(gap=gap.sum(), gap_tokens=v.sum(), gap_max=gap.max())
    return total


def minibatches(kept: list[Rollout], args, device) -> tuple[list[list[Micro]], list[float], list[float]]:
    """Mini-batch m = the groups g with g % M == m (the same split for any rank count), in micro-batches of
    --micro-batch rollouts with a group's side by side (its prompt computed once per micro-batch) and similar lengths
    together; every rank gets as many micro-batches as the busiest (all-filler ones). -> (minis, completion tokens
    and sequences of each *global* mini-batch: the loss normalisers)."""
    M = args.mini_batches
    minis = []
    for m in range(M):
        rows = [r for r in kept if r.group % M == m]
        longest = {}  # group -> its longest sequence: groups of similar lengths share micro-batches
        for r in rows:
            longest[r.group] = max(longest.get(r.group, 0), len(r.prompt) + len(r.tokens))
        rows.sort(key=lambda r: (longest[r.group], r.group, len(r.tokens)))  # a group's rollouts stay side by side
        k = args.micro_batch
        minis.append([pack_rollouts(rows[j:j + k], device) for j in range(0, len(rows), k)])
    n_micro = all_reduce(torch.tensor([len(x) for x in minis], device=device), "MAX").tolist()
    dummy = Rollout(-1, [0], [0], [0.0], False)
    for x, k in zip(minis, n_micro):
        x += [pack_rollouts([dummy], device, dummy=True) for _ in range(k - len(x))]
    counts = all_reduce(torch.tensor([[sum(float((m.seq_len > 0).sum()) for m in x) for x in minis],
                                      [sum(r.group % M == m for r in kept) for m in range(M)]],
                                     dtype=torch.float64, device=device))
    tokens, seqs = counts.tolist()
    return minis, tokens, seqs


def scored_rollouts(infer, prompts, reward_fn, args, step: int, stop_ids):
    """n rollouts per prompt with their rewards and group advantages -> (rollouts, advantages (G, n), equal (G,))."""
    rollouts = generate_rollouts(infer, prompts, args, step, stop_ids)
    payload = {g: p for g, _, p in prompts}
    for r in rollouts:
        r.reward = float(reward_fn(payload[r.group], r.tokens))
    rewards = torch.tensor([r.reward for r in rollouts]).view(len(prompts), args.n)
    adv, equal = group_advantages(rewards, args.adv_std_norm)
    for r, a in zip(rollouts, adv.flatten().tolist()):
        r.advantage = a
    return rollouts, adv, equal


def grpo_step(model, infer, ref, optim, prompts, reward_fn, args, step: int, stop_ids) -> tuple[dict, list[Rollout]]:
    """One GRPO step on this rank's `prompts` [(global index, prompt ids, payload)]; reward_fn(payload, tokens) ->
    float. Every rank must call it (collectives). Returns (the step's metrics, reduced over ranks; this rank's
    rollouts). Runs without a process group too (1 rank), on a plain or an FSDP2 model."""
    assert (ref is None) == (args.kl_coef == 0), "a reference model exactly when --kl-coef > 0"
    device = next(model.parameters()).device
    t0 = time.time()
    sync_weights(model, infer)  # rollouts from the weights being trained
    rollouts, adv, equal = scored_rollouts(infer, prompts, reward_fn, args, step, stop_ids)
    drop = {prompts[i][0] for i in range(len(prompts)) if args.drop_equal_groups and equal[i]}
    kept = [r for r in rollouts if r.group not in drop]
    t_roll = time.time() - t0

    M = args.mini_batches
    minis, tokens, seqs = minibatches(kept, args, device)

    if args.ppo_epochs * M > 1 or ref is not None:  # pi_old before any update, and the reference model's log-probs
        with torch.no_grad():
            for m in (m for x in minis for m in x):
                if args.ppo_epochs * M > 1:
                    m.old = micro_logprobs(model, m, args)[0]
                if ref is not None:
                    m.ref = micro_logprobs(ref, m, args)[0]

    updates, total = [], Meter()
    for epoch in range(args.ppo_epochs):
        for mi, micros in enumerate(minis):
            if seqs[mi] == 0:  # every group of this mini-batch dropped, on every rank
                continue
            meter = Meter()
            loss = all_reduce(torch.tensor(minibatch_backward(model, micros, args, tokens[mi], seqs[mi], meter,
                                                              epoch == 0, (step + 1) in args.inject_nan),
                                           dtype=torch.float64, device=device)).item()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            gnorm = (gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm).item()
            ok = math.isfinite(loss) and math.isfinite(gnorm)
            if ok:  # a non-finite loss or gradient never reaches the weights
                optim.step()
            optim.zero_grad(set_to_none=True)
            u = meter.reduce(device)
            total.add(**u)
            updates.append({"loss": loss, "grad_norm": gnorm, "skipped": not ok, "ratio_min": finite(u["ratio_min"]),
                            "ratio_mean": u["ratio"] / max(u["tokens"], 1.0), "ratio_max": finite(u["ratio_max"]),
                            "update_rel": adam_update_ratio(optim, device) if ok else 0.0})
    t_train = time.time() - t0 - t_roll

    s = total.v
    sums = {"n": len(rollouts), "reward": sum(r.reward for r in rollouts),
            "reward2": sum(r.reward ** 2 for r in rollouts), "len": sum(len(r.tokens) for r in rollouts),
            "finished": sum(r.finished for r in rollouts), "adv": float(adv.sum()), "adv2": float((adv ** 2).sum()),
            "groups": len(prompts), "equal": float(equal.sum()), "dropped": len(drop),
            "train_tokens": sum(len(r.prompt) + len(r.tokens) for r in kept)}
    sums = reduced(sums, device)
    maxs = reduced({"len": max(len(r.tokens) for r in rollouts), "adv": float(adv.max()), "-adv": float(-adv.min()),
                    "rollout_s": t_roll}, device, "MAX")
    N, n_tok = sums["n"], max(s["tokens"], 1.0)
    std = lambda k: math.sqrt(max(sums[k + "2"] / N - (sums[k] / N) ** 2, 0.0))  # noqa: E731
    done = [u for u in updates if not u["skipped"]]
    rec = {"reward_mean": sums["reward"] / N, "reward_std": std("reward"), "adv_mean": sums["adv"] / N,
           "adv_std": std("adv"),
           "adv_min": -maxs["-adv"], "adv_max": maxs["adv"], "len_mean": sums["len"] / N, "len_max": int(maxs["len"]),
           "finished": sums["finished"] / N, "groups": int(sums["groups"]), "groups_equal": int(sums["equal"]),
           "groups_dropped": int(sums["dropped"]), "kl": s["kl"] / n_tok if ref is not None else None,
           "entropy": s["entropy"] / n_tok, "ratio_min": finite(s["ratio_min"]), "ratio_mean": s["ratio"] / n_tok,
           "ratio_max": finite(s["ratio_max"]), "clip_frac": s["clipped"] / n_tok,
           "gap_mean": s["gap"] / max(s["gap_tokens"], 1.0), "gap_max": finite(s["gap_max"]),
           "loss": sum(u["loss"] for u in done) / max(len(done), 1),
           "grad_norm": sum(u["grad_norm"] for u in done) / max(len(done), 1),
           "update_rel": sum(u["update_rel"] for u in done) / max(len(done), 1),
           "updates": updates, "skipped": sum(u["skipped"] for u in updates),
           "rollout_s": maxs["rollout_s"], "train_s": t_train,
           "gen_tokens_per_s": sums["len"] / max(maxs["rollout_s"], 1e-9),
           # sequence tokens trained on (all ranks, x ppo epochs) per second of the training phase, pre-passes included
           "train_tokens_per_s": sums["train_tokens"] * args.ppo_epochs / max(t_train, 1e-9)}
    return rec, rollouts


# ----------------------------------------------------------------------------------------------------------------------
# Data, rewards, the run

def prompts(args) -> data.PuzzleStream:
    """RL prompt i of the run, a pure function of (seed, i): embedded -> a fresh augmented puzzle of the PBMC cells
    kept away from SFT (--prompts rl; on SFT's own cells the policy scores from memory, so the reward cannot tell
    reading from recall) or of SFT's cells (--prompts sft); else the `--split` rows of a CellPuzzles file / folder /
    hub id in a seeded per-epoch order, epochs wrapping forever (a run resumed at an epoch boundary trains on)."""
    if args.data != "embedded":
        return data.PuzzleStream(args.seed, rows=load_rows(args.data, args.split, args.skip_bad))
    return data.PuzzleStream(args.seed, cells=data.embedded(), key=RL_STREAM, mix=args.new_cells,
                             ambient=args.new_cells, pool={"rl": "rl", "sft": "train"}[args.prompts])


def load_reward_fn(spec: str):
    """"file.py:name" or "module:name" -> the callable (puzzle, completion text) -> float."""
    where, name = spec.rsplit(":", 1)
    return (runpy.run_path(where) if where.endswith(".py") else vars(importlib.import_module(where)))[name]


def puzzle_reward(tok, mode: str, custom=None):
    """reward_fn for grpo_step: the completion decoded without special tokens (the stop token), scored by
    reward.score in `mode` (--reward-mode: mixed = (cell accuracy + exact) / 2, batch = exact), or by `custom`."""
    score = custom or (lambda p, text: reward.score(text, p.answer, mode))
    return lambda p, tokens: score(p, tok.decode(tokens, skip_special_tokens=True))


def steps_list(s: str) -> set[int]:
    return {int(x) for x in s.split(",") if x.strip()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    run_flags(p, model="runs/sft/model", split="train", out="runs/rl", epochs=20.0)
    a = p.add_argument_group("GRPO").add_argument
    a("--prompts", default="rl", choices=["rl", "sft"], help="embedded data: puzzles of the train cells kept away "
      "from SFT (rl), or of SFT's own cells (sft: the policy knows them by heart), thinned afresh")
    a("--new-cells", type=float, default=None, help="embedded data: probability that a prompt cell is pooled with "
      "another of its type and thinned (a new cell), and, apart, that it gets ambient UMIs of another type, as in "
      "SFT's --mix / --ambient: more distinct cells for the policy to read, fewer to recall (tiny 0.5, paper 0)")
    a("--prompts-per-step", type=int, default=None, help="prompts per step, all ranks")
    a("--n", "--group-size", dest="n", type=int, default=None, help="samples per prompt, the GRPO group. Under "
      "torchrun write --group-size: torchrun's parser takes a bare --n for its own options")
    a("--temperature", type=float, default=1.0, help="sampling temperature, also the trainer's log-prob temperature")
    a("--max-new-tokens", type=int, default=None, help="rollout length cap")
    a("--rollout-chunk", type=int, default=8, help="prompts per generate call, seeded by (seed, step, first prompt): "
      "samples are the same for any rank count whose per-rank share is a multiple of it")
    a("--reward-mode", default="mixed", choices=reward.MODES, help="mixed: (cell acc + exact) / 2 (released "
      "default); batch: exact match only (the paper's batch-level reward)")
    a("--reward-fn", default=None, help="'file.py:name' or 'module:name', a (puzzle, text) -> float used instead of "
      "reward.score (experiments, tests)")
    a("--adv-std-norm", action=argparse.BooleanOptionalAction, default=True,
      help="divide advantages by the group std (GRPO); --no-adv-std-norm: Dr. GRPO")
    a("--drop-equal-groups", action="store_true", help="leave groups with all-equal rewards out of the loss (DAPO)")
    a("--loss-agg", default="token-mean", choices=["token-mean", "seq-mean", "constant"],
      help="token-mean over the global mini-batch (reference), mean of per-sequence means, or sum / constant")
    a("--loss-constant", type=float, default=None, help="the constant of --loss-agg constant (default: sequences x "
      "--max-new-tokens, Dr. GRPO)")
    a("--clip-low", type=float, default=0.2, help="ratio clip below: 1 - clip_low")
    a("--clip-high", type=float, default=0.2, help="ratio clip above: 1 + clip_high (DAPO clip-higher: > clip-low)")
    a("--kl-coef", type=float, default=None, help="KL(pi||ref) weight in the loss; 0: no reference model at all")
    a("--entropy-coef", type=float, default=0.0, help="entropy bonus weight (reference 0)")
    a("--ppo-epochs", type=int, default=1, help="passes over each rollout batch")
    a("--mini-batches", type=int, default=1, help="optimizer steps per pass (the rollout batch split by group)")
    a("--micro-batch", type=int, default=None, help="rollouts per forward per rank, packed into one row (a "
      "group's prompt once)")
    a("--logprob-chunk", type=int, default=512, help="rows per chunk of the trainer's fp32 log_softmax")
    a("--max-bad-steps", type=int, default=3, help="stop after this many steps in a row with a non-finite loss/grad")
    a("--inject-nan", type=steps_list, default=set(), help="testing: comma list of 1-based steps whose loss is NaN")
    a("--eval-before", action="store_true", help="also evaluate the start model before the first step")
    a("--log-samples", type=int, default=3, help="completions (with rewards) logged at each evaluation")
    a("--probe-puzzles", type=int, default=12, help="at each evaluation, --group-size samples of this many held-out "
      "puzzles and as many train prompts: sampled and best-of-n exact share, all-equal groups (0: off)")
    return resolve_defaults(parse_run_args(p, argv, RECIPE))


def resolve_defaults(args):
    """The system turn from the model folder's cello.json, and the checks no single flag can make."""
    args.system = args.system or model_card(args.model).get("system") or "released"
    checks = [(0 <= args.new_cells <= 1, f"--new-cells is a probability: got {args.new_cells}, need 0..1"),
              (args.temperature > 0, "--temperature must be > 0 (GRPO samples; evaluation is greedy)"),
              (args.n >= 2, f"--group-size {args.n}: a group needs at least 2 samples (advantages are relative)"),
              (args.steps is None or args.steps >= 1, f"--steps {args.steps}: need at least 1"),
              (min(args.prompts_per_step, args.micro_batch, args.rollout_chunk, args.ppo_epochs,
                   args.mini_batches) >= 1, "--prompts-per-step, --micro-batch, --rollout-chunk, --ppo-epochs and "
               "--mini-batches must be at least 1"),
              (0 <= args.clip_low < 1 and args.clip_high >= 0, f"--clip-low {args.clip_low} / --clip-high "
               f"{args.clip_high}: the ratio's clip range [1 - low, 1 + high] needs 0 <= low < 1 and high >= 0"),
              (args.mini_batches <= args.prompts_per_step, f"--mini-batches {args.mini_batches} > --prompts-per-step "
               f"{args.prompts_per_step}: a mini-batch is a set of whole groups")]
    for ok, why in checks:
        if not ok:
            raise SystemExit(why)
    return args


FAILURES = ("format", "count", "repeat")  # reward.failure's causes of a -1


def step_record(step: int, lr: float, rec: dict, rollouts: list[Rollout], puzzles: dict, tok, device) -> dict:
    """The step's log record: grpo_step's metrics plus the rollouts' task metrics (reward.metrics: micro-averaged
    cell accuracy, exact match, format), reduced over ranks. `puzzles`: this rank's prompts by global index."""
    texts = [tok.decode(r.tokens, skip_special_tokens=True) for r in rollouts]
    gold = [puzzles[r.group].answer for r in rollouts]
    m = reward.metrics(texts, gold, [len(r.tokens) for r in rollouts])
    cells = sum(len(reward.split_items(a)) for a in gold)
    why = [reward.failure(t, a) for t, a in zip(texts, gold)]
    t = all_reduce(torch.tensor([m["count"], m["cell_acc"] * cells, cells, m["batch_acc"] * m["count"],
                                 m["format_rate"] * m["count"], *(why.count(k) for k in FAILURES)],
                                dtype=torch.float64, device=device)).tolist()
    updates = rec.pop("updates")
    rec = {"step": step + 1, "lr": lr, "cell_acc": t[1] / t[2], "batch_acc": t[3] / t[0], "format_rate": t[4] / t[0],
           **{f"minus1_{k}": x / t[0] for k, x in zip(FAILURES, t[5:])},  # shares of the -1 rewards' causes
           "equal_frac": rec["groups_equal"] / max(rec["groups"], 1),
           **rec, "sample": {"reward": rollouts[0].reward, "completion": texts[0]}}
    if len(updates) > 1:
        rec["updates"] = updates
    return rec


def step_line(rec: dict, steps: int) -> str:
    kl = f"kl {rec['kl']:.4f} | " if rec["kl"] is not None else ""
    return (f"step {rec['step']}/{steps} | reward {rec['reward_mean']:+.3f}±{rec['reward_std']:.2f} | cell "
            f"{rec['cell_acc']:.3f} batch {rec['batch_acc']:.3f} fmt {rec['format_rate']:.2f} | {kl}clip "
            f"{rec['clip_frac']:.3f} | ent {rec['entropy']:.2f} | len {rec['len_mean']:.0f}/{rec['len_max']} | "
            f"gap {rec['gap_mean']:.1e}/{rec['gap_max'] or 0:.1e} | gnorm {rec['grad_norm']:.3f} | dropped "
            f"{rec['groups_dropped']} | equal {rec['equal_frac']:.2f} | -1 fmt/count/repeat "
            f"{rec['minus1_format']:.2f}/{rec['minus1_count']:.2f}/{rec['minus1_repeat']:.2f} | update "
            f"{rec['update_rel']:.1e} | roll {rec['rollout_s']:.1f}s train {rec['train_s']:.1f}s"
            + (f" | SKIPPED {rec['skipped']} non-finite update(s)" if rec["skipped"] else ""))


def weights_finite(model, device) -> bool:
    """All ranks agree: every local shard of every weight is finite."""
    ok = float(all(local(p).isfinite().all() for p in model.parameters()))
    return bool(all_reduce(torch.tensor([ok], device=device), "MIN").item())


def build_policy(args, tok, device, start: int):
    """-> (the trained model, sharded; its folder; the plain inference copy rollouts use; the frozen reference model,
    only when --kl-coef > 0; AdamW), restored from the run's checkpoint when resuming at step `start` > 0."""
    model, model_dir = build_model(args.model, tok, device, args.seed)
    model.grad_checkpointing = args.grad_checkpointing
    model.compile_blocks(args.compile)
    infer = inference_copy(model.config, device, infer_dtype(device, args.precision))
    ref = None
    if args.kl_coef > 0:
        ref = build_model(args.model, tok, device, args.seed)[0].requires_grad_(False).compile_blocks(args.compile)
        ref = shard(ref, device).eval()
    shard(model, device)
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    if start:
        load_checkpoint(args.out, model, optim)
    return model, model_dir, infer, ref, optim


def step_prompts(stream, step: int, per_step: int, rank: int, world: int, tok, system):
    """This rank's contiguous share of step `step`'s prompts -> ({global index: puzzle}, [(index, prompt ids,
    puzzle)]), each puzzle built once."""
    per_rank = per_step // world
    first = step * per_step + rank * per_rank
    puzzles = {i: stream[i] for i in range(first, first + per_rank)}
    return puzzles, [(i, encode_chat(tok, messages(p, system), True), p) for i, p in puzzles.items()]


def main(argv=None):
    args = parse_args(argv)
    held_out = eval_source(args)  # refused before anything is built when it would be the training rows
    rank, world, device = init_distributed()
    if args.prompts_per_step % world:
        raise SystemExit(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the ranks ({world})")
    start = prepare_run_dir(args.out, args.resume, "rl_log.jsonl")
    if start:
        check_resume(args.out, args, DATA_FLAGS)
    tok_dir = tokenizer_source(args.model, args.tokenizer)
    tok = load_tokenizer(tok_dir)
    stream = prompts(args)
    data_hash = stream.fingerprint()
    if start:
        check_data(args.out, args, data_hash)
    steps = args.steps or (max(1, int(args.epochs * len(stream)) // args.prompts_per_step) if len(stream) else 100)
    model, model_dir, infer, ref, optim = build_policy(args, tok, device, start)
    custom = load_reward_fn(args.reward_fn) if args.reward_fn else None
    score = custom or (lambda p, text: reward.score(text, p.answer, args.reward_mode))
    reward_fn = puzzle_reward(tok, args.reward_mode, custom)
    stops = stop_token_ids(tok, model_dir)
    log = Log(os.path.join(args.out, "rl_log.jsonl"), args.wandb, vars(args))
    eval_set = eval_puzzles(held_out, args.eval_puzzles, args.seed + 1)
    run_eval = Evaluator(model, infer, tok, eval_set, args, log, score, args.log_samples, stream, stops)
    system = system_turn(args.system)
    card = {"recipe": args.recipe, "system": args.system}
    if rank == 0:
        print(f"GRPO ({args.recipe} recipe): {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {world} "
              f"rank(s) on {device}, steps {start}->{steps}, {args.prompts_per_step} prompts x n={args.n}, "
              f"T={args.temperature}, lr {args.lr:g}, kl {args.kl_coef:g}, system {args.system}, data {args.data}, "
              f"eval {len(eval_set)} puzzles of {held_out}, out {args.out}")

    if args.eval_before and start == 0:
        run_eval(0)
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="rl", disable=rank != 0 or args.no_progress)
    bad, failed, threads = 0, None, CpuThreads(device)
    for step in bar:
        threads.tick()
        lr = lr_at(step, steps, args.lr, args.warmup, args.schedule, args.min_lr_ratio)
        for g in optim.param_groups:
            g["lr"] = lr
        puzzles, mine = step_prompts(stream, step, args.prompts_per_step, rank, world, tok, system)
        rec, rollouts = grpo_step(model, infer, ref, optim, mine, reward_fn, args, step, stops)
        rec = step_record(step, lr, rec, rollouts, puzzles, tok, device)
        note_compiled(rec, args, step == start)
        log(rec, step_line(rec, steps))
        bad = bad + 1 if rec["skipped"] else 0
        if bad >= args.max_bad_steps:
            failed = (f"stopping: {bad} steps in a row with a non-finite loss or gradient (last at step {step + 1}); "
                      f"the last checkpoint holds the last finite weights. Lower --lr or check the data.")
            break
        done = step + 1 == steps
        if args.eval_every and (step + 1) % args.eval_every == 0 and not done:
            run_eval(step + 1)
        if (step + 1) % args.save_every == 0 or done:
            if not weights_finite(model, device):
                failed = f"stopping: non-finite weights after step {step + 1}; no checkpoint written"
                break
            save_checkpoint(args.out, model, optim, {"step": step + 1, "args": {**vars(args), "inject_nan":
                            sorted(args.inject_nan)}, "data_hash": data_hash}, model_dir or tok_dir, card)
    bar.close()
    if failed is None and (start < steps or not os.path.exists(os.path.join(args.out, "model"))):
        run_eval(steps)
        if rank == 0:  # the final model, HF layout (loadable here and by transformers)
            publish_model(args.out)
    log.close()
    dist.barrier()
    del model, optim, infer, ref, run_eval  # free before destroy_process_group: a rank sometimes aborts otherwise
    gc.collect()
    dist.destroy_process_group()
    if failed:
        raise SystemExit(failed)

if __name__ == "__main__":
    guarded(main)
