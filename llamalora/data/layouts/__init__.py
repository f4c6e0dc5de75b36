"""The record layouts, one module each, in a registry: the first layout whose `detect` takes a
record reads it. A new layout is a module with a `LAYOUT` (see `base.Layout`) and a line in
`LAYOUTS`."""

from __future__ import annotations

from llamalora.data.example import Example
from llamalora.data.layouts import alpaca, messages, openai_tools, sharegpt, sharegpt_tools
from llamalora.data.layouts.base import CheckOptions, Fixed, Layout
from llamalora.data.layouts.fields import check_video
from llamalora.data.problems import Problem, excerpt, type_name

# Tool calling before the plain conversations it extends; Alpaca, the fallback, last.
LAYOUTS: tuple[Layout, ...] = (openai_tools.LAYOUT, sharegpt_tools.LAYOUT, messages.LAYOUT,
                               sharegpt.LAYOUT, alpaca.LAYOUT)

__all__ = ["LAYOUTS", "CheckOptions", "Fixed", "Layout", "check_record", "fix_record",
           "layout_of"]


def layout_of(obj: dict) -> Layout:
    return next(layout for layout in LAYOUTS if layout.detect(obj))


def check_record(obj: object, line: int, problems: list[Problem], options: CheckOptions
                 ) -> Example | None:
    """Checks one parsed record, appending its problems; returns its Example when it has no
    error."""
    if not isinstance(obj, dict):
        problems.append(Problem(line, None, "not_object",
                                f"each record must be a JSON object, got {type_name(obj)}",
                                excerpt(obj)))
        return None
    if not check_video(obj, line, problems):
        return None
    layout = layout_of(obj)
    for name in sorted(obj.keys() - layout.fields):
        problems.append(Problem(line, name, "unknown_field", f"unknown field `{name}` (ignored)"))
    return layout.check(obj, line, problems, options)


def fix_record(obj: object) -> Fixed:
    """The --fix rules of the record's layout; nothing for a record that is no object."""
    if not isinstance(obj, dict):
        return Fixed([])
    return layout_of(obj).fix(obj)
