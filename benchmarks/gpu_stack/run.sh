#!/usr/bin/env bash
# The image's userland on one GPU (README.md): the rendered config.yml + api_tokens.yml of `deploy render --gpus
# 1xH200` (in .dev/render-h200, made from the frozen snapshot), TabbyAPI e632af4 started as the rendered
# Dockerfile starts it, exllamav3 1.6.5 on torch 2.11+cu130, a scripted GLM-4.7-shaped model, `deploy verify` with
# every check, the raw reasoning split, and what failed generations do to /health.
# Usage on the device, from the repository root (carry .whl .tabby .dev):
#   OUT=$OUT [BUDGET_S=200] bash benchmarks/gpu_stack/run.sh
# Writes $OUT/gpu_stack.tgz (results.json, verify.json, verify-junit.xml, chat-raw.json, reference-scripted.json.gz,
# tabby.log with keys redacted, driver.log, versions.json, model-script.json).
set -uo pipefail
OUT=${OUT:?set OUT to a folder for the results}
BUDGET_S=${BUDGET_S:-200}
here=benchmarks/gpu_stack
res=/tmp/res/gpu_stack
rm -rf "$res"; mkdir -p "$res" "$OUT"
trap 'tar -czf "$OUT/gpu_stack.tgz" -C /tmp/res gpu_stack' EXIT
. $here/setup.sh > "$res/setup.log" 2>&1 || { cat "$res/setup.log"; exit 1; }
python3 -P $here/versions.py > "$res/versions.json" 2>&1
model=/tmp/gpu_stack/models/scripted-glm
python3 -P $here/make_scripted_glm.py "$model" > "$res/make-model.log" 2>&1 || { cat "$res/make-model.log"; exit 1; }
cp "$model/script.json" "$res/model-script.json"
tail -n 1 "$res/make-model.log"
python3 -P $here/driver.py --model "$model" --render .dev/render-h200 --tabby "$TABBY_DIR" --out "$res" \
    --budget-s $((BUDGET_S - SECONDS)) 2>&1 | tee "$res/driver.log" | cut -c1-600
code=${PIPESTATUS[0]}
echo "gpu_stack done at ${SECONDS} s (driver exit $code)"
exit "$code"
