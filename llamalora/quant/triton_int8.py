"""Triton kernels for a frozen linear layer stored as bitsandbytes' LLM.int8.

The weight stays as bitsandbytes stores it: `CB`, int8 [out, in], and the row scale `SCB / 127`
(fp32), so `W = CB * scale`. The activations are never rounded to int8 (LLM.int8 does that), so
the result is closer to the unquantized layer.

- `gemv`: decoding multiplies one (or a few) activation rows by every weight, so the time is the
  time to read the weights once: each program streams a block of int8 rows, converts them in
  registers and accumulates in fp32.
- `dequant`: for training and prefill, `CB * scale` in fp32, rounded once to bf16/fp16, in one
  pass at memory speed. torch's `mul` on int8 and fp32 inputs with a bf16 output takes its
  per-element casting loop: it ran at about a quarter of memory bandwidth and was half of a
  compiled 8-bit step's GPU time (BENCHMARKS.md).

This module imports triton; `quant.fastlinear` imports it only on CUDA GPUs (or in tests under
TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _bench(fn, quantiles=None):
    # Tuned once per layer shape at the first decoding step; keep that short.
    return triton.testing.do_bench(fn, warmup=3, rep=12, quantiles=quantiles)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_xm, stride_wn, stride_ym,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[m, n] = sum_k x[m, k] * w[n, k] * s[n], for one row m and BLOCK_N outputs."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m * stride_xm + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                    mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    scale = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0)
    tl.store(y_ptr + m * stride_ym + offs_n, (acc * scale).to(y_ptr.dtype.element_ty),
             mask=offs_n < N)


_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
            for bn, bk, w in [(16, 256, 4), (32, 256, 4), (8, 512, 4), (64, 128, 4)]]
_gemv_tuned = triton.autotune(configs=_CONFIGS, key=["N", "K"], do_bench=_bench)(_gemv_kernel)


def gemv(x: torch.Tensor, cb: torch.Tensor, scale: torch.Tensor,
         config: dict | None = None) -> torch.Tensor:
    """`x @ (cb * scale)^T` for a few rows of x; cb int8 [N, K] row-major, scale fp32 [N] or [N, 1].

    `config` pins the block sizes (tests under the interpreter); by default they are autotuned.
    """
    M, K = x.shape
    N = cb.shape[0]
    assert cb.stride(1) == 1 and x.stride(1) == 1 and scale.numel() == N
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    args = (x, cb, scale, y, N, K, x.stride(0), cb.stride(0), y.stride(0))
    if config is None:
        _gemv_tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), M)](*args)
    else:
        _gemv_kernel[(triton.cdiv(N, config["BLOCK_N"]), M)](*args, **config)
    return y


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[n, k] = w[n, k] * s[n] over one [BLOCK_N, BLOCK_K] tile; w and out row-major."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    where = offs_n[:, None] * K + offs_k[None, :]
    w = tl.load(w_ptr + where, mask=mask, other=0)
    scale = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0)
    tl.store(out_ptr + where, (w.to(tl.float32) * scale[:, None]).to(out_ptr.dtype.element_ty),
             mask=mask)


def dequant(cb: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
            block: tuple[int, int] = (4, 1024)) -> torch.Tensor:
    """`cb * scale` as `dtype`: the same fp32 product, rounded once, that torch's `mul` gives.

    cb int8 [N, K] contiguous, scale fp32 [N] or [N, 1]. A tile of 4 x 1,024 weights gives each
    of 4 warps' threads 32 contiguous bytes to load; `block` is set by tests only.
    """
    N, K = cb.shape
    assert cb.is_contiguous() and scale.is_contiguous() and scale.numel() == N
    assert scale.dtype == torch.float32
    out = torch.empty((N, K), device=cb.device, dtype=dtype)
    _dequant_kernel[(triton.cdiv(N, block[0]), triton.cdiv(K, block[1]))](
        cb, scale, out, N, K, BLOCK_N=block[0], BLOCK_K=block[1], num_warps=4)
    return out
