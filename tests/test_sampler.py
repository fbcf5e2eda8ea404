"""sampler.py against a naive full-recompute decoder (no KV cache) on a tiny random fp32 model.

Log-prob tolerances are measured, not guessed: `assert_logprobs_match` compares the sampler's fp32 log-probs with a
float64 full recompute and allows 4x the error that the same full recompute makes in fp32 on this machine (the fp32
noise of these weights; the cached path's own error was 0.4-1.3x of it over 12 seeded runs). A cache, position or
slot bug is off by O(1)."""
import copy

import pytest
import torch

from model import ModelConfig, Transformer
from sampler import Sampler

CFG = ModelConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=80)
PROMPTS = [[5, 17, 3, 9, 22, 41, 8], [7], [30, 2, 2, 64, 11, 50, 12, 9, 1, 77, 4, 19, 23], [33, 18, 6],
           [61, 60, 59, 58, 57, 56, 55, 54, 53, 52], [12, 40]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # std 0.5: peaked, input-dependent logits, so greedy outputs change from step to step
    return Transformer(CFG).init_weights(std=0.5).eval()


@pytest.fixture(scope="module")
def model64(model):
    return copy.deepcopy(model).double()


def assert_logprobs_match(model, model64, outs, temperature=0.0):
    """Every output's log-probs against the float64 recompute, within 4x the fp32 recompute's largest error."""
    got, exact, fp32 = [], [], []
    for o in outs:
        prompt = PROMPTS[o.prompt_index]
        got.append(torch.tensor(o.logprobs, dtype=torch.float64))
        exact.append(recomputed_logprobs(model64, prompt, o.tokens, temperature or 1.0))
        fp32.append(recomputed_logprobs(model, prompt, o.tokens, temperature or 1.0).double())
    got, exact, fp32 = torch.cat(got), torch.cat(exact), torch.cat(fp32)
    noise = (fp32 - exact).abs().max().item() + torch.finfo(torch.float32).eps * exact.abs().max().item()
    err = (got - exact).abs().max().item()
    assert err <= 4 * noise, f"log-prob error {err:.2e} > 4 x the fp32 recompute's {noise:.2e}"


@torch.no_grad()
def naive_greedy(model, prompt, max_new, stops=()):
    """The oracle: recompute the whole sequence every step, argmax, stop after a stop token."""
    seq, tokens, logprobs = list(prompt), [], []
    for _ in range(max_new):
        logits = model(torch.tensor([seq]))[0, -1].float()
        t = int(logits.argmax())
        tokens.append(t)
        logprobs.append(float(torch.log_softmax(logits, -1)[t]))
        seq.append(t)
        if t in stops:
            break
    return tokens, logprobs


@torch.no_grad()
def recomputed_logprobs(model, prompt, tokens, temperature):
    """log_softmax(logits / T) of each generated token, from one full forward pass over prompt + tokens."""
    logits = model(torch.tensor([prompt + tokens]))[0]
    logits = logits if logits.dtype == torch.float64 else logits.float()
    logp = torch.log_softmax(logits[len(prompt) - 1:len(prompt) - 1 + len(tokens)] / temperature, -1)
    return logp.gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def pick_stop(refs):
    """A token greedy decoding hits first at different steps in different prompts, and not in every prompt."""
    best = None
    for t in range(CFG.vocab_size):
        firsts = {r.index(t) for r in refs if t in r}
        hit = sum(t in r for r in refs)
        if hit < len(refs) and (best is None or (len(firsts), hit) > best[0]):
            best = ((len(firsts), hit), t)
    assert best[0][0] >= 3, "no token stops greedy sequences at 3 different steps"
    return best[1]


def check_layout(outs, n_prompts, n):
    assert len(outs) == n_prompts * n
    assert [(o.prompt_index, o.sample_index) for o in outs] == [(i, j) for i in range(n_prompts) for j in range(n)]


def test_greedy_matches_naive_ragged_n(model, model64):
    refs = [naive_greedy(model, p, 12) for p in PROMPTS]
    assert len({t for r, _ in refs for t in r}) > 10, "greedy outputs too uniform to test anything"
    s = Sampler(model)
    outs = s.generate(PROMPTS, n=3, max_new_tokens=12, progress=False)
    check_layout(outs, len(PROMPTS), 3)
    for o in outs:
        tokens, logprobs = refs[o.prompt_index]
        assert o.tokens == tokens
        assert not o.finished
    assert_logprobs_match(model, model64, outs)


@pytest.fixture(scope="module")
def stop_refs(model):
    """(stop token, naive greedy (tokens, logprobs) of each prompt with that stop, 16 new tokens at most)."""
    stop = pick_stop([naive_greedy(model, p, 16)[0] for p in PROMPTS])
    return stop, [naive_greedy(model, p, 16, {stop}) for p in PROMPTS]


@pytest.mark.parametrize("max_batch", [2, 5, 7])
def test_greedy_with_stops_and_slot_reuse(model, model64, stop_refs, max_batch):
    """More sequences than slots, sequences stopping at different steps: queued prompts fill freed slots."""
    stop, refs = stop_refs
    s = Sampler(model, max_batch=max_batch)
    outs = s.generate(PROMPTS, n=2, max_new_tokens=16, stop_token_ids=[stop, 1000], progress=False)
    check_layout(outs, len(PROMPTS), 2)
    assert s.stats["slots"] == max_batch and s.stats["prefill_calls"] > 1
    if max_batch == 5:
        assert s.stats["kv_moves"] > 0  # a survivor was moved down into a freed slot
    for o in outs:
        tokens, logprobs = refs[o.prompt_index]
        assert o.tokens == tokens
        # a stop token ends the sequence exactly there: included, nothing after it
        assert o.finished == (stop in tokens)
        assert stop not in o.tokens[:-1]
        assert o.finished or len(o.tokens) == 16
    assert_logprobs_match(model, model64, outs)
    assert len({len(o.tokens) for o in outs}) >= 3


@pytest.mark.parametrize("max_batch", [11, None])
def test_bucket_padded_decode_matches_naive(model, model64, stop_refs, max_batch):
    """The CUDA-graph step's padding (DecodeGraphs, run eagerly here): rows padded up to a batch-size bucket decode in
    free slots; as rows stop the bucket shrinks and queued prompts reuse slots that padding rows wrote into. Every
    real row must still match the full recompute."""
    stop, refs = stop_refs
    s = Sampler(model, max_batch=max_batch)
    s._pad_on_cpu = True
    outs = s.generate(PROMPTS, n=2, max_new_tokens=16, stop_token_ids=[stop], progress=False)
    check_layout(outs, len(PROMPTS), 2)
    assert s.stats["pad_rows"] > 0
    if max_batch is not None:
        assert s.stats["prefill_calls"] > 1  # a queued prompt was admitted into freed slots
    for o in outs:
        tokens, logprobs = refs[o.prompt_index]
        assert o.tokens == tokens
    assert_logprobs_match(model, model64, outs)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_logprobs_match_full_recompute(model, model64, temperature):
    s = Sampler(model, max_batch=5)
    outs = s.generate(PROMPTS, n=3, max_new_tokens=14, temperature=temperature, stop_token_ids=[0, 1, 2, 3],
                      seed=3, progress=False)
    check_layout(outs, len(PROMPTS), 3)
    for o in outs:
        assert len(o.logprobs) == len(o.tokens) > 0
    assert_logprobs_match(model, model64, outs, temperature)
    if temperature:
        assert len({len(o.tokens) for o in outs}) >= 2  # some sampled stops happened


def test_prefill_runs_once_per_prompt(model, monkeypatch):
    rows = []
    hidden = model.hidden

    def counting_hidden(ids, *args, **kwargs):
        if kwargs.get("positions") is None:  # a prefill call (decode passes positions)
            rows.append(ids.shape[0])
        return hidden(ids, *args, **kwargs)

    monkeypatch.setattr(model, "hidden", counting_hidden)
    for max_batch in (None, 8):
        rows.clear()
        s = Sampler(model, max_batch=max_batch)
        s.generate(PROMPTS, n=4, max_new_tokens=5, temperature=1.0, seed=0, progress=False)
        assert sum(rows) == len(PROMPTS) == s.stats["prefill_rows"]
        assert len(rows) == s.stats["prefill_calls"] == (1 if max_batch is None else 3)


def test_seeds(model):
    s = Sampler(model)
    kw = dict(n=4, max_new_tokens=10, temperature=1.0, progress=False)
    a = [o.tokens for o in s.generate(PROMPTS, seed=1, **kw)]
    b = [o.tokens for o in s.generate(PROMPTS, seed=1, **kw)]
    c = [o.tokens for o in s.generate(PROMPTS, seed=2, **kw)]
    assert a == b
    assert a != c
    for i in range(len(PROMPTS)):  # the n samples of one prompt differ from each other
        assert len({tuple(t) for t in a[4 * i:4 * i + 4]}) == 4
    # the random stream belongs to (prompt, sample, step): the slot count does not change the result
    d = [o.tokens for o in Sampler(model, max_batch=4).generate(PROMPTS, seed=1, **kw)]
    assert a == d


@torch.no_grad()
@pytest.mark.parametrize("temperature,top_p", [(0.7, 1.0), (2.0, 0.6)])
def test_first_token_distribution(model, temperature, top_p):
    """4000 one-token samples of one prompt follow softmax(logits / T), nucleus-truncated when top_p < 1."""
    prompt, N = PROMPTS[4], 4000  # a prompt whose next-token distribution is not peaked
    probs = torch.softmax(model(torch.tensor([prompt]))[0, -1].float() / temperature, -1)
    if top_p < 1.0:
        p, order = probs.sort(descending=True)
        keep = order[(p.cumsum(0) - p) < top_p]
        assert 2 < len(keep) < CFG.vocab_size
        probs = torch.zeros_like(probs).index_fill_(0, keep, 1.0) * probs
        probs /= probs.sum()
    outs = Sampler(model).generate([prompt], n=N, max_new_tokens=1, temperature=temperature, top_p=top_p, seed=0,
                                   progress=False)
    counts = torch.bincount(torch.tensor([o.tokens[0] for o in outs]), minlength=CFG.vocab_size).float()
    assert (counts[probs == 0] == 0).all()  # nothing outside the nucleus
    tv = 0.5 * (counts / N - probs).abs().sum().item()
    assert tv < 0.04, tv
    # the reported log-prob is of the unfiltered tempered distribution
    ids = [o.tokens[0] for o in outs]
    exact = torch.log_softmax(copy.deepcopy(model).double()(torch.tensor([prompt]))[0, -1] / temperature, -1)[ids]
    fp32 = torch.log_softmax(model(torch.tensor([prompt]))[0, -1].float() / temperature, -1)[ids].double()
    noise = (fp32 - exact).abs().max().item() + torch.finfo(torch.float32).eps * exact.abs().max().item()
    assert (torch.tensor([o.logprobs[0] for o in outs], dtype=torch.float64) - exact).abs().max() <= 4 * noise


def test_stop_at_first_token(model):
    """A stop token sampled from the prefill logits ends the sequence at once, the other prompts go on."""
    first = naive_greedy(model, PROMPTS[0], 1)[0][0]
    refs = [naive_greedy(model, p, 6, {first}) for p in PROMPTS]
    outs = Sampler(model, max_batch=4).generate(PROMPTS, n=2, max_new_tokens=6, stop_token_ids=[first],
                                                progress=False)
    assert outs[0].tokens == outs[1].tokens == [first] and outs[0].finished
    assert [o.tokens for o in outs] == [refs[o.prompt_index][0] for o in outs]


def test_edge_cases(model):
    s = Sampler(model, max_batch=3)
    # every sequence ends at its first token: the batch empties and queued prompts are admitted again
    outs = s.generate(PROMPTS, n=3, max_new_tokens=1, progress=False)
    assert [len(o.tokens) for o in outs] == [1] * len(PROMPTS) * 3
    assert s.generate(PROMPTS, n=2, max_new_tokens=0, progress=False)[0].tokens == []
    assert s.generate([], n=2, max_new_tokens=4, progress=False) == []
    with pytest.raises(ValueError, match="max_batch"):
        s.generate(PROMPTS, n=4, max_new_tokens=4, progress=False)
    with pytest.raises(ValueError, match="empty prompt"):
        s.generate([[1, 2], []], max_new_tokens=4, progress=False)
