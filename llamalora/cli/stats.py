"""`llamalora stats`: token lengths of the training text against --max-seq-length."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from llamalora.cli._console import info, out, print_json, spinner, warn
from llamalora.cli._errors import handle_errors
from llamalora.cli._options import (DataPathArg, ImageRootOpt, JsonOpt, MaxSeqLenOpt,
                                    SkipInvalidOpt, SplitOpt, TokenizerOpt)
from llamalora.data import left_out_note
from llamalora.stats import compute_stats, plot_histogram
from llamalora.tokenizer import DEFAULT_MODEL, load_tokenizer

EXAMPLES = """Examples:

  llamalora stats data/sample.jsonl

  llamalora stats data.jsonl --max-seq-length 1024 --json

  llamalora stats data.jsonl --tokenizer bundled --plot lengths.png
"""


@handle_errors
def stats(
    path: DataPathArg,
    tokenizer: TokenizerOpt = DEFAULT_MODEL,
    max_seq_length: MaxSeqLenOpt = 512,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", min=1, help="Records per batch, for the padding estimate.")] = 2,
    json_out: JsonOpt = False,
    show_truncated: Annotated[int, typer.Option(
        "--show-truncated", min=0, help="List this many of the records longer than "
                                        "--max-seq-length.")] = 10,
    plot: Annotated[Path | None, typer.Option(
        "--plot", help="Also write a PNG histogram to this file (needs matplotlib).",
        show_default=False)] = None,
    skip_invalid: SkipInvalidOpt = False,
    image_root: ImageRootOpt = None,
    split: SplitOpt = "train",
) -> None:
    """Show how the training text tokenizes: lengths, truncation and padding."""
    with spinner("Loading the tokenizer"):
        source = load_tokenizer(tokenizer)
    if source.fallback_reason:
        warn(source.fallback_reason)
    with spinner("Tokenizing") as update:
        report = compute_stats(path, source.tokenizer, tokenizer_name=source.source,
                               max_seq_length=max_seq_length, batch_size=batch_size,
                               skip_invalid=skip_invalid, image_root=image_root, split=split,
                               on_progress=lambda n: update(f"Tokenizing: {n} records"))
    if report.skipped_invalid:
        warn(left_out_note(report.validation.invalid, path, report.validation.unit))
    data = report.to_dict()
    if plot is not None:
        info(f"Wrote {plot_histogram(report, plot)}")
    if json_out:
        print_json(data)
        return
    _render(report, data, show_truncated)


def _render(report, d: dict, show_truncated: int) -> None:
    out.print(f"stats {d['path']}: {d['records']} records, tokenizer {d['tokenizer']}")
    table = Table()
    table.add_column("tokens")
    for key in ("min", "mean", "p50", "p90", "p95", "p99", "max"):
        table.add_column(key, justify="right")
    for label, key in (("total", "tokens"), ("prompt", "prompt_tokens"),
                       ("response", "response_tokens")):
        table.add_row(label, *(str(v) for v in d[key].values()))
    out.print(table)

    limit = d["max_seq_length"]
    bins = report.histogram()
    peak = max(b.count for b in bins) or 1
    top = bins[-1].high
    where = ("| marks" if bins[0].low <= limit <= top else
             "every record is within" if limit > top else "every record is over")
    out.print(f"\nTotal tokens per record ({where} --max-seq-length {limit}):")
    for low, high, count in bins:
        mark = "|" if low <= limit <= high else " "
        bar = "█" * round(30 * count / peak)
        out.print(f"{low:>6}-{high:<6}{mark} {bar} {count}")

    pad = d["padding"]
    over = d["over_max"]
    out.print(f"\nOver {limit} tokens: {over} record(s) ({over / d['records']:.1%}); "
              f"truncation cuts {d['response_tokens_lost']} response token(s), and "
              f"{d['responses_fully_lost']} record(s) would lose their whole response.")
    if over and show_truncated:
        lines = ", ".join(str(n) for n in d["over_max_lines"][:show_truncated])
        more = over - min(over, show_truncated)
        out.print(f"  lines: {lines}" + (f" (+{more} more)" if more else ""))
    sug = d["suggested_max_seq_length"]
    out.print(f"Smallest --max-seq-length (multiple of 64) covering 99%: {sug['p99']}, "
              f"100%: {sug['max']}")
    out.print(f"Padding share at batch size {pad['batch_size']}: pad to {limit} "
              f"{pad['pad_to_max']:.1%}, pad to longest {pad['pad_to_longest']:.1%} "
              f"({pad['pad_to_longest_grouped']:.1%} with length grouping)")
    out.print(f"Tokens per epoch: {d['total_tokens']} (after truncation)")
