"""What both trainers share: the flags they have in common, recipes, the process group, FSDP2, the model and its
inference copy, run folders, checkpoints, the log, the lr schedule, the prompt, seeded rollouts (n samples per
prompt, the same for any rank count) and evaluation (greedy, and the sampled probes). train_sft.py and train_rl.py
import this file and nothing of each other.

Facts this file implements:
  - one code path for 1 and N processes: plain `python` runs as a 1-rank process group (gloo on CPU, NCCL on GPU);
  - FSDP2 shards each transformer block and the root; on GPU bf16 compute with fp32 master weights and fp32
    gradient reduction; on CPU fp32 weights, under bf16 autocast only where the CPU multiplies bf16 natively
    (`--precision auto`, see `use_bf16`);
  - generation (rollouts, evaluation) runs on a plain, unsharded copy of the model that `sync_weights` refills from
    the trained weights before every use, so the sampler never sees stale weights;
  - a run folder holds checkpoint/ (model/ in Hugging Face layout, state/ = sharded weights + optimizer, meta.json),
    model/ (the published final model) and a JSONL log. Every folder is written under a temporary name and swapped
    into place (`replace_dir`): a kill at any moment leaves the previous version or the new one, never half of one;
  - a recipe is a named column of defaults (`tiny`: the 3.7M-parameter CPU model; `paper`: the published recipe for
    a real model). Each trainer holds its table; `pick_recipe` is the one rule that chooses the column.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import reward
from model import ModelConfig, Transformer, encode_chat, save_pretrained, stop_token_ids
from sampler import Sampler

# The CPU default: a 3.7M-parameter Qwen2 trained from scratch with the committed BPE tokenizer (assets/).
TINY = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=2048)
RECIPES = ("tiny", "paper")
CARD = "cello.json"  # written into every model folder we publish: the recipe and the system turn it was trained with

# The tiny model's system turn: the released 138-token instruction is ~30% of every sequence, and a model trained
# from scratch cannot read it anyway. Same layout, a one-line system turn.
SHORT_SYSTEM = ("Assign each cell a distinct candidate type. Answer as <think>...</think> then "
                "<answer>t1 | t2 | ...</answer>.")


# ----------------------------------------------------------------------------------------------------------------------
# Recipes

def model_card(model: str) -> dict:
    """The cello.json of a local model folder ({} for 'tiny', a hub id, or a folder we did not write)."""
    path = os.path.join(model, CARD)
    return json.load(open(path)) if os.path.isfile(path) else {}


def pick_recipe(model: str, recipe: str | None) -> str:
    """The recipe rule: --recipe when given; else the recipe recorded in the start model's cello.json (a model we
    trained keeps its recipe into the next stage); else `tiny` for --model tiny; else `paper`."""
    return recipe or model_card(model).get("recipe") or ("tiny" if model == "tiny" else "paper")


def apply_recipe(args, table: dict[str, tuple]) -> None:
    """Fill every flag left None from the recipe's column of `table` {flag: (tiny, paper)}: an explicit flag wins."""
    col = RECIPES.index(args.recipe)
    for k, values in table.items():
        if getattr(args, k) is None:
            setattr(args, k, values[col])


def system_turn(name: str | None) -> str | None:
    """--system short -> SHORT_SYSTEM; released (or None) -> None, i.e. the puzzle's own system_msg."""
    return SHORT_SYSTEM if name == "short" else None


def messages(p: data.Puzzle, system: str | None = None) -> list[dict]:
    return [{"role": "system", "content": system or p.system}, {"role": "user", "content": p.user}]


# ----------------------------------------------------------------------------------------------------------------------
# Distributed setup, FSDP2, the model

def init_distributed():
    """torchrun sets RANK/WORLD_SIZE; plain `python` runs as a 1-rank group, so there is a single code path.
    NCCL on CUDA, gloo on CPU. Returns (rank, world_size, device)."""
    if "RANK" not in os.environ:
        with socket.socket() as s:  # a free port for the 1-rank rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    else:
        die_with_parent()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        # gloo's threads start here and inherit this signal mask: with SIGINT blocked in them, a Ctrl-C reaches the
        # main thread only (one that landed in gloo's TCP thread left a checkpoint's gather waiting forever)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        dist.init_process_group("gloo")
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return dist.get_rank(), dist.get_world_size(), device


