"""Fast matmuls for the frozen 8-bit and 4-bit base layers, on the weights bitsandbytes stores.

bitsandbytes' LLM.int8 layer rounds every input to int8 and sends outlier columns through fp16; at
LoRA batch sizes that costs ~5x a bf16 matmul per layer (benchmarks/HISTORY.md, "Training
speed"), most of it host time. The base is frozen, so only `x @ W^T` and the gradient to `x` are
needed, and both can run in the activations' dtype on the int8 weight as stored (`CB` int8
[out, in], `SCB` fp32 row absmax):

- `int8-dequant`: dequantize to the activations' dtype in one pass, then `F.linear` (any device);
- `+triton`: on CUDA GPUs that pass is a Triton kernel running at memory speed, and decoding (a
  few rows) streams the int8 weight through a Triton GEMV instead, never writing a dequantized
  copy;
- `nf4-dequant`: 4-bit layers dequantized per call with bitsandbytes' own kernel, then `F.linear`,
  keeping nothing for backward but the packed weight.

Weights, checkpoints and adapters are unchanged: only the layers' `forward` is replaced. Plain
bitsandbytes stays the reference and the default on CPUs (`kernels="plain"` forces it).
"""

from __future__ import annotations

import os
import types

import torch
import torch.nn.functional as F

from llamalora.config import KERNEL_CHOICES, check_choice
from llamalora.quant.bitsandbytes import is_quantized_layer as is_bnb_layer

_PATCHED = "_llamalora_kernel"
_GEMV_MAX_ROWS = 4  # up to here (decoding one or a few sequences) the GEMV wins


def _dequant_int8(cb: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                  use_triton: bool) -> torch.Tensor:
    """cb * scale (scale = SCB / 127, fp32 [out, 1]) in one pass: fp32 math, `dtype` out."""
    if use_triton and dtype in (torch.bfloat16, torch.float16):
        from llamalora.quant import triton_int8

        return triton_int8.dequant(cb, scale, dtype)
    out = torch.empty(cb.shape, dtype=dtype, device=cb.device)
    return torch.mul(cb, scale, out=out)


