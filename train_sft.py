"""Supervised fine-tuning on reasoning traces (Cell-o1's first stage), FSDP2 under torchrun, resumable.

    python train_sft.py                                   # tiny model from scratch on the embedded PBMC puzzles (CPU)
    torchrun --nproc_per_node 8 train_sft.py --model Qwen/Qwen2.5-7B-Instruct --data ncbi/CellPuzzles --out runs/sft

Facts this file implements:
  - one prompt layout for every stage (SFT, GRPO, evaluation): system = the puzzle instruction, user = the puzzle,
    rendered in ChatML with the generation prompt; the completion is the assistant text followed by <|im_end|>;
  - the loss is the token-mean cross-entropy over completion tokens only (prompt masked), <|im_end|> included so the
    model learns to stop. The mask comes from lengths, never from a pad id (pad == eos would mask the real eos);
  - the mean is over every completion token of the *global* batch (all micro-batches, all ranks), so 1 rank and N
    ranks give the same update for the same global batch;
  - example i of the run is a pure function of (seed, i) (data.PuzzleStream): a file's rows in a seeded per-epoch
    order, or, for the embedded data, a fresh augmented puzzle with an accepted teacher trace. Resuming needs only the
    step count;
  - the paper's recipe: lr 5e-5, AdamW, linear decay, no warmup, 1 epoch, global batch 96, max length 4096,
    LoRA/DoRA r=256. We fine-tune all weights with FSDP2 instead of LoRA.
"""
from __future__ import annotations

import argparse
import gc
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, distribute_tensor
from tqdm import tqdm

import data
import reward
from model import Transformer, compiled, encode_chat, fp32_or_wider, load_tokenizer
from sampler import pad64
from train_common import (CpuThreads, Evaluator, Log, autocast, build_model, check_data, check_resume, eval_puzzles,
                          eval_source, guarded, infer_dtype, inference_copy, init_distributed, load_checkpoint,
                          load_rows, local, lr_at, messages, note_compiled, parse_run_args, prepare_run_dir,
                          publish_model, run_flags, save_checkpoint, shard, system_turn, tokenizer_source)

# The recipes: flag -> (tiny, paper). The tiny column was chosen by measurement (docs/experiments.md): small batches
# and many optimizer steps, N growing from 3 (curriculum) and drawn in proportion to N, the one-line system turn, the
# fix-order trace, Muon, an EMA of the weights, new cells made by pooling (mix) and ambient UMIs (the model learns
# the markers instead of its 490 train cells), and mostly hard puzzles (easy_keep: the teacher reads its own train
# cells too well, so few train puzzles need the candidates or the one-to-one rule, unlike held-out ones).
RECIPE = {"batch_size": (8, 96), "micro_batch": (8, 1), "steps": (1400, None), "lr": (1e-3, 5e-5),
          "warmup": (20, 0), "schedule": ("cosine", "linear"), "weight_decay": (0.1, 0.0), "optim": ("muon", "adamw"),
          "muon_lr": (0.01, 0.02), "ema": (0.995, 0.0), "system": ("short", "released"),
          "trace_order": ("fix", "cell"), "mix": (0.5, 0.0), "ambient": (0.5, 0.0), "easy_keep": (0.1, 1.0),
          "n_weights": ("linear", "uniform"), "curriculum": (0.5, 0.0), "eval_every": (700, 100),
          "eval_puzzles": (10, 200), "eval_max_new_tokens": (512, 3500), "save_every": (700, 175),
          "compile": (False, False)}
# What a resumed run must keep: the EMA, the flags that define training example i, and the lr schedule's length.
DATA_FLAGS = ("ema", "seed", "data", "split", "cells", "trace_order", "mix", "ambient", "easy_keep", "n_weights",
              "curriculum", "batch_size", "steps")
EMA_START = 0.5  # the weight average starts half-way through the run (before that it is the weights)


# ----------------------------------------------------------------------------------------------------------------------
# Optimizers and the weight average

