"""One frozen base linear layer, forward plus backward to the input, on each path (GPU).

    python3 benchmarks/kernel_speed.py [--tokens 700 2048] [--json out.json]

The layers are the 11B's MLP and attention projections: what LoRA asks of every base weight in a
training step. Paths: bf16 `F.linear`; bitsandbytes' LLM.int8 (threshold 6, the old script's,
and 0); llamalora's int8 path on the same int8 weight, dequantized by torch's `mul`
(`int8-dequant`, what runs without Triton) or by its Triton kernel (`int8-triton`, what runs on
GPUs), then cuBLAS; bitsandbytes NF4 and llamalora's nf4-dequant. Then decoding (1 token, forward
only), where `int8-triton` is the Triton GEMV. Medians of
`triton.testing.do_bench`; each path's error against the float64 product of its own stored weight
is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[700, 2048])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import bitsandbytes as bnb
    import torch
    import triton

    from llamalora.quant import fastlinear

    dev = torch.device("cuda")
    torch.manual_seed(0)
    shapes = [(14336, 4096), (4096, 4096), (1024, 4096), (4096, 14336)]  # (out, in)
    rows = []

    def layers(out_f: int, in_f: int):
        dense = torch.nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16, device=dev)
        torch.nn.init.normal_(dense.weight, std=0.02)
        dense.requires_grad_(False)
        made = {"bf16": dense}
        for name, threshold in (("bnb-int8-t6", 6.0), ("bnb-int8-t0", 0.0)):
            layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=False, has_fp16_weights=False,
                                        threshold=threshold)
            layer.load_state_dict({"weight": dense.weight.float().cpu()})
            made[name] = layer.to(dev)
        nf4 = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16,
                                quant_type="nf4")
        nf4.load_state_dict({"weight": dense.weight.float().cpu()})
        made["bnb-nf4"] = nf4.to(dev)
        return made

    def reference(name, layer, x):
        if name == "bf16":
            w = layer.weight.double()
        elif "int8" in name:
            w = layer.weight.data.double() * fastlinear._int8_scales(layer).double()[:, None] / 127
        else:
            w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).double()
        return x.double() @ w.t()

    for out_f, in_f in shapes:
        made = layers(out_f, in_f)
        paths = [("bf16", made["bf16"], None), ("bnb-int8-t6", made["bnb-int8-t6"], "plain"),
                 ("bnb-int8-t0", made["bnb-int8-t0"], "plain"),
                 ("int8-dequant", made["bnb-int8-t6"], "dequant"),
                 ("int8-triton", made["bnb-int8-t6"], "fast"),
                 ("bnb-nf4", made["bnb-nf4"], "plain"), ("nf4-dequant", made["bnb-nf4"], "fast")]
        for tokens in [*args.tokens, 1]:
            for name, layer, mode in paths:
                holder = torch.nn.Sequential(layer)
                fastlinear.disable(holder)
                if mode in ("fast", "dequant"):
                    fastlinear.enable(holder, "fast")
                    if mode == "dequant":
                        layer._llamalora_triton = False
                x = torch.randn(tokens, in_f, device=dev, dtype=torch.bfloat16) * 1.5
                g = torch.randn(tokens, out_f, device=dev, dtype=torch.bfloat16)
                if tokens == 1:
                    def step():
                        with torch.no_grad():
                            return layer(x)
                else:
                    xg = x.clone().requires_grad_(True)

                    def step():
                        xg.grad = None
                        y = layer(xg)
                        y.backward(g)
                        return y
                try:
                    y = step()
                    err = ((y.double() - reference(name, layer, x)).norm()
                           / reference(name, layer, x).norm()).item()
                    ms = triton.testing.do_bench(step, warmup=25, rep=200,
                                                 return_mode="median")
                except Exception as exc:  # a path that fails here is a row, not a crash
                    ms, err = None, f"{type(exc).__name__}: {str(exc)[:80]}"
                rows.append({"shape": f"{in_f}->{out_f}", "tokens": tokens, "path": name,
                             "ms": ms, "rel_err": err})
                fastlinear.disable(holder)
                print(json.dumps(rows[-1]), flush=True)
        del made
        torch.cuda.empty_cache()

    print("\n| layer | tokens | " + " | ".join(p for p, _, _ in paths) + " |")
    print("|---|---|" + "---|" * len(paths))
    for out_f, in_f in shapes:
        for tokens in [*args.tokens, 1]:
            cells = []
            for p, _, _ in paths:
                r = next((r for r in rows if r["shape"] == f"{in_f}->{out_f}"
                          and r["tokens"] == tokens and r["path"] == p), None)
                cells.append("-" if r is None else f"{r['ms']:.3f}" if r["ms"] is not None
                             else "failed")
            print(f"| {in_f}->{out_f} | {tokens}{' (decode, fwd)' if tokens == 1 else ''} | "
                  + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