def cpu_times() -> tuple[int, int, int] | None:
    """(busy ticks of all CPUs, total ticks of all CPUs, this process's ticks) from /proc; None where unreadable."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return sum(ticks) - idle, sum(ticks), int(fields[11]) + int(fields[12])  # utime + stime


class CpuThreads:
    """On CPU with OMP_NUM_THREADS unset and one rank: keep torch's thread count at the cores that other processes
    leave free, re-measured every `interval` seconds (call `tick()` once a step). Why: PyTorch's OpenMP threads
    spin while they wait for each other, so two processes with a thread per core each slow each other many-fold,
    not 2-fold (scripts/bench_contention.py). Others' load = busy CPU time (/proc/stat) minus this process's own."""

    def __init__(self, device, interval: float = 5.0):
        self.cores = os.cpu_count() or 1
        wanted = device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ and world_size() == 1 and self.cores > 1
        self.last, self.when, self.interval = cpu_times() if wanted else None, time.time(), interval
        self.active = self.last is not None
        if self.active:
            time.sleep(0.3)  # a first reading before step 1
            self.tick(force=True)

    def tick(self, force: bool = False) -> None:
        if not self.active or (not force and time.time() - self.when < self.interval):
            return
        now = cpu_times()
        busy, total, mine = (a - b for a, b in zip(now, self.last))
        self.last, self.when = now, time.time()
        if total <= 0:
            return
        others = max(0.0, (busy - mine) / total * self.cores)  # cores' worth of other processes' work
        want = max(1, min(self.cores, round(self.cores - others)))
        if want != torch.get_num_threads():
            if dist.is_initialized() and dist.get_rank() == 0:
                print(f"other processes use about {others:.1f} of {self.cores} cores: {want} thread(s) now (set "
                      f"OMP_NUM_THREADS to fix the count)", file=sys.stderr)
            torch.set_num_threads(want)


def die_with_parent() -> None:
    """A torchrun worker asks Linux for SIGKILL when its launcher dies: each worker runs in its own process group,
    so a kill -9 of torchrun would otherwise leave the workers training on, writing the same run folder."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: nothing to ask for


def guarded(main) -> None:
    """Run a trainer's main with one error style: a known failure (bad path or file, bad value, full disk) prints
    one sentence and exits 1, no traceback unless --debug; Ctrl-C says how to go on."""
    debug = "--debug" in sys.argv
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted: the same command with --resume goes on from the last checkpoint", file=sys.stderr)
        sys.exit(130)
    except (OSError, ValueError) as e:
        remove_unstarted_run_dir()
        if debug:
            raise
        print(f"error: {e} (--debug shows the traceback)", file=sys.stderr)
        sys.exit(1)
    except SystemExit as e:
        if e.code not in (None, 0):
            remove_unstarted_run_dir()
        raise


def remove_unstarted_run_dir() -> None:
    """A run that fails before it wrote anything (a bad path, a failed load, a refused flag) leaves no folder behind,
    if it created the folder: an empty one would look like a run to resume. A log or checkpoint keeps it. Rank 0."""
    global _LOCK
    if _CREATED is None or (dist.is_initialized() and dist.get_rank() != 0):
        return
    kept = [f for f in os.listdir(_CREATED) if f != ".lock"] if os.path.isdir(_CREATED) else []
    if not any(os.path.isdir(os.path.join(_CREATED, f)) or os.path.getsize(os.path.join(_CREATED, f)) for f in kept):
        if _LOCK is not None:
            _LOCK.close()
            _LOCK = None
        shutil.rmtree(_CREATED, ignore_errors=True)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce(t: torch.Tensor, op: str = "SUM") -> torch.Tensor:
    """dist.all_reduce in place, a no-op without a process group (so a step also runs in a plain test process)."""
    if dist.is_initialized():
        dist.all_reduce(t, getattr(dist.ReduceOp, op))
    return t


def reduced(values: dict, device, op: str = "SUM") -> dict:
    """{name: number} summed (or "MIN" / "MAX") over ranks in one all_reduce, as float64."""
    t = all_reduce(torch.tensor(list(values.values()), dtype=torch.float64, device=device), op)
    return dict(zip(values, t.tolist()))


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


@functools.cache
def cpu_has_bf16() -> bool:
    """Native bf16 matmul on this CPU (AMX or AVX512-BF16, from /proc/cpuinfo; False where it cannot be read)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def use_bf16(device, precision: str = "auto") -> bool:
    """--precision: bf16 or fp32 as asked; auto = bf16 on GPU and on a CPU with native bf16, else fp32. Without
    native bf16, oneDNN emulates it: on an Ice Lake Xeon a tiny SFT step took 1499 ms under bf16 autocast and 523 ms
    in fp32, and rollouts ran 1.9x faster from an fp32 copy (scripts/bench_precision.py)."""
    return precision == "bf16" or (precision == "auto" and (device.type == "cuda" or cpu_has_bf16()))


def autocast(device, precision: str = "auto"):
    """The training forward's context: on CPU bf16 autocast over fp32 weights when `use_bf16`, else plain fp32.
    On GPU, FSDP2's mixed-precision policy already computes in bf16."""
    if device.type == "cpu" and use_bf16(device, precision):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def infer_dtype(device, precision: str = "auto") -> torch.dtype:
    """The dtype of the sampler's copy: bf16 when `use_bf16`, else fp32."""
    return torch.bfloat16 if use_bf16(device, precision) else torch.float32


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


