"""train_rl.py: the GRPO math by hand; on-policy ratio and the sampler / trainer log-prob gap; stop ids; padding;
micro-batch and rank invariance; KL and entropy gradients; the ablation flags; NaN skipping; kill -9 + resume and
epoch-boundary resume; RL raising the reward of a tiny model. In-process tests run `grpo_step` on a plain model (no
process group); the CLI runs are real (python / torchrun, gloo, FSDP2) on a 60k-parameter model for a few steps."""
import copy
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import data
import reward
from model import ModelConfig, Transformer, load_tokenizer
from train_common import Rollout, generate_rollouts, trim_at_stop
from train_rl import (adam_update_ratio, aggregate, group_advantages, grpo_step, kl_k3, micro_logits, micro_logprobs,
                      pack_rollouts, parse_args, policy_loss, prompts, puzzle_reward, token_logprobs_and_entropy)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
CFG = ModelConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=32)
PROMPTS = [[5, 17, 3, 9, 22], [7, 1], [30, 2, 2, 24, 11, 20, 12, 9, 1], [13, 18, 6], [21, 20, 19, 18]]


def toy_reward(puzzle, text):
    """A reward a random model already varies on (the CLI tests load it with --reward-fn)."""
    return text.count("e") / max(1, len(text))


def count_reward(target):
    return lambda payload, tokens: sum(t == target for t in tokens) / len(tokens)


def make_args(*flags, **over):
    args = parse_args(["--recipe", "tiny", "--precision", "fp32", "--kl-coef", "0", "--n", "4", "--max-new-tokens", "8",
                       "--temperature", "1.0", *flags])
    for k, v in over.items():
        setattr(args, k, v)
    return args


def toy_model(seed=0, std=0.5, cfg=CFG):
    torch.manual_seed(seed)
    return Transformer(cfg).init_weights(std=std)


def batch(prompts=PROMPTS, payload=None):
    return [(i, p, payload[i] if payload else None) for i, p in enumerate(prompts)]


def rollouts(model, args, stops=(), prompts=PROMPTS, step=0):
    return generate_rollouts(model, batch(prompts), args, step, list(stops))


# ----------------------------------------------------------------------------------------------------------------------
# The math, by hand

