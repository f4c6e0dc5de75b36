"""`llamalora validate`: every problem in a data file, with its line number."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from llamalora.cli._console import err, out, print_json
from llamalora.cli._errors import handle_errors
from llamalora.cli._options import DataPathArg, ImageRootOpt, JsonOpt, SplitOpt
from llamalora.data import validate_file

EXAMPLES = """Examples:

  llamalora validate data/sample.jsonl

  llamalora validate data.jsonl --json > report.json

  llamalora validate data.jsonl --fix data.clean.jsonl

  llamalora validate llava.json --image-root images/

  llamalora validate train.parquet

  llamalora validate ORG/NAME --split validation
"""


@handle_errors
def validate(
    path: DataPathArg,
    json_out: JsonOpt = False,
    fix: Annotated[Path | None, typer.Option(
        "--fix", help="Write a cleaned copy to this new file (the input is never changed).",
        show_default=False)] = None,
    max_errors: Annotated[int | None, typer.Option(
        "--max-errors", min=1, help="List at most this many errors and warnings each (counts "
                                    "stay complete); default 50 in tables, 100,000 with --json.",
        show_default=False)] = None,
    image_root: ImageRootOpt = None,
    split: SplitOpt = "train",
) -> None:
    """Check a data file and report every bad record with its line number."""
    # --json lists every problem up to 100,000 of each kind (counts stay complete), so a file of
    # garbage can't make the report itself unbounded.
    limit = max_errors if max_errors is not None else (100_000 if json_out else 50)
    report = validate_file(path, max_problems=limit, fix_out=fix, image_root=image_root,
                           split=split)
    if json_out:
        print_json(report.to_dict(lazy=True))
    else:
        _render(report)
    unit = report.unit
    if report.fixed_path:
        dropped = report.dropped_lines
        err.print(f"Wrote {report.fixed_records} record(s) to {report.fixed_path}"
                  + (f"; left out {unit}(s) {_lines(dropped)}" if dropped else ""), markup=False)
    elif fix is not None:
        err.print(f"Nothing written to {fix}: none of the {report.records} record(s) is valid, "
                  "even after the renames and conversions --fix makes; fix the "
                  f"{unit}s listed by hand", markup=False, soft_wrap=True)
    if not report.ok:
        n = sum(report.error_counts.values())
        fix_hint = "" if fix is not None else ", or write a cleaned copy with --fix OUT"
        err.print(f"Error: {n} error(s) in {report.records - report.records_ok} record(s); "
                  f"fix the {unit}s listed{fix_hint}", markup=False, soft_wrap=True)
        raise typer.Exit(1)


def _lines(lines: list[int], limit: int = 20) -> str:
    shown = ", ".join(str(n) for n in lines[:limit])
    return shown + (f" and {len(lines) - limit} more" if len(lines) > limit else "")


def _render(report) -> None:
    out.print(f"validate {report.path}")
    summary = Table(show_header=False)
    summary.add_row("records", str(report.records))
    summary.add_row("ok", str(report.records_ok))
    summary.add_row("errors", str(sum(report.error_counts.values())))
    summary.add_row("warnings", str(sum(report.warning_counts.values())))
    for code, count in sorted(report.error_counts.items()):
        summary.add_row(f"  error: {code}", str(count))
    for code, count in sorted(report.warning_counts.items()):
        summary.add_row(f"  warning: {code}", str(count))
    out.print(summary)
    problems = report.errors + report.warnings
    if not problems:
        return
    table = Table(report.unit, "kind", "field", "code", "message", "excerpt")
    for p in sorted(problems, key=lambda p: (p.line or 0, not p.is_error)):
        table.add_row(str(p.line or "-"), "error" if p.is_error else "warning", p.field or "-",
                      p.code, p.message, p.excerpt)
    out.print(table)
    shown = len(report.errors) + len(report.warnings)
    total = sum(report.error_counts.values()) + sum(report.warning_counts.values())
    if shown < total:
        out.print(f"({total - shown} more not listed; raise --max-errors or use --json)")