def note_compiled(rec: dict, args, first_step: bool) -> None:
    """With --compile, the first step of a process records how many graphs torch.compile built (`compiled_graphs`);
    none means every compile failed (dynamo printed why) and the run goes on eagerly, which the console then says."""
    if not (args.compile and first_step):
        return
    from torch._dynamo.utils import counters
    rec["compiled_graphs"] = counters["stats"]["unique_graphs"]
    if rec["compiled_graphs"] == 0 and dist.get_rank() == 0:
        print("--compile: nothing compiled (see the warnings above); training runs eagerly", file=sys.stderr)


def inference_copy(config: ModelConfig, device, dtype) -> Transformer:
    """The sampler's plain (unsharded) model, allocated empty: `sync_weights` fills it before each generation."""
    with torch.device("meta"):
        infer = Transformer(config)
    infer = infer.to_empty(device=device).to(dtype).eval()
    infer.tie_weights()
    return infer


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def sync_weights(trained: Transformer, infer: Transformer, src: dict | None = None):
    """Copy the current (sharded) weights, or `src` (name -> tensor sharded like them, e.g. an EMA's), into the
    inference copy: one all-gather per tensor, every rank gets the full tensor."""
    src = src if src is not None else dict(trained.named_parameters())
    for name, p in infer.named_parameters():
        t = src[name]
        p.copy_(t.full_tensor() if hasattr(t, "full_tensor") else t)


def full_state_dict(model) -> dict:
    """The unsharded state dict on rank 0 (CPU), empty elsewhere: for the Hugging Face checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ----------------------------------------------------------------------------------------------------------------------
# Run folders and checkpoints: <run>/checkpoint/{model/ (HF layout + cello.json), state/rank<r>.pt (rank r's shards),
# meta.json}

def replace_dir(tmp: str, final: str) -> None:
    """Swap a complete folder `tmp` into `final`: the previous `final` is renamed away first and deleted last, so a
    kill at any moment leaves the old or the new folder under `final` (or, between the renames, `final`.old)."""
    old = final + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: str, obj) -> None:
    """JSON written to path.tmp and renamed: never half-written."""
    write_text(path, json.dumps(obj, indent=1))


def write_text(path: str, text: str) -> None:
    """Text written to path.tmp and renamed: never half-written."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


class CtrlCDeferred:
    """`with CtrlCDeferred():` a Ctrl-C (SIGINT) during the block is held until the block ends, then raised as
    KeyboardInterrupt. Why: a Ctrl-C half-way through the write would leave a half-written checkpoint.tmp and print a
    traceback instead of the resume hint. Signals reach only the main thread, so elsewhere this does nothing; nor
    where SIGINT is not Python's default (a shell's background job starts with it ignored and must stay so)."""

    def __enter__(self):
        self.hit, self.old = False, None
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self.old = signal.signal(signal.SIGINT, self.hold)
        return self

    def hold(self, signum, frame):
        self.hit = True

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
        if self.hit and exc[0] is None:
            raise KeyboardInterrupt
        return False


def save_checkpoint(run_dir, model, optim, meta: dict, tokenizer_dir, card: dict, extra: dict | None = None,
                    swap=None):
    """All ranks write checkpoint.tmp (state/ = sharded weights, optimizer and `extra` {name: sharded tensors};
    model/ = the HF model with `card` as cello.json, gathered on rank 0), then rank 0 swaps it into place.
    `swap`: a callable that exchanges the weights with other values in place (an EMA's), called before and after
    the HF model is gathered, so model/ holds those values. A Ctrl-C meanwhile takes effect once it is in place."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    final, tmp = os.path.join(run_dir, "checkpoint"), os.path.join(run_dir, "checkpoint.tmp")
    with CtrlCDeferred():
        msd, osd = get_state_dict(model, optim)
        state = {"model": msd, "optim": osd, **(extra or {})}
        check_free_space(run_dir, state, model)
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        try:
            _write_checkpoint(tmp, state, model, meta, tokenizer_dir, card, swap)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoint stays as it was
            raise
        if dist.get_rank() == 0:
            replace_dir(tmp, final)
        dist.barrier()


def tensor_bytes(tree) -> int:
    """Bytes of all tensors in a nested dict / list (this rank's shards of DTensors)."""
    if isinstance(tree, torch.Tensor):
        t = local(tree)
        return t.numel() * t.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(v) for v in tree)
    return 0


