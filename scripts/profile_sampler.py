"""Where the sampler's decode time goes on a GPU: wall time, then torch.profiler's top ops by CPU and by GPU time.

Default: a random Qwen2.5-0.5B-shaped model (24 layers, hidden 896, 14/2 heads), bf16, 16 prompts of 512 tokens,
n = 8. On an H200 with eager decode (results/2026-11-26-h200/sampler_profile_05b.log): 23 ms per decode step of wall
time, 3.6 ms of GPU kernel time (about 15%): the decode loop was bound by kernel launches (~35 per layer per step).
With the sampler's CUDA graphs (results/2026-11-26-h200-graphs/): 0.50 s for the timed run instead of 2.93 s.

    python scripts/profile_sampler.py          # needs CUDA
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ModelConfig, Transformer  # noqa: E402
from sampler import Sampler  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=24, help="transformer layers")
    ap.add_argument("--hidden", type=int, default=896, help="hidden size")
    ap.add_argument("--heads", type=int, default=14, help="attention heads")
    ap.add_argument("--kv-heads", type=int, default=2, help="key/value heads")
    ap.add_argument("--intermediate", type=int, default=4864, help="MLP intermediate size")
    ap.add_argument("--vocab", type=int, default=151936, help="vocabulary size")
    ap.add_argument("--prompts", type=int, default=16, help="prompts")
    ap.add_argument("--prompt-len", type=int, default=512, help="tokens per prompt")
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--new", type=int, default=128, help="new tokens per sample (timed run; the profile takes half)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_sampler needs a CUDA GPU")
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                      tie_word_embeddings=True)
    model = Transformer(cfg).init_weights().to("cuda", torch.bfloat16).eval()
    prompts = torch.randint(0, args.vocab, (args.prompts, args.prompt_len)).tolist()
    sampler = Sampler(model)
    sampler.generate(prompts, n=args.n, max_new_tokens=32, progress=False)  # warm-up: Triton compiles
    torch.cuda.synchronize()
    t = time.perf_counter()
    sampler.generate(prompts, n=args.n, max_new_tokens=args.new, progress=False)
    torch.cuda.synchronize()
    print(f"wall {time.perf_counter() - t:.3f} s for {args.prompts * args.n * args.new} tokens")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        sampler.generate(prompts, n=args.n, max_new_tokens=args.new // 2, progress=False)
        torch.cuda.synchronize()
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=50))
    print(ka.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=50))


if __name__ == "__main__":
    main()
