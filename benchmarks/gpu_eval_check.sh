#!/usr/bin/env bash
# On a lent GPU, one command: the decoder's batch/adapter GPU tests, the full-size random 11B
# (built once per machine), a random adapter as a finished run over 100 generated records, then
# `llamalora eval` at 8-bit, 128 new tokens, base and tuned: the whole command's wall time (the
# load included) and tokens/s, beside the same with --decoding generate. ~5-7 minutes.
# Usage (repo root, wheels in .whl/ from gpu_wheels.sh): bash benchmarks/gpu_eval_check.sh OUTDIR
# BATCH (default 100) is eval's --batch-size.
source "$(dirname "$0")/gpu_env.sh"
python3 -m pytest -m gpu tests/test_decode.py -q -p no:cacheprovider --tb=short \
  -k "batch or graph" > "$OUTDIR/gpu_tests.txt" 2>&1 || true
tail -3 "$OUTDIR/gpu_tests.txt"
[ -d /tmp/m11b ] || python3 benchmarks/make_random_11b.py /tmp/m11b
[ -f /tmp/r-eval/llamalora.json ] || python3 benchmarks/eval_serve_speed.py make-run /tmp/r-eval \
  --model /tmp/m11b --records 100
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUTDIR/gpu.txt"
python3 benchmarks/eval_serve_speed.py eval /tmp/r-eval --max-new-tokens 128 \
  --batch-size "${BATCH:-100}" --out "$OUTDIR" | tee "$OUTDIR/eval_speed.txt"