def check_free_space(run_dir: str, state: dict, model) -> None:
    """Refuse, before writing anything, a checkpoint the disk cannot hold: this rank's state shards plus (on rank 0)
    the gathered HF model, with 10% to spare. Every rank checks its own share; all refuse if one must."""
    need = tensor_bytes(state) + (sum(p.numel() * 4 for p in model.parameters()) if dist.get_rank() == 0 else 0)
    free = shutil.disk_usage(run_dir).free
    short = all_reduce(torch.tensor([float(1.1 * need > free)], device=next(model.parameters()).device), "MAX")
    if short.item():
        raise OSError(f"not enough free disk for a checkpoint in {run_dir}: about {1.1 * need / 2**30:.2f} GiB "
                      f"needed, {free / 2**30:.2f} GiB free; free some space or use another --out (the last "
                      f"checkpoint is intact: --resume continues from it)")


def local_tree(tree):
    """A nested dict / list with every tensor replaced by a CPU copy of this rank's shard (DTensor.to_local)."""
    if isinstance(tree, torch.Tensor):
        return local(tree).detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: local_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(local_tree(v) for v in tree)
    return tree


def restore_tree(target, saved):
    """`target`'s structure filled from `saved` (a local_tree of the same state): tensors copied into this rank's
    shards in place, other values taken from `saved`. A key or list that `saved` lacks, or a tensor of another shape,
    raises KeyError / ValueError."""
    if isinstance(target, torch.Tensor):
        if not isinstance(saved, torch.Tensor) or saved.shape != local(target).shape:  # copy_ would broadcast or fail
            raise ValueError(f"{getattr(saved, 'shape', type(saved).__name__)} for a tensor of shape "
                             f"{tuple(local(target).shape)}")
        local(target).copy_(saved)
        return target
    if isinstance(target, dict):
        return {k: restore_tree(v, saved[k]) for k, v in target.items()}
    if isinstance(target, (list, tuple)):
        return type(target)(restore_tree(t, v) for t, v in zip(target, saved, strict=True))
    return saved


def state_file(ckpt_dir: str, rank: int) -> str:
    return os.path.join(ckpt_dir, "state", f"rank{rank}.pt")


def _write_checkpoint(tmp, state, model, meta, tokenizer_dir, card, swap) -> None:
    # Each rank writes its own shards with torch.save. Why not torch.distributed.checkpoint: on this CPU, every step
    # after a dcp.save ran ~35% slower for the rest of the process (elementwise ops about 2x); torch.save does not.
    os.makedirs(os.path.join(tmp, "state"), exist_ok=True)
    torch.save(local_tree(state), state_file(tmp, dist.get_rank()))
    if swap:
        swap()
    hf = full_state_dict(model)  # on 1 rank its tensors can alias the weights: swap back only once they are written
    if dist.get_rank() == 0:
        save_pretrained(hf, model.config, os.path.join(tmp, "model"), tokenizer_dir)
        write_json(os.path.join(tmp, "model", CARD), card)
    del hf
    if swap:
        swap()
    if dist.get_rank() == 0:
        write_json(os.path.join(tmp, "meta.json"), {**meta, "world_size": world_size()})


def read_meta(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "checkpoint", "meta.json")) as f:
        return json.load(f)


def refuse_or_warn(args, why: str) -> None:
    """A resume that would change the run mid-way: refused, or under --force-resume only reported (rank 0)."""
    if not args.force_resume:
        raise SystemExit(why + " (or pass --force-resume if you mean it)")
    if dist.get_rank() == 0:
        print(f"warning: --force-resume: {why.split(': ')[0]}; the run now mixes two setups", file=sys.stderr)


def check_resume(run_dir: str, args, flags: tuple[str, ...]) -> None:
    """Refuse to resume with other values of `flags` (those that define the run's data) than the checkpoint
    recorded, naming the flag. Reads only meta.json: call it before anything is built."""
    saved = read_meta(run_dir)["args"]
    for k in flags:
        was = saved.get(k)
        if k in saved and was != getattr(args, k):
            flag = "--" + k.replace("_", "-")
            refuse_or_warn(args, f"{run_dir} was trained with {flag} {was}, this run has {flag} {getattr(args, k)}: "
                                 f"resume it with {flag} {was}, or start a new run with another --out")


def check_data(run_dir: str, args, fingerprint: str) -> None:
    """Refuse to resume when the data's content changed since the checkpoint (PuzzleStream.fingerprint), though
    its name did not; a checkpoint written before fingerprints were recorded is not checked."""
    was = read_meta(run_dir).get("data_hash")
    if was and was != fingerprint:
        refuse_or_warn(args, f"--data {args.data}: its content changed since {run_dir} was checkpointed (data "
                             f"fingerprint {was}, now {fingerprint}): restore it, or start a new run with another --out")


