"""Batched sampling with a KV cache: what GRPO rollouts and evaluation call.

    sampler = Sampler(model)
    outs = sampler.generate(prompts, n=8, max_new_tokens=512, temperature=1.0, stop_token_ids=stops, seed=0)
    outs[i * n + j]          # sample j of prompt i (prompt-major)
    outs[k].tokens           # generated ids, the stop token included when one was hit
    outs[k].logprobs         # one float per generated token: log_softmax(logits / T) of that token (T = 1 if greedy)
    outs[k].finished         # True: ended on a stop token; False: ran out of max_new_tokens

Design
------
KV cache: one two-segment `KVCache` (see model.py), allocated once per `generate` call:
  - prompt segment: G prompt groups x Tp positions, Tp = longest prompt rounded up to a multiple of 64. A prompt is
    prefilled once into a free group, and its n samples all read that one copy (no n-fold copy of the prompt K/V:
    n times less prompt memory, and the CPU decode attention reads each prompt once per step for all n rows);
  - generated segment: S row slots x Tg positions, Tg = max_new_tokens - 1 (the last sampled token is never fed
    back). A sequence owns one whole slot (contiguous, no paging: simple, and the decode kernels take a slot index
    per row); `cache.group[slot]` names its prompt group.

Slots and groups: S = min(#sequences, max_batch, cache budget / bytes per sequence), bytes per sequence counting Tg
generated positions and a 1/n share of a prompt; S >= n is required (see admission), and a budget-derived S is rounded
down to a multiple of n so no slot is stranded. G = S // n groups: a group is taken when its prompt is admitted and
freed when the last of its n rows finishes. Sequences that do not fit are queued.
The active rows always occupy slots 0..B-1 (row i lives in slot i): when rows finish, the surviving rows with the
highest slots are moved into the holes (their generated K/V and group index copied down, one batched copy per stop
event; the prompt segment never moves), so the decode attention reads a plain prefix of the generated segment
instead of gathering scattered slots every step, and new rows are simply appended at slots B, B+1, ...

Admission ("prefill once per prompt"): a prompt is admitted only when all of its n samples get a slot (S - B >= n)
and a prompt group is free. Admitted prompts are prefilled together as one right-padded batch (at most
`prefill_tokens` padded tokens, at least one prompt), each into its group; the padded length is rounded up to a
multiple of 64, which bounds the number of distinct prefill shapes (on CPU oneDNN keeps one kernel per matmul shape,
so freely varying shapes make memory grow). The n first tokens of a prompt are sampled from the one prefill's
last-position logits; lm_head runs only on those last positions. Queued prompts are admitted as soon as enough slots
and a group are free, so prefill and decode interleave (continuous batching).

Decode: one model call per step for exactly the active rows (finished rows are compacted away at once). Per step
the only host transfer is the `done.any()` check; sampled tokens and log-probs are written into device buffers and
copied to the host once at the end. Python bookkeeping happens only when rows finish or prompts are admitted.
On CUDA the step (model + lm_head) is replayed from CUDA graphs, one per batch-size bucket (`DecodeGraphs`): eager,
a step issues ~35 kernel launches per layer and the GPU idles between them (scripts/profile_sampler.py measured 23 ms
of wall time for 3.6 ms of kernels per step at Qwen2.5-0.5B's shape).

Code: `generate` is a short driver loop over a `_Batch`, the state of one call (cache, prompt queue, active rows,
outputs), alternating `_Batch.admit` (prefill queued prompts) and `_Batch.step` (one decode step).

Sampling (fp32): greedy = argmax. Otherwise p = softmax(logits / T), optionally nucleus-filtered (top_p < 1: keep
the smallest set of most likely tokens whose mass reaches top_p, renormalised), and one token is drawn by inverse
CDF with a uniform u[seq, step] taken from a table drawn up front from `torch.Generator().manual_seed(seed)`. The
random stream therefore belongs to the sequence (prompt i, sample j, step t), not to the batch: the same seed gives
the same tokens whatever max_batch / slot count / admission order is used (up to floating-point differences of
batched matmuls, which flip a token only if u lands within ~1e-7 of a CDF boundary). seed=None draws a fresh seed.

Reported log-probs are always the *unfiltered* log_softmax(logits / T) in fp32 (T = 1 for greedy): exactly what a
trainer recomputes from the same weights and the same temperature. With top_p < 1 the tokens are drawn from the
truncated distribution while the log-prob is of the full one, so the sampler is then off-policy with respect to those
log-probs (the GRPO top-p pitfall); keep top_p = 1 (the default) for training rollouts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model import KVCache, Transformer


def pad64(T: int) -> int:
    """T rounded up to a multiple of 64. Padded prefill lengths here, and training micro-batch shapes in train_sft,
    go through it: on CPU, oneDNN caches a kernel per matmul shape, so unbounded distinct shapes grow memory."""
    return -(-T // 64) * 64


@dataclass
class Completion:
    tokens: list[int]       # generated ids (stop token included when hit), without the prompt
    logprobs: list[float]   # log_softmax(logits / T)[token] per generated token, fp32, unfiltered by top_p
    prompt_index: int       # index into the `prompts` given to generate
    sample_index: int       # 0..n-1 among that prompt's samples
    finished: bool          # True: ended on a stop token; False: stopped by max_new_tokens


class DecodeGraphs:
    """One decode step, `model.hidden` + `lm_head` on one token per row, run on static buffers padded to a batch-size
    bucket and, with capture=True (CUDA), replayed from one CUDA graph per bucket. Built per `generate` call, since
    the graphs bake in that call's KV cache.

    Buckets: 1, 2, 4, 8, then every multiple of 16 below S, then S (the slot count). A step of B active rows runs as
    the smallest bucket b >= B; rows B..b-1 are padding. They decode in slots B..b-1, which are free (active rows
    always occupy slots 0..B-1), each as the first generated token of its slot's group (position = that group's
    prompt length), so a padding row writes K/V only at generated index 0 of a free slot. The next owner of the slot
    writes that index before reading it, and padding logits are dropped: padding never changes a real row.
    A bucket's graph is captured the first time it is needed: that step first runs eagerly (it compiles the Triton
    kernels, and its logits are the ones used), then is captured. All graphs share one memory pool and write their
    logits into one (S, V) buffer, so a step's logits must be consumed before the next step (the sampler does).
    capture=False runs the same padded step eagerly: the path the CPU tests check against the unpadded one."""

    def __init__(self, model: Transformer, cache: KVCache, slots: int, capture: bool):
        self.model, self.cache, self.capture = model, cache, capture
        self.buckets = sorted({b for b in (1, 2, 4, 8) if b < slots} | set(range(16, slots, 16)) | {slots})
        dev = cache.k.device
        self.tok = torch.zeros(slots, 1, dtype=torch.long, device=dev)   # static inputs: (S, 1) token, position
        self.pos = torch.zeros(slots, 1, dtype=torch.long, device=dev)
        self.slots = torch.arange(slots, device=dev)
        # static output, shared by all buckets: per-bucket outputs would each stay allocated (b x V, 0.3 MB a row
        # with Qwen2.5's vocabulary)
        self.logits = torch.empty(slots, model.config.vocab_size, dtype=cache.k.dtype, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.pad_rows = 0  # padding rows run so far (stats)

    def _step(self, b: int) -> None:
        h = self.model.hidden(self.tok[:b], positions=self.pos[:b], cache=self.cache, slots=self.slots[:b])
        torch.mm(h[:, 0], self.model.lm_head.weight.t(), out=self.logits[:b])  # lm_head (no bias) into the buffer

    def __call__(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tok, pos (B,): the active rows' last tokens and their positions (row i in slot i) -> logits (B, V)."""
        B = tok.shape[0]
        b = next(x for x in self.buckets if x >= B)
        self.tok[:B, 0] = tok
        self.pos[:B, 0] = pos
        if b > B:  # padding rows: token 0 at their slot's group's first generated position
            self.tok[B:b, 0] = 0
            self.pos[B:b, 0] = self.cache.prompt_len[self.cache.group[B:b]]
            self.pad_rows += b - B
        graph = self.graphs.get(b)
        if not self.capture or graph is None:
            self._step(b)  # eager (on CUDA: compiles the kernels before the capture); this step's result
            if self.capture:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self._step(b)  # recorded, not run: the buffer keeps the eager step's logits
                self.pool = self.pool or graph.pool()
                self.graphs[b] = graph
        else:
            graph.replay()
        return self.logits[:B]