def newton_schulz(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to g (U V^T of its SVD), approximately: 5 quintic Newton-Schulz steps with
    the coefficients of Muon (Jordan et al., 2024), which push every singular value into about [0.7, 1.2]. In bf16
    as Muon does on GPU; in fp32 on a CPU without native bf16, where an emulated bf16 matmul ran 120x slower than
    fp32 (an AVX2 EPYC: 0.8 vs 100 GFLOP/s at 1024^2) and made the optimizer 90% of a tiny SFT step."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype) / (g.norm() + 1e-7)  # spectral norm <= Frobenius norm <= 1
    tall = x.size(0) > x.size(1)
    x = x.mT if tall else x                # iterate on the wide side: x @ x.T is the smaller Gram matrix
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for the 2-D weights of the blocks (momentum, then the update orthogonalised by Newton-Schulz, scaled by
    sqrt(max(1, rows / cols)) and the lr; decoupled weight decay), AdamW for everything else (embeddings, norms,
    biases): groups carry `muon: bool`. Under FSDP2 a weight is a row-sharded DTensor: each rank gathers the full
    momentum, orthogonalises it (every rank gets the same result) and keeps its own rows, so 1 and N ranks agree."""

    def __init__(self, params, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 momentum: float = 0.95, ns_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum,
                                      muon=False))
        self.ns_dtype = ns_dtype  # Newton-Schulz precision

    @torch.no_grad()
    def step(self, closure=None):
        # elementwise math on this rank's shard (local views): DTensor dispatch costs ~10x the op on a tiny model
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if group["muon"]:
                    if not state:
                        state["momentum"] = torch.zeros_like(p)
                    buf, grad = local(state["momentum"]), local(p.grad)
                    buf.lerp_(grad, 1 - group["momentum"])
                    g = grad.lerp(buf, group["momentum"])  # Nesterov
                    sharded = hasattr(p, "device_mesh")
                    if sharded:  # gather the full matrix: every rank orthogonalises the same one
                        g = DTensor.from_local(g, p.device_mesh, p.placements, shape=p.shape,
                                               stride=p.stride()).full_tensor()
                    u = newton_schulz(g, dtype=self.ns_dtype) * max(1.0, g.size(0) / g.size(1)) ** 0.5
                    if sharded:  # this rank's rows of it
                        u = distribute_tensor(u, p.device_mesh, p.placements, src_data_rank=None).to_local()
                    local(p).mul_(1 - lr * wd).add_(u, alpha=-lr)
                else:  # AdamW
                    if not state:
                        state["step"] = torch.zeros((), dtype=torch.float32)
                        state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                    (b1, b2), t = group["betas"], state["step"].add_(1).item()
                    m, v, grad = local(state["exp_avg"]), local(state["exp_avg_sq"]), local(p.grad)
                    m.lerp_(grad, 1 - b1)
                    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                    denom = (v / (1 - b2 ** t)).sqrt_().add_(group["eps"])
                    local(p).mul_(1 - lr * wd).addcdiv_(m, denom, value=-lr / (1 - b1 ** t))


class EMA:
    """Exponential moving average of the weights (Polyak averaging), the model a run evaluates and publishes.
    After optimizer step s: shadow = weights while s <= start, then shadow = decay * shadow + (1 - decay) * weights.
    A tiny model trained on 490 cells ends in a noisy spot of a memorising run; the average over the last ~1 / (1 -
    decay) steps reads held-out cells better (docs/experiments.md). Shadows are fp32 and sharded like the weights, updated on
    the local shards (no communication), and saved in the training-state checkpoint, so a resumed run is exact."""

    def __init__(self, model: Transformer, decay: float, start: int):
        self.decay, self.start = decay, start
        self.params = dict(model.named_parameters())
        self.shadow = {n: p.detach().clone() for n, p in self.params.items()}  # DTensors stay sharded

    @torch.no_grad()
    def update(self, step: int):
        for n, p in self.params.items():
            if step <= self.start:
                local(self.shadow[n]).copy_(local(p))
            else:
                local(self.shadow[n]).lerp_(local(p), 1 - self.decay)

    @torch.no_grad()
    def swap(self):
        """Exchange the weights and the shadows in place (twice restores both): the checkpoint's HF model is the
        average, gathered by the same code as the weights."""
        for n, p in self.params.items():
            w, s = local(p), local(self.shadow[n])
            tmp = w.clone()
            w.copy_(s)
            s.copy_(tmp)


def make_optimizer(model: Transformer, name: str, lr: float, weight_decay: float, muon_lr: float,
                   ns_dtype: torch.dtype = torch.bfloat16):
    """AdamW (betas 0.9 / 0.95) on everything, or Muon on the blocks' 2-D weights at `muon_lr` + AdamW on the rest
    (Newton-Schulz in `ns_dtype`)."""
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    matrices, others = [], []
    for n, p in model.named_parameters():
        (matrices if p.ndim == 2 and ".layers." in n else others).append(p)
    return Muon([dict(params=matrices, muon=True, lr=muon_lr, base_lr=muon_lr),
                 dict(params=others, lr=lr, base_lr=lr)], lr=lr, weight_decay=weight_decay, ns_dtype=ns_dtype)



# ----------------------------------------------------------------------------------------------------------------------
# Data: example i of the run is (puzzle, completion text), a pure function of (seed, i)

def examples(args) -> data.PuzzleStream:
    """The SFT stream: embedded -> fresh augmented PBMC puzzles with accepted teacher traces; else the rows of a
    CellPuzzles file / folder / hub id (the reasoning split: every row a full trace)."""
    if args.data != "embedded":
        return data.PuzzleStream(args.seed, rows=load_rows(args.data, args.split, args.skip_bad))
    cells = data.embedded()
    return data.PuzzleStream(args.seed, cells=cells, mix=args.mix, ambient=args.ambient, n_weights=args.n_weights,
                             teacher=data.fit_embedded_teacher(cells), trace_order=args.trace_order,
                             easy_keep=args.easy_keep, pool={"sft": "train", "all": "labelled"}[args.cells])


def rows_that_fit(rows: list[data.Puzzle], tok, end_id: int, args) -> list[data.Puzzle]:
    """Every row checked before step 1 (found at its step, a bad row would cost the run), each error naming file and
    row: a row that is not a full trace is refused (SFT needs the reasoning split); one longer than --max-len is
    refused, or, under --skip-bad, left out and counted."""
    kept, system = [], system_turn(args.system)
    for p in rows:
        if "<think>" not in p.assistant or "</answer>" not in p.assistant:
            raise SystemExit(f"{p.source}: assistant_msg is not a <think>...</think>\n<answer>...</answer> trace; SFT "
                             f"needs the reasoning split")
        n = len(tokenize(tok, p, p.assistant, end_id, 1 << 62, "", system)[0])
        if n <= args.max_len:
            kept.append(p)
        elif not args.skip_bad:
            raise SystemExit(f"{p.source}: {n} tokens > --max-len {args.max_len}; raise --max-len, or pass --skip-bad "
                             f"to leave such rows out")
    if len(kept) < len(rows) and dist.get_rank() == 0:
        print(f"--skip-bad: left out {len(rows) - len(kept)} rows longer than --max-len {args.max_len}")
    if not kept:
        raise SystemExit(f"no row of {args.data} fits in --max-len {args.max_len}")
    return kept


def examples_at(stream: data.PuzzleStream, first: int, count: int, tok, end_id: int, max_len: int,
                system: str | None) -> list[tuple[list[int], int]]:
    """Examples first .. first + count - 1 of the stream, tokenized (`tokenize`), shortest first: packed, the loss
    does not depend on the order, which is fixed so that runs reproduce. A row's assistant text is its completion
    (a teacher trace or the row's reasoning)."""
    batch = [tokenize(tok, stream[i], stream[i].assistant, end_id, max_len, f"example {i}", system)
             for i in range(first, first + count)]
    return sorted(batch, key=lambda b: len(b[0]))


def tokenize(tok, p: data.Puzzle, completion: str, end_id: int, max_len: int, where: str,
             system: str | None = None) -> tuple[list[int], int]:
    """-> (prompt ids + completion ids + <|im_end|>, prompt length). Prompt and completion are encoded apart, as the
    sampler sees them (prompt ids, then generated ids)."""
    prompt = encode_chat(tok, messages(p, system), add_generation_prompt=True)
    ids = prompt + tok.encode(completion, add_special_tokens=False).ids + [end_id]
    if len(ids) > max_len:
        raise ValueError(f"{where}: {len(ids)} tokens > --max-len {max_len}; raise --max-len or drop the row")
    return ids, len(prompt)


def pack(batch: list[tuple[list[int], int]], device):
    """The micro-batch packed into one row: inputs x (1, L), targets y (1, L), `sel` (1, L) (the positions that go
    through lm_head), positions (1, L) and the sequence lengths for `model(..., packed=lens)`. Sequences sit back to
    back, each with positions 0..len-1 and causal attention of its own, so no position is padding (right-padding a
    batch of 150-450-token puzzles wasted 30% of the tiny model's step). L is rounded up to a multiple of 64 by a
    filler sequence, and the number of selected positions too (extra prompt positions, ignored by the loss): on CPU,
    oneDNN caches a kernel per matmul shape and memory grows without bound when every micro-batch has a new shape.
    y is -100 (ignored) except where the *next* token is a completion token (the end id included): the loss
    positions come from lengths, never from a pad id."""
    lens = [len(ids) for ids, _ in batch]
    L = pad64(sum(lens))
    x = torch.zeros(1, L, dtype=torch.long)
    y = torch.full((1, L), -100, dtype=torch.long)
    sel = torch.zeros(1, L, dtype=torch.bool)
    pos = torch.zeros(1, L, dtype=torch.long)
    prompt = torch.zeros(1, L, dtype=torch.bool)  # prompt positions whose next token is a prompt token
    o = 0
    for ids, n_prompt in batch:
        n = len(ids)
        x[0, o:o + n] = torch.tensor(ids)
        pos[0, o:o + n] = torch.arange(n)
        y[0, o + n_prompt - 1:o + n - 1] = torch.tensor(ids[n_prompt:])  # predicts completion tokens 0..end
        sel[0, o + n_prompt - 1:o + n - 1] = True
        prompt[0, o:o + n_prompt - 1] = True
        o += n
    if L > o:  # the filler: a sequence of its own (pad id 0), never attended to by a real token, never in the loss
        pos[0, o:] = torch.arange(L - o)
        lens.append(L - o)
    extra = pad64(int(sel.sum())) - int(sel.sum())
    sel[0, prompt[0].nonzero()[:extra, 0]] = True
    return x.to(device), y.to(device), sel.to(device), pos.to(device), tuple(lens)


# ----------------------------------------------------------------------------------------------------------------------
# The run

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    run_flags(p, model="tiny", split="reasoning", out="runs/sft", epochs=1.0)
    a = p.add_argument_group("SFT").add_argument
    a("--cells", default="sft", choices=["sft", "all"], help="embedded data: SFT's share of the train cells, or all "
      "of them, the share kept for GRPO's prompts included (a control: SFT given the cells GRPO would get)")
    a("--trace-order", default=None, choices=["cell", "fix"], help="embedded teacher traces: cells in order, each "
      "resolved at once, or 'fix': every cell's best fit in cell order, then the repeated types resolved")
    a("--mix", type=float, default=None, help="embedded data: probability that a train cell is pooled with another "
      "train cell of its type and thinned to half depth (a new cell of the type)")
    a("--ambient", type=float, default=None, help="embedded data: probability that a train cell gets 5-30%% of the "
      "UMIs of a train cell of another type (same donor), like ambient RNA")
    a("--easy-keep", type=float, default=None, help="embedded data: probability of keeping a train puzzle that is not "
      "hard (data.Teacher.hard); below 1 the train mix moves toward held-out puzzles, which are mostly hard")
    a("--n-weights", default=None, choices=["uniform", "linear"], help="embedded data: N drawn uniformly in the "
      "curriculum's range, or with probability proportional to N")
    a("--curriculum", type=float, default=None, help="embedded data: fraction of the run over which the largest N "
      "grows from the smallest to the largest of the range (0: the full range from step 0)")
    a("--batch-size", type=int, default=None, help="global batch in sequences")
    a("--micro-batch", type=int, default=None, help="sequences per forward per rank (packed into one row)")
    a("--optim", default=None, choices=["adamw", "muon"], help="AdamW on all weights, or Muon on the blocks' "
      "matrices + AdamW on the rest")
    a("--muon-lr", type=float, default=None, help="peak lr of Muon's matrices (with --optim muon)")
    a("--ema", type=float, default=None, help="decay of an exponential moving average of the weights (from half the "
      "run on), the model evaluated and published; 0: off, the last weights")
    a("--max-len", type=int, default=4096, help="longest training sequence in tokens (longer is an error)")
    args = parse_run_args(p, argv, RECIPE)
    for k in ("mix", "ambient", "easy_keep"):
        if not 0 <= getattr(args, k) <= 1:
            p.error(f"--{k.replace('_', '-')} is a probability: got {getattr(args, k)}, need 0..1")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps {args.steps}: need at least 1")
    if not 1 <= args.micro_batch <= args.batch_size:
        p.error(f"--micro-batch {args.micro_batch} must be 1..--batch-size ({args.batch_size})")
    return args


def summed_nll(logits, targets):
    """logits (K, vocab), targets (K,) -> the summed cross-entropy in fp32 or wider (-100: ignored). Under
    --compile one fused pass: eager's log-softmax, its backward, the cast and the zero-filled gradient of the
    gather took 17% of a tiny step."""
    return F.cross_entropy(fp32_or_wider(logits), targets, ignore_index=-100, reduction="sum")


def train_step(model, optim, batch, args, device) -> dict:
    """One optimizer step on this rank's `batch` [(ids, prompt length)]: the token-mean loss over the global batch."""
    world = dist.get_world_size()
    micro = [pack(batch[j:j + args.micro_batch], device) for j in range(0, len(batch), args.micro_batch)]
    # completion tokens and all tokens in the global batch (the first is the token-mean's denominator)
    counts = torch.tensor([sum((y >= 0).sum().item() for _, y, *_ in micro), sum(len(ids) for ids, _ in batch)],
                          dtype=torch.float64, device=device)
    dist.all_reduce(counts)
    n_tok = counts[0].float()
    loss_sum = torch.zeros((), device=device)
    nll = compiled(summed_nll) if args.compile else summed_nll
    for x, y, sel, pos, lens in micro:
        with autocast(device, args.precision):
            logits = model(x, logits_at=sel, positions=pos, packed=lens)  # (selected positions, vocab)
        loss = nll(logits, y[sel])
        (loss * world / n_tok).backward()  # FSDP2 averages gradients over ranks; x world makes it sum / global count
        loss_sum += loss.detach()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm
    optim.step()
    optim.zero_grad(set_to_none=True)
    dist.all_reduce(loss_sum)
    return {"loss": loss_sum.item() / n_tok.item(), "grad_norm": gnorm.item(), "tokens": counts[1].item()}


def main(argv=None):
    args = parse_args(argv)
    held_out = eval_source(args)  # refused before anything is built when it would be the training rows
    rank, world, device = init_distributed()
    torch.manual_seed(args.seed)
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the number of ranks ({world})")
    start = prepare_run_dir(args.out, args.resume, "sft_log.jsonl")
    if start:
        check_resume(args.out, args, DATA_FLAGS)
    tok_dir = tokenizer_source(args.model, args.tokenizer)
    tok = load_tokenizer(tok_dir)
    end_id = tok.token_to_id("<|im_end|>")
    stream = examples(args)
    if stream.rows is not None:
        stream.rows = rows_that_fit(stream.rows, tok, end_id, args)
    data_hash = stream.fingerprint()
    if start:
        check_data(args.out, args, data_hash)
    if not args.steps and not len(stream):
        raise SystemExit("the embedded stream is endless: pass --steps")
    steps = args.steps or max(1, int(args.epochs * len(stream)) // args.batch_size)
    stream.ramp = int(args.curriculum * steps * args.batch_size)
    model, model_dir = build_model(args.model, tok, device, args.seed)
    model.grad_checkpointing = args.grad_checkpointing
    model.compile_blocks(args.compile)
    infer = inference_copy(model.config, device, infer_dtype(device, args.precision))
    shard(model, device)
    optim = make_optimizer(model, args.optim, args.lr, args.weight_decay, args.muon_lr,
                           infer_dtype(device, args.precision))  # bf16 only where the hardware multiplies it
    ema = EMA(model, args.ema, int(EMA_START * steps)) if args.ema else None
    if start:
        load_checkpoint(args.out, model, optim, {"ema": ema.shadow} if ema else None)
    eval_set = eval_puzzles(held_out, args.eval_puzzles, args.seed + 1)
    log = Log(os.path.join(args.out, "sft_log.jsonl"), args.wandb, vars(args))
    if rank == 0:
        print(f"SFT ({args.recipe} recipe): {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {world} "
              f"rank(s) on {device}, steps {start}->{steps}, global batch {args.batch_size}, data {args.data}, eval "
              f"{len(eval_set)} puzzles of {held_out}, out {args.out}")
    per_rank = args.batch_size // world
    system = system_turn(args.system)
    card = {"recipe": args.recipe, "system": args.system}

    score = lambda p, text: reward.score(text, p.answer, "mixed")  # noqa: E731
    run_eval = Evaluator(model, infer, tok, eval_set, args, log, score, shadow=ema.shadow if ema else None)

    bar = tqdm(range(start, steps), initial=start, total=steps, desc="sft", disable=rank != 0 or args.no_progress)
    threads = CpuThreads(device)
    for step in bar:
        threads.tick()
        t0 = time.time()
        lr = lr_at(step, steps, args.lr, args.warmup, args.schedule, args.min_lr_ratio)
        for g in optim.param_groups:
            g["lr"] = lr * g.get("base_lr", args.lr) / args.lr  # Muon's matrices follow the same schedule
        first = step * args.batch_size + rank * per_rank  # this rank's contiguous share of the global batch
        out = train_step(model, optim, examples_at(stream, first, per_rank, tok, end_id, args.max_len, system), args,
                         device)
        if ema:
            ema.update(step + 1)
        dt = time.time() - t0
        rec = {"step": step + 1, "loss": out["loss"], "lr": lr, "grad_norm": out["grad_norm"],
               "tokens_per_s": out["tokens"] / dt, "step_time_s": dt}
        note_compiled(rec, args, step == start)
        log(rec, f"step {step + 1}/{steps} | loss {rec['loss']:.4f} | lr {lr:.2e} | gnorm {rec['grad_norm']:.3f} | "
                 f"tok/s {rec['tokens_per_s']:.0f} | {dt:.2f}s")
        done = step + 1 == steps
        if args.eval_every and (step + 1) % args.eval_every == 0 and not done:
            run_eval(step + 1)
        if (step + 1) % args.save_every == 0 or done:
            save_checkpoint(args.out, model, optim, {"step": step + 1, "args": vars(args), "data_hash": data_hash},
                            model_dir or tok_dir, card, {"ema": ema.shadow} if ema else None, ema.swap if ema else None)
    bar.close()
    if start < steps or not os.path.exists(os.path.join(args.out, "model")):
        run_eval(steps)
        if rank == 0:
            publish_model(args.out)
    log.close()
    dist.barrier()
    del model, optim, infer, ema, run_eval  # free before destroy_process_group: a rank may abort at exit otherwise
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    guarded(main)
