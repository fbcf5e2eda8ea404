"""--wandb: every record of the JSONL log reaches wandb.log at its step, with the flags as the run's config. Once
through a stand-in `wandb` module that writes down its calls, once with the real package offline (its .wandb file
read back)."""
import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_WANDB = '''
import json, os
def _write(call, **kw):
    with open(os.environ["FAKE_WANDB_CALLS"], "a") as f:
        f.write(json.dumps({"call": call, **kw}) + "\\n")
class Run:
    def log(self, values, step=None):
        _write("log", values=values, step=step)
    def finish(self):
        _write("finish")
def init(project=None, config=None, name=None):
    _write("init", project=project, config=config, name=name)
    return Run()
'''


TRAINERS = {
    "sft": ["train_sft.py", "--batch-size", "2", "--micro-batch", "2"],
    "rl": ["train_rl.py", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4", "--probe-puzzles",
           "0", "--system", "short"],
}


def train(tiny_dir, out, env, trainer="sft"):
    """A 2-step run with --wandb cello-test; returns its JSONL log records."""
    script, *flags = TRAINERS[trainer]
    cmd = [sys.executable, os.path.join(ROOT, script), "--model", tiny_dir, "--out", str(out), "--steps", "2",
           *flags, "--eval-puzzles", "1", "--eval-max-new-tokens", "4", "--no-progress", "--wandb", "cello-test"]
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(ln) for ln in open(out / f"{trainer}_log.jsonl")]


def numbers(record: dict) -> dict:
    """The numeric leaves of a record by path ("eval/cell_acc"), the step left out."""
    flat, todo = {}, [("", record)]
    while todo:
        prefix, d = todo.pop()
        for k, v in d.items():
            if isinstance(v, dict):
                todo.append((prefix + k + "/", v))
            elif isinstance(v, (int, float)) and prefix + k != "step":
                flat[prefix + k] = v
    return flat


@pytest.mark.parametrize("trainer", ["sft", "rl"])
def test_every_log_record_goes_to_wandb_log(tiny_dir, tmp_path, trainer):
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "wandb.py").write_text(FAKE_WANDB)
    calls = tmp_path / "calls.jsonl"
    records = train(tiny_dir, tmp_path / "run", {"PYTHONPATH": f"{tmp_path / 'fake'}:{ROOT}",
                                                  "FAKE_WANDB_CALLS": str(calls)}, trainer)
    got = [json.loads(ln) for ln in open(calls)]
    meta = json.load(open(tmp_path / "run" / "checkpoint" / "meta.json"))
    assert got[0] == {"call": "init", "project": "cello-test", "config": meta["args"], "name": "run"}
    assert got[-1] == {"call": "finish"}
    assert [(c["step"], c["values"]) for c in got[1:-1]] == [(r["step"], numbers(r)) for r in records]
    assert any("eval/cell_acc" in c["values"] for c in got[1:-1])  # the evaluation's metrics are there too


def wandb_records(path: str):
    """Records of a .wandb file: a LevelDB-style log (7-byte header ':W&B' + magic + version, then 32 KiB blocks of
    chunks: crc32 (4), length (2, little-endian), type (1: full, 2: first, 3: middle, 4: last), data)."""
    raw, pos, buf = open(path, "rb").read(), 7, b""
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:                     # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(raw[pos + 4:pos + 6], "little"), raw[pos + 6]
        chunk, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            yield buf


def test_offline_wandb_run_holds_the_jsonl_metrics(tiny_dir, tmp_path):
    pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2 as pb
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true", "PYTHONPATH": ROOT}
    records = train(tiny_dir, tmp_path / "run", env)
    (path,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "*.wandb"))
    history, config = [], {}
    for data in wandb_records(path):
        r = pb.Record()
        r.ParseFromString(data)
        kind = r.WhichOneof("record_type")
        if kind == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            history.append(row)
        elif kind in ("config", "run"):   # the flags come with the run record (init) or as a config update
            items = r.config.update if kind == "config" else r.run.config.update
            config.update({i.key: json.loads(i.value_json) for i in items})
    # wandb merges the records of one step into one history row
    want = {}
    for rec in records:
        want.setdefault(rec["step"], {}).update(numbers(rec))
    got = {row["_step"]: {k: v for k, v in row.items() if not k.startswith("_")} for row in history}
    assert got == want
    meta = json.load(open(tmp_path / "run" / "checkpoint" / "meta.json"))
    assert {k: v["value"] if isinstance(v, dict) and "value" in v else v for k, v in config.items()
            if not k.startswith("_")} == meta["args"]
