#!/usr/bin/env bash
# On a lent GPU: the decoder's GPU tests, then the full-size random 11B, a short 8-bit run, and
# chat timings (llamalora vs plain generate) for the run's adapter at each of QUANTS; with
# MERGE=1 also a merged bf16 export, timed at MERGED_QUANTS.
# Usage (repo root, wheels in .whl/): bash benchmarks/gpu_chat_check.sh OUTDIR
source "$(dirname "$0")/gpu_env.sh"
CUDA_LAUNCH_BLOCKING=1 python3 -m pytest -m gpu tests/test_decode.py -q -p no:cacheprovider \
  --tb=long -x > "$OUTDIR/gpu_tests.txt" 2>&1 || true
tail -3 "$OUTDIR/gpu_tests.txt"
[ -d /tmp/m11b ] || python3 benchmarks/make_random_11b.py /tmp/m11b
[ -f /tmp/r-chat/adapter_config.json ] || python3 -m llamalora train data/sample.jsonl \
  --model /tmp/m11b --output-dir /tmp/r-chat --overwrite --quant 8bit --max-steps 4 --save-steps 0
merged=()
if [ "${MERGE:-0}" = 1 ]; then
  /usr/bin/time -f "export --merge wall %e s" python3 -m llamalora export-adapter /tmp/r-chat \
    --out /tmp/merged --overwrite --merge --dtype bf16 --json | tee "$OUTDIR/merge.json"
  merged=(--merged /tmp/merged --merged-quants ${MERGED_QUANTS:-none})
fi
python3 benchmarks/chat_speed.py /tmp/r-chat "${merged[@]}" --quants ${QUANTS:-8bit none 4bit} \
  --max-new-tokens ${NEW_TOKENS:-64} --repeat ${REPEAT:-3} | tee "$OUTDIR/chat_speed.txt"