def missing_state_message(ckpt: str, rank: int) -> str:
    """Why a checkpoint has no state file for `rank`, and what to do."""
    state = os.path.join(ckpt, "state")
    if not os.path.exists(os.path.join(state, ".metadata")):
        return f"{state_file(ckpt, rank)} is missing: the checkpoint is incomplete; start a new run with another --out"
    # written by an older cello with torch.distributed.checkpoint; on 1 process its full state is rank 0's shards
    return (f"{ckpt} was written by an older cello (torch.distributed.checkpoint's format): convert a 1-process run "
            f"with python -c \"from torch.distributed.checkpoint.format_utils import dcp_to_torch_save as c; "
            f"c('{state}', '{state_file(ckpt, 0)}')\", or start a new run with another --out")


def load_checkpoint(run_dir, model, optim, extra: dict | None = None) -> dict:
    """Restore weights, optimizer state and `extra` {name: sharded tensors} in place; returns meta.json. The
    checkpoint holds one file of shards per rank: it resumes on as many ranks as wrote it."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    meta, ckpt = read_meta(run_dir), os.path.join(run_dir, "checkpoint")
    wrote = meta.get("world_size", 1)
    if wrote != world_size():
        raise SystemExit(f"{run_dir} was checkpointed by {wrote} process(es), this run has {world_size()}: resume it "
                         f"with torchrun --nproc_per_node {wrote}" + ("" if wrote > 1 else " or plain python"))
    msd, osd = get_state_dict(model, optim)  # the optimizer's state is initialised, so every tensor has a target
    target = {"model": msd, "optim": osd, **(extra or {})}
    if not os.path.exists(state_file(ckpt, dist.get_rank())):
        raise SystemExit(missing_state_message(ckpt, dist.get_rank()))
    try:
        state = restore_tree(target, torch.load(state_file(ckpt, dist.get_rank()), weights_only=True))
    except (KeyError, ValueError) as e:
        raise SystemExit(f"{ckpt} holds another model or optimizer than this run builds (mismatch: {e}): resume with "
                         f"the flags it was written with (--optim, --model), or start a new run with another --out")
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return meta


def publish_model(run_dir: str) -> None:
    """<run>/model <- the last checkpoint's HF model (for the next stage and transformers). Rank 0 only."""
    final = os.path.join(run_dir, "model")
    shutil.rmtree(final + ".tmp", ignore_errors=True)
    shutil.copytree(os.path.join(run_dir, "checkpoint", "model"), final + ".tmp")
    replace_dir(final + ".tmp", final)


_LOCK = None  # the open run-folder lock file: held for the life of the process, released by the OS when it dies
_CREATED = None  # the run folder, when this process created it (removed again if the run fails before a checkpoint)


