#!/usr/bin/env bash
# On a lent GPU (issue 16): the full-size random 11B, a short text-only 8-bit run, then
# `export-adapter --merge --text-only --gguf` to a plain Llama folder and an f16 GGUF (q8: the
# 8-bit GGUF), each reloaded and compared by the export itself; prints the export's checks, its
# wall time and what it wrote as one JSON line per export (also kept in OUTDIR).
# Usage (repo root, wheels in .whl/ incl. gguf: pip download --no-deps -d .whl gguf==0.19.0):
#   bash benchmarks/gpu_export_check.sh OUTDIR STAGE...      stages: build | train | f16 | q8
#   bash benchmarks/gpu_export_check.sh $OUT build train f16   # then, in another call: ... q8
source "$(dirname "$0")/gpu_env.sh"
set +e  # one stage failing leaves the others to run
shift
python3 -c "import gguf" 2>/dev/null || echo "gguf is not importable: add its wheel to .whl/"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
RUN=/tmp/r-export
for stage in "$@"; do
  echo "=== $stage $(date +%T)"
  case $stage in
    build) [ -f /tmp/m11b/tokenizer.json ] || python3 benchmarks/make_random_11b.py /tmp/m11b ;;
    train)
      python3 -m llamalora train data/sample.jsonl --model /tmp/m11b --output-dir $RUN \
        --overwrite --quant 8bit --max-steps 4 --save-steps 0 --json > "$OUTDIR/train.json" \
        2> "$OUTDIR/train.log"
      echo "rc $?"; tail -2 "$OUTDIR/train.log" ;;
    f16|q8)
      out=/tmp/export-$stage gguf=/tmp/export-$stage.gguf
      rm -rf "$out" "$gguf"
      start=$(date +%s.%N)
      python3 -m llamalora export-adapter $RUN --out "$out" --merge --text-only --gguf "$gguf" \
        --gguf-type $([ $stage = q8 ] && echo q8_0 || echo f16) --json \
        > "$OUTDIR/export-$stage.json" 2> "$OUTDIR/export-$stage.log"
      rc=$?
      end=$(date +%s.%N)
      grep -v "^\s*$" "$OUTDIR/export-$stage.log" | grep -vi "loading\|warn" | tail -8
      python3 - "$OUTDIR/export-$stage.json" "$out" "$gguf" "$rc" "$start" "$end" \
        "$OUTDIR/summary-$stage.json" <<'PY'
import json, os, sys
path, out, gguf, rc, start, end, summary = sys.argv[1:]
r = json.load(open(path)) if os.path.getsize(path) else {}
folder = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs) \
    if os.path.isdir(out) else 0
config = json.load(open(os.path.join(out, "config.json"))) if folder else {}
row = {"rc": int(rc), "wall_s": round(float(end) - float(start), 1),
       "layers": config.get("num_hidden_layers"), "vocab_size": config.get("vocab_size"),
       "params": (r.get("details") or {}).get("params"),
       "folder_gib": round(folder / 2**30, 2),
       "gguf_gib": round(os.path.getsize(gguf) / 2**30, 2) if os.path.exists(gguf) else None,
       "llama_max_logit_diff": r.get("max_logit_diff"), "llama_tolerance": r.get("tolerance"),
       "logit_scale": r.get("logit_scale"), "merge_diff": r.get("merge_diff"),
       "adapter_diff": (r.get("details") or {}).get("adapter_diff"),
       "gguf": r.get("gguf"), "timings_s": (r.get("details") or {}).get("timings_s")}
json.dump(row, open(summary, "w"), indent=2)
print(json.dumps(row))
PY
      rm -rf "$out" "$gguf" ;;  # 15-31 GiB: the disk is 64 GiB
  esac
done
