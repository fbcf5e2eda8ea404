"""GRPO ablation runner: from one SFT model, the GRPO stage for each flag set x training seed, every final model
scored on the same held-out sets (test cells only, greedy), one table and one plot.

    python scripts/ablate_rl.py --sft runs/main/sft/model --out runs/ablate \
        --set base= --set batch="--reward-mode batch" --set dr-grpo="--no-adv-std-norm" --seeds 0 1

Each run is `train_rl.py --model SFT --out OUT/<set>/seed<k> --seed k <common flags> <set flags> --resume`, so an
interrupted study goes on where it stopped (finished runs and scored models are skipped). Held-out set j is
`data.test_puzzles(per_n=--per-n, seed=1000 + j)`: all sets reuse the same test cells, so the table's interval is
over training seeds (each seed's accuracy averaged over the sets), not over puzzles. Writes OUT/ablation.md (mean
and 95% t-interval of cell and batch accuracy per flag set, the SFT model's row first, per N with --per-n-table) and
OUT/ablation.png (the rollouts' exact share and held-out batch accuracy through training, one line per flag set). With
--more-sft K the control row: K more SFT steps from the same model per seed (the minutes GRPO takes, spent on SFT).
"""
import argparse
import json
import math
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
from train_common import write_json, write_text  # noqa: E402

T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}  # t(0.975, df)


def parse_sets(items: list[str]) -> dict[str, list[str]]:
    sets = {}
    for item in items:
        name, _, flags = item.partition("=")
        sets[name] = shlex.split(flags)
    return sets


def train(script: str, sft: str, out: str, seed: int, flags: list[str]) -> None:
    """`script` (train_rl.py or train_sft.py) from the SFT model into `out`, unless its model is there already."""
    if os.path.exists(os.path.join(out, "model", "config.json")):
        return
    cmd = [sys.executable, os.path.join(ROOT, script), "--model", sft, "--out", out, "--seed", str(seed),
           "--resume", "--no-progress", *flags]
    print(f"\n== {shlex.join(cmd)}", flush=True)
    if subprocess.call(cmd):  # in the caller's folder: the paths given are relative to it
        raise SystemExit(f"{script} run {out} failed; fix the cause and run the same command again: it resumes")


# The honest control: the same minutes spent on more SFT from the same model, at the tiny recipe's final lr (its
# cosine ends at 0.1 x 1e-3; Muon's at 0.1 x 0.01), constant, every N from the first step, on all train cells (the
# ones GRPO's prompts come from included: the control gets the same cells, as teacher traces instead of rewards).
MORE_SFT = "--lr 1e-4 --muon-lr 1e-3 --schedule constant --warmup 0 --curriculum 0 --eval-every 0 --cells all"


def weights_stamp(model_dir: str) -> list:
    """(name, size, mtime in ns) of the model's weight files: changes whenever they are rewritten or copied."""
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    stats = [os.stat(os.path.join(model_dir, f)) for f in files]
    return [[f, st.st_size, st.st_mtime_ns] for f, st in zip(files, stats)]


def score(model_dir: str, sets: list, cache: str, max_new_tokens: int) -> list[dict]:
    """metrics() of the model on each held-out set, cached in `cache` with the weights' stamp: a model trained on
    (a resumed, longer run) or copied in is scored again, never reported with its predecessor's numbers."""
    stamp = weights_stamp(model_dir)
    if os.path.exists(cache):
        saved = json.load(open(cache))
        if isinstance(saved, dict) and saved.get("weights") == stamp:
            return saved["sets"]
    from pipeline import decode_model
    res = [decode_model(model_dir, puzzles, max_new_tokens)[0] for puzzles in sets]
    write_json(cache, {"weights": stamp, "sets": res})
    return res


def heldout_sets(n_sets: int, per_n: int) -> list[list]:
    """Held-out set j = data.test_puzzles(per_n, seed=1000 + j) of the embedded test cells (greedy scoring sets)."""
    cells = data.embedded()
    return [data.test_puzzles(cells, data.CPU, per_n=per_n, seed=1000 + j) for j in range(n_sets)]


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of a 95% t-interval (0 for a single value)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    return m, T95.get(len(values) - 1, 1.96) * sd / math.sqrt(len(values))


def table(scores: dict[str, list[list[dict]]], n_sets: int, per_n: bool) -> str:
    """scores: name -> seeds -> sets -> metrics. One row per flag set (and per N)."""
    head = ("| flag set | seeds | cell acc (95% CI over seeds) | batch acc (95% CI over seeds) | batch acc per set "
            "(mean over seeds) |\n|---|---|---|---|---|")
    rows = [head]
    keys = [None] + (sorted({int(n) for runs in scores.values() for r in runs for s in r for n in s["by_n"]})
                     if per_n else [])
    for n in keys:
        for name, runs in scores.items():
            pick = (lambda m: m) if n is None else (lambda m: m["by_n"].get(str(n)) or m["by_n"][n])
            cell = [sum(pick(s)["cell_acc"] for s in r) / len(r) for r in runs]
            batch = [sum(pick(s)["batch_acc"] for s in r) / len(r) for r in runs]
            sets = [sum(pick(r[j])["batch_acc"] for r in runs) / len(runs) for j in range(n_sets)]
            (c, ch), (b, bh) = mean_ci(cell), mean_ci(batch)
            label = name if n is None else f"{name}, N = {n}"
            rows.append(f"| {label} | {len(runs)} | {c:.3f} ± {ch:.3f} | {b:.3f} ± {bh:.3f} | "
                        + " / ".join(f"{x:.3f}" for x in sets) + " |")
    return "\n".join(rows)


