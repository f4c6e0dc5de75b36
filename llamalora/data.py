"""Reading and checking training data, in the layouts users have it.

Files: JSONL, or one JSON array, streamed by our own reader so every problem names its physical
line (pyarrow's JSON reader reports none); parquet, CSV and Arrow files, a dataset folder and a
Hub dataset id (`ORG/NAME`, with a split) through `datasets`, whose problems name the row.
Records: Alpaca, OpenAI `messages` and ShareGPT/LLaVA `conversations` (see `check_record`), all
normalized into one `Example`.

`validate_file` reports every problem; `load_examples` returns the checked records as `Example`s
(conversations ready for `template.render_segments`) or raises `DataError` carrying the same
problems. No torch here, and `datasets` only for the formats that need it: the `validate` and
`stats` commands must start fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

from llamalora.errors import DataError, UsageError, first_line
from llamalora.template import IMAGE, IMAGE_PLACEHOLDER, user_text

ERROR_CODES = (
    "invalid_utf8", "invalid_json", "not_object", "missing_field", "wrong_type", "empty_field",
    "image_missing", "image_unreadable", "bad_messages", "no_records", "record_too_large",
    "video_unsupported",
)
WARNING_CODES = ("bom", "blank_line", "unknown_field", "duplicate", "special_token",
                 "system_with_images")

# `id` (LLaVA and ShareGPT sets carry one) is known and ignored.
INSTRUCTION_FIELDS = {"instruction", "input", "output", "system", "system_prompt", "image",
                      "images", "id"}
_PLAIN_FIELDS = {"instruction", "input", "output", "system"}
# Besides the `messages` or `conversations` list itself.
CONVERSATION_FIELDS = {"images", "image", "system", "system_prompt", "id"}
# Names other tools use for the answer; a record with one of these but no `output` gets a hint.
OUTPUT_ALIASES = ("response", "answer", "completion", "target", "chosen")
_STRING_FIELDS = ("instruction", "input", "output", "system")
# Llama 3 control tokens written as text are read as control tokens by the tokenizer.
_SPECIAL_TOKEN_RE = re.compile(r"<\|(?:begin_of_text|end_of_text|eot_id|eom_id|start_header_id|"
                               r"end_header_id|image|python_tag|finetune_right_pad_id|"
                               r"reserved_special_token_\d+)\|>")
_BOM = b"\xef\xbb\xbf"
# A record larger than this is refused without being held in memory (a file that is not JSONL,
# or one line holding a whole data set, would otherwise be read whole).
MAX_RECORD_BYTES = 32 * 2**20
# Distinct records remembered for the duplicate check (~100 bytes each): bounds validate's
# memory on files of tens of millions of records.
DUPLICATE_TRACK_LIMIT = 1_000_000
# Larger images are refused unread (a decompression bomb decodes to gigabytes). Mllama resizes
# every image to at most 4 tiles of 560x560 anyway.
MAX_IMAGE_PIXELS = 50_000_000


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding of the validator. `line` is 1-based; None when not about one line. `unit` is
    "row" for tables (parquet, CSV, Arrow, Hub datasets), where `line` counts rows."""

    line: int | None
    field: str | None
    code: str
    message: str
    excerpt: str = ""
    unit: str = "line"

    @property
    def is_error(self) -> bool:
        return self.code in ERROR_CODES

    def to_dict(self) -> dict:
        return {self.unit: self.line, "field": self.field, "code": self.code,
                "message": self.message}

    def __str__(self) -> str:
        where = f"{self.unit} {self.line}" if self.line is not None else "file"
        return f"{where}: {self.message}"


@dataclass
class Example:
    """A checked record as a conversation: what the training text is built from."""

    line: int
    system: str | None
    messages: list[tuple[str, str]]  # (role, content); content holds <|image|> where images go
    images: list[Path] = field(default_factory=list)


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
    # Set by --fix: records written, and the lines left out because they could not be fixed.
    fixed_path: str | None = None
    fixed_records: int = 0
    dropped_lines: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.error_counts

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
                            "dropped_lines": self.dropped_lines}
        return out


def _type_name(value: object) -> str:
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


def _excerpt(value: object, limit: int = 40) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- reading -----------------------------------------------------------------------------------

class _Item(NamedTuple):
    """One raw unit of the file: a parsed object, or the problem that stopped it parsing.
    (A NamedTuple: one is made per record, and validate's speed budget is tight.)"""

    line: int
    obj: object = None
    raw: bytes | str = b""
    problem: Problem | None = None


def _open_checked(path: Path):
    if not path.exists():
        raise UsageError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise UsageError(f"{path} is a folder; pass a .jsonl or .json file")
    if not path.is_file():
        # A FIFO or device would block or never end; only regular files are read.
        raise UsageError(f"{path} is not a regular file; pass a .jsonl or .json file")
    try:
        return path.open("rb")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read it ({exc.strerror}); check its permissions") from exc


