"""What the validator finds: one `Problem` per finding, each with its code, line and fix."""

from __future__ import annotations

import json
from dataclasses import dataclass

ERROR_CODES = (
    "invalid_utf8", "invalid_json", "not_object", "missing_field", "wrong_type", "empty_field",
    "image_missing", "image_unreadable", "bad_messages", "no_records", "record_too_large",
    "video_unsupported", "system_with_images", "bad_tools", "bad_tool_call", "unreadable",
)
WARNING_CODES = ("bom", "blank_line", "unknown_field", "duplicate", "special_token")
_ERRORS = frozenset(ERROR_CODES)


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding of the validator. `line` is 1-based; None when not about one line. `unit` is
    "row" for tables (parquet, CSV, Arrow, Hub datasets), where `line` counts rows. `fix` says
    what to do about it, apart from `message` (what is wrong) so a report can print it in full
    where a table cell would cut it."""

    line: int | None
    field: str | None
    code: str
    message: str
    excerpt: str = ""
    unit: str = "line"
    fix: str = ""

    @property
    def is_error(self) -> bool:
        return self.code in _ERRORS

    @property
    def text(self) -> str:
        """The message with its fix, as one sentence."""
        return f"{self.message}; {self.fix}" if self.fix else self.message

    def to_dict(self) -> dict:
        return {self.unit: self.line, "field": self.field, "code": self.code,
                "message": self.text}

    def __str__(self) -> str:
        where = f"{self.unit} {self.line}" if self.line is not None else "file"
        return f"{where}: {self.text}"


def type_name(value: object) -> str:
    """A JSON value's type as a message names it ("a number", "null")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def excerpt(value: object, limit: int = 40) -> str:
    """A short one-line excerpt of a value, for the report's excerpt column."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 1] + "…"
