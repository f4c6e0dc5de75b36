"""Training's text self-attention over packed records, for every model family, and the flags a
family's own attention kernels read (a CUDA graph's capture, a forward of fixed shapes).

Text self-attention in training (`use_varlen_text_attention`): a packed row's records attend
each to itself through flash attention's varlen kernel, given their cumulative lengths
(`cu_seqlens`, made on the host with the batch), so no [L, L] mask exists at any length; a
dense boolean mask over L tokens is L^2 bytes (1 GiB at 32k tokens) and keeps SDPA off its
flash kernel: one layer's forward and backward over 4 records of 10.6k tokens took 3.36 ms
on the kernel against 24.66 ms on SDPA with the mask (BENCHMARKS.md, "Long records").
The kernel is torch's aten op, which shares each key head among its query heads (torch
2.11's `varlen_attn` has no `enable_gqa`). The lengths reach every layer as model keyword
arguments (`varlen_kwargs`), which a checkpointed layer's recompute and a CUDA graph's
capture both keep. The implementation has no mask function of its own, so transformers
builds no mask and does not search the position ids for records (a wait for the GPU). Off
CUDA or outside half precision the same lengths give a dense mask for SDPA
(`sequence_mask`), the reference the tests hold the kernel to.

The rotary embedding (M-RoPE included) is applied before the attention function is called, so
the same function serves any position scheme: only which tokens see which changes here.
"""

from __future__ import annotations

import contextlib
import contextvars

TEXT = "llamalora_text_varlen"

# Set while a CUDA graph's passes are warmed up and captured (`graph_kernels`).
_GRAPHED: contextvars.ContextVar = contextvars.ContextVar("llamalora_graphed", default=False)
# Set around a forward whose every shape is fixed by the batch's padded shape (`static_forward`).
_STATIC: contextvars.ContextVar = contextvars.ContextVar("llamalora_static", default=False)


@contextlib.contextmanager
def _raised(flag: contextvars.ContextVar):
    token = flag.set(True)
    try:
        yield
    finally:
        flag.reset(token)


def graph_kernels():
    """Marks the warm-up passes and the capture of a CUDA graph (`step.GraphedStep` wraps them):
    a family's attention may pick a kernel there that an eager step would not (one whose import
    and first compile only a replayed graph pays back)."""
    return _raised(_GRAPHED)


def in_graph_capture() -> bool:
    """Whether `graph_kernels` is in force."""
    return _GRAPHED.get()


def static_forward():
    """Marks a forward whose every shape is fixed (`step`'s static rows, which a CUDA graph may
    hold): attention that would choose its work by the data's values (which records see which
    image) takes its fixed-shape path instead."""
    return _raised(_STATIC)


def in_static_forward() -> bool:
    """Whether `static_forward` is in force."""
    return _STATIC.get()


# The keyword arguments that carry a row's records to `_text_attention` (`varlen_kwargs`).
_CU_SEQLENS = "llamalora_cu_seqlens"
_MAX_SEQLEN = "llamalora_max_seqlen"
_VARLEN_FLAG = "_llamalora_varlen_text"  # set on the model by `use_varlen_text_attention`


def varlen_kwargs(cu_seqlens, max_seqlen: int) -> dict:
    """The model keyword arguments that make the text self-attention layers attend each record
    of a packed row to itself: `cu_seqlens` int32 [records + 1] on the device, the rows'
    tokens flattened (record i is tokens cu[i]:cu[i+1]; trailing zero-length records are
    allowed), `max_seqlen` at least the longest record (flash attention's grid)."""
    return {_CU_SEQLENS: cu_seqlens, _MAX_SEQLEN: int(max_seqlen)}


def uses_varlen_text_attention(model) -> bool:
    """Whether `model`'s text self-attention layers run `_text_attention`
    (`use_varlen_text_attention`)."""
    return getattr(model, _VARLEN_FLAG, False)


def sdpa_or_own(config) -> str:
    """A config's attention implementation, with training's text attention read as SDPA,
    which it is for a forward given a mask and no `varlen_kwargs` (a decoding step)."""
    attn = getattr(config, "_attn_implementation", "sdpa")
    return "sdpa" if attn == TEXT else attn


