#!/usr/bin/env bash
# The deployment reference on a GPU in ONE device command (README.md): set-up -> a tiny GLM-4 MoE (BF16) -> EXL3
# 4 bpw and the WRONG_BITS quants (in parallel) -> measure.py: the reference entry point as the container runs it,
# its distributions vs a plain forward, and `deploy verify` against real TabbyAPI serving the 4 bpw folder (FP16,
# 8,8, 6,5, 5,4, 4,4; wrong: cache 2,2 where FP16 was planned, each WRONG_BITS folder under the 4 bpw name).
# Usage on the device, from the repository root (carry .whl .tabby .dev):
#   OUT=$OUT [BUDGET_S=540] [WRONG_BITS="2 6"] bash benchmarks/deployment_reference/run.sh
# WRONG_BITS="" skips the other quants (and the wrong-weights servers).
# Writes $OUT: results.json, deployment-reference.json.gz, setup.log, measure.log, tabby.log (keys redacted).
set -uo pipefail
OUT=${OUT:?set OUT to a folder for the results}
BUDGET_S=${BUDGET_S:-540}
work=/tmp/deployment_reference
mkdir -p "$OUT" "$work/models"
. benchmarks/device_setup.sh > "$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
export PYTHONPATH=$(pwd):$PYTHONPATH NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
[ -n "${TABBY_DIR:-}" ] || { echo "no TabbyAPI source (.tabby/main.py): carry .tabby"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$OUT/setup.log" 2>&1
python3 - >> "$OUT/setup.log" 2>&1 <<'PY'
import torch, exllamav3
from exllamav3.version import __version__ as exl3
print("torch", torch.__version__, "exllamav3", exl3)
PY
echo "set up at ${SECONDS} s" | tee -a "$OUT/setup.log"
bf16=$work/models/tiny-bf16
python3 benchmarks/spotcheck_gpu/make_model.py "$bf16" --head-std 0.16 >> "$OUT/setup.log" 2>&1 \
    || { tail -n 30 "$OUT/setup.log"; exit 1; }
pids=()
WRONG_BITS=${WRONG_BITS-2 6}
for b in 4 $WRONG_BITS; do
    ( timeout 200 python3 -m exllamav3.conversion.convert_model -i "$bf16" -o "$work/models/tiny-${b}bpw" \
          -w "$work/w$b" -b "$b" -cr 32 -cc 512 > "$work/convert-$b.log" 2>&1
      echo "convert $b bpw: exit $? at ${SECONDS} s" >> "$OUT/setup.log" ) &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
tail -n 2 "$OUT/setup.log"
[ -f "$work/models/tiny-4bpw/config.json" ] || { tail -n 30 "$work/convert-4.log"; exit 1; }
wrong=()
for b in $WRONG_BITS; do wrong+=(--wrong "$work/models/tiny-${b}bpw"); done
python3 benchmarks/deployment_reference/measure.py --deployed "$work/models/tiny-4bpw" "${wrong[@]}" --tabby "$TABBY_DIR" --out "$OUT" --work "$work" \
    --budget-s $((BUDGET_S - SECONDS)) 2>&1 | tee "$OUT/measure.log" | cut -c1-400
code=${PIPESTATUS[0]}
echo "done at ${SECONDS} s (exit $code)"
exit "$code"
