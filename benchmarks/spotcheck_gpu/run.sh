#!/usr/bin/env bash
# GPU acceptance of the KL spot-check, in ONE device command (README.md): `deploy detect` -> set-up -> a tiny
# GLM-4 MoE in BF16 -> EXL3 2/4/6 bpw (converted in parallel while `deploy reference compute` runs on BF16; a
# failed conversion is retried alone) -> driver.py: TabbyAPI serving each quant + `deploy verify --json`, then
# exllamav3's full-vocabulary KL at the reference's positions. Results are rewritten after every step.
# Usage on the device, from the repository root:
#   OUT=$OUT bash benchmarks/spotcheck_gpu/run.sh
# Env: BITS (default "2 4 6"), CACHE_MODE (FP16), HEAD_STD (0.16), BUDGET_S (450: the whole script).
#   SPOTCHECK_MODE=floor: BITS defaults to "6"; TabbyAPI first serves the BF16 model itself against its own
#   reference (the serving floor), then the quant(s), then the last quant again with EXTRA_CACHE_MODE ("5,4";
#   empty: skipped). README.md "Serving floor".
# $OUT (7 files; a device run returns at most 8): detect-1gpu.txt, setup.log (set-up, model, reference compute,
# conversions), reference.json.gz, results.json, results.md, tabby.log (keys redacted), driver.log.
set -uo pipefail
OUT=${OUT:?set OUT to a folder for the results}
MODE=${SPOTCHECK_MODE:-acceptance}
case $MODE in
    acceptance) BITS=${BITS:-2 4 6}; mode_args=() ;;
    floor) BITS=${BITS:-6}; mode_args=(--floor)
           [ -n "${EXTRA_CACHE_MODE-5,4}" ] && mode_args+=(--extra-cache-mode "${EXTRA_CACHE_MODE-5,4}") ;;
    *) echo "SPOTCHECK_MODE must be acceptance or floor, not $MODE"; exit 2 ;;
esac
BUDGET_S=${BUDGET_S:-450}
here=benchmarks/spotcheck_gpu
work=/tmp/spotcheck
mkdir -p "$OUT" "$work/models"
repo=$(pwd)
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost  # the HTTP clients talk to 127.0.0.1 only

# deploy detect on this one-GPU machine (issue 2's single-GPU record); needs only the image's packages
{ echo "\$ deploy detect      # kind nvidia-h200 (one GPU)"; PYTHONPATH=$repo python3 -m toolkit.cli detect
  echo "exit $?"; echo; echo "\$ deploy detect --json"; PYTHONPATH=$repo python3 -m toolkit.cli detect --json
  echo "exit $?"; } > "$OUT/detect-1gpu.txt" 2>&1
head -n 4 "$OUT/detect-1gpu.txt"

[ -f benchmarks/device_setup.sh ] || { echo "benchmarks/device_setup.sh is missing"; exit 1; }
. benchmarks/device_setup.sh > "$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
tail -n 1 "$OUT/setup.log"
export PYTHONPATH=$repo:$PYTHONPATH
[ -n "${TABBY_DIR:-}" ] || { echo "no TabbyAPI source (.tabby/main.py): carry .tabby"; exit 1; }
python3 -c "import httpx" 2>/dev/null || { echo "httpx missing: add its wheels to .whl (README.md)"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$OUT/setup.log" 2>&1
echo "set up at ${SECONDS} s" | tee -a "$OUT/setup.log"

bf16=$work/models/tiny-bf16
python3 $here/make_model.py "$bf16" --head-std "${HEAD_STD:-0.16}" >> "$OUT/setup.log" 2>&1 \
    || { tail -n 30 "$OUT/setup.log"; exit 1; }
echo "model written at ${SECONDS} s" | tee -a "$OUT/setup.log"

convert() {  # bits -> converts into $work/models/tiny-<bits>bpw, log in $work/convert-<bits>.log
    rm -rf "$work/models/tiny-$1bpw" "$work/w$1"
    timeout 150 python3 -m exllamav3.conversion.convert_model -i "$bf16" -o "$work/models/tiny-$1bpw" \
        -w "$work/w$1" -b "$1" -cr 32 -cc 512 > "$work/convert-$1.log" 2>&1
}
declare -A pids
for b in $BITS; do convert "$b" & pids[$b]=$!; done

# the reference on BF16 while the quants convert (the GPU has room for all of them)
reference=$OUT/reference.json.gz
started=$SECONDS
timeout 150 python3 -m toolkit.cli reference compute --model-dir "$bf16" --out "$reference" > "$work/reference.log" 2>&1
ref_exit=$?
ref_s=$((SECONDS - started))
{ echo "==== deploy reference compute: exit $ref_exit in ${ref_s} s"; tail -n 40 "$work/reference.log"; } \
    | tee -a "$OUT/setup.log" | tail -n 3
printf '{"exit": %d, "seconds": %d}\n' "$ref_exit" "$ref_s" > "$work/reference-stats.json"

failed=()
for b in $BITS; do wait "${pids[$b]}" || failed+=("$b"); done
echo "converted at ${SECONDS} s; failed: ${failed[*]:-none}" | tee -a "$OUT/setup.log"
for b in "${failed[@]}"; do  # parallel runs can only fail where one alone would not by contention: retry alone
    [ $((BUDGET_S - SECONDS)) -gt 200 ] || break
    { echo "==== $b bpw, parallel attempt"; tail -n 25 "$work/convert-$b.log"; } >> "$OUT/setup.log"
    convert "$b"; echo "retried $b bpw alone: exit $? at ${SECONDS} s" | tee -a "$OUT/setup.log"
done
quants=()
for b in $BITS; do
    { echo "==== $b bpw"; tail -n 8 "$work/convert-$b.log"; } >> "$OUT/setup.log"
    [ -f "$work/models/tiny-${b}bpw/config.json" ] && quants+=(--quant "$work/models/tiny-${b}bpw")
done
[ "$ref_exit" -eq 0 ] || { echo "reference compute failed"; tail -n 30 "$work/reference.log"; exit 1; }
[ ${#quants[@]} -gt 0 ] || { echo "every conversion failed"; tail -n 60 "$OUT/setup.log"; exit 1; }

python3 $here/driver.py --bf16 "$bf16" "${quants[@]}" --tabby "$TABBY_DIR" --out "$OUT" --reference "$reference" \
    --reference-stats "$work/reference-stats.json" --cache-mode "${CACHE_MODE:-FP16}" \
    --budget-s $((BUDGET_S - SECONDS)) "${mode_args[@]}" 2>&1 | tee "$OUT/driver.log" | cut -c1-400
code=${PIPESTATUS[0]}
echo "all done at ${SECONDS} s (driver exit $code)"
exit "$code"
