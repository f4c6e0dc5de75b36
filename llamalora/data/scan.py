"""Whole data sets: one streaming pass that checks every record, reports every problem with its
line, finds duplicates, hands the valid records on, and writes --fix's copy."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from llamalora.data.example import Example
from llamalora.data.fixing import FixWriter, fixable
from llamalora.data.images import ImageRoot, image_root_folder
from llamalora.data.layouts import CheckOptions, alpaca, check_record
from llamalora.data.problems import Problem
from llamalora.data.report import ValidationReport
from llamalora.data.sources import Source, open_source
from llamalora.errors import DataError, UsageError

# Distinct records remembered for the duplicate check (~100 bytes each): bounds validate's
# memory on files of tens of millions of records.
DUPLICATE_TRACK_LIMIT = 1_000_000


class _Scan:
    """One pass over a source. Valid records go to `on_example`; problems are counted in full
    and listed up to `max_problems` of each kind."""

    def __init__(self, source: Source, options: CheckOptions, *, max_problems: int | None,
                 on_example: Callable[[Example], None] | None,
                 on_progress: Callable[[int], None] | None, count_fixable: bool = False):
        self.source, self.options = source, options
        self.report = ValidationReport(path=source.name, unit=source.unit)
        self.max_problems, self.on_example, self.on_progress = max_problems, on_example, on_progress
        self.count_fixable = count_fixable
        self.rows = source.unit == "row"
        self.seen: dict[int, int] = {}  # hash of a record's text -> its first line
        self.limit = DUPLICATE_TRACK_LIMIT
        self.capped = False
        self.fixer: FixWriter | None = None

    def keep(self, problem: Problem) -> None:
        report = self.report
        if self.rows:
            problem = replace(problem, unit="row")
        if problem.is_error:
            report.error_counts[problem.code] += 1
            if self.max_problems is None or len(report.errors) < self.max_problems:
                report.errors.append(problem)
        else:
            report.warning_counts[problem.code] += 1
            if self.max_problems is None or len(report.warnings) < self.max_problems:
                report.warnings.append(problem)

    def first_seen(self, raw, line: int) -> int:
        """Past the cap on tracked records: the line the same text was first seen at among
        them (`line` itself when none)."""
        if not self.capped:
            self.capped = True
            self.keep(Problem(None, None, "duplicate", "duplicate check stopped after "
                              f"{self.limit:,} distinct records (memory cap); later records "
                              "are checked only against those"))
        return self.seen.get(hash(raw), line)

    def run(self) -> ValidationReport:
        """The loop, kept tight: a clean plain record (most of most files) costs a parse, a
        dictionary lookup for duplicates and `alpaca.quick`."""
        report, quick, build = self.report, alpaca.quick, self.on_example
        seen, limit, fixer, on_progress = self.seen, self.limit, self.fixer, self.on_progress
        records = ok = 0
        for line, obj, raw, problem in self.source.items(self.keep):
            records += 1
            if on_progress is not None and records % 10000 == 0:
                on_progress(records)
            first = (seen.setdefault(hash(raw), line) if len(seen) < limit
                     else self.first_seen(raw, line)) if raw else line
            if first != line:
                self.keep(Problem(line, None, "duplicate",
                                  f"exact duplicate of {self.source.unit} {first}"))
            if problem is not None:
                self.unparsed(line, problem)
            elif quick(obj):
                ok += 1
                if build is not None:
                    build(alpaca.quick_example(obj, line))
                if fixer is not None:
                    fixer.valid(obj, line, first, None)
            else:
                ok += self.record(line, obj, first)
        report.records, report.records_ok = records, ok
        if records == 0:
            self.keep(Problem(None, None, "no_records",
                              "no records: the file is empty or holds only blank lines"))
        return report

    def unparsed(self, line: int, problem: Problem) -> None:
        self.keep(problem)
        self.report.invalid.add(problem.code, line)
        if self.fixer is not None:
            self.fixer.unparsed(line, problem)

    def record(self, line: int, obj: object, first: int) -> bool:
        """The full check of one record; True when it is valid."""
        problems: list[Problem] = []
        example = check_record(obj, line, problems, self.options)
        for p in problems:
            self.keep(p)
        if example is not None:
            if self.on_example is not None:
                self.on_example(example)
            if self.fixer is not None:
                self.fixer.valid(obj, line, first, example)
            return True
        self.report.invalid.add(next(p.code for p in problems if p.is_error), line)
        if self.fixer is not None:
            self.fixer.invalid(obj, line, first, problems)
        elif self.count_fixable and fixable(obj, self.options):
            self.report.fixable += 1
        return False


def check_options(source: Source, image_root: str | os.PathLike | None, *,
                  check_images: bool = True, system_with_images: bool = False) -> CheckOptions:
    """How a source's records are checked: where relative image paths start (`image_root`, by
    default the data's folder), whether images are opened, and whether the chat template takes
    a system message next to images."""
    if image_root is None:
        root = ImageRoot(source.folder, given=False, open_images=check_images)
    else:
        root = ImageRoot(image_root_folder(image_root), given=True, open_images=check_images)
    return CheckOptions(root, system_with_images)


def validate_file(path: str | os.PathLike, *, max_problems: int | None = None,
                  fix_out: str | os.PathLike | None = None, check_images: bool = True,
                  on_progress: Callable[[int], None] | None = None,
                  image_root: str | os.PathLike | None = None,
                  split: str = "train") -> ValidationReport:
    """Checks a data set and reports every problem with its line (or row) number.

    Args:
        path: A JSONL file, a JSON file holding one array of records, a parquet / CSV / Arrow
            file, a dataset folder, or a Hub dataset id (see `open_source`).
        max_problems: Keep at most this many errors and as many warnings in the report (counts
            stay complete).
        fix_out: Write a cleaned JSONL copy here (see `fixing.FixWriter` and each layout's
            `fix`): what it changed is in `changes`, what it left out, by reason, in
            `left_out` (and `dropped_lines`). Must not exist: nothing is ever replaced. The
            copy is renamed into place once complete; when no record is left, none is written
            and `fixed_path` stays None.
        check_images: Open referenced images to check they exist and are readable.
        on_progress: Called with the count of records read so far, every 10,000 records.
        image_root: Where relative image paths start (default: the data file's folder).
        split: The split of a dataset folder or Hub dataset.

    Raises:
        UsageError: The data can't be read, or `fix_out` exists or can't be written.
    """
    source = open_source(path, split)
    fix_path = Path(fix_out) if fix_out is not None else None
    if fix_path is not None and fix_path.exists() and source.path is not None and (
            fix_path.resolve() == source.path.resolve()):
        raise UsageError("--fix must name a new file, not the input; the input is never changed")
    if fix_path is not None and not fix_path.parent.is_dir():
        raise UsageError(f"--fix {fix_path}: no such folder {fix_path.parent}; create it or "
                         "name a file in an existing one")
    if fix_path is not None and (fix_path.exists() or fix_path.is_symlink()):
        # The copy never replaces anything: the name may be the user's own file (or folder).
        raise UsageError(f"--fix {fix_path} already exists; name a new file (or move that one "
                         "away first)")
    scan = _Scan(source, check_options(source, image_root, check_images=check_images),
                 max_problems=max_problems, on_example=None, on_progress=on_progress,
                 count_fixable=fix_path is None)
    if fix_path is None:
        return scan.run()
    scan.fixer = FixWriter(fix_path, scan.report, scan.options, DUPLICATE_TRACK_LIMIT)
    report = None
    try:
        report = scan.run()
    finally:
        published = scan.fixer.close(keep=report is not None and report.fixed_records > 0)
    if report.fixed_records:
        if not published:
            raise UsageError(f"--fix {fix_path} appeared while the copy was written; name a "
                             "new file")
        report.fixed_path = str(fix_path)
    return report


def scan_examples(path: str | os.PathLike | Source, on_example: Callable[[Example], None], *,
                  check_images: bool = True, image_root: str | os.PathLike | None = None,
                  split: str = "train", system_with_images: bool = False) -> ValidationReport:
    """Streams a data set, calling `on_example` for each valid record; returns the report.

    Memory stays constant apart from what `on_example` keeps. Pair it with `require_valid`.
    `system_with_images`: the chat template takes a system message next to images.
    """
    source = path if isinstance(path, Source) else open_source(path, split)
    options = check_options(source, image_root, check_images=check_images,
                            system_with_images=system_with_images)
    return _Scan(source, options, max_problems=50, on_example=on_example,
                 on_progress=None).run()


def require_valid(report: ValidationReport, *, skip_invalid: bool = False) -> None:
    """Raises DataError when the report has errors (unless skipped) or no valid record."""
    path = report.path
    if report.error_counts and not skip_invalid:
        n = sum(report.error_counts.values())
        raise DataError(f"{path}: {n} problem(s) in {report.records - report.records_ok} "
                        f"record(s), first at {report.errors[0]}; run `llamalora validate "
                        f"{path}` to see them all, or pass --skip-invalid", report.errors)
    if report.records_ok == 0:
        raise DataError(f"{path}: no valid records; run `llamalora validate {path}`",
                        report.errors)


def load_examples(path: str | os.PathLike, *, skip_invalid: bool = False,
                  check_images: bool = True, image_root: str | os.PathLike | None = None,
                  split: str = "train", system_with_images: bool = False
                  ) -> tuple[list[Example], ValidationReport]:
    """Reads and checks a data set, returning its valid records as Examples.

    Raises:
        DataError: The data has invalid records (and `skip_invalid` is off), or none valid.
        UsageError: The data can't be read.
    """
    examples: list[Example] = []
    report = scan_examples(path, examples.append, check_images=check_images,
                           image_root=image_root, split=split,
                           system_with_images=system_with_images)
    require_valid(report, skip_invalid=skip_invalid)
    return examples, report
