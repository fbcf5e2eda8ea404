"""bf16 autocast against fp32 on this CPU, side by side in one run: one tiny-model SFT step (forward + backward of a
packed micro-batch of 8 embedded puzzles) and rollouts from the sampler (12 prompts x n=8, 128 new tokens, T = 1).
What `--precision auto` decides from (train_common.use_bf16): a CPU without native bf16 (no AMX, no AVX512-BF16)
emulates it and runs slower in bf16 than in fp32.

    python scripts/bench_precision.py
"""
import argparse
import copy
import os
import sys
import time
from contextlib import nullcontext

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import data  # noqa: E402
from model import encode_chat, load_tokenizer  # noqa: E402
from sampler import Sampler  # noqa: E402
from train_common import SHORT_SYSTEM, build_model, cpu_has_bf16, messages, tokenizer_source  # noqa: E402
from train_sft import pack, tokenize  # noqa: E402


def sft_ms(model, batches, bf16: bool) -> float:
    """Mean ms per step after 2 warm-up steps."""
    times = []
    for b in batches:
        t0 = time.perf_counter()
        x, y, sel, pos, lens = pack(b, "cpu")
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
            logits = model(x, logits_at=sel, positions=pos, packed=lens)
        F.cross_entropy(logits.float(), y[sel]).backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return 1000 * sum(times[2:]) / len(times[2:])


def rollout_tok_s(model, prompts, dtype) -> float:
    m = copy.deepcopy(model).to(dtype).eval()
    Sampler(m).generate(prompts[:2], n=2, max_new_tokens=16, temperature=1.0, seed=0, progress=False)  # warm-up
    t0 = time.perf_counter()
    outs = Sampler(m).generate(prompts, n=8, max_new_tokens=128, temperature=1.0, seed=0, progress=False)
    return sum(len(o.tokens) for o in outs) / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="SFT steps per precision (the first 2 are warm-up)")
    args = ap.parse_args()
    tok = load_tokenizer(tokenizer_source("tiny", None))
    end = tok.token_to_id("<|im_end|>")
    cells = data.embedded()
    stream = data.PuzzleStream(0, cells=cells, mix=0.5, ambient=0.5, n_weights="linear",
                               teacher=data.fit_embedded_teacher(cells))
    puzzles = [stream[i] for i in range(8 * args.steps)]
    batches = [[tokenize(tok, p, p.assistant, end, 4096, "bench", SHORT_SYSTEM) for p in puzzles[s:s + 8]]
               for s in range(0, len(puzzles), 8)]
    prompts = [encode_chat(tok, messages(p, SHORT_SYSTEM), True) for p in data.test_puzzles(cells, per_n=2)][:12]
    model, _ = build_model("tiny", tok, torch.device("cpu"), 0)
    print(f"native bf16 on this CPU (AMX / AVX512-BF16): {cpu_has_bf16()}; threads {torch.get_num_threads()}")
    sft = {p: sft_ms(model, batches, p == "bf16") for p in ("bf16", "fp32")}
    roll = {p: rollout_tok_s(model, prompts, getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[p]))
            for p in ("bf16", "fp32")}
    print("| | bf16 | fp32 | fp32 / bf16 speed |\n|---|---|---|---|")
    print(f"| SFT step, ms | {sft['bf16']:.0f} | {sft['fp32']:.0f} | {sft['bf16'] / sft['fp32']:.2f}x |")
    print(f"| rollouts, tok/s | {roll['bf16']:.0f} | {roll['fp32']:.0f} | {roll['fp32'] / roll['bf16']:.2f}x |")


if __name__ == "__main__":
    main()
