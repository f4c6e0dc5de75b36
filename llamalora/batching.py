"""From checked records to training batches: token ids, loss masks, and length-grouped order.

Tokenization goes through `template.render_segments` and `tokenizer.encode_segments`, as stats
does, so the truncation train reports is the one stats predicted.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from llamalora.data import Example
from llamalora.stats import measure
from llamalora.template import IMAGE, render_examples, template_of
from llamalora.tokenizer import encode_segments

IGNORE_INDEX = -100
IMAGE_TOKEN_ID = 128256  # <|image|> in the Llama 3.2 Vision tokenizer


@dataclass
class Tokenized:
    """One record ready for training: ids, labels (-100 where there is no loss), images."""

    line: int
    input_ids: list[int]
    labels: list[int]
    images: list[Path] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class TruncationSummary:
    """What cutting records at max_seq_length did; train reports it in the plan."""

    mode: str
    max_seq_length: int
    records_over: int = 0
    response_tokens_lost: int = 0
    records_dropped: int = 0  # over the limit with --truncation drop, or left with no response
    dropped_lines: list[int] = field(default_factory=list)

    def add(self, line: int, enc: Encoded, max_seq_length: int) -> None:
        """Counts one record of `tokenize_records`."""
        if enc.untruncated > max_seq_length:
            self.records_over += 1
        self.response_tokens_lost += enc.response_lost
        if enc.tokenized is None:
            self.records_dropped += 1
            self.dropped_lines.append(line)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "max_seq_length": self.max_seq_length,
                "records_over": self.records_over,
                "response_tokens_lost": self.response_tokens_lost,
                "records_dropped": self.records_dropped,
                "dropped_lines": self.dropped_lines[:100]}


class Encoded(NamedTuple):
    """One record through `tokenize_records`: its Tokenized (None when it is left out), the
    tokens it had before truncation, and the response tokens truncation cost it."""

    tokenized: Tokenized | None
    untruncated: int
    response_lost: int


def tokenize_records(tokenizer, examples: list[Example], *, max_seq_length: int,
                     train_on_prompt: bool = False, truncation: str = "truncate",
                     chunk: int = 2000, template=None) -> Iterator[Encoded]:
    """Tokenizes records and builds their labels, one `Encoded` per record in order.

    `template` (a `template.ChatTemplate`) defaults to the one the tokenizer was loaded with;
    worker processes get it passed, since a pickled tokenizer loses what was attached to it.

    Labels are -100 on the prompt (unless `train_on_prompt`) and always on `<|image|>`, which
    lies outside the language model's output classes. Records longer than `max_seq_length` are
    cut (`truncation="truncate"`) or left out ("drop"); a cut record left with no response token
    is left out too, since it would train on nothing.
    """
    if truncation not in ("truncate", "drop"):
        raise ValueError(f"truncation must be 'truncate' or 'drop', got {truncation!r}")
    image_id = tokenizer.token_to_id(IMAGE)
    for start in range(0, len(examples), chunk):
        part = examples[start:start + chunk]
        encoded = encode_segments(tokenizer, render_examples(part, template or template_of(tokenizer)))
        for example, segments in zip(part, encoded):
            ids: list[int] = []
            labels: list[int] = []
            for seg_ids, is_response in segments:
                ids.extend(seg_ids)
                labels.extend(seg_ids if (is_response or train_on_prompt)
                              else [IGNORE_INDEX] * len(seg_ids))
            if image_id is not None:
                labels = [IGNORE_INDEX if t == image_id else t for t in labels]
            n = len(ids)
            if n > max_seq_length:
                _, response, kept = measure([(len(i), r) for i, r in segments], max_seq_length)
                if truncation == "drop" or kept == 0:
                    yield Encoded(None, n, response)
                    continue
                yield Encoded(Tokenized(example.line, ids[:max_seq_length],
                                        labels[:max_seq_length], list(example.images)),
                              n, response - kept)
                continue
            yield Encoded(Tokenized(example.line, ids, labels, list(example.images)), n, 0)


def tokenize_examples(tokenizer, examples: list[Example], *, max_seq_length: int,
                      train_on_prompt: bool = False, truncation: str = "truncate",
                      chunk: int = 2000) -> tuple[list[Tokenized], TruncationSummary]:
    """`tokenize_records` as a list of the records kept, and what truncation did."""
    summary = TruncationSummary(truncation, max_seq_length)
    out: list[Tokenized] = []
    for example, enc in zip(examples, tokenize_records(
            tokenizer, examples, max_seq_length=max_seq_length, train_on_prompt=train_on_prompt,
            truncation=truncation, chunk=chunk)):
        summary.add(example.line, enc, max_seq_length)
        if enc.tokenized is not None:
            out.append(enc.tokenized)
    return out, summary


def record_lengths(records) -> list[int]:
    """Token counts of training records: the stored `lengths` of a tokenized data set
    (`llamalora.tokenized.Records`), else each record's len() (a list of Tokenized)."""
    lengths = getattr(records, "lengths", None)
    return list(lengths) if lengths is not None else [len(t) for t in records]