def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [1.0, 2.0, 3.0, 6.0], [0.3, 0.3, 0.3, 0.3 + 1e-7]],
                     dtype=torch.float64)  # the last group: equal but for rounding noise
    adv, equal = group_advantages(r, std_norm=True)
    s0, s2 = math.sqrt(1 / 3), math.sqrt(14 / 3)  # unbiased std
    want0 = [0.5 / (s0 + 1e-6) * x for x in (1, -1, -1, 1)]
    want2 = [d / (s2 + 1e-6) for d in (-2, -1, 0, 3)]
    torch.testing.assert_close(adv[0], torch.tensor(want0))
    torch.testing.assert_close(adv[2], torch.tensor(want2))
    assert equal.tolist() == [False, True, False, True]
    assert torch.equal(adv[1], torch.zeros(4)) and torch.equal(adv[3], torch.zeros(4))  # exactly 0, no blow-up
    adv, _ = group_advantages(r, std_norm=False)  # Dr. GRPO: no std division
    torch.testing.assert_close(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    torch.testing.assert_close(adv[2], torch.tensor([-2.0, -1.0, 0.0, 3.0]))
    assert torch.equal(adv[3], torch.zeros(4))
    adv, equal = group_advantages(torch.tensor([[1.0], [0.0]]))  # a group of one has no spread
    assert torch.equal(adv, torch.zeros(2, 1)) and equal.all()


def test_clipped_surrogate_values_and_gradient_signs():
    # (ratio, advantage) -> (loss, d loss / d logp, clipped) with clip_low 0.1, clip_high 0.3: range [0.9, 1.3]
    cases = [(1.0, 1.0, -1.0, -1.0, False),
             (1.25, 1.0, -1.25, -1.25, False),  # above 1.2 but inside 1 + clip_high: still pushed up
             (1.5, 1.0, -1.3, 0.0, True),        # A > 0 above the range: clipped, no gradient
             (0.8, 1.0, -0.8, -0.8, False),      # A > 0 below the range: not clipped, pushed up
             (0.85, -1.0, 0.9, 0.0, True),       # A < 0 below the range: clipped
             (1.2, -1.0, 1.2, 1.2, False),       # A < 0 inside: pushed down
             (1.5, -1.0, 1.5, 1.5, False)]       # A < 0 above the range: not clipped, pushed down
    ratio = torch.tensor([c[0] for c in cases])
    adv = torch.tensor([c[1] for c in cases])
    logp = ratio.log().requires_grad_()
    loss, r, clipped = policy_loss(logp, torch.zeros(len(cases)), adv, 0.1, 0.3)
    loss.sum().backward()
    torch.testing.assert_close(loss.detach(), torch.tensor([c[2] for c in cases]))
    torch.testing.assert_close(logp.grad, torch.tensor([c[3] for c in cases]))
    assert clipped.tolist() == [c[4] for c in cases]
    torch.testing.assert_close(r, ratio)


def test_kl_k3_by_hand():
    logp, ref = torch.tensor([math.log(0.5), math.log(0.3)]), torch.tensor([math.log(0.25), math.log(0.3)])
    torch.testing.assert_close(kl_k3(logp, ref), torch.tensor([0.5 + math.log(2.0) - 1, 0.0]))
    x, y = torch.randn(100), torch.randn(100)
    assert (kl_k3(x, y) >= 0).all()


def test_aggregation_modes_by_hand():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 100.0])  # two sequences (3 and 2 tokens) and a filler position
    seq_len = torch.tensor([3.0, 3.0, 3.0, 2.0, 2.0, 0.0])
    assert aggregate(values, seq_len, "token-mean", 5, 2).item() == pytest.approx(15 / 5)
    assert aggregate(values, seq_len, "seq-mean", 5, 2).item() == pytest.approx((6 / 3 + 9 / 2) / 2)
    assert aggregate(values, seq_len, "constant", 5, 2, constant=10).item() == pytest.approx(15 / 10)
    # the denominators are the global mini-batch's: this micro-batch's share of a 4-sequence, 10-token batch
    assert aggregate(values, seq_len, "token-mean", 10, 4).item() == pytest.approx(15 / 10)
    assert aggregate(values, seq_len, "seq-mean", 10, 4).item() == pytest.approx((6 / 3 + 9 / 2) / 4)


def test_logprobs_and_entropy_known_distributions_and_chunks():
    p = torch.tensor([[0.5, 0.25, 0.25, 0.0 + 1e-30], [0.25, 0.25, 0.25, 0.25]])
    logits = p.log()
    lp, ent = token_logprobs_and_entropy(logits, torch.tensor([0, 3]), 1.0)
    torch.testing.assert_close(ent, torch.tensor([1.5 * math.log(2), math.log(4)]))
    torch.testing.assert_close(lp, torch.tensor([math.log(0.5), math.log(0.25)]))
    lp2, ent2 = token_logprobs_and_entropy(2 * logits, torch.tensor([0, 3]), 2.0)  # temperature divides the logits
    torch.testing.assert_close((lp2, ent2), (lp, ent))
    # chunked (and checkpointed under grad) == one piece, values and gradients
    x = torch.randn(10, 50, requires_grad=True)
    t = torch.randint(0, 50, (10,))
    a = token_logprobs_and_entropy(x, t, 0.7, chunk=3)
    ga = torch.autograd.grad(a[0].sum() + a[1].sum(), x)[0]
    b = token_logprobs_and_entropy(x, t, 0.7, chunk=1000)
    gb = torch.autograd.grad(b[0].sum() + b[1].sum(), x)[0]
    full = torch.log_softmax(x / 0.7, -1)
    torch.testing.assert_close(a[0], full.gather(-1, t[:, None])[:, 0])
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)


def test_fused_logprobs_and_entropy_equal_eager_in_float64(strict_compile):
    """--compile's fused log-prob / entropy pass == the eager one, values and gradients, chunked and checkpointed
    as in training. In float64 only the order of additions differs (~1e-15 relative per sum of 50 terms)."""
    x = torch.randn(10, 50, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (10,))
    out = [token_logprobs_and_entropy(x, t, 0.7, chunk=4, fused=f) for f in (False, True)]
    grads = [torch.autograd.grad(lp.sum() + 0.3 * ent.sum(), x)[0] for lp, ent in out]
    for a, b in [(out[0][0], out[1][0]), (out[0][1], out[1][1]), (grads[0], grads[1])]:
        assert ((a - b).abs().max() / a.abs().max()).item() < 1e-10
    assert strict_compile()


