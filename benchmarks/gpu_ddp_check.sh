#!/usr/bin/env bash
# On a lent 2-GPU machine: 8-bit training of the full-size random 11B on 1 GPU, then on 2 GPUs
# with torchrun at the same per-GPU batch; then (optional) a merged 8-bit chat timing.
# Usage (repo root, wheels in .whl/): bash benchmarks/gpu_ddp_check.sh OUTDIR
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,memory.total --format=csv
[ -d /tmp/m11b ] || python3 benchmarks/make_random_11b.py /tmp/m11b
STEPS=${STEPS:-10}
common=(data/sample.jsonl --model /tmp/m11b --quant 8bit --max-steps "$STEPS" --save-steps 0
        --overwrite --json)
CUDA_VISIBLE_DEVICES=0 python3 -m llamalora train "${common[@]}" --output-dir /tmp/r-1gpu \
  > "$OUTDIR/ddp1.json"
torchrun --nproc-per-node 2 -m llamalora train "${common[@]}" --output-dir /tmp/r-2gpu \
  > "$OUTDIR/ddp2.json"
cp /tmp/r-1gpu/metrics.jsonl "$OUTDIR/ddp1.metrics.jsonl"
cp /tmp/r-2gpu/metrics.jsonl "$OUTDIR/ddp2.metrics.jsonl"
python3 - "$OUTDIR" <<'PY'
import json, sys
out = sys.argv[1]
for n in (1, 2):
    rows = [json.loads(line) for line in open(f"{out}/ddp{n}.metrics.jsonl")]
    tail = rows[4:]
    tok, sec = sum(r["tokens"] for r in tail), sum(r["step_time_s"] for r in tail)
    run = json.load(open(f"{out}/ddp{n}.json"))
    print(f"{n} GPU(s): steps 5+ {tok} real tokens in {sec:.1f} s = {tok / sec:.1f} tokens/s; "
          f"all steps {run['real_tokens_per_s']} tokens/s; peak {run['peak_gpu_mem_gib']} GiB; "
          f"final loss {run['final_train_loss']:.4f}; world {run['world_size']}")
PY
if [ -n "${MERGED_CHAT:-}" ]; then
  python3 -m llamalora export-adapter /tmp/r-2gpu --out /tmp/merged --merge --overwrite --json \
    > "$OUTDIR/merge.json"
  python3 -m llamalora chat --adapter /tmp/r-2gpu --prompt "거푸집이란?" --temperature 0 \
    --max-new-tokens 8 --verbose
  python3 benchmarks/chat_speed.py /tmp/r-2gpu --merged /tmp/merged --only-merged \
    --merged-quants 8bit --max-new-tokens 32 --repeat 2 | tee "$OUTDIR/chat_speed_merged8.txt"
fi
