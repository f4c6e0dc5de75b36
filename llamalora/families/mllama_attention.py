"""Mllama's two costly attentions in an image step, through faster kernels; the same function.

Profiled (BENCHMARKS.md, "Records with images"): in an 8-bit image step of the 11B,
the vision tower's self-attention took 411 of the GPU's 737 ms and the cross-attention backward
another 100, both on SDPA's memory-efficient kernel, the one left when a mask is passed.

* Vision tower: every image attends over its 4 tile slots at once (6,432 tokens, 16 heads of 80)
  under a mask that hides a padding token from padding tokens only: a real token sees every
  token, a padding one (a padding tile's, or one of the 7 after each tile's 1,601 patches) the
  real ones. On CUDA that is one unmasked varlen flash call (`_split_by_padding`): the image's
  tokens reordered real first, then two sequences an image, its real tokens over all its tokens
  and its padding tokens over its real ones; the keys the mask hides are never read. In an
  8-bit image step of the 11B (4 images of [4 tile slots x 1,608 tokens], 16 heads of 80) that
  call took 2.26 ms a layer, cuDNN's kernel with the mask 4.12 (BENCHMARKS.md).
  Each of the tower's two encoders puts its tokens in that order once, for all its layers
  (`_encoder_in_padding_order`). In a CUDA graph's passes the call is FlashAttention-4's where
  that package is installed (`_varlen_kernel`), else torch's. Elsewhere (CPU, fp32)
  cuDNN-first SDPA with the mask.
* Cross-attention: text tokens over image tokens, masked by which images each token may see
  (from its `<|image|>` on; in a packed row, only its own record's). Runs of tokens that see the
  same image tiles attend to exactly those tiles' tokens, without a mask: hidden keys weigh
  exactly 0 in the softmax, so leaving them out changes only the order of a sum. That lets
  flash attention run each run, and skips the keys a packed row's other records own: 9x faster
  forward and backward on a 6-record row (benchmarks/attention_speed.py). The runs come from the
  batch's cross-attention mask on the host (`CrossAttentionRuns.from_mask`), so the step reads
  nothing back from the GPU. A static row (CUDA graphs, `attention.static_forward`) cannot carry
  runs, which depend on the data, so it takes the dense mask through cuDNN's kernel, whose plan
  the row's fixed shape keeps (7x the memory-efficient kernel's speed, forward and backward, on
  the 6-record row; the runs' flash calls are 1.3x faster still), with each key and value head
  shared by its query heads (`enable_gqa`) rather than repeated to all 32, as transformers does
  before a masked kernel: the repeated copies were what backward kept.

Both plug into transformers' attention interface under their own names, set on the vision
tower's config and on copies of the text config held by the cross-attention layers only.
Training's batches carry their runs (made with the batch, `families.mllama.MllamaBatches`), which
are entered around the forward; without runs (chat's `generate`, whose text grows)
cross-attention is transformers' SDPA.
"""

from __future__ import annotations

import contextvars
import copy
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

from llamalora.attention import TEXT, in_graph_capture, in_static_forward
from llamalora.errors import first_line

VISION = "llamalora_vision_sdpa"
CROSS = "llamalora_cross_runs"
# The runs of the micro-batch whose forward is running (entered around it by `step.loss_sum`).
_RUNS: contextvars.ContextVar = contextvars.ContextVar("llamalora_cross_runs", default=None)


