"""Qwen2-VL and Qwen2.5-VL: a Qwen2 language model that reads images as tokens of its own text.

Their image path is the opposite of Mllama's: no cross-attention layers; each image is one
`<|image_pad|>` in the tokenized text (inside `<|vision_start|>` ... `<|vision_end|>`), which
the batch expands to the image's tokens (its patches merged 2 x 2, `image_grid_thw` giving
their grid); the vision tower (`model.visual`, its own varlen attention over each image's
patches) writes its states into those positions. Positions are M-RoPE's, three rows (time,
height, width) from the model's own `get_rope_index`, made per record and concatenated, so a
packed row's records each restart at 0, as in a padded batch; a fourth row in front, the plain
text positions, tells transformers (and the attention's record boundaries) where each record
starts. One class serves text and images (there is no text-only class); the tower is never
quantized, adapted or run with autograd. Steps stay eager (never captured in a CUDA graph);
text turns of chat take the static decoder, whose positions are M-RoPE's for text.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

from llamalora.families.base import Family, TextBatches
from llamalora.packing import IGNORE_INDEX, Tokenized, load_images, with_loss_index


class QwenBatches(TextBatches):
    """Qwen2-VL's batches: each record's images processed and its `<|image_pad|>` expanded to
    their tokens, with the pixel values, `image_grid_thw` and M-RoPE positions beside."""

    def __init__(self, model=None, image_processor=None):
        super().__init__(model, image_processor)
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.config = inner.config
        self.image_token_id = self.config.image_token_id
        self.merge = self.config.vision_config.spatial_merge_size
        self._rope_index = inner.model.get_rope_index  # the model's own, read on the host

    def packed(self, items: list[Tokenized]) -> dict:
        import torch

        if self.image_processor is None:
            return super().packed(items)
        records = [self._expand(t) for t in items]
        ids = [i for r in records for i in r.ids]
        labels = [x for r in records for x in [IGNORE_INDEX] + r.labels[1:]]
        batch = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                 "position_ids": torch.cat([r.positions for r in records], dim=1)[:, None]}
        _add_pixels(batch, records)
        return with_loss_index(batch, [len(r.ids) for r in records])

    def padded(self, items: list[Tokenized], pad_id: int) -> dict:
        import torch

        if self.image_processor is None:
            return super().padded(items, pad_id)
        records = [self._expand(t) for t in items]
        longest = max(len(r.ids) for r in records)
        ids = torch.full((len(records), longest), pad_id, dtype=torch.long)
        labels = torch.full((len(records), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(records), longest), dtype=torch.long)
        positions = torch.zeros((4, len(records), longest), dtype=torch.long)
        for row, r in enumerate(records):
            n = len(r.ids)
            ids[row, :n], labels[row, :n], mask[row, :n] = (
                torch.tensor(r.ids), torch.tensor(r.labels), 1)
            positions[:, row, :n] = r.positions
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels,
                 "position_ids": positions}
        _add_pixels(batch, records)
        return with_loss_index(batch)

    def static(self, items: list[Tokenized], pad_id: int) -> dict:
        if self.image_processor is not None and any(t.images for t in items):
            raise ValueError("Qwen2-VL's image rows are not captured in CUDA graphs")
        return super().static(items, pad_id)

    def prompt(self, prompts: list[list[int]], pad_id: int, images: list[Path] = ()) -> dict:
        """The prompts for `generate`, an image's pad expanded to its tokens; `generate` makes
        the M-RoPE positions itself from `mm_token_type_ids` and `image_grid_thw`."""
        import torch

        if not images:
            return super().prompt(prompts, pad_id)
        if len(prompts) != 1:
            raise ValueError("images go with a single prompt")
        record = self._expand(Tokenized(0, prompts[0], list(prompts[0]), list(images)))
        ids = torch.tensor([record.ids])
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                 "mm_token_type_ids": (ids == self.image_token_id).int()}
        _add_pixels(batch, [record])
        return batch

    def _expand(self, t: Tokenized) -> "_Expanded":
        """One record with its images' tokens in place of each `<|image_pad|>` (no loss on
        them) and its positions [4, n]. Images whose pad truncation cut off are left out."""
        import torch

        images = t.images[:t.input_ids.count(self.image_token_id)]
        if not images:
            n = len(t.input_ids)
            return _Expanded(t.input_ids, t.labels, torch.arange(n).expand(4, n), None, None)
        features = self.image_processor(images=load_images(images), return_tensors="pt")
        grid = features["image_grid_thw"]
        counts = iter((grid.prod(-1) // self.merge ** 2).tolist())
        ids, labels = [], []
        for token, label in zip(t.input_ids, t.labels):
            if token == self.image_token_id:
                n = next(counts, 1)
                ids += [token] * n
                labels += [IGNORE_INDEX] * n
            else:
                ids.append(token)
                labels.append(label)
        tensor = torch.tensor([ids])
        rope, _ = self._rope_index(tensor, **_rope_kwargs(self._rope_index, tensor,
                                                          self.image_token_id, grid))
        positions = torch.cat([torch.arange(len(ids))[None], rope[:, 0]], dim=0)
        return _Expanded(ids, labels, positions, features["pixel_values"], grid)


class _Expanded:
    """One record as `QwenBatches._expand` made it."""

    def __init__(self, ids, labels, positions, pixel_values, grid):
        self.ids, self.labels, self.positions = ids, labels, positions
        self.pixel_values, self.grid = pixel_values, grid


def _add_pixels(batch: dict, records: list[_Expanded]) -> None:
    """The records' images, in order: their patches and grids, concatenated."""
    import torch

    with_images = [r for r in records if r.grid is not None]
    if with_images:
        batch["pixel_values"] = torch.cat([r.pixel_values for r in with_images])
        batch["image_grid_thw"] = torch.cat([r.grid for r in with_images])


