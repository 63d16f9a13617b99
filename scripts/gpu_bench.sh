#!/usr/bin/env bash
# The GPU benchmark in one call, from a clean copy of the repository (see README, "GPU benchmark"):
#
#   scripts/gpu_bench.sh [OUT_DIR]
#
# 1. installs the carried wheels in .whl/ (the service's pure-Python needs a bare GPU machine lacks) into a
#    scratch folder, when there are any;
# 2. makes the full-size random CosyVoice2 and Fish models (`cosyapp models make-tiny --size full`);
# 3. checks the device's outputs against CPU float32 stage by stage (`cosyapp bench device-check`);
# 4. runs the engine benchmark and the HTTP load benchmark: CosyVoice2 with fixed 150-token requests and
#    with natural texts at concurrency 1, 4, 16, 64, Fish at 1 and 16;
# 5. writes summary.json, summary.txt and every log and JSON (gpu_bench.tar.gz) to OUT_DIR (default $OUT,
#    else ./gpu-bench-out), and prints the summary last.
#
# Environment (defaults for the GPU; the test suite's CPU dry run sets small values):
#   GPU_BENCH_DEVICE=cuda  GPU_BENCH_SIZE=full  GPU_BENCH_LEVELS=1,4,16,64  GPU_BENCH_FISH_LEVELS=1,16
#   GPU_BENCH_REQUESTS=3 (per client and level)  GPU_BENCH_TOKENS=150  GPU_BENCH_FISH_FRAMES=100
#   GPU_BENCH_BATCH_STREAMS=1,4,16,64 (engine: vocoding of N streams at once)
#   GPU_BENCH_BASELINE=DIR   another checkout (an older commit) benchmarked the same way, run before this
#                            one at each benchmark step, so both are measured in one session, alternating
#   GPU_BENCH_RUNS=3 (engine runs)  GPU_BENCH_DEADLINE=0 (seconds for the whole script, 0 = none: a step
#   gets at most what is left, later steps are skipped, and the results are still packed)
#   GPU_BENCH_STEP_TIMEOUT=300 (seconds per step)  GPU_BENCH_WHEELS=.whl (folder of wheels)  PYTHON=python3
# A step that fails or times out is recorded in the summary and the next step still runs; the script exits 1
# when any step failed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-$ROOT/gpu-bench-out}}"
DEVICE="${GPU_BENCH_DEVICE:-cuda}"
SIZE="${GPU_BENCH_SIZE:-full}"
LEVELS="${GPU_BENCH_LEVELS:-1,4,16,64}"
FISH_LEVELS="${GPU_BENCH_FISH_LEVELS:-1,16}"
REQUESTS="${GPU_BENCH_REQUESTS:-3}"
TOKENS="${GPU_BENCH_TOKENS:-150}"
FISH_FRAMES="${GPU_BENCH_FISH_FRAMES:-100}"
BATCH_STREAMS="${GPU_BENCH_BATCH_STREAMS:-1,4,16,64}"
BASELINE="${GPU_BENCH_BASELINE:-}"
STEP_TIMEOUT="${GPU_BENCH_STEP_TIMEOUT:-300}"
RUNS="${GPU_BENCH_RUNS:-3}"
DEADLINE="${GPU_BENCH_DEADLINE:-0}"
PY="${PYTHON:-python3}"
WHEELS="${GPU_BENCH_WHEELS:-$ROOT/.whl}"