@dataclass
class CrossAttentionRuns:
    """Per batch row, its text tokens as runs [start, end) that see the same image tiles, each
    with the tile slots (image x max tiles + tile) it sees; and how many slots a row has.

    A batch carries its runs as its forward context (`packing.FORWARD_CONTEXT`): `with runs:`
    makes `_cross_attention` use them."""

    rows: list
    slots: int
    _tokens: list = field(default_factory=list, repr=False, compare=False)

    def __enter__(self) -> "CrossAttentionRuns":
        self._tokens.append(_RUNS.set(self))
        return self

    def __exit__(self, *exc) -> None:
        _RUNS.reset(self._tokens.pop())

    @classmethod
    def from_mask(cls, mask) -> "CrossAttentionRuns":
        """From a dense cross-attention mask [rows, text tokens, images, tiles] (host array)."""
        import numpy as np

        mask = np.asarray(mask).astype(bool)
        rows = []
        for row in mask:
            flat = row.reshape(row.shape[0], -1)  # [tokens, image x tile slots]
            change = np.flatnonzero((flat[1:] != flat[:-1]).any(axis=1)) + 1
            bounds = [0, *change.tolist(), flat.shape[0]]
            rows.append([(a, b, np.flatnonzero(flat[a]).tolist())
                         for a, b in zip(bounds[:-1], bounds[1:])])
        return cls(rows, mask.shape[2] * mask.shape[3])

    def to(self, device) -> "CrossAttentionRuns":
        """The runs with their slots ready for `device`: None (no image), a slice of slots when
        they are consecutive, else a tensor of slots, copied now (with the batch, before the
        step runs) rather than from inside the forward."""
        import torch

        def ready(slots):
            if not slots:
                return None
            if slots == list(range(slots[0], slots[-1] + 1)):
                return slice(slots[0], slots[-1] + 1)
            return torch.tensor(slots, dtype=torch.long).to(device)

        return CrossAttentionRuns([[(a, b, ready(s)) for a, b, s in row] for row in self.rows],
                                  self.slots)


def _keys(tensor, b: int, slots, per_tile: int):
    """Row b's image tokens of these tile slots."""
    import torch

    if isinstance(slots, slice):
        return tensor[b:b + 1, :, slots.start * per_tile:slots.stop * per_tile]
    index = (slots[:, None] * per_tile + torch.arange(per_tile, device=slots.device)).reshape(-1)
    return tensor[b:b + 1].index_select(2, index)


def _cross_attention(module, query, key, value, attention_mask, **kwargs):
    """Cross-attention run by run (see the module's docstring); SDPA when no runs are set."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if in_static_forward():  # a static row: no runs, the dense mask on cuDNN
        return _dense_cross(module, query, key, value, attention_mask, **kwargs)
    runs = _RUNS.get()
    if runs is None or len(runs.rows) != query.shape[0] or key.shape[2] % runs.slots:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    per_tile = key.shape[2] // runs.slots
    out = []
    for b, row in enumerate(runs.rows):
        parts = []
        for start, end, slots in row:
            if slots is None:  # sees no image: its output is zeroed after o_proj anyway
                # (mllama.mask_imageless_cross_attention), so none is computed
                parts.append(query.new_zeros(1, end - start, query.shape[1], query.shape[3]))
                continue
            part, _ = sdpa_attention_forward(
                module, query[b:b + 1, :, start:end], _keys(key, b, slots, per_tile),
                _keys(value, b, slots, per_tile), None, is_causal=False, **kwargs)
            parts.append(part)
        out.append(torch.cat(parts, dim=1))
    return torch.cat(out, dim=0), None


def _cudnn_first(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA with cuDNN's kernel first on CUDA (SDPA's choice elsewhere). The
    recipe turns cuDNN's attention off for the rest of the model: its plan is per shape."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.device.type != "cuda":
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                      SDPBackend.MATH], set_priority=True):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _dense_cross(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                 **kwargs):
    """A static row's cross-attention: the dense mask on cuDNN, key and value heads shared by
    their query heads (see the module's docstring); `_cudnn_first` off CUDA or without GQA."""
    if query.device.type != "cuda" or key.shape[1] == query.shape[1]:
        return _cudnn_first(module, query, key, value, attention_mask, dropout=dropout,
                            scaling=scaling, **kwargs)
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if attention_mask is not None and attention_mask.ndim == 4:  # as transformers' SDPA does
        attention_mask = attention_mask[:, :, :, :key.shape[-2]]
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                      SDPBackend.MATH], set_priority=True):
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask,
            dropout_p=dropout if module.training else 0.0, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def _vision_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      **kwargs):
    """The vision tower's attention: `_split_by_padding` through flash attention on CUDA in
    half precision, where nothing needs its gradient (the tower is frozen and runs without
    autograd); else `_cudnn_first` with the mask. Inside an encoder that already put its tokens
    in padding order (`_encoder_in_padding_order`), the kernel reads them as they are."""
    import torch

    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    split = _SORTED.get()
    if split is not None:  # the encoder checked what the condition below checks
        images, heads, length, dim = query.shape
        return _attend(query, key, value, split, scale, _varlen_kernel(query.device)).view(
            images, length, heads, dim), None
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if dropout or not _takes_flash(query, attention_mask, needs_grad):
        return _cudnn_first(module, query, key, value, attention_mask, dropout=dropout,
                            scaling=scaling, **kwargs)
    return _split_by_padding(query, key, value, attention_mask, scale,
                             _varlen_kernel(query.device)), None


