"""Llama 3.2 Vision (Mllama): a Llama 3.1 language model with cross-attention layers that read a
vision tower's image states.

Two views of one checkpoint:

* text only: `AutoModelForCausalLM` builds `MllamaForCausalLM`, whose decoder is
  `model.layers.*`; the vision weights in the checkpoint are left unread, and a text forward
  skips the cross-attention layers.
* with images: `MllamaForConditionalGeneration`, with the decoder at
  `model.language_model.layers.*` next to `model.vision_model` and `model.multi_modal_projector`.

An image is `<|image|>` in the text and its tiles beside it; a cross-attention mask says which
text tokens see which tiles (from the image's `<|image|>` on). The tower and projector are never
quantized and run without autograd; LoRA goes on the language model only.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

from llamalora.config import DEFAULT_MODEL
from llamalora.families import mllama_attention
from llamalora.families.base import Family, TextBatches
from llamalora.packing import (FORWARD_CONTEXT, Tokenized, collate, load_images, pack,
                               pack_padded, with_loss_index)

VISION_PARTS = ("vision_model", "multi_modal_projector")
IMAGE_TOKEN_ID = 128256  # <|image|>, where a batch is made without the model's config


class MllamaBatches(TextBatches):
    """Mllama's batches: its records' images as tiles beside the text, the cross-attention mask
    that lets each text token see the images before it in its record, and the mask's runs
    (`mllama_attention.CrossAttentionRuns`), read from it on the host, as the forward's context.
    """

    def __init__(self, model=None, image_processor=None):
        super().__init__(model, image_processor)
        config = _config_of(model)
        self.image_token_id = getattr(config, "image_token_index", IMAGE_TOKEN_ID)

    def packed(self, items: list[Tokenized]) -> dict:
        if self.image_processor is None:
            return super().packed(items)
        batch = with_loss_index(self.pack_images(items), [len(t) for t in items])
        return _with_runs(batch)

    def padded(self, items: list[Tokenized], pad_id: int) -> dict:
        batch = collate(items, pad_id)
        if self.image_processor is not None:
            self.add_images(batch, [t.images for t in items])
        return _with_runs(with_loss_index(batch))

    def static(self, items: list[Tokenized], pad_id: int) -> dict:
        """`packing.pack_padded` with the row's images: its N images' inputs, and the
        cross-attention mask [1, L, N, tiles] with the padding seeing no image, so the shapes
        depend on `packing.static_shape` only. A static row carries no runs: its
        cross-attention takes the dense mask (`attention.static_forward`)."""
        import torch.nn.functional as F

        if self.image_processor is None:
            return super().static(items, pad_id)
        packed = self.pack_images(items)
        row = pack_padded(items, pad_id, packed)
        if "cross_attention_mask" in packed:
            pad = row["input_ids"].shape[1] - packed["input_ids"].shape[1]
            row.update({k: packed[k] for k in ("pixel_values", "aspect_ratio_ids",
                                               "aspect_ratio_mask")})
            row["cross_attention_mask"] = F.pad(packed["cross_attention_mask"],
                                                (0, 0, 0, 0, 0, pad))
        return row

    def prompt(self, prompts: list[list[int]], pad_id: int, images: list[Path] = ()) -> dict:
        batch = super().prompt(prompts, pad_id)
        if images:
            if len(prompts) != 1:
                raise ValueError("images go with a single prompt")
            self.add_images(batch, [list(images)])
        return batch

    def add_images(self, batch: dict, image_lists: list[list[Path]]) -> dict:
        """Adds the image inputs to a padded batch, in place: pixel values (tiles), aspect
        ratios, and the cross-attention mask. Rows without an image get a blank one (the
        processor wants one per row); the mask keeps every token of such a row from it."""
        from PIL import Image
        from transformers.models.mllama.processing_mllama import get_cross_attention_token_mask

        if not any(image_lists):
            return batch
        rows = [load_images(paths) or [Image.new("RGB", (32, 32))] for paths in image_lists]
        sparse = [get_cross_attention_token_mask(row.tolist(), self.image_token_id)
                  for row in batch["input_ids"]]
        return self._set_image_inputs(batch, rows, sparse)

    def pack_images(self, items: list[Tokenized]) -> dict:
        """`packing.pack` with the records' images side by side on the image axis, and a
        cross-attention mask that is block-diagonal by record.

        Each record's tokens see only its own images, from each image's `<|image|>` on (Mllama's
        rule, applied within the record); a record without an image sees none, and its tokens
        get nothing from the cross-attention layers (`mask_imageless_cross_attention`), exactly
        as in a padded batch. Only real images reach the vision tower: no blank image for a text
        record and no padding image slots, which a padded batch of uneven image counts computes.
        """
        from transformers.models.mllama.processing_mllama import get_cross_attention_token_mask

        batch = pack(items)
        images = [p for t in items for p in t.images]
        if not images:
            return batch
        spans, offset = [], 0
        for t in items:
            for first, end in get_cross_attention_token_mask(list(t.input_ids),
                                                             self.image_token_id):
                spans.append([offset + first, offset + (len(t) if end == -1 else end)])
            offset += len(t)
        return self._set_image_inputs(batch, [load_images(images)], [spans])

    def _set_image_inputs(self, batch: dict, rows: list, sparse: list) -> dict:
        """The image inputs for `rows` (one list of images per batch row), with `sparse` the
        per-row, per-image [first, end) token spans that see the image."""
        import numpy as np
        import torch
        from transformers.models.mllama.processing_mllama import (
            convert_sparse_cross_attention_mask_to_dense)

        processor = self.image_processor
        feats = processor(images=rows, return_tensors="pt")
        dense = convert_sparse_cross_attention_mask_to_dense(
            sparse, num_tiles=feats.pop("num_tiles"), max_num_tiles=processor.max_image_tiles,
            length=batch["input_ids"].shape[1])
        batch.update(pixel_values=feats["pixel_values"],
                     aspect_ratio_ids=feats["aspect_ratio_ids"],
                     aspect_ratio_mask=feats["aspect_ratio_mask"],
                     cross_attention_mask=torch.from_numpy(np.asarray(dense)))
        return batch


def _with_runs(batch: dict) -> dict:
    """The batch's cross-attention runs, read here on the host, not by the step on the GPU."""
    if "cross_attention_mask" in batch:
        batch[FORWARD_CONTEXT] = mllama_attention.CrossAttentionRuns.from_mask(
            batch["cross_attention_mask"])
    return batch


