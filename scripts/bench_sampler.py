"""Rollout throughput: our Sampler vs transformers' generate (static cache) on the GRPO shape, same weights.

Model: a random Qwen2 (default 4 layers, hidden 256, 4 heads / 2 kv heads, intermediate 688, vocab 2048 like the
tiny tokenizer in assets/, tied embeddings), built by transformers and loaded into ours from the same checkpoint.
Both sides sample at T = 1 with no top-k / top-p, no stop tokens, and exactly --new tokens per sequence
(transformers: min_new_tokens = max_new_tokens, no eos). transformers gets the prompts once with
num_return_sequences = n (it expands them to prompts x n rows and prefills every row); ours prefills each prompt
once and shares its K/V with its n samples. Both are warmed up once, then timed --repeats times interleaved;
the best of each is reported. On CUDA ours also runs without CUDA graphs (eager decode steps), in the same loop.

Line 1: --prompts random prompts of --prompt-len tokens, n = --n.
Line 2 (when data.py is there): held-out puzzle prompts of the embedded PBMC data rendered with the chat template
(system + user, generation prompt), n = --puzzle-n; transformers gets them left-padded with an attention mask.

    python scripts/bench_sampler.py                 # bf16, CPU
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import Transformer  # noqa: E402
from sampler import Sampler  # noqa: E402


def build_models(args, vocab):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(args.seed)
    cfg = Qwen2Config(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=vocab,
                      tie_word_embeddings=True, max_position_embeddings=4096)
    hf = Qwen2ForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = Transformer.from_pretrained(d, device=args.device, dtype=getattr(torch, args.dtype)).eval()
    hf = hf.to(device=args.device, dtype=getattr(torch, args.dtype))
    return hf, ours


def best_times(fns, repeats):
    """Warm every fn up once, then time them interleaved (a, b, a, b, ...) so that both see the same machine load;
    -> the best time of each."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def bench(hf, ours, prompts, n, new, repeats, max_batch):
    """-> (our tokens/s, transformers tokens/s, generated tokens per run, our tokens/s without CUDA graphs or None
    on CPU)."""
    total = len(prompts) * n * new

    def ours_fn(cuda_graphs):
        sampler = Sampler(ours, max_batch=max_batch, cuda_graphs=cuda_graphs)

        def run():
            outs = sampler.generate(prompts, n=n, max_new_tokens=new, temperature=1.0, seed=0, progress=False)
            assert sum(len(o.tokens) for o in outs) == total
        return run

    L = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as decoder-only generate expects
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = 1
    dev = next(hf.parameters()).device
    ids, mask = ids.to(dev), mask.to(dev)

    def run_hf():
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              num_return_sequences=n, max_new_tokens=new, min_new_tokens=new, eos_token_id=None,
                              pad_token_id=0, cache_implementation="static")
        assert out.shape == (len(prompts) * n, L + new), out.shape

    cuda = next(ours.parameters()).is_cuda
    fns = [ours_fn(True), run_hf] + ([ours_fn(False)] if cuda else [])  # eager decode: what the graphs save
    times = best_times(fns, repeats)
    return total / times[0], total / times[1], total, (total / times[2] if cuda else None)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4, help="transformer layers")
    ap.add_argument("--hidden", type=int, default=256, help="hidden size")
    ap.add_argument("--heads", type=int, default=4, help="attention heads")
    ap.add_argument("--kv-heads", type=int, default=2, help="key/value heads (grouped-query attention)")
    ap.add_argument("--intermediate", type=int, default=688, help="MLP intermediate size")
    ap.add_argument("--vocab", type=int, default=2048, help="vocabulary size of the random-prompt line")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"], help="model dtype")
    ap.add_argument("--device", default="cpu", help="torch device for both models")
    ap.add_argument("--prompts", type=int, default=8, help="distinct prompts (line 1)")
    ap.add_argument("--n", type=int, default=8, help="samples per prompt (line 1)")
    ap.add_argument("--prompt-len", type=int, default=256, help="tokens per random prompt (line 1)")
    ap.add_argument("--new", type=int, default=96, help="new tokens per sequence, forced (both lines)")
    ap.add_argument("--puzzles", type=int, default=8, help="held-out puzzles (line 2), spread over puzzle sizes")
    ap.add_argument("--puzzle-n", type=int, default=5, help="samples per puzzle (line 2)")
    ap.add_argument("--max-batch", type=int, default=None, help="our sampler's slot count (default: all sequences)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side after one warm-up; best is reported")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts")
    ap.add_argument("--skip-puzzles", action="store_true", help="only the random-prompt line")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    load_before = os.getloadavg()[0]
    hf, ours = build_models(args, args.vocab)
    g = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(0, args.vocab, (args.prompts, args.prompt_len), generator=g).tolist()
    rows.append((f"random {args.prompts}x{args.prompt_len} tok, n={args.n}",
                 *bench(hf, ours, prompts, args.n, args.new, args.repeats, args.max_batch)))

    if args.skip_puzzles:
        pass
    elif not os.path.exists(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data.py")):
        print("data.py not found: skipping the puzzle line")
    else:
        import data
        from model import encode_chat
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(data.TOKENIZER_PATH)
        split = data.embedded()
        pool = data.test_puzzles(split, per_n=max(1, args.puzzles))
        step = max(1, len(pool) // args.puzzles)
        puzzles = pool[::step][:args.puzzles]
        prompts = [encode_chat(tok, [{"role": "system", "content": p.system}, {"role": "user", "content": p.user}],
                               add_generation_prompt=True) for p in puzzles]
        if tok.get_vocab_size() != args.vocab:
            hf, ours = build_models(args, tok.get_vocab_size())
        lens = sorted(len(p) for p in prompts)
        rows.append((f"puzzles {len(prompts)}x{lens[0]}-{lens[-1]} tok, n={args.puzzle_n}",
                     *bench(hf, ours, prompts, args.puzzle_n, args.new, args.repeats, args.max_batch)))

    print(f"\n{args.layers} layers, hidden {args.hidden}, {args.heads}/{args.kv_heads} heads, "
          f"intermediate {args.intermediate}, {args.dtype}, {args.device}, {torch.get_num_threads()} threads, "
          f"T=1 sampling, {args.new} new tokens forced, best of {args.repeats}; 1-min load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after (timings are only comparable on an idle machine)")
    print(f"{'workload':<36} {'tokens':>7} {'ours tok/s':>11} {'HF static tok/s':>16} {'ratio':>6}"
          + ("   ours eager (no CUDA graphs) tok/s, ratio to HF" if args.device.startswith("cuda") else ""))
    for name, ours_tps, hf_tps, total, eager_tps in rows:
        print(f"{name:<36} {total:>7} {ours_tps:>11.0f} {hf_tps:>16.0f} {ours_tps / hf_tps:>5.2f}x"
              + (f"   {eager_tps:.0f}, {eager_tps / hf_tps:.2f}x" if eager_tps else ""))


if __name__ == "__main__":
    main()
