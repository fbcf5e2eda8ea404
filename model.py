"""Qwen2 in one file: config, architecture, Hugging Face checkpoints, tokenizer and ChatML.

Architecture (Qwen2 / Qwen2.5, as in transformers' `Qwen2ForCausalLM`):
    embed_tokens -> L x [x + attn(rmsnorm(x)); x + mlp(rmsnorm(x))] -> rmsnorm -> lm_head
    attention: grouped-query (num_key_value_heads <= num_attention_heads), q/k/v projections with bias, o without,
    rotary embeddings (rotate-half layout) on q and k; MLP: down(silu(gate(x)) * up(x)), no bias.
Module names mirror the Hugging Face tensor names (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`), so a
checkpoint's state dict loads with no renaming table.

Three ways to call the model (all share one code path):
    model(input_ids)                                   training / full recompute: causal attention over the row
    model(ids, positions=p, packed=lens)               packed training row (B == 1): sequences of lengths `lens`
                                                       back to back, each with its own positions and causal attention
    model(ids, positions=p, prefix_groups=segs)        packed GRPO row (B == 1): segments (P, n, C), each a prompt of
                                                       P tokens then n completions of it padded to C tokens; the
                                                       prompt is computed once, not n times (`shared_prefix_attention`)
    model(ids, cache=kv, groups=g, seq_lens=n)         prefill: row b is the prompt of prompt group g[b], from
                                                       position 0, right-padded to T with n[b] real tokens; its K/V
                                                       go to the group's prompt segment, kv.prompt_len[g[b]] = n[b]
    model(ids[:, None], positions=p, cache=kv, slots=s) decode: one new token per row at position p[b] in row slot
                                                       s[b], attending to its group's prompt and the p[b] - prompt_len
                                                       generated tokens of slot s[b] before it, and itself
The KV cache is a plain `KVCache` in two segments, so that the n samples of a prompt share one copy of its K/V: a
prompt segment, one entry per prompt group, and a generated segment, one entry per row slot (see `KVCache`). The
sampler owns the groups and slots. Attention goes through `kernels/`.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import decode_attention, prefill_attention

# SDPA's backends for training and full recomputes, cuDNN left out: on Hopper SDPA prefers cuDNN attention, which
# builds an execution plan for every new sequence length (~10 ms each), and packed micro-batches bring a new length
# nearly every call (measured on an H200: 11 ms per call, 0.6-1.2 s per tiny SFT step instead of 0.05 s).
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


# ----------------------------------------------------------------------------------------------------------------------
# Config

@dataclass
class ModelConfig:
    """The Qwen2 hyper-parameters we use, read from a Hugging Face `config.json`."""
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    extra: dict = field(default_factory=dict, repr=False)  # other config.json keys, written back unchanged on save

    REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "ModelConfig":
        missing = [k for k in cls.REQUIRED if k not in d]
        if missing:
            raise ValueError(f"{source}: missing required key(s) {missing}")
        d = dict(d)
        # transformers >= 5 writes rope_theta inside "rope_parameters"; released Qwen2.5 configs have it at top level.
        rope = d.get("rope_parameters") or {}
        if "rope_theta" not in d and "rope_theta" in rope:
            d["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default" or d.get("rope_scaling"):
            raise ValueError(f"{source}: rope scaling {rope or d.get('rope_scaling')} is not supported")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (Qwen2 uses silu)")
        if d["hidden_size"] % d["num_attention_heads"] or d["num_attention_heads"] % d["num_key_value_heads"]:
            raise ValueError(f"{source}: hidden_size, num_attention_heads, num_key_value_heads do not divide")
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names and v is not None}
        extra = {k: v for k, v in d.items() if k not in names and k != "rope_parameters"}
        return cls(**known, extra=extra)

    @classmethod
    def from_json(cls, path: str) -> "ModelConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f), source=path)

    def to_dict(self) -> dict:
        d = {**self.extra, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
             "use_sliding_window": False}
        d.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"})
        return d


# ----------------------------------------------------------------------------------------------------------------------
# Architecture

@dataclass
class KVCache:
    """K/V of every layer in two segments (L layers, Hkv kv heads, head dim D):

        pk, pv      (L, G, Tp, Hkv, D)  prompt segment: the prompt of each of G prompt groups, stored once and
                                        shared by all the rows (samples) of the group; written by prefill
        prompt_len  (G,) int64          prompt tokens of each group (set by prefill)
        k, v        (L, S, Tg, Hkv, D)  generated segment: the fed-back generated tokens of each of S row slots; the
                                        token at position p >= prompt_len goes to index p - prompt_len
        group       (S,) int64          prompt group of each slot (set by the slot's owner, the sampler)

    A row at position p therefore sees keys prompt 0..prompt_len-1 of its group, then its own generated keys
    0..p - prompt_len. Allocated with zeros: the reference attention needs finite values past the valid lengths."""
    pk: torch.Tensor
    pv: torch.Tensor
    prompt_len: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    group: torch.Tensor

    @classmethod
    def allocate(cls, config: ModelConfig, groups: int, prompt_len: int, slots: int, gen_len: int, device,
                 dtype) -> "KVCache":
        """G = `groups` prompts of up to `prompt_len` tokens, S = `slots` rows of up to `gen_len` generated tokens."""
        L, Hkv, D = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
        z = lambda *shape: torch.zeros(shape, device=device, dtype=dtype)  # noqa: E731
        return cls(z(L, groups, prompt_len, Hkv, D), z(L, groups, prompt_len, Hkv, D),
                   torch.zeros(groups, dtype=torch.long, device=device),
                   z(L, slots, gen_len, Hkv, D), z(L, slots, gen_len, Hkv, D),
                   torch.zeros(slots, dtype=torch.long, device=device))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 (fp64 stays fp64), cast back before the weight: transformers' Qwen2RMSNorm's rounding
        h = fp32_or_wider(x)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def fp32_or_wider(x: torch.Tensor) -> torch.Tensor:
    """x cast to fp32 when narrower (bf16, fp16), else as is (fp32, and fp64 in the tests' float64 checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype):
    """positions (B, T) -> cos, sin (B, T, 1, head_dim) in `dtype`, computed in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.float()[..., None] * inv_freq      # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None]  # (B, T, 1, D): rotate-half layout
    return emb.cos().to(dtype), emb.sin().to(dtype)


def shared_prefix_attention(q, k, v, segments: list[tuple[int, int, int]], gqa: bool):
    """q (1, H, T, D), k/v (1, Hkv, T, D) of one row of segments (P, n, C) back to back: a prompt of P tokens, then n
    completions of it, each right-padded to C tokens. Prompt tokens attend causally among themselves; a token of
    completion i attends to the whole prompt and causally within completion i, never to another completion. The
    numbers of n separate rows prompt + completion i, with the prompt's tokens computed once. -> (1, H, T, D)."""
    out, s = [], 0
    for P, n, C in segments:
        qp, kp, vp = (t[:, :, s:s + P] for t in (q, k, v))
        out.append(F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=gqa))
        if n:
            # (1, H, n*C, D) -> (n, H, C, D): one batch row per completion
            qc, kc, vc = (t[0, :, s + P:s + P + n * C].unflatten(1, (n, C)).transpose(0, 1) for t in (q, k, v))
            kc = torch.cat([kp.expand(n, -1, -1, -1), kc], 2)  # (n, Hkv, P + C, D): the prompt's keys, then its own
            vc = torch.cat([vp.expand(n, -1, -1, -1), vc], 2)
            see = torch.ones(C, P + C, dtype=torch.bool, device=q.device).tril(P)  # query i sees keys 0 .. P + i
            oc = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=see, enable_gqa=gqa)
            out.append(oc.transpose(0, 1).flatten(1, 2)[None])  # (n, H, C, D) -> (1, H, n*C, D)
        s += P + n * C
    return torch.cat(out, 2)


