"""The main job, one command: SFT -> GRPO -> evaluation on the embedded PBMC puzzles, with a results table and a plot.

    python pipeline.py                                   # the CPU default, 20-68 minutes on 2 cores
    python pipeline.py --out runs/batch --rl-args="--reward-mode batch"    # an ablation: compare the results.md

Stages, in order; each is skipped when its output exists, so after Ctrl-C or a kill the same command goes on from
the last finished stage (SFT and GRPO resume from their last checkpoint, inside the stage):
  1. baselines.json   random assignment, per-cell marker argmax, the teacher (Hungarian) on the held-out puzzles
  2. sft/             python train_sft.py --out <run>/sft [--sft-args]
  3. rl/              python train_rl.py --model <run>/sft/model --out <run>/rl [--rl-args]
  4. eval_sft.json, eval_rl.json   greedy decoding of each final model on the same held-out puzzles
  5. results.md, curves.png        the table (per N and overall) and the plot of the RL reward and held-out accuracy
Every file is written under a temporary name and renamed, so none is ever half-written. The held-out puzzles are
those of scripts/baselines.py: 50 per N (N = 3..8) from the 30% of cells that no training puzzle uses.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

from train_common import write_json, write_text

ROOT = os.path.dirname(os.path.abspath(__file__))
# SFT on the CPU default: the tiny recipe, held-out evaluation at five points (the plot's SFT curve).
SFT_DEFAULT = "--eval-every 280"
# GRPO on the CPU default: 50 steps of 16 puzzles x 8 samples (~10 min), held-out evaluation every 10 steps.
RL_DEFAULT = "--steps 50 --eval-every 10 --eval-puzzles 10 --eval-before"
# Toy sizes for the pipeline test: every stage runs, each in seconds; the numbers mean nothing.
TOY_SFT = "--steps 4 --batch-size 4 --micro-batch 4 --eval-every 0 --eval-puzzles 1 --eval-max-new-tokens 8 --save-every 2"
TOY_RL = ("--steps 2 --prompts-per-step 2 --group-size 2 --max-new-tokens 8 --eval-every 0 --eval-puzzles 1 "
          "--eval-max-new-tokens 8 --save-every 1 --probe-puzzles 2")


def run_stage(name: str, cmd: list[str]) -> None:
    print(f"\n== {name}: {shlex.join(cmd)}", flush=True)
    t0 = time.time()
    rc = subprocess.call(cmd, cwd=ROOT)
    if rc:
        raise SystemExit(f"{name} failed (exit {rc}); fix the cause and run the same command again: it resumes")
    print(f"== {name} done in {(time.time() - t0) / 60:.1f} min", flush=True)


def baselines(puzzles, teacher=None) -> dict:
    """metrics() of the three reference methods, on rendered completions scored like a model's. They write no
    reasoning: their length is 0 tokens. teacher: the marker model (default: the embedded data's)."""
    import data
    import reward
    answers, zeros = [p.answer for p in puzzles], [0] * len(puzzles)
    teacher = teacher or data.fit_embedded_teacher(data.embedded())
    return {name: reward.metrics([data.render_completion("", f(p)) for p in puzzles], answers, zeros)
            for name, f in data.baselines(teacher).items()}


def folder_data(folder: str):
    """A released-layout folder (python data.py build): (its test puzzles, the marker model fitted on the cells of
    its train and reasoning rows, each listed cell labelled with its gold type)."""
    import data
    test, _ = data.load_puzzles(folder, "test")
    cells, labels = [], []
    for split in ("train", "reasoning"):
        for p in data.load_puzzles(folder, split, skip_bad=True)[0]:
            cells += p.cells
            labels += p.gold
    return test, data.fit_teacher(cells, labels)


def evaluate_model(model_dir: str, puzzles, max_new_tokens: int) -> dict:
    m, texts = decode_model(model_dir, puzzles, max_new_tokens)
    return {"metrics": m, "samples": texts[:5]}


def decode_model(model_dir: str, puzzles, max_new_tokens: int) -> tuple[dict, list[str]]:
    """Greedy decoding of a final model (our sampler; bf16 where the CPU has it natively, else fp32) with the system turn it was trained with (its
    cello.json): (metrics, completions)."""
    import torch

    from model import Transformer, load_tokenizer
    from train_common import evaluate, infer_dtype, init_distributed, model_card, system_turn
    if not torch.distributed.is_initialized():
        init_distributed()  # a 1-rank group: evaluate() gathers over ranks
    model = Transformer.from_pretrained(model_dir, "cpu", infer_dtype(torch.device("cpu"))).eval()
    system = system_turn(model_card(model_dir).get("system"))
    return evaluate(model, load_tokenizer(model_dir), puzzles, max_new_tokens, True, system)


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(ln) for ln in open(path)] if os.path.exists(path) else []


