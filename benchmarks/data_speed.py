"""Wall time of `validate` and `stats` against bare baselines, whole process each.

    python3 benchmarks/data_speed.py            # 300,000 records for validate, 20,000 for stats
    python3 benchmarks/data_speed.py --source a.json --source b.jsonl --validate-mb 253

`--source` builds validate's file from other data sets' Alpaca records instead of the sample
glossary's (JSON arrays or JSONL; `instruction`, `input`, `output` kept), to `--validate-mb`
megabytes when given.

validate is compared with a bare `json.loads` loop over the same file; stats with bare batched
tokenization (`tokenizers`, encode_batch_fast) of the same training texts; and `validate --json`
with validate's table output on a warning-heavy file (300,000 copies of one record, every 300th
varied: 299,000 duplicate warnings, 100,000 of them listed in the JSON), with each one's peak
memory. Each command runs `--repeat` times, alternating with its baseline; the best time of
each counts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llamalora.data import load_examples  # noqa: E402
from llamalora.template import render_segments  # noqa: E402


def read_records(path: Path) -> list[dict]:
    """A JSON array's or JSONL file's Alpaca fields."""
    text = path.read_text(encoding="utf-8")
    records = json.loads(text) if text.lstrip().startswith("[") else [
        json.loads(line) for line in text.splitlines() if line.strip()]
    return [{k: r[k] for k in ("instruction", "input", "output") if k in r} for r in records]


def make_file(path: Path, n: int, seed: int = 0, sources: list[Path] | None = None,
              megabytes: float | None = None) -> None:
    """A realistic mix: the sample glossary's records (or the sources'), varied so none repeats;
    `n` of them, or `megabytes` of them when given."""
    base = [r for s in sources or [ROOT / "data" / "sample.jsonl"] for r in read_records(s)]
    rng = random.Random(seed)
    size, limit = 0, megabytes * 2**20 if megabytes else None
    with path.open("w", encoding="utf-8") as f:
        i = 0
        while (size < limit) if limit else (i < n):
            rec = dict(rng.choice(base))
            rec["instruction"] = f"{rec['instruction']} ({i})"
            line = json.dumps(rec, ensure_ascii=False) + "\n"
            f.write(line)
            size += len(line.encode())
            i += 1


def make_duplicates(path: Path, n: int) -> None:
    """n copies of one record, every 300th varied: nearly every line a duplicate warning."""
    line = json.dumps({"instruction": "다음 건설 용어를 설명하세요.", "input": "거푸집",
                       "output": "콘크리트를 부어 원하는 모양으로 굳히기 위한 임시 틀입니다."},
                      ensure_ascii=False)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            f.write((line.replace("거푸집", f"거푸집 {i}") if i % 300 == 0 else line) + "\n")


PEAK = {}  # command -> the largest peak RSS (KiB) seen over its runs
# Runs `python -m MODULE ARGS` and writes the process's own peak (VmHWM) to a file: a forked
# child's ru_maxrss would count this benchmark's memory too.
MEASURED = """
import re, runpy, sys
peak_file = sys.argv.pop(1)
sys.argv = sys.argv[1:]
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
finally:
    status = open("/proc/self/status").read()
    open(peak_file, "w").write(re.search(r"VmHWM:\\s+(\\d+)", status)[1])
"""


def measured(module_args: list[str], peak_file: Path) -> list[str]:
    return [sys.executable, "-c", MEASURED, str(peak_file), *module_args]


def _wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    code = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    wall = time.perf_counter() - t0
    if code not in (0, 1):  # validate exits 1 when the data has errors
        sys.exit(f"{' '.join(cmd)} failed ({code})")
    if cmd[1] == "-c" and cmd[2] == MEASURED:
        PEAK[tuple(cmd)] = max(PEAK.get(tuple(cmd), 0), int(Path(cmd[3]).read_text()))
    return wall


def best_of_pair(cmd: list[str], baseline: list[str], repeat: int) -> tuple[float, float]:
    """Best wall time of each, run alternately so machine noise hits both alike."""
    ours, base = [], []
    for _ in range(repeat):
        ours.append(_wall(cmd))
        base.append(_wall(baseline))
    return min(ours), min(base)


BARE_JSON = """
import json, sys
n = 0
with open(sys.argv[1], 'rb') as f:
    for line in f:
        if line.strip():
            json.loads(line)
            n += 1
print(n)
"""

BARE_TOKENIZE = """
import json, sys
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[2])
texts = json.load(open(sys.argv[1], encoding='utf-8'))
total = 0
for i in range(0, len(texts), 2000):
    total += sum(len(e.ids) for e in tok.encode_batch_fast(texts[i:i + 2000],
                                                           add_special_tokens=False))
print(total)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--validate-records", type=int, default=300_000)
    ap.add_argument("--stats-records", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--source", type=Path, action="append",
                    help="Build validate's file from this data set's records (repeatable).")
    ap.add_argument("--validate-mb", type=float,
                    help="Size of validate's file in MB (instead of --validate-records).")
    args = ap.parse_args()
    py = sys.executable
    tok_file = ROOT / "llamalora" / "assets" / "llama3_2_tokenizer" / "tokenizer.json"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        big, small, dups = tmp / "big.jsonl", tmp / "small.jsonl", tmp / "dups.jsonl"
        make_file(big, args.validate_records, sources=args.source, megabytes=args.validate_mb)
        make_duplicates(dups, args.validate_records)
        make_file(small, args.stats_records, seed=1)
        examples, _ = load_examples(small)
        texts = tmp / "texts.json"
        texts.write_text(json.dumps(["".join(t for t, _ in render_segments(e.system, e.messages))
                                     for e in examples], ensure_ascii=False))
        rows = [
            ("validate", "json.loads loop", *best_of_pair(
                [py, "-m", "llamalora", "validate", str(big), "--json"],
                [py, "-c", BARE_JSON, str(big)], args.repeat)),
            ("stats", "batched tokenization", *best_of_pair(
                [py, "-m", "llamalora", "stats", str(small), "--tokenizer", "bundled", "--json"],
                [py, "-c", BARE_TOKENIZE, str(texts), str(tok_file)], args.repeat)),
            ("validate --json", "validate (tables)", *best_of_pair(
                json_cmd := measured(["llamalora", "validate", str(dups), "--json"],
                                     tmp / "peak-json"),
                table_cmd := measured(["llamalora", "validate", str(dups)], tmp / "peak-table"),
                args.repeat)),
        ]
    result = []
    for name, base_name, t, base in rows:
        print(f"{name:<15} {t:7.2f} s   {base_name:<22} {base:7.2f} s   ratio {t / base:.2f}x")
        result.append({"command": name, "seconds": round(t, 3), "baseline": base_name,
                       "baseline_seconds": round(base, 3), "ratio": round(t / base, 3)})
    result[-1].update(peak_mib=round(PEAK[tuple(json_cmd)] / 1024),
                      baseline_peak_mib=round(PEAK[tuple(table_cmd)] / 1024))
    print(f"peak memory: validate --json {result[-1]['peak_mib']} MiB, tables "
          f"{result[-1]['baseline_peak_mib']} MiB")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
