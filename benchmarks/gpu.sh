#!/usr/bin/env bash
# The H100/H200 measurements behind BENCHMARKS.md as three commands, most important first, each useful alone and
# each ending within its BUDGET (seconds, compiles included; default below) so that it fits one 10-minute call:
#
#   bash benchmarks/gpu.sh headline    the probe (what the GPU is), then Qwen3-VL-30B-A3B decode and batch-8 prefill
#                                      at 0 % and 88 % skip, CUDA-graphed, against transformers on the same GPU;
#                                      then Kimi-VL-A3B the same way                                 (BUDGET 480)
#   bash benchmarks/gpu.sh compiled    the same decode steps compiled by Inductor                    (BUDGET 420)
#   bash benchmarks/gpu.sh checks      the GPU-marked tests (tests/test_gpu.py and a few elsewhere), the
#                                      expert-path and Triton-tile sweeps                           (BUDGET 345)
#   bash benchmarks/gpu.sh             all three, one after the other (more than one 10-minute call on a GPU)
#   bash benchmarks/gpu.sh --dry-run [GROUP...]   on a CPU: tiny models and shapes, the same steps (CI runs it)
#   bash benchmarks/gpu.sh --plan [GROUP...]      print the steps (name, limit, command) without running them
#
# Real config.json files with random bf16 weights: nothing to download. Each step runs under its own timeout (cut
# to the time left); a failing step never stops the next. Every JSON line a step prints is appended to
# $OUT/results.jsonl the moment it is printed, as {"step": NAME, "data": {...}}; every step ends with a
# {"step": NAME, "status": ok|failed|timeout|skipped, ...} line, printed to stdout as well, so the command's own
# output tells what happened even if the files never come back. Results are appended across commands (each
# command starts with a {"command": ...} line); $OUT/log.txt keeps everything printed. Only the working tree may
# travel to the GPU machine: GIT_COMMIT=<sha> names the commit there (the probe also hashes the sources).
# FAIL_STEP=NAME (with --dry-run only) makes that step fail, to test that the others still run.
set -u
cd "$(dirname "$0")/.."
DRY=0
PLAN=0
GROUPS_ASKED=()
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    --plan) PLAN=1 ;;
    headline|compiled|checks) GROUPS_ASKED+=("$arg") ;;
    *) echo "gpu.sh: unknown argument $arg (use --dry-run, --plan, headline, compiled, checks)" >&2; exit 2 ;;
  esac