def trailing_mean(y: list[float], k: int = 5) -> list[float]:
    """A trailing k-point mean: one GRPO step's 16 puzzles make a noisy estimate."""
    return [sum(y[max(0, i - k + 1):i + 1]) / len(y[max(0, i - k + 1):i + 1]) for i in range(len(y))]


def plot(run: str, out: str) -> str:
    """curves.png, three panels: SFT (train loss, held-out accuracy), the GRPO rollout reward, and GRPO accuracy on
    its own prompts (the rollouts, sampled) against held-out puzzles (greedy, and the sampled probe): a gap between
    the two is what the policy knows by heart (its prompts' cells carry their labels through the reward).
    matplotlib is optional (the plot's only user): without it the table is still written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: `pip install matplotlib` and run again to draw curves.png"
    sft, rl = read_jsonl(f"{run}/sft/sft_log.jsonl"), read_jsonl(f"{run}/rl/rl_log.jsonl")
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.2))
    steps = [r for r in sft if "loss" in r]
    ax[0].plot([r["step"] for r in steps], trailing_mean([r["loss"] for r in steps], 20), color="gray",
               label="train loss (20-step mean)")
    ax[0].set(title="SFT", xlabel="step", ylabel="loss", yscale="log")
    acc = ax[0].twinx()
    ev = [r for r in sft if "eval" in r]
    for key in ("cell_acc", "batch_acc"):
        acc.plot([r["step"] for r in ev], [r["eval"][key] for r in ev], marker="o", label=f"held-out {key}")
    acc.set(ylim=(0, 1), ylabel="held-out accuracy (greedy)")
    ax[0].legend(*[sum(x, []) for x in zip(ax[0].get_legend_handles_labels(), acc.get_legend_handles_labels())],
                 loc="center right")
    steps = [r for r in rl if "reward_mean" in r]
    x = [r["step"] for r in steps]
    ax[1].plot(x, [r["reward_mean"] for r in steps], alpha=0.4, label="mean reward")
    ax[1].plot(x, trailing_mean([r["reward_mean"] for r in steps]), label="5-step mean")
    ax[1].set(title="GRPO: rollout reward", xlabel="step")
    ax[1].legend()
    ax[2].plot(x, trailing_mean([r["batch_acc"] for r in steps]), label="GRPO prompts, sampled (5-step mean)")
    ev = [r for r in rl if "eval" in r]
    ax[2].plot([r["step"] for r in ev], [r["eval"]["batch_acc"] for r in ev], marker="o", label="held-out, greedy")
    probe = [r for r in ev if "heldout" in r.get("probe", {})]
    if probe:
        ax[2].plot([r["step"] for r in probe], [r["probe"]["heldout"]["sampled_exact"] for r in probe], marker="s",
                   label="held-out probe, sampled")
    ax[2].set(title="GRPO: batch accuracy, its prompts vs held-out", xlabel="step", ylim=(0, 1.02))
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(out + ".tmp.png", dpi=100)
    os.replace(out + ".tmp.png", out)
    return f"![curves]({os.path.basename(out)})"


def report(run: str, minutes: float | None) -> str:
    import reward
    rows = json.load(open(f"{run}/baselines.json"))
    rows["SFT"] = json.load(open(f"{run}/eval_sft.json"))["metrics"]
    rows["SFT + GRPO"] = json.load(open(f"{run}/eval_rl.json"))["metrics"]
    table = reward.format_table(rows, keys=("count", "cell_acc", "batch_acc", "format_rate", "uniqueness", "mean_len"))
    pic = plot(run, f"{run}/curves.png")
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime())
    took = f", {minutes:.0f} min wall for this invocation" if minutes else ""
    return (f"# Results: {os.path.relpath(run, ROOT) if run.startswith(ROOT) else run}\n\n{when}, {os.cpu_count()} CPU cores{took}. Held-out puzzles of test cells only; "
            "greedy decoding. Baseline rows have no reasoning text (mean len 0).\n\n" + table + f"\n\n{pic}\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="runs/main", help="run folder (created; an existing one is resumed)")
    ap.add_argument("--sft-args", default="", help="extra flags for train_sft.py, one string")
    ap.add_argument("--rl-args", default="", help="extra flags for train_rl.py, one string")
    ap.add_argument("--data", default="embedded", help="'embedded', or a released-layout folder (python data.py build "
                    "...): SFT on its reasoning split, GRPO on train, the table on all of test")
    ap.add_argument("--seed", type=int, default=0, help="training seed of both stages (the held-out puzzles stay "
                    "the same: compare seeds on them)")
    ap.add_argument("--eval-per-n", type=int, default=50, help="held-out puzzles per N for the final table")
    ap.add_argument("--eval-max-new-tokens", type=int, default=512, help="decode budget of the final evaluation")
    ap.add_argument("--toy", action="store_true", help="seconds-long stages (tests): the numbers mean nothing")
    ap.add_argument("--wandb", default=None, metavar="PROJECT", help="log both training stages to this Weights & "
                    "Biases project (passed to train_sft.py and train_rl.py; not part of the run's flags)")
    args = ap.parse_args(argv)
    run = os.path.abspath(args.out)
    os.makedirs(run, exist_ok=True)
    # later flags win (argparse): the defaults, then --toy's sizes, then the user's flags
    both = ["--seed", str(args.seed)] + (["--data", os.path.abspath(args.data)] if args.data != "embedded" else [])
    sft_args = both + shlex.split(SFT_DEFAULT) + shlex.split(TOY_SFT if args.toy else "") + shlex.split(args.sft_args)
    rl_args = both + shlex.split(RL_DEFAULT) + shlex.split(TOY_RL if args.toy else "") + shlex.split(args.rl_args)
    if args.toy:
        args.eval_per_n, args.eval_max_new_tokens = 1, 8
    # A run folder belongs to one set of flags: resuming it under other flags would mix two experiments silently.
    flags = {"sft_args": sft_args, "rl_args": rl_args, "eval_per_n": args.eval_per_n,
             "eval_max_new_tokens": args.eval_max_new_tokens}
    if os.path.exists(f"{run}/pipeline.json"):
        before = json.load(open(f"{run}/pipeline.json"))
        if before != flags:
            raise SystemExit(f"{run} was started with other flags ({before}); use another --out or the same flags")
    write_json(f"{run}/pipeline.json", flags)
    if not args.toy:
        print("cello main job: SFT (12-43 min) -> GRPO (8-23 min) -> evaluation (~1 min) on 2 CPU cores; 20 minutes "
              f"in all with native bf16, 68 without. Run folder: {run}. Interrupt at will: the same command resumes.",
              flush=True)
    tracking = ["--wandb", args.wandb] if args.wandb else []  # where a run is watched, not what it computes
    t0 = time.time()
    sys.path.insert(0, ROOT)
    import data
    if args.data == "embedded":
        puzzles, teacher = data.test_puzzles(data.embedded(), data.CPU, per_n=args.eval_per_n, seed=0), None
    else:
        puzzles, teacher = folder_data(args.data)
    if not os.path.exists(f"{run}/baselines.json"):
        write_json(f"{run}/baselines.json", baselines(puzzles, teacher))
    if not os.path.exists(f"{run}/sft/model/config.json"):
        run_stage("SFT", [sys.executable, "train_sft.py", "--out", f"{run}/sft", "--resume", *sft_args, *tracking])
    if not os.path.exists(f"{run}/rl/model/config.json"):
        run_stage("GRPO", [sys.executable, "train_rl.py", "--model", f"{run}/sft/model", "--out", f"{run}/rl",
                           "--resume", *rl_args, *tracking])
    for stage in ("sft", "rl"):
        if not os.path.exists(f"{run}/eval_{stage}.json"):
            print(f"\n== evaluation of {stage}/model on {len(puzzles)} held-out puzzles", flush=True)
            write_json(f"{run}/eval_{stage}.json",
                       evaluate_model(f"{run}/{stage}/model", puzzles, args.eval_max_new_tokens))
    text = report(run, (time.time() - t0) / 60)
    write_text(f"{run}/results.md", text)
    print("\n" + text)
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