def plot(out: str, runs: dict[str, list[str]]) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "(no plot: `pip install matplotlib`)"
    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    for name, dirs in runs.items():
        logs = [[json.loads(ln) for ln in open(os.path.join(d, "rl_log.jsonl"))] for d in dirs]
        steps = [[r for r in log if "reward_mean" in r] for log in logs]
        k = min(len(s) for s in steps)
        # the rollouts' exact share, not the reward: it means the same under every --reward-mode
        y = [sum(s[i]["batch_acc"] for s in steps) / len(steps) for i in range(k)]
        smooth = [sum(y[max(0, i - 4):i + 1]) / len(y[max(0, i - 4):i + 1]) for i in range(k)]
        ax[0].plot([steps[0][i]["step"] for i in range(k)], smooth, label=name)
        evals = [[r for r in log if "eval" in r] for log in logs]
        k = min(len(e) for e in evals)
        ax[1].plot([evals[0][i]["step"] for i in range(k)],
                   [sum(e[i]["eval"]["batch_acc"] for e in evals) / len(evals) for i in range(k)], marker="o",
                   label=name)
    ax[0].set(title="rollouts solved exactly (5-step mean, mean over seeds)", xlabel="GRPO step")
    ax[1].set(title="held-out batch acc during training (mean over seeds)", xlabel="GRPO step")
    for a in ax:
        a.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "ablation.tmp.png"), dpi=100)
    os.replace(os.path.join(out, "ablation.tmp.png"), os.path.join(out, "ablation.png"))
    return "![ablation](ablation.png)"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sft", required=True, help="the SFT model folder every run starts from")
    ap.add_argument("--out", default="runs/ablate", help="study folder (resumed when it exists)")
    ap.add_argument("--set", action="append", default=[], help="NAME=\"flags\": one flag set (repeat the option); "
                    "NAME= is the defaults")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds of every flag set")
    ap.add_argument("--rl-args", default="--steps 50 --eval-every 10 --eval-puzzles 10",
                    help="flags common to every run, before the set's own")
    ap.add_argument("--eval-sets", type=int, default=3, help="held-out sets (seeds 1000, 1001, ...)")
    ap.add_argument("--per-n", type=int, default=100, help="held-out puzzles per N in each set (N = 3..8: 600)")
    ap.add_argument("--max-new-tokens", type=int, default=512, help="decode budget of the final scoring")
    ap.add_argument("--per-n-table", action="store_true", help="also one row per N")
    ap.add_argument("--more-sft", type=int, default=0, help="the control: this many more SFT steps from --sft per "
                    "seed (MORE_SFT's flags), scored the same way; choose it to take the minutes one GRPO run takes")
    args = ap.parse_args()
    sets = parse_sets(args.set or ["base="])
    os.makedirs(args.out, exist_ok=True)
    common = shlex.split(args.rl_args)
    runs = {name: [os.path.join(args.out, name, f"seed{s}") for s in args.seeds] for name in sets}
    for name, flags in sets.items():
        for seed, out in zip(args.seeds, runs[name]):
            train("train_rl.py", args.sft, out, seed, common + flags)
    control = [os.path.join(args.out, "more-sft", f"seed{s}") for s in args.seeds] if args.more_sft else []
    for seed, out in zip(args.seeds, control):
        train("train_sft.py", args.sft, out, seed, ["--steps", str(args.more_sft), *shlex.split(MORE_SFT)])
    heldout = heldout_sets(args.eval_sets, args.per_n)
    cache = lambda d: os.path.join(d, f"heldout_{args.eval_sets}x{args.per_n}.json")  # noqa: E731
    sft_cache = os.path.join(args.out, f"sft_heldout_{args.eval_sets}x{args.per_n}.json")
    scores = {"SFT (start)": [score(args.sft, heldout, sft_cache, args.max_new_tokens)]}
    for name, dirs in runs.items():
        scores[name] = [score(os.path.join(d, "model"), heldout, cache(d), args.max_new_tokens) for d in dirs]
    if control:
        scores[f"more SFT ({args.more_sft} steps)"] = [score(os.path.join(d, "model"), heldout, cache(d),
                                                             args.max_new_tokens) for d in control]
    text = (f"# GRPO ablation\n\nFrom `{args.sft}`; common flags `{args.rl_args}`; seeds {args.seeds}; "
            f"{args.eval_sets} held-out sets x {args.per_n * 6} puzzles (test cells only, greedy).\n\nCommand: "
            f"`python {' '.join(shlex.quote(a) for a in sys.argv)}`\n\n"
            + "\n".join(f"- {name}: `{shlex.join(flags) or '(defaults)'}`" for name, flags in sets.items())
            + "\n\n" + table(scores, args.eval_sets, args.per_n_table) + "\n\n" + plot(args.out, runs) + "\n")
    write_text(os.path.join(args.out, "ablation.md"), text)
    print(text)


if __name__ == "__main__":
    main()
