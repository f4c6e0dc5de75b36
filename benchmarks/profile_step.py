"""Where a LoRA training step's time goes: host vs device, kernel launches, top ops (GPU).

    python3 benchmarks/profile_step.py --model /tmp/m11b --quant 8bit --kernels fast \
        [--tokens 700] [--compile] [--json out.json]

Loads the text model as `llamalora train` does (LoRA r 8 on q,k,v,o), packs random records into
one row of `--tokens` tokens (4 records), and times forward, backward and the AdamW step with the
device synchronized between them. Then profiles 2 steps and prints the ops with the most host time
and the number of kernel launches per step: at LoRA batch sizes the step is bound by launches,
not arithmetic.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--quant", default="8bit")
    ap.add_argument("--kernels", default="fast")
    ap.add_argument("--tokens", type=int, default=700)
    ap.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch

    from llamalora.batching import Tokenized
    from llamalora.models.loading import load_model_for_training
    from llamalora.models.lora import attach_lora
    from llamalora.packing import pack
    from llamalora.quant import fastlinear
    from llamalora.step import loss_sum, to_device

    t0 = time.perf_counter()
    model, info = load_model_for_training(args.model, quant=args.quant, device="cuda")
    model = attach_lora(model, r=8, alpha=32, dropout=0.05)
    path = fastlinear.enable(model, args.kernels)
    load_s = time.perf_counter() - t0
    if args.compile:
        from llamalora.speed import compile_layers

        compile_layers(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    sizes = [args.tokens // 4] * 3 + [args.tokens - 3 * (args.tokens // 4)]
    items = []
    for i, n in enumerate(sizes):
        ids = torch.randint(1000, 100000, (n,), generator=g).tolist()
        items.append(Tokenized(line=i, input_ids=ids, labels=[-100] * (n // 3) + ids[n // 3:]))
    batch = to_device(pack(items), torch.device("cuda"), torch.bfloat16)
    n_targets = int((batch["labels"][:, 1:] != -100).sum())

    def step(timings=None):
        torch.cuda.synchronize()
        a = time.perf_counter()
        loss, _ = loss_sum(model, batch)
        torch.cuda.synchronize()
        b = time.perf_counter()
        (loss / n_targets).backward()
        torch.cuda.synchronize()
        c = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        d = time.perf_counter()
        if timings is not None:
            timings.append((b - a, c - b, d - c))
        return loss.item() / n_targets

    t0 = time.perf_counter()
    first = [step() for _ in range(3)]
    warm_s = time.perf_counter() - t0
    warm_peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    timings = []
    losses = [step(timings) for _ in range(args.steps)]
    steady_peak = torch.cuda.max_memory_allocated() / 2**30
    fwd, bwd, optim = (statistics.median(t[i] for t in timings) for i in range(3))

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                        "cudaLaunchKernelExC", "cuLaunchKernelEx"))
    # Kernels only (device-side events), as the table's "Self CUDA time total": the ops that
    # launch them carry the same time again and would count it twice.
    from torch.autograd import DeviceType

    gpu_us = sum(e.self_device_time_total for e in events
                 if e.device_type == DeviceType.CUDA and not e.is_user_annotation) / 2
    print(events.table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
    result = {"quant": args.quant, "kernels": path, "compile": args.compile,
              "tokens": args.tokens, "load_s": round(load_s, 1),
              "first_3_steps_s": round(warm_s, 2), "forward_s": round(fwd, 4),
              "backward_s": round(bwd, 4), "optimizer_s": round(optim, 4),
              "step_s": round(fwd + bwd + optim, 4),
              "tokens_per_s": round(args.tokens / (fwd + bwd + optim), 1),
              "kernel_launches_per_step": launches / 2, "gpu_busy_ms_per_step": gpu_us / 1000,
              "peak_gib_first_steps": round(warm_peak, 2), "peak_gib_steady": round(steady_peak, 2),
              "losses": [round(x, 4) for x in first + losses]}
    print(json.dumps(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