def use_varlen_text_attention(model, enable: bool = True) -> int:
    """Routes a training model's text self-attention (every causal self-attention layer) through
    `_text_attention` (`enable=False`: back to SDPA); returns how many layers that is. Layers on
    another implementation than SDPA (eager, a flash package a user chose) keep theirs.

    Only for training: a forward of this model without `varlen_kwargs` attends causally over
    each row, which is exact for one record or right-padded rows (`batching.collate`), but a
    2D padding mask passed to the model is ignored (transformers makes no mask for this
    implementation); a 4D mask, as a decoding step passes, is used as SDPA would.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(TEXT, _text_attention)
    before, after = ("sdpa", TEXT) if enable else (TEXT, "sdpa")
    layers = [m for m in model.modules() if getattr(m, "is_causal", False) is True
              and getattr(getattr(m, "config", None), "_attn_implementation", None) == before]
    for layer in layers:
        # the text model's own config, which its mask creation reads, is this same object
        layer.config._attn_implementation_internal = after
    if layers or not enable:
        setattr(model, _VARLEN_FLAG, enable)
    return len(layers)


def _text_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                    **kwargs):
    """Causal self-attention per record of the packed rows `varlen_kwargs` describe; without
    them, transformers' SDPA (causal over each row).

    query [rows, heads, L, dim], key/value [rows, key heads, L, dim] (grouped-query: each key
    head serves heads / key heads query heads, never repeated here); returns [rows, L, heads,
    dim], as transformers' attention functions do.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_seqlens, max_seqlen = kwargs.pop(_CU_SEQLENS, None), kwargs.pop(_MAX_SEQLEN, None)
    if cu_seqlens is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    rows, heads, length, dim = query.shape
    scale = scaling if scaling is not None else dim ** -0.5
    dropout = dropout if module.training else 0.0

    def tokens(t):  # [rows, h, L, d] -> [rows x L, h, d]: a view for one row
        return t.transpose(1, 2).reshape(rows * length, t.shape[1], dim)

    q, k, v = tokens(query), tokens(key), tokens(value)
    if _takes_text_flash(q) and not dropout:
        out = _flash_text(q, k, v, cu_seqlens, max_seqlen, scale)
    else:
        out = _masked_text(q, k, v, cu_seqlens, scale, dropout)
    return out.reshape(rows, length, heads, dim), None


def _takes_text_flash(tensor) -> bool:
    """Flash attention's kernel runs these tokens: CUDA, half precision, a head width it has
    (up to 256, a multiple of 8)."""
    import torch

    dim = tensor.shape[-1]
    return (tensor.device.type == "cuda" and tensor.dtype in (torch.bfloat16, torch.float16)
            and dim <= 256 and dim % 8 == 0)


def _flash_text(q, k, v, cu_seqlens, max_seqlen: int, scale: float):
    """Causal varlen flash attention over tokens [n, heads, dim], key heads fewer than query
    heads allowed; differentiable."""
    import torch

    return torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, True, False,
        scale=scale)[0]


def sequence_mask(cu_seqlens, length: int):
    """[1, 1, L, L] boolean from `cu_seqlens` over L tokens: each token sees the earlier tokens
    of its own record. Made on the device from the lengths, without reading them back."""
    import torch

    positions = torch.arange(length, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    record = torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)
    causal = torch.ones(length, length, dtype=torch.bool, device=cu_seqlens.device).tril()
    return ((record[:, None] == record[None, :]) & causal)[None, None]


def _masked_text(q, k, v, cu_seqlens, scale: float, dropout: float):
    """`_flash_text` through SDPA and `sequence_mask` (any device and dtype), with dropout."""
    import torch.nn.functional as F

    def heads_first(t):
        return t.transpose(0, 1)[None]

    out = F.scaled_dot_product_attention(
        heads_first(q), heads_first(k), heads_first(v),
        attn_mask=sequence_mask(cu_seqlens, q.shape[0]), dropout_p=dropout, scale=scale,
        enable_gqa=True)
    return out[0].transpose(0, 1)
