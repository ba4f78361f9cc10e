#!/usr/bin/env bash
# GPU acceptance of the KL spot-check, in ONE device command (a run may last 600 s; this aims for ~450 s):
#   make a tiny GLM-4 MoE in BF16 -> EXL3 2/4/6 bpw (converted in parallel) -> driver.py: `deploy reference
#   compute` on BF16, TabbyAPI serving each quant + `deploy verify --json`, exllamav3 full-vocabulary KL.
# Usage on the device, from the repository root (README.md lists what to carry):
#   OUT=$OUT benchmarks/spotcheck_gpu/run.sh
# Env: BITS (default "2 4 6"), CACHE_MODE (FP16), HEAD_STD (0.16), BUDGET_S (540: the whole script).
# Results in $OUT: results.json, results.md, reference.json.gz, setup.log, convert.log, tabby.log, driver.log.
set -uo pipefail
OUT=${OUT:?set OUT to a folder for the results}
BITS=${BITS:-2 4 6}
BUDGET_S=${BUDGET_S:-540}
here=benchmarks/spotcheck_gpu
work=/tmp/spotcheck
mkdir -p "$OUT" "$work/models"

[ -f benchmarks/device_setup.sh ] || { echo "benchmarks/device_setup.sh is missing"; exit 1; }
. benchmarks/device_setup.sh > "$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
tail -n 1 "$OUT/setup.log"
[ -n "${TABBY_DIR:-}" ] || { echo "no TabbyAPI source (.tabby/main.py): carry .tabby"; exit 1; }
python3 -c "import httpx" 2>/dev/null || { echo "httpx missing: add its wheels to .whl (README.md)"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$OUT/setup.log" 2>&1

bf16=$work/models/tiny-bf16
python3 $here/make_model.py "$bf16" --head-std "${HEAD_STD:-0.16}" >> "$OUT/setup.log" 2>&1 \
    || { tail -20 "$OUT/setup.log"; exit 1; }
echo "model written at ${SECONDS} s"

quants=()
pids=()
for b in $BITS; do
    q=$work/models/tiny-${b}bpw
    quants+=("$q")
    python3 -m exllamav3.conversion.convert_model -i "$bf16" -o "$q" -w "$work/w$b" -b "$b" -cr 32 -cc 512 \
        > "$work/convert-$b.log" 2>&1 &
    pids+=($!)
done
status=0
for i in "${!pids[@]}"; do wait "${pids[$i]}" || status=1; done
for b in $BITS; do echo "==== $b bpw"; tail -n 15 "$work/convert-$b.log"; done > "$OUT/convert.log"
[ $status -eq 0 ] || { echo "a conversion failed"; cat "$OUT/convert.log" | tail -40; exit 1; }
echo "converted at ${SECONDS} s"

args=()
for q in "${quants[@]}"; do args+=(--quant "$q"); done
python3 $here/driver.py --bf16 "$bf16" "${args[@]}" --tabby "$TABBY_DIR" --out "$OUT" \
    --cache-mode "${CACHE_MODE:-FP16}" --budget-s $((BUDGET_S - SECONDS)) 2>&1 | tee "$OUT/driver.log" | cut -c1-300
code=${PIPESTATUS[0]}
echo "all done at ${SECONDS} s (driver exit $code)"
exit "$code"