def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's batches of record indices, grouped by length, in a seeded random order.

    Records are shuffled, then sorted by length within windows of 32 batches, so each batch pads
    little while the order still varies from epoch to epoch. The same (seed, epoch) always gives
    the same batches, which is what makes `--resume` repeat an uninterrupted run exactly.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 32
    batches: list[list[int]] = []
    for i in range(0, len(order), window):
        group = sorted(order[i:i + window], key=lambda j: -lengths[j])
        batches.extend(group[k:k + batch_size] for k in range(0, len(group), batch_size))
    rng.shuffle(batches)
    return batches


def split_eval(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, eval indices): a seeded split holding out `fraction` of the records."""
    if fraction <= 0:
        return list(range(n)), []
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(n * fraction))
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def collate(items: list[Tokenized], pad_id: int):
    """Pads a batch to its longest record (right padding). Returns torch tensors."""
    import torch

    longest = max(len(t) for t in items)
    ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), longest), dtype=torch.long)
    for row, t in enumerate(items):
        n = len(t)
        ids[row, :n] = torch.tensor(t.input_ids)
        labels[row, :n] = torch.tensor(t.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack(items: list[Tokenized]):
    """Concatenates a batch's records into one padding-free row. Returns torch tensors.

    Position ids restart at 0 for each record; with no attention mask, transformers reads the
    restarts as record boundaries and masks attention block-diagonally, so each record sees only
    itself and the result equals the padded batch's, without computing a single pad token. The
    first label of each record is -100: the previous record's last token must not learn to
    predict it.
    """
    import torch

    ids, labels, positions = [], [], []
    for t in items:
        ids += t.input_ids
        labels += [IGNORE_INDEX] + t.labels[1:]
        positions += range(len(t))
    return {"input_ids": torch.tensor([ids], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long)}


def padded_length(n: int) -> int:
    """The static length a packed row of `n` tokens is padded to: a multiple of 128 up to 1,024,
    of 256 beyond. Few distinct lengths mean few CUDA graphs to capture; the padding costs at most
    127 (255) tokens of compute."""
    step = 128 if n <= 1024 else 256
    return max(step, -(-n // step) * step)


def padded_shape(items: list[Tokenized]) -> tuple[int, int]:
    """(padded length, label slots) of `pack_padded(items)`, without building it."""
    labels = sum(sum(x != IGNORE_INDEX for x in t.labels[1:]) for t in items)
    return padded_length(sum(map(len, items))), padded_length(labels)


def sequence_slots(records: int) -> int:
    """Entries of a static row's record lengths: its records and its padding (a record of its
    own), in a power of two of at least 8, the rest zero-length records. One CUDA graph then
    serves any row of up to that many records."""
    return max(8, 1 << records.bit_length())


def cu_seqlens(lengths: list[int], slots: int | None = None):
    """int32 [slots + 1] (default: one per record): where each record of a packed row starts,
    then the row's end; records past the given ones are zero-length. What
    `attention.varlen_kwargs` carries."""
    import torch

    ends = [0]
    for n in lengths:
        ends.append(ends[-1] + n)
    ends += [ends[-1]] * ((slots or len(lengths)) - len(lengths))
    return torch.tensor(ends, dtype=torch.int32)


def pack_padded(items: list[Tokenized], pad_id: int, image_processor=None):
    """`pack`, padded to a static length, with the loss positions listed for a static gather.

    Returns torch tensors: `input_ids`, `position_ids` [1, L]; `cu_seqlens` (`cu_seqlens` over
    `sequence_slots` entries: the records, then the padding as a record of its own, so it
    attends only to itself); `target_index` [T] (positions whose next token has a label) and
    `target_ids` [T] (that label), both padded to `padded_length` of the label count with
    position 0 and -100. Nothing in it depends on the data's values on the GPU, so a step over
    it can be captured in a CUDA graph and replayed for any batch of the same shapes.

    With `image_processor` and records with images, also `pack_vision`'s image inputs for the
    row's N images, and its cross-attention mask [1, L, N, tiles] with the padding seeing no
    image: the shapes then depend on `static_shape` only.
    """
    import torch
    import torch.nn.functional as F

    # the one layout of a packed row (with its images, if asked); padded and indexed below
    packed = pack(items) if image_processor is None else pack_vision(items, image_processor)
    n, (length, slots) = packed["input_ids"].shape[1], padded_shape(items)
    index, targets = _labelled(packed["labels"])
    row = {"input_ids": F.pad(packed["input_ids"], (0, length - n), value=pad_id),
           "position_ids": torch.cat([packed["position_ids"],
                                      torch.arange(length - n)[None]], dim=1),
           "cu_seqlens": cu_seqlens([len(t) for t in items] + [length - n],
                                    sequence_slots(len(items))),
           "target_index": F.pad(index, (0, slots - index.numel()), value=0),
           "target_ids": F.pad(targets, (0, slots - index.numel()), value=IGNORE_INDEX)}
    if "cross_attention_mask" in packed:
        row.update({k: packed[k] for k in ("pixel_values", "aspect_ratio_ids",
                                           "aspect_ratio_mask")})
        row["cross_attention_mask"] = F.pad(packed["cross_attention_mask"],
                                            (0, 0, 0, 0, 0, length - n))
    return row


def with_loss_index(batch: dict, lengths: list[int] | None = None) -> dict:
    """Adds to a host batch (`pack`, `pack_vision` or `collate`) what lets `step.loss_sum` run
    without reading anything back from the GPU: the flat positions whose next token has a label
    and those labels, and for a packed row (`lengths`: its records' lengths) their
    `cu_seqlens` and the longest (`max_seqlen`), which the attention reads instead of a mask.
    Otherwise a boolean-mask gather, and transformers' search for the records in the position
    ids, each wait for the GPU to catch up: that waiting was 202 ms of an 8-bit image step of
    the 11B on an H200 (9 syncs a step)."""
    batch["loss_index"], batch["loss_targets"] = _labelled(batch["labels"])
    if lengths is not None:
        batch["cu_seqlens"], batch["max_seqlen"] = cu_seqlens(lengths), max(lengths)
        if len(lengths) == 1:  # its positions are the default ones
            del batch["position_ids"]
    return batch


def _labelled(labels):
    """(flat positions p over [rows, L - 1] whose next token has a label, those labels). The
    logits at p predict token p + 1; pack's -100 at each record's first token keeps a record
    from predicting the next one's start."""
    labels = labels[:, 1:]
    keep = labels != IGNORE_INDEX
    return keep.reshape(-1).nonzero()[:, 0], labels[keep]


def static_shape(items: list[Tokenized]) -> tuple[int, int, int, int]:
    """What fixes every shape of `pack_padded(items, ...)`: (padded length, label slots, images,
    sequence slots); one CUDA graph per such tuple."""
    return (*padded_shape(items), sum(len(t.images) for t in items),
            sequence_slots(len(items)))


def _load_images(paths: list[Path]):
    from PIL import Image

    loaded = []
    for p in paths:
        with Image.open(p) as im:
            loaded.append(im.convert("RGB"))
    return loaded


def _set_vision_inputs(batch: dict, rows: list, sparse: list, image_processor) -> dict:
    """Mllama's image inputs for `rows` (one list of images per batch row), with `sparse` the
    per-row, per-image [first, end) token spans that see the image."""
    import numpy as np
    import torch
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense)

    feats = image_processor(images=rows, return_tensors="pt")
    dense = convert_sparse_cross_attention_mask_to_dense(
        sparse, num_tiles=feats.pop("num_tiles"), max_num_tiles=image_processor.max_image_tiles,
        length=batch["input_ids"].shape[1])
    batch.update(pixel_values=feats["pixel_values"], aspect_ratio_ids=feats["aspect_ratio_ids"],
                 aspect_ratio_mask=feats["aspect_ratio_mask"],
                 cross_attention_mask=torch.from_numpy(np.asarray(dense)))
    return batch


