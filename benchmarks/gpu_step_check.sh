#!/usr/bin/env bash
# On a lent GPU (issue 13): the CUDA-graph step against the eager one on the tiny model, then
# `llamalora train` at the default flags against the old recipe on public data shapes, and one
# whole short job timed from the command's start to the adapter saved.
# Usage (repo root, wheels in .whl/): bash benchmarks/gpu_step_check.sh OUTDIR STAGE...
#   stages: test | build | startup | load | speed:NAME:DATA:RECIPES | numerics:NAME:DATA:QUANTS |
#           job:DATA[:FLAGS]   (load: where the 8-bit and bf16 loads of the 11B go, profile_load.py;
#           startup: import times and a cProfile of a one-step `llamalora train`)
#   (RECIPES, QUANTS and FLAGS comma-separated)
#   bash benchmarks/gpu_step_check.sh $OUT test build speed:ko:ko.json:llamalora-8bit job:data/sample.jsonl
# speed.py keeps its runs in /tmp/speed-work-NAME, so a later call on the same warm machine adds
# recipes (e.g. speed:ko:ko.json:old) without repeating the ones done.
source "$(dirname "$0")/gpu_env.sh"
set +e  # one stage failing leaves the others to run
shift
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for stage in "$@"; do
  echo "=== $stage $(date +%T)"
  case $stage in
    test) python3 -m pytest -p no:cacheprovider -q -m gpu tests/test_step.py tests/test_models.py \
            tests/test_long_records.py tests/test_image_packing.py \
            2>&1 | tail -4 ;;
    build) [ -f /tmp/m11b/tokenizer.json ] || python3 benchmarks/make_random_11b.py /tmp/m11b ;;
    startup)  # where a second run's time to its first step goes: imports, plan, load, capture
      python3 -X importtime -c "import torch, transformers, bitsandbytes, peft, datasets" \
        2> "$OUTDIR/importtime.txt"
      sort -t'|' -k2 -n "$OUTDIR/importtime.txt" | tail -12
      rm -rf /tmp/startup
      python3 -m cProfile -o "$OUTDIR/startup.prof" -m llamalora train data/sample.jsonl \
        --model /tmp/m11b --output-dir /tmp/startup --max-steps 1 --json > /dev/null 2>&1
      python3 -c "import pstats, sys; pstats.Stats(sys.argv[1]).sort_stats('cumulative').print_stats(40)" \
        "$OUTDIR/startup.prof" | grep -v "^$" | cut -c1-180 | head -60 ;;
    load)
      python3 benchmarks/profile_load.py --model /tmp/m11b --quant 8bit --quant none \
        --save-quantized /tmp/m11b-q8 \
        --json "$OUTDIR/load.json" > "$OUTDIR/load.txt" 2>&1
      grep "===" "$OUTDIR/load.txt"; head -60 "$OUTDIR/load.txt" | tail -40 ;;
    speed:*)
      IFS=: read -r _ name data recipes <<<"$stage"
      python3 benchmarks/speed.py --model /tmp/m11b --data "$data" --steps 24 --skip 4 \
        --recipes ${recipes//,/ } --work-dir "/tmp/speed-work-$name" --log-dir "$OUTDIR/logs" \
        --json-out "$OUTDIR/speed-$name.json" --resume | tail -8 ;;
    numerics:*)
      IFS=: read -r _ name data quants <<<"$stage"
      python3 benchmarks/speed.py --model /tmp/m11b --data "$data" --numerics \
        --quants ${quants//,/ } --work-dir "/tmp/numerics-work-$name" --log-dir "$OUTDIR/logs" \
        --json-out "$OUTDIR/numerics-$name.json" --resume | tail -8 ;;
    job:*)
      IFS=: read -r _ data flags <<<"$stage"
      rm -rf /tmp/job
      start=$(date +%s.%N)
      python3 -m llamalora train "$data" --model /tmp/m11b --output-dir /tmp/job --json \
        ${flags//,/ } > "$OUTDIR/job.json" 2> >(python3 -c '
import sys, time
t0 = float(sys.argv[1])  # each progress line stamped with the seconds since the command began
for line in sys.stdin:
    print(f"{time.time() - t0:7.2f} {line}", end="", flush=True)' "$start" > "$OUTDIR/job.log")
      rc=$?
      sleep 1  # the stamping process's last lines
      cp /tmp/job/metrics.jsonl "$OUTDIR/job-metrics${flags//[^a-z0-9]/}.jsonl" 2>/dev/null
      [ -z "$flags" ] || cp "$OUTDIR/job.log" "$OUTDIR/job${flags//[^a-z0-9]/}.log"
      echo "rc $rc whole job $(python3 -c 'import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))' "$start" "$(date +%s.%N)") s"
      grep -v "^\s*$" "$OUTDIR/job.log" | grep -v "train " | tail -6
      # when the first step began: its graphs captured (or the model ready, without graphs);
      # the first progress line drawn, and the step it shows
      { grep -m1 "Captured .* for the first step" "$OUTDIR/job.log" \
          || grep -m1 "Base-layer kernels" "$OUTDIR/job.log"; } \
        | awk '{print "first step began at " $1 " s"}'
      grep -m1 -o "^ *[0-9.]* train .* [0-9]*/[0-9]* " "$OUTDIR/job.log" \
        | awk '{print "first progress line at " $1 " s, step " $NF}'
      python3 - "$OUTDIR/job.json" /tmp/job/metrics.jsonl <<'PY'
import json, statistics, sys
r = json.load(open(sys.argv[1]))
rows = [json.loads(l) for l in open(sys.argv[2]) if '"loss"' in l]
t = [x["step_time_s"] for x in rows]
rest = t[5:] or t  # a --max-steps 1 run (the second-run check) has only its first step
print(f"steps {len(t)} first {t[0]:.2f} s, median {statistics.median(rest):.4f} s, max after 5 "
      f"{max(rest):.3f} s (step {5 + rest.index(max(rest)) + 1 if t[5:] else 1}), "
      f"wall {r['wall_time_s']} s, peak {r['peak_gpu_mem_gib']} GiB, "
      f"{r['batches']}, kernels {r['kernels']}, compiled {r['compiled']}")
PY
      ;;
  esac
done