def _rope_kwargs(rope_index, ids, image_token_id: int, grid) -> dict:
    """`get_rope_index`'s keywords for one record: its grid, and its tokens' types (image 1)
    where this transformers takes them (5.24 does, earlier 5.x found the images by id)."""
    kwargs = {"image_grid_thw": grid}
    # Keyed on the class's function, not the bound method: a cache holding the method would
    # keep every model it was called on alive.
    if "mm_token_type_ids" in _parameters(getattr(rope_index, "__func__", rope_index)):
        kwargs["mm_token_type_ids"] = (ids == image_token_id).int()
    return kwargs


@functools.cache
def _parameters(function) -> frozenset:
    return frozenset(inspect.signature(function).parameters)


def _image_tokens(config, model_path: str | None) -> int:
    """The most tokens an image can add: the processor's largest image in merged patches (an
    upper bound; images are resized to between its `min_pixels` and `max_pixels`). 0 where the
    processor can't be read (the run reports that when it loads it)."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(model_path, trust_remote_code=False)
    except Exception:  # no processor files: the plan goes on, training says what is missing
        return 0
    size = getattr(processor, "size", None)
    longest = (getattr(processor, "max_pixels", None) or getattr(size, "longest_edge", None)
               or (size.get("longest_edge") if isinstance(size, dict) else None) or 0)
    vision = config.vision_config
    return int(longest) // (vision.patch_size * vision.spatial_merge_size) ** 2


QWEN2_VL = Family(
    name="Qwen2-VL", model_types=("qwen2_vl", "qwen2_5_vl", "qwen2_vl_text", "qwen2_5_vl_text"),
    text_class="AutoModelForImageTextToText", vision_class="AutoModelForImageTextToText",
    vision_parts=("visual",), batches=QwenBatches, image_tokens=_image_tokens,
    cuda_graphs=False, gguf=False, merged_classes=("AutoModelForImageTextToText",),
    merge_with_vision=True)