def lock_run_dir(run_dir: str) -> None:
    """Take <run>/.lock (rank 0, flock, held until the process ends); every rank refuses to go on, in one sentence,
    when another live run holds it: two runs writing one folder would corrupt its checkpoint and log."""
    global _LOCK, _CREATED
    held = False
    if dist.get_rank() == 0:
        import fcntl
        if not os.path.exists(run_dir):
            _CREATED = run_dir
        os.makedirs(run_dir, exist_ok=True)
        _LOCK = open(os.path.join(run_dir, ".lock"), "a+")
        try:
            fcntl.flock(_LOCK, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _LOCK.seek(0)
            _LOCK.truncate()
            _LOCK.write(f"{os.getpid()}\n")
            _LOCK.flush()
        except BlockingIOError:
            held = True
    flag = [held]
    dist.broadcast_object_list(flag, src=0)
    if flag[0]:
        raise SystemExit(f"{run_dir} is in use by another running process (it holds {run_dir}/.lock): wait for it to "
                         f"end or stop it, or use another --out")


def prepare_run_dir(run_dir: str, resume: bool, log_name: str) -> int:
    """Lock the run folder; refuse to overwrite a run unless resuming; on resume drop log lines past the checkpoint
    (they would be repeated). Returns the step to resume from (0 for a fresh run). Rank 0 only touches files."""
    lock_run_dir(run_dir)
    ckpt = os.path.join(run_dir, "checkpoint", "meta.json")
    step = 0
    if os.path.exists(ckpt):
        if not resume:
            raise SystemExit(f"{run_dir} already holds a checkpoint: pass --resume to continue it, or another --out")
        step = read_meta(run_dir)["step"]
    log = os.path.join(run_dir, log_name)
    if dist.get_rank() == 0 and os.path.exists(log):
        lines = [ln for ln in open(log) if ln.strip() and json.loads(ln).get("step", 0) <= step]
        with open(log, "w") as f:
            f.writelines(lines)
    return step


def run_flags(p, model: str, split: str, out: str, epochs: float) -> None:
    """The flags both trainers take, with the defaults that differ between them as arguments. A flag whose default
    is None is filled from the trainer's recipe table (`apply_recipe`)."""
    g = p.add_argument_group("run (both trainers)")
    a = g.add_argument
    a("--model", default=model, help="start model: 'tiny' (random init), a HF folder (e.g. an SFT run's model/) or a "
      "hub id")
    a("--recipe", default=None, choices=RECIPES, help="the column of defaults (RECIPE) for every flag left unset: "
      "default the recipe in the model folder's cello.json, else tiny for --model tiny, else paper")
    a("--tokenizer", default=None, help="folder with tokenizer.json (default: the model's, or assets/ for tiny)")
    a("--data", default="embedded", help="'embedded' (the PBMC cells) or a CellPuzzles file / folder / hub id")
    a("--split", default=split, help="split of --data to train on")
    a("--skip-bad", action="store_true", help="skip (and count) malformed rows of --data instead of failing")
    a("--system", default=None, choices=["released", "short"], help="system turn: the released instruction or a "
      "one-line one (default: SFT the recipe's; GRPO the start model's cello.json, else released)")
    a("--eval-data", default=None, help="held-out puzzles (default: --data's test split / embedded)")
    a("--out", default=out, help="run folder: checkpoint/, model/ and the JSONL log")
    a("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    a("--force-resume", action="store_true", help="with --resume: go on even though data flags or the data's content "
      "changed (refused otherwise: the run would mix two setups)")
    a("--steps", type=int, default=None, help="optimizer steps (GRPO: rollout batches); default: the recipe's, else "
      "--epochs over a file dataset (GRPO on the embedded data: 100)")
    a("--epochs", type=float, default=epochs, help="epochs over a file dataset when --steps is not given")
    a("--lr", type=float, default=None, help="peak learning rate")
    a("--warmup", type=int, default=None, help="warmup steps")
    a("--schedule", default=None, choices=["cosine", "linear", "constant"], help="lr after warmup")
    a("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of --lr (cosine / linear)")
    a("--weight-decay", type=float, default=None, help="AdamW weight decay")
    a("--clip", type=float, default=1.0, help="gradient clipping max norm")
    a("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="CPU: bf16 autocast over fp32 weights "
      "(rollouts from a bf16 copy), or fp32; auto: bf16 where the CPU has native bf16 (AMX, AVX512-BF16), else "
      "fp32. GPU: always bf16 (FSDP2)")
    a("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    a("--compile", default=None, action=argparse.BooleanOptionalAction, help="torch.compile the blocks' work "
      "around attention and the loss (fused elementwise ops; the first steps pay the compile, a failed compile "
      "falls back to eager with a warning)")
    a("--eval-every", type=int, default=None, help="evaluate every k steps (and at the end); 0: end only")
    a("--eval-puzzles", type=int, default=None, help="held-out puzzles (embedded: per N)")
    a("--eval-max-new-tokens", type=int, default=None, help="decode budget of the evaluation")
    a("--save-every", type=int, default=None, help="checkpoint every k steps (and at the end)")
    a("--seed", type=int, default=0, help="seed for init, data order, augmentation and sampling")
    a("--debug", action="store_true", help="show the traceback of a known failure (bad path, file or value)")
    a("--no-progress", action="store_true", help="no progress bars")
    a("--wandb", default=None, metavar="PROJECT", help="also log every record of the JSONL log (and the flags) to "
      "this Weights & Biases project, rank 0 only; needs `pip install wandb` (offline: WANDB_MODE=offline)")


def parse_run_args(p, argv, table: dict[str, tuple]):
    """Parse, refuse --wandb without the package, then fill the unset flags from the recipe table."""
    args = p.parse_args(argv)
    check_wandb(args)
    args.recipe = pick_recipe(args.model, args.recipe)
    apply_recipe(args, table)
    return args


def check_wandb(args) -> None:
    """--wandb without the package is refused on every rank before anything starts."""
    import importlib.util
    if args.wandb and importlib.util.find_spec("wandb") is None:
        raise SystemExit("--wandb needs wandb, which is not installed: pip install wandb")


def wandb_values(record: dict, prefix: str = "") -> dict:
    """The numbers of a log record, nested dicts flattened to "eval/cell_acc" keys; text (samples) and "step" are
    left to the JSONL file (the step is wandb's own step)."""
    out = {}
    for k, v in record.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(wandb_values(v, key + "/"))
        elif isinstance(v, (bool, int, float)) and key != "step":
            out[key] = v
    return out


class Log:
    """One console line per step (through tqdm) and a JSONL file for machines; rank 0 only. With a wandb project
    every record also goes to wandb.log at its "step", and the run's config is `config` (the flags)."""

    def __init__(self, path: str, wandb_project: str | None = None, config: dict | None = None):
        self.path = path if dist.get_rank() == 0 else None
        self.wandb = None
        if wandb_project and self.path is not None:
            import wandb
            config = {k: sorted(v) if isinstance(v, set) else v for k, v in (config or {}).items()}
            self.wandb = wandb.init(project=wandb_project, config=config,
                                    name=os.path.basename(os.path.dirname(os.path.abspath(path))))

    def __call__(self, record: dict, console: str | None = None):
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(wandb_values(record), step=record["step"])
        if console:
            tqdm.write(console)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


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
# Data and evaluation

def load_rows(source: str, split: str, skip_bad: bool) -> list[data.Puzzle]:
    rows, skipped = data.load_puzzles(source, split, skip_bad=skip_bad)
    if skipped:
        print(f"skipped {skipped} malformed rows of {source} ({split}) under --skip-bad")
    return rows


def eval_source(args) -> str:
    """Where the held-out puzzles come from: --eval-data, else the embedded test cells, else --data's test split. A
    single --data file has no test split of its own (its test split is its own rows): refused unless named."""
    if args.eval_data:
        return args.eval_data
    if args.data != "embedded" and os.path.isfile(args.data):
        raise SystemExit(f"--data {args.data} is one file, so the evaluation would run on the training rows: name the "
                         f"held-out puzzles with --eval-data FILE (--eval-data {args.data} to evaluate on them anyway)")
    return args.data


def eval_puzzles(source: str, limit: int, seed: int) -> list[data.Puzzle]:
    """Held-out puzzles: embedded -> `limit` per N of test cells; a file / folder / hub id -> its test split."""
    if source == "embedded":
        return data.test_puzzles(data.embedded(), data.CPU, per_n=limit, seed=seed)
    puzzles, _ = data.load_puzzles(source, "test")
    return puzzles[:limit] if limit else puzzles


@torch.no_grad()
def evaluate(infer: Transformer, tok, puzzles, max_new_tokens: int, progress: bool,
             system: str | None = None) -> tuple[dict, list[str]]:
    """Greedy decoding: each rank decodes its share, the texts are gathered and scored (reward.metrics). Returns
    (metrics, completions) on every rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = list(range(rank, len(puzzles), world))
    outs = Sampler(infer).generate([encode_chat(tok, messages(puzzles[i], system), True) for i in mine], n=1,
                                   max_new_tokens=max_new_tokens, temperature=0.0,
                                   stop_token_ids=stop_token_ids(tok), progress=progress)
    mine = [(i, tok.decode(o.tokens, skip_special_tokens=True), len(o.tokens)) for i, o in zip(mine, outs)]
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
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
# Rollouts: n seeded samples per prompt, the same for any rank count; the sampled probes

@dataclass
class Rollout:
    group: int              # global prompt index: the group of the n samples of one prompt
    prompt: list[int]
    tokens: list[int]       # generated ids up to and including the first stop id (if one was hit)
    logprobs: list[float]   # the sampler's log_softmax(logits / T) of each token
    finished: bool          # ended on a stop id
    reward: float = 0.0
    advantage: float = 0.0


def trim_at_stop(tokens: list[int], logprobs: list[float], stop_ids) -> tuple[list[int], list[float], bool]:
    """Cut after the first stop id (kept: the model learns to stop); -> (tokens, logprobs, finished)."""
    for k, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[:k + 1], logprobs[:k + 1], True
    return tokens, logprobs, False


def rollout_seed(seed: int, step: int, first_prompt: int) -> int:
    return int(np.random.default_rng([seed, step, first_prompt]).integers(2 ** 62))


def generate_rollouts(infer, prompts, args, step: int, stop_ids) -> list[Rollout]:
    """prompts: [(global index, ids, payload)], contiguous indices. One generate call per --rollout-chunk piece."""
    out, stops, i = [], set(stop_ids), 0
    while i < len(prompts):
        j = i + 1
        while j < len(prompts) and prompts[j][0] // args.rollout_chunk == prompts[i][0] // args.rollout_chunk:
            j += 1
        piece = prompts[i:j]
        comps = Sampler(infer).generate([ids for _, ids, _ in piece], n=args.n, max_new_tokens=args.max_new_tokens,
                                        temperature=args.temperature, stop_token_ids=stop_ids,
                                        seed=rollout_seed(args.seed, step, piece[0][0]), progress=False)
        for c in comps:
            g, ids, _ = piece[c.prompt_index]
            out.append(Rollout(g, ids, *trim_at_stop(c.tokens, c.logprobs, stops)))
        i = j
    return out


PROBE_STEP = 10 ** 9  # the rollout seed's "step" for probes: never a training step's


def probe(infer, puzzles: list, args, tok, stops, system, score) -> dict:
    """--group-size samples at --temperature of each puzzle (each rank a contiguous share, seeded): the share of
    sampled completions that are exact, of puzzles with at least one exact sample (best of n), and of groups whose
    rewards (`score`: the training reward) are all equal (no GRPO gradient), reduced over ranks. On held-out puzzles
    this is the headroom GRPO can turn into greedy accuracy; on train prompts, against held-out, it shows how much the
    policy has memorised."""
    rank, world = (dist.get_rank() if dist.is_initialized() else 0), world_size()
    per = -(-len(puzzles) // world)
    mine = [(i, encode_chat(tok, messages(puzzles[i], system), True), puzzles[i])
            for i in range(rank * per, min(len(puzzles), (rank + 1) * per))]
    rollouts = generate_rollouts(infer, mine, args, PROBE_STEP, stops) if mine else []
    exact, rewards = {}, {}
    for r in rollouts:
        text = tok.decode(r.tokens, skip_special_tokens=True)
        exact.setdefault(r.group, []).append(reward.score(text, puzzles[r.group].answer, "batch") == 1.0)
        rewards.setdefault(r.group, []).append(score(puzzles[r.group], text))
    t = torch.tensor([len(exact), sum(sum(e) for e in exact.values()), sum(any(e) for e in exact.values()),
                      sum(max(r) == min(r) for r in rewards.values())], dtype=torch.float64)
    groups, hits, best, equal = all_reduce(t.to(next(infer.parameters()).device)).tolist()
    return {"puzzles": int(groups), "sampled_exact": hits / max(groups * args.n, 1),
            "best_of_n_exact": best / max(groups, 1), "equal_groups": equal / max(groups, 1)}


class Evaluator:
    """`evaluator(step)`: greedy decoding of the trained weights (or of `shadow`, an EMA of them) on the held-out
    puzzles, logged with `samples` scored completions (`score`: the training reward). With `stream` (GRPO), also
    `probe` (args.probe_puzzles; the sampling flags of GRPO) of every k-th held-out puzzle, all N alike, and of as
    many train prompts far past any step's."""

    def __init__(self, model, infer, tok, puzzles, args, log, score, samples: int = 3, stream=None, stops=None,
                 shadow=None):
        self.model, self.infer, self.tok, self.puzzles, self.args = model, infer, tok, puzzles, args
        self.log, self.score, self.system, self.stops = log, score, system_turn(args.system), stops
        self.samples, self.shadow = samples, shadow
        k = args.probe_puzzles if stream is not None else 0
        self.probes = {"heldout": puzzles[::max(1, len(puzzles) // k)][:k], "train": [
            stream[PROBE_STEP + i] for i in range(k)]} if k else {}

    def __call__(self, step: int):
        t0 = time.time()
        sync_weights(self.model, self.infer, self.shadow)
        m, texts = evaluate(self.infer, self.tok, self.puzzles, self.args.eval_max_new_tokens, progress=False,
                            system=self.system)
        t1 = time.time()
        probes = {name: probe(self.infer, ps, self.args, self.tok, self.stops, self.system, self.score)
                  for name, ps in self.probes.items()}
        seconds = {"eval_s": t1 - t0, "probe_s": time.time() - t1}  # what the evaluation costs the run
        cost = f" | {seconds['eval_s']:.0f}s" + (f" + probes {seconds['probe_s']:.0f}s" if probes else "")
        k = self.samples
        pick = list(range(0, len(self.puzzles), max(1, len(self.puzzles) // max(k, 1))))[:k]
        samples = [{"reward": self.score(self.puzzles[i], texts[i]), "answer": self.puzzles[i].answer,
                    "completion": texts[i]} for i in pick]
        lines = "".join(f"\n  probe {name}: exact {p['sampled_exact']:.3f} sampled, {p['best_of_n_exact']:.3f} best "
                        f"of {self.args.n}, {p['equal_groups']:.2f} of groups all-equal" for name, p in probes.items())
        self.log({"step": step, "eval": m, **({"probe": probes} if probes else {}), "samples": samples, **seconds},
                 f"step {step} {eval_line(m)}{cost}" + lines
                 + "".join(f"\n  reward {s['reward']:+.2f} | {s['completion'][:160]!r}" for s in samples))