def _config_of(model):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, "config", None)


def mask_imageless_cross_attention(model) -> int:
    """Gives text tokens that see no image nothing from the cross-attention layers; returns how
    many layers it hooked.

    transformers' Mllama zeroes such a token's cross-attention MLP output but keeps its
    attention output: with every image masked its scores are all equal, so it adds the mean of
    every vision state in its row. vLLM and SGLang zero both (Meta's reference model does too),
    so we do, with hooks on the layers as loaded: a record's result then no longer depends on
    the other images of its batch or packed row, and training matches those servers.
    """
    def stash(layer, args, kwargs):
        layer.cross_attn._llamalora_rows = kwargs.get("full_text_row_masked_out_mask")

    def apply(attn, args, output):
        rows = getattr(attn, "_llamalora_rows", None)
        if rows is None:
            return output
        return (output[0] * rows[:, 0], *output[1:])

    hooked = 0
    for module in model.modules():
        if type(module).__name__ == "MllamaCrossAttentionDecoderLayer":
            module.register_forward_pre_hook(stash, with_kwargs=True)
            module.cross_attn.register_forward_hook(apply)
            hooked += 1
    return hooked


def _prepare(model, with_vision: bool) -> None:
    """With the vision class: the imageless tokens' cross-attention zeroed, and the two image
    attentions on llamalora's kernels (`mllama_attention`)."""
    if with_vision:
        mask_imageless_cross_attention(model)
        mllama_attention.use_fast_attention(model)


def _cross_attention_layers(text_config) -> list[int]:
    return sorted(set(getattr(text_config, "cross_attention_layers", None) or []))


def _image_states(config) -> int:
    """Image states an image gives each cross-attention layer: its tiles' patches and class
    token."""
    vision = config.vision_config
    return vision.max_num_tiles * ((vision.image_size // vision.patch_size) ** 2 + 1)


def default_config():
    """The Llama 3.2 11B Vision architecture (MllamaConfig defaults, 560-pixel tiles)."""
    from transformers import MllamaConfig

    config = MllamaConfig()
    config.vision_config.image_size = 560
    return config


def _kernel_note(device, graphs: bool) -> str:
    return f"vision attention: {mllama_attention.vision_attention_kernel(device, graphs)}"


MLLAMA = Family(
    name="Llama 3.2 Vision", model_types=("mllama", "mllama_text_model"),
    text_class="AutoModelForCausalLM", vision_class="MllamaForConditionalGeneration",
    vision_parts=VISION_PARTS, prepare=_prepare, batches=MllamaBatches,
    skipped_layers=_cross_attention_layers, image_states=_image_states,
    known_configs=MappingProxyType({DEFAULT_MODEL: default_config}),
    graph_images=True, kernel_note=_kernel_note,
    adapter_prefixes=("base_model.model.model.layers.",
                      "base_model.model.model.language_model.layers."),
    text_only_export=True, gguf=False,
    merged_classes=("AutoModelForCausalLM", "MllamaForConditionalGeneration"),
    merge_with_vision=True)