def _takes_flash(tensor, attention_mask, needs_grad: bool) -> bool:
    """Where the vision attention's flash path runs: CUDA, half precision, an additive mask
    (the padding is read from it), nothing needing a gradient."""
    import torch

    return (tensor.device.type == "cuda" and tensor.dtype in (torch.bfloat16, torch.float16)
            and attention_mask is not None and attention_mask.dtype != torch.bool
            and not needs_grad)


# The padding split of the encoder whose forward is running, its tokens already in that order.
_SORTED: contextvars.ContextVar = contextvars.ContextVar("llamalora_vision_sorted",
                                                         default=None)


@dataclass
class _PaddingSplit:
    """Mllama's vision tokens real first, and the varlen sequences `_split_by_padding` runs:
    `index` the flat token order (tokens of image i at i x length ...), the rest as `kernel`
    takes them (see `_split_by_padding`). All device tensors of fixed shape."""

    index: object
    cu_q: object
    cu_k: object
    used_k: object
    length: int

    @classmethod
    def from_mask(cls, attention_mask) -> "_PaddingSplit":
        """From the additive mask [images, 1, tokens, tokens], which hides a key from a query
        only where both are padding: a token is padding where its diagonal entry hides it."""
        import torch

        images, length = attention_mask.shape[0], attention_mask.shape[-1]
        device = attention_mask.device
        pad = attention_mask[:, 0].diagonal(dim1=-2, dim2=-1) < 0  # [images, tokens]
        order = torch.sort(pad.to(torch.uint8), dim=1, stable=True).indices  # real first
        starts = torch.arange(images, device=device, dtype=torch.int32) * length
        real = (~pad).sum(1, dtype=torch.int32)
        # Two sequences an image: its real queries over all its tokens, its padding queries
        # over its real tokens (the first `real` of its reordered tokens).
        end = torch.full((1,), images * length, device=device, dtype=torch.int32)
        return cls(index=(order + starts[:, None]).reshape(-1),
                   cu_q=torch.cat([torch.stack([starts, starts + real], 1).reshape(-1), end]),
                   cu_k=torch.cat([torch.stack([starts, starts], 1).reshape(-1), end]),
                   used_k=torch.stack([torch.full_like(real, length), real], 1).reshape(-1),
                   length=length)

    def inverse(self):
        """The flat order that puts tokens in this order back in the model's."""
        import torch

        return torch.empty_like(self.index).scatter_(
            0, self.index, torch.arange(self.index.numel(), device=self.index.device))


def _attend(query, key, value, split: _PaddingSplit, scale, kernel):
    """`kernel` over query/key/value [images, heads, tokens, dim] whose tokens are in `split`'s
    order; returns [images x tokens, heads, dim] in that order."""
    images, heads, length, dim = query.shape

    def tokens(t):  # a view: transformers made these by transposing [images, tokens, heads, dim]
        return t.transpose(1, 2).reshape(images * length, heads, dim)

    return kernel(tokens(query), tokens(key), tokens(value), split.cu_q, split.cu_k,
                  split.used_k, split.length, scale)


