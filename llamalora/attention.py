"""Mllama's two costly attentions in an image step, through faster kernels; the same function.

Profiled on an H200 (BENCHMARKS.md, "Records with images"): in an 8-bit image step of the 11B,
the vision tower's self-attention took 411 of the GPU's 737 ms and the cross-attention backward
another 100, both on SDPA's memory-efficient kernel, the one left when a mask is passed.

* Vision tower: every image attends over its 4 tile slots at once (6,432 tokens, 16 heads of 80)
  under a mask that hides a padding token from padding tokens only. cuDNN's attention takes such a
  mask and ran it 2.4x faster (10.5 -> 4.3 ms a layer for 4 images). It is off for training
  (recipe: it plans per shape, and text rows change length every step); here the shape changes
  only with the number of images, so it is asked for around these calls alone.
* Cross-attention: text tokens over image tokens, masked by which images each token may see
  (from its `<|image|>` on; in a packed row, only its own record's). Runs of tokens that see the
  same image tiles attend to exactly those tiles' tokens, without a mask: hidden keys weigh
  exactly 0 in the softmax, so leaving them out changes only the order of a sum. That lets
  flash attention run each run, and skips the keys a packed row's other records own: 9x faster
  forward and backward on a 6-record row (benchmarks/attention_speed.py). The runs come from the
  batch's cross-attention mask on the host (`CrossAttentionRuns.from_mask`), so the step reads
  nothing back from the GPU. A static row (CUDA graphs, `step._static_loss_sum`) cannot carry
  runs, which depend on the data, so it takes the dense mask through cuDNN's kernel, whose plan
  the row's fixed shape keeps (7x the memory-efficient kernel's speed, forward and backward, on
  the 6-record row; the runs' flash calls are 1.3x faster still).

Both plug into transformers' attention interface under their own names, set on the vision
tower's config and on copies of the text config held by the cross-attention layers only; the
self-attention layers keep the model's own. Training's batches carry their runs (made in
`recipe.StepBatches.make`); without runs (chat's `generate`, whose text grows) cross-attention
is transformers' SDPA as before.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from dataclasses import dataclass

VISION = "llamalora_vision_sdpa"
CROSS = "llamalora_cross_runs"
# Set as the runs of a static row: the dense mask, on cuDNN (see the module's docstring).
DENSE = "dense"
# The runs of the micro-batch whose forward is running (set by `step.loss_sum`).
_RUNS: contextvars.ContextVar = contextvars.ContextVar("llamalora_cross_runs", default=None)


@dataclass
class CrossAttentionRuns:
    """Per batch row, its text tokens as runs [start, end) that see the same image tiles, each
    with the tile slots (image x max tiles + tile) it sees; and how many slots a row has."""

    rows: list
    slots: int

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


@contextlib.contextmanager
def cross_attention_runs(runs: CrossAttentionRuns | str | None):
    """The runs `_cross_attention` uses during this forward (`step.loss_sum` sets them), or
    DENSE."""
    token = _RUNS.set(runs)
    try:
        yield
    finally:
        _RUNS.reset(token)


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

    runs = _RUNS.get()
    if runs == DENSE:
        return _cudnn_first(module, query, key, value, attention_mask, **kwargs)
    if runs is None or len(runs.rows) != query.shape[0] or key.shape[2] % runs.slots:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    per_tile = key.shape[2] // runs.slots
    out = []
    for b, row in enumerate(runs.rows):
        parts = []
        for start, end, slots in row:
            if slots is None:  # sees no image: its output is zeroed after o_proj anyway
                # (models.mask_imageless_cross_attention), so none is computed
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


def use_fast_mllama_attention(model) -> int:
    """Routes a loaded Mllama's vision attention and cross-attention through the functions
    above; returns how many attention modules now use them (0 for a model without either)."""
    from transformers import AttentionInterface

    AttentionInterface.register(VISION, _cudnn_first)  # an image's shape repeats
    AttentionInterface.register(CROSS, _cross_attention)
    changed = 0
    configs = {}
    for module in model.modules():
        name = type(module).__name__
        if name not in ("MllamaVisionAttention", "MllamaTextCrossAttention"):
            continue
        if getattr(module.config, "_attn_implementation", None) not in ("sdpa", VISION, CROSS):
            continue  # eager or flash: what the user asked for stays
        implementation = VISION if name == "MllamaVisionAttention" else CROSS
        key = (id(module.config), implementation)
        if key not in configs:
            configs[key] = copy.copy(module.config)
            configs[key]._attn_implementation_internal = implementation
        module.config = configs[key]
        changed += 1
    return changed
