"""pipeline.py, the main job, at toy size (--toy: every stage runs for real, seconds each): every artefact exists and
parses; a run killed mid-way and started again resumes without redoing finished work; other flags are refused."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def cmd(out, *extra):
    return [sys.executable, os.path.join(ROOT, "pipeline.py"), "--toy", "--out", str(out), *extra]


def run(c):
    r = subprocess.run(c, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def jsonl(path):
    return [json.loads(ln) for ln in open(path)]


def check_artefacts(out):
    base = json.load(open(out / "baselines.json"))
    assert set(base) == {"random", "per-cell argmax", "teacher (Hungarian)"}
    for stage, log in (("sft", "sft_log.jsonl"), ("rl", "rl_log.jsonl")):
        assert (out / stage / "model" / "config.json").exists() and (out / stage / "model" / "model.safetensors").exists()
        assert any("eval" in r for r in jsonl(out / stage / log))
        ev = json.load(open(out / f"eval_{stage}.json"))
        assert ev["metrics"]["count"] == 6 and set(ev["metrics"]["by_n"]) == {str(n) for n in range(3, 9)}
    rl = [r for r in jsonl(out / "rl" / "rl_log.jsonl") if "reward_mean" in r]
    assert [r["step"] for r in rl] == [1, 2]
    table = (out / "results.md").read_text()
    for name in ("random", "per-cell argmax", "teacher (Hungarian)", "SFT", "SFT + GRPO"):
        assert f"| all | {name} |" in table
    try:
        import matplotlib  # noqa: F401  (optional: the plot's only dependency)
        assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    except ImportError:
        assert "pip install matplotlib" in table
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]


def test_toy_pipeline_artefacts_and_flag_guard(tmp_path):
    out = tmp_path / "run"
    r = run(cmd(out))
    check_artefacts(out)
    assert "| all | SFT + GRPO |" in r.stdout
    # a second run of the same command redoes nothing: no stage starts
    again = run(cmd(out))
    assert "== SFT" not in again.stdout and "== GRPO" not in again.stdout
    # the same folder under other flags would mix two experiments: refused, nothing touched
    before = (out / "results.md").stat().st_mtime_ns
    r = subprocess.run(cmd(out, "--rl-args=--reward-mode batch"), env=ENV, capture_output=True, text=True)
    assert r.returncode != 0 and "other flags" in r.stderr
    assert (out / "results.md").stat().st_mtime_ns == before


def test_toy_pipeline_killed_then_resumed(tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen(cmd(out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill inside the SFT stage, once its first checkpoint (step 2 of 4) exists
        if (out / "sft" / "checkpoint" / "meta.json").exists():
            break
        assert p.poll() is None, "the pipeline ended before it could be interrupted"
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not (out / "sft" / "model").exists() and not (out / "results.md").exists()
    base = (out / "baselines.json").stat().st_mtime_ns
    r = run(cmd(out))
    check_artefacts(out)
    assert (out / "baselines.json").stat().st_mtime_ns == base  # a finished stage is not redone
    steps = [x["step"] for x in jsonl(out / "sft" / "sft_log.jsonl") if "loss" in x]
    assert steps == [1, 2, 3, 4]  # SFT resumed from its checkpoint: no step logged twice
    assert "== SFT" in r.stdout and "== GRPO" in r.stdout


def test_ablation_runner_at_toy_size(tiny_dir, tmp_path):
    """scripts/ablate_rl.py: every flag set x seed trains from the same SFT model and is scored on the same held-out
    sets; the table has the SFT row and one row per set with its seeds; a second call retrains and rescores nothing."""
    toy = ("--steps 2 --prompts-per-step 2 --group-size 2 --max-new-tokens 8 --eval-every 0 --eval-puzzles 1 "
           "--eval-max-new-tokens 8 --save-every 1 --kl-coef 0 --micro-batch 2 --probe-puzzles 2 --system short")
    c = [sys.executable, os.path.join(ROOT, "scripts", "ablate_rl.py"), "--sft", tiny_dir, "--out", str(tmp_path),
         "--set", "base=", "--set", "batch=--reward-mode batch", "--seeds", "0", "1", "--rl-args", toy,
         "--eval-sets", "2", "--per-n", "1", "--max-new-tokens", "8"]
    run(c)
    table = (tmp_path / "ablation.md").read_text()
    rows = {ln.split(" | ")[0].strip("| "): ln for ln in table.splitlines() if ln.startswith("| ")}
    assert rows["SFT (start)"].split(" | ")[1] == "1" and rows["base"].split(" | ")[1] == "2"
    assert rows["batch"].split(" | ")[1] == "2"
    assert all(len(ln.split(" | ")[4].split(" / ")) == 2 for name, ln in rows.items() if name != "flag set")
    for name in ("base", "batch"):
        for seed in (0, 1):
            args = json.load(open(tmp_path / name / f"seed{seed}" / "checkpoint" / "meta.json"))["args"]
            assert args["seed"] == seed and args["reward_mode"] == ("batch" if name == "batch" else "mixed")
    files = [tmp_path / "base" / "seed0" / name for name in ("model/config.json", "rl_log.jsonl", "heldout_2x1.json")]
    stamps = [f.stat().st_mtime_ns for f in files]
    run(c)
    assert [f.stat().st_mtime_ns for f in files] == stamps  # nothing retrained, rewritten or rescored


def test_compare_runs_at_toy_size(tmp_path):
    """scripts/compare_runs.py on a toy main job of seed 3: the control trains from that run's SFT model with the
    run's seed on all train cells, every model is scored on the same sets, and the summary line's numbers are those
    recomputed from runs.json."""
    run(cmd(tmp_path / "seed3", "--seed", "3"))
    c = [sys.executable, os.path.join(ROOT, "scripts", "compare_runs.py"), str(tmp_path / "seed3"), "--out",
         str(tmp_path / "cmp"), "--sets", "2", "--per-n", "1", "--max-new-tokens", "8", "--more-sft", "2",
         "--sft-args", "--batch-size 2 --micro-batch 2 --eval-puzzles 1 --eval-max-new-tokens 8 --save-every 1"]
    run(c)
    args = json.load(open(tmp_path / "seed3" / "more_sft_2" / "checkpoint" / "meta.json"))["args"]
    assert (args["seed"], args["cells"], args["steps"], args["model"]) == (3, "all", 2, str(tmp_path / "seed3" / "sft"
                                                                                            / "model"))
    res = json.load(open(tmp_path / "cmp" / "runs.json"))
    models = res["scores"]["seed3"]
    assert set(models) == {"SFT", "SFT + GRPO", "more SFT"} and all(len(v) == 2 for v in models.values())
    gains = [a["batch_acc"] - b["batch_acc"] for a, b in zip(models["SFT + GRPO"], models["SFT"])]
    text = (tmp_path / "cmp" / "runs.md").read_text()
    assert f"mean {sum(gains) / 2:+.3f}, smallest {min(gains):+.3f} over 2 (run, set) pairs" in text
    teacher = [m["batch_acc"] for m in res["baselines"]["teacher (Hungarian)"]]
    assert f"against the teacher's {sum(teacher) / 2:.3f}" in text
    stamp = (tmp_path / "seed3" / "rl" / "heldout_2x1.json").stat().st_mtime_ns
    run(c)
    assert (tmp_path / "seed3" / "rl" / "heldout_2x1.json").stat().st_mtime_ns == stamp  # cached
    # new weights under the same folder (a run trained on, a copy) are scored again: here the SFT model's weights,
    # so greedy decoding must give the SFT model's scores exactly
    shutil.copy(tmp_path / "seed3" / "sft" / "model" / "model.safetensors", tmp_path / "seed3" / "rl" / "model")
    run(c)
    assert (tmp_path / "seed3" / "rl" / "heldout_2x1.json").stat().st_mtime_ns != stamp  # rescored
    models = json.load(open(tmp_path / "cmp" / "runs.json"))["scores"]["seed3"]
    assert models["SFT + GRPO"] == models["SFT"]


def test_toy_pipeline_on_a_data_folder(tmp_path):
    """--data FOLDER (the released layout data.py writes): both stages get the folder, and the table scores all of
    its test rows."""
    import data
    data.export(data.embedded(), str(tmp_path / "d"), n_train=40, per_n=1, seed=3)
    out = tmp_path / "run"
    run(cmd(out, "--data", str(tmp_path / "d")))
    check_artefacts(out)
    flags = json.load(open(out / "pipeline.json"))
    assert flags["sft_args"][2:4] == ["--data", str(tmp_path / "d")] == flags["rl_args"][2:4]
    test, _ = data.load_puzzles(str(tmp_path / "d"), "test")
    assert json.load(open(out / "eval_rl.json"))["metrics"]["count"] == len(test)
