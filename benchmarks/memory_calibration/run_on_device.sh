#!/usr/bin/env bash
# The whole calibration on a lent GPU machine, in one command (README.md): set up, synthesize the GLM-4.7 slice,
# then the stages in $STAGES (default: all, in this order):
#   detect  `deploy detect` (text and --json) with GPU 0 and with GPUs 0,1 -> detect-1gpu.txt, detect-2gpu.txt
#   verify  load the slice straight through exllamav3 and run a 2048-token forward (finite logits?)
#   tabby   the TabbyAPI loads of measure.py's CONFIGS ($ONLY: a comma-separated subset)
#   probe   the same loads straight through exllamav3, verbose, with torch's allocator statistics, and long-context
#           generations ($PROBE_ONLY: a comma-separated subset)
# Everything lands in $OUT (at most 8 files come back): setup.log, verify.log, measure.log, tabby.log, probe.log,
# results.jsonl, detect-1gpu.txt, detect-2gpu.txt.
set -o pipefail
OUT=${OUT:?set OUT to a folder for the results}
BUDGET_S=${BUDGET_S:-540}   # the whole script should end by then (a run call allows 600 s)
STAGES=${STAGES:-detect verify tabby probe}
here=benchmarks/memory_calibration
. benchmarks/device_setup.sh > "$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
tail -n 1 "$OUT/setup.log"
nvidia-smi >> "$OUT/setup.log" 2>&1
model=/tmp/glm-slice
python3 $here/make_glm_slice.py "$model" >> "$OUT/setup.log" 2>&1 || { tail "$OUT/setup.log"; exit 1; }
echo "slice written at ${SECONDS} s"
for stage in $STAGES; do
    case $stage in
    detect)
        [ -f toolkit/cli/detect.py ] || continue
        for gpus in 0 0,1; do
            name=$([ "$gpus" = 0 ] && echo 1gpu || echo 2gpu)
            { echo "\$ CUDA_VISIBLE_DEVICES=$gpus deploy detect"; CUDA_VISIBLE_DEVICES=$gpus python3 -m toolkit.cli detect
              echo "exit $?"; echo; echo "\$ CUDA_VISIBLE_DEVICES=$gpus deploy detect --json"
              CUDA_VISIBLE_DEVICES=$gpus python3 -m toolkit.cli detect --json; echo "exit $?"; } > "$OUT/detect-$name.txt" 2>&1
        done ;;
    verify)
        CUDA_VISIBLE_DEVICES=0 timeout 120 python3 $here/measure.py verify --model "$model" --out "$OUT" 2>&1 \
            | tee "$OUT/verify.log" | grep "^RESULT" | cut -c1-600 ;;
    tabby)
        [ -n "$TABBY_DIR" ] || { echo "no TabbyAPI: tabby stage skipped"; continue; }
        python3 $here/measure.py tabby --model "$model" --tabby "$TABBY_DIR" --out "$OUT" \
            --deadline-s $((BUDGET_S - SECONDS - 75)) --load-timeout-s 90 ${ONLY:+--only "$ONLY"} 2>&1 \
            | tee "$OUT/measure.log" | cut -c1-300 ;;
    probe)
        python3 $here/measure.py probe --model "$model" --out "$OUT" --deadline-s $((BUDGET_S - SECONDS - 60)) \
            --load-timeout-s 90 ${PROBE_ONLY:+--only "$PROBE_ONLY"} 2>&1 | tee -a "$OUT/measure.log" | cut -c1-300 ;;
    esac
    echo "$stage done at ${SECONDS} s"
done