# ----------------------------------------------------------------------------------------------------------------------
# Rollouts, masks, padding

def test_every_stop_id_ends_a_completion():
    lp = [-0.1, -0.2, -0.3, -0.4, -0.5]
    assert trim_at_stop([5, 9, 6, 8, 7], lp, {8, 9}) == ([5, 9], [-0.1, -0.2], True)
    assert trim_at_stop([5, 6, 8, 9], lp[:4], {8, 9}) == ([5, 6, 8], [-0.1, -0.2, -0.3], True)
    assert trim_at_stop([5, 6, 7], lp[:3], {8, 9}) == ([5, 6, 7], lp[:3], False)
    model = toy_model().eval()
    args = make_args(n=6, max_new_tokens=12)
    free = rollouts(model, args)
    freq = torch.bincount(torch.tensor([t for r in free for t in r.tokens]), minlength=CFG.vocab_size)
    stops = freq.argsort(descending=True)[:2].tolist()  # the two commonest tokens: both will end completions
    outs = rollouts(model, args, stops)
    ends = set()
    for r in outs:
        assert not set(r.tokens[:-1]) & set(stops)  # nothing after the first stop id
        assert r.finished == (r.tokens[-1] in stops) and (r.finished or len(r.tokens) == 12)
        ends.add(r.tokens[-1])
    assert set(stops) <= ends
    m = pack_rollouts(outs, "cpu")  # the loss positions are exactly the completion tokens, stop token included
    for b, r in enumerate(outs):
        assert m.targets[(m.row == b) & (m.seq_len > 0)].tolist() == r.tokens
    assert int((m.seq_len > 0).sum()) == sum(len(r.tokens) for r in outs) and len(m.at) % 64 == 0
    assert m.x.shape[1] % 64 == 0 and sum(P + n * C for P, n, C in m.segments) == m.x.shape[1]


def full_recompute_logprobs(model, r: Rollout):
    """The oracle: log_softmax of the model on prompt + completion alone, at the completion tokens (T = 1)."""
    full = torch.log_softmax(model(torch.tensor([r.prompt + r.tokens]))[0].to(torch.float64), -1)
    return full[len(r.prompt) - 1:-1].gather(-1, torch.tensor(r.tokens)[:, None])[:, 0]


def grouped_rollouts():
    """Two prompts of different lengths with 3 and 2 samples of different lengths, and a prompt alone."""
    comp = lambda i: [(3 * i + k) % 32 for k in range(1 + 2 * i)]  # noqa: E731
    return ([Rollout(0, PROMPTS[0], comp(i), [0.0] * len(comp(i)), False) for i in (2, 0, 3)] +
            [Rollout(1, PROMPTS[1], comp(i), [0.0] * len(comp(i)), False) for i in (1, 4)] +
            [Rollout(2, PROMPTS[2], comp(2), [0.0] * 5, False)])


@pytest.mark.parametrize("micro", [64, 2, 1])
def test_shared_prompt_packing_equals_full_recompute(micro):
    """A packed micro-batch (each group's prompt once, completions right-padded, a group split across micro-batches
    when --micro-batch is smaller) gives every rollout's log-probs and their gradient as the model run on prompt +
    completion alone (a float64 model: the two differ by summation order only)."""
    model = toy_model().double()
    rows = grouped_rollouts()
    packed, grads = [], []
    for j in range(0, len(rows), micro):
        m = pack_rollouts(rows[j:j + micro], "cpu")
        lp = torch.log_softmax(micro_logits(model, m), -1).gather(-1, m.targets[:, None])[:, 0]
        assert (m.seq_len > 0).sum() == sum(len(r.tokens) for r in rows[j:j + micro])
        packed += [lp[m.row == b] for b in range(len(rows[j:j + micro]))]
    (sum(x.sum() for x in packed)).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want = [full_recompute_logprobs(model, r) for r in rows]
    sum(x.sum() for x in want).backward()
    for got, ref in zip(packed, want):
        torch.testing.assert_close(got, ref)
    # RMSNorm normalises in fp32 even in a float64 model, so the backward carries fp32 rounding (eps 1.2e-7) summed
    # in a different order over ~40 tokens: compare each gradient against its own norm at 1e-5
    for g, p in zip(grads, model.parameters()):
        assert p.grad.norm() > 0 and (g - p.grad).norm() <= 1e-5 * p.grad.norm()
    m = pack_rollouts(rows, "cpu")
    assert m.segments[:3] == [(len(PROMPTS[0]), 3, 7), (len(PROMPTS[1]), 2, 9), (len(PROMPTS[2]), 1, 5)]


