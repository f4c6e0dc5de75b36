"""From checked records to tokenized ones: token ids, loss masks, truncation, and the seeded,
length-grouped order of an epoch's batches (`packing` makes their tensors).

Tokenization goes through `template.render_segments` and `tokenizer.encode_segments`, as stats
does, so the truncation train reports is the one stats predicted.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from llamalora.data import Example
from llamalora.packing import IGNORE_INDEX, Tokenized
from llamalora.stats import measure
from llamalora.template import IMAGE, render_examples, template_of
from llamalora.tokenizer import encode_segments



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
