"""What a scan of a data set reports: every problem, and every record left out or changed."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from llamalora.data.problems import Problem

# Lines kept per reason in a `Tally`: enough to find the records, bounded on any file.
TALLY_LINES = 5


@dataclass
class Tally:
    """Records counted by reason (what was left out, or what --fix changed), with the first
    lines of each; a line may carry a note, e.g. the earlier line it duplicates."""

    counts: Counter = field(default_factory=Counter)
    lines: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    _last: dict[str, int] = field(default_factory=dict, repr=False)
    _distinct: Counter = field(default_factory=Counter, repr=False)

    def add(self, reason: str, line: int, note: str = "") -> None:
        self.counts[reason] += 1
        # Records of one line (a JSON array written on one line, `instances`) list it once.
        if self._last.get(reason) == line:
            return
        self._last[reason] = line
        self._distinct[reason] += 1
        kept = self.lines.setdefault(reason, [])
        if len(kept) < TALLY_LINES:
            kept.append((line, note))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __bool__(self) -> bool:
        return bool(self.counts)

    def summary(self, unit: str = "line") -> str:
        """One line, most frequent reason first: "2 duplicate (lines 4 (same as 1), 7 (same as
        2)), 1 wrong_type (line 9)"."""
        parts = []
        for reason, count in self.counts.most_common():
            kept = self.lines.get(reason, [])
            shown = ", ".join(f"{line} ({note})" if note else str(line) for line, note in kept)
            lines = self._distinct[reason] or len(kept)
            more = f" and {lines - len(kept)} more" if lines > len(kept) else ""
            parts.append(f"{count} {reason} ({unit}{'s' if len(kept) > 1 or more else ''} "
                         f"{shown}{more})")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        return {reason: {"count": count, "lines": [line for line, _ in self.lines[reason]]}
                for reason, count in self.counts.most_common()}

    @classmethod
    def from_dict(cls, data: dict) -> Tally:
        tally = cls()
        for reason, entry in data.items():
            tally.counts[reason] = entry["count"]
            tally.lines[reason] = [(line, "") for line in entry["lines"]]
            # Fewer lines than kept at most: those are all; else a record a line, as most have.
            kept = len(entry["lines"])
            tally._distinct[reason] = entry["count"] if kept == TALLY_LINES else kept
        return tally


@dataclass
class ValidationReport:
    """What `validate_file` found. `records` counts every non-blank line (or array element, or
    table row: then `unit` is "row")."""

    path: str
    unit: str = "line"
    records: int = 0
    records_ok: int = 0
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    error_counts: Counter = field(default_factory=Counter)
    warning_counts: Counter = field(default_factory=Counter)
    # The invalid records, by their first error: what stats and train leave out with
    # --skip-invalid.
    invalid: Tally = field(default_factory=Tally)
    # Invalid records the --fix rules turn valid (counted without --fix too, for the hint).
    fixable: int = 0
    # Set by --fix: the records written, those left out (by reason) and what was changed.
    fixed_path: str | None = None
    fixed_records: int = 0
    dropped_lines: list[int] = field(default_factory=list)
    left_out: Tally = field(default_factory=Tally)
    changes: Tally = field(default_factory=Tally)

    @property
    def ok(self) -> bool:
        return not self.error_counts

    @property
    def left_out_invalid(self) -> int:
        """Records --fix left out because they stay invalid (not duplicates)."""
        return self.left_out.total - self.left_out.counts["duplicate"] - self.left_out.counts[
            "duplicate after the fix"]

    def to_dict(self, lazy: bool = False) -> dict:
        """The `validate --json` object; `lazy` gives the problem lists as iterators, for a
        writer that streams them (`cli._console.print_json`) instead of holding 200,000 dicts."""
        listed = (lambda ps: map(Problem.to_dict, ps)) if lazy else (
            lambda ps: [p.to_dict() for p in ps])
        out = {
            "path": self.path,
            "records": self.records,
            "records_ok": self.records_ok,
            "errors": listed(self.errors),
            "warnings": listed(self.warnings),
            "error_counts": dict(self.error_counts),
            "warning_counts": dict(self.warning_counts),
        }
        if self.fixed_path is not None:
            out["fixed"] = {"path": self.fixed_path, "records": self.fixed_records,
                            "dropped_lines": self.dropped_lines,
                            "left_out": self.left_out.to_dict(),
                            "changes": self.changes.to_dict()}
        return out


def left_out_note(invalid: Tally, data_path: str, unit: str = "line") -> str:
    """The line that says which invalid records --skip-invalid left out, by reason."""
    return (f"Left out {invalid.total} invalid record(s) (--skip-invalid): "
            f"{invalid.summary(unit)}; `llamalora validate {data_path}` lists their problems")


def unreadable_report(path: str, message: str) -> ValidationReport:
    """The report of a data set that could not be read at all (`validate --json` still prints
    one object)."""
    report = ValidationReport(path=path)
    report.errors.append(Problem(None, None, "unreadable", message))
    report.error_counts["unreadable"] = 1
    return report
