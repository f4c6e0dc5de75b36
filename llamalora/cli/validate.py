"""`llamalora validate`: every problem in a data file, with its line number."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from llamalora.cli._console import err, out, print_json
from llamalora.cli._errors import handle_errors
from llamalora.cli._options import DataPathArg, ImageRootOpt, JsonOpt, SplitOpt
from llamalora.data import unreadable_report, validate_file
from llamalora.errors import UsageError

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
    try:
        report = validate_file(path, max_problems=limit, fix_out=fix, image_root=image_root,
                               split=split)
    except UsageError as exc:
        if json_out:  # a script reading stdout still gets one object
            print_json(unreadable_report(path, str(exc)).to_dict())
        raise
    if json_out:
        print_json(report.to_dict(lazy=True))
    else:
        _render(report)
    if fix is not None:
        _conclude_fix(report, fix)
    elif not report.ok:
        bad = report.records - report.records_ok
        err.print(f"Error: {sum(report.error_counts.values())} error(s) in {bad} record(s); "
                  f"fix the {report.unit}s listed{_fix_hint(report.fixable, bad)}",
                  markup=False, soft_wrap=True)
        raise typer.Exit(1)


def _fix_hint(fixable: int, bad: int) -> str:
    """Whether to point at --fix: only for what its rules can fix."""
    if not fixable:
        return ""
    if fixable == bad:
        return ", or write a cleaned copy with --fix OUT"
    return (f"; --fix OUT fixes {fixable} of the {bad} records, the other {bad - fixable} need "
            f"fixing by hand")


def _conclude_fix(report, fix: Path) -> None:
    """--fix's account: what it wrote, changed and left out (by reason), and the exit code:
    0 when the copy holds every record (duplicates aside), 1 when some could not be fixed."""
    unit = report.unit
    if report.fixed_path is None:
        err.print(f"Error: nothing written to {fix}: none of the {report.records} record(s) is "
                  "valid, even after the renames and conversions --fix makes; fix the "
                  f"{unit}s listed by hand", markup=False, soft_wrap=True)
        raise typer.Exit(1)
    err.print(f"Wrote {report.fixed_records} record(s) to {report.fixed_path}", markup=False,
              soft_wrap=True)
    if report.changes:
        err.print(f"  changed: {report.changes.summary(unit)}", markup=False, soft_wrap=True)
    if report.left_out:
        err.print(f"  left out: {report.left_out.summary(unit)}", markup=False, soft_wrap=True)
    unfixed = report.left_out_invalid
    if unfixed:
        err.print(f"Error: {unfixed} record(s) could not be fixed and were left out of "
                  f"{report.fixed_path}; fix those {unit}s in the input by hand (see the "
                  "problems listed) and run --fix again", markup=False, soft_wrap=True)
        raise typer.Exit(1)
    if not report.ok:
        err.print(f"Fixed: every record with an error is fixed in {report.fixed_path}; use "
                  "that file (the input is unchanged)", markup=False, soft_wrap=True)


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
    problems = sorted(report.errors + report.warnings, key=lambda p: (p.line or 0,
                                                                       not p.is_error))
    if not problems:
        return
    table = Table(report.unit, "kind")
    # What does not fit wraps inside the cell instead of being cut.
    for name in ("field", "code", "message", "excerpt"):
        table.add_column(name, overflow="fold")
    for p in problems:
        table.add_row(str(p.line or "-"), "error" if p.is_error else "warning", p.field or "-",
                      p.code, p.message, p.excerpt)
    out.print(table)
    shown = len(report.errors) + len(report.warnings)
    total = sum(report.error_counts.values()) + sum(report.warning_counts.values())
    if shown < total:
        out.print(f"({total - shown} more not listed; raise --max-errors or use --json)")
    _render_fixes(problems, report.unit)


def _render_fixes(problems, unit: str) -> None:
    """Each distinct fix once, as a plain line below the table: a path to pass stays whole at
    any terminal width."""
    fixes: dict[tuple[str, str], list[int]] = {}
    for p in problems:
        if p.fix:
            fixes.setdefault((p.code, p.fix), []).append(p.line)
    if not fixes:
        return
    out.print("Fixes:")
    for (code, fix), lines in fixes.items():
        known = [n for n in dict.fromkeys(lines) if n is not None]
        where = (f"{unit}s {_lines(known, 5)}" if len(known) > 1 else
                 f"{unit} {known[0]}" if known else "file")
        out.print(f"  {where} ({code}): {fix}", markup=False, soft_wrap=True)


def _lines(lines: list[int], limit: int = 20) -> str:
    shown = ", ".join(str(n) for n in lines[:limit])
    return shown + (f" and {len(lines) - limit} more" if len(lines) > limit else "")
