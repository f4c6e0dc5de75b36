#!/usr/bin/env bash
# On a lent GPU: the Qwen2-VL family's CUDA paths on --model tiny-qwen2-vl (bf16 compute, the
# varlen flash text attention under M-RoPE, the vision tower, llamalora's int8/nf4 kernels on
# Qwen's biased projections): train with text and image records at 8bit, 4bit and none, packed
# and padded; chat with an image and without; export the PEFT folder and --merge. Each run's
# loss, tokens/s and peak memory go to OUTDIR/qwen-*.json; a failure prints its log's tail.
# Usage (repo root, wheels in .whl/): bash benchmarks/gpu_qwen_check.sh OUTDIR
source "$(dirname "$0")/gpu_env.sh"
set +e
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 - /tmp/qwen-img <<'PY'
import json, sys
from pathlib import Path
from PIL import Image
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
for i, (w, h) in enumerate([(60, 30), (24, 24), (200, 120), (112, 112)]):
    Image.new("RGB", (w, h), (40 * i, 200 - 40 * i, 90)).save(out / f"{i}.png")
recs = []
for k in range(32):
    recs.append({"instruction": f"Describe picture {k}.", "output": f"Colour number {k % 4}.",
                 "image": f"{k % 4}.png"} if k % 3 else
                {"instruction": f"What is {k} plus one?", "output": f"{k + 1}."})
(out / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
PY
for q in 8bit 4bit none; do for layout in packing no-packing; do
  name=qwen-$q-$layout
  python3 -m llamalora train /tmp/qwen-img/data.jsonl --model tiny-qwen2-vl --quant $q --$layout \
    --max-steps 8 --save-steps 0 --output-dir /tmp/$name --overwrite --json \
    > "$OUTDIR/$name.json" 2> "$OUTDIR/$name.log" || { echo "$name FAILED"; tail -5 "$OUTDIR/$name.log"; continue; }
  python3 -c "import json; d=json.load(open('$OUTDIR/$name.json')); print('$name', {k: d[k] for k in ('final_train_loss','real_tokens_per_s','peak_gpu_mem_gib','kernels','batches')})"
done; done
run=/tmp/qwen-8bit-packing
python3 -m llamalora chat --adapter $run --image /tmp/qwen-img/0.png --prompt "Describe it." \
  --max-new-tokens 8 --temperature 0 || echo "chat with an image FAILED"
python3 -m llamalora chat --adapter $run --prompt "What is 3 plus one?" --max-new-tokens 8 \
  --temperature 0 || echo "chat FAILED"
python3 -m llamalora export-adapter $run --out /tmp/qwen-peft --overwrite || echo "export FAILED"
python3 -m llamalora export-adapter $run --out /tmp/qwen-merged --merge --overwrite \
  || echo "export --merge FAILED"
