#!/usr/bin/env bash
# Serving speed on one GPU (README.md): two GLM-4.7-shaped slices (real widths, 160 experts, vocab 151552, 4 bpw,
# head 6 bits; 1 dense + 3 MoE layers and 1 dense + 1 MoE layer) written by the snapshot's make_glm_slice.py, then
# bench.py: copy bandwidth, bytes per token, TabbyAPI decode at concurrency 1/2/4/8 and prefill at chunk sizes
# 512/1024/2048/4096.
# Usage on the device, from the repository root (carry .whl .tabby .dev):
#   OUT=$OUT [BUDGET_S=240] [BENCH_ARGS="--phases prefill --prefill-requests 4 --prefill-warm-long"] \
#       bash benchmarks/serving_speed/run.sh [prepare|measure|all]
# (`prepare` only writes the slices, no GPU; ../memory_calibration/run_heldout.sh uses the 4-layer one too.)
# Writes $OUT/serving_speed.tgz (results.json, tabby.log, bench.log, versions.json, slices.log).
set -uo pipefail
OUT=${OUT:?set OUT to a folder for the results}
STAGE=${1:-all}
BUDGET_S=${BUDGET_S:-240}
here=benchmarks/serving_speed
res=/tmp/res/serving_speed
slices=/tmp/slices
mkdir -p "$res" "$slices" "$OUT"
. benchmarks/gpu_stack/setup.sh >> "$res/setup.log" 2>&1 || { cat "$res/setup.log"; exit 1; }
make_slices() {
    rm -f "$slices/ready"
    for spec in "glm-4l 3" "glm-2l 1"; do
        set -- $spec
        [ -f "$slices/$1/config.json" ] || python3 -P .dev/snap/benchmarks/memory_calibration/make_glm_slice.py \
            "$slices/$1" --dense 1 --moe "$2" --bits 4 --head-bits 6 >> "$res/slices.log" 2>&1
        echo "slice $1: exit $? at ${SECONDS} s" >> "$res/slices.log"
    done
    touch "$slices/ready"
}
measure() {
    trap 'tar -czf "$OUT/serving_speed.tgz" -C /tmp/res serving_speed' EXIT
    python3 -P benchmarks/gpu_stack/versions.py > "$res/versions.json" 2>&1
    local waited=0
    while [ ! -f "$slices/ready" ] && [ $waited -lt 120 ]; do sleep 1; waited=$((waited + 1)); done
    [ -f "$slices/glm-4l/config.json" ] || { echo "no slice"; cat "$res/slices.log"; exit 1; }
    text=$(python3 -P -c 'import importlib.util, pathlib; s = importlib.util.find_spec("exllamav3"); print(pathlib.Path(next(iter(s.submodule_search_locations))) / "conversion/standard_cal_data/wiki.utf8")')
    small=(); [ -f "$slices/glm-2l/config.json" ] && small=(--small-slice "$slices/glm-2l")
    python3 -P $here/bench.py --slice "$slices/glm-4l" "${small[@]}" --tabby "$TABBY_DIR" --out "$res" \
        --text "$text" --budget-s $((BUDGET_S - SECONDS)) ${BENCH_ARGS:-} 2>&1 | tee -a "$res/bench.log" | cut -c1-400
    code=${PIPESTATUS[0]}
    echo "serving_speed done at ${SECONDS} s (exit $code)"
    exit "$code"
}
case $STAGE in
    prepare) make_slices ;;
    measure) measure ;;
    all) make_slices; measure ;;
    *) echo "stage must be prepare, measure or all"; exit 2 ;;
esac
