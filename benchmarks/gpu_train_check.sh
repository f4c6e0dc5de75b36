#!/usr/bin/env bash
# On a lent GPU: full-size random 11B, then `llamalora train` at 8-bit, text only and with images.
# Usage (repo root, wheels for bitsandbytes/typer/rich in .whl/): bash benchmarks/gpu_train_check.sh OUTDIR
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, peft, bitsandbytes, typer, rich; print(torch.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__, typer.__version__)"
[ -d /tmp/m11b ] || python3 benchmarks/make_random_11b.py /tmp/m11b
python3 benchmarks/make_image_data.py /tmp/imgdata --records 16
run() { local name=$1; shift; /usr/bin/time -f "$name wall %e s, max RSS %M KB" \
  python3 -m llamalora train "$@" --json > "$OUTDIR/$name.json"; \
  python3 -c "import json,sys; d=json.load(open('$OUTDIR/$name.json')); print('$name', {k: d[k] for k in ('final_train_loss','real_tokens_per_s','peak_gpu_mem_gib','wall_time_s','steps_run')}, d['plan']['estimated_peak_gib'])"; }
run text8 data/sample.jsonl --model /tmp/m11b --output-dir /tmp/r-text8 --overwrite \
  --quant 8bit --max-steps ${TEXT_STEPS:-12} --save-steps 0 --logging-steps 1
cp /tmp/r-text8/metrics.jsonl "$OUTDIR/text8.metrics.jsonl"
run vision8 /tmp/imgdata/data.jsonl --model /tmp/m11b --output-dir /tmp/r-vis8 --overwrite \
  --quant 8bit --max-steps ${VISION_STEPS:-6} --save-steps 0
cp /tmp/r-vis8/metrics.jsonl "$OUTDIR/vision8.metrics.jsonl"