def _split_by_padding(query, key, value, attention_mask, scale, kernel):
    """Mllama's vision attention without its mask (see the module's docstring), for one layer:
    its tokens put in padding order and back.

    query/key/value [images, heads, tokens, dim]; attention_mask as `_PaddingSplit.from_mask`
    reads it. Every shape here is fixed by the inputs' (a CUDA graph can hold it). An image with
    no real token (a padding image slot) gets zeros, where the mask gave the mean of its values;
    the cross-attention mask hides such an image from every text token. Returns [images, tokens,
    heads, dim], as transformers' attention functions do.

    `kernel(q, k, v, cu_q, cu_k, used_k, max_len, scale)`: varlen attention over tokens
    [n, heads, dim], sequence i's queries q[cu_q[i]:cu_q[i+1]] over its keys
    k[cu_k[i]:cu_k[i] + used_k[i]].
    """
    images, heads, length, dim = query.shape
    split = _PaddingSplit.from_mask(attention_mask)

    def sort(t):
        return t.transpose(1, 2).reshape(images * length, heads, dim).index_select(
            0, split.index).view(images, length, heads, dim).transpose(1, 2)

    out = _attend(sort(query), sort(key), sort(value), split, scale, kernel)
    return out.index_select(0, split.inverse()).view(images, length, heads, dim)


class _InModelOrder(Sequence):
    """An encoder's per-layer hidden states, kept in padding order and put back in the model's
    order only when read: Mllama reads 5 of the local encoder's 32, none of the global's 8."""

    def __init__(self, states, unsort):
        self._states, self._unsort = states, unsort

    def __len__(self):
        return len(self._states)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return tuple(self._unsort(s) for s in self._states[i])
        return self._unsort(self._states[i])


def _sortable(encoder, hidden_states, attention_mask) -> bool:
    """`_takes_flash`, checked once for all the encoder's layers (no gradient anywhere inside),
    each layer's attention being `_vision_attention` (a user may set another), and a 4-d mask
    over these tokens."""
    import torch

    needs_grad = torch.is_grad_enabled() and (
        hidden_states.requires_grad or any(p.requires_grad for p in encoder.parameters()))
    return (_takes_flash(hidden_states, attention_mask, needs_grad)
            and all(layer.self_attn.config._attn_implementation == VISION
                    for layer in encoder.layers)
            and hidden_states.ndim == 3 and attention_mask.ndim == 4
            and attention_mask.shape[-1] == hidden_states.shape[1])


def _encoder_in_padding_order(encoder) -> None:
    """Runs a vision encoder's layers on its tokens put in padding order once, rather than each
    layer's attention reordering them (`_split_by_padding`): everything else in a layer works
    token by token. In an 8-bit image step of the 11B the per-layer gathers and scatters were
    ~8 ms of GPU time (BENCHMARKS.md). Where `_vision_attention` would not take
    its flash path, the encoder runs as transformers wrote it."""
    forward = encoder.forward

    @functools.wraps(forward)
    def sorted_forward(hidden_states, attention_mask=None, **kwargs):
        if not _sortable(encoder, hidden_states, attention_mask):
            return forward(hidden_states, attention_mask=attention_mask, **kwargs)
        images, length, dim = hidden_states.shape
        split = _PaddingSplit.from_mask(attention_mask)
        back = split.inverse()

        def unsort(h):
            return h.reshape(images * length, -1).index_select(0, back).view(h.shape)

        token = _SORTED.set(split)
        try:
            out = forward(hidden_states.reshape(images * length, dim).index_select(
                0, split.index).view(images, length, dim), attention_mask=attention_mask,
                **kwargs)
        finally:
            _SORTED.reset(token)
        out.last_hidden_state = unsort(out.last_hidden_state)
        if out.hidden_states is not None:
            out.hidden_states = _InModelOrder(out.hidden_states, unsort)
        return out

    encoder.forward = sorted_forward
    encoder._llamalora_padding_order = True


def _flash_varlen(q, k, v, cu_q, cu_k, used_k, max_len, scale):
    """`_split_by_padding`'s kernel: flash attention's varlen forward, each sequence's key count
    given apart from its start (`seqused_k`), which lets two sequences share keys."""
    import torch

    return torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_len, max_len, 0.0, False, False, scale=scale,
        seqused_k=used_k)[0]


