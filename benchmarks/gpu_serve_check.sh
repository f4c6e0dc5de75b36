#!/usr/bin/env bash
# On a lent GPU, one command: the full-size random 11B (built once per machine) with a random
# adapter, served by `llamalora serve` at 8-bit; first token and decode tokens/s streamed over
# HTTP against `chat`'s in-process session on the same prompts (4 prompts x REPEAT, 128 new
# tokens, greedy). ~4-6 minutes.
# Usage (repo root, wheels in .whl/ from gpu_wheels.sh): bash benchmarks/gpu_serve_check.sh OUTDIR
source "$(dirname "$0")/gpu_env.sh"
[ -d /tmp/m11b ] || python3 benchmarks/make_random_11b.py /tmp/m11b
[ -f /tmp/r-eval/llamalora.json ] || python3 benchmarks/eval_serve_speed.py make-run /tmp/r-eval \
  --model /tmp/m11b --records 100
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUTDIR/gpu.txt"
python3 benchmarks/eval_serve_speed.py serve /tmp/r-eval --max-new-tokens 128 \
  --repeat "${REPEAT:-3}" --out "$OUTDIR" | tee "$OUTDIR/serve_speed.txt"
