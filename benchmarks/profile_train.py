"""Where a real `llamalora train` step's time goes: the command as a user runs it, profiled.

    python3 benchmarks/profile_train.py --from-step 4 --steps 2 --out prof.json -- \
        DATA --model /tmp/m11b --output-dir /tmp/r --overwrite --max-steps 7 --save-steps 0

Everything after `--` is `llamalora train`'s own arguments: the run is the CLI's, in this
process. Steps FROM..FROM+STEPS-1 run under torch.profiler, with ranges around the host's batch
making (`batch`), the optimizer step (`step`: forwards, backwards and the update), each forward
(`forward`, and inside it `vision` and `projector`: the vision tower and its projection,
`cross_layers` and `self_layers`: the language model's cross- and self-attention decoder layers,
forward only; backward kernels run on autograd's own thread). Prints, per profiled
step: wall time, GPU busy time (kernels counted once), kernel launches, each range's host and GPU
time, and the ops with the most GPU and host time; `--out` keeps the figures as JSON and
`--trace` a Chrome trace.

`--eager-static`: a CUDA-graph run's static rows, run eagerly (no capture): the kernels a graph
replays, which the profiler can see (it crashed around replays on the H200, 2026-12-01). Their
GPU busy time is what a replay takes at best.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RANGES = ("batch", "step", "forward", "vision", "projector", "cross_layers", "self_layers")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx",
            "cudaGraphLaunch")


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser()
    ap.add_argument("--from-step", type=int, default=4, help="first profiled step (0-based)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--trace", type=Path)
    ap.add_argument("--eager-static", action="store_true",
                    help="run a CUDA-graph run's static rows eagerly (see the docstring)")
    args = ap.parse_args(argv[:split])
    train_args = argv[split + 1:]

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    from llamalora import recipe, step as step_module
    from llamalora.cli.main import main as cli_main

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    state = {"index": -1, "prof": None, "walls": [], "hooked": False}
    last = args.from_step + args.steps - 1

    def hook_regions(model) -> None:
        """Ranges around the vision tower, the projector and the decoder layers, through
        forward hooks."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        named = list(base.named_modules())
        targets = [(label, m) for name, label in (("vision_model", "vision"),
                                                  ("multi_modal_projector", "projector"))
                   for m in [next((m for n, m in named if n.endswith(name)), None)] if m is not None]
        targets += [("cross_layers" if "CrossAttention" in type(m).__name__ else "self_layers", m)
                    for _, m in named if type(m).__name__.endswith("DecoderLayer")]
        for label, module in targets:
            open_ranges = []

            def enter(module, inputs, label=label, open_ranges=open_ranges):
                open_ranges.append(record_function(label).__enter__())

            def leave(module, inputs, output, open_ranges=open_ranges):
                open_ranges.pop().__exit__(None, None, None)

            module.register_forward_pre_hook(enter)
            module.register_forward_hook(leave)

    make_batches = recipe.StepBatches.__call__
    run_step = step_module.TrainStep.__call__
    loss_sum = step_module.loss_sum

    def batches(self, index):
        # The loop makes step N+1's batch while step N runs: the profile of step N holds it.
        with record_function("batch"):
            return make_batches(self, index)

    def traced_loss_sum(model, batch):
        if not state["hooked"]:
            state["hooked"] = True
            hook_regions(model)
        with record_function("forward"):
            return loss_sum(model, batch)

    def traced_step(self, micro, n_targets):
        state["index"] += 1
        if state["index"] == args.from_step:
            sync()
            state["prof"] = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                                    record_shapes=True)
            state["prof"].__enter__()
        state["t0"] = time.perf_counter()
        with record_function("step"):
            out = run_step(self, micro, n_targets)
        if state["prof"] is not None:
            sync()
            state["walls"].append(time.perf_counter() - state["t0"])
            if state["index"] == last:
                state["prof"].__exit__(None, None, None)
                report(state["prof"], state["walls"])
                state["prof"] = None
        return out

    def report(prof, walls) -> None:
        events = prof.key_averages()
        n = len(walls)
        kernels = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
        gpu_ms = sum(e.self_device_time_total for e in kernels) / 1000 / n
        launches = sum(e.count for e in events if e.key in LAUNCHES) / n
        ranges = {}
        for e in events:
            if e.key in RANGES:
                side = "gpu_ms" if e.device_type == DeviceType.CUDA else "host_ms"
                r = ranges.setdefault(e.key, {})
                r[side] = round(r.get(side, 0) + (e.device_time_total if side == "gpu_ms"
                                                  else e.cpu_time_total) / 1000 / n, 2)
        top_gpu = sorted(kernels, key=lambda e: -e.self_device_time_total)[:40]
        host_ops = [e for e in events if e.device_type == DeviceType.CPU and e.key not in RANGES]
        top_host = sorted(host_ops, key=lambda e: -e.self_cpu_time_total)[:25]
        # Attention calls by shape: which of the model's attentions the kernels' time is.
        attention = sorted(
            (e for e in prof.key_averages(group_by_input_shape=True)
             if e.device_type == DeviceType.CPU and e.key.startswith("aten::_")
             and "attention" in e.key),
            key=lambda e: -e.device_time_total)[:12]
        result = {
            "steps": n, "wall_ms": [round(w * 1000, 1) for w in walls],
            "gpu_busy_ms_per_step": round(gpu_ms, 2), "kernel_launches_per_step": launches,
            "ranges_per_step": ranges,
            "top_gpu_ms_per_step": [[e.key[:90], round(e.self_device_time_total / 1000 / n, 2),
                                     e.count // n] for e in top_gpu],
            "attention_by_shape": [[e.key, str(e.input_shapes)[:160],
                                    round(e.device_time_total / 1000 / n, 2), e.count / n]
                                   for e in attention],
            "top_host_ms_per_step": [[e.key[:90], round(e.self_cpu_time_total / 1000 / n, 2),
                                      e.count // n] for e in top_host],
        }
        print(json.dumps(result, indent=1), file=sys.stderr, flush=True)
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))
        if args.trace:
            prof.export_chrome_trace(str(args.trace))

    if args.eager_static:
        def no_capture(self, batch):
            raise RuntimeError("profile_train --eager-static: the static rows run eagerly")
        step_module.GraphedStep._capture_with = no_capture
        from llamalora import attention

        attention._GRAPHED.set(True)  # the kernels a graph's passes take (attention.graph_kernels)
    recipe.StepBatches.__call__ = batches
    step_module.TrainStep.__call__ = traced_step
    step_module.loss_sum = traced_loss_sum
    sys.argv = ["llamalora", "train", *train_args]
    cli_main()


if __name__ == "__main__":
    main()
