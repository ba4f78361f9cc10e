#!/usr/bin/env bash
# Held-out memory loads (heldout.py) on one GPU: measure.py's TabbyAPI method on configurations the calibration
# was not fitted on, plus one verbose exllamav3 probe for the chunk-1024 loader transient. Uses the 4-layer slice
# that ../serving_speed/run.sh prepare writes to /tmp/slices/glm-4l (written here if missing).
# Usage on the device, from the repository root (carry .whl .tabby .dev):
#   OUT=$OUT [BUDGET_S=200] [HELDOUT_ONLY=name,name] bash benchmarks/memory_calibration/run_heldout.sh
# Writes $OUT/memory_heldout.tgz (results.jsonl, tabby.log, probe.log, heldout.log, versions.json).
set -uo pipefail
OUT=${OUT:?set OUT to a folder for the results}
BUDGET_S=${BUDGET_S:-200}
here=benchmarks/memory_calibration
res=/tmp/res/memory_heldout
mkdir -p "$res" "$OUT"
trap 'tar -czf "$OUT/memory_heldout.tgz" -C /tmp/res memory_heldout' EXIT
. benchmarks/gpu_stack/setup.sh >> "$res/setup.log" 2>&1 || { cat "$res/setup.log"; exit 1; }
python3 -P benchmarks/gpu_stack/versions.py > "$res/versions.json" 2>&1
model=/tmp/slices/glm-4l
waited=0
while [ -d /tmp/slices ] && [ ! -f /tmp/slices/ready ] && [ $waited -lt 120 ]; do sleep 1; waited=$((waited + 1)); done
[ -f "$model/config.json" ] || python3 -P .dev/snap/benchmarks/memory_calibration/make_glm_slice.py "$model" \
    --dense 1 --moe 3 --bits 4 --head-bits 6 > "$res/slice.log" 2>&1
python3 -P $here/heldout.py tabby --model "$model" --tabby "$TABBY_DIR" --out "$res" \
    --deadline-s $((BUDGET_S - SECONDS - 45)) --load-timeout-s 90 ${HELDOUT_ONLY:+--only "$HELDOUT_ONLY"} 2>&1 \
    | tee -a "$res/heldout.log" | cut -c1-300
if [ $((BUDGET_S - SECONDS)) -gt 40 ]; then
    python3 -P $here/heldout.py probe --model "$model" --out "$res" --load-timeout-s 60 2>&1 | tee -a "$res/heldout.log" | cut -c1-300
fi
echo "heldout done at ${SECONDS} s"
