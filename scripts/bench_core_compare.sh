#!/usr/bin/env bash
# An older engine (BASE_CHECKOUT, e.g. `git worktree add ../wt-base01 01edd43`) against this checkout, both
# started by the same `cosyapp bench service` client (--service-checkout), alternating old and new in each round:
#
#   single  full-size random CosyVoice2, one zero-shot streaming request of 150 forced tokens (time to first
#           chunk, total time, service cores)
#   natural tiny CosyVoice2 c1/c8 and tiny Fish c1/c4, max_concurrent 8, natural texts of different lengths
#   fixed   tiny CosyVoice2 c1/c4/c8, 100 fixed tokens per request
#
# Then it prints every table and the new/old ratios of each round. Quiet machine wanted: other load shows in the
# tables' "other" cores column.
#
#   BASE_CHECKOUT=../wt-base01 scripts/bench_core_compare.sh [OUT_DIR]
#   settings: ROUNDS (2), PARTS ("single natural fixed"), REQUESTS (4), MODELS_DIR (OUT_DIR/models), PYTHON
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BASE=$(cd "${BASE_CHECKOUT:?set BASE_CHECKOUT to the older checkout}" && pwd)
OUT=${1:-$ROOT/bench-core-out}
ROUNDS=${ROUNDS:-2}
PARTS=${PARTS:-single natural fixed}
REQUESTS=${REQUESTS:-4}
MODELS=${MODELS_DIR:-$OUT/models}
PY=${PYTHON:-python}
PROMPT_TEXT="欢迎光临，请问您需要点什么？"  # the default prompt voice's transcript (README: "The default prompt voice")
export PYTHONPATH="$ROOT"
mkdir -p "$OUT" "$MODELS"
echo "cores: $(nproc) ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)); base $(git -C "$BASE" describe --always --dirty); new $(git -C "$ROOT" describe --always --dirty)"

model() {  # model NAME BACKEND SIZE
    [ -f "$MODELS/$1/.done" ] || { "$PY" -m cosyapp models make-tiny "$MODELS/$1" --backend "$2" --size "$3" && touch "$MODELS/$1/.done"; }
}
model cv2-tiny cosyvoice2 tiny
model fish-tiny fish tiny
case " $PARTS " in *" single "*) model cv2-full cosyvoice2 full ;; esac

bench() {  # bench SIDE CHECKOUT NAME ARGS...
    local side=$1 checkout=$2 name=$3; shift 3
    echo "== $name: $side ($checkout)"
    "$PY" -m cosyapp bench service --service-checkout "$checkout" --poisson-rate 0 \
        --service-log "$OUT/$name-$side.log" --json "$OUT/$name-$side.json" "$@"
}

for round in $(seq 1 "$ROUNDS"); do
    for side in base new; do
        checkout=$BASE; [ "$side" = new ] && checkout=$ROOT
        for part in $PARTS; do
            case $part in
            single)  bench "$side" "$checkout" "r$round-single" --model-dir "$MODELS/cv2-full" --levels 1 \
                         --requests 1 --fixed-length 150 --prompt-text "$PROMPT_TEXT" ;;
            natural) bench "$side" "$checkout" "r$round-natural-cv2" --model-dir "$MODELS/cv2-tiny" \
                         --max-concurrent 8 --levels 1,8 --requests "$REQUESTS" --natural
                     bench "$side" "$checkout" "r$round-natural-fish" --backend fish --model-dir "$MODELS/fish-tiny" \
                         --max-concurrent 8 --levels 1,4 --requests "$REQUESTS" --natural ;;
            fixed)   bench "$side" "$checkout" "r$round-fixed" --model-dir "$MODELS/cv2-tiny" --max-concurrent 8 \
                         --levels 1,4,8 --requests "$REQUESTS" --fixed-length 100 ;;
            esac
        done
    done
done

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
print("\nnew / old (each round; audio s/s: higher is better, first audio and total: lower is better)")
for new_path in sorted(out.glob("*-new.json")):
    base_path = new_path.with_name(new_path.name.replace("-new.json", "-base.json"))
    if not base_path.exists():
        continue
    new, base = (json.loads(p.read_text()) for p in (new_path, base_path))
    for new_level, base_level in zip(new["levels"], base["levels"]):
        cores = [f"{c:.2f}" if c is not None else "-" for c in (new_level["cpu_cores"].get("service"),
                                                                 base_level["cpu_cores"].get("service"))]
        ratio = lambda key, sub: new_level[key][sub] / base_level[key][sub] if base_level[key][sub] else float("nan")
        print(f"{new_path.name[:-9]:22s} {new_level['name']:5s} audio s/s x{new_level['audio_s_per_s'] / base_level['audio_s_per_s']:.2f}"
              f"  first audio p50 x{ratio('first_audio_s', 'p50'):.2f} p95 x{ratio('first_audio_s', 'p95'):.2f}"
              f"  total p50 x{ratio('total_s', 'p50'):.2f}  service cores new {cores[0]} old {cores[1]}")
EOF