# ----------------------------------------------------------------------------------------------------------------------
# The step

def test_on_policy_ratio_and_sampler_gap_at_temperature():
    """T = 0.7: the trainer scores at the sampling temperature, so the first update is on policy (ratio 1) and the
    fp32 sampler and trainer agree to < 1e-4; later updates of the same batch are off policy."""
    model = toy_model()
    args = make_args(temperature=0.7, mini_batches=2, ppo_epochs=2, lr=1e-2)
    infer = copy.deepcopy(model).eval()
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    rec, outs = grpo_step(model, infer, None, optim, batch(), count_reward(3), args, 0, [])
    u = rec["updates"]
    assert len(u) == 4 and not any(x["skipped"] for x in u)  # ppo_epochs x mini_batches optimizer steps
    assert abs(u[0]["ratio_min"] - 1) < 1e-6 and abs(u[0]["ratio_max"] - 1) < 1e-6
    assert max(abs(u[-1]["ratio_min"] - 1), abs(u[-1]["ratio_max"] - 1)) > 1e-3  # the policy moved
    assert rec["gap_mean"] < 1e-4 and rec["gap_max"] < 1e-3
    # scoring at T = 1 instead (the TRL / verl bug) would be far off
    r = outs[0]
    m = pack_rollouts([r], "cpu")
    with torch.no_grad():
        lp_t1 = token_logprobs_and_entropy(micro_logits(model, m), m.targets, 1.0)[0][m.seq_len > 0]
    assert (lp_t1 - torch.tensor(r.logprobs)).abs().mean() > 1e-2
    # one update per batch: pi_old is the loss pass's own detached log-prob, ratio exactly 1
    args1 = make_args(temperature=0.7)
    rec1, _ = grpo_step(model, infer, None, torch.optim.Adam(model.parameters()), batch(), count_reward(3), args1, 1,
                        [])
    assert rec1["ratio_min"] == rec1["ratio_max"] == 1.0 and rec1["gap_mean"] < 1e-4


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean", "constant"])
def test_one_micro_batch_equals_many(mode):
    """The same update (SGD: weight change = gradient) from 1 micro-batch or one per sequence, KL and entropy on."""
    start, ref = toy_model(), toy_model(seed=1)
    deltas = []
    for micro in (64, 1):
        model = copy.deepcopy(start)
        args = make_args("--loss-agg", mode, micro_batch=micro, kl_coef=0.1, entropy_coef=0.01, clip=1e9)
        optim = torch.optim.SGD(model.parameters(), lr=1.0)
        grpo_step(model, copy.deepcopy(start).eval(), ref, optim, batch(), count_reward(3), args, 0, [])
        deltas.append({k: v - start.state_dict()[k] for k, v in model.state_dict().items()})
    assert max(d.abs().max() for d in deltas[0].values()) > 1e-3
    for k in deltas[0]:
        torch.testing.assert_close(deltas[0][k], deltas[1][k], atol=1e-6, rtol=1e-4, msg=k)


