"""GPU time of a frozen 8-bit layer's two matmuls: dequantize-then-cuBLAS (what training runs)
against a Triton GEMM that converts the int8 tiles in registers (`matmul` below, which
training does not use: it lost, BENCHMARKS.md), over block sizes.

Each case is timed as a CUDA graph of 20 calls, replayed (what a training step is), so host
time is not counted. Shapes: the 11B's text layer (q/o 4096->4096, k/v 4096->1024, gate/up
4096->14336, down 14336->4096); rows: the tokens of a step's packed row.

    python3 benchmarks/int8_matmul_speed.py --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import triton
import triton.language as tl

from llamalora.quant import triton_int8


@triton.jit
def _matmul_kernel(a_ptr, w_ptr, s_ptr, c_ptr, M, P, R, stride_am, stride_wr, stride_wp,
                   stride_cm, SCALE_ON_R: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_P: tl.constexpr):
    """c[M, P] = a[M, R] @ (w * s) with the int8 weight read as [R, P] through its strides and
    converted in registers: s scales the columns (forward: x @ (cb * s)^T, applied to the fp32
    sums) or the rows (backward: grad @ (cb * s), applied to each tile as `dequant` does).
    R and P are multiples of the blocks; only M is masked."""
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    # Programs that share a weight block run together (the weight is the large operand).
    group = pid // (GROUP_P * blocks_m)
    first_p = group * GROUP_P
    size = tl.minimum(tl.cdiv(P, BLOCK_P) - first_p, GROUP_P)
    pid_p = first_p + (pid % (GROUP_P * blocks_m)) % size
    pid_m = (pid % (GROUP_P * blocks_m)) // size
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_r = tl.arange(0, BLOCK_R)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_r[None, :]
    w_ptrs = w_ptr + offs_r[:, None] * stride_wr + offs_p[None, :] * stride_wp
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        a = tl.load(a_ptrs, mask=offs_m[:, None] < M, other=0.0)
        w = tl.load(w_ptrs)
        if SCALE_ON_R:
            s = tl.load(s_ptr + r0 + offs_r)
            b = (w.to(tl.float32) * s[:, None]).to(a.dtype)
        else:
            b = w.to(a.dtype)  # int8 values are exact in bf16 and fp16
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_R
        w_ptrs += BLOCK_R * stride_wr
    if not SCALE_ON_R:
        acc = acc * tl.load(s_ptr + offs_p)[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_p[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=offs_m[:, None] < M)


def matmul_fits(cb: torch.Tensor, config: dict) -> bool:
    """Both directions of `matmul` can run on this weight with these blocks."""
    n, k = cb.shape
    return not (n % config["BLOCK_P"] or n % config["BLOCK_R"] or k % config["BLOCK_P"]
                or k % config["BLOCK_R"])


def matmul(a: torch.Tensor, cb: torch.Tensor, scale: torch.Tensor, transpose: bool,
           config: dict) -> torch.Tensor:
    """`a @ (cb * scale)^T` (transpose, the forward) or `a @ (cb * scale)` (the gradient to the
    input), never writing a dequantized copy of the weight. cb int8 [N, K] row-major, scale
    fp32 [N] or [N, 1]; a [M, K] (or [M, N]) contiguous rows, bf16 or fp16.
    """
    M, R = a.shape
    N, K = cb.shape
    assert a.stride(1) == 1 and cb.is_contiguous() and scale.numel() == N
    assert R == (K if transpose else N)
    P = N if transpose else K
    c = config
    out = torch.empty((M, P), device=a.device, dtype=a.dtype)
    grid = (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(P, c["BLOCK_P"]),)
    # forward reads w[r=k, p=n] = cb[n, k]; backward w[r=n, p=k] = cb[n, k]
    stride_wr, stride_wp = (1, K) if transpose else (K, 1)
    _matmul_kernel[grid](a, cb, scale, out, M, P, R, a.stride(0), stride_wr, stride_wp,
                         out.stride(0), SCALE_ON_R=not transpose, **c)
    return out


# The Llama layer's projections, out x in, each counted as often as a layer has it.
LAYER = {"q/o": ((4096, 4096), 2), "k/v": ((1024, 4096), 2), "gate/up": ((14336, 4096), 2),
         "down": ((4096, 14336), 1)}


def gpu_ms(fn, calls: int = 20, replays: int = 5) -> float:
    """Median GPU time of one call, from replays of a graph of `calls` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return sorted(times)[len(times) // 2]


def configs():
    for bm, bp, br, warps, stages in itertools.product((64, 128), (64, 128, 256), (64, 128),
                                                       (4, 8), (3, 4)):
        yield dict(BLOCK_M=bm, BLOCK_P=bp, BLOCK_R=br, GROUP_P=8, num_warps=warps,
                   num_stages=stages)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="128,256,512,1024,2048")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    torch.manual_seed(0)
    cases = []
    for name, ((n, k), count) in LAYER.items():
        cb = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
        scale = (torch.rand(n, 1, device="cuda") * 0.2 + 0.01) / 127
        w = (cb.float() * scale).bfloat16()
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
            ref_f = x.double() @ (cb.double() * scale.double()).t()
            ref_b = g.double() @ (cb.double() * scale.double())
            case = {"layer": name, "out": n, "in": k, "count": count, "rows": m,
                    "dequant_cublas": {
                        "forward": gpu_ms(lambda: torch.nn.functional.linear(
                            x, triton_int8.dequant(cb, scale, torch.bfloat16))),
                        "backward": gpu_ms(lambda: g @ triton_int8.dequant(
                            cb, scale, torch.bfloat16))},
                    "bf16_weight": {"forward": gpu_ms(lambda: torch.nn.functional.linear(x, w)),
                                    "backward": gpu_ms(lambda: g @ w)},
                    "fused": {"forward": {}, "backward": {}}}
            for i, c in enumerate(configs()):
                for direction, a, ref in (("forward", x, ref_f), ("backward", g, ref_b)):
                    if not matmul_fits(cb, c):
                        continue
                    try:
                        out = matmul(a, cb, scale, direction == "forward", config=c)
                        err = ((out.double() - ref).norm() / ref.norm()).item()
                        if not err < 1e-2:
                            raise RuntimeError(f"error {err}")
                        ms = gpu_ms(lambda: matmul(a, cb, scale, direction == "forward",
                                                     config=c))
                    except Exception as exc:  # out of shared memory, etc.
                        case["fused"][direction][str(i)] = str(exc)[:80]
                        continue
                    case["fused"][direction][str(i)] = round(ms, 4)
            cases.append(case)
            best = {d: min((v, i) for i, v in case["fused"][d].items() if isinstance(v, float))
                    for d in ("forward", "backward")}
            print(f"{name:8s} {m:5d} fwd dequant+cublas {case['dequant_cublas']['forward']:.4f} "
                  f"bf16 {case['bf16_weight']['forward']:.4f} fused {best['forward'][0]:.4f} "
                  f"(#{best['forward'][1]}) | bwd {case['dequant_cublas']['backward']:.4f} "
                  f"bf16 {case['bf16_weight']['backward']:.4f} fused {best['backward'][0]:.4f} "
                  f"(#{best['backward'][1]})", file=sys.stderr, flush=True)
    all_configs = list(configs())
    summary = {}
    for m in rows:
        here = [c for c in cases if c["rows"] == m]
        row = {}
        for d in ("forward", "backward"):
            base = sum(c["dequant_cublas"][d] * c["count"] for c in here)
            floor = sum(c["bf16_weight"][d] * c["count"] for c in here)
            per_config = {}
            for i in range(len(all_configs)):
                vals = [c["fused"][d].get(str(i)) for c in here]
                if all(isinstance(v, float) for v in vals):
                    per_config[i] = sum(v * c["count"] for v, c in zip(vals, here))
            i = min(per_config, key=per_config.get)
            row[d] = {"dequant_cublas_ms": round(base, 3), "bf16_ms": round(floor, 3),
                      "fused_best_one_config_ms": round(per_config[i], 3),
                      "config": all_configs[i]}
        summary[m] = row
        print(f"layer at {m} rows: " + "; ".join(
            f"{d} dequant+cublas {row[d]['dequant_cublas_ms']} bf16 {row[d]['bf16_ms']} fused "
            f"{row[d]['fused_best_one_config_ms']} {row[d]['config']}" for d in row),
            flush=True)
    if args.json:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "configs": all_configs, "cases": cases, "per_layer": summary},
                  open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
