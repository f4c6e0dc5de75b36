"""Checks of the fields several layouts share: strings, the system message, image lists, and
the text-level warnings on a finished Example."""

from __future__ import annotations

import re

from llamalora.data.example import Example
from llamalora.data.problems import Problem, excerpt, type_name
from llamalora.template import IMAGE

# Names other tools use for the answer; a record with one of these but no `output` gets a hint.
OUTPUT_ALIASES = ("response", "answer", "completion", "target", "chosen")
# What other tools call the two Alpaca fields; --fix renames these when the real one is absent.
RENAMES = {"output": OUTPUT_ALIASES, "instruction": ("prompt", "question", "query")}
VIDEO_FIELDS = ("video", "videos")
# Llama 3 control tokens written as text are read as control tokens by the tokenizer.
_SPECIAL_TOKEN_RE = re.compile(r"<\|(?:begin_of_text|end_of_text|eot_id|eom_id|start_header_id|"
                               r"end_header_id|image|python_tag|finetune_right_pad_id|"
                               r"reserved_special_token_\d+)\|>")
FIX_DOES_THIS = "(--fix does this)"


def _missing_hint(obj: dict, name: str) -> str:
    alias = next((a for a in RENAMES.get(name, ()) if a in obj), None)
    if alias is None and name == "instruction" and "input" in obj:
        alias = "input"
    if alias:
        return f"this record has `{alias}`: rename it to `{name}` {FIX_DOES_THIS}"
    if isinstance(obj.get("instances"), list):
        return ("this record nests its examples in `instances`: give each as its own record "
                f"{FIX_DOES_THIS}")
    if "text" in obj:
        return ("a `text`-only record is plain text, and llamalora trains on "
                "instruction/output pairs or conversations")
    return ""


def _wrong_type_hint(name: str, value: object) -> str:
    if isinstance(value, (int, float)) or value is True or value is False:
        return f"wrap it in quotes {FIX_DOES_THIS}"
    if value is None and name == "input":
        return f"give \"\" or leave it out {FIX_DOES_THIS}"
    if isinstance(value, list) and name == "output":
        return "keep one answer per record"
    if isinstance(value, dict):
        keys = [k for k, v in value.items() if isinstance(v, str)]
        return (f"it holds {', '.join(f'`{name}.{k}`' for k in keys[:3])}: put the text itself "
                f"in `{name}`" if keys else "put the text itself in it")
    return ""


def check_string(obj: dict, name: str, line: int, problems: list[Problem], *, required: bool,
                 non_empty: bool) -> str | None:
    """The string field `name`, or None after appending why it is not one."""
    if name not in obj:
        if required:
            problems.append(Problem(line, name, "missing_field", f"`{name}` is missing",
                                    fix=_missing_hint(obj, name)))
        return None
    value = obj[name]
    if not isinstance(value, str):
        problems.append(Problem(line, name, "wrong_type",
                                f"`{name}` must be a string, got {type_name(value)}",
                                excerpt(value), fix=_wrong_type_hint(name, value)))
        return None
    if non_empty and not value.strip():
        problems.append(Problem(line, name, "empty_field", f"`{name}` is empty"))
        return None
    return value


def system_field(obj: dict) -> str | None:
    """Which key holds the record's system message: `system` or `system_prompt` (LLaVA's)."""
    return "system_prompt" if "system_prompt" in obj else "system" if "system" in obj else None


def check_system(obj: dict, line: int, problems: list[Problem]) -> str | None:
    """`system` or `system_prompt`, a string."""
    if "system" in obj and "system_prompt" in obj:
        problems.append(Problem(line, "system", "wrong_type",
                                "give either `system` or `system_prompt`, not both"))
        return None
    name = system_field(obj) or "system"
    value = obj.get(name)
    if value is not None and not isinstance(value, str):
        problems.append(Problem(line, name, "wrong_type",
                                f"`{name}` must be a string, got {type_name(value)}"))
        return None
    return value


def image_field(obj: dict) -> str:
    return "image" if "image" in obj else "images"


def check_image_list(obj: dict, line: int, problems: list[Problem]) -> list[str] | None:
    """The record's image paths: `image` or `images`, each a path or a list of paths."""
    if "images" in obj and "image" in obj:
        problems.append(Problem(line, "images", "wrong_type",
                                "give either `image` or `images`, not both"))
        return None
    name = image_field(obj)
    value = obj.get(name, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        problems.append(Problem(line, name, "wrong_type",
                                f"`{name}` must be a path or a list of paths, got "
                                f"{type_name(value)}", excerpt(value)))
        return None
    return value


def check_video(obj: dict, line: int, problems: list[Problem]) -> bool:
    """False (with the problem) when the record has videos."""
    video = next((k for k in VIDEO_FIELDS if k in obj), None)
    if video:
        problems.append(Problem(line, video, "video_unsupported",
                                f"`{video}`: videos are not supported (Llama 3.2 Vision reads "
                                "images)", fix="leave the record out, or give frames as "
                                               "`images`"))
    return video is None


def check_text(example: Example, obj: dict, line: int, problems: list[Problem],
               system_with_images: bool) -> bool:
    """The checks on the finished conversation: control tokens written as text (a warning),
    and a system message next to images where the template refuses one (an error)."""
    for _, content in example.messages:
        hit = _SPECIAL_TOKEN_RE.search(content.replace(IMAGE, ""))
        if hit:
            problems.append(Problem(line, None, "special_token",
                                    f"the text holds {hit.group()}, which the tokenizer reads "
                                    "as a control token, not as text"))
            break
    if example.system and example.images and not system_with_images:
        name = system_field(obj) or next(
            (f"{k}[0]" for k in ("messages", "conversations") if k in obj), "system")
        problems.append(Problem(
            line, name, "system_with_images",
            f"`{name}` next to images: Llama 3.2 Vision's chat template takes no system message "
            "with images (nor do vLLM and Ollama), so stats and train stop here",
            fix=f"move its text into the first user turn {FIX_DOES_THIS}"))
        return False
    return True
