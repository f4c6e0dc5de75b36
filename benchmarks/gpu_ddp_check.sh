#!/usr/bin/env bash
# On a lent 2-GPU machine: training of the full-size random 11B on 1 GPU, then on 2 GPUs with
# torchrun at the same per-GPU micro-batch, for each quantization; then (optional) a merged 8-bit
# chat timing. The 1-GPU run accumulates twice as many micro-batches, so both runs take the same
# records in the same steps: at these sizes a step costs nearly the same whatever its length, so
# runs on different records would compare their data, not their GPUs.
# Usage (repo root, wheels in .whl/): bash benchmarks/gpu_ddp_check.sh OUTDIR
#   QUANTS="8bit 4bit none" (default), STEPS=16, DATA=data/sample.jsonl, BATCH=4, ACCUM=1,
#   COMPILE=1 to compile the layers (as runs of 100+ steps do by default), KERNELS=plain for
#   bitsandbytes' own layers, MERGED_CHAT=1.
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,memory.total --format=csv
[ -f /tmp/m11b/tokenizer.json ] || python3 benchmarks/make_random_11b.py /tmp/m11b
STEPS=${STEPS:-16}
for quant in ${QUANTS:-8bit 4bit none}; do
  common=("${DATA:-data/sample.jsonl}" --model /tmp/m11b --quant "$quant" --max-steps "$STEPS"
          --batch-size "${BATCH:-4}" --save-steps 0 --overwrite --json)
  [ -n "${COMPILE:-}" ] && common+=(--compile)
  [ -n "${KERNELS:-}" ] && common+=(--kernels "$KERNELS")
  CUDA_VISIBLE_DEVICES=0 python3 -m llamalora train "${common[@]}" --output-dir "/tmp/r-$quant-1gpu" \
    --gradient-accumulation-steps $((2 * ${ACCUM:-1})) > "$OUTDIR/ddp-$quant-1.json"
  torchrun --nproc-per-node 2 -m llamalora train "${common[@]}" --output-dir "/tmp/r-$quant-2gpu" \
    --gradient-accumulation-steps "${ACCUM:-1}" > "$OUTDIR/ddp-$quant-2.json"
  for n in 1 2; do cp "/tmp/r-$quant-${n}gpu/metrics.jsonl" "$OUTDIR/ddp-$quant-$n.metrics.jsonl"; done
  python3 - "$OUTDIR" "$quant" <<'PY'
import json, sys
out, quant = sys.argv[1], sys.argv[2]
speed, tokens = {}, {}
for n in (1, 2):
    rows = [json.loads(line) for line in open(f"{out}/ddp-{quant}-{n}.metrics.jsonl")]
    tokens[n] = [r["tokens"] for r in rows if "step_time_s" in r]
    tail = [r for r in rows if "step_time_s" in r][4:]
    tok, sec = sum(r["tokens"] for r in tail), sum(r["step_time_s"] for r in tail)
    speed[n] = tok / sec
    run = json.load(open(f"{out}/ddp-{quant}-{n}.json"))
    print(f"{quant} {n} GPU(s): steps 5+ {tok} real tokens in {sec:.1f} s = {tok / sec:.1f} "
          f"tokens/s; peak {run['peak_gpu_mem_gib']} GiB; final loss "
          f"{run['final_train_loss']:.4f}; kernels {run.get('kernels')}; world {run['world_size']}")
assert tokens[1] == tokens[2], "the two runs took different records"
print(f"{quant}: 2 GPUs / 1 GPU = {speed[2] / speed[1]:.2f}x (same records in every step)")
PY
done
if [ -n "${MERGED_CHAT:-}" ]; then
  python3 -m llamalora export-adapter /tmp/r-8bit-2gpu --out /tmp/merged --merge --overwrite \
    --json > "$OUTDIR/merge.json"
  python3 -m llamalora chat --adapter /tmp/r-8bit-2gpu --prompt "거푸집이란?" --temperature 0 \
    --max-new-tokens 8 --verbose
  python3 benchmarks/chat_speed.py /tmp/r-8bit-2gpu --merged /tmp/merged --only-merged \
    --merged-quants 8bit --max-new-tokens 32 --repeat 2 | tee "$OUTDIR/chat_speed_merged8.txt"
fi
