"""Long records on one GPU (issue 31): llamalora at its defaults against HF Trainer + PEFT and
Unsloth on the same records, at 3k to 128k tokens a record, with the plan's estimate beside
each measured peak.

    python3 benchmarks/long_speed.py --model /tmp/m11b --sources alpaca_zh_demo.json \\
        koalpaca_v1_subset_2001.json --work-dir /tmp/long-work --json-out long.json \\
        --runs 3k:llamalora-8bit,llamalora-none,hf-packed-bf16,unsloth-bf16 128k:llamalora-8bit
    python3 benchmarks/long_speed.py --model tiny --device cpu --sizes 3k=96 --runs \\
        3k:llamalora-none --steps 2 --skip 1       # a smoke test on the CPU

`--runs SIZE:RECIPE,...` (repeatable): a size is 3k, 8k, 16k, 32k or 128k (records of 3,200,
8,000, 16,000, 32,000 or 128,000 tokens, `--max-seq-length` 4,096 to 131,072: the next power
of two above), made from `--sources` by benchmarks/make_long_data.py, as many as the steps take
(batch 2 x accumulation 2; one record for 128k, which each step then trains twice); `--sizes
3k=96` changes a size's tokens (smoke tests). A recipe is one of benchmarks/speed.py's
(llamalora-8bit / -none / -4bit, hf-packed-bf16 / -8bit, unsloth-bf16 / -8bit / -4bit), and a
llamalora recipe may add `+ckpt` (--gradient-checkpointing), `+offload` (with
--offload-activations) or `+eager` (--no-cuda-graphs). `--memory-cap-gib G` caps every run's GPU
memory (`torch.cuda.set_per_process_memory_fraction`: a smaller card on this one).

Each run is its own process (benchmarks/speed.py's `run_child`), its log under --log-dir; the
report is saved after each, and with --resume the runs of the work dir's last report made with
the same code, model and settings are kept, so a benchmark larger than one 10-minute call goes
on in the next. Prints a table last (median step, records/s, real tokens/s, peak, the plan's
estimate for the path taken, what the run turned on) and its numbers as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import speed  # noqa: E402  (benchmarks/speed.py: recipes, child processes, summaries)

# size -> (tokens a record, --max-seq-length, steps, steps not counted)
SIZES = {"3k": (3200, 4096, 10, 2), "8k": (8000, 8192, 6, 2), "16k": (16000, 16384, 4, 1),
         "32k": (32000, 32768, 3, 1), "128k": (128000, 131072, 1, 0)}
OPTIONS = {"ckpt": {"gradient_checkpointing": True},
           "offload": {"gradient_checkpointing": True, "offload_activations": True},
           "eager": {"cuda_graphs": False}}
RECORDS_PER_STEP = 4  # batch 2 x accumulation 2, every recipe


def parse_runs(values: list[str]) -> list[tuple[str, str]]:
    """`SIZE:RECIPE,RECIPE` values -> [(size, recipe)] in order."""
    out = []
    for value in values:
        size, _, recipes = value.partition(":")
        if size not in SIZES or not recipes:
            sys.exit(f"--runs {value!r}: give SIZE:RECIPE,... with a size of {', '.join(SIZES)}")
        for recipe in recipes.split(","):
            base, *extra = recipe.split("+")
            if base not in speed.SPEED_RECIPES or (extra and not base.startswith("llamalora-"))\
                    or any(e not in OPTIONS for e in extra):
                sys.exit(f"--runs: unknown recipe {recipe!r}")
            out.append((size, recipe))
    return out


def make_data(size: str, tokens: int, records: int, sources: list[Path], work: Path) -> Path:
    """The size's records (benchmarks/make_long_data.py), made once per work dir."""
    path = work / f"long-{size}-{tokens}x{records}.jsonl"
    if not path.is_file():
        subprocess.run([sys.executable, str(HERE / "make_long_data.py"), "--tokens", str(tokens),
                        "--records", str(records), "--out", str(path), *map(str, sources)],
                       check=True, stdout=sys.stderr)
    return path


def spec_for(size: str, recipe: str, args, data: Path, steps: int) -> dict:
    """speed.py's spec for one run, with this benchmark's options."""
    tokens, max_length, _, _ = SIZES[size]
    base, *extra = recipe.split("+")
    spec = {"recipe": base, "data": str(data), "model": args.model, "device": args.device,
            "steps": steps, "seed": args.seed, "max_seq_length": max_length,
            "output_dir": str(args.work_dir / f"{size}-{recipe}"),
            "memory_cap_gib": args.memory_cap_gib}
    if base.startswith("llamalora-"):
        options = {}
        for name in extra:
            options.update(OPTIONS[name])
        spec.update(kind="llamalora", quant=base.split("-", 1)[1], kernels="auto",
                    options=options)
    elif base.startswith("unsloth-"):
        spec.update(kind="unsloth", quant=base.split("-", 1)[1], pythonpath=args.unsloth_site)
    else:
        spec["kind"] = "trainer"
    return spec


