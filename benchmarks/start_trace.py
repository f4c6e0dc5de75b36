"""Where a run's start goes: `llamalora ...` with each named stage stamped on stderr.

    LL_T0=$(date +%s.%N) python3 benchmarks/start_trace.py train data/sample.jsonl \
        --model /tmp/m11b --output-dir /tmp/job --max-steps 1 2> trace.log

Lines `@@ SECONDS > stage` and `@@ SECONDS < stage TOOK` count from LL_T0 (the shell's clock
before Python starts; else this script's first line), so the interpreter's start is included.
It wraps functions by name and changes nothing else; `from_pretrained` is timed after a CUDA
synchronize, so the copies it queued are inside its time. A profiler would be the other way:
cProfile, with transformers' loader threads, gave impossible cumulative times (BENCHMARKS.md).
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import time

T0 = float(os.environ.get("LL_T0") or time.time())


def say(message: str) -> None:
    sys.stderr.write(f"@@ {time.time() - T0:7.2f} {message}\n")
    sys.stderr.flush()


say("python up")
STAGES = [
    ("llamalora.plan", "plan_training"), ("llamalora.plan", "load_model_tokenizer"),
    ("llamalora.plan", "tokenize_data"), ("llamalora.plan", "load_model_config"),
    ("llamalora.plan", "count_params"), ("llamalora.quant", "check_packages"),
    ("llamalora.recipe", "_build_model"), ("llamalora.models.loading", "load_base_model"),
    ("llamalora.models.lora", "attach_lora"), ("llamalora.quant.fastlinear", "enable"),
    ("llamalora.recipe", "_tokenizer_folder"), ("llamalora.recipe", "_optimizer"),
    ("llamalora.recipe", "_capture_graphs"), ("llamalora.recipe", "_run_steps"),
]


def wrap(module_name: str, name: str) -> None:
    module = importlib.import_module(module_name)
    original = getattr(module, name)

    @functools.wraps(original)
    def timed(*args, **kwargs):
        started = time.time()
        say(f"> {module_name}.{name}")
        try:
            return original(*args, **kwargs)
        finally:
            say(f"< {module_name}.{name} {time.time() - started:.2f}")

    setattr(module, name, timed)
    for other in list(sys.modules.values()):  # where it was imported by name
        if getattr(other, "__name__", "").startswith("llamalora") \
                and getattr(other, name, None) is original:
            setattr(other, name, timed)


def main() -> None:
    import llamalora.cli.main as cli

    say("cli imported")
    import torch

    say("torch imported")
    import transformers.modeling_utils as modeling

    say("transformers.modeling_utils imported")
    for module_name, name in STAGES:
        wrap(module_name, name)
    stock = modeling.PreTrainedModel.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        started = time.time()
        say("> from_pretrained")
        try:
            return stock(cls, *args, **kwargs)
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            say(f"< from_pretrained {time.time() - started:.2f} (synced)")

    modeling.PreTrainedModel.from_pretrained = classmethod(from_pretrained)
    sys.argv = ["llamalora", *sys.argv[1:]]
    cli.main()


if __name__ == "__main__":
    main()
