"""Peak memory and wall time of `llamalora train FILE --dry-run` on generated Alpaca-sized data.

    python3 benchmarks/plan_memory.py --records 1000000            # this checkout
    python3 benchmarks/plan_memory.py --records 200000 --tree /tmp/old   # another checkout

Records are English instruction/input/output triples of random words (seeded), ~170 tokens each
with the Llama 3 tokenizer, as Stanford Alpaca's average. The dry run validates, tokenizes and
plans (`--model tiny`: no weights beyond the tiny model's config); the peak is the process's
maximum resident set (wait4's rusage), the figure `/usr/bin/time -v` prints; a forked child's
also counts what this script held when it forked (~15 MiB: it holds no records).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORDS = ("the concrete formwork must be checked before pouring and the rebar spacing measured "
         "against the drawings so that curing proceeds evenly while the site engineer records "
         "slump tests temperature humidity and any cracks found in the slab beams columns or "
         "walls of each floor").split()


def make_file(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            rec = {"instruction": " ".join(rng.choices(WORDS, k=18)) + f" ({i})?",
                   "input": " ".join(rng.choices(WORDS, k=20)),
                   "output": " ".join(rng.choices(WORDS, k=95)) + "."}
            f.write(json.dumps(rec) + "\n")


def measure(cmd: list[str], env: dict) -> tuple[float, int]:
    """(wall seconds, peak RSS in KiB) of one child process."""
    t0 = time.perf_counter()
    # cwd is the tree: `python -m` puts the current folder before PYTHONPATH.
    proc = subprocess.Popen(cmd, env=env, cwd=env["PYTHONPATH"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.decode()[-2000:]}")
    sys.stderr.write(err.decode()[-400:])
    return wall, usage.ru_maxrss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--tree", type=Path, default=ROOT, help="the llamalora checkout to run")
    ap.add_argument("--home", type=Path, default=None, help="LLAMALORA_HOME (its tokenized "
                                                           "cache); default: the usual one")
    ap.add_argument("--file", type=Path, default=None, help="reuse this data file")
    ap.add_argument("--repeat", type=int, default=1, help="runs (a second one reuses caches)")
    args = ap.parse_args()
    path = (args.file or Path(f"/tmp/plan_memory_{args.records}.jsonl")).resolve()
    if not path.exists():
        make_file(path, args.records)
    env = {**os.environ, "PYTHONPATH": str(args.tree.resolve()), "LLAMALORA_QUIET": "1"}
    if args.home is not None:
        env["LLAMALORA_HOME"] = str(args.home)
    cmd = [sys.executable, "-m", "llamalora", "train", str(path), "--model", "tiny",
           "--dry-run", "--json"]
    rows = []
    for run in range(args.repeat):
        wall, peak = measure(cmd, env)
        rows.append({"run": run + 1, "records": args.records, "tree": str(args.tree),
                     "wall_s": round(wall, 1), "peak_rss_mib": round(peak / 1024)})
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
