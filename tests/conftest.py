"""Test setup. TRITON_INTERPRET must be set before triton is first imported: on a CPU machine the Triton
kernels can only run in the interpreter, which the kernel tests use to compare each kernel with its reference."""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A random 60k-parameter Qwen2 saved in HF layout with the committed tokenizer: the start model of the real
    (torchrun) SFT and GRPO runs in the tests."""
    import data
    from model import ModelConfig, Transformer, load_tokenizer
    tok_dir = os.path.dirname(data.TOKENIZER_PATH)
    cfg = ModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=load_tokenizer(tok_dir).get_vocab_size(),
                      tie_word_embeddings=True, max_position_embeddings=2048)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny") / "model"
    Transformer(cfg).init_weights().save_pretrained(d, tokenizer_dir=tok_dir)
    return str(d)


@pytest.fixture
def strict_compile():
    """torch.compile with its eager fallback off, so a failed compile fails the test (the product's settings are
    applied first, once per process, then the fallback is switched off for this test and restored after it; not
    through monkeypatch, whose undo deletes the key from dynamo's config module). Yields a callable: did anything
    compile since the fixture started?"""
    import torch._dynamo
    from torch._dynamo.utils import counters

    import model
    model.compile_settings()
    fallback, torch._dynamo.config.suppress_errors = torch._dynamo.config.suppress_errors, False
    frames = counters["frames"]["ok"]
    yield lambda: counters["frames"]["ok"] > frames
    torch._dynamo.config.suppress_errors = fallback


@pytest.fixture
def kill9_after():
    """kill9_after(cmd, env, log_path, step): start a trainer in its own session and SIGKILL the whole group once its
    JSONL log holds a record with "step" >= step (the trainer tests' mid-run crash)."""
    def run(cmd, env, log_path, step: int):
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if os.path.exists(log_path) and any(json.loads(ln).get("step", 0) >= step for ln in open(log_path)):
                break
            time.sleep(0.02)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    return run
