#!/usr/bin/env bash
# Mixed-precision quants on a GPU in ONE device command (README.md): set-up -> train a tiny GLM-4 MoE on
# exllamav3's bundled text (train_model.py, TRAIN_S seconds) -> EXL3 conversions at 2, 2.5, 3, 3.5 and 4 bpw with
# the MCG codebook (GLM-4.7's quants use it), in parallel -> measure.py: exllamav3's measure step, `deploy quant mix`
# (card recipe and exllamav3's optimizer) at the size of every intermediate conversion, full-vocabulary KL against
# BF16 for all, TabbyAPI loading one mix.
# Usage on the device, from the repository root (carry .whl .tabby .dev):
#   OUT=$OUT [BUDGET_S=560] [TRAIN_S=100] [SEED=0] [MEASURE_ROWS=10] bash benchmarks/quant_mix/run.sh
# Writes $OUT: results.json, train_log.json, setup.log, measure.log, measurement.json, mix-manifests.tgz.
set -uo pipefail
OUT=${OUT:?set OUT to a folder for the results}
BUDGET_S=${BUDGET_S:-560}
TRAIN_S=${TRAIN_S:-100}
SEED=${SEED:-0}
MEASURE_ROWS=${MEASURE_ROWS:-10}
work=/tmp/quant_mix
mkdir -p "$OUT" "$work/models"
. benchmarks/device_setup.sh > "$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
export PYTHONPATH=$(pwd):$PYTHONPATH NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$OUT/setup.log" 2>&1
echo "set up at ${SECONDS} s" | tee -a "$OUT/setup.log"
bf16=$work/models/bf16
python3 benchmarks/quant_mix/train_model.py "$bf16" --seconds "$TRAIN_S" --seed "$SEED" > "$OUT/train.log" 2>&1 \
    || { tail -n 30 "$OUT/train.log"; exit 1; }
cp "$bf16/train_log.json" "$OUT/"
tail -n 1 "$OUT/train.log"
echo "trained at ${SECONDS} s" | tee -a "$OUT/setup.log"
pids=()
for b in 2 2.5 3 3.5 4; do
    ( timeout 240 python3 -m exllamav3.conversion.convert_model -i "$bf16" -o "$work/models/q$b" -w "$work/w$b" \
          -b "$b" -cb mcg -cr 32 -cc 512 > "$work/convert-$b.log" 2>&1
      echo "convert $b bpw: exit $? at ${SECONDS} s" >> "$OUT/setup.log" ) &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
tail -n 5 "$OUT/setup.log"
[ -f "$work/models/q2/config.json" ] && [ -f "$work/models/q4/config.json" ] || { tail -n 20 "$work/convert-2.log"; exit 1; }
python3 benchmarks/quant_mix/measure.py --models "$work/models" --work "$work" --out "$OUT" \
    ${TABBY_DIR:+--tabby "$TABBY_DIR"} --measure-rows "$MEASURE_ROWS" --budget-s $((BUDGET_S - SECONDS)) 2>&1 | tee "$OUT/measure.log" | cut -c1-300
code=${PIPESTATUS[0]}
cp "$work/measurement.json" "$OUT/" 2>/dev/null
tar czf "$OUT/mix-manifests.tgz" -C "$work" $(cd "$work" && ls -d mixes/*/mix.json mixes/*/quantization_config.json models/q*/quantization_config.json 2>/dev/null)
echo "done at ${SECONDS} s (exit $code)"
exit "$code"
