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
  - example i of the run is a pure function of (seed, i): a file's rows in a seeded per-epoch order, or, for the
    embedded data, a fresh augmented puzzle drawn with rng(seed, i). Resuming needs only the step count.
  - the paper's recipe (reference notes, section 4.1): lr 5e-5, AdamW, linear decay, no warmup, 1 epoch, global
    batch 96, max length 4096, LoRA/DoRA r=256. We fine-tune all weights with FSDP2 instead of LoRA.
The distributed helpers here (setup, sharding, checkpoints, weight sync for generation, evaluation) are shared
with train_rl.py.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import socket
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, distribute_tensor
from tqdm import tqdm

import data
import reward
from model import ModelConfig, Transformer, encode_chat, load_tokenizer, save_pretrained, stop_token_ids
from sampler import Sampler, pad64

ROOT = os.path.dirname(os.path.abspath(__file__))
# The CPU default: a 3.7M-parameter Qwen2 trained from scratch with the committed BPE tokenizer (assets/).
TINY = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=2048)


# ----------------------------------------------------------------------------------------------------------------------
# Distributed setup and FSDP2

def init_distributed():
    """torchrun sets RANK/WORLD_SIZE; plain `python` runs as a 1-rank group, so there is a single code path.
    NCCL on CUDA, gloo on CPU. Returns (rank, world_size, device)."""
    if "RANK" not in os.environ:
        with socket.socket() as s:  # a free port for the 1-rank rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def shard(model: Transformer, device) -> Transformer:
    """FSDP2: one unit per block plus the root (embeddings, final norm, lm_head: a tied lm_head stays one Parameter
    inside the root unit). On GPU, bf16 compute with fp32 master weights and fp32 gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" else None
    kw = dict(mp_policy=mp) if mp else {}
    for block in model.model.layers:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def autocast(device):
    """CPU: fp32 weights with bf16 autocast (bf16 matmul is ~4x fp32 on this class of CPU). GPU: FSDP2's policy."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if device.type == "cpu" else nullcontext()


def build_model(name: str, tokenizer, device, seed: int) -> tuple[Transformer, str | None]:
    """`tiny` -> a from-scratch model sized for the CPU default; anything else -> a HF folder or hub id (fp32 master
    weights for training). Returns (model on device, folder whose tokenizer files travel with checkpoints)."""
    if name == "tiny":
        torch.manual_seed(seed)
        config = ModelConfig(vocab_size=tokenizer.get_vocab_size(), **TINY)
        return Transformer(config).init_weights().to(device), None
    return Transformer.from_pretrained(name, device=device, dtype=torch.float32), name


def tokenizer_source(model: str, tokenizer: str | None) -> str:
    """The folder holding tokenizer.json: --tokenizer, else the model folder, else the committed tiny tokenizer."""
    if tokenizer:
        return tokenizer
    return os.path.dirname(data.TOKENIZER_PATH) if model == "tiny" else model


@torch.no_grad()
def sync_weights(trained: Transformer, infer: Transformer, src: dict | None = None):
    """Copy the current (sharded) weights, or `src` (name -> tensor sharded like them: the EMA's), into the plain
    inference copy the sampler uses: one all-gather per tensor, every rank gets the full tensor. Called before each
    generation, so rollouts never use stale weights."""
    src = src if src is not None else dict(trained.named_parameters())
    for name, p in infer.named_parameters():
        t = src[name]
        p.copy_(t.full_tensor() if hasattr(t, "full_tensor") else t)


def full_state_dict(model) -> dict:
    """The unsharded state dict on rank 0 (CPU), empty elsewhere: for the Hugging Face checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to g (U V^T of its SVD), approximately: 5 quintic Newton-Schulz steps in
    bf16 with the coefficients of Muon (Jordan et al., 2024), which push every singular value into about [0.7, 1.2]."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16() / (g.norm() + 1e-7)  # spectral norm <= Frobenius norm <= 1
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
                 momentum: float = 0.95):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum,
                                      muon=False))

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
                    u = newton_schulz(g) * max(1.0, g.size(0) / g.size(1)) ** 0.5
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
    decay) steps reads held-out cells better (README, X1). Shadows are fp32 and sharded like the weights, updated on
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


def make_optimizer(model: Transformer, name: str, lr: float, weight_decay: float, muon_lr: float):
    """AdamW (betas 0.9 / 0.95) on everything, or Muon on the blocks' 2-D weights at `muon_lr` + AdamW on the rest."""
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    matrices, others = [], []
    for n, p in model.named_parameters():
        (matrices if p.ndim == 2 and ".layers." in n else others).append(p)
    return Muon([dict(params=matrices, muon=True, lr=muon_lr, base_lr=muon_lr),
                 dict(params=others, lr=lr, base_lr=lr)], lr=lr, weight_decay=weight_decay)


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: <run>/checkpoint/{model/ (HF layout), state/ (sharded optimizer + weights, torch DCP), meta.json}

