"""`validate --fix OUT`: the cleaned JSONL copy, and the account of what it changed and left
out, each with its reason."""

from __future__ import annotations

import json
import os
from pathlib import Path

from llamalora.data.example import Example
from llamalora.data.layouts import CheckOptions, check_record, fix_record, layout_of
from llamalora.data.problems import Problem
from llamalora.data.report import ValidationReport
from llamalora.errors import UsageError

REWROTE_IMAGES = "rewrote relative image paths to start from the copy's folder"


class FixWriter:
    """Writes the copy: a valid record as it is, an invalid one as its layout's fix rules make
    it (when that is valid), duplicates left out. Relative image paths are rewritten to start
    from the copy's folder, so the copy finds the same files wherever it is written (and with
    no --image-root)."""

    def __init__(self, path: Path, report: ValidationReport, options: CheckOptions,
                 track_limit: int):
        self.path, self.report, self.options = path, report, options
        self.folder = path.parent
        self.limit = track_limit
        self.written: dict[int, int] = {}  # hash of a written line -> the input line it is from
        # The copy is written under a temporary sibling and renamed into place when complete:
        # an interrupted or failed run leaves no half copy under the user's name.
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self.out = self.tmp.open("x", encoding="utf-8", newline="\n")
        except OSError as exc:
            raise UsageError(f"--fix {path}: cannot write there ({exc.strerror}); name a new "
                             "file in a writable folder") from exc

    def close(self, keep: bool) -> bool:
        """Closes the copy and renames it to its name if `keep` and the name is still free
        (True), else removes it (False)."""
        self.out.close()
        if keep and not (self.path.exists() or self.path.is_symlink()):
            os.replace(self.tmp, self.path)
            return True
        self.tmp.unlink(missing_ok=True)
        return False

    def _leave_out(self, line: int, reason: str, note: str = "") -> None:
        self.report.left_out.add(reason, line, note)
        self.report.dropped_lines.append(line)

    def _write(self, record: dict, line: int, example: Example | None) -> int:
        """Writes the record; 0, or the line of the record already written that it equals."""
        if example is not None and example.images:
            renamed = layout_of(record).rename_images(
                record, lambda name: self.options.images.relative_name(name, self.folder))
            if renamed != record:
                self.report.changes.add(REWROTE_IMAGES, line)
                record = renamed
        text = json.dumps(record, ensure_ascii=False)
        key = hash(text)
        first = self.written.get(key)
        if first is not None:
            return first
        if len(self.written) < self.limit:
            self.written[key] = line
        self.out.write(text + "\n")
        self.report.fixed_records += 1
        return 0

    def valid(self, obj: dict, line: int, first: int, example: Example | None) -> None:
        """A record that passed the check (`example` is None on the quick path: no images)."""
        if first != line:
            self._leave_out(line, "duplicate", f"same as {first}")
        elif same := self._write(obj, line, example):
            self._leave_out(line, "duplicate after the fix", f"same as {same}")

    def unparsed(self, line: int, problem: Problem) -> None:
        self._leave_out(line, problem.code)

    def invalid(self, obj: object, line: int, first: int, problems: list[Problem]) -> None:
        """A record with errors: written as the fix rules make it, if that passes the check."""
        if first != line:
            self._leave_out(line, "duplicate", f"same as {first}")
            return
        fixed = fix_record(obj)
        written = duplicate = 0
        for record in fixed.records if fixed.changes else ():  # unchanged: still invalid
            example = check_record(record, line, [], self.options)
            if example is None:
                continue
            same = self._write(record, line, example)
            written += not same
            duplicate = duplicate or same
        if written:
            for change in dict.fromkeys(fixed.changes):
                self.report.changes.add(change, line)
        elif duplicate:
            self._leave_out(line, "duplicate after the fix", f"same as {duplicate}")
        else:
            self._leave_out(line, next(p.code for p in problems if p.is_error))


def fixable(obj: object, options: CheckOptions) -> bool:
    """Whether the fix rules turn an invalid record into a valid one (for validate's hint)."""
    fixed = fix_record(obj)
    # No change made: the record is as invalid as before (and not checked again, images and all).
    return bool(fixed.changes) and any(check_record(record, 0, [], options) is not None
                                       for record in fixed.records)
