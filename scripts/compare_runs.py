"""Seeds of the main job side by side: each run's SFT model, its SFT + GRPO model and (with --more-sft) the control,
scored on the same held-out sets; every GRPO model is compared with its own SFT model.

    python pipeline.py --seed 0 --out runs/seed0        # and --seed 1, --seed 2
    python scripts/compare_runs.py runs/seed0 runs/seed1 runs/seed2 --more-sft 600 --out results/seeds

Held-out set j is `data.test_puzzles(per_n=--per-n, seed=1000 + j)` (600 puzzles of test cells, N = 3..8, greedy
decoding), the sets of scripts/ablate_rl.py. All sets reuse the same ~210 test cells, so no interval over puzzles is
given: every set and every seed is shown, with the smallest gain over them all. The control (--more-sft K): K more
SFT steps from the run's SFT model on all train cells, those GRPO's prompts came from included (`--cells all`),
at the recipe's final lr: the minutes of the GRPO stage spent on SFT instead, given the same cells. Scores are cached
in each model's run folder; an interrupted comparison goes on where it stopped. Writes OUT/runs.md and runs.json.
"""
import argparse
import json
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import data  # noqa: E402
from ablate_rl import MORE_SFT, heldout_sets, score, train  # noqa: E402
from train_common import write_json, write_text  # noqa: E402

MODELS = ("SFT", "SFT + GRPO", "more SFT")


def run_seed(run: str) -> int:
    """The training seed the pipeline gave both stages (pipeline.json)."""
    flags = json.load(open(os.path.join(run, "pipeline.json")))["sft_args"]
    where = [k for k, f in enumerate(flags) if f == "--seed"]
    return int(flags[where[-1] + 1]) if where else 0  # the last one: a user's flag overrides the pipeline's


def model_dirs(run: str, more_sft: int) -> dict[str, str]:
    dirs = {"SFT": os.path.join(run, "sft"), "SFT + GRPO": os.path.join(run, "rl")}
    if more_sft:
        dirs["more SFT"] = os.path.join(run, f"more_sft_{more_sft}")
    return dirs


def fmt(xs: list[float]) -> str:
    return " / ".join(f"{x:.3f}" for x in xs)


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def report(scores: dict, baselines: dict, args) -> str:
    """scores: run -> model -> sets -> metrics; baselines: method -> sets -> metrics."""
    batch = lambda ms: [m["batch_acc"] for m in ms]  # noqa: E731
    lines = [f"# Main-job seeds compared\n\n{len(scores)} runs, {args.sets} held-out sets x {6 * args.per_n} puzzles "
             "of test cells (greedy). Command: `python " + " ".join(shlex.quote(a) for a in sys.argv) + "`\n",
             "| run | model | batch acc per set | mean batch | mean cell | GRPO - this, per set |", "|---|---|---|---|---|---|"]
    for name, ms in baselines.items():
        lines.append(f"| all | {name} | {fmt(batch(ms))} | {mean(batch(ms)):.3f} | "
                     f"{mean([m['cell_acc'] for m in ms]):.3f} | |")
    gains, teacher = [], batch(baselines["teacher (Hungarian)"])
    for run, models in scores.items():
        rl = batch(models["SFT + GRPO"])
        for model, ms in models.items():
            diff = [a - b for a, b in zip(rl, batch(ms))]
            lines.append(f"| {run} | {model} | {fmt(batch(ms))} | {mean(batch(ms)):.3f} | "
                         f"{mean([m['cell_acc'] for m in ms]):.3f} | {'' if model == 'SFT + GRPO' else fmt(diff)} |")
        gains.append([a - b for a, b in zip(rl, batch(models["SFT"]))])
    flat = [g for gs in gains for g in gs]
    rl_mean = mean([mean(batch(m["SFT + GRPO"])) for m in scores.values()])
    lines += ["", f"GRPO minus its own SFT model, batch accuracy: mean {mean(flat):+.3f}, smallest {min(flat):+.3f} "
              f"over {len(flat)} (run, set) pairs; SFT + GRPO {rl_mean:.3f} against the teacher's {mean(teacher):.3f} "
              "(mean over runs and sets)."]
    if all("more SFT" in m for m in scores.values()):
        ctl = [mean(batch(m["SFT + GRPO"])) - mean(batch(m["more SFT"])) for m in scores.values()]
        lines.append(f"GRPO minus the more-SFT control ({args.more_sft} steps), per run: {fmt(ctl)}.")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("runs", nargs="+", help="main-job run folders (python pipeline.py --seed K --out FOLDER)")
    ap.add_argument("--out", default="runs/compare", help="folder for runs.md and runs.json")
    ap.add_argument("--sets", type=int, default=3, help="held-out sets (seeds 1000, 1001, ...)")
    ap.add_argument("--per-n", type=int, default=100, help="held-out puzzles per N in each set (N = 3..8: 600)")
    ap.add_argument("--max-new-tokens", type=int, default=512, help="decode budget of the scoring")
    ap.add_argument("--more-sft", type=int, default=0, help="the control: this many more SFT steps from each run's "
                    "SFT model, on all train cells (0: none)")
    ap.add_argument("--sft-args", default="", help="extra train_sft.py flags for the control, after its own")
    args = ap.parse_args()
    for run in args.runs:
        if not os.path.exists(os.path.join(run, "rl", "model", "config.json")):
            raise SystemExit(f"{run} holds no finished main job (rl/model); run pipeline.py there first")
    if args.more_sft:
        for run in args.runs:
            train("train_sft.py", os.path.join(run, "sft", "model"), model_dirs(run, args.more_sft)["more SFT"],
                  run_seed(run), ["--steps", str(args.more_sft), *shlex.split(MORE_SFT), *shlex.split(args.sft_args)])
    sets = heldout_sets(args.sets, args.per_n)
    from pipeline import baselines
    teacher = data.fit_embedded_teacher(data.embedded())  # fitted once for all sets
    per_method = [baselines(s, teacher) for s in sets]
    base = {name: [b[name] for b in per_method] for name in ("per-cell argmax", "teacher (Hungarian)")}
    cache = f"heldout_{args.sets}x{args.per_n}.json"
    scores = {os.path.basename(os.path.normpath(run)): {
        model: score(os.path.join(d, "model"), sets, os.path.join(d, cache), args.max_new_tokens)
        for model, d in model_dirs(run, args.more_sft).items()} for run in args.runs}
    text = report(scores, base, args)
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "runs.json"), {"scores": scores, "baselines": base})
    write_text(os.path.join(args.out, "runs.md"), text)
    print(text)


if __name__ == "__main__":
    main()
