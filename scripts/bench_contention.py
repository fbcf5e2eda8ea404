"""Two trainings on one CPU: the SFT step time of a run alone against two runs side by side, with a fixed thread
count per process (every core each: what PyTorch does by default) and with the trainers' CpuThreads (threads follow
the cores the other processes leave free), in one run.

    python scripts/bench_contention.py                  # tiny SFT, 12 steps per run; takes a few minutes

Each run is `train_sft.py` on the embedded data; the step time is the median of its logged `step_time_s` after the
first two steps (the two side-by-side runs: the mean of their medians). Run it on an otherwise idle machine.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(out: str, steps: int, threads: int | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, os.path.join(ROOT, "train_sft.py"), "--out", out, "--steps", str(steps), "--eval-every",
           "0", "--eval-puzzles", "1", "--eval-max-new-tokens", "4", "--save-every", "100000", "--no-progress"]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def step_time(out: str) -> float:
    times = [r["step_time_s"] for r in map(json.loads, open(os.path.join(out, "sft_log.jsonl"))) if "step_time_s" in r]
    return statistics.median(times[2:])


def scenario(tmp: str, name: str, runs: int, steps: int, threads: int | None) -> float:
    outs = [os.path.join(tmp, f"{name}-{k}") for k in range(runs)]
    procs = [launch(out, steps, threads) for out in outs]
    if any(p.wait() for p in procs):
        raise SystemExit(f"a {name} run failed; run train_sft.py by hand to see why")
    return statistics.mean(step_time(out) for out in outs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="SFT steps per run (the first two are not timed)")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    rows = [("one run alone, CpuThreads", 1, None), (f"two runs, {cores} threads each (fixed)", 2, cores),
            ("two runs, 1 thread each (OMP_NUM_THREADS=1)", 2, 1), ("two runs, CpuThreads", 2, None)]
    with tempfile.TemporaryDirectory() as tmp:
        times = [scenario(tmp, f"s{k}", runs, args.steps, threads) for k, (_, runs, threads) in enumerate(rows)]
    print(f"| {cores} cores, tiny SFT step | s / step | x the run alone |\n|---|---|---|")
    for (name, _, _), t in zip(rows, times):
        print(f"| {name} | {t:.2f} | {t / times[0]:.1f}x |")


if __name__ == "__main__":
    main()