def save_checkpoint(run_dir, model, optim, meta: dict, tokenizer_dir, ema: EMA | None = None):
    """Written to checkpoint.tmp by all ranks, renamed into place by rank 0 once complete: a kill at any moment
    leaves either the previous checkpoint or the new one, never a half-written one. With an EMA, state/ holds it
    too and model/ (the HF checkpoint) is the average."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    final, tmp = os.path.join(run_dir, "checkpoint"), os.path.join(run_dir, "checkpoint.tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    msd, osd = get_state_dict(model, optim)
    dcp.save({"model": msd, "optim": osd, **({"ema": ema.shadow} if ema else {})},
             checkpoint_id=os.path.join(tmp, "state"))
    if ema:
        ema.swap()
    hf = full_state_dict(model)  # on 1 rank its tensors can alias the weights: swap back only once they are written
    if dist.get_rank() == 0:
        save_pretrained(hf, model.config, os.path.join(tmp, "model"), tokenizer_dir)
    del hf
    if ema:
        ema.swap()
    if dist.get_rank() == 0:
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
        shutil.rmtree(final + ".old", ignore_errors=True)
        if os.path.exists(final):
            os.rename(final, final + ".old")
        os.rename(tmp, final)
        shutil.rmtree(final + ".old", ignore_errors=True)
    dist.barrier()


# The flags that define training example i (Examples), with the value a run saved before the flag existed had.
# (--data is left out: a moved file is the same data.)
STREAM_FLAGS = {"seed": None, "trace_order": None, "trace_form": None, "mix": None, "ambient": None, "easy_keep": 1.0,
                "shuffle": 0.0, "n_weights": "uniform", "curriculum": None}


def load_checkpoint(run_dir, model, optim, ema: EMA | None = None, args=None) -> dict:
    """Restore weights, optimizer state and the EMA's shadows in place; returns meta.json. A run saved with an EMA
    and resumed without one (or the reverse), or resumed with other `STREAM_FLAGS` than it was trained with (`args`:
    the resumed run's; a new default would otherwise change the data mid-run), is refused before anything is read
    from state/."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    ckpt = os.path.join(run_dir, "checkpoint")
    with open(os.path.join(ckpt, "meta.json")) as f:
        meta = json.load(f)
    saved = meta["args"].get("ema", 0)
    if bool(saved) != bool(ema):
        raise SystemExit(f"{run_dir} was trained with --ema {saved}: resume it with the same --ema")
    for k, before in STREAM_FLAGS.items():
        was = meta["args"].get(k, before)
        if args is not None and was is not None and was != getattr(args, k):
            flag = "--" + k.replace("_", "-")
            raise SystemExit(f"{run_dir} was trained with {flag} {was}, this run has {flag} {getattr(args, k)}: "
                             f"resume it with {flag} {was} (the training data would change mid-run)")
    msd, osd = get_state_dict(model, optim)
    state = {"model": msd, "optim": osd, **({"ema": ema.shadow} if ema else {})}  # loaded in place
    dcp.load(state, checkpoint_id=os.path.join(ckpt, "state"))
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return meta


def publish_model(run_dir: str) -> None:
    """<run>/model <- the last checkpoint's HF model (for train_rl.py --model and transformers), copied to model.tmp
    then renamed: a kill leaves the previous folder or none, never a half-copied one. Rank 0 only."""
    final = os.path.join(run_dir, "model")
    shutil.rmtree(final + ".tmp", ignore_errors=True)
    shutil.copytree(os.path.join(run_dir, "checkpoint", "model"), final + ".tmp")
    shutil.rmtree(final, ignore_errors=True)
    os.rename(final + ".tmp", final)


def prepare_run_dir(run_dir: str, resume: bool, log_name: str) -> int:
    """Refuse to overwrite a run unless resuming; on resume drop log lines past the checkpoint (they would be
    repeated). Returns the step to resume from (0 for a fresh run). Rank 0 only touches files."""
    ckpt = os.path.join(run_dir, "checkpoint", "meta.json")
    step = 0
    if os.path.exists(ckpt):
        if not resume:
            raise SystemExit(f"{run_dir} already holds a checkpoint: pass --resume to continue it, or another --out")
        step = json.load(open(ckpt))["step"]
    log = os.path.join(run_dir, log_name)
    if dist.get_rank() == 0:
        os.makedirs(run_dir, exist_ok=True)
        if os.path.exists(log):
            lines = [ln for ln in open(log) if ln.strip() and json.loads(ln).get("step", 0) <= step]
            with open(log, "w") as f:
                f.writelines(lines)
    return step


class Log:
    """One console line per step (through tqdm) and a JSONL file for machines; rank 0 only."""

    def __init__(self, path: str):
        self.path = path if dist.get_rank() == 0 else None

    def __call__(self, record: dict, console: str | None = None):
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if console:
            tqdm.write(console)


def lr_at(step: int, total: int, lr: float, warmup: int, schedule: str, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine / linear decay to lr * min_ratio, or constant."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    t = (step - warmup) / max(1, total - warmup)
    decay = 0.5 * (1 + math.cos(math.pi * t)) if schedule == "cosine" else 1 - t
    return lr * (min_ratio + (1 - min_ratio) * decay)


# ----------------------------------------------------------------------------------------------------------------------
# Data: examples are (prompt messages, completion text); example i is a pure function of (seed, i)

# An experiment for the tiny CPU model (--system short): the released 138-token instruction is ~30% of every
# sequence, and a model trained from scratch cannot read it anyway. Same layout, shorter system turn.
SHORT_SYSTEM = "Assign each cell a distinct candidate type. Answer as <think>...</think> then <answer>t1 | t2 | ...</answer>."


def messages(p: data.Puzzle, system: str | None = None) -> list[dict]:
    return [{"role": "system", "content": system or p.system}, {"role": "user", "content": p.user}]


def embedded_sampler(cells: data.CellSplit, mix: float = 0.0, ambient: float = 0.0,
                     shuffle: float = 0.0) -> tuple[data.PuzzleSampler, tuple[int, int]]:
    """The embedded default's puzzles of train cells (augmented afresh; `mix`, `ambient`, `shuffle`: see
    PuzzleSampler.genes_of) and their N range, capped by the donors."""
    sampler = data.PuzzleSampler(cells.data, cells.train, data.CPU.n_genes, data.CPU.augment, data.CPU.p_range, mix,
                                 ambient, shuffle)
    return sampler, (data.CPU.n_range[0], min(data.CPU.n_range[1], sampler.max_n()))


def load_rows(source: str, split: str, skip_bad: bool) -> list[data.Puzzle]:
    rows, skipped = data.load_puzzles(source, split, skip_bad=skip_bad)
    if skipped:
        print(f"skipped {skipped} malformed rows of {source} ({split}) under --skip-bad")
    return rows


def epoch_row(rows: list, seed: int, i: int):
    """Row i of an endless pass over `rows`: epoch e visits them in a permutation seeded by (seed, e), so row i is a
    pure function of (seed, i) and a run resumed at an epoch boundary goes on into the next epoch."""
    epoch, j = divmod(i, len(rows))
    return rows[np.random.default_rng([seed, epoch]).permutation(len(rows))[j]]


class Examples:
    """SFT examples by global index. `source`: "embedded" (fresh augmented PBMC puzzles with accepted teacher
    traces) or a CellPuzzles file / folder / hub id (its `reasoning` split, every row a full trace)."""

    def __init__(self, source: str, seed: int, split: str = "reasoning", skip_bad: bool = False,
                 trace_order: str = "cell", ramp: int = 0, trace_form: str = "type", mix: float = 0.0,
                 ambient: float = 0.0, easy_keep: float = 1.0, shuffle: float = 0.0, n_weights: str = "uniform"):
        self.seed, self.trace_order, self.ramp, self.trace_form = seed, trace_order, ramp, trace_form
        self.easy_keep, self.n_weights = easy_keep, n_weights
        if source == "embedded":
            cells = data.embedded()
            self.sampler, self.n_range = embedded_sampler(cells, mix, ambient, shuffle)
            self.teacher = data.fit_embedded_teacher(cells)
            self.rows = None
        else:
            self.rows = load_rows(source, split, skip_bad)
            for i, p in enumerate(self.rows):
                if "<think>" not in p.assistant or "</answer>" not in p.assistant:
                    raise ValueError(f"{source} ({split}) row {i}: assistant_msg is not a <think>...</think>\\n"
                                     f"<answer>...</answer> trace; SFT needs the reasoning split")

    def __len__(self):
        return len(self.rows) if self.rows is not None else 0  # 0: endless

    def __getitem__(self, i: int) -> tuple[data.Puzzle, str]:
        if self.rows is not None:
            p = epoch_row(self.rows, self.seed, i)
            return p, p.assistant
        rng = np.random.default_rng([self.seed, i])
        lo, hi = self.n_range
        if self.ramp:  # curriculum: the largest N grows linearly from lo to hi over the first `ramp` examples
            hi = lo + math.ceil((hi - lo) * min(1.0, i / self.ramp))
        ns = np.arange(lo, hi + 1)
        draw_n = ((lambda: int(rng.integers(lo, hi + 1))) if self.n_weights == "uniform"
                  else (lambda: int(rng.choice(ns, p=ns / ns.sum()))))  # "linear": P(N) proportional to N
        n = draw_n()
        while True:  # rejection sampling, as the paper: keep only traces whose answer is fully correct
            p = self.sampler.sample(n, rng)
            trace = self.teacher.accepted_trace(p, self.trace_order, self.trace_form)
            if trace is None:
                n = draw_n()
                continue
            if self.easy_keep < 1 and not self.teacher.hard(p) and rng.random() >= self.easy_keep:
                continue  # same N: the easy ones are thinned at every N alike
            return p, trace


def tokenize(tok, p: data.Puzzle, completion: str, end_id: int, max_len: int, where: str,
             system: str | None = None) -> tuple[list[int], int]:
    """-> (prompt ids + completion ids + <|im_end|>, prompt length). Prompt and completion are encoded apart, as the
    sampler sees them (prompt ids, then generated ids)."""
    prompt = encode_chat(tok, messages(p, system), add_generation_prompt=True)
    ids = prompt + tok.encode(completion, add_special_tokens=False).ids + [end_id]
    if len(ids) > max_len:
        raise ValueError(f"{where}: {len(ids)} tokens > --max-len {max_len}; raise --max-len or drop the row")
    return ids, len(prompt)


def collate(batch: list[tuple[list[int], int]], device):
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
# Evaluation (shared with train_rl.py): greedy decoding on held-out puzzles, the data issue's metrics

def eval_puzzles(source: str, limit: int, seed: int) -> list[data.Puzzle]:
    if source == "embedded":
        return data.test_puzzles(data.embedded(), data.CPU, per_n=limit, seed=seed)
    puzzles, _ = data.load_puzzles(source, "test")
    return puzzles[:limit] if limit else puzzles


@torch.no_grad()
def evaluate(infer: Transformer, tok, puzzles, max_new_tokens: int, progress: bool,
             system: str | None = None) -> tuple[dict, list[str]]:
    """Each rank decodes its share (greedy), rank 0 scores all. Returns (metrics, completions) on every rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = list(range(rank, len(puzzles), world))
    outs = Sampler(infer).generate([encode_chat(tok, messages(puzzles[i], system), True) for i in mine], n=1,
                                   max_new_tokens=max_new_tokens, temperature=0.0,
                                   stop_token_ids=stop_token_ids(tok), progress=progress)
    local = [(i, tok.decode(o.tokens, skip_special_tokens=True), len(o.tokens)) for i, o in zip(mine, outs)]
    gathered = [None] * world
    dist.all_gather_object(gathered, local)
    rows = sorted(r for part in gathered for r in part)
    texts = [t for _, t, _ in rows]
    m = reward.metrics(texts, [puzzles[i].answer for i, _, _ in rows], [n for _, _, n in rows])
    return m, texts


def eval_line(m: dict) -> str:
    per_n = " ".join(f"N{n}:{v['format_rate']:.2f}/{v['cell_acc']:.2f}/{v['batch_acc']:.2f}"
                     for n, v in sorted(m["by_n"].items()))
    return (f"eval | format {m['format_rate']:.3f} | cell {m['cell_acc']:.3f} | batch {m['batch_acc']:.3f} | "
            f"len {m['mean_len']:.0f} | per N (format/cell/batch) {per_n}")


# ----------------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny' (from scratch, CPU default), a HF folder or a hub id")
    p.add_argument("--tokenizer", default=None, help="folder with tokenizer.json (default: the model's, or assets/)")
    p.add_argument("--data", default="embedded", help="'embedded' (PBMC puzzles + teacher traces) or a CellPuzzles "
                   "file / folder / hub id whose reasoning split is used")
    p.add_argument("--split", default="reasoning", help="split of --data to train on")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed rows instead of failing")
    p.add_argument("--system", default=None, choices=["released", "short"],
                   help="system turn: the released instruction, or a one-line one (default: tiny short, else released)")
    p.add_argument("--trace-order", default=None, choices=["confidence", "cell", "fix"],
                   help="embedded teacher traces: resolve cells most confident first, in cell order, or 'fix': every "
                   "cell's best fit in cell order, then the repeated types resolved (default: tiny fix, else cell)")
    p.add_argument("--trace-form", default="type", choices=["evidence", "type"],
                   help="embedded teacher traces: 'markers -> type' per cell, or 'type (markers)'")
    p.add_argument("--mix", type=float, default=None, help="embedded data: probability that a train cell is pooled with "
                   "another train cell of its type and thinned to half depth (a new cell of the type; default: tiny 0.5, "
                   "else 0)")
    p.add_argument("--ambient", type=float, default=None, help="embedded data: probability that a train cell gets "
                   "5-30%% of the UMIs of a train cell of another type (same donor), like ambient RNA (default: tiny "
                   "0.5, else 0)")
    p.add_argument("--shuffle", type=float, default=0.0, help="embedded data: probability that a train cell is "
                   "rebuilt gene by gene, each gene's count from a random train cell of its type (off: measured no "
                   "better on average, README)")
    p.add_argument("--easy-keep", type=float, default=None, help="embedded data: probability of keeping a train puzzle "
                   "that is not hard (data.Teacher.hard: no repeat in the per-cell argmax, every cell's best type a "
                   "candidate); below 1 the train mix moves toward held-out puzzles, which are mostly hard (default: "
                   "tiny 0.1, else 1)")
    p.add_argument("--n-weights", default=None, choices=["uniform", "linear"],
                   help="embedded data: how N is drawn within the curriculum's range: uniformly, or with probability "
                   "proportional to N (more of the run on the large puzzles; measured in the README, ninth session; "
                   "default: tiny linear, else uniform)")
    p.add_argument("--curriculum", type=float, default=None, help="embedded data: fraction of the run over which the "
                   "largest N grows from the smallest to the largest of the range (0: the full range from step 0; default: tiny "
                   "0.5, else 0)")
    p.add_argument("--eval-data", default=None, help="held-out puzzles (default: --data's test split / embedded)")
    p.add_argument("--out", default="runs/sft", help="run folder: checkpoint/, model/, sft_log.jsonl")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: tiny 1400, else 1 epoch)")
    p.add_argument("--epochs", type=float, default=1.0, help="epochs over a file dataset when --steps is not given")
    p.add_argument("--batch-size", type=int, default=None, help="global batch in sequences (default: tiny 8, else 96)")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per forward per rank (default: tiny 8, "
                   "else 1)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: tiny 1e-3, else 5e-5)")
    p.add_argument("--optim", default=None, choices=["adamw", "muon"],
                   help="AdamW on all weights, or Muon on the blocks' matrices + AdamW on the rest (default: tiny muon, "
                   "else adamw)")
    p.add_argument("--muon-lr", type=float, default=None, help="peak lr of Muon's matrices (with --optim muon; "
                   "default: tiny 0.01, else 0.02)")
    p.add_argument("--ema", type=float, default=None, help="decay of an exponential moving average of the weights, "
                   "the model evaluated and published (0: off, the last weights; default: tiny 0.995, else 0)")
    p.add_argument("--ema-start", type=float, default=0.5, help="fraction of the run after which the average starts "
                   "(before it, it is the weights)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: tiny 20, else 0)")
    p.add_argument("--schedule", default=None, choices=["cosine", "linear", "constant"],
                   help="decay after warmup (default: tiny cosine, else linear as the reference)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of --lr")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default: tiny 0.1, else 0)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient clipping max norm")
    p.add_argument("--max-len", type=int, default=4096, help="longest training sequence in tokens (longer is an error)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    p.add_argument("--eval-every", type=int, default=None, help="evaluate every k steps (and at the end); 0: end only "
                   "(default: tiny 700, else 100)")
    p.add_argument("--eval-puzzles", type=int, default=None, help="held-out puzzles (embedded: per N; default 10 / 200)")
    p.add_argument("--eval-max-new-tokens", type=int, default=None, help="decode budget (default: tiny 512, else 3500)")
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every k steps (and at the end; default: "
                   "tiny 700, else 175)")
    p.add_argument("--seed", type=int, default=0, help="seed for init, data order and augmentation")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    tiny = args.model == "tiny"
    # The tiny column was chosen by measurement (README, "Making the tiny model learn"): small batches and many
    # optimizer steps, N growing from 3 (curriculum), the one-line system turn, the fix-order trace, Muon, and new
    # cells made by pooling (mix) and ambient UMIs (the model learns the markers instead of its 490 train cells),
    # and mostly hard puzzles (easy_keep: the teacher reads its own train cells too well, so few train puzzles need
    # the candidates or the one-to-one rule, unlike held-out ones), with N drawn in proportion to N (n_weights: the
    # margin over the argmax is thinnest at large N).
    for k, t, real in [("batch_size", 8, 96), ("micro_batch", 8, 1), ("lr", 1e-3, 5e-5), ("warmup", 20, 0),
                       ("schedule", "cosine", "linear"), ("weight_decay", 0.1, 0.0), ("eval_puzzles", 10, 200),
                       ("eval_max_new_tokens", 512, 3500), ("steps", 1400, None), ("curriculum", 0.5, 0.0),
                       ("system", "short", "released"), ("eval_every", 700, 100), ("trace_order", "fix", "cell"),
                       ("optim", "muon", "adamw"), ("muon_lr", 0.01, 0.02), ("mix", 0.5, 0.0), ("ambient", 0.5, 0.0),
                       ("ema", 0.995, 0.0), ("save_every", 700, 175), ("easy_keep", 0.1, 1.0),
                       ("n_weights", "linear", "uniform")]:
        if getattr(args, k) is None:
            setattr(args, k, t if tiny else real)
    for k in ("mix", "ambient", "easy_keep", "shuffle"):
        if not 0 <= getattr(args, k) <= 1:
            p.error(f"--{k.replace('_', '-')} is a probability: got {getattr(args, k)}, need 0..1")
    return args


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = init_distributed()
    torch.manual_seed(args.seed)
    tok_dir = tokenizer_source(args.model, args.tokenizer)
    tok = load_tokenizer(tok_dir)
    end_id = tok.token_to_id("<|im_end|>")
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the number of ranks ({world})")
    start = prepare_run_dir(args.out, args.resume, "sft_log.jsonl")
    examples = Examples(args.data, args.seed, args.split, args.skip_bad, args.trace_order, trace_form=args.trace_form,
                        mix=args.mix, ambient=args.ambient, easy_keep=args.easy_keep, shuffle=args.shuffle,
                        n_weights=args.n_weights)
    if args.steps:
        steps = args.steps
    elif len(examples):
        steps = max(1, int(args.epochs * len(examples)) // args.batch_size)
    else:
        raise SystemExit("the embedded stream is endless: pass --steps")
    examples.ramp = int(args.curriculum * steps * args.batch_size)
    model, model_dir = build_model(args.model, tok, device, args.seed)
    model.grad_checkpointing = args.grad_checkpointing
    with torch.device("meta"):  # the sampler's plain bf16 copy, filled by sync_weights before each generation
        infer = Transformer(model.config)
    infer = infer.to_empty(device=device).to(torch.bfloat16).eval()
    infer.tie_weights()
    shard(model, device)
    optim = make_optimizer(model, args.optim, args.lr, args.weight_decay, args.muon_lr)
    ema = EMA(model, args.ema, int(args.ema_start * steps)) if args.ema else None
    if start:
        load_checkpoint(args.out, model, optim, ema, args)
    eval_set = eval_puzzles(args.eval_data or ("embedded" if args.data == "embedded" else args.data),
                            args.eval_puzzles, args.seed + 1)
    log = Log(os.path.join(args.out, "sft_log.jsonl"))
    n_params = sum(p.numel() for p in model.parameters())
    if rank == 0:
        print(f"SFT: {n_params / 1e6:.1f}M params, {world} rank(s) on {device}, steps {start}->{steps}, global batch "
              f"{args.batch_size}, data {args.data}, eval {len(eval_set)} puzzles, out {args.out}")
    per_rank = args.batch_size // world
    system = SHORT_SYSTEM if args.system == "short" else None

    def run_eval(step):
        sync_weights(model, infer, ema.shadow if ema else None)  # with --ema the average is the model evaluated
        m, texts = evaluate(infer, tok, eval_set, args.eval_max_new_tokens, progress=False, system=system)
        log({"step": step, "eval": m, "samples": texts[:2]}, f"step {step} {eval_line(m)}")

    bar = tqdm(range(start, steps), initial=start, total=steps, desc="sft", disable=rank != 0 or args.no_progress)
    for step in bar:
        t0 = time.time()
        lr = lr_at(step, steps, args.lr, args.warmup, args.schedule, args.min_lr_ratio)
        for g in optim.param_groups:
            g["lr"] = lr * g.get("base_lr", args.lr) / args.lr  # Muon's matrices follow the same schedule
        first = step * args.batch_size + rank * per_rank  # this rank's contiguous share of the global batch
        batch = [tokenize(tok, *examples[i], end_id, args.max_len, f"example {i}", system)
                 for i in range(first, first + per_rank)]
        batch.sort(key=lambda b: len(b[0]))  # packed, the loss does not depend on the order: kept so runs reproduce
        micro = [collate(batch[j:j + args.micro_batch], device) for j in range(0, per_rank, args.micro_batch)]
        # completion tokens and all tokens in the global batch (the first is the token-mean's denominator)
        counts = torch.tensor([sum((y >= 0).sum().item() for _, y, *_ in micro), sum(len(ids) for ids, _ in batch)],
                              dtype=torch.float64, device=device)
        dist.all_reduce(counts)
        n_tok = counts[0].float()
        loss_sum = torch.zeros((), device=device)
        for x, y, sel, pos, lens in micro:
            with autocast(device):
                # (selected positions, vocab): lm_head only where the loss is
                logits = model(x, logits_at=sel, positions=pos, packed=lens)
            loss = F.cross_entropy(logits.float(), y[sel], ignore_index=-100, reduction="sum")
            # FSDP2 averages gradients over ranks; x world makes the result sum / global token count.
            (loss * world / n_tok).backward()
            loss_sum += loss.detach()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm
        optim.step()
        optim.zero_grad(set_to_none=True)
        if ema:
            ema.update(step + 1)
        dist.all_reduce(loss_sum)
        dt = time.time() - t0
        rec = {"step": step + 1, "loss": loss_sum.item() / n_tok.item(), "lr": lr, "grad_norm": gnorm.item(),
               "tokens_per_s": counts[1].item() / dt, "step_time_s": dt}
        log(rec, f"step {step + 1}/{steps} | loss {rec['loss']:.4f} | lr {lr:.2e} | gnorm {rec['grad_norm']:.3f} | "
                 f"tok/s {rec['tokens_per_s']:.0f} | {dt:.2f}s")
        done = step + 1 == steps
        if args.eval_every and (step + 1) % args.eval_every == 0 and not done:
            run_eval(step + 1)
        if (step + 1) % args.save_every == 0 or done:
            save_checkpoint(args.out, model, optim, {"step": step + 1, "args": vars(args)}, model_dir or tok_dir, ema)
    bar.close()
    if start < steps or not os.path.exists(os.path.join(args.out, "model")):
        run_eval(steps)
        if rank == 0:
            publish_model(args.out)
    dist.barrier()
    del model, optim, infer, ema  # free before destroy_process_group: a rank sometimes aborts at exit otherwise
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