def apply_rope(x, cos, sin):
    """x (B, T, H, D): rotate the two halves of the head dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer  # index into the KV cache
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)

    def project(self, x, cos, sin):
        """x (B, T, hidden) -> q (B, T, H, D), k and v (B, T, Hkv, D), rotary embeddings applied to q and k."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q, k, v, cache=None, slots=None, groups=None, seq_lens=None, packed=None, prefix_groups=None):
        """q (B, T, H, D), k/v (B, T, Hkv, D) -> (B, T, H, D). Cache modes (see `Transformer.hidden`): prefill (slots
        None): row b is the prompt of group groups[b] with seq_lens[b] real tokens; decode: row b is slot slots[b] of
        group groups[b] with seq_lens[b] generated keys including the new token's. Without a cache, `packed` (lengths
        summing to T) splits the row into sequences, and `prefix_groups` into prompts with their completions
        (`shared_prefix_attention`)."""
        if cache is None:
            # training / full recompute: SDPA picks flash or memory-efficient kernels on GPU and has a backward
            gqa = self.n_heads != self.n_kv
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, T, H, D) -> (B, H, T, D)
            with sdpa_kernel(SDPA_BACKENDS):
                if prefix_groups is not None:
                    o = shared_prefix_attention(q, k, v, prefix_groups, gqa)
                elif packed is None:
                    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
                else:  # one causal attention per packed sequence: no padded keys or queries, no cross-sequence mask
                    o = torch.cat([F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=gqa)
                                   for a, b, c in zip(q.split(packed, 2), k.split(packed, 2), v.split(packed, 2))], 2)
            return o.transpose(1, 2)  # (B, H, T, D) -> (B, T, H, D)
        T = q.shape[1]
        if slots is None:
            # prefill from position 0: attend within the new tokens, then store them in the prompt segment (padded
            # tail included: it lies beyond prompt_len, where nothing reads it)
            o = prefill_attention(q, k, v, seq_lens)
            cache.pk[self.layer, groups, :T] = k
            cache.pv[self.layer, groups, :T] = v
            return o
        # decode: store the new token in the row's generated segment, attend to prompt + generated keys
        gen_pos = seq_lens - 1
        cache.k[self.layer, slots, gen_pos] = k[:, 0]
        cache.v[self.layer, slots, gen_pos] = v[:, 0]
        return decode_attention(q[:, 0], cache.pk[self.layer], cache.pv[self.layer], cache.prompt_len, groups,
                                cache.k[self.layer], cache.v[self.layer], slots, seq_lens)[:, None]


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """x + attention(rmsnorm(x)), then + mlp(rmsnorm(.)), in three parts: `before_attention` (norm, q/k/v, rope),
    the attention itself, `after_attention` (o_proj, residuals, norm, MLP). With `compiled` set (see
    `Transformer.compile_blocks`) the two parts around attention run through torch.compile when there is no cache."""
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.compiled = False

    def before_attention(self, x, cos, sin):
        return self.self_attn.project(self.input_layernorm(x), cos, sin)

    def after_attention(self, x, o):
        """x (B, T, hidden), o (B, T, H, D) the attention's output -> the block's output (B, T, hidden)."""
        x = x + self.self_attn.o_proj(o.flatten(2))
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward(self, x, cos, sin, **attend_args):
        before, after = Block.before_attention, Block.after_attention
        if self.compiled and attend_args.get("cache") is None:
            before, after = compiled(before), compiled(after)
        q, k, v = before(self, x, cos, sin)
        return after(self, x, self.self_attn.attend(q, k, v, **attend_args))