done
[ ${#GROUPS_ASKED[@]} -eq 0 ] && GROUPS_ASKED=(headline compiled checks)
OUT=${OUT:-benchmarks/gpu-out}
BUDGET_ASKED=${BUDGET:-}  # one budget for every group, else each group's own
RESULTS=$OUT/results.jsonl
LOG=$OUT/log.txt
export PYTHONUNBUFFERED=1
if [ "$PLAN" = 0 ]; then
  mkdir -p "$OUT"
  touch "$RESULTS" "$LOG"
fi

step() {  # step NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  if [ "$PLAN" = 1 ]; then
    echo "$name $limit $*"
    return
  fi
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 15 ]; then
    echo "{\"step\": \"$name\", \"status\": \"skipped\", \"reason\": \"out of time\"}" | tee -a "$RESULTS"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$DRY" = 1 ] && [ "${FAIL_STEP:-}" = "$name" ]; then
    set -- sh -c 'echo "FAIL_STEP: this step fails on purpose" >&2; exit 3'
  fi
  echo "=== $name (limit ${limit} s): $*" >> "$LOG"
  echo "=== $name (limit ${limit} s)"
  local t0
  t0=$(date +%s)
  # JSON lines go to results.jsonl as they come; stdout shows each line, long ones cut (the tables stay whole)
  timeout --kill-after=10 "$limit" "$@" 2>> "$LOG" | tee -a "$LOG" | awk -v step="$name" -v res="$RESULTS" '
    /^\{.*\}$/ { printf "{\"step\": \"%s\", \"data\": %s}\n", step, $0 >> res; fflush(res) }
    { if (length($0) > 1200) print substr($0, 1, 600) " ... (" length($0) " chars, in results.jsonl)"; else print $0
      fflush() }'
  local rc=${PIPESTATUS[0]} status=ok
  [ "$rc" -ne 0 ] && status=failed
  { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && status=timeout
  echo "{\"step\": \"$name\", \"status\": \"$status\", \"rc\": $rc, \"seconds\": $(($(date +%s) - t0))}" \
    | tee -a "$RESULTS"
}

if [ "$DRY" = 1 ]; then
  RUN="python3 benchmarks/gpu_run.py --dry-run"
  Q="--model tiny-qwen --device cpu --dtype float32"
  K="--model tiny-kimi --device cpu --dtype float32"
  DECODE="--decode-steps 4 --repeats 1 --image-size 128 --text-tokens 16"
  QPREFILL="--batch 2 --image-size 128 --text-tokens 16 --decode-steps 2 --repeats 1"
  KPREFILL=$QPREFILL
else
  RUN="python3 benchmarks/gpu_run.py"
  Q="--config configs/qwen3_vl_30b_a3b.json --random-weights --device cuda --dtype bfloat16"
  K="--config configs/kimi_vl_a3b.json --random-weights --device cuda --dtype bfloat16"
  DECODE="--decode-steps 64 --repeats 5 --image-size 448 --text-tokens 64"
  # batch 8 x ~2k tokens: a 1280 px image is 1600 visual tokens (Qwen; Kimi 1260 px: 2025), plus 400 text tokens
  QPREFILL="--batch 8 --image-size 1280 --text-tokens 400 --decode-steps 4 --repeats 3"
  KPREFILL="--batch 8 --image-size 1260 --text-tokens 400 --decode-steps 4 --repeats 3"
fi
SKIP="--policy full,threshold --target 0.88"  # no skipping vs 88 %: one shared policy, so one CUDA graph

headline() {
  # the probe first (~15 s): the GPU, driver, clocks, versions, commit and copy bandwidth the numbers below need
  step probe 45 $RUN probe
  # batch-1 decode graph-captured with eager kernels (no compile time), checked against eager decoding;
  # transformers on the same GPU, config, weights (shared) and inputs (wired up for Qwen only)
  step qwen-decode 140 python3 bench.py $Q $SKIP $DECODE --no-compile --check-graph --compare-transformers
  step qwen-prefill-b8 110 python3 bench.py $Q $SKIP $QPREFILL --no-compile --compare-transformers
  step kimi-decode 90 python3 bench.py $K $SKIP $DECODE --no-compile --check-graph
  step kimi-prefill-b8 80 python3 bench.py $K $SKIP $KPREFILL --no-compile
}

compiled() {
  step probe 30 $RUN probe --quick  # a later command may get a fresh machine: record it again
  # minutes of Inductor compilation each, hence a command of their own
  step qwen-decode-compiled 190 python3 bench.py $Q $SKIP $DECODE --compile --check-graph
  step kimi-decode-compiled 190 python3 bench.py $K $SKIP $DECODE --compile --check-graph
}

checks() {
  step probe 30 $RUN probe --quick
  # the GPU-marked tests: all of tests/test_gpu.py, tests/test_kernels.py's CUDA one, and the Triton path's
  # no-weight-copy check under this machine's torch and triton (tests/test_decode_compile.py)
  step gpu-tests 150 python3 -m pytest -q --durations=5 -m gpu tests/test_gpu.py tests/test_kernels.py \
    tests/test_decode_compile.py
  step experts 80 $RUN experts
  step tiles 80 $RUN tiles
}

for group in "${GROUPS_ASKED[@]}"; do
  case $group in
    headline) BUDGET=${BUDGET_ASKED:-480} ;;
    compiled) BUDGET=${BUDGET_ASKED:-420} ;;
    checks) BUDGET=${BUDGET_ASKED:-345} ;;
  esac
  START=$(date +%s)
  [ "$PLAN" = 1 ] && echo "# $group budget $BUDGET"
  if [ "$PLAN" = 0 ]; then
    echo "{\"command\": \"$group\", \"dry_run\": $([ "$DRY" = 1 ] && echo true || echo false), \"budget_s\": $BUDGET," \
      "\"started\": \"$(date -u +%FT%TZ)\", \"git_commit\": \"${GIT_COMMIT:-}\"}" | tee -a "$RESULTS"
  fi
  $group
  if [ "$PLAN" = 0 ]; then
    echo "gpu.sh $group: $(($(date +%s) - START)) s; results appended to $RESULTS"
  fi
done