def add_vision_inputs(batch: dict, image_lists: list[list[Path]], image_processor,
                      image_token_id: int = IMAGE_TOKEN_ID) -> dict:
    """Adds Mllama's image inputs to a collated batch, in place: pixel values (tiles), aspect
    ratios, and the cross-attention mask that lets each text token see the images before it.

    Rows without an image get a blank one (the processor wants one per row); the mask keeps
    every token of such a row from attending to it.
    """
    from PIL import Image
    from transformers.models.mllama.processing_mllama import get_cross_attention_token_mask

    if not any(image_lists):
        return batch
    rows = [_load_images(paths) or [Image.new("RGB", (32, 32))] for paths in image_lists]
    sparse = [get_cross_attention_token_mask(row.tolist(), image_token_id)
              for row in batch["input_ids"]]
    return _set_vision_inputs(batch, rows, sparse, image_processor)


def pack_vision(items: list[Tokenized], image_processor,
                image_token_id: int = IMAGE_TOKEN_ID) -> dict:
    """`pack` for records with images: one row, its records' images side by side on the image
    axis, and a cross-attention mask that is block-diagonal by record.

    Each record's tokens see only its own images, from each image's `<|image|>` on (Mllama's
    rule, applied within the record); a record without an image sees none, and its tokens get
    nothing from the cross-attention layers (`models.mask_imageless_cross_attention`), exactly
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
        for first, end in get_cross_attention_token_mask(list(t.input_ids), image_token_id):
            spans.append([offset + first, offset + (len(t) if end == -1 else end)])
        offset += len(t)
    return _set_vision_inputs(batch, [_load_images(images)], [spans], image_processor)