def test_kl_gradient_pulls_toward_reference_and_entropy_bonus_raises_entropy():
    model, ref = toy_model(), toy_model()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.3 * torch.randn_like(p))
    args = make_args(n=8)
    m = pack_rollouts(rollouts(model.eval(), args), "cpu")
    v = m.seq_len > 0

    def kl_now():
        with torch.no_grad():
            logits, ref_logits = micro_logits(model, m)[v].float(), micro_logits(ref, m)[v].float()
            lp, lq = torch.log_softmax(logits, -1), torch.log_softmax(ref_logits, -1)
            k3 = kl_k3(micro_logprobs(model, m, args)[0], micro_logprobs(ref, m, args)[0])[v].mean()
            return k3.item(), (lp.exp() * (lp - lq)).sum(-1).mean().item()  # estimate, exact KL(pi || ref)

    with torch.no_grad():
        ref_lp = micro_logprobs(ref, m, args)[0]
    before = kl_now()
    loss = aggregate(kl_k3(micro_logprobs(model, m, args)[0], ref_lp), m.seq_len, "token-mean",
                     int(v.sum()), 0)
    loss.backward()
    assert sum(p.grad.norm() ** 2 for p in model.parameters() if p.grad is not None) > 0  # the KL carries gradient
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
    after = kl_now()
    assert after[0] < before[0] and after[1] < before[1], (before, after)
    # an entropy bonus alone raises the entropy
    model.zero_grad()
    ent0 = micro_logprobs(model, m, args)[1][v].mean()
    (-ent0).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
        assert micro_logprobs(model, m, args)[1][v].mean() > ent0 + 1e-3


def test_equal_groups_dropped_and_no_reference_without_kl():
    model = toy_model()
    start = copy.deepcopy(model.state_dict())
    payload = ["const", "var", "const", "var", "var"]
    fn = lambda p, tokens: 0.5 if p == "const" else count_reward(3)(p, tokens)  # noqa: E731
    args = make_args("--drop-equal-groups", lr=1e-2)
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    rec, _ = grpo_step(model, copy.deepcopy(model).eval(), None, optim, batch(payload=payload), fn, args, 0, [])
    assert rec["groups_dropped"] >= 2 and rec["groups_equal"] == rec["groups_dropped"] and rec["kl"] is None
    rec, _ = grpo_step(model, copy.deepcopy(model).eval(), None, optim, batch(payload=payload), fn,
                       make_args(lr=1e-2), 0, [])
    assert rec["groups_dropped"] == 0 and rec["groups_equal"] >= 2
    # every group equal and dropped: no update at all
    model2 = toy_model()
    rec, _ = grpo_step(model2, copy.deepcopy(model2).eval(), None, torch.optim.Adam(model2.parameters(), lr=1e-2),
                       batch(), lambda p, t: 1.0, args, 0, [])
    assert rec["updates"] == [] and all(torch.equal(v, start[k]) for k, v in model2.state_dict().items())
    with pytest.raises(AssertionError, match="kl-coef"):  # the reference model exists exactly when the KL is on
        grpo_step(model, model, toy_model(), optim, batch(), fn, args, 0, [])


def test_reward_mode_and_system_flags(tmp_path):
    tok = load_tokenizer(os.path.dirname(data.TOKENIZER_PATH))
    p = data.make_puzzle("The cell is from the blood. ", [["LYZ"], ["CD3D"]], ["CD14+ Monocyte", "CD4+ T"])
    text = "<think>x</think>\n<answer>CD14+ Monocyte | B</answer>"  # 1 of 2 right
    tokens = tok.encode(text, add_special_tokens=False).ids + [tok.token_to_id("<|im_end|>")]
    assert puzzle_reward(tok, "mixed")(p, tokens) == pytest.approx(0.25)
    assert puzzle_reward(tok, "batch")(p, tokens) == 0.0



def test_new_cells_makes_new_prompt_cells_from_grpo_cells_only():
    """--new-cells p: the prompt stream pools and contaminates cells with probability p (data.PuzzleSampler's mix and
    ambient, tested in test_data.py); at 0 prompt i is the same puzzle as before, and either way every prompt cell
    comes from the cells kept for GRPO."""
    split = data.embedded()
    plain = data.PuzzleStream(0, cells=split, key=(1,), pool="rl")
    assert (parse_args(["--recipe", "tiny"]).new_cells, parse_args(["--recipe", "paper"]).new_cells) == (0.5, 0.0)
    base = prompts(parse_args(["--recipe", "tiny", "--new-cells", "0"]))
    new = prompts(parse_args(["--recipe", "tiny", "--new-cells", "1"]))
    assert (new.sampler.mix, new.sampler.ambient) == (1.0, 1.0)
    genes_differ = 0
    for i in range(20):
        b, n = base[i], new[i]
        assert b.row() == plain[i].row()
        assert set(n.cell_ids) <= set(split.rl.tolist())
        genes_differ += b.row() != n.row()
    assert genes_differ == 20