class Sampler:
    """Generates from a `Transformer` with a per-call KV cache. See the module docstring for the design.

    max_batch: at most this many sequences decode at once (= KV cache slots, must be >= n); None: all of them, as
        far as cache_budget_bytes allows. An explicit max_batch is used as given (the budget is not applied).
    cache_budget_bytes: cap on the KV cache size when max_batch is None (default: half the free memory on CUDA,
        4 GiB on CPU).
    prefill_tokens: at most this many (padded) tokens per prefill batch; one prompt is always admitted.
    cuda_graphs: on CUDA, replay each decode step from a CUDA graph (`DecodeGraphs`); False: eager steps.
    """

    def __init__(self, model: Transformer, max_batch: int | None = None, cache_budget_bytes: int | None = None,
                 prefill_tokens: int = 16384, cuda_graphs: bool = True):
        self.model = model
        self.max_batch = max_batch
        self.cache_budget_bytes = cache_budget_bytes
        self.prefill_tokens = prefill_tokens
        self.cuda_graphs = cuda_graphs
        self._pad_on_cpu = False  # tests: run DecodeGraphs' padded step eagerly on CPU
        self.stats: dict[str, int] = {}

    # ------------------------------------------------------------------------------------------------------------------

    def _slot_count(self, n_seqs: int, n: int, prompt_len: int, gen_len: int, max_batch: int | None, device,
                    dtype) -> int:
        c = self.model.config
        per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * dtype.itemsize
        per_slot = per_token * (gen_len + -(-prompt_len // n))  # its generated tokens + a 1/n share of its prompt
        budget = self.cache_budget_bytes
        if budget is None:
            budget = torch.cuda.mem_get_info(device)[0] // 2 if device.type == "cuda" else 4 << 30
        by_budget = budget // per_slot
        slots = min(n_seqs, by_budget if max_batch is None else max_batch)
        if max_batch is not None and max_batch < n:
            raise ValueError(f"max_batch={max_batch} < n={n}: all n samples of a prompt must fit at once "
                             f"(a prompt is prefilled once and its K/V shared by its n slots)")
        if slots < n:
            raise ValueError(f"the KV cache budget ({budget} bytes) holds {by_budget} sequence(s) of "
                             f"{prompt_len} + {gen_len} tokens, fewer than n={n}: raise cache_budget_bytes or lower "
                             f"max_new_tokens")
        if max_batch is None and slots < n_seqs:
            slots -= slots % n
        return slots

    def _sample(self, logits, u, temperature: float, top_p: float):
        """logits (B, V), u (B,) uniforms or None -> tokens (B,) int64, log-probs (B,) fp32 (unfiltered)."""
        logits = logits.float()
        if temperature == 0.0:
            tokens = logits.argmax(-1)
            return tokens, logits.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(logits, -1)
        scaled = logits / temperature if temperature != 1.0 else logits
        # one exp pass serves both the log-prob (log_softmax = x - max - log sum exp(x - max)) and the sampling CDF
        m = scaled.amax(-1, keepdim=True)
        probs = (scaled - m).exp_()                 # unnormalised
        mass = probs.sum(-1, keepdim=True)
        lse = m[:, 0] + mass[:, 0].log()
        if top_p < 1.0:
            probs, order = (probs / mass).sort(-1, descending=True)
            keep = (probs.cumsum(-1) - probs) < top_p  # mass before the token < top_p: the first is always kept
            probs = probs * keep
        cdf = probs.cumsum(-1)
        total = cdf[:, -1]
        # x < total strictly, and cdf is non-decreasing: the first cdf[i] > x has probs[i] > 0
        x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
        tokens = torch.searchsorted(cdf, x[:, None], right=True)[:, 0].clamp_(max=cdf.shape[-1] - 1)
        if top_p < 1.0:
            tokens = order.gather(-1, tokens[:, None])[:, 0]
        return tokens, scaled.gather(-1, tokens[:, None])[:, 0] - lse

    # ------------------------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], n: int = 1, max_new_tokens: int = 256, temperature: float = 0.0,
                 stop_token_ids=(), seed: int | None = None, top_p: float = 1.0, max_batch: int | None = None,
                 progress: bool = True) -> list[Completion]:
        """Sample n completions of each prompt; returns len(prompts) * n `Completion`s, prompt-major.

        temperature 0 is greedy (log-probs then at T = 1). top_p nucleus-filters the sampling distribution only (the
        reported log-probs stay unfiltered, see the module docstring). max_batch overrides the sampler's for this
        call. progress shows a tqdm bar counting generated tokens (against the max_new_tokens upper bound)."""
        if n < 1 or max_new_tokens < 0 or temperature < 0 or not 0.0 < top_p <= 1.0:
            raise ValueError(f"bad arguments: n={n}, max_new_tokens={max_new_tokens}, temperature={temperature}, "
                             f"top_p={top_p}")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: at least one token is needed to predict the next")
        self.stats = dict(prefill_calls=0, prefill_rows=0, prefill_tokens=0, decode_steps=0, decode_rows=0,
                          kv_moves=0, slots=0, graphs=0, pad_rows=0)
        if len(prompts) == 0 or max_new_tokens == 0:
            return [Completion([], [], i // n, i % n, False) for i in range(len(prompts) * n)]
        batch = _Batch(self, prompts, n, max_new_tokens, temperature, top_p, stop_token_ids, seed,
                       max_batch if max_batch is not None else self.max_batch, progress)
        try:
            while True:
                batch.admit()  # continuous batching: queued prompts join as soon as slots and a group are free
                if len(batch.tok):
                    batch.step()
                elif batch.next_prompt == len(prompts):
                    break  # nothing active, nothing queued
        finally:
            batch.close()
        return batch.completions()


class _Batch:
    """The scheduler state of one `generate` call: KV cache, prompt queue, active rows and output buffers.
    `admit` prefills queued prompts into free slots, `step` decodes one token for every active row, `retire` records
    finished rows and compacts the survivors into slots 0..B-1, `completions` copies the outputs to the host."""

    def __init__(self, sampler: Sampler, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float,
                 top_p: float, stop_token_ids, seed: int | None, max_batch: int | None, progress: bool):
        from tqdm.auto import tqdm

        self.model, self.stats, self.sample = sampler.model, sampler.stats, sampler._sample
        self.prompts, self.n, self.max_new, self.prefill_tokens = prompts, n, max_new_tokens, sampler.prefill_tokens
        self.temperature, self.top_p = temperature, top_p
        p0 = next(self.model.parameters())
        self.device = device = p0.device
        N = len(prompts) * n
        Tp, Tg = pad64(max(len(p) for p in prompts)), max_new_tokens - 1  # Tg: the last token is never fed back
        self.S = S = sampler._slot_count(N, n, Tp, Tg, max_batch, device, p0.dtype)
        self.stats["slots"] = S
        self.cache = KVCache.allocate(self.model.config, S // n, Tp, S, Tg, device, p0.dtype)
        self.free_groups = list(range(S // n))  # prompt groups not in use
        self.rows_left = [0] * (S // n)  # unfinished rows of each group in use
        self.graphs = None
        if (device.type == "cuda" and sampler.cuda_graphs) or sampler._pad_on_cpu:
            self.graphs = DecodeGraphs(self.model, self.cache, S, capture=device.type == "cuda")
        self.uniforms = None  # greedy
        if temperature > 0.0:
            gen = torch.Generator()
            gen.manual_seed(seed) if seed is not None else gen.seed()  # gen.seed(): fresh, global RNG untouched
            self.uniforms = torch.rand(N, max_new_tokens, generator=gen).to(device)  # u[seq, step]
        self.stops = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)
        # outputs stay on the device until the end: no host sync per step
        self.out_tokens = torch.zeros(N, max_new_tokens, dtype=torch.long, device=device)
        self.out_logprobs = torch.zeros(N, max_new_tokens, dtype=torch.float32, device=device)
        self.out_len = torch.zeros(N, dtype=torch.long, device=device)
        self.out_stopped = torch.zeros(N, dtype=torch.bool, device=device)
        # Active rows (B,); row i lives in cache slot i (its prompt group: cache.group[i]). tok: last sampled token
        # (fed next, at position pos); n_gen: tokens generated so far (n_gen - 1 of them are in the cache); seq: index
        # into the outputs.
        empty = torch.zeros(0, dtype=torch.long, device=device)
        self.tok, self.pos, self.n_gen, self.seq = empty, empty, empty, empty
        self.next_prompt = 0  # prompts[:next_prompt] have been admitted
        self.bar = tqdm(total=N * max_new_tokens, unit="tok", desc="generate", disable=not progress, leave=False)

    def admit(self) -> None:
        """Prefill queued prompts, a batch at a time, while a whole prompt fits: n free slots and a free group."""
        while self.next_prompt < len(self.prompts) and self.S - len(self.tok) >= self.n and self.free_groups:
            self._prefill(*self._take_prompts())

    def _take_prompts(self) -> tuple[list[int], int]:
        """The next prompts to prefill together -> (their indices, padded length): each needs n free slots and a free
        group, and the batch stays within prefill_tokens padded tokens. admit's condition lets the first one in."""
        B, idx, T = len(self.tok), [], 0
        while (self.next_prompt + len(idx) < len(self.prompts) and self.S - B - (len(idx) + 1) * self.n >= 0
               and len(idx) < len(self.free_groups)):
            T_new = max(T, pad64(len(self.prompts[self.next_prompt + len(idx)])))
            if idx and T_new * (len(idx) + 1) > self.prefill_tokens:
                break
            idx.append(self.next_prompt + len(idx))
            T = T_new
        return idx, T

    def _prefill(self, idx: list[int], T: int) -> None:
        """Prefill prompts idx, right-padded to T, each into a free group; sample their n first tokens from the one
        prefill and append the k * n new rows at slots B.. (n per prompt, prompt-major)."""
        dev, n, k, B = self.device, self.n, len(idx), len(self.tok)
        self.next_prompt += k
        groups = self.free_groups[:k]
        del self.free_groups[:k]
        for g in groups:
            self.rows_left[g] = n
        groups = torch.tensor(groups, dtype=torch.long, device=dev)
        self.cache.group[B:B + k * n] = groups.repeat_interleave(n)
        ids = torch.zeros(k, T, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :len(self.prompts[i])] = torch.tensor(self.prompts[i], dtype=torch.long)
        lens = torch.tensor([len(self.prompts[i]) for i in idx], dtype=torch.long, device=dev)
        h = self.model.hidden(ids.to(dev), cache=self.cache, groups=groups, seq_lens=lens)  # (k, T, hidden)
        logits = self.model.lm_head(h[torch.arange(k, device=dev), lens - 1])  # last real position only: (k, V)
        self.stats["prefill_calls"] += 1
        self.stats["prefill_rows"] += k
        self.stats["prefill_tokens"] += k * T
        seq = (torch.tensor(idx, device=dev)[:, None] * n + torch.arange(n, device=dev)).flatten()  # (k, n) -> (k*n,)
        n_gen = torch.zeros(k * n, dtype=torch.long, device=dev)
        t, done, stopped = self.sample_and_record(logits.repeat_interleave(n, 0), seq, n_gen)
        self.bar.update(k * n)
        self.tok = torch.cat([self.tok, t])
        self.pos = torch.cat([self.pos, lens.repeat_interleave(n)])
        self.n_gen = torch.cat([self.n_gen, n_gen + 1])
        self.seq = torch.cat([self.seq, seq])
        if done.any():  # a first token was a stop token (or max_new_tokens is 1)
            old = torch.zeros(B, dtype=torch.bool, device=dev)
            self.retire(torch.cat([old, done]), torch.cat([old, stopped]))

    def step(self) -> None:
        """Decode one token for every active row: one model call, the `done.any()` check its only host sync."""
        B = len(self.tok)
        if self.graphs is not None:
            logits = self.graphs(self.tok, self.pos)
        else:
            slots = torch.arange(B, device=self.device)
            h = self.model.hidden(self.tok[:, None], positions=self.pos[:, None], cache=self.cache, slots=slots)
            logits = self.model.lm_head(h[:, 0])  # (B, 1, hidden) -> (B, V)
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += B
        self.tok, done, stopped = self.sample_and_record(logits, self.seq, self.n_gen)
        self.pos, self.n_gen = self.pos + 1, self.n_gen + 1
        self.bar.update(B)
        if done.any():
            self.retire(done, stopped)

    def sample_and_record(self, logits: torch.Tensor, seq: torch.Tensor, n_gen: torch.Tensor):
        """Sample token number n_gen (B,) of sequences seq (B,) from logits (B, V) and write it to the outputs
        -> tokens (B,), done (B,) (stop token or max_new_tokens reached), stopped (B,) (stop token)."""
        u = self.uniforms[seq, n_gen] if self.uniforms is not None else None
        t, lp = self.sample(logits, u, self.temperature, self.top_p)
        self.out_tokens[seq, n_gen] = t
        self.out_logprobs[seq, n_gen] = lp
        stopped = torch.isin(t, self.stops) if len(self.stops) else torch.zeros_like(t, dtype=torch.bool)
        return t, stopped | (n_gen + 1 >= self.max_new), stopped

    def retire(self, done: torch.Tensor, stopped: torch.Tensor) -> None:
        """Record the rows that finished (done (B,); stopped: on a stop token), free the groups whose last row that
        was, and compact the survivors into slots 0..B'-1."""
        d_seq, d_len = self.seq[done], self.n_gen[done]
        self.out_len[d_seq] = d_len
        self.out_stopped[d_seq] = stopped[done]
        self.bar.update(int((self.max_new - d_len).sum()))  # the unused budget of rows that stopped early
        done_l = done.tolist()
        for g in self.cache.group[:len(done_l)][done].tolist():
            self.rows_left[g] -= 1
            if self.rows_left[g] == 0:
                self.free_groups.append(g)
        self._compact(done_l)

    def _compact(self, done: list[bool]) -> None:
        """Drop the done rows: the surviving rows with the highest slots move into the holes below the new batch size
        (generated K/V and group index, one batched copy; the prompt segment never moves), so decode attention keeps
        reading a plain prefix of the slots."""
        B = len(done)
        keep = B - sum(done)
        holes = [i for i in range(keep) if done[i]]
        movers = [i for i in range(keep, B) if not done[i]]
        perm = list(range(keep))  # new row i <- old row perm[i]
        for h, m in zip(holes, movers):
            perm[h] = m
        if movers:
            src, dst = torch.tensor(movers, device=self.device), torch.tensor(holes, device=self.device)
            P = int(self.n_gen[src].max()) - 1  # generated entries written: n_gen - 1
            if P > 0:  # k, v (L, S, Tg, Hkv, D): copy slots src -> dst, first P generated positions
                self.cache.k[:, dst, :P] = self.cache.k[:, src, :P]
                self.cache.v[:, dst, :P] = self.cache.v[:, src, :P]
            self.cache.group[dst] = self.cache.group[src]
            self.stats["kv_moves"] += len(movers)
        perm = torch.tensor(perm, dtype=torch.long, device=self.device)
        self.tok, self.pos, self.n_gen, self.seq = self.tok[perm], self.pos[perm], self.n_gen[perm], self.seq[perm]

    def close(self) -> None:
        self.bar.close()
        if self.graphs is not None:
            self.stats["graphs"], self.stats["pad_rows"] = len(self.graphs.graphs), self.graphs.pad_rows

    def completions(self) -> list[Completion]:
        """The outputs, prompt-major: one device -> host copy."""
        tokens, logprobs = self.out_tokens.cpu(), self.out_logprobs.cpu()
        n, lens, stopped = self.n, self.out_len.tolist(), self.out_stopped.tolist()
        return [Completion(tokens[i, :L].tolist(), logprobs[i, :L].tolist(), i // n, i % n, s)
                for i, (L, s) in enumerate(zip(lens, stopped))]