def triton_available(device: torch.device) -> bool:
    """Triton kernels run here: a CUDA device and an importable triton (or its interpreter)."""
    if os.environ.get("LLAMALORA_NO_TRITON"):
        return False
    if device.type != "cuda" and not os.environ.get("TRITON_INTERPRET"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# The matmuls are custom ops, opaque to torch.compile: what backward keeps is exactly what
# setup_context saves (the stored weight), never a dequantized copy. As traced code, the compiler
# merged forward's dequantization with backward's and kept 12 GB of bf16 weights for backward.

@torch.library.custom_op("llamalora::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, cb: torch.Tensor, scale: torch.Tensor,
                use_triton: bool) -> torch.Tensor:
    """x [M, K] @ (cb * scale)^T; cb int8 [N, K] as bitsandbytes stores it, scale = SCB / 127.

    Many rows (training, prefill): dequantize the weight to x's dtype in one pass, then cuBLAS;
    that beat a Triton GEMM that converts int8 tiles in registers, at 700 and 2,048 tokens, and
    again at 128-2,048 rows timed as CUDA-graph replays (BENCHMARKS.md). A few rows
    with `use_triton` (decoding on CUDA): a Triton GEMV that streams the int8 weight once and
    writes no dequantized copy.
    """
    if use_triton and x.shape[0] <= _GEMV_MAX_ROWS:
        from llamalora.quant import triton_int8

        return triton_int8.gemv(x.contiguous(), cb, scale)
    return F.linear(x, _dequant_int8(cb, scale, x.dtype, use_triton))


@int8_linear.register_fake
def _(x, cb, scale, use_triton):
    return x.new_empty((x.shape[0], cb.shape[0]))


@torch.library.custom_op("llamalora::int8_linear_grad", mutates_args=())
def int8_linear_grad(grad: torch.Tensor, cb: torch.Tensor, scale: torch.Tensor,
                     use_triton: bool) -> torch.Tensor:
    """The gradient to x of `int8_linear`: grad [M, N] @ (cb * scale)."""
    return grad @ _dequant_int8(cb, scale, grad.dtype, use_triton)


@int8_linear_grad.register_fake
def _(grad, cb, scale, use_triton):
    return grad.new_empty((grad.shape[0], cb.shape[1]))


def _int8_setup(ctx, inputs, output):
    _, cb, scale, ctx.use_triton = inputs
    ctx.save_for_backward(cb, scale)  # the weight as stored: no activation is kept


def _int8_backward(ctx, grad):
    cb, scale = ctx.saved_tensors
    return int8_linear_grad(grad, cb, scale, ctx.use_triton), None, None, None


int8_linear.register_autograd(_int8_backward, setup_context=_int8_setup)


def _dequant_nf4(packed, absmax, blocksize: int, shape: list[int], dtype) -> torch.Tensor:
    return torch.ops.bitsandbytes.dequantize_4bit(packed, absmax, blocksize, "nf4", shape, dtype)


@torch.library.custom_op("llamalora::nf4_linear", mutates_args=())
def nf4_linear(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, blocksize: int,
               out_features: int, in_features: int) -> torch.Tensor:
    """x @ W^T for an NF4 weight, dequantized for this call only by bitsandbytes' own kernel."""
    return F.linear(x, _dequant_nf4(packed, absmax, blocksize, [out_features, in_features],
                                    x.dtype))


@nf4_linear.register_fake
def _(x, packed, absmax, blocksize, out_features, in_features):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("llamalora::nf4_linear_grad", mutates_args=())
def nf4_linear_grad(grad: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                    blocksize: int, out_features: int, in_features: int) -> torch.Tensor:
    """The gradient to x of `nf4_linear`."""
    return grad @ _dequant_nf4(packed, absmax, blocksize, [out_features, in_features],
                               grad.dtype)


@nf4_linear_grad.register_fake
def _(grad, packed, absmax, blocksize, out_features, in_features):
    return grad.new_empty((*grad.shape[:-1], in_features))


def _nf4_setup(ctx, inputs, output):
    _, packed, absmax, ctx.blocksize, ctx.out_features, ctx.in_features = inputs
    ctx.save_for_backward(packed, absmax)


def _nf4_backward(ctx, grad):
    packed, absmax = ctx.saved_tensors
    return (nf4_linear_grad(grad, packed, absmax, ctx.blocksize, ctx.out_features,
                            ctx.in_features), None, None, None, None, None)


nf4_linear.register_autograd(_nf4_backward, setup_context=_nf4_setup)


def _int8_scales(module) -> torch.Tensor | None:
    # bnb moves SCB from the weight to the layer's state on its first forward.
    scb = getattr(module.weight, "SCB", None)
    return scb if scb is not None else getattr(getattr(module, "state", None), "SCB", None)


def _int8_forward(self, x: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    y = int8_linear(x.reshape(-1, shape[-1]), self._llamalora_cb, self._llamalora_scale,
                    self._llamalora_triton and x.dtype in (torch.bfloat16, torch.float16))
    if self.bias is not None:
        y = y + self.bias.to(y.dtype)
    return y.reshape(*shape[:-1], y.shape[-1])


def _nf4_forward(self, x: torch.Tensor) -> torch.Tensor:
    y = nf4_linear(x, self._llamalora_packed, self._llamalora_absmax, self._llamalora_blocksize,
                   self.out_features, self.in_features)
    if self.bias is not None:
        y = y + self.bias.to(y.dtype)
    return y


def _nf4_absmax(quant_state) -> torch.Tensor:
    """The per-block scales in fp32 (double quantization stores them as int8 blocks)."""
    import bitsandbytes.functional as bnbf

    if getattr(quant_state, "nested", False):
        return (bnbf.dequantize_blockwise(quant_state.absmax, quant_state.state2)
                + quant_state.offset).float()
    return quant_state.absmax.float()


def _kind(module) -> str | None:
    if not is_bnb_layer(module):
        return None
    name = type(module).__name__
    if name == "Linear8bitLt" and module.weight.dtype == torch.int8 \
            and _int8_scales(module) is not None:
        return "int8"
    quant_state = getattr(module.weight, "quant_state", None)
    if name == "Linear4bit" and quant_state is not None and quant_state.quant_type == "nf4":
        return "nf4"
    return None


def enable(model: torch.nn.Module, mode: str = "auto") -> str:
    """Replaces the forward of every bitsandbytes base layer with a fast path; says which.

    Args:
        model: A loaded model (peft-wrapped or not); its weights are not touched.
        mode: "auto" (fast on CUDA, plain elsewhere), "fast" (also on the CPU, through the
            torch path) or "plain" (bitsandbytes' own layers).

    Returns:
        The path that runs, e.g. "int8-dequant+triton (224 layers)", "bitsandbytes" or
        "none (no quantized layers)".

    Raises:
        ConfigError: An unknown mode.
    """
    check_choice("kernels", mode, KERNEL_CHOICES)
    layers = [(m, k) for m in model.modules() if (k := _kind(m))]
    if not layers:
        return "none (no quantized layers)"
    device = layers[0][0].weight.device
    if mode == "plain" or (mode == "auto" and device.type != "cuda"):
        disable(model)
        return "bitsandbytes"
    use_triton = triton_available(device)
    names = set()
    for module, kind in layers:
        if kind == "int8":
            # Plain-tensor views of the stored weights (no copy), as buffers: a compiled layer
            # takes buffers as inputs, so one graph serves every layer; non-persistent, so no
            # state dict ever holds them.
            module.register_buffer("_llamalora_cb", module.weight.data.as_subclass(torch.Tensor),
                                   persistent=False)
            module.register_buffer("_llamalora_scale",
                                   (_int8_scales(module).float() / 127).reshape(-1, 1),
                                   persistent=False)
            module._llamalora_triton = use_triton
            module.forward = types.MethodType(_int8_forward, module)
            names.add("int8-dequant" + ("+triton" if use_triton else ""))
        else:
            qs = module.weight.quant_state
            # The view also leaves Params4bit's Python __torch_function__ out of every call.
            module.register_buffer("_llamalora_packed",
                                   module.weight.data.as_subclass(torch.Tensor), persistent=False)
            # fp32 block scales: +4 bytes per 64 weights (~0.5 GB on the 11B) buys a compiled
            # graph free of bitsandbytes' Python objects
            module.register_buffer("_llamalora_absmax", _nf4_absmax(qs), persistent=False)
            module._llamalora_blocksize = qs.blocksize
            module.forward = types.MethodType(_nf4_forward, module)
            names.add("nf4-dequant")
        setattr(module, _PATCHED, True)
    return f"{'+'.join(sorted(names))} ({len(layers)} layers)"


def is_patched(module) -> bool:
    """Whether `enable` gave `module` one of llamalora's paths."""
    return getattr(module, _PATCHED, False)


def disable(model: torch.nn.Module) -> None:
    """Gives every patched layer its bitsandbytes forward back."""
    for module in model.modules():
        if getattr(module, _PATCHED, False):
            del module.forward  # the instance attribute; the class's forward shows again
            delattr(module, _PATCHED)
            for name in ("_llamalora_cb", "_llamalora_scale", "_llamalora_packed",
                         "_llamalora_absmax"):
                module._buffers.pop(name, None)
