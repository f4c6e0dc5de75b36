#!/usr/bin/env bash
# On a lent GPU: issue 31's long-record benchmarks (benchmarks/long_speed.py) on the full-size
# random 11B. Wheels: .whl/ (gpu_wheels.sh) for llamalora and HF; .whl-unsloth/
# (gpu_wheels_unsloth.sh), if carried, installed apart into /tmp/usite for the Unsloth runs.
# The records are made from public Alpaca sets (LONG_SOURCES, default the copies in .gpu/).
# Usage (repo root): bash benchmarks/gpu_long.sh OUTDIR [long_speed.py options, --runs ...]
#   bash benchmarks/gpu_long.sh $OUT --runs 3k:llamalora-8bit,llamalora-none
# Writes OUTDIR/long.json, the table as OUTDIR/long.md, one log per run under OUTDIR/logs.
# Calls on the same warm machine resume (/tmp/long-work keeps the runs of the same code).
source "$(dirname "$0")/gpu_env.sh"
if [ $# -gt 0 ]; then shift; fi  # OUTDIR, already read by gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
if compgen -G ".whl-unsloth/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/usite .whl-unsloth/*.whl
fi
# make_random_11b.py saves the tokenizer after the weights: without it the folder is half written.
[ -f /tmp/m11b/tokenizer.json ] || python3 benchmarks/make_random_11b.py /tmp/m11b
read -r -a sources <<< "${LONG_SOURCES:-.gpu/alpaca_zh_demo.json .gpu/koalpaca_v1_subset_2001.json}"
python3 benchmarks/long_speed.py --model /tmp/m11b --sources "${sources[@]}" \
  --work-dir /tmp/long-work --log-dir "$OUTDIR/logs" --json-out "$OUTDIR/long.json" --resume \
  "$@" | tee "$OUTDIR/long.md"
