"""train_sft.py: the loss mask, 1 rank == 2 ranks, kill -9 + resume == uninterrupted, checkpoints load in transformers.
The runs are real (torchrun, gloo, FSDP2) on a 60k-parameter model for a few steps."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data
from model import ModelConfig, Transformer, load_tokenizer
from train_sft import pack, summed_nll, tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def test_loss_mask_is_exactly_the_completion_and_end():
    tok = load_tokenizer(os.path.dirname(data.TOKENIZER_PATH))
    end = tok.token_to_id("<|im_end|>")
    p = data.make_puzzle("The cell is from the blood. ", [["LYZ", "CST3"], ["CD3D", "IL7R"]],
                         ["CD14+ Monocyte", "CD4+/CD45RO+ Memory"])
    completion = "<think>x</think>\n<answer>CD14+ Monocyte | CD4+/CD45RO+ Memory</answer>"
    a = tokenize(tok, p, completion, end, 10_000, "a")
    b = tokenize(tok, p, "<think>y</think>\n<answer>B | A</answer>", end, 10_000, "b")
    x, y, sel, pos, lens = pack([a, b], "cpu")
    na, nb = len(a[0]), len(b[0])
    assert lens[:2] == (na, nb) and sum(lens) == x.shape[1] and x.shape[1] % 64 == 0  # packed, then a filler
    assert x[0, :na].tolist() == a[0] and x[0, na:na + nb].tolist() == b[0]
    assert pos[0, :na].tolist() == list(range(na)) and pos[0, na:na + nb].tolist() == list(range(nb))  # own positions
    x, y, sel = x[0], y[0], sel[0]
    loss = y >= 0  # the positions the loss counts
    want = tok.encode(completion, add_special_tokens=False).ids + [end]
    want_b = b[0][b[1]:]
    assert y[loss].tolist() == want + want_b  # the targets: every completion token and <|im_end|>, of both
    assert loss.nonzero()[0].item() == a[1] - 1  # first loss position is the last prompt token
    assert x[a[1]:na].tolist() == want  # and those targets are the inputs that follow
    assert loss[na + b[1] - 1:na + nb - 1].all() and loss.sum().item() == len(want) + len(want_b)
    assert not loss[na - 1] and not loss[na + nb - 1:].any()  # nothing predicts across sequences or in the filler
    assert (sel & loss).equal(loss)  # lm_head runs on every loss position...
    assert sel.sum() % 64 == 0  # ...plus a few prompt positions: bucketed shapes
    assert not (sel & ~loss)[a[1] - 1:na].any() and not (sel & ~loss)[na + b[1] - 1:].any()
    assert not x[na + nb:].any()  # the filler is id 0 (the targets come from lengths, never from a pad id)
    with pytest.raises(ValueError, match="--max-len"):
        tokenize(tok, p, completion, end, 20, "row 7")


def sft_cmd(model, out, nproc=1, steps=4, extra=()):
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={nproc}"]
    return launcher + [os.path.join(ROOT, "train_sft.py"), "--model", model, "--out", str(out), "--steps", str(steps),
                       "--batch-size", "8", "--micro-batch", "2", "--lr", "2e-3", "--warmup", "1", "--eval-every",
                       "0", "--eval-puzzles", "1", "--eval-max-new-tokens", "4", "--save-every", "2",
                       "--no-progress", *extra]


def run(cmd):
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def log(out):
    return [json.loads(ln) for ln in open(os.path.join(out, "sft_log.jsonl"))]


def weights(out):
    return Transformer.from_pretrained(os.path.join(out, "model"), dtype=torch.float32).state_dict()


OPTIMS = {"adamw": [], "muon": ["--optim", "muon", "--muon-lr", "2e-3"],
          # the weight average from step 1 on: its shadows must come back from the checkpoint exactly
          "muon+ema": ["--optim", "muon", "--muon-lr", "2e-3", "--ema", "0.5"]}


def test_two_ranks_equal_one_rank(tiny_dir, tmp_path):
    ema = ["--ema", "0.5"]  # the published model is the average from step 2 (half the run) on (sharded shadows)
    run(sft_cmd(tiny_dir, tmp_path / "r1", nproc=1, extra=ema))
    run(sft_cmd(tiny_dir, tmp_path / "r2", nproc=2, extra=ema))
    r1 = [r for r in log(tmp_path / "r1") if "loss" in r]
    r2 = [r for r in log(tmp_path / "r2") if "loss" in r]
    assert len(r1) == 4 and [r["loss"] for r in r1] == pytest.approx([r["loss"] for r in r2], rel=1e-4)
    assert r1[-1]["loss"] < r1[0]["loss"]  # it learns
    # AdamW is blind to a constant gradient scale, so the weights alone would not catch a gradient mis-scaled by the
    # number of ranks: the logged (pre-clip) gradient norm does
    assert [r["grad_norm"] for r in r1] == pytest.approx([r["grad_norm"] for r in r2], rel=1e-3)
    w1, w2 = weights(tmp_path / "r1"), weights(tmp_path / "r2")
    # Each step moves a weight by up to ~lr = 2e-3; the two runs differ only by float summation order (bf16 autocast),
    # which Adam amplifies for near-zero gradients: measured max 8e-5 after 4 steps
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=3e-4, rtol=0, msg=k)
    e1 = [r["eval"] for r in log(tmp_path / "r1") if "eval" in r]
    assert len(e1) == 1 and e1[0]["count"] > 0  # the final evaluation ran and was scored


def test_compile_flag_trains_like_eager(tiny_dir, tmp_path):
    """--compile end to end (the flag -> compiled blocks and loss in the trainer): step 1 (same weights, same batch)
    logs the loss and gradient norm of eager, in fp32 so that only the fused kernels' order of additions differs
    (fp32 rounding, 6e-8 relative, over sums of at most ~3,000 terms: below 1e-4). Later steps are not compared:
    the optimizer amplifies differences that small."""
    run(sft_cmd(tiny_dir, tmp_path / "eager", steps=2, extra=["--precision", "fp32", "--no-compile"]))
    run(sft_cmd(tiny_dir, tmp_path / "fused", steps=2, extra=["--precision", "fp32", "--compile"]))
    a, b = ([r for r in log(tmp_path / run_dir) if "loss" in r] for run_dir in ("eager", "fused"))
    assert b[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-4)
    assert b[0]["grad_norm"] == pytest.approx(a[0]["grad_norm"], rel=1e-4)
    assert b[0]["compiled_graphs"] > 0 and "compiled_graphs" not in a[0]  # it did compile (no eager fallback)


@pytest.mark.parametrize("optim", OPTIMS)
def test_kill9_and_resume_equals_uninterrupted(tiny_dir, tmp_path, optim, kill9_after):
    run(sft_cmd(tiny_dir, tmp_path / "full", steps=6, extra=OPTIMS[optim]))
    out = tmp_path / "killed"
    # killed once step 3 is logged: the step-2 checkpoint exists, step 4's does not
    kill9_after(sft_cmd(tiny_dir, out, steps=6, extra=OPTIMS[optim]), ENV, out / "sft_log.jsonl", 3)
    assert json.load(open(out / "checkpoint" / "meta.json"))["step"] in (2, 4)
    assert not (out / "model").exists()
    with pytest.raises(AssertionError, match="--resume"):
        run(sft_cmd(tiny_dir, out, steps=6, extra=OPTIMS[optim]))  # an existing run is never overwritten silently
    run(sft_cmd(tiny_dir, out, steps=6, extra=["--resume", *OPTIMS[optim]]))
    steps = [r["step"] for r in log(out) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # lines after the checkpoint were dropped and redone, none repeated
    wa, wb = weights(tmp_path / "full"), weights(out)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5, msg=k)


def test_two_rank_kill9_resumes_on_two_ranks_only(tiny_dir, tmp_path, kill9_after):
    """Each rank's shards come back to that rank: a 2-rank run killed mid-way and resumed on 2 ranks ends with the
    weights of an uninterrupted 2-rank run; resuming it on 1 rank is refused in one sentence."""
    run(sft_cmd(tiny_dir, tmp_path / "full", nproc=2, steps=6))
    out = tmp_path / "killed"
    kill9_after(sft_cmd(tiny_dir, out, nproc=2, steps=6), ENV, out / "sft_log.jsonl", 3)
    assert json.load(open(out / "checkpoint" / "meta.json"))["step"] in (2, 4)
    r = subprocess.run(sft_cmd(tiny_dir, out, steps=6, extra=["--resume"]), env=ENV, capture_output=True, text=True)
    assert r.returncode != 0 and "--nproc_per_node 2" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    run(sft_cmd(tiny_dir, out, nproc=2, steps=6, extra=["--resume"]))
    wa, wb = weights(tmp_path / "full"), weights(out)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save without a process group: intended
def test_older_checkpoint_format_is_refused_with_its_conversion(tiny_dir, tmp_path):
    """A checkpoint in torch.distributed.checkpoint's layout (older cello) is refused in one sentence that holds the
    command converting it; after that command the run resumes from it."""
    import shlex

    import torch.distributed.checkpoint as dcp
    out = tmp_path / "r"
    run(sft_cmd(tiny_dir, out, steps=2))
    state = out / "checkpoint" / "state"
    dcp.save(torch.load(state / "rank0.pt"), checkpoint_id=str(state), no_dist=True)
    (state / "rank0.pt").unlink()
    r = subprocess.run(sft_cmd(tiny_dir, out, steps=2, extra=["--resume"]), env=ENV, capture_output=True, text=True)
    assert r.returncode != 0 and "older cello" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    convert = shlex.split(r.stderr.split("convert a 1-process run with ")[1].split(", or start")[0])
    assert convert[0] == "python"
    subprocess.run([sys.executable, *convert[1:]], env=ENV, check=True)
    run(sft_cmd(tiny_dir, out, steps=2, extra=["--resume"]))  # loads the converted state


def test_resume_with_another_optimizer_or_model_is_refused(tiny_dir, tmp_path):
    """The saved state restores exactly the model and optimizer the run builds: an AdamW run resumed with --optim
    muon (other optimizer state and groups), or with a --model of another shape, is refused in one sentence naming
    the flags, not half loaded."""
    out = tmp_path / "r"
    run(sft_cmd(tiny_dir, out, steps=2))
    r = subprocess.run(sft_cmd(tiny_dir, out, steps=2, extra=["--resume", *OPTIMS["muon"]]), env=ENV,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "--optim" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    wider = tmp_path / "wider"  # the tiny model with a wider MLP: the same names, other shapes
    cfg = {**json.load(open(os.path.join(tiny_dir, "config.json"))), "intermediate_size": 192}
    Transformer(ModelConfig.from_dict(cfg)).init_weights().save_pretrained(str(wider), tokenizer_dir=tiny_dir)
    r = subprocess.run(sft_cmd(str(wider), out, steps=2, extra=["--resume"]), env=ENV, capture_output=True, text=True)
    assert r.returncode != 0 and "--model" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_ema_by_hand():
    """shadow = the weights up to step `start`, then decay * shadow + (1 - decay) * weights; swap exchanges them."""
    from train_sft import EMA
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.9, start=2)
    seen = []
    for step in range(1, 6):
        with torch.no_grad():
            net.weight.copy_(torch.randn(2, 3))  # an "optimizer step"
        seen.append(net.weight.detach().clone())
        ema.update(step)
    want = seen[1]
    for w in seen[2:]:
        want = 0.9 * want + 0.1 * w
    torch.testing.assert_close(ema.shadow["weight"], want)
    torch.testing.assert_close(ema.shadow["bias"], net.bias.detach())  # never changed: the average is itself
    ema.swap()
    torch.testing.assert_close(net.weight.detach(), want)
    torch.testing.assert_close(ema.shadow["weight"], seen[-1])
    ema.swap()
    torch.testing.assert_close(net.weight.detach(), seen[-1])


def test_published_model_is_the_ema(tiny_dir, tmp_path):
    """With --ema, model/ (and checkpoint/model/) holds the shadows saved in the training state, not the weights;
    resuming a run with a different --ema is refused before anything is loaded."""
    out = tmp_path / "r"
    run(sft_cmd(tiny_dir, out, steps=4, extra=["--ema", "0.5"]))
    state = torch.load(out / "checkpoint" / "state" / "rank0.pt")  # 1 rank: its shards are the whole tensors
    pub = weights(out)
    moved = 0
    for k, v in state["ema"].items():
        torch.testing.assert_close(pub[k], v.float(), msg=k)
        moved += not torch.equal(v, state["model"][k])
    assert moved > 0  # the average is not the last weights
    r = subprocess.run(sft_cmd(tiny_dir, out, steps=6, extra=["--resume"]), env=ENV, capture_output=True, text=True)
    assert r.returncode != 0 and "--ema" in r.stderr
    # a data flag changed on resume (here the N weights, uniform for a model folder) is refused the same way
    r = subprocess.run(sft_cmd(tiny_dir, out, steps=6, extra=["--resume", "--ema", "0.5", "--n-weights", "linear"]),
                       env=ENV, capture_output=True, text=True)
    assert r.returncode != 0 and "resume it with --n-weights uniform" in r.stderr, r.stderr[-2000:]


def test_checkpoint_loads_in_transformers(tiny_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    run(sft_cmd(tiny_dir, tmp_path / "r", steps=2))
    ours = Transformer.from_pretrained(str(tmp_path / "r" / "model"), dtype=torch.float32)
    theirs = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "r" / "model", dtype=torch.float32).eval()
    x = torch.randint(0, ours.config.vocab_size, (2, 33))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x).logits, atol=1e-4, rtol=1e-4)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # tied stays tied through FSDP2 and the save
    assert os.path.exists(tmp_path / "r" / "model" / "tokenizer.json")


def sft_stream(**kw):
    """The embedded SFT stream of seed 0 (data.PuzzleStream with teacher traces)."""
    cells = data.embedded()
    return data.PuzzleStream(0, cells=cells, teacher=data.fit_embedded_teacher(cells), **kw)


def test_curriculum_grows_the_largest_n():
    """--curriculum: example i draws N from [3, 3 + ceil(5 i / ramp)], the full range 3..8 once i >= ramp; example i
    stays a pure function of (seed, i)."""
    ex = sft_stream(trace_order="cell", ramp=200)
    early = [ex[i].n for i in range(1, 40)]
    assert all(3 <= n <= 3 + -(-5 * i // 200) for i, n in enumerate(early, 1)) and max(early) == 4
    late = [ex[i].n for i in range(200, 260)]
    assert max(late) == 8 and min(late) == 3
    assert ex[217].assistant == sft_stream(trace_order="cell", ramp=200)[217].assistant
    assert ex[217].assistant.startswith("<think>Cell 1: ") and " (" in ex[217].assistant.split("\n")[0]  # type first


def test_easy_keep_thins_the_easy_puzzles_at_every_n():
    """--easy-keep 0: every example is hard (data.Teacher.hard), N is drawn as in the default stream, and examples
    stay a pure function of (seed, i)."""
    base, hard = (sft_stream(easy_keep=k) for k in (1.0, 0.0))
    base_ex = [base[i] for i in range(60)]
    hard_ex = [hard[i] for i in range(60)]
    assert not all(base.teacher.hard(p) for p in base_ex)
    assert all(hard.teacher.hard(p) for p in hard_ex)
    # N is kept when an easy puzzle is thinned, so N matches the default stream's except after a rejected trace
    # (~5%); redrawn, N would skew to 7-8 and match about 1 time in 6
    assert np.mean([p.n == q.n for p, q in zip(hard_ex, base_ex)]) > 0.8
    assert hard[77].assistant == sft_stream(easy_keep=0.0)[77].assistant


def test_linear_n_weights_draw_n_in_proportion():
    """--n-weights linear: P(N) proportional to N in 3..8 (a rejected trace redraws N the same way, and large N is
    rejected more often, so the counts lean a little below that); examples stay a pure function of (seed, i)."""
    lin, uni = (sft_stream(n_weights=w) for w in ("linear", "uniform"))
    counts = {w: np.bincount([ex[i].n for i in range(400)], minlength=9)[3:] for w, ex in (("l", lin), ("u", uni))}
    # P(8) / P(3) is 8 / 3 for linear weights, 1 for uniform ones
    assert counts["l"][5] > 1.8 * counts["l"][0] and counts["u"][5] < 1.5 * counts["u"][0], counts
    assert (counts["l"] * np.arange(3, 9)).sum() > (counts["u"] * np.arange(3, 9)).sum() + 0.3 * 400, counts
    assert lin[123].assistant == sft_stream(n_weights="linear")[123].assistant


@pytest.mark.parametrize("flag", ["--easy-keep", "--mix", "--ambient"])
def test_probability_flags_outside_0_1_are_refused(flag, capsys):
    from train_sft import parse_args
    assert parse_args([flag, "0.25"]) is not None
    with pytest.raises(SystemExit):
        parse_args([flag, "1.5"])
    assert f"{flag} is a probability" in capsys.readouterr().err


@pytest.mark.parametrize("flags, why", [(["--steps", "0"], "--steps 0"),
                                        (["--micro-batch", "16"], "--micro-batch 16 must be 1..--batch-size (8)")])
def test_bad_flags_are_refused_in_one_sentence(flags, why, capsys):
    from train_sft import parse_args
    with pytest.raises(SystemExit):
        parse_args(flags)
    assert why in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_newton_schulz_is_close_to_the_polar_factor(dtype):
    """Against the SVD: U V^T of g, the orthogonal factor Muon's update approximates; singular values near 1, in
    either precision of the iteration."""
    from train_sft import newton_schulz
    torch.manual_seed(0)
    for shape in [(48, 160), (160, 48), (64, 64)]:
        g = torch.randn(shape) @ torch.diag(torch.logspace(-1, 0, shape[1]))  # singular values over a decade
        u, _, vt = torch.linalg.svd(g, full_matrices=False)
        x = newton_schulz(g, dtype=dtype)
        assert x.shape == g.shape and x.dtype == g.dtype
        s = torch.linalg.svdvals(x)
        assert s.max() < 1.3 and (s > 0.6).float().mean() > 0.9, s  # 5 steps leave only the tiniest below
        cos = (x * (u @ vt)).sum() / (x.norm() * (u @ vt).norm())
        assert cos > 0.95, cos


def test_muon_step_by_hand_and_adamw_part_equals_torch():
    """One Muon group (a 2-D weight) and one AdamW group (a vector) against hand-computed updates and
    torch.optim.AdamW for 3 steps."""
    from train_sft import Muon, newton_schulz
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(32, 8)), torch.nn.Parameter(torch.randn(8))
    b_ref = torch.nn.Parameter(b.detach().clone())
    lr, mlr, wd, m = 1e-2, 0.05, 0.1, 0.95
    opt = Muon([dict(params=[w], muon=True, lr=mlr), dict(params=[b])], lr=lr, weight_decay=wd, momentum=m,
               ns_dtype=torch.float32)
    ref = torch.optim.AdamW([b_ref], lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd)
    w_want, buf = w.detach().clone(), torch.zeros(32, 8)
    for _ in range(3):
        gw, gb = torch.randn(32, 8), torch.randn(8)
        w.grad, b.grad, b_ref.grad = gw, gb.clone(), gb.clone()
        opt.step()
        ref.step()
        buf = m * buf + (1 - m) * gw
        nesterov = (1 - m) * gw + m * buf
        w_want = w_want * (1 - mlr * wd) - mlr * newton_schulz(nesterov, dtype=torch.float32) * (32 / 8) ** 0.5
    torch.testing.assert_close(w.detach(), w_want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.detach(), b_ref.detach(), atol=1e-6, rtol=1e-6)


def _muon_rank(rank: int, world: int, init: str, out: str):
    """One rank: a model of two Linear layers (odd row counts: uneven FSDP2 shards) under fully_shard, given the
    same full gradients as the 1-process run, stepped 3 times by Muon."""
    import gc

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor
    from train_sft import Muon
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 7), torch.nn.Linear(7, 5))
    for layer in net:
        fully_shard(layer)
    opt = Muon([dict(params=[net[0].weight, net[1].weight], muon=True, lr=0.05), dict(params=[net[0].bias, net[1].bias])],
               lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p in net.parameters():
            p.grad = distribute_tensor(torch.randn(p.shape, generator=g), p.device_mesh, p.placements)
        opt.step()
    state = {k: v.full_tensor() for k, v in net.state_dict().items()}
    if rank == 0:
        torch.save(state, out)
    del net, opt  # free before destroy_process_group: a rank sometimes aborts at exit otherwise
    gc.collect()
    dist.destroy_process_group()


def test_muon_on_two_ranks_equals_one_rank(tmp_path):
    """Muon's shard logic alone (gather, orthogonalise, keep this rank's rows), free of the summation-order noise that
    Newton-Schulz amplifies in a training run: the same gradients give the same weights on 1 and 2 ranks."""
    import torch.multiprocessing as mp
    for world in (1, 2):
        mp.spawn(_muon_rank, args=(world, f"file://{tmp_path}/store{world}", str(tmp_path / f"w{world}.pt")),
                 nprocs=world, join=True)
    w1, w2 = torch.load(tmp_path / "w1.pt"), torch.load(tmp_path / "w2.pt")
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-6, rtol=1e-6, msg=k)


def _save_with(tmp_path, monkeypatch, tiny_dir, patch):
    """save_checkpoint twice in a 1-rank group, the second time under `patch`: -> (run folder, first weights)."""
    import gc

    import torch.distributed as dist

    import train_common
    if not dist.is_initialized():
        train_common.init_distributed()
    model = Transformer.from_pretrained(tiny_dir, dtype=torch.float32)
    optim = torch.optim.AdamW(model.parameters())
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    train_common.save_checkpoint(run_dir, model, optim, {"step": 1}, tiny_dir, {"recipe": "paper"})
    first = weights(os.path.join(run_dir, "checkpoint"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    patch(monkeypatch, train_common)
    try:
        with pytest.raises(OSError) as e:
            train_common.save_checkpoint(run_dir, model, optim, {"step": 2}, tiny_dir, {"recipe": "paper"})
    finally:
        del model, optim
        gc.collect()
        dist.destroy_process_group()
    return run_dir, first, str(e.value)


@pytest.mark.parametrize("case", ["full before", "fails while writing"])
def test_a_failed_save_leaves_the_last_checkpoint_and_no_tmp(tmp_path, monkeypatch, tiny_dir, case):
    """A disk too small is refused before anything is written, in one sentence; a write that fails half-way
    (ENOSPC from the HF save) removes checkpoint.tmp. Either way the previous checkpoint is intact."""
    import errno
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")

    def patch(mp, tc):
        if case == "full before":
            mp.setattr(tc.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
        else:
            def enospc(*a, **k):
                raise OSError(errno.ENOSPC, "No space left on device")
            mp.setattr(tc, "save_pretrained", enospc)
    run_dir, first, msg = _save_with(tmp_path, monkeypatch, tiny_dir, patch)
    assert ("not enough free disk" in msg) == (case == "full before")
    assert sorted(os.listdir(run_dir)) == ["checkpoint"]
    assert json.load(open(os.path.join(run_dir, "checkpoint", "meta.json")))["step"] == 1
    again = weights(os.path.join(run_dir, "checkpoint"))
    assert all(torch.equal(first[k], again[k]) for k in first)


def _wait_for_log(path, deadline=120):
    t0 = time.time()
    while time.time() - t0 < deadline:
        if os.path.exists(path) and open(path).read().strip():
            return
        time.sleep(0.05)
    raise AssertionError(f"no log line in {path}")


def test_a_live_run_holds_its_folder(tiny_dir, tmp_path):
    """A second run on the folder of a live one is refused in one sentence, without a traceback; the lock dies with
    its process."""
    import fcntl
    out = tmp_path / "r"
    p = subprocess.Popen(sft_cmd(tiny_dir, out, steps=400), env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_log(out / "sft_log.jsonl")
        r = subprocess.run(sft_cmd(tiny_dir, out, steps=400, extra=["--resume"]), env=ENV, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode != 0 and "in use by another running process" in r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    with open(out / ".lock") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again: the OS released it with the process


def _children(pid: int) -> list[int]:
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                kids.append(int(d))
    return kids


def _running(pids: list[int]) -> list[int]:
    """The pids still running (a zombie has died)."""
    def state(pid):
        try:
            return open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[0]
        except OSError:
            return "gone"
    return [p for p in pids if state(p) not in ("Z", "gone")]


def test_torchrun_workers_die_with_the_launcher(tiny_dir, tmp_path):
    """kill -9 of torchrun alone (not its process group): its workers follow it instead of writing the run on."""
    out = tmp_path / "r"
    p = subprocess.Popen(sft_cmd(tiny_dir, out, nproc=2, steps=400), env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_log(out / "sft_log.jsonl")
        workers = _children(p.pid)
        assert len(workers) >= 2
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        t0 = time.time()
        while time.time() - t0 < 20 and _running(workers):
            time.sleep(0.1)
        assert not _running(workers), f"workers {_running(workers)} outlived torchrun"
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_known_failures_print_one_sentence(tmp_path):
    """A bad path: one line on stderr, no traceback, exit 1; --debug shows the traceback."""
    cmd = [sys.executable, os.path.join(ROOT, "train_sft.py"), "--model", str(tmp_path / "nowhere"), "--out",
           str(tmp_path / "r"), "--steps", "1", "--no-progress"]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.startswith("error: "), r.stderr
    assert not (tmp_path / "r").exists()  # the folder it created is gone again: nothing to mistake for a run
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("mine")
    r = subprocess.run(cmd + ["--debug"], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" in r.stderr
    assert (tmp_path / "r" / "notes.txt").read_text() == "mine"  # a folder it did not create is left alone


def test_ctrl_c_says_how_to_resume(tiny_dir, tmp_path):
    out = tmp_path / "r"
    # A shell's background job (CI scripts, `cmd &`) starts with SIGINT ignored and a child inherits that: the run
    # would then ignore Ctrl-C, as it should. A handled signal is reset to the default across exec, so the child
    # starts as under a terminal. PYTHONFAULTHANDLER: should the run not stop, a SIGABRT prints every thread's stack.
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        p = subprocess.Popen(sft_cmd(tiny_dir, out, steps=400), env={**ENV, "PYTHONFAULTHANDLER": "1"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, before)
    _wait_for_log(out / "sft_log.jsonl")
    p.send_signal(signal.SIGINT)
    try:
        err = p.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGABRT)
        steps = len(open(out / "sft_log.jsonl").read().splitlines())
        raise AssertionError(f"still running 60 s after Ctrl-C ({steps} steps logged); its stacks:\n"
                             + p.communicate(timeout=30)[1])
    assert p.returncode == 130 and "--resume" in err and "Traceback" not in err, err


def test_ctrl_c_waits_for_the_checkpoint():
    """A SIGINT inside CtrlCDeferred (around every checkpoint write) lets the block finish, then interrupts; the
    previous handler is back afterwards (without it a Ctrl-C half-way through a write printed a traceback instead
    of the resume hint: 2 of 12 Ctrl-C runs here, when checkpoints were written with torch.distributed.checkpoint).
    Where SIGINT is ignored (a shell's background job) it stays ignored, inside the block too."""
    import train_common
    before, done = signal.signal(signal.SIGINT, signal.default_int_handler), []  # as under a terminal
    try:
        with pytest.raises(KeyboardInterrupt):
            with train_common.CtrlCDeferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.1)  # the signal is handled here, on the main thread
                done.append(True)
        assert done == [True] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with train_common.CtrlCDeferred():  # no signal: nothing raised
            done.append(True)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with train_common.CtrlCDeferred():  # ignored: nothing held, nothing raised afterwards
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
            done.append(True)
        assert done == [True] * 3 and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_file_data_checks_before_step_1(tiny_dir, tmp_path):
    """One --data file: evaluation on its own rows is refused unless named with --eval-data; a row longer than
    --max-len stops the run before step 1 naming file and row, or is left out under --skip-bad."""
    cells = data.embedded()
    rows = [p for p in (data.PuzzleStream(0, cells=cells, teacher=data.fit_embedded_teacher(cells))[i]
                        for i in range(6))]
    rows[3].assistant = rows[3].assistant.replace("</think>", " long" * 2000 + "</think>")  # 2,000+ more tokens
    path = tmp_path / "reasoning.jsonl"
    data.write_jsonl(rows, str(path))
    base = [sys.executable, os.path.join(ROOT, "train_sft.py"), "--model", tiny_dir, "--data", str(path), "--split",
            "reasoning", "--steps", "2", "--batch-size", "2", "--micro-batch", "2", "--max-len", "1500",
            "--eval-puzzles", "1", "--eval-max-new-tokens", "4", "--no-progress"]
    r = subprocess.run(base + ["--out", str(tmp_path / "a")], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "--eval-data" in r.stderr and "Traceback" not in r.stderr, r.stderr
    named = ["--eval-data", str(path)]
    r = subprocess.run(base + named + ["--out", str(tmp_path / "b")], env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0 and f"{path} row 3: " in r.stderr and "--max-len 1500" in r.stderr, r.stderr
    assert not (tmp_path / "b" / "sft_log.jsonl").exists()  # refused before step 1
    r = subprocess.run(base + named + ["--out", str(tmp_path / "c"), "--skip-bad"], env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "left out 1 rows" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


def test_resume_refuses_changed_file_content(tiny_dir, tmp_path):
    """The same --data path with one row changed: resuming is refused naming --data and the override; with
    --force-resume it goes on, with a warning. Unchanged content resumes silently."""
    cells = data.embedded()
    stream = data.PuzzleStream(0, cells=cells, teacher=data.fit_embedded_teacher(cells))
    rows = [stream[i] for i in range(4)]
    path = tmp_path / "reasoning.jsonl"
    data.write_jsonl(rows, str(path))
    base = [sys.executable, os.path.join(ROOT, "train_sft.py"), "--model", tiny_dir, "--data", str(path), "--split",
            "reasoning", "--eval-data", str(path), "--batch-size", "2", "--micro-batch", "2", "--eval-puzzles", "1",
            "--eval-max-new-tokens", "4", "--no-progress", "--out", str(tmp_path / "r")]
    run(base + ["--steps", "2"])
    run(base + ["--steps", "2", "--resume"])  # same content: resumes (a finished run: nothing left to do)
    rows[1].assistant = rows[1].assistant.replace("Cell 1:", "Cell 1 :")
    data.write_jsonl(rows, str(path))
    r = subprocess.run(base + ["--steps", "2", "--resume"], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "--data" in r.stderr and "content changed" in r.stderr, r.stderr[-2000:]
    assert "--force-resume" in r.stderr and "Traceback" not in r.stderr
    r = run(base + ["--steps", "2", "--resume", "--force-resume"])
    assert "warning: --force-resume" in r.stderr


def test_cpu_threads_follow_other_processes(monkeypatch):
    """CpuThreads against hand-computed readings on 2 cores: other processes' load = (busy - own) / total x cores;
    threads = round(cores - load), at least 1. Inactive when OMP_NUM_THREADS is set."""
    import train_common
    # (busy, total, own) ticks: deltas (100, 200, 90) -> others 0.1 core -> 2 threads; (200, 200, 100) -> 1.0 -> 1;
    # (100, 200, 100) -> 0 -> 2
    readings = iter([(0, 0, 0), (100, 200, 90), (300, 400, 190), (400, 600, 290)])
    monkeypatch.setattr(train_common, "cpu_times", lambda: next(readings))
    monkeypatch.setattr(train_common.time, "sleep", lambda s: None)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        threads = train_common.CpuThreads(torch.device("cpu"))
        assert threads.active and torch.get_num_threads() == 2
        threads.tick(force=True)
        assert torch.get_num_threads() == 1
        threads.tick()  # within the interval: no reading taken
        assert torch.get_num_threads() == 1
        threads.tick(force=True)
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert not train_common.CpuThreads(torch.device("cpu")).active
    finally:
        torch.set_num_threads(before)


def test_cpu_times_reads_proc():
    import train_common
    a = train_common.cpu_times()
    if a is None:
        pytest.skip("no /proc here")
    t0 = os.times()
    sum(i * i for i in range(2_000_000))  # some CPU time of our own
    t1, b = os.times(), train_common.cpu_times()
    busy, total, own = (y - x for x, y in zip(a, b))
    # The kernel samples /proc/stat per CPU at each clock tick while a process's own time is accounted apart, so two
    # readings taken a moment apart may disagree by about one tick per CPU at each end: allow 2 ticks per core.
    slack = 2 * (os.cpu_count() or 1)
    tick = os.sysconf("SC_CLK_TCK")
    mine = (t1.user + t1.system - t0.user - t0.system) * tick  # the oracle: the same process time from os.times
    assert 0 <= busy <= total and b[2] > 0
    assert own <= busy + slack
    assert abs(own - mine) <= 2


def test_fused_loss_equals_eager_in_float64(strict_compile):
    """--compile's fused cross-entropy == the eager one, value and gradient, ignored (-100) targets included. In
    float64 only the order of additions differs (~1e-15 relative per sum of 40 terms)."""
    import model
    fused = model.compiled(summed_nll)
    x = torch.randn(12, 40, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 40, (12,))
    t[[2, 7]] = -100
    losses = [f(x, t) for f in (summed_nll, fused)]
    grads = [torch.autograd.grad(v, x)[0] for v in losses]
    assert abs((losses[1] - losses[0]) / losses[0]).item() < 1e-10
    assert ((grads[1] - grads[0]).abs().max() / grads[0].abs().max()).item() < 1e-10
    assert grads[1][[2, 7]].abs().max() == 0  # ignored rows get no gradient
    assert strict_compile()
