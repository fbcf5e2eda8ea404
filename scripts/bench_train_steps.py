"""The SFT step and the GRPO update step of the embedded default, eager against --compile, in one run: ms per step,
tokens/s, and the share of this CPU's bf16 (or fp32) matmul peak measured in the same run.

    python scripts/bench_train_steps.py          # alone on the machine: a second job changes every number

SFT: the default recipe's step (global batch 8 packed into one row, Muon + AdamW, FSDP2 on 1 rank) on
late-curriculum puzzles (N up to 8). GRPO: the update of one rollout batch of the default (16 prompts x 8 samples,
micro-batches of 16, each group's prompt computed once), the trainer's own functions; the completions are teacher
traces cut at 60-100% of their length, as sampled ones vary. Rollouts (the sampler) are not part of either path.
Each path gets the same batches and an identically initialised model; every batch runs once untimed through both
paths (the compiled one compiles there), then once timed, the paths taking turns to go first. The losses of the timed
pass are of the second visit of each batch (the model has trained on it once), the same for both paths.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import train_rl  # noqa: E402
import train_sft  # noqa: E402
from bench_grpo_step import rollout_batches  # noqa: E402
from model import load_tokenizer  # noqa: E402
from profile_sft_step import peak_gflops, step_flops  # noqa: E402
from train_common import (Rollout, build_model, infer_dtype, init_distributed, shard, system_turn,  # noqa: E402
                          tokenizer_source)


def interleaved(steps: dict, batches, warmup: int) -> dict:
    """Every batch through every path untimed first, then timed, the paths taking turns to go first. Why: oneDNN
    builds a kernel per matmul shape the first time it meets one, and most batches bring a new length, so a path run
    on shapes another path has already met wins by 10-30% (an earlier version of this script, with eager always
    first, credited that to --compile). The first `warmup` batches (the compile) are only run untimed.
    -> {path: (seconds of its untimed runs, seconds per timed step, the timed steps' losses)}."""
    t = {p: [0.0, 0.0, []] for p in steps}
    for b in batches:  # the untimed pass: the warm-up batches, then every timed batch once
        for path, step in steps.items():
            t0 = time.perf_counter()
            step(b)
            t[path][0] += time.perf_counter() - t0
    for i, b in enumerate(batches[warmup:]):
        order = list(steps.items()) if i % 2 == 0 else list(steps.items())[::-1]
        for path, step in order:
            t0 = time.perf_counter()
            loss = step(b)
            t[path][1] += time.perf_counter() - t0
            t[path][2].append(loss)
    return {p: (warm, total / (len(batches) - warmup), losses) for p, (warm, total, losses) in t.items()}


def sft_step(model, optim, targs, device):
    return lambda batch: train_sft.train_step(model, optim, batch, targs, device)["loss"]


def grpo_update(model, optim, rargs, device):
    """The update of one rollout batch: micro-batches, forward + backward of each, clip, optimizer step."""
    def step(rows: list[Rollout]) -> float:
        minis, tokens, seqs = train_rl.minibatches(rows, rargs, device)
        loss = train_rl.minibatch_backward(model, minis[0], rargs, tokens[0], seqs[0], train_rl.Meter(), True)
        torch.nn.utils.clip_grad_norm_(model.parameters(), rargs.clip)
        optim.step()
        optim.zero_grad(set_to_none=True)
        return loss
    return step


def grpo_flops(model, rows: list[Rollout]) -> float:
    """6 x matmul weights per position computed (a group's prompt once) + causal attention of each sequence."""
    c = model.config
    blocks = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and ".layers." in n)
    prompts = {r.group: len(r.prompt) for r in rows}
    positions = sum(prompts.values()) + sum(len(r.tokens) for r in rows)
    attn = sum(3 * 2 * (len(r.prompt) + len(r.tokens)) ** 2 * c.num_attention_heads * c.head_dim
               * c.num_hidden_layers for r in rows)
    return 6 * blocks * positions + attn  # lm_head only at completion tokens: left out (small)


def report(name: str, results: dict, tokens: float, flops: float, peak: float) -> None:
    print(f"\n{name}: {tokens:,.0f} tokens, {flops / 1e9:.1f} GFLOP per step")
    print("| path | ms / step | tokens / s | share of the matmul peak | untimed pass (compile) | first losses |")
    print("|---|---|---|---|---|---|")
    for path, (t_warm, dt, losses) in results.items():
        print(f"| {path} | {dt * 1000:.0f} | {tokens / dt:,.0f} | {flops / dt / 1e9 / peak:.1%} | {t_warm:.1f} s | "
              f"{', '.join(f'{x:.4f}' for x in losses[:3])} |")
    eager, fast = results["eager"][1], results["--compile"][1]
    print(f"{name}: compiled / eager tokens/s = {eager / fast:.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per path")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (the compiled path compiles here)")
    ap.add_argument("--at", type=int, default=1000, help="SFT step of the default run whose batches are used")
    args = ap.parse_args()
    _, _, device = init_distributed()
    targs = train_sft.parse_args(["--out", "unused", "--no-progress"])
    rargs = train_rl.parse_args(["--model", "tiny", "--out", "unused", "--no-progress"])
    rargs.mini_batches = 1
    tok = load_tokenizer(tokenizer_source("tiny", None))
    end, dtype = tok.token_to_id("<|im_end|>"), infer_dtype(device, targs.precision)
    peak = peak_gflops(dtype)
    print(f"{torch.get_num_threads()} threads, {dtype}: a 2048^3 matmul runs at {peak:.0f} GFLOP/s")

    stream = train_sft.examples(targs)
    stream.ramp = int(targs.curriculum * targs.steps * targs.batch_size)
    system, bs, n = system_turn(targs.system), targs.batch_size, args.warmup + args.steps
    batches = [train_sft.examples_at(stream, s * bs, bs, tok, end, targs.max_len, system)
               for s in range(args.at, args.at + n)]
    rollouts = rollout_batches(tok, n, rargs.prompts_per_step, rargs.n)
    for r in (r for b in rollouts for r in b):
        r.advantage = 1.0 if r.group % 2 else -1.0
    sft, grpo = {}, {}
    for path, on in (("eager", False), ("--compile", True)):
        model = shard(build_model("tiny", tok, device, 0)[0].compile_blocks(on), device)
        optim = train_sft.make_optimizer(model, targs.optim, targs.lr, targs.weight_decay, targs.muon_lr, dtype)
        sft[path] = sft_step(model, optim, argparse.Namespace(**{**vars(targs), "compile": on}), device)
        model = shard(build_model("tiny", tok, device, 0)[0].compile_blocks(on), device)
        optim = torch.optim.AdamW(model.parameters(), lr=rargs.lr, weight_decay=rargs.weight_decay)
        grpo[path] = grpo_update(model, optim, argparse.Namespace(**{**vars(rargs), "compile": on}), device)
    sft, grpo = interleaved(sft, batches, args.warmup), interleaved(grpo, rollouts, args.warmup)
    report("SFT step", sft, sum(len(ids) for b in batches for ids, _ in b) / n,
           sum(step_flops(model, b) for b in batches) / n, peak)
    report("GRPO update step", grpo, sum(len(r.prompt) + len(r.tokens) for b in rollouts for r in b) / n,
           sum(grpo_flops(model, b) for b in rollouts) / n, peak)
    del model, optim
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
