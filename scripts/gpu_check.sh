#!/usr/bin/env bash
# GPU checks, not part of CI (CI has no GPU): the compiled Triton kernels, model and sampler on CUDA against their
# oracles (tests/test_gpu.py), kernel and rollout timings against their PyTorch / transformers peers, and short SFT
# and GRPO runs of the tiny default on FSDP2 over NCCL. Each part has its own time limit, so one hang does not eat
# the rest. Usage: bash scripts/gpu_check.sh [LOG_DIR]   (with the GPU machine's python3: torch, triton,
# transformers, pytest installed). PARTS="tests sft" bash scripts/gpu_check.sh runs only the parts named.
set -uo pipefail
cd "$(dirname "$0")/.."
log=${1:-/tmp/gpu_check}
mkdir -p "$log"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
# PARTS="tests sampler_tiny ...": run only those parts (default: all)
part() { local secs=$1 name=$2; shift 2; [[ -z "${PARTS:-}" || " $PARTS " == *" $name "* ]] || return 0
         echo "=== $name"; local t=$SECONDS
         timeout "$secs" "$@" > "$log/$name.log" 2>&1; local rc=$?
         tail -n "${TAIL:-6}" "$log/$name.log"; echo "=== $name: rc $rc, $((SECONDS - t)) s"; }
nvidia-smi -L
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__)"
part 120 tests python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
part 45 kernels_7b python3 scripts/bench_kernels.py
part 45 kernels_05b python3 scripts/bench_kernels.py --heads 14 --kv-heads 2 --head-dim 64
TAIL=4 part 120 sampler_tiny python3 scripts/bench_sampler.py --device cuda --prompts 16 --n 8 --new 128
TAIL=4 part 150 sampler_05b python3 scripts/bench_sampler.py --device cuda --layers 24 --hidden 896 --heads 14 \
    --kv-heads 2 --intermediate 4864 --vocab 151936 --prompts 16 --n 8 --prompt-len 512 --new 256 --repeats 2 \
    --skip-puzzles
TAIL=3 part 100 sft python3 -m torch.distributed.run --nproc_per_node 1 train_sft.py --steps 300 --eval-every 150 --eval-puzzles 5 \
    --no-progress --out /tmp/gpu_check_runs/sft
TAIL=3 part 80 rl python3 -m torch.distributed.run --nproc_per_node 1 train_rl.py --model /tmp/gpu_check_runs/sft/model --steps 3 --eval-every 3 \
    --eval-puzzles 3 --no-progress --out /tmp/gpu_check_runs/rl
TAIL=30 part 90 profile python3 scripts/profile_sampler.py
