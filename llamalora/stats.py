"""Token-length statistics of a data file's training text, against a max sequence length.

Lengths come from `template.render_segments` (the tokenizer's chat template) +
`tokenizer.encode_segments`, the same path train takes, so what stats reports as truncated is what
train truncates.
"""

from __future__ import annotations

import math
import random
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from llamalora.data import Example, ValidationReport, require_valid, scan_examples
from llamalora.errors import MissingExtraError
from llamalora.template import render_examples, template_of
from llamalora.tokenizer import encode_segments

_CHUNK = 2000  # records tokenized per batch: big enough for the Rust thread pool, small in memory


class Bin(NamedTuple):
    """One bar of `StatsReport.histogram`: records whose total tokens are in [low, high]."""

    low: int
    high: int
    count: int


@dataclass
class LengthRecord:
    """Token counts of one record: prompt (everything without loss) and response (with loss)."""

    line: int
    prompt: int
    response: int
    response_kept: int  # response tokens inside max_seq_length

    @property
    def total(self) -> int:
        return self.prompt + self.response


def measure(segments: list[tuple[int, bool]], max_seq_length: int) -> tuple[int, int, int]:
    """(prompt tokens, response tokens, response tokens kept when cut at max_seq_length), from
    each segment's (token count, is_response)."""
    prompt = response = kept = pos = 0
    for n, is_response in segments:
        if is_response:
            response += n
            kept += max(0, min(n, max_seq_length - pos))
        else:
            prompt += n
        pos += n
    return prompt, response, kept


def summarize(values: list[int] | array) -> dict:
    """min / mean / p50 / p90 / p95 / p99 / max, nearest-rank percentiles."""
    ordered = sorted(values)
    n = len(ordered)

    def pct(q: float) -> int:
        return ordered[max(0, math.ceil(q / 100 * n) - 1)]

    return {"min": ordered[0], "mean": round(sum(ordered) / n, 1), "p50": pct(50),
            "p90": pct(90), "p95": pct(95), "p99": pct(99), "max": ordered[-1]}


def padding_share(lengths: list[int], batch_size: int, *, grouped: bool) -> float:
    """Share of pad tokens when batches pad to their longest record.

    `grouped` sorts records by length first (what train's length-grouped sampler approximates);
    otherwise batches follow a shuffled order, as a plain random sampler gives.
    """
    if grouped:
        order = sorted(lengths)
    else:
        order = list(lengths)
        random.Random(0).shuffle(order)
    real = padded = 0
    for i in range(0, len(order), batch_size):
        batch = order[i:i + batch_size]
        real += sum(batch)
        padded += max(batch) * len(batch)
    return round(1 - real / padded, 4) if padded else 0.0