@functools.cache
def compile_settings() -> None:
    """The process-wide torch.compile settings, applied once: a failed compile (no C++ compiler, an unsupported op)
    warns and runs the function eagerly; the CPU kernels read the thread count when they run, not when they are
    built, since the trainers lower it while the machine is busy. Once only, so a caller (a test) may change them."""
    import torch._dynamo
    import torch._inductor.config
    torch._dynamo.config.suppress_errors = True
    torch._inductor.config.cpp.dynamic_threads = True


@functools.cache
def compiled(fn):
    """`fn` under torch.compile (inductor), one compiled function shared by every block and every model: parameters
    are graph inputs, so layers reuse one graph. Shapes are dynamic because a packed row's length T changes with
    every batch. Settings: `compile_settings`."""
    compile_settings()
    return torch.compile(fn, dynamic=True)


class Decoder(nn.Module):
    """The `model.` prefix of Hugging Face names: embeddings, blocks, final norm."""
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.grad_checkpointing = False  # activation checkpointing per block (train_*.py --grad-checkpointing)
        self.tie_weights()

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def compile_blocks(self, enable: bool = True) -> "Transformer":
        """Training and full recomputes (no KV cache) run each block's work around attention (norms, projections,
        rope, MLP, residuals) through torch.compile: one fused loop where eager PyTorch makes a pass over memory per
        op. Attention stays eager (a packed row's per-sequence split does not trace). Numbers match eager to rounding
        (tests/test_model.py); the first step of each new shape family pays the compile (seconds)."""
        for block in self.model.layers:
            block.compiled = enable
        return self

    def init_weights(self, std: float = 0.02):
        """Random init for training from scratch (normal(0, std) matrices, zero biases, unit norms)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        return self

    def hidden(self, input_ids, positions=None, cache=None, slots=None, groups=None, seq_lens=None, packed=None,
               prefix_groups=None):
        """input_ids (B, T) -> final normed hidden states (B, T, hidden). See the module docstring for the cache:
        with a cache, `groups` (prompt groups) means prefill and `slots` (row slots, T == 1) means decode; without
        one, `packed` (sequence lengths summing to T, with their positions in `positions`) means a packed row, and
        `prefix_groups` (segments (P, n, C), see `shared_prefix_attention`) a packed row of prompts and completions."""
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        if cache is not None:
            assert (slots is None) != (groups is None), "pass groups (prefill) or slots (decode)"
            if slots is None:  # prefill
                if seq_lens is None:
                    seq_lens = torch.full((B,), T, device=input_ids.device, dtype=torch.long)
                cache.prompt_len[groups] = seq_lens.to(cache.prompt_len)
            else:  # decode: each row's group and generated length (the new token included), once for all layers
                assert T == 1, "decode takes one token per row"
                groups = cache.group[slots]
                seq_lens = positions[:, 0] - cache.prompt_len[groups] + 1
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for block in self.model.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():
                # recompute the block in backward instead of storing its activations (training only, no cache)
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, packed=packed, prefix_groups=prefix_groups,
                                                      use_reentrant=False)
            else:
                x = block(x, cos, sin, cache=cache, slots=slots, groups=groups, seq_lens=seq_lens, packed=packed,
                          prefix_groups=prefix_groups)
        return self.model.norm(x)

    def forward(self, input_ids, logits_at=None, **kwargs):
        """input_ids (B, T) -> logits (B, T, vocab); with `logits_at` (a (B, T) bool mask or an index tuple) only the
        selected positions go through lm_head -> (K, vocab): a 152k vocabulary is then paid only where it is used
        (answer tokens in training, the last prompt token in prefill). Keep this the entry point under FSDP2: its
        hooks unshard the root's parameters (embeddings, final norm, lm_head) around `forward` only."""
        h = self.hidden(input_ids, **kwargs)
        return self.lm_head(h if logits_at is None else h[logits_at])

    # ------------------------------------------------------------------------------------------------------------------
    # Hugging Face checkpoints

    @classmethod
    def from_pretrained(cls, path: str, device="cpu", dtype=torch.bfloat16) -> "Transformer":
        """Load a Qwen2 checkpoint from a local folder or a hub id, straight into `device` and `dtype`.

        The model is built on the meta device, every tensor is read, checked and cast first, and only a complete,
        consistent set is assigned: an error (missing / unexpected / mis-shaped tensor, unreadable file) names the
        problem and returns nothing half-loaded. Peak memory is one copy of the weights.
        """
        folder = resolve_model_dir(path)
        config = ModelConfig.from_json(os.path.join(folder, "config.json"))
        with torch.device("meta"):
            model = cls(config)
        expected = {k: v for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            expected.pop("lm_head.weight")
        tensors = {}
        for file, names in _weight_files(folder).items():
            tensors.update(_read_safetensors(file, names, expected, device, dtype))
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise ValueError(f"{folder}: checkpoint is missing {len(missing)} tensor(s): {missing[:8]}")
        model.load_state_dict(tensors, strict=False, assign=True)
        model.tie_weights()  # assign=True replaced the embedding Parameter: point lm_head at the loaded one
        return model.to(device)

    def save_pretrained(self, out_dir: str, tokenizer_dir: str | None = None, max_shard_bytes: int = 4 << 30):
        save_pretrained(self.state_dict(), self.config, out_dir, tokenizer_dir, max_shard_bytes)


HF_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
            "tokenizer.json", "tokenizer_config.json"]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]


