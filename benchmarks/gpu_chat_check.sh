#!/usr/bin/env bash
# On a lent GPU: full-size random 11B, a short 8-bit run, a merged export, then chat timings
# (llamalora vs plain generate; 8-bit and bf16; adapter unmerged and merged).
# Usage (repo root, wheels in .whl/): bash benchmarks/gpu_chat_check.sh OUTDIR
source "$(dirname "$0")/gpu_env.sh"
[ -d /tmp/m11b ] || python3 benchmarks/make_random_11b.py /tmp/m11b
python3 -m llamalora train data/sample.jsonl --model /tmp/m11b --output-dir /tmp/r-chat \
  --overwrite --quant 8bit --max-steps 4 --save-steps 0
/usr/bin/time -f "export --merge wall %e s" python3 -m llamalora export-adapter /tmp/r-chat \
  --out /tmp/merged --merge --dtype bf16 --json | tee "$OUTDIR/merge.json"
python3 benchmarks/chat_speed.py /tmp/r-chat --merged /tmp/merged --quants 8bit none \
  --merged-quants ${MERGED_QUANTS:-none} --max-new-tokens ${NEW_TOKENS:-32} --repeat 2 \
  | tee "$OUTDIR/chat_speed.txt"
