#!/usr/bin/env bash
# On a lent GPU (issue 13, a second run's start): one-step `llamalora train` runs of the package
# in BEFORE (a folder holding an older llamalora/, e.g. from `git archive REF llamalora`) and of
# this checkout, alternated on one machine after one first run of each, every stage stamped by
# benchmarks/start_trace.py. TF: a folder with another transformers (pip install --target) to
# put first on the path, as a fresh install's release against the image's.
# Usage (repo root, wheels in .whl/): bash benchmarks/gpu_second_run.sh OUTDIR BEFORE [PAIRS] [TF]
source "$(dirname "$0")/gpu_env.sh"
set +e
BEFORE=$2 PAIRS=${3:-3} TF=${4:-}
mkdir -p /tmp/before && cp -r "$BEFORE/llamalora" /tmp/before/ \
  && { [ -e /tmp/before/llamalora/assets ] || ln -s "$PWD/llamalora/assets" /tmp/before/llamalora/; }
[ -f /tmp/m11b/tokenizer.json ] || python3 benchmarks/make_random_11b.py /tmp/m11b | tail -1
run() {  # NAME PYTHONPATH-PREFIX
  rm -rf /tmp/job
  local start
  start=$(date +%s.%N)
  PYTHONPATH=$2$PYTHONPATH LL_T0=$start python3 benchmarks/start_trace.py train data/sample.jsonl \
    --model /tmp/m11b --output-dir /tmp/job --max-steps 1 > /dev/null 2> "$OUTDIR/$1.log"
  echo "== $1 rc $? exit $(python3 -c 'import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 2))' "$start" "$(date +%s.%N)") s"
  grep -E "@@.*(imported|< )|Captured|Error" "$OUTDIR/$1.log" | sed 's/llamalora\.//; s/@@ *//' \
    | tr '\n' '|' | cut -c1-900; echo
}
prefix=${TF:+$TF:}
run first-before "$prefix/tmp/before:"; run first-after "$prefix"
for i in $(seq "$PAIRS"); do run "before-$i" "$prefix/tmp/before:"; run "after-$i" "$prefix"; done