def _fa4_varlen(q, k, v, cu_q, cu_k, used_k, max_len, scale):
    """`_flash_varlen`'s function through FlashAttention-4 (the `flash-attn-4` package), whose
    Hopper kernel is FlashAttention-3's design (asynchronous copies, warpgroup MMAs), which
    torch's flash attention (FlashAttention-2) lacks: 1.68-1.74 against 3.11-3.12 ms a layer of
    4 images, captured and replayed (benchmarks/attention_speed.py)."""
    from flash_attn.cute.interface import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                  max_seqlen_q=max_len, max_seqlen_k=max_len, seqused_k=used_k,
                                  softmax_scale=scale)[0]  # (out, lse)


def _varlen_kernel(device):
    """The vision attention's varlen kernel: in a graph's passes (`attention.graph_kernels`),
    FlashAttention-4's where it runs (`_fa4_runs_on`), else torch's. Eager steps and chat keep
    torch's: on eager padded image steps FlashAttention-4 measured no faster, and they would pay
    its import (seconds: it loads a compiler) and first compile for nothing."""
    return _fa4_varlen if in_graph_capture() and _fa4_runs_on(device) else _flash_varlen


def _fa4_runs_on(device) -> bool:
    """FlashAttention-4 runs on `device` (`_fa4_problem` says why not)."""
    return _fa4_problem(device) is None


@functools.cache
def _fa4_problem(device) -> str | None:
    """Why FlashAttention-4 does not run on `device`, or None where it does: CUDA of compute
    capability 9 (Hopper) or newer, the package installed (`pip install 'llamalora[fa4]'`) and
    importable, LLAMALORA_NO_FA4 unset. Read once a device: the import loads its compiler
    (seconds)."""
    import importlib.util
    import os
    import warnings

    import torch

    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return "not a Hopper or newer GPU"
    if os.environ.get("LLAMALORA_NO_FA4"):
        return "LLAMALORA_NO_FA4 is set"
    if importlib.util.find_spec("flash_attn") is None:
        return "not installed"
    # Its compile cache on disk, off unless asked: a later run can load the kernels an earlier
    # one compiled (its documented behaviour; the time saved is not measured here).
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    try:  # a flash_attn without cute is FlashAttention-2's package
        importlib.import_module("flash_attn.cute.interface")
    except Exception as exc:  # a beta over native libraries: any failure means torch's

        return f"flash_attn.cute did not import ({first_line(exc)})"
    # Printed at each compile, about an argument the compiler treats as a constant anyway.
    warnings.filterwarnings("ignore", message=r"Argument \w+ \(position \d+\) cannot be "
                            r"converted to a JitArgument", category=UserWarning)
    return None


def vision_attention_kernel(device, graphs: bool) -> str:
    """Which kernel the vision tower's attention runs, for the start-of-run line; in a graphed
    run without FlashAttention-4, why (not installed, did not import, ...)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return "SDPA"
    if not graphs:
        return "torch flash attention"
    problem = _fa4_problem(device)
    if problem is None:
        return "FlashAttention-4 (CUDA graphs)"
    return f"torch flash attention (FlashAttention-4: {problem})"


def use_fast_attention(model) -> int:
    """Routes a loaded Mllama's vision attention and cross-attention through the functions
    above; returns how many attention modules now use them (0 for a model without either)."""
    from transformers import AttentionInterface

    AttentionInterface.register(VISION, _vision_attention)
    AttentionInterface.register(CROSS, _cross_attention)
    changed = 0
    configs = {}
    for module in model.modules():
        name = type(module).__name__
        if name not in ("MllamaVisionAttention", "MllamaTextCrossAttention"):
            continue
        if getattr(module.config, "_attn_implementation", None) not in ("sdpa", VISION, CROSS,
                                                                         TEXT):
            continue  # eager or flash: what the user asked for stays
        implementation = VISION if name == "MllamaVisionAttention" else CROSS
        key = (id(module.config), implementation)
        if key not in configs:
            configs[key] = copy.copy(module.config)
            configs[key]._attn_implementation_internal = implementation
        module.config = configs[key]
        changed += 1
    for module in model.modules():  # each checks its layers' attention when it runs
        if (type(module).__name__ == "MllamaVisionEncoder"
                and not getattr(module, "_llamalora_padding_order", False)):
            _encoder_in_padding_order(module)
    return changed
