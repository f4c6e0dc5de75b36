"""Where loading the base model goes (issue 13: a second run should reach its first step in
<= 15 s; the 8-bit load of the 11B alone took 36.5 s on an H200, bf16 from the page cache 3-4 s).

    python3 benchmarks/profile_load.py --model /tmp/m11b --quant 8bit [--quant none] [--top 30]

Loads the model as `llamalora train` does (`models.load_model_for_training`, text-only unless
--with-vision), once per --quant, under cProfile, and prints the wall time and the functions
with the most cumulative and the most own time (after timing the imports on their own): whether it is reading the files, moving weights to the GPU,
bitsandbytes quantizing, or transformers' per-parameter bookkeeping decides what a cache of a
pre-quantized base could save.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--quant", action="append", help="8bit, 4bit or none (repeatable)")
    ap.add_argument("--with-vision", action="store_true")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--save-quantized", type=Path,
                    help="also save the first quantized load here (save_pretrained) and time "
                         "loading that pre-quantized folder")
    args = ap.parse_args()

    # Imports first, timed on their own: they count toward a run's first step too, but a
    # cache of weights does not change them.
    start = time.perf_counter()
    import torch
    import transformers  # noqa: F401

    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401

    except ImportError:
        pass
    from llamalora.models.loading import load_model_for_training

    results = [{"imports_s": round(time.perf_counter() - start, 2)}]
    print(f"=== imports (torch, transformers, bitsandbytes, peft): {results[0]['imports_s']} s")
    for quant in args.quant or ["8bit"]:
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.enable()
        model, _ = load_model_for_training(args.model, quant=quant, with_vision=args.with_vision)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        profiler.disable()
        wall = time.perf_counter() - start
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("cumulative").print_stats(args.top)
        stats.sort_stats("tottime").print_stats(args.top)
        print(f"=== --quant {quant}: {wall:.1f} s", flush=True)
        print(out.getvalue(), flush=True)
        results.append({"quant": quant, "wall_s": round(wall, 2)})
        if args.save_quantized and quant != "none" and not args.save_quantized.exists():
            results.append(_prequantized(model, quant, args))
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(json.dumps(results), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def _prequantized(model, quant: str, args) -> dict:
    """Saves the quantized model as transformers does (int8 weights and their scales) and
    loads it back the way a cache of it would be: the time each takes."""
    import torch
    from transformers import MllamaForCausalLM, MllamaForConditionalGeneration

    start = time.perf_counter()
    model.save_pretrained(args.save_quantized)
    saved = time.perf_counter() - start
    size = sum(f.stat().st_size for f in args.save_quantized.iterdir()) / 2**30
    cls = MllamaForConditionalGeneration if args.with_vision else MllamaForCausalLM
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    again = cls.from_pretrained(args.save_quantized, device_map={"": "cuda:0"},
                                dtype=torch.bfloat16)
    torch.cuda.synchronize()
    profiler.disable()
    wall = time.perf_counter() - start
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(args.top)
    print(f"=== pre-quantized {quant}: save {saved:.1f} s ({size:.2f} GiB), load {wall:.1f} s")
    print(out.getvalue(), flush=True)
    del again
    return {"quant": quant, "prequantized_save_s": round(saved, 2),
            "prequantized_gib": round(size, 2), "prequantized_load_s": round(wall, 2)}


if __name__ == "__main__":
    main()