def _first_char(path: Path) -> bytes:
    with _open_checked(path) as f:
        head = f.read(4096)
        if head.startswith(_BOM):
            head = head[3:]
        while head:
            stripped = head.lstrip()
            if stripped:
                return stripped[:1]
            head = f.read(4096)
    return b""


def _lines(f, limit: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, bytes, size) per physical line; bytes is None for a line over `limit`,
    which is skipped in 1 MiB pieces so it never sits in memory whole."""
    lineno = 0
    while True:
        raw = f.readline(limit + 1)
        if not raw:
            return
        lineno += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            size = len(raw)
            while True:
                piece = f.readline(1 << 20)
                size += len(piece)
                if not piece or piece.endswith(b"\n"):
                    break
            yield lineno, None, size
            continue
        yield lineno, raw, len(raw)


def _too_large(line: int, size: int) -> Problem:
    return Problem(line, None, "record_too_large",
                   f"record of {size / 2**20:.0f} MiB is over the {MAX_RECORD_BYTES // 2**20} "
                   "MiB limit (skipped); split it or check that the file is JSONL")


def _iter_jsonl(f, warn: Callable[[Problem], None]) -> Iterator[_Item]:
    loads = json.loads
    for lineno, raw, size in _lines(f, MAX_RECORD_BYTES):
        if raw is None:
            yield _Item(lineno, problem=_too_large(lineno, size))
            continue
        if lineno == 1 and raw.startswith(_BOM):
            raw = raw[3:]
            warn(Problem(1, None, "bom", "the file starts with a byte-order mark; "
                         "--fix writes a copy without it"))
        if not raw.strip():
            warn(Problem(lineno, None, "blank_line", "blank line (skipped)"))
            continue
        line = raw.rstrip(b"\r\n")  # keep leading blanks so JSON columns match the file
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield _Item(lineno, raw=line, problem=Problem(
                lineno, None, "invalid_utf8",
                f"not valid UTF-8 (byte {exc.start + 1}); re-save the file as UTF-8"))
            continue
        try:
            obj = loads(text)
        except json.JSONDecodeError as exc:
            yield _Item(lineno, raw=line, problem=Problem(
                lineno, None, "invalid_json",
                f"invalid JSON: {exc.msg} (column {exc.colno})", _excerpt(text)))
            continue
        except RecursionError:
            yield _Item(lineno, raw=line, problem=Problem(
                lineno, None, "invalid_json", "invalid JSON: nested too deeply"))
            continue
        yield _Item(lineno, obj=obj, raw=line)


def _iter_json_array(path: Path, warn: Callable[[Problem], None]) -> Iterator[_Item]:
    """Streams the elements of a top-level JSON array, reading 1 MiB at a time; each element's
    line is where it starts."""
    import codecs

    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    ws = re.compile(r"[ \t\n\r]*")
    with _open_checked(path) as f:
        buf, pos, eof = "", 0, False
        line, counted = 1, 0  # the line at buf[counted]; offsets asked for only grow
        consumed_bytes = 0

        def more() -> bool:
            nonlocal buf, eof, consumed_bytes
            if eof:
                return False
            chunk = f.read(1 << 20)
            if consumed_bytes == 0 and chunk.startswith(_BOM):
                chunk = chunk[3:]
                warn(Problem(1, None, "bom", "the file starts with a byte-order mark; "
                             "--fix writes a copy without it"))
            consumed_bytes += len(chunk)
            eof = not chunk
            buf += utf8.decode(chunk, final=eof)
            return not eof

        def skip_ws() -> None:
            nonlocal pos
            while True:
                pos = ws.match(buf, pos).end()
                if pos < len(buf) or not more():
                    return

        def line_at(offset: int) -> int:
            nonlocal line, counted
            if offset > counted:
                line += buf.count("\n", counted, offset)
                counted = offset
            return line

        def invalid(message: str) -> _Item:
            at = line_at(pos)
            col = pos - (buf.rfind("\n", 0, pos) + 1) + 1
            return _Item(at, problem=Problem(at, None, "invalid_json",
                                             f"invalid JSON: {message} (column {col}); the rest "
                                             "of the array is unread", _excerpt(buf[pos:pos + 40])))

        try:
            skip_ws()
            pos += 1  # the "[" that _first_char saw
            skip_ws()
            if buf.startswith("]", pos):
                return
            while True:
                start = pos
                while True:
                    try:
                        obj, end = decoder.raw_decode(buf, start)
                        break
                    except json.JSONDecodeError as exc:
                        if len(buf) - start > MAX_RECORD_BYTES:
                            yield _Item(line_at(start), problem=_too_large(
                                line_at(start), len(buf) - start))
                            return
                        if not more():
                            pos = exc.pos
                            yield invalid(exc.msg)
                            return
                    except RecursionError:
                        yield _Item(line_at(start), problem=Problem(
                            line_at(start), None, "invalid_json",
                            "invalid JSON: nested too deeply; the rest of the array is unread"))
                        return
                if end - start > MAX_RECORD_BYTES:
                    yield _Item(line_at(start), problem=_too_large(line_at(start), end - start))
                else:
                    yield _Item(line_at(start), obj=obj, raw=buf[start:end])
                pos = end
                skip_ws()
                if buf.startswith(",", pos):
                    pos += 1
                    skip_ws()
                elif buf.startswith("]", pos):
                    pos += 1
                    skip_ws()
                    if pos < len(buf):
                        yield invalid("extra data after the array")
                    return
                else:
                    yield invalid("expected ',' or ']'")
                    return
                # Drop what is consumed once it is most of the buffer (amortized O(1)).
                if pos > (1 << 20):
                    line_at(pos)
                    buf, pos, counted = buf[pos:], 0, 0
        except UnicodeDecodeError:
            at = line + buf.count("\n", counted)
            yield _Item(at, problem=Problem(
                at, None, "invalid_utf8",
                f"not valid UTF-8 near line {at}; re-save the file as UTF-8"))


def _iter_items(path: Path, warn: Callable[[Problem], None]) -> Iterator[_Item]:
    if _first_char(path) == b"[":
        yield from _iter_json_array(path, warn)
    else:
        with _open_checked(path) as f:
            yield from _iter_jsonl(f, warn)


# --- checking one record -----------------------------------------------------------------------
#
# Every layout is normalized into one `Example`: Alpaca (`instruction`/`input`/`output`), OpenAI
# `messages` (`role`/`content`, content a string or a list of text/image parts), and ShareGPT /
# LLaVA `conversations` (`from`/`value`); `system` or `system_prompt`; `image` (a path or a list)
# or `images`; `<image>` placeholders anywhere in a turn.

# ShareGPT's speaker names -> ours.
_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
          "system": "system"}
_VIDEO_FIELDS = ("video", "videos")
# What other tools call the two Alpaca fields; --fix renames these when the real one is absent.
_RENAMES = {"output": OUTPUT_ALIASES, "instruction": ("prompt", "question", "query")}


def _check_string(obj: dict, name: str, line: int, problems: list[Problem], *, required: bool,
                  non_empty: bool) -> str | None:
    if name not in obj:
        if required:
            msg = f"`{name}` is missing"
            alias = next((a for a in _RENAMES.get(name, ()) if a in obj), None)
            if alias is None and name == "instruction" and "input" in obj:
                alias = "input"
            if alias:
                msg += f"; this record has `{alias}`: rename it to `{name}` (--fix does this)"
            elif isinstance(obj.get("instances"), list):
                msg += ("; this record nests its examples in `instances`: give each as its own "
                        "record (--fix does this)")
            elif "text" in obj:
                msg += ("; a `text`-only record is plain text, and llamalora trains on "
                        "instruction/output pairs or conversations")
            problems.append(Problem(line, name, "missing_field", msg))
        return None
    value = obj[name]
    if not isinstance(value, str):
        hint = ""
        if isinstance(value, (int, float)) or value is True or value is False:
            hint = "; wrap it in quotes (--fix does this)"
        elif isinstance(value, list) and name == "output":
            hint = "; keep one answer per record"
        elif isinstance(value, dict):
            keys = [k for k, v in value.items() if isinstance(v, str)]
            hint = (f"; it holds {', '.join(f'`{name}.{k}`' for k in keys[:3])}: put the text "
                    f"itself in `{name}`" if keys else "; put the text itself in it")
        problems.append(Problem(line, name, "wrong_type",
                                f"`{name}` must be a string, got {_type_name(value)}{hint}",
                                _excerpt(value)))
        return None
    if non_empty and not value.strip():
        problems.append(Problem(line, name, "empty_field", f"`{name}` is empty"))
        return None
    return value


def _system(obj: dict, line: int, problems: list[Problem]) -> str | None:
    """`system` or `system_prompt` (LLaVA's name), a string."""
    if "system" in obj and "system_prompt" in obj:
        problems.append(Problem(line, "system", "wrong_type",
                                "give either `system` or `system_prompt`, not both"))
        return None
    name = "system_prompt" if "system_prompt" in obj else "system"
    value = obj.get(name)
    if value is not None and not isinstance(value, str):
        problems.append(Problem(line, name, "wrong_type",
                                f"`{name}` must be a string, got {_type_name(value)}"))
        return None
    return value


def _image_list(obj: dict, line: int, problems: list[Problem]) -> list[str] | None:
    """The record's image paths: `image` or `images`, each a path or a list of paths."""
    if "images" in obj and "image" in obj:
        problems.append(Problem(line, "images", "wrong_type",
                                "give either `image` or `images`, not both"))
        return None
    name = "image" if "image" in obj else "images"
    value = obj.get(name, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        problems.append(Problem(line, name, "wrong_type",
                                f"`{name}` must be a path or a list of paths, got "
                                f"{_type_name(value)}", _excerpt(value)))
        return None
    return value


def resolve_image(name: str | os.PathLike, root: Path) -> Path:
    """Where an image path of a record (or chat's --image) points: absolute as given, relative
    under `root` (--image-root, by default the data file's folder)."""
    return Path(name) if os.path.isabs(name) else root / name


def read_image(path: Path) -> None:
    """Opens and fully decodes an image, as training will; refuses decompression bombs
    (over MAX_IMAGE_PIXELS) before decoding them."""
    import warnings

    from PIL import Image  # only for data with images; keeps validate's start fast

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"{im.width}x{im.height} pixels is over the "
                                 f"{MAX_IMAGE_PIXELS:,}-pixel limit")
            im.load()


def image_error(exc: Exception) -> str:
    return first_line(exc)[:120]


def _check_images(names: list[str], root: Path, line: int, problems: list[Problem],
                  field_name: str) -> list[Path]:
    paths = []
    for name in names:
        path = resolve_image(name, root)
        if not path.is_file():
            # LLaVA-style sets keep their images in an `images/` folder next to the data.
            nearby = next((d for d in (root / "images", root.parent / "images")
                           if not os.path.isabs(name) and (d / name).is_file()), None)
            hint = (f"; it is in {nearby}: pass --image-root {nearby}" if nearby else
                    "; pass --image-root DIR, the folder relative image paths start from")
            problems.append(Problem(line, field_name, "image_missing",
                                    f"image not found: {path}{hint}", _excerpt(name)))
            continue
        try:
            read_image(path)
        except Exception as exc:  # PIL raises many types for bad files
            problems.append(Problem(line, field_name, "image_unreadable",
                                    f"image cannot be read: {path} ({image_error(exc)})",
                                    _excerpt(name)))
            continue
        paths.append(path)
    return paths


def _content_text(content: object, where: str, line: int, problems: list[Problem],
                  part_images: list[str]) -> str | None:
    """A turn's content as text: a string, or a list of OpenAI-style parts (text parts joined,
    each image part an `<image>` placeholder; an image part's own path goes to `part_images`)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        problems.append(Problem(line, f"{where}.content", "wrong_type",
                                f"{where}.content must be a string or a list of parts, got "
                                f"{_type_name(content)}", _excerpt(content)))
        return None
    text = ""
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            text += part["text"]
        elif kind in ("image", "image_url"):
            text += IMAGE_PLACEHOLDER
            ref = part.get("image") or part.get("path") or part.get("url") or part.get(
                "image_url")
            if isinstance(ref, dict):
                ref = ref.get("url")
            if isinstance(ref, str) and ref.strip():
                part_images.append(ref)
        else:
            problems.append(Problem(line, f"{where}.content[{k}]", "bad_messages",
                                    f"{where}.content[{k}] must be {{\"type\": \"text\", "
                                    "\"text\": ...} or {\"type\": \"image\"}", _excerpt(part)))
            return None
    return text


def _check_turns(obj: dict, key: str, line: int, problems: list[Problem], root: Path,
                 check_images: bool) -> Example | None:
    """A `messages` or `conversations` record: turns of `role`/`content` or ShareGPT's
    `from`/`value` (human/gpt), alternating user and assistant, ending with the assistant."""
    before = len(problems)
    msgs = obj[key]
    system = _system(obj, line, problems)
    if not isinstance(msgs, list) or not msgs:
        problems.append(Problem(line, key, "bad_messages",
                                f"`{key}` must be a non-empty list of {{role, content}} (or "
                                "{from, value}) objects"))
        return None
    turns: list[tuple[str, str]] = []
    part_images: list[str] = []
    for i, m in enumerate(msgs):
        where = f"{key}[{i}]"
        speaker = m.get("role", m.get("from")) if isinstance(m, dict) else None
        if not isinstance(speaker, str):
            problems.append(Problem(line, where, "bad_messages",
                                    f"{where} must be an object with a string `role` (or "
                                    "ShareGPT's `from`)"))
            return None
        content = m.get("content", m.get("value"))
        content = _content_text(content, where, line, problems, part_images)
        if content is None:
            continue
        role = _ROLES.get(speaker)
        if role == "system" and i == 0 and system is None:
            system = content
            continue
        if role not in ("user", "assistant"):
            problems.append(Problem(line, f"{where}.role", "bad_messages",
                                    f"{where}.role is {speaker!r}; use user or assistant (human "
                                    "or gpt), system only as the first turn"))
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            problems.append(Problem(line, f"{where}.role", "bad_messages",
                                    f"{where}.role is {speaker!r} where {expected!r} was due: "
                                    "turns must alternate user/assistant, starting with user"))
            continue
        if not content.strip():
            problems.append(Problem(line, f"{where}.content", "empty_field",
                                    f"{where}.content is empty"))
        turns.append((role, content))
    if len(problems) == before and (not turns or turns[-1][0] != "assistant"):
        problems.append(Problem(line, key, "bad_messages",
                                "the last turn must be the assistant's (its answer is what is "
                                "trained on)"))
    names = _image_list(obj, line, problems)
    if names is not None and part_images:
        if names:
            problems.append(Problem(line, "images", "bad_messages",
                                    "image paths are given both in the content parts and in "
                                    "`images`; keep one"))
            names = None
        else:
            names = part_images
    images: list[Path] = []
    if names is not None:
        placeholders = sum(c.count(IMAGE_PLACEHOLDER) for _, c in turns)
        if placeholders != len(names):
            problems.append(Problem(line, "images", "bad_messages",
                                    f"{placeholders} `{IMAGE_PLACEHOLDER}` placeholder(s) but "
                                    f"{len(names)} image(s); give one image per placeholder"))
        elif check_images:
            images = _check_images(names, root, line, problems, "images")
    if len(problems) > before:
        return None
    turns = [(r, c.replace(IMAGE_PLACEHOLDER, IMAGE)) for r, c in turns]
    return Example(line, system or None, turns, images)


def _check_instruction(obj: dict, line: int, problems: list[Problem], root: Path,
                       check_images: bool) -> Example | None:
    """An Alpaca record. Images go where `<image>` placeholders are, else before the text."""
    before = sum(p.is_error for p in problems)
    instruction = _check_string(obj, "instruction", line, problems, required=True,
                                non_empty=True)
    input_text = _check_string(obj, "input", line, problems, required=False, non_empty=False)
    output = _check_string(obj, "output", line, problems, required=True, non_empty=True)
    system = _system(obj, line, problems)
    names = _image_list(obj, line, problems)
    if sum(p.is_error for p in problems) > before or names is None:
        return None
    placeholders = (instruction + (input_text or "")).count(IMAGE_PLACEHOLDER)
    if placeholders and placeholders != len(names):
        problems.append(Problem(line, "image" if "image" in obj else "images", "bad_messages",
                                f"{placeholders} `{IMAGE_PLACEHOLDER}` placeholder(s) but "
                                f"{len(names)} image(s); give one image per placeholder"))
        return None
    images = []
    if names and check_images:
        images = _check_images(names, root, line, problems,
                               "image" if "image" in obj else "images")
        if sum(p.is_error for p in problems) > before:
            return None
    user = user_text(instruction, input_text or "", 0 if placeholders else len(names))
    return Example(line, system or None,
                   [("user", user.replace(IMAGE_PLACEHOLDER, IMAGE)), ("assistant", output)],
                   images)


def check_record(obj: object, line: int, base_dir: Path, problems: list[Problem],
                 check_images: bool = True, build: bool = True) -> Example | bool | None:
    """Checks one parsed record, appending problems; returns the Example when it has no error
    (with `build=False`, a clean plain record returns True instead of an Example).

    `base_dir` is where relative image paths start (--image-root, or the data file's folder).
    """
    # Fast path for the common clean instruction record: same checks, fewer calls (validate's
    # speed target is 2x a bare json.loads loop).
    if type(obj) is dict and obj.keys() <= _PLAIN_FIELDS:
        instruction, output = obj.get("instruction"), obj.get("output")
        input_text, system = obj.get("input", ""), obj.get("system", "")
        if (type(instruction) is str and type(output) is str and type(input_text) is str
                and type(system) is str and instruction.strip() and output.strip()):
            text = instruction + input_text + output + system
            if "<|" not in text and IMAGE_PLACEHOLDER not in text:
                if not build:
                    return True
                return Example(line, system or None, [("user", user_text(instruction, input_text)),
                                                      ("assistant", output)])
    if not isinstance(obj, dict):
        problems.append(Problem(line, None, "not_object",
                                f"each record must be a JSON object, got {_type_name(obj)}",
                                _excerpt(obj)))
        return None
    video = next((k for k in _VIDEO_FIELDS if k in obj), None)
    if video:
        problems.append(Problem(line, video, "video_unsupported",
                                f"`{video}`: videos are not supported (Llama 3.2 Vision reads "
                                "images); leave the record out, or give frames as `images`"))
        return None
    key = next((k for k in ("messages", "conversations") if k in obj), None)
    known = CONVERSATION_FIELDS | {key} if key else INSTRUCTION_FIELDS
    for name in obj.keys() - known:
        problems.append(Problem(line, name, "unknown_field", f"unknown field `{name}` (ignored)"))
    if key:
        example = _check_turns(obj, key, line, problems, base_dir, check_images)
    else:
        example = _check_instruction(obj, line, problems, base_dir, check_images)
    if example is not None:
        for role, content in example.messages:
            hit = _SPECIAL_TOKEN_RE.search(content.replace(IMAGE, ""))
            if hit:
                problems.append(Problem(line, None, "special_token",
                                        f"the text holds {hit.group()}, which the tokenizer "
                                        "reads as a control token, not as text"))
                break
        if example.system and example.images:
            # A warning, not an error: validate knows no tokenizer, and another template may
            # take it; stats and train render with the tokenizer's and stop at this line.
            problems.append(Problem(
                line, "system", "system_with_images",
                "Llama 3.2 Vision's chat template takes no system message next to images (nor "
                "do vLLM and Ollama): stats and train with it stop here; drop `system` from "
                "records with images"))
    return example


def _fix_record(obj: object) -> list[dict]:
    """The --fix rule: what other tools call `output` / `instruction` is renamed to it, the
    examples nested in `instances` become records of their own, numbers and booleans in string
    fields become strings, and a null `input` becomes "". Anything else wrong is left for the
    check to refuse. Returns the fixed record(s); [] when it is not an object."""
    if not isinstance(obj, dict):
        return []
    fixed = dict(obj)
    for name, aliases in _RENAMES.items():
        alias = next((a for a in aliases if a in fixed), None)
        if name not in fixed and alias:
            fixed[name] = fixed.pop(alias)
    if "instruction" not in fixed and "input" in fixed and "output" in fixed:
        fixed["instruction"] = fixed.pop("input")
    instances = fixed.get("instances")
    if "output" not in fixed and isinstance(instances, list) and instances:
        base = {k: v for k, v in fixed.items() if k in INSTRUCTION_FIELDS}
        return [r for inst in instances if isinstance(inst, dict)
                for r in _fix_record({**base, **inst})]
    for name in _STRING_FIELDS:
        value = fixed.get(name)
        if isinstance(value, (bool, int, float)):
            fixed[name] = json.dumps(value) if isinstance(value, bool) else str(value)
    if "input" in fixed and fixed["input"] is None:
        fixed["input"] = ""
    return [fixed]


# --- where records come from -------------------------------------------------------------------

# Table files read through `datasets` (its builder name, options).
TABLE_FILES = {".parquet": ("parquet", {}), ".csv": ("csv", {}),
               ".tsv": ("csv", {"delimiter": "\t"}), ".arrow": ("arrow", {})}
_DATA_SUFFIXES = (".jsonl", ".json", ".ndjson", *TABLE_FILES)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Source:
    """A data set as given to a command: a JSON/JSONL file (`kind` "json"), or a table through
    `datasets` ("table": a parquet/CSV/Arrow file, a dataset folder, or a Hub id)."""

    name: str
    kind: str
    path: Path | None  # the file or folder; None for a Hub id
    split: str = "train"
    _table: object = field(default=None, repr=False)

    @property
    def unit(self) -> str:
        return "line" if self.kind == "json" else "row"

    @property
    def folder(self) -> Path:
        """Where relative image paths start unless --image-root says otherwise."""
        if self.path is None:
            return Path.cwd()
        return self.path if self.path.is_dir() else self.path.parent

    def items(self, warn: Callable[[Problem], None]) -> Iterator[_Item]:
        if self.kind == "json":
            return _iter_items(self.path, warn)
        return _iter_rows(self.table())

    def table(self):
        """The rows as a `datasets.Dataset` (loaded once; memory-mapped from its cache)."""
        if self._table is None:
            self._table = _load_table(self)
        return self._table

    def fingerprint(self) -> str:
        """What identifies the data: the file's SHA-256, or the dataset's fingerprint."""
        if self.kind == "json":
            h = hashlib.sha256()
            with _open_checked(self.path) as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            return h.hexdigest()
        return f"{self.table()._fingerprint}"


def open_source(path: str | os.PathLike, split: str = "train") -> Source:
    """Decides how to read `path`: a JSON/JSONL file, a table file, a dataset folder or a Hub
    dataset id (`ORG/NAME`, not found as a local path).

    Raises:
        UsageError: Nothing is found at `path`.
    """
    name = os.fspath(path)
    local = Path(name).expanduser()
    if local.is_dir():
        return Source(name, "table", local, split)
    if local.exists():
        kind = "table" if local.suffix.lower() in TABLE_FILES else "json"
        return Source(name, kind, local, split)
    first = Path(name.split("/")[0])
    if (_HUB_ID.match(name) and not name.lower().endswith(_DATA_SUFFIXES)
            and not first.exists()):
        return Source(name, "table", None, split)
    raise UsageError(f"{local}: no such file; check the path (a Hub dataset is given as "
                     "ORG/NAME)")


def _load_table(source: Source):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    datasets.disable_progress_bars()  # its bars would mix with our output on stderr
    datasets.logging.set_verbosity_error()
    what = (source.name if source.path is not None and source.path.is_file() else
            f"the dataset folder {source.name}" if source.path is not None else source.name)
    try:
        if source.path is not None and source.path.is_file():
            builder, options = TABLE_FILES[source.path.suffix.lower()]
            ds = datasets.load_dataset(builder, data_files=str(source.path), split="train",
                                       **options)
        elif source.path is not None and ((source.path / "state.json").is_file() or (
                source.path / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(source.path))  # a `save_to_disk` folder
            if isinstance(ds, datasets.DatasetDict):
                if source.split not in ds:
                    raise ValueError(f"Unknown split {source.split!r}; it has {list(ds)}")
                ds = ds[source.split]
        else:
            ds = datasets.load_dataset(str(source.path or source.name), split=source.split)
    except ValueError as exc:
        reason = first_line(exc, with_type=False, limit=300)
        if "split" in str(exc).lower():
            raise UsageError(f"--split {source.split}: {source.name} has no such split "
                             f"({reason})") from exc
        raise UsageError(f"cannot read {what}: {reason}") from exc
    except (DatasetNotFoundError, ConnectionError, FileNotFoundError) as exc:
        reason = first_line(exc, with_type=False, limit=300)
        if source.path is not None:
            raise UsageError(f"cannot read {what}: {reason}") from exc
        raise UsageError(f"cannot load the Hub dataset {source.name} ({reason}); if it "
                         "is gated, log in with `hf auth login` and accept its terms on its Hub "
                         "page; offline, pass a local file or folder (a dataset used once before "
                         "loads from the cache with HF_DATASETS_OFFLINE=1)") from exc
    except Exception as exc:  # pyarrow and the CSV reader raise many types for a bad file
        raise UsageError(f"cannot read {what}: {first_line(exc, limit=300)}"
                         ) from exc
    # Embedded media (datasets' Image/Video features, alone or in a list) have no path to give.
    embedded = [n for n, f in ds.features.items() if re.search(r"\b(Image|Video)\(", repr(f))]
    if embedded:
        raise UsageError(f"{source.name}: column `{embedded[0]}` holds embedded images or videos "
                         "(a datasets Image/Video column); llamalora reads images from files: "
                         "save them and give their paths in `image` / `images`")
    return ds


def _drop_nulls(value):
    """A table row as the record it stands for: a null cell (a column this row lacks, or a
    struct field another row has) is no field at all."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _iter_rows(ds, batch: int = 1000) -> Iterator[_Item]:
    """The rows of a `datasets.Dataset`, numbered from 1, a thousand at a time."""
    dumps = json.dumps
    for start in range(0, len(ds), batch):
        columns = ds[start:start + batch]
        names = list(columns)
        for i, values in enumerate(zip(*columns.values())):
            row = _drop_nulls(dict(zip(names, values)))
            yield _Item(start + i + 1, obj=row, raw=dumps(row, sort_keys=True, ensure_ascii=False,
                                                         default=str))


# --- whole files ---------------------------------------------------------------------------------

def _scan(source: Source, *, on_example: Callable[[Example], None] | None, check_images: bool,
          max_problems: int | None, fix_out: Path | None,
          on_progress: Callable[[int], None] | None,
          image_root: str | os.PathLike | None = None) -> ValidationReport:
    report = ValidationReport(path=source.name, unit=source.unit)
    base_dir = Path(image_root).expanduser() if image_root is not None else source.folder
    if image_root is not None and not base_dir.is_dir():
        raise UsageError(f"--image-root {image_root}: no such folder")
    seen: dict[int, int] = {}
    tracking_stopped = False
    rows = source.unit == "row"

    def keep(problem: Problem) -> None:
        if rows:
            problem = replace(problem, unit="row")
        if problem.is_error:
            report.error_counts[problem.code] += 1
            if max_problems is None or len(report.errors) < max_problems:
                report.errors.append(problem)
        else:
            report.warning_counts[problem.code] += 1
            if max_problems is None or len(report.warnings) < max_problems:
                report.warnings.append(problem)

    def first_seen(raw: bytes | str) -> int | None:
        nonlocal tracking_stopped
        digest = hash(raw)
        if len(seen) < DUPLICATE_TRACK_LIMIT:
            return seen.setdefault(digest, item.line)
        if not tracking_stopped:
            tracking_stopped = True
            keep(Problem(None, None, "duplicate", "duplicate check stopped after "
                         f"{DUPLICATE_TRACK_LIMIT:,} distinct records (memory cap); "
                         "later records are checked only against those"))
        return seen.get(digest, item.line)

    out = None
    if fix_out is not None:
        out = fix_out.open("w", encoding="utf-8", newline="\n")
    try:
        for item in source.items(keep):
            report.records += 1
            if on_progress is not None and report.records % 10000 == 0:
                on_progress(report.records)
            if item.problem is not None:
                keep(item.problem)
                if out is not None:
                    report.dropped_lines.append(item.line)
                continue
            problems: list[Problem] = []
            example = check_record(item.obj, item.line, base_dir, problems, check_images,
                                   build=on_example is not None)
            duplicate_of = None
            if example is not None:
                duplicate_of = first_seen(item.raw)
                if duplicate_of != item.line:
                    problems.append(Problem(item.line, None, "duplicate",
                                            f"exact duplicate of {source.unit} {duplicate_of}"))
                else:
                    duplicate_of = None
            for p in problems:
                keep(p)
            if example is not None and not any(p.is_error for p in problems):
                report.records_ok += 1
                if on_example is not None:
                    on_example(example)
            if out is None:
                continue
            # The copy: a clean record as it is; a bad one as the fix rule makes it, if that is
            # valid (the report keeps the original problems); duplicates left out.
            if example is not None:
                written = [item.obj] if duplicate_of is None else []
            else:
                written = []
                for fixed in _fix_record(item.obj):
                    text = json.dumps(fixed, ensure_ascii=False)
                    if (check_record(fixed, item.line, base_dir, [], check_images)
                            and first_seen(text) == item.line):
                        written.append(fixed)
            for record in written:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            report.fixed_records += len(written)
            if not written:
                report.dropped_lines.append(item.line)
    finally:
        if out is not None:
            out.close()
    if report.records == 0:
        keep(Problem(None, None, "no_records",
                     "no records: the file is empty or holds only blank lines"))
    return report


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
        fix_out: Write a cleaned JSONL copy here: no BOM, LF line endings, the fields other
            tools name `response`, `prompt`... renamed, `instances` spread into records,
            numbers and booleans in string fields turned into strings, duplicates and unfixable
            records left out (listed in `dropped_lines`). Must not be the input. When no record
            is left, the file is removed and `fixed_path` stays None.
        check_images: Open referenced images to check they exist and are readable.
        on_progress: Called with the count of records read so far, every 10,000 records.
        image_root: Where relative image paths start (default: the data file's folder).
        split: The split of a dataset folder or Hub dataset.

    Raises:
        UsageError: The data can't be read, or `fix_out` is the input.
    """
    source = open_source(path, split)
    fix_path = Path(fix_out) if fix_out is not None else None
    if fix_path is not None and fix_path.exists() and source.path is not None and (
            fix_path.resolve() == source.path.resolve()):
        raise UsageError("--fix must name a new file, not the input; the input is never changed")
    report = _scan(source, on_example=None, check_images=check_images, max_problems=max_problems,
                   fix_out=fix_path, on_progress=on_progress, image_root=image_root)
    if fix_path is not None:
        if report.fixed_records:
            report.fixed_path = str(fix_path)
        else:
            fix_path.unlink(missing_ok=True)
    return report


def scan_examples(path: str | os.PathLike | Source, on_example: Callable[[Example], None], *,
                  check_images: bool = True, image_root: str | os.PathLike | None = None,
                  split: str = "train") -> ValidationReport:
    """Streams a data set, calling `on_example` for each valid record; returns the report.

    Memory stays constant apart from what `on_example` keeps. Pair it with `require_valid`.
    """
    source = path if isinstance(path, Source) else open_source(path, split)
    return _scan(source, on_example=on_example, check_images=check_images, max_problems=50,
                 fix_out=None, on_progress=None, image_root=image_root)


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
                  split: str = "train") -> tuple[list[Example], ValidationReport]:
    """Reads and checks a data set, returning its valid records as Examples.

    Raises:
        DataError: The data has invalid records (and `skip_invalid` is off), or none valid.
        UsageError: The data can't be read.
    """
    examples: list[Example] = []
    report = scan_examples(path, examples.append, check_images=check_images,
                           image_root=image_root, split=split)
    require_valid(report, skip_invalid=skip_invalid)
    return examples, report
