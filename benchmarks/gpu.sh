#!/usr/bin/env bash
# Every H100/H200 measurement behind BENCHMARKS.md in ONE command that ends within BUDGET seconds (default 450,
# compiles included): real Qwen3-VL-30B-A3B and Kimi-VL-A3B config.json files with random bf16 weights, nothing
# to download. Steps run cheapest first, each under its own timeout (cut to the time left); a failing step never
# stops the next. Each result is appended to $OUT/results.jsonl the moment it is measured, as
# {"step": NAME, "data": {...}}, and every step ends with a {"step": NAME, "status": ...} line; $OUT/log.txt
# keeps everything printed.
#
#   bash benchmarks/gpu.sh              on the GPU machine (OUT defaults to benchmarks/gpu-out)
#   bash benchmarks/gpu.sh --dry-run    on a CPU: tiny models and shapes, the same steps and output (CI runs it)
set -u
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-benchmarks/gpu-out}
BUDGET=${BUDGET:-450}
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
LOG=$OUT/log.txt
: > "$RESULTS"
: > "$LOG"
START=$(date +%s)
export PYTHONUNBUFFERED=1

step() {  # step NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 15 ]; then
    echo "{\"step\": \"$name\", \"status\": \"skipped\", \"reason\": \"out of time\"}" >> "$RESULTS"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit} s): $*" >> "$LOG"
  local t0
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>> "$LOG" | tee -a "$LOG" \
    | sed -u -n "s/^{.*}\$/{\"step\": \"$name\", \"data\": &}/p" >> "$RESULTS"
  local rc=${PIPESTATUS[0]} status=ok
  [ "$rc" -ne 0 ] && status=failed
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status=timeout
  echo "{\"step\": \"$name\", \"status\": \"$status\", \"rc\": $rc, \"seconds\": $(($(date +%s) - t0))}" >> "$RESULTS"
}

if [ "$DRY" = 1 ]; then
  RUN="python3 benchmarks/gpu_run.py --dry-run"
  Q="--model tiny-qwen --device cpu --dtype float32"
  K="--model tiny-kimi --device cpu --dtype float32"
  DECODE="--decode-steps 4 --repeats 1 --image-size 128 --text-tokens 16"
  PREFILL="--batch 2 --image-size 128 --text-tokens 16 --decode-steps 2 --repeats 1"
else
  RUN="python3 benchmarks/gpu_run.py"
  Q="--config configs/qwen3_vl_30b_a3b.json --random-weights --device cuda --dtype bfloat16"
  K="--config configs/kimi_vl_a3b.json --random-weights --device cuda --dtype bfloat16"
  DECODE="--decode-steps 64 --repeats 5 --image-size 448 --text-tokens 64"
  # batch 8 x ~2k tokens: a 1280 px image is 1600 visual tokens (Qwen; Kimi 1260 px: 2025), plus 400 text tokens
  PREFILL="--batch 8 --text-tokens 400 --decode-steps 4 --repeats 3"
fi

step probe 60 $RUN probe
step gpu-tests 150 python3 -m pytest -q -m gpu tests
step experts 90 $RUN experts
step tiles 90 $RUN tiles
# batch-1 decode, no skipping vs 88%: one shared policy, one CUDA graph (eager kernels, no compile time);
# the graphed steps checked against eager ones; transformers on the same GPU, config, weights and inputs
step qwen-decode 150 python3 bench.py $Q --policy full,threshold --target 0.88 $DECODE --no-compile --check-graph \
  --compare-transformers
step qwen-prefill-b8 120 python3 bench.py $Q --policy full,threshold --target 0.88 $PREFILL \
  $([ "$DRY" = 1 ] || echo --image-size 1280) --no-compile
step kimi-decode 120 python3 bench.py $K --policy full,threshold --target 0.88 $DECODE --no-compile --check-graph
step kimi-prefill-b8 100 python3 bench.py $K --policy full,threshold --target 0.88 $PREFILL \
  $([ "$DRY" = 1 ] || echo --image-size 1260) --no-compile
# the same decode steps compiled by Inductor (minutes of compilation each: last, so they only use what is left)
step qwen-decode-compiled 200 python3 bench.py $Q --policy full,threshold --target 0.88 $DECODE --compile --check-graph
step kimi-decode-compiled 200 python3 bench.py $K --policy full,threshold --target 0.88 $DECODE --compile --check-graph
echo "gpu.sh: $(grep -c '"status": "ok"' "$RESULTS") steps ok in $(($(date +%s) - START)) s; results in $RESULTS"