def test_recipe_and_system_come_from_the_model_folder(tmp_path):
    """The recipe rule: --recipe, else the model folder's cello.json, else tiny for 'tiny', else paper; the system
    turn travels with the folder (a copy elsewhere keeps it); an explicit flag always wins."""
    card = tmp_path / "sft" / "model"
    card.mkdir(parents=True)
    (card / "cello.json").write_text(json.dumps({"recipe": "tiny", "system": "short"}))
    shutil.copytree(card, tmp_path / "moved")
    for folder in (card, tmp_path / "moved"):
        args = parse_args(["--model", str(folder)])
        assert (args.recipe, args.system, args.prompts_per_step, args.n, args.lr) == ("tiny", "short", 16, 8, 5e-5)
    args = parse_args(["--model", str(tmp_path)])  # no cello.json: a model we did not train
    assert (args.recipe, args.system, args.prompts_per_step, args.n, args.kl_coef) == ("paper", "released", 64, 5, 1e-3)
    assert parse_args(["--model", "tiny"]).recipe == "tiny"
    args = parse_args(["--model", str(card), "--recipe", "paper", "--prompts-per-step", "3", "--system", "released"])
    assert (args.recipe, args.system, args.prompts_per_step, args.n) == ("paper", "released", 3, 5)


def test_probe_counts_by_hand(monkeypatch):
    """probe() on three puzzles x 2 samples whose texts are set: exact, wrong | wrong, wrong | exact, exact. Sampled
    exact 3 / 6, best of 2: 2 / 3 puzzles, all-equal rewards: puzzles 2 and 3."""
    import train_common
    ps = [data.make_puzzle("The cell is from the blood. ", [["LYZ"], ["CD3D"]], ["A", "B"]) for _ in range(3)]
    right, wrong = "<think>x</think>\n<answer>A | B</answer>", "<think>x</think>\n<answer>B | A</answer>"
    texts = {0: [right, wrong], 1: [wrong, wrong], 2: [right, right]}
    monkeypatch.setattr(train_common, "generate_rollouts", lambda infer, mine, args, step, stops: [
        Rollout(g, ids, [g, j], [0.0, 0.0], True) for g, ids, _ in mine for j in range(2)])

    class Tok:  # decodes rollout tokens [group, sample] to the set texts
        def encode(self, text, add_special_tokens=False):
            return type("E", (), {"ids": [1, 2]})()

        def decode(self, tokens, skip_special_tokens=True):
            return texts[tokens[0]][tokens[1]]
    args = make_args("--n", "2")
    score = lambda p, text: reward.score(text, p.answer, "mixed")  # noqa: E731
    got = train_common.probe(toy_model(), ps, args, Tok(), [], "system", score)
    assert got == {"puzzles": 3, "sampled_exact": 0.5, "best_of_n_exact": pytest.approx(2 / 3),
                   "equal_groups": pytest.approx(2 / 3)}


def test_adam_update_ratio_is_the_weight_change():
    """The update size logged each step, recomputed from AdamW's state, against the weights' real change (no weight
    decay). Tolerance: the real change is a difference of fp32 weights, off by up to eps32 |w| per element, and
    |w| / |dw| is about 1 / lr = 1e2 here: a relative error near 1e-5; rel 1e-4 leaves 8x."""
    model = toy_model()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        model(torch.tensor([PROMPTS[2]])).float().logsumexp(-1).sum().backward()
        optim.step()
        optim.zero_grad()
        change = sum((p.detach().double() - b.double()).pow(2).sum() for p, b in zip(model.parameters(), before))
        size = sum(p.detach().double().pow(2).sum() for p in model.parameters())
        assert adam_update_ratio(optim, "cpu") == pytest.approx(math.sqrt(change / size), rel=1e-4)


