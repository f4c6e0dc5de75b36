#!/usr/bin/env bash
# On a lent GPU: an image step of the working tree against an older package, side by side in one
# lease (bf16, mixed set, 8 steps each, alternating new/old twice), then two one-step text runs
# timed from command to exit (the second run of a shape; issue 13).
# The older package goes in a folder of the checkout, without its assets (the 64 MiB carry):
#   mkdir .ab && git archive REV llamalora | tar -x -C .ab && rm -r .ab/llamalora/assets
#   bash benchmarks/gpu_ab_images.sh $OUT .ab      (run 2026-12-01 with REV 1fdbdd1)
source "$(dirname "$0")/gpu_env.sh"
set +e
OLD=$PWD/$2
cp -r llamalora/assets "$OLD/llamalora/"
python3 benchmarks/make_random_11b.py /tmp/m11b > /dev/null 2>&1
python3 benchmarks/make_image_data.py /tmp/img-mixed --records 64 --mixed > /dev/null 2>&1
for v in new old new old; do
  [ $v = old ] && D=$OLD || D=$PWD
  rm -rf /tmp/ab  # `python -m` puts the working folder first on the path: run from the package's
  (cd "$D" && PYTHONPATH=/tmp/site:$D python3 -m llamalora train /tmp/img-mixed/data.jsonl \
    --model /tmp/m11b --output-dir /tmp/ab --json --max-steps 8 --save-steps 0 --quant none \
    > /dev/null 2> /tmp/ab.log; python3 -c "import llamalora.step as s; print('$v', s.__file__)")
  python3 -c "
import json, statistics; t=[json.loads(l)['step_time_s'] for l in open('/tmp/ab/metrics.jsonl') if '\"loss\"' in l]
print('$v', 'median', round(statistics.median(t[3:]), 4), [round(x, 3) for x in t])"
done
for i in 1 2; do
  rm -rf /tmp/job; start=$(date +%s.%N)
  python3 -m llamalora train data/sample.jsonl --model /tmp/m11b --output-dir /tmp/job --json \
    --max-steps 1 > /dev/null 2>&1
  echo "run $i whole $(python3 -c "import time; print(round(time.time() - $start, 1))") s"
done
