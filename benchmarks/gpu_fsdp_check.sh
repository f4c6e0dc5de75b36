#!/usr/bin/env bash
# On a lent 2-GPU machine: the bf16 base (--quant none) sharded over 2 GPUs with FSDP
# (accelerate launch + benchmarks/fsdp2.yaml), against the same run on 1 GPU with twice the
# accumulation. First the tiny model's GPU test, then the full-size random 11B. Prints what each
# GPU holds and its peak memory (torch's peak, and nvidia-smi's sampled every 200 ms), the
# step-by-step losses of both runs and how far their adapters are apart.
# Usage (repo root, wheels in .whl/): bash benchmarks/gpu_fsdp_check.sh OUTDIR
# STEPS (default 10) sets the optimizer steps of each 11B run; SKIP_ONE_GPU=1 skips the 1-GPU run.
source "$(dirname "$0")/gpu_env.sh"
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}  # as the lent machines set it (no NVLink multicast)
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', \
accelerate.__version__, 'gpus', torch.cuda.device_count())"

# 1. The tiny model: FSDP on 2 GPUs vs 1 GPU (tests/test_fsdp.py, the `gpu` test).
if python3 -c "import pytest" 2>/dev/null; then
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fsdp.py 2>&1 \
    | tee "$OUTDIR/pytest_fsdp_gpu.txt" || echo "FAILED: see $OUTDIR/pytest_fsdp_gpu.txt"
else
  echo "pytest is not installed here: skipping tests/test_fsdp.py -m gpu"
fi

# 2. The full-size random 11B in bf16: FSDP on 2 GPUs (checkpoint at step 5, eval on 5%).
[ -d /tmp/m11b ] || python3 benchmarks/make_random_11b.py /tmp/m11b
STEPS=${STEPS:-10}
# LoRA dropout off: with it, each GPU draws its own masks and the runs differ by more than bf16.
common=(data/sample.jsonl --model /tmp/m11b --quant none --max-steps "$STEPS" --save-steps 5
        --eval-fraction 0.05 --lora-dropout 0 --overwrite --json)
nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 200 \
  > "$OUTDIR/fsdp_smi.csv" &
SMI=$!
trap 'kill "$SMI" 2>/dev/null || true' EXIT
start=$SECONDS  # (no /usr/bin/time on the lent machines' image is assumed)
python3 -m accelerate.commands.launch \
  --config_file benchmarks/fsdp2.yaml --num_processes 2 -m llamalora train "${common[@]}" \
  --gradient-accumulation-steps 1 --output-dir /tmp/r-fsdp2 > "$OUTDIR/fsdp2.json"
echo "fsdp2 wall $((SECONDS - start)) s"
kill "$SMI" || true
cp /tmp/r-fsdp2/metrics.jsonl "$OUTDIR/fsdp2.metrics.jsonl"
ls -R /tmp/r-fsdp2 > "$OUTDIR/fsdp2.files.txt"

# 3. The same on 1 GPU, accumulating the 2 micro-batches the 2 GPUs take per step.
if [ -z "${SKIP_ONE_GPU:-}" ]; then
  start=$SECONDS
  CUDA_VISIBLE_DEVICES=0 python3 -m llamalora train \
    "${common[@]}" --gradient-accumulation-steps 2 --output-dir /tmp/r-bf16-1gpu \
    > "$OUTDIR/bf16_1gpu.json"
  echo "1gpu wall $((SECONDS - start)) s"
  cp /tmp/r-bf16-1gpu/metrics.jsonl "$OUTDIR/bf16_1gpu.metrics.jsonl"
fi

python3 - "$OUTDIR" <<'PY'
import collections, json, os, sys
import torch
from safetensors.torch import load_file
out = sys.argv[1]
run = json.load(open(f"{out}/fsdp2.json"))
fs = run["fsdp"]
total = sum(r["weights_gib"] for r in fs["ranks"])
print(f"FSDP over {fs['world_size']} GPUs, {fs['units']} sharded units, "
      f"dtype {run['compute_dtype']}, weights in all {total:.2f} GiB")
smi = collections.defaultdict(int)
for line in open(f"{out}/fsdp_smi.csv"):
    gpu, used = (int(x) for x in line.split(","))
    smi[gpu] = max(smi[gpu], used)
for rank, r in enumerate(fs["ranks"]):
    print(f"  GPU {rank}: holds {r['weights_gib']:.2f} GiB of weights "
          f"({100 * r['weights_gib'] / total:.1f}%), torch peak {r['peak_gpu_mem_gib']} GiB, "
          f"nvidia-smi peak {smi.get(rank, 0) / 1024:.1f} GiB, "
          f"host peak RSS {r['host_peak_rss_gib']} GiB")
print(f"  {run['real_tokens_per_s']} tokens/s, final loss {run['final_train_loss']:.4f}, "
      f"eval {run['final_eval_loss']}, wall {run['wall_time_s']} s, "
      f"gradient checkpointing {run.get('gradient_checkpointing')}")
if not os.path.exists(f"{out}/bf16_1gpu.json"):
    sys.exit()
one = json.load(open(f"{out}/bf16_1gpu.json"))
print(f"1 GPU bf16: peak {one['peak_gpu_mem_gib']} GiB, {one['real_tokens_per_s']} tokens/s, "
      f"final loss {one['final_train_loss']:.4f}, eval {one['final_eval_loss']}, "
      f"wall {one['wall_time_s']} s")
rows = {n: [json.loads(l) for l in open(f"{out}/{n}.metrics.jsonl")]
        for n in ("fsdp2", "bf16_1gpu")}
for a, b in zip(*(r for r in rows.values())):
    if "loss" in a:
        print(f"  step {a['step']}: loss fsdp2 {a['loss']:.5f} 1gpu {b['loss']:.5f} "
              f"step time {a['step_time_s']} s / {b['step_time_s']} s")
a = load_file("/tmp/r-fsdp2/adapter_model.safetensors")
b = load_file("/tmp/r-bf16-1gpu/adapter_model.safetensors")
assert a.keys() == b.keys(), "the adapters have different tensors"
assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
diff = torch.cat([(a[k] - b[k]).flatten().float() for k in a])
norm = torch.cat([b[k].flatten().float() for k in a])
print(f"adapters: same {len(a)} tensors; max |diff| {diff.abs().max():.3g}, "
      f"relative L2 {diff.norm() / norm.norm():.3g}")
PY