def summary(run: dict, size: str, skip: int) -> dict:
    """The table's numbers of one run."""
    keep = {k: run[k] for k in ("error", "peak_gpu_mem_gib", "estimate_gib", "batches",
                                "gradient_checkpointing", "offload_activations", "wall_s")
            if k in run}
    keep["turned_on"] = [m for m in run.get("statuses", []) if m.startswith((
        "Gradient checkpointing", "Checkpointed layer", "CUDA graphs", "Captured"))]
    if "rows" in run and run["rows"]:
        counted = run["rows"][skip:] or run["rows"]
        median = statistics.median(r["step_time_s"] for r in counted)
        tokens = sum(r["tokens"] for r in counted) / sum(r["step_time_s"] for r in counted)
        keep.update(median_step_s=round(median, 3), real_tokens_per_s=round(tokens, 1),
                    records_per_s=round(tokens / SIZES[size][0], 3),
                    steps_counted=len(counted), final_loss=counted[-1].get("loss"))
    return keep


def table(report: dict) -> str:
    lines = ["| size | recipe | median step (s) | records/s | real tokens/s | peak (GiB) "
             "| plan's estimate (GiB) | turned on |", "|---|---|---|---|---|---|---|---|"]
    for name, r in report["summary"].items():
        size, recipe = name.split("/", 1)
        if "error" in r:
            lines.append(f"| {size} | {recipe} | failed: {r['error'].replace('|', '/')} "
                         "| | | | | |")
            continue
        on = "; ".join(r["turned_on"]).replace("|", "/") or "-"
        lines.append(f"| {size} | {recipe} | {r.get('median_step_s', '-')} | "
                     f"{r.get('records_per_s', '-')} | {r.get('real_tokens_per_s', '-')} | "
                     f"{r.get('peak_gpu_mem_gib', '-')} | {r.get('estimate_gib', '-')} | {on} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="/tmp/m11b")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--sources", nargs="+", type=Path, required=True,
                    help="Alpaca JSON / JSONL files the records are made from.")
    ap.add_argument("--runs", nargs="+", required=True, help="SIZE:RECIPE,... (see above)")
    ap.add_argument("--sizes", nargs="*", default=[], help="SIZE=TOKENS overrides.")
    ap.add_argument("--steps", type=int, help="Steps a run (default: by size).")
    ap.add_argument("--skip", type=int, help="First steps not counted (default: by size).")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--memory-cap-gib", type=float, default=None)
    ap.add_argument("--unsloth-site", default="/tmp/usite",
                    help="Where gpu_long.sh installed .whl-unsloth/ (Unsloth runs only).")
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--log-dir", type=Path, default=None)
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    for override in args.sizes:
        size, _, tokens = override.partition("=")
        SIZES[size] = (int(tokens), *SIZES[size][1:])
    args.work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="llamalora-long-"))
    log_dir = args.log_dir or args.work_dir
    for folder in (args.work_dir, log_dir):
        folder.mkdir(parents=True, exist_ok=True)
    report = {"model": args.model, "device": args.device, "code_sha256": speed.code_sha256(),
              "seed": args.seed, "memory_cap_gib": args.memory_cap_gib,
              "sizes": {k: list(v) for k, v in SIZES.items()}, "versions": speed.versions(),
              "runs": {}, "summary": {}}
    if args.device == "cuda":
        import torch

        report["gpu"] = torch.cuda.get_device_name(0)
    last = args.work_dir / "long_report.json"
    previous = {}
    if args.resume and last.is_file():
        before = json.loads(last.read_text())
        if all(before.get(k) == report[k] for k in ("model", "device", "code_sha256", "seed",
                                                    "memory_cap_gib", "sizes")):
            previous = before["runs"]
    run_all(args, report, previous, log_dir, last)
    print(table(report))
    print(json.dumps(report["summary"]))


def run_all(args, report: dict, previous: dict, log_dir: Path, last: Path) -> None:
    """Every run in order (kept ones from `previous`), the report saved after each."""
    specs = {}
    for size, recipe in parse_runs(args.runs):
        tokens, _, steps, _ = SIZES[size]
        steps = args.steps or steps
        records = 1 if size == "128k" else max(8, steps * RECORDS_PER_STEP)
        data = make_data(size, tokens, records, args.sources, args.work_dir)
        # speed.run_specs names each run's files by its key: "3k_llamalora-8bit", not "3k/..."
        specs[f"{size}_{recipe}"] = spec_for(size, recipe, args, data, steps)

    def save(flat: dict) -> None:
        report["runs"] = {name.replace("_", "/", 1): run for name, run in flat["runs"].items()}
        for name, run in report["runs"].items():
            size = name.split("/", 1)[0]
            skip = args.skip if args.skip is not None else SIZES[size][3]
            report["summary"][name] = summary(run, size, skip)
        text = json.dumps(report, indent=2) + "\n"
        for path in (last, args.json_out):
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)

    flat = {"runs": {}}
    speed.run_specs(specs, flat, {k.replace("/", "_", 1): v for k, v in previous.items()},
                    args.work_dir, log_dir, save)
    save(flat)


if __name__ == "__main__":
    main()