mkdir -p "$OUT_DIR"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/cosyapp-gpu-bench.XXXXXX")"
LOGS="$WORK/results"
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
START=$(date +%s)

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    "$WHEELS"/*.whl || { echo "installing the carried wheels failed" >&2; exit 1; }
  SITE="$WORK/site"
else
  SITE=""
fi
# PYTHONPATH for a checkout: its own package first, then the carried wheels.
pythonpath() { echo "$1${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"; }

# Everything the service imports, before any device time goes into models: a missing package stops here.
PYTHONPATH="$(pythonpath "$ROOT")" "$PY" -c 'import cosyapp.cli, cosyapp.server.app, cosyapp.bench, cosyapp.bench_service' \
  || { echo "the service's packages are not all importable (carry the missing ones in $WHEELS)" >&2; exit 1; }

FAILED=()
# step NAME TREE COMMAND...: run `python -m cosyapp COMMAND...` from TREE with a time limit, log to NAME.log.
step() {
  local name="$1" tree="$2"; shift 2
  local t0=$(date +%s) rc limit="$STEP_TIMEOUT"
  if [[ $DEADLINE -gt 0 ]]; then
    local left=$(( DEADLINE - (t0 - START) - 20 ))  # 20 s kept for the summary and packing
    if [[ $left -lt 10 ]]; then
      echo "$name rc=skipped 0s" >>"$LOGS/steps.txt"; FAILED+=("$name"); echo "== $name skipped: out of time"
      return
    fi
    [[ $left -lt $limit ]] && limit=$left
  fi
  echo "== $name ($(( t0 - START )) s in)"
  (cd "$tree" && PYTHONPATH="$(pythonpath "$tree")" timeout -k 10 "$limit" "$PY" -m cosyapp "$@") \
    >"$LOGS/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s" >>"$LOGS/steps.txt"
  if [[ $rc -ne 0 ]]; then
    FAILED+=("$name")
    echo "   $name failed (rc $rc); log tail:"; tail -n 15 "$LOGS/$name.log" | sed 's/^/   | /'
  fi
}

echo "== machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>/dev/null
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())'
  (cd "$ROOT" && git rev-parse HEAD 2>/dev/null)
  [[ -n "$BASELINE" ]] && (cd "$BASELINE" && echo "baseline $(git rev-parse HEAD 2>/dev/null || echo "$BASELINE")")
} | tee "$LOGS/machine.txt"

MODELS="$WORK/models"
step make_cosyvoice2 "$ROOT" models make-tiny "$MODELS/cosyvoice2" --size "$SIZE"
step make_fish "$ROOT" models make-tiny "$MODELS/fish" --backend fish --size "$SIZE"
step device_check "$ROOT" bench device-check --cosyvoice2-dir "$MODELS/cosyvoice2" --fish-dir "$MODELS/fish" \
  --device "$DEVICE" --json "$LOGS/device_check.json"

# Each benchmark step runs on the baseline first, then on this checkout.
TREES=()
[[ -n "$BASELINE" ]] && TREES+=("baseline=$BASELINE")
TREES+=("current=$ROOT")
for entry in "${TREES[@]}"; do
  label="${entry%%=*}" tree="${entry#*=}"
  step "engine_$label" "$tree" bench engine --model-dir "$MODELS/cosyvoice2" --device "$DEVICE" --tokens "$TOKENS" \
    --runs "$RUNS" --batch-streams "$BATCH_STREAMS" --json "$LOGS/engine_$label.json" \
    $([[ $label == current ]] && echo --profile "$LOGS/engine_profile.txt")
done
for entry in "${TREES[@]}"; do
  label="${entry%%=*}" tree="${entry#*=}"
  step "service_fixed_$label" "$tree" bench service --model-dir "$MODELS/cosyvoice2" --backend cosyvoice2 \
    --device "$DEVICE" --levels "$LEVELS" --requests "$REQUESTS" --fixed-length "$TOKENS" --poisson-rate 0 \
    --json "$LOGS/service_fixed_$label.json" --service-log "$LOGS/service_fixed_$label.service.log"
done
step service_fish_current "$ROOT" bench service --model-dir "$MODELS/fish" --backend fish --device "$DEVICE" \
  --levels "$FISH_LEVELS" --requests "$REQUESTS" --fixed-length "$FISH_FRAMES" --poisson-rate 0 \
  --json "$LOGS/service_fish_current.json" --service-log "$LOGS/service_fish_current.service.log"
step service_natural_current "$ROOT" bench service --model-dir "$MODELS/cosyvoice2" --backend cosyvoice2 \
  --device "$DEVICE" --levels "$LEVELS" --requests "$REQUESTS" --natural --poisson-rate 0 \
  --json "$LOGS/service_natural_current.json" --service-log "$LOGS/service_natural_current.service.log"

PYTHONPATH="$(pythonpath "$ROOT")" "$PY" -m cosyapp bench summary "$LOGS" --json "$OUT_DIR/summary.json" \
  >"$OUT_DIR/summary.txt" 2>&1 || FAILED+=("summary")
tar -czf "$OUT_DIR/gpu_bench.tar.gz" -C "$WORK" results
cat "$LOGS/steps.txt"
cat "$OUT_DIR/summary.txt"
rm -rf "$WORK"
if [[ ${#FAILED[@]} -gt 0 ]]; then
  echo "failed steps: ${FAILED[*]}"
  exit 1
fi
echo "all steps passed in $(( $(date +%s) - START )) s"
