"""From tokenized records to the tensors a step runs on: padded batches, packed rows, and packed
rows padded to a static shape (CUDA graphs), each with the loss positions listed on the host.

Text only: a model family whose records carry images adds their inputs around these
(`llamalora.families`), so what is here serves every family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

IGNORE_INDEX = -100
# A batch key for a host-made object entered as a context around the batch's forward (how a
# family's attention reads what the host worked out about the batch; `step.loss_sum` enters it).
FORWARD_CONTEXT = "forward_context"


@dataclass
class Tokenized:
    """One record ready for training: ids, labels (-100 where there is no loss), images."""

    line: int
    input_ids: list[int]
    labels: list[int]
    images: list[Path] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


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


def pack_padded(items: list[Tokenized], pad_id: int, packed: dict | None = None) -> dict:
    """`pack`, padded to a static length, with the loss positions listed for a static gather.

    Returns torch tensors: `input_ids`, `position_ids` [1, L]; `cu_seqlens` (`cu_seqlens` over
    `sequence_slots` entries: the records, then the padding as a record of its own, so it
    attends only to itself); `target_index` [T] (positions whose next token has a label) and
    `target_ids` [T] (that label), both padded to `padded_length` of the label count with
    position 0 and -100. Nothing in it depends on the data's values on the GPU, so a step over
    it can be captured in a CUDA graph and replayed for any batch of the same shapes.

    `packed`: the row as a family's images path packed it (`pack`'s layout with its image
    inputs beside), to be padded here; the image inputs are the family's to pad.
    """
    import torch
    import torch.nn.functional as F

    packed = pack(items) if packed is None else packed
    n, (length, slots) = packed["input_ids"].shape[1], padded_shape(items)
    index, targets = _labelled(packed["labels"])
    row = {"input_ids": F.pad(packed["input_ids"], (0, length - n), value=pad_id),
           "position_ids": torch.cat([packed["position_ids"],
                                      torch.arange(length - n)[None]], dim=1),
           "cu_seqlens": cu_seqlens([len(t) for t in items] + [length - n],
                                    sequence_slots(len(items))),
           "target_index": F.pad(index, (0, slots - index.numel()), value=0),
           "target_ids": F.pad(targets, (0, slots - index.numel()), value=IGNORE_INDEX)}
    return row


def with_loss_index(batch: dict, lengths: list[int] | None = None) -> dict:
    """Adds to a host batch (`pack` or `collate`, or a family's with images) what lets
    `step.loss_sum` run without reading anything back from the GPU: the flat positions whose
    next token has a label and those labels, and for a packed row (`lengths`: its records'
    lengths) their `cu_seqlens` and the longest (`max_seqlen`), which the attention reads
    instead of a mask. Otherwise a boolean-mask gather, and transformers' search for the records
    in the position ids, each wait for the GPU to catch up: that waiting was 202 ms of an 8-bit
    image step of the 11B (9 syncs a step)."""
    batch["loss_index"], batch["loss_targets"] = _labelled(batch["labels"])
    if lengths is not None:
        batch["cu_seqlens"], batch["max_seqlen"] = cu_seqlens(lengths), max(lengths)
        if len(lengths) == 1 and batch["position_ids"].ndim == 2:  # the default positions
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


def load_images(paths: list[Path]) -> list:
    """The images at `paths`, decoded as RGB (what every family's image processor takes)."""
    from PIL import Image

    loaded = []
    for p in paths:
        with Image.open(p) as im:
            loaded.append(im.convert("RGB"))
    return loaded
