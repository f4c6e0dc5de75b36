#!/usr/bin/env bash
# On a lent GPU: records with images, packed (the default) against padded (--no-packing), at the
# default flags (8-bit, batch 2 x accumulation 2) on the full-size random 11B with 560-pixel
# tiles: a mixed set (records with 0, 1 and 2 images) and an all-image set; the plain HF recipe
# on the same model; and profiles of a step (benchmarks/profile_train.py around the command).
# Usage (repo root, wheels in .whl/): bash benchmarks/gpu_image_check.sh OUTDIR STAGE...
#   stages: test | SET (mixed | single: packed and padded, 8-bit) | run:SET:LAYOUT:QUANT[:FLAGS]
#           (LAYOUT packing | no-packing) | hf:SET | profile:SET:QUANT[:FLAGS]
#   (e.g. run:mixed:packing:8bit:--no-cuda-graphs, the eager image step; graphs are the default
#   where they fit)
#   (FLAGS comma-separated extra train flags, e.g. --no-packing); STEPS=12 steps a run (the
#   median skips the first 3); PROFILE_ARGS=--eager-static profiles a graphed run's rows eagerly
source "$(dirname "$0")/gpu_env.sh"
set +e
shift
[ -d /tmp/m11b ] || python3 benchmarks/make_random_11b.py /tmp/m11b
[ -f /tmp/img-mixed/data.jsonl ] || python3 benchmarks/make_image_data.py /tmp/img-mixed --records 64 --mixed
[ -f /tmp/img-single/data.jsonl ] || python3 benchmarks/make_image_data.py /tmp/img-single --records 64

one_run() {  # SET LAYOUT QUANT [FLAGS]
  local name=$1-$2-$3${4:+-${4//[^a-z]/}}
  python3 -m llamalora train /tmp/img-$1/data.jsonl --model /tmp/m11b --output-dir /tmp/$name \
    --overwrite --json --max-steps ${STEPS:-12} --save-steps 0 --$2 --quant $3 ${4//,/ } \
    > "$OUTDIR/$name.json" 2> "$OUTDIR/$name.log" || { tail -5 "$OUTDIR/$name.log"; return; }
  python3 - "$name" "$OUTDIR/$name.json" /tmp/$name/metrics.jsonl <<'PY'
import json, statistics, sys
r = json.load(open(sys.argv[2]))
t = [json.loads(l)["step_time_s"] for l in open(sys.argv[3]) if '"loss"' in l]
med = statistics.median(t[3:])
print(json.dumps({"run": sys.argv[1], "steps": len(t), "median_step_s": round(med, 4),
                  "max_step_s": round(max(t[3:]), 4), "records_per_s": round(4 / med, 2),
                  "first_step_s": round(t[0], 2), "peak_gib": r["peak_gpu_mem_gib"],
                  "batches": r["batches"], "final_loss": r["final_train_loss"],
                  "wall_s": r["wall_time_s"]}))
PY
}

for stage in "${@:-mixed}"; do
  echo "=== $stage $(date +%T)"
  case $stage in
    test)
      python3 -m pytest -p no:cacheprovider -q -m gpu tests/test_image_packing.py 2>&1 | tail -3 ;;
    run:*)
      IFS=: read -r _ set layout quant flags <<<"$stage"
      one_run "$set" "$layout" "$quant" "$flags" ;;
    hf:*)
      set=${stage#hf:}
      python3 benchmarks/hf_image_baseline.py /tmp/img-$set/data.jsonl --model /tmp/m11b \
        --steps ${STEPS:-12} --json "$OUTDIR/hf-$set.json" 2> "$OUTDIR/hf-$set.log" | tail -1 \
        || tail -5 "$OUTDIR/hf-$set.log" ;;
    profile:*)
      IFS=: read -r _ set quant flags <<<"$stage"
      name=profile-$set-$quant${flags:+-${flags//[^a-z]/}}${PROFILE_ARGS:+-static}
      python3 benchmarks/profile_train.py ${PROFILE_ARGS:-} --from-step 4 --steps 2 --out "$OUTDIR/$name.json" -- \
        /tmp/img-$set/data.jsonl --model /tmp/m11b --output-dir /tmp/$name --overwrite \
        --max-steps 7 --save-steps 0 --quant $quant ${flags//,/ } > /dev/null 2> "$OUTDIR/$name.log"
      echo "rc $?"
      python3 - "$OUTDIR/$name.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for k in ("wall_ms", "gpu_busy_ms_per_step", "kernel_launches_per_step", "ranges_per_step"):
    print(k, r[k])
for section in ("attention_by_shape", "top_gpu_ms_per_step", "top_host_ms_per_step"):
    print(section)
    for row in r[section][:10]:
        print("  ", str(row)[:230])
PY
      ;;
    *)
      for layout in packing no-packing; do one_run "$stage" $layout 8bit; done ;;
  esac
done
