"""Alpaca: `instruction`, optional `input`, `output`; `system` or `system_prompt`; `image` or
`images`. The user turn is the instruction, then the input on a new line; images go where
`<image>` placeholders are, else before the text."""

from __future__ import annotations

import json

from llamalora.data.example import Example
from llamalora.data.layouts.base import CheckOptions, Fixed, Layout
from llamalora.data.layouts.fields import (RENAMES, check_image_list, check_string, check_system,
                                           check_text, image_field, system_field)
from llamalora.data.problems import Problem
from llamalora.template import IMAGE, IMAGE_PLACEHOLDER, user_text

# `id` (LLaVA and ShareGPT sets carry one) is known and ignored.
FIELDS = frozenset({"instruction", "input", "output", "system", "system_prompt", "image",
                    "images", "id"})
_PLAIN = frozenset({"instruction", "input", "output", "system"})
_STRINGS = ("instruction", "input", "output", "system")


def quick(obj: object) -> bool:
    """True for a clean text-only record of the common kind: the checks `check` makes, in fewer
    steps (most records of most files are these, and validate's budget is a bare parse's 1.5x).
    A record this does not accept goes through `check`."""
    if type(obj) is not dict or not obj.keys() <= _PLAIN:
        return False
    instruction, output = obj.get("instruction"), obj.get("output")
    input_text, system = obj.get("input", ""), obj.get("system", "")
    if (type(instruction) is str and type(output) is str and type(input_text) is str
            and type(system) is str and instruction.strip() and output.strip()):
        text = instruction + input_text + output + system
        return "<|" not in text and IMAGE_PLACEHOLDER not in text
    return False


def quick_example(obj: dict, line: int) -> Example:
    """The Example of a record `quick` accepted."""
    return Example(line, obj.get("system") or None,
                   [("user", user_text(obj["instruction"], obj.get("input", ""))),
                    ("assistant", obj["output"])])


def check(obj: dict, line: int, problems: list[Problem], options: CheckOptions
          ) -> Example | None:
    errors = sum(p.is_error for p in problems)
    instruction = check_string(obj, "instruction", line, problems, required=True,
                               non_empty=True)
    input_text = check_string(obj, "input", line, problems, required=False, non_empty=False)
    output = check_string(obj, "output", line, problems, required=True, non_empty=True)
    system = check_system(obj, line, problems)
    names = check_image_list(obj, line, problems)
    if sum(p.is_error for p in problems) > errors or names is None:
        return None
    placeholders = (instruction + (input_text or "")).count(IMAGE_PLACEHOLDER)
    if placeholders and placeholders != len(names):
        problems.append(Problem(line, image_field(obj), "bad_messages",
                                f"{placeholders} `{IMAGE_PLACEHOLDER}` placeholder(s) but "
                                f"{len(names)} image(s)", fix="give one image per placeholder"))
        return None
    images = []
    if names:
        images = options.images.check(names, line, problems, image_field(obj))
        if sum(p.is_error for p in problems) > errors:
            return None
    user = user_text(instruction, input_text or "", 0 if placeholders else len(names))
    example = Example(line, system or None,
                      [("user", user.replace(IMAGE_PLACEHOLDER, IMAGE)), ("assistant", output)],
                      images)
    return example if check_text(example, obj, line, problems,
                                 options.system_with_images) else None


def _renamed(fixed: dict, changes: list[str]) -> None:
    for name, aliases in RENAMES.items():
        alias = next((a for a in aliases if a in fixed), None)
        if name not in fixed and alias:
            fixed[name] = fixed.pop(alias)
            changes.append(f"renamed `{alias}` to `{name}`")
    if "instruction" not in fixed and "input" in fixed and "output" in fixed:
        fixed["instruction"] = fixed.pop("input")
        changes.append("renamed `input` to `instruction`")


def _system_moved(fixed: dict, changes: list[str]) -> None:
    """A system message next to images goes to the start of the instruction, where Llama 3.2
    Vision's template takes it."""
    name = system_field(fixed)
    system, instruction = fixed.get(name or ""), fixed.get("instruction")
    if (name and isinstance(system, str) and system.strip() and fixed.get(image_field(fixed))
            and isinstance(instruction, str)):
        del fixed[name]
        fixed["instruction"] = f"{system}\n\n{instruction}"
        changes.append(f"moved `{name}` into the instruction (a system message next to images)")


def fix(obj: dict) -> Fixed:
    """What other tools call `output` / `instruction` is renamed to it, the examples nested in
    `instances` become records of their own, numbers and booleans in string fields become
    strings, a null `input` becomes "", and a system message next to images moves into the
    instruction. Anything else wrong is left for the check to refuse."""
    fixed, changes = dict(obj), []
    _renamed(fixed, changes)
    instances = fixed.get("instances")
    if "output" not in fixed and isinstance(instances, list) and instances:
        base = {k: v for k, v in fixed.items() if k in FIELDS}
        spread = [fix({**base, **inst}) for inst in instances if isinstance(inst, dict)]
        return Fixed([r for f in spread for r in f.records],
                     [*changes, "gave each of `instances` as its own record",
                      *{c for f in spread for c in f.changes}])
    for name in _STRINGS:
        value = fixed.get(name)
        if isinstance(value, (bool, int, float)):
            fixed[name] = json.dumps(value) if isinstance(value, bool) else str(value)
            changes.append(f"turned `{name}` into a string")
    if "input" in fixed and fixed["input"] is None:
        fixed["input"] = ""
        changes.append("turned a null `input` into \"\"")
    _system_moved(fixed, changes)
    return Fixed([fixed], changes)


def detect(obj: dict) -> bool:
    return True  # the layout of a record that is no other


LAYOUT = Layout("alpaca", FIELDS, detect, check, fix)
