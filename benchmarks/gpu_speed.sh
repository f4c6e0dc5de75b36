#!/usr/bin/env bash
# On a lent GPU: issue 5's speed benchmark (benchmarks/speed.py) on the full-size random 11B.
# Usage (repo root, wheels in .whl/): bash benchmarks/gpu_speed.sh OUTDIR [speed.py options]
#   bash benchmarks/gpu_speed.sh $OUT                                  # every speed recipe
#   bash benchmarks/gpu_speed.sh $OUT --recipes old llamalora-8bit     # some of them
#   bash benchmarks/gpu_speed.sh $OUT --numerics --quants 8bit         # fast vs plain kernels
# Writes OUTDIR/speed.json (or numerics.json), the printed table as .md, one log per run under
# OUTDIR/logs, and the generated data. A command may run 10 minutes at most, less than all the
# recipes take: calls on the same warm machine resume (/tmp/speed-work keeps the runs measured
# with the same code and setup), so repeat the call, or split --recipes across calls.
source "$(dirname "$0")/gpu_env.sh"
if [ $# -gt 0 ]; then shift; fi  # OUTDIR, already read by gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
# make_random_11b.py saves the tokenizer after the weights: without it the folder is half written.
[ -f /tmp/m11b/tokenizer.json ] || python3 benchmarks/make_random_11b.py /tmp/m11b
name=speed
for arg in "$@"; do [ "$arg" = --numerics ] && name=numerics; done
python3 benchmarks/speed.py --model /tmp/m11b --work-dir /tmp/speed-work \
  --log-dir "$OUTDIR/logs" --json-out "$OUTDIR/$name.json" --resume "$@" | tee "$OUTDIR/$name.md"
cp /tmp/speed-work/speed_data.jsonl "$OUTDIR/" 2>/dev/null || true
