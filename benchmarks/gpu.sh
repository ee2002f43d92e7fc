#!/usr/bin/env bash
# The H100/H200 runs behind BENCHMARKS.md, in one batch (device time is short). Real-size architectures from the
# real config.json files with random bf16 weights: nothing to download. Raw JSON lands in $OUT (default benchmarks/).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks}
GPU=$(python -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv | tee "$OUT/${GPU}_nvidia_smi.txt"
python benchmarks/kernels_gpu.py | tee "$OUT/${GPU}_kernels.txt"
Q="--config configs/qwen3_vl_30b_a3b.json --random-weights --device cuda --dtype bfloat16"
# batch-1 decode: no skipping vs 88% skipped (single threshold fitted to 0.88 on the prompt), compiled + CUDA graph
python bench.py $Q --policy full,threshold,reduce-k --target 0.88 --decode-steps 64 --repeats 5 \
    --image-size 448 --text-tokens 64 --json "$OUT/${GPU}_qwen_decode.json"
# prefill: batch 8 x ~2k-token image prompts (1280 px -> 1600 visual tokens + 400 text)
python bench.py $Q --policy full,threshold --target 0.88 --batch 8 --image-size 1280 --text-tokens 400 \
    --decode-steps 8 --repeats 3 --json "$OUT/${GPU}_qwen_prefill_b8.json"
# against transformers on the same GPU, config, weights and inputs
python bench.py $Q --policy full --decode-steps 32 --repeats 3 --image-size 448 --text-tokens 64 \
    --compare-transformers --json "$OUT/${GPU}_qwen_vs_transformers.json"
K="--config configs/kimi_vl_a3b.json --random-weights --device cuda --dtype bfloat16"
python bench.py $K --policy full,threshold,reduce-k --target 0.88 --decode-steps 64 --repeats 5 \
    --image-size 448 --text-tokens 64 --json "$OUT/${GPU}_kimi_decode.json"
python bench.py $K --policy full,threshold --target 0.88 --batch 8 --image-size 1260 --text-tokens 400 \
    --decode-steps 8 --repeats 3 --json "$OUT/${GPU}_kimi_prefill_b8.json"