def resolve_model_dir(path: str) -> str:
    """A local folder as is; anything else is a hub id, downloaded (config, safetensors and tokenizer files only)."""
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or path.startswith((".", "/")) or path.count("/") > 1:  # a hub id is [owner/]name
        raise FileNotFoundError(f"{path}: no such model folder (from {os.getcwd()}), and not a hub id")
    from huggingface_hub import snapshot_download
    return snapshot_download(path, allow_patterns=HF_FILES)


def _weight_files(folder: str) -> dict[str, list[str] | None]:
    """{safetensors file: tensor names it should hold (None = whatever it holds)}."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(os.path.join(folder, file), []).append(name)
        return files
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(single):
        return {single: None}
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def _read_safetensors(file, names, expected, device, dtype) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file}: listed in the index but missing")
    out = {}
    try:
        with safe_open(file, framework="pt", device=str(device)) as f:
            for name in names if names is not None else f.keys():
                if name not in expected:
                    if name == "lm_head.weight" or name.endswith("rotary_emb.inv_freq"):
                        continue  # tied copy of the embedding / an old non-persistent buffer: nothing to load
                    raise ValueError(f"{file}: unexpected tensor {name!r}")
                shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(expected[name].shape):
                    raise ValueError(f"{file}: tensor {name!r} has shape {shape}, "
                                     f"the config needs {tuple(expected[name].shape)}")
                out[name] = f.get_tensor(name).to(dtype)
    except ValueError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise ValueError(f"{file}: cannot read ({type(e).__name__}: {e}); truncated or corrupt?") from e
    return out


def save_pretrained(state_dict: dict, config: ModelConfig, out_dir: str, tokenizer_dir: str | None = None,
                    max_shard_bytes: int = 4 << 30):
    """Write a Hugging Face Qwen2 checkpoint: config.json, model.safetensors (or shards + index), tokenizer files.

    Written into `<out_dir>.tmp` and renamed into place, so an interrupted save never leaves a broken `out_dir`.
    A tied lm_head is not written (transformers re-ties it from `tie_word_embeddings`). Tensors are saved in the
    dtype config.json names (the model's own), files readable by all (0644).
    """
    from safetensors.torch import save_file
    # the checkpoint's own dtype, as its config.json names it: fp32 master weights of a bf16 model are saved as bf16
    named = config.extra.get("torch_dtype") or config.extra.get("dtype")
    cast = getattr(torch, named) if named in ("bfloat16", "float16", "float32") else None
    tensors = {k: v.detach().to("cpu", cast if cast is not None and v.is_floating_point() else v.dtype).contiguous()
               for k, v in state_dict.items() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    shards, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    out_dir = os.path.abspath(out_dir)
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump({**config.to_dict(), "torch_dtype": dtype, "dtype": dtype}, f, indent=2)  # both names, one value
    if len(shards) == 1:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, names in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: tensors[n] for n in names}, os.path.join(tmp, file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    for name in TOKENIZER_FILES if tokenizer_dir else []:
        if os.path.exists(os.path.join(tokenizer_dir, name)):
            shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(tmp, name))
    for name in os.listdir(tmp):  # safetensors writes 0600; a model folder is for others to read too
        os.chmod(os.path.join(tmp, name), 0o644)
    old = out_dir + ".old"
    if os.path.exists(out_dir):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer and chat format (ChatML, exactly as Qwen2.5-Instruct's chat template renders it)

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def load_tokenizer(folder: str):
    """The `tokenizers.Tokenizer` of a model folder (or hub id)."""
    from tokenizers import Tokenizer
    path = os.path.join(resolve_model_dir(folder), "tokenizer.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no tokenizer.json in the model folder")
    return Tokenizer.from_file(path)


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """messages [{"role", "content"}] -> ChatML text. Without a leading system turn, Qwen2.5's default system prompt
    is inserted (as its template does); `add_generation_prompt` appends the opening of the assistant turn."""
    if not messages or messages[0]["role"] != "system":
        messages = [{"role": "system", "content": QWEN_DEFAULT_SYSTEM}, *messages]
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    return tokenizer.encode(render_chat(messages, add_generation_prompt), add_special_tokens=False).ids


def stop_token_ids(tokenizer, folder: str | None = None) -> list[int]:
    """Ids that end an assistant turn: `<|im_end|>` and `<|endoftext|>`, plus generation_config's eos ids."""
    ids = [tokenizer.token_to_id(t) for t in STOP_TOKENS]
    gen = os.path.join(folder, "generation_config.json") if folder else ""
    if gen and os.path.exists(gen):
        with open(gen) as f:
            eos = json.load(f).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos]
    return sorted({i for i in ids if i is not None})
