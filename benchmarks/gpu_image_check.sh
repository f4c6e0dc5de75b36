#!/usr/bin/env bash
# On a lent GPU: records with images, packed (the default) against padded (--no-packing), at the
# default flags (8-bit, batch 2 x accumulation 2) on the full-size random 11B with 560-pixel
# tiles: a mixed set (records with 0, 1 and 2 images) and an all-image set.
# Usage (repo root, wheels in .whl/): bash benchmarks/gpu_image_check.sh OUTDIR [SETS]
source "$(dirname "$0")/gpu_env.sh"
[ -d /tmp/m11b ] || python3 benchmarks/make_random_11b.py /tmp/m11b
python3 benchmarks/make_image_data.py /tmp/img-mixed --records 64 --mixed
python3 benchmarks/make_image_data.py /tmp/img-single --records 64
for set in ${2:-mixed}; do
  for layout in packing no-packing; do
    name=$set-$layout
    python3 -m llamalora train /tmp/img-$set/data.jsonl --model /tmp/m11b --output-dir /tmp/$name \
      --overwrite --json --max-steps ${STEPS:-12} --save-steps 0 --$layout \
      > "$OUTDIR/$name.json" 2> "$OUTDIR/$name.log" || { tail -5 "$OUTDIR/$name.log"; continue; }
    python3 - "$name" "$OUTDIR/$name.json" /tmp/$name/metrics.jsonl <<'PY'
import json, statistics, sys
r = json.load(open(sys.argv[2]))
t = [json.loads(l)["step_time_s"] for l in open(sys.argv[3]) if '"loss"' in l]
med = statistics.median(t[3:])
print(json.dumps({"run": sys.argv[1], "steps": len(t), "median_step_s": round(med, 4),
                  "records_per_s": round(4 / med, 2), "first_step_s": round(t[0], 2),
                  "peak_gib": r["peak_gpu_mem_gib"], "batches": r["batches"],
                  "final_loss": r["final_train_loss"], "wall_s": r["wall_time_s"]}))
PY
  done
done
