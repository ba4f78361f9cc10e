#!/usr/bin/env bash
# The deployment reference and the serving-path KL per cache mode (README.md), in one device command:
#   prepare  a tiny GLM-4 MoE in BF16 (../spotcheck_gpu/make_model.py of the snapshot, realistic distributions)
#            -> EXL3 4 bpw (deployed), 2 and 6 bpw (wrong deployments), converted in parallel
#   measure  driver.py: `deploy reference compute` on the 4 bpw folder (time, peak memory), then TabbyAPI with the
#            rendered config.yml of each cache mode (FP16, 8,8, 6,5, 5,4, 4,4, 2,2) and `deploy verify --json`;
#            then 2 and 6 bpw served under the planned name and settings
# Usage on the device, from the repository root (carry .whl .tabby .dev):
#   OUT=$OUT [BUDGET_S=330] [BITS="4 2 6"] [SP_JOBS="cache-8,8 wrong-tiny-2bpw"] bash benchmarks/serving_path/run.sh [prepare|measure|all]
# (`prepare &` then `measure` lets another run use the GPU while the quants convert.)
# Writes $OUT/serving_path.tgz (results.json, reference-4bpw.json.gz, reference-stats.json, tabby.log,
# prepare.log, driver.log, versions.json).
set -uo pipefail
OUT=${OUT:?set OUT to a folder for the results}
STAGE=${1:-all}
BUDGET_S=${BUDGET_S:-330}
here=benchmarks/serving_path
res=/tmp/res/serving_path
work=/tmp/serving_path
mkdir -p "$res" "$work/models" "$OUT"
. benchmarks/gpu_stack/setup.sh >> "$res/setup.log" 2>&1 || { cat "$res/setup.log"; exit 1; }
bf16=$work/models/tiny-bf16

prepare() {
    rm -f "$work/prepared"
    python3 -P .dev/snap/benchmarks/spotcheck_gpu/make_model.py "$bf16" --head-std 0.16 >> "$res/prepare.log" 2>&1 \
        || { echo "make_model failed" >> "$res/prepare.log"; touch "$work/prepared"; return 1; }
    local pids=()
    for b in ${BITS:-4 2 6}; do
        ( rm -rf "$work/models/tiny-${b}bpw" "$work/w$b"
          timeout 200 python3 -m exllamav3.conversion.convert_model -i "$bf16" -o "$work/models/tiny-${b}bpw" \
              -w "$work/w$b" -b "$b" -cr 32 -cc 512 > "$work/convert-$b.log" 2>&1
          echo "convert $b bpw: exit $? at ${SECONDS} s" >> "$res/prepare.log"; tail -n 4 "$work/convert-$b.log" >> "$res/prepare.log" ) &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p"; done
    touch "$work/prepared"
}

measure() {
    trap 'tar -czf "$OUT/serving_path.tgz" -C /tmp/res serving_path' EXIT
    python3 -P benchmarks/gpu_stack/versions.py > "$res/versions.json" 2>&1
    local waited=0
    while [ ! -f "$work/prepared" ] && [ $waited -lt 240 ]; do sleep 1; waited=$((waited + 1)); done
    echo "quants prepared (waited ${waited} s): $(ls $work/models)"
    [ -f "$work/models/tiny-4bpw/config.json" ] || { echo "no 4 bpw quant"; cat "$res/prepare.log"; exit 1; }
    wrong=()
    for b in 2 6; do [ -f "$work/models/tiny-${b}bpw/config.json" ] && wrong+=("$work/models/tiny-${b}bpw"); done
    python3 -P $here/driver.py --deployed "$work/models/tiny-4bpw" --wrong "${wrong[@]}" --render .dev/render-h200 \
        --mode-renders .dev/render-h200-cFP16 .dev/render-h200-c88 .dev/render-h200-c65 .dev/render-h200-c54 \
        .dev/render-h200-c44 .dev/render-h200-c22 --tabby "$TABBY_DIR" --out "$res" \
        --budget-s $((BUDGET_S - SECONDS)) ${SP_JOBS:+--jobs $SP_JOBS} 2>&1 | tee -a "$res/driver.log" | cut -c1-500
    code=${PIPESTATUS[0]}
    echo "serving_path done at ${SECONDS} s (driver exit $code)"
    exit "$code"
}

case $STAGE in
    prepare) prepare ;;
    measure) measure ;;
    all) prepare; measure ;;
    *) echo "stage must be prepare, measure or all"; exit 2 ;;
esac