@pytest.mark.parametrize("flags, why", [(["--group-size", "1"], "at least 2 samples"), (["--steps", "0"], "--steps 0"),
                                        (["--clip-low", "1.5"], "clip range"), (["--clip-high", "-0.5"], "clip range"),
                                        (["--mini-batches", "32"], "a mini-batch is a set of whole groups"),
                                        (["--micro-batch", "0"], "must be at least 1"),
                                        (["--new-cells", "1.5"], "is a probability")])
def test_bad_flags_are_refused_in_one_sentence(flags, why):
    with pytest.raises(SystemExit, match=why):
        parse_args(["--recipe", "tiny", *flags])


def test_rl_raises_reward():
    """Reward = share of generated tokens equal to 7 (chance 1/16); GRPO from a random 60k-parameter model."""
    cfg = ModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=16)
    model = toy_model(std=0.02, cfg=cfg)
    args = make_args(n=8, max_new_tokens=8, lr=3e-3)
    infer = copy.deepcopy(model).eval()
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    rewards = []
    for step in range(30):
        prompts = [(step * 8 + i, torch.randint(0, 16, (4,), generator=g).tolist(), None) for i in range(8)]
        rec, _ = grpo_step(model, infer, None, optim, prompts, count_reward(7), args, step, [])
        rewards.append(rec["reward_mean"])
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.3, rewards


# ----------------------------------------------------------------------------------------------------------------------
# Real runs (CLI)

def rl_cmd(model, out, nproc=1, steps=3, extra=()):
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={nproc}"]
    return launcher + [os.path.join(ROOT, "train_rl.py"), "--model", model, "--out", str(out), "--steps", str(steps),
                       "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "12", "--micro-batch", "2",
                       "--rollout-chunk", "2", "--lr", "1e-2", "--kl-coef", "0.01", "--system", "short",
                       "--reward-fn", f"{os.path.abspath(__file__)}:toy_reward", "--eval-every", "0",
                       "--eval-puzzles", "1", "--eval-max-new-tokens", "4", "--save-every", "2", "--no-progress",
                       *extra]


def run(cmd, ok=True):
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    if ok:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def log(out):
    return [json.loads(ln) for ln in open(os.path.join(out, "rl_log.jsonl"))]


def steps_of(out):
    return [r for r in log(out) if "reward_mean" in r]


def weights(folder):
    return Transformer.from_pretrained(str(folder), dtype=torch.float32).state_dict()


def test_two_ranks_equal_one_rank(tiny_dir, tmp_path):
    """Same prompts, same samples (seeded per chunk of prompts, not per rank), same update."""
    run(rl_cmd(tiny_dir, tmp_path / "r1", extra=["--precision", "fp32"]))
    run(rl_cmd(tiny_dir, tmp_path / "r2", nproc=2, extra=["--precision", "fp32"]))
    r1, r2 = steps_of(tmp_path / "r1"), steps_of(tmp_path / "r2")
    assert len(r1) == len(r2) == 3
    # identical rollouts (the means differ only by the summation order over ranks)
    assert [r["reward_mean"] for r in r1] == pytest.approx([r["reward_mean"] for r in r2], rel=1e-9)
    assert [r["len_mean"] for r in r1] == [r["len_mean"] for r in r2]
    assert r1[0]["reward_std"] > 0 and r1[-1]["kl"] > 0
    for k in ("grad_norm", "loss", "kl", "entropy"):
        assert [r[k] for r in r1] == pytest.approx([r[k] for r in r2], rel=1e-3, abs=1e-7), k
    w0, w1, w2 = weights(tiny_dir), weights(tmp_path / "r1" / "model"), weights(tmp_path / "r2" / "model")
    assert max((w1[k] - w0[k]).abs().max() for k in w0) > 1e-2  # it trained
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-4, rtol=0, msg=k)
    evals = [r for r in log(tmp_path / "r1") if "eval" in r]
    assert len(evals) == 1 and evals[0]["eval"]["count"] > 0 and len(evals[0]["samples"]) == 3
    assert evals[0]["eval_s"] > 0 and evals[0]["probe_s"] > 0  # what the evaluation cost, logged with it
    for name, p in evals[0]["probe"].items():  # held-out (the 6 eval puzzles) and 12 train prompts, 4 samples each
        assert p["puzzles"] == {"heldout": 6, "train": 12}[name]
        assert 0 <= p["sampled_exact"] <= p["best_of_n_exact"] <= 1 and 0 <= p["equal_groups"] <= 1
    assert evals[0]["probe"] == [r for r in log(tmp_path / "r2") if "eval" in r][0]["probe"]  # 2 ranks, same samples
    for r in r1:  # the -1 causes are shares of the step's rollouts; the update size is logged
        assert 0 <= r["minus1_format"] + r["minus1_count"] + r["minus1_repeat"] <= 1 and r["update_rel"] > 0
    assert json.load(open(tmp_path / "r1" / "checkpoint" / "meta.json"))["args"]["system"] == "short"