def _round_up(n: int, multiple: int = 64) -> int:
    return max(multiple, -(-n // multiple) * multiple)


@dataclass
class StatsReport:
    """What `compute_stats` returns; `to_dict` is the `stats --json` object."""

    path: str
    max_seq_length: int
    batch_size: int
    tokenizer: str
    lengths: list[LengthRecord]
    validation: ValidationReport
    skipped_invalid: int = 0
    extra: dict = field(default_factory=dict)

    def histogram(self, bins: int = 16) -> list[Bin]:
        """At most `bins` equal bins of total tokens from the shortest record to the longest (a
        range running on to max_seq_length would leave most bins empty on short data)."""
        totals = [r.total for r in self.lengths]
        low, span = min(totals), max(totals) - min(totals) + 1
        width = -(-span // bins)
        counts = [0] * -(-span // width)
        for t in totals:
            counts[(t - low) // width] += 1
        return [Bin(low + i * width, low + (i + 1) * width - 1, c) for i, c in enumerate(counts)]

    def to_dict(self) -> dict:
        totals = [r.total for r in self.lengths]
        over = [r for r in self.lengths if r.total > self.max_seq_length]
        sorted_totals = sorted(totals)
        p99 = sorted_totals[max(0, math.ceil(0.99 * len(totals)) - 1)]
        truncated = [min(t, self.max_seq_length) for t in totals]
        n = len(totals)
        return {
            "path": self.path,
            "tokenizer": self.tokenizer,
            "records": n,
            "skipped_invalid": self.skipped_invalid,
            "left_out": self.validation.invalid.to_dict() if self.skipped_invalid else {},
            "max_seq_length": self.max_seq_length,
            "tokens": summarize(totals),
            "prompt_tokens": summarize([r.prompt for r in self.lengths]),
            "response_tokens": summarize([r.response for r in self.lengths]),
            "over_max": len(over),
            "over_max_lines": [r.line for r in over],
            "response_tokens_lost": sum(r.response - r.response_kept for r in self.lengths),
            "responses_fully_lost": sum(1 for r in self.lengths if r.response_kept == 0),
            "suggested_max_seq_length": {"p99": _round_up(p99), "max": _round_up(max(totals))},
            "padding": {
                "batch_size": self.batch_size,
                "pad_to_max": round(1 - sum(truncated) / (n * self.max_seq_length), 4),
                "pad_to_longest": padding_share(truncated, self.batch_size, grouped=False),
                "pad_to_longest_grouped": padding_share(truncated, self.batch_size, grouped=True),
            },
            "total_tokens": sum(truncated),
            "total_tokens_untruncated": sum(totals),
        }


def compute_stats(path: str | Path, tokenizer, *, tokenizer_name: str = "",
                  max_seq_length: int = 512, batch_size: int = 2, skip_invalid: bool = False,
                  on_progress: Callable[[int], None] | None = None,
                  image_root: str | Path | None = None, split: str = "train") -> StatsReport:
    """Streams a data file and measures each record's training text in tokens.

    Args:
        path: The data file (validated on the way; invalid records refuse the file unless
            `skip_invalid`).
        tokenizer: A `tokenizers.Tokenizer` (see `tokenizer.load_tokenizer`).
        tokenizer_name: Where the tokenizer came from, for the report.
        max_seq_length: The length records are cut at in training.
        batch_size: Records per batch, for the padding estimate.
        on_progress: Called with the number of records measured so far, after each chunk.
        image_root: Where relative image paths start (default: the data file's folder).
        split: The split of a dataset folder or Hub dataset.

    Raises:
        DataError: Invalid records (without `skip_invalid`) or no valid record.
        UsageError: The file can't be read.
    """
    lengths: list[LengthRecord] = []
    pending: list[Example] = []
    template = template_of(tokenizer)

    def flush() -> None:
        encoded = encode_segments(tokenizer, render_examples(pending, template),
                                  lengths_only=True)
        for ex, segments in zip(pending, encoded):
            lengths.append(LengthRecord(ex.line, *measure(segments, max_seq_length)))
        pending.clear()
        if on_progress is not None:
            on_progress(len(lengths))

    def on_example(example: Example) -> None:
        pending.append(example)
        if len(pending) >= _CHUNK:
            flush()

    report = scan_examples(path, on_example, image_root=image_root, split=split,
                           system_with_images=template.takes_system_with_images)
    require_valid(report, skip_invalid=skip_invalid)
    if pending:
        flush()
    return StatsReport(path=str(path), max_seq_length=max_seq_length, batch_size=batch_size,
                       tokenizer=tokenizer_name, lengths=lengths, validation=report,
                       skipped_invalid=report.records - report.records_ok)


def plot_histogram(report: StatsReport, out: str | Path) -> Path:
    """Writes a PNG histogram of total tokens with max_seq_length marked.

    Raises:
        MissingExtraError: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingExtraError("--plot needs matplotlib: pip install 'llamalora[plot]'") from exc
    totals = [r.total for r in report.lengths]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.hist(totals, bins=min(60, max(10, len(set(totals)))), color="#4477aa")
    ax.axvline(report.max_seq_length, color="#cc3311", linestyle="--",
               label=f"max_seq_length {report.max_seq_length}")
    ax.set_xlabel("tokens per record (training text)")
    ax.set_ylabel("records")
    ax.set_title(f"{Path(report.path).name}: {len(totals)} records")
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