def test_kill9_and_resume_equals_uninterrupted(tiny_dir, tmp_path, kill9_after):
    run(rl_cmd(tiny_dir, tmp_path / "full", steps=6))
    out = tmp_path / "killed"
    # killed once step 3 is logged: the step-2 checkpoint exists, step 4's may not
    kill9_after(rl_cmd(tiny_dir, out, steps=6), ENV, out / "rl_log.jsonl", 3)
    assert json.load(open(out / "checkpoint" / "meta.json"))["step"] in (2, 4)
    assert not (out / "model").exists()
    r = run(rl_cmd(tiny_dir, out, steps=6), ok=False)
    assert r.returncode != 0 and "--resume" in r.stderr  # an existing run is never overwritten silently
    # a prompt flag changed on resume is refused, naming the flag (the checkpoint recorded --new-cells 0.0)
    r = run(rl_cmd(tiny_dir, out, steps=6, extra=["--resume", "--new-cells", "0.5"]), ok=False)
    assert r.returncode != 0 and "resume it with --new-cells 0.0" in r.stderr, r.stderr[-2000:]
    run(rl_cmd(tiny_dir, out, steps=6, extra=["--resume"]))
    assert [r["step"] for r in steps_of(out)] == [1, 2, 3, 4, 5, 6]
    assert [r["reward_mean"] for r in steps_of(out)] == [r["reward_mean"] for r in steps_of(tmp_path / "full")]
    wa, wb = weights(tmp_path / "full" / "model"), weights(out / "model")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5, msg=k)


def test_resume_at_epoch_boundary_trains_on(tiny_dir, tmp_path):
    split = data.embedded()
    rows = data.test_puzzles(split, per_n=1)[:4]
    (tmp_path / "d").mkdir()
    data.write_jsonl(rows, str(tmp_path / "d" / "train.jsonl"))
    data.write_jsonl(rows[:2], str(tmp_path / "d" / "test.jsonl"))
    extra = ["--data", str(tmp_path / "d"), "--prompts-per-step", "2"]  # 4 rows, 2 per step: an epoch is 2 steps
    run(rl_cmd(tiny_dir, tmp_path / "r", steps=2, extra=extra))
    assert json.load(open(tmp_path / "r" / "checkpoint" / "meta.json"))["step"] == 2
    run(rl_cmd(tiny_dir, tmp_path / "r", steps=4, extra=[*extra, "--resume"]))
    assert [r["step"] for r in steps_of(tmp_path / "r")] == [1, 2, 3, 4]
    assert json.load(open(tmp_path / "r" / "checkpoint" / "meta.json"))["step"] == 4


def test_nan_steps_are_skipped_and_never_checkpointed(tiny_dir, tmp_path):
    out = tmp_path / "nan"
    r = run(rl_cmd(tiny_dir, out, steps=5, extra=["--inject-nan", "2,3", "--max-bad-steps", "2", "--save-every",
                                                  "1"]), ok=False)
    assert r.returncode != 0 and "2 steps in a row" in r.stderr
    recs = steps_of(out)
    assert [(x["step"], x["skipped"]) for x in recs] == [(1, 0), (2, 1), (3, 1)]  # step 2 skipped, the run went on
    assert json.load(open(out / "checkpoint" / "meta.json"))["step"] == 2  # no checkpoint at the aborting step
    w = weights(out / "checkpoint" / "model")
    assert all(v.isfinite().all() for v in w.values())
    assert not (out / "model").exists()
