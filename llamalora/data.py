"""Reading and checking training data: JSONL (or one JSON array) of instruction or `messages` records.

`validate_file` streams the file and reports every problem with its physical line number;
`load_examples` returns the checked records as `Example`s (conversations ready for
`template.render_segments`) or raises `DataError` carrying the same problems. No torch here: the
`validate` and `stats` commands must start fast.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from llamalora.errors import DataError, UsageError
from llamalora.template import IMAGE, IMAGE_PLACEHOLDER, user_text

ERROR_CODES = (
    "invalid_utf8", "invalid_json", "not_object", "missing_field", "wrong_type", "empty_field",
    "image_missing", "image_unreadable", "bad_messages", "no_records", "record_too_large",
)
WARNING_CODES = ("bom", "blank_line", "unknown_field", "duplicate", "special_token")

INSTRUCTION_FIELDS = {"instruction", "input", "output", "system", "image", "images"}
_PLAIN_FIELDS = {"instruction", "input", "output", "system"}
MESSAGES_FIELDS = {"messages", "images", "image", "system"}
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


@dataclass(frozen=True)
class Problem:
    """One finding of the validator. `line` is 1-based; None when not about one line."""

    line: int | None
    field: str | None
    code: str
    message: str
    excerpt: str = ""

    @property
    def is_error(self) -> bool:
        return self.code in ERROR_CODES

    def to_dict(self) -> dict:
        return {"line": self.line, "field": self.field, "code": self.code, "message": self.message}

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line is not None else "file"
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
    """What `validate_file` found. `records` counts every non-blank line (or array element)."""

    path: str
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

    def to_dict(self) -> dict:
        out = {
            "path": self.path,
            "records": self.records,
            "records_ok": self.records_ok,
            "errors": [p.to_dict() for p in self.errors],
            "warnings": [p.to_dict() for p in self.warnings],
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

def _check_string(obj: dict, name: str, line: int, problems: list[Problem], *, required: bool,
                  non_empty: bool) -> str | None:
    if name not in obj:
        if required:
            msg = f"`{name}` is missing"
            if name == "output":
                alias = next((a for a in OUTPUT_ALIASES if a in obj), None)
                if alias:
                    msg += f"; this record has `{alias}`: rename that field to `output`"
            problems.append(Problem(line, name, "missing_field", msg))
        return None
    value = obj[name]
    if not isinstance(value, str):
        hint = ""
        if isinstance(value, (int, float)) or value is True or value is False:
            hint = "; wrap it in quotes (--fix does this)"
        elif isinstance(value, list) and name == "output":
            hint = "; keep one answer per record"
        problems.append(Problem(line, name, "wrong_type",
                                f"`{name}` must be a string, got {_type_name(value)}{hint}",
                                _excerpt(value)))
        return None
    if non_empty and not value.strip():
        problems.append(Problem(line, name, "empty_field", f"`{name}` is empty"))
        return None
    return value


def _image_list(obj: dict, line: int, problems: list[Problem]) -> list[str] | None:
    if "images" in obj and "image" in obj:
        problems.append(Problem(line, "images", "wrong_type",
                                "give either `image` or `images`, not both"))
        return None
    if "image" in obj:
        value = obj["image"]
        if not isinstance(value, str) or not value.strip():
            problems.append(Problem(line, "image", "wrong_type",
                                    f"`image` must be a path string, got {_type_name(value)}",
                                    _excerpt(value)))
            return None
        return [value]
    value = obj.get("images", [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        problems.append(Problem(line, "images", "wrong_type",
                                "`images` must be a list of path strings", _excerpt(value)))
        return None
    return value


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
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:120] if text else type(exc).__name__


def _check_images(names: list[str], base_dir: Path, line: int, problems: list[Problem],
                  field_name: str) -> list[Path]:
    paths = []
    for name in names:
        path = (base_dir / name) if not os.path.isabs(name) else Path(name)
        if not path.is_file():
            problems.append(Problem(line, field_name, "image_missing",
                                    f"image not found: {name} (paths are relative to the data "
                                    f"file's folder)", _excerpt(name)))
            continue
        try:
            read_image(path)
        except Exception as exc:  # PIL raises many types for bad files
            problems.append(Problem(line, field_name, "image_unreadable",
                                    f"image cannot be read: {name} ({image_error(exc)})",
                                    _excerpt(name)))
            continue
        paths.append(path)
    return paths


def _check_messages(obj: dict, line: int, problems: list[Problem], base_dir: Path,
                    check_images: bool) -> Example | None:
    before = len(problems)
    msgs = obj["messages"]
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        problems.append(Problem(line, "system", "wrong_type",
                                f"`system` must be a string, got {_type_name(system)}"))
    if not isinstance(msgs, list) or not msgs:
        problems.append(Problem(line, "messages", "bad_messages",
                                "`messages` must be a non-empty list of {role, content} objects"))
        return None
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            problems.append(Problem(line, where, "bad_messages",
                                    f"{where} must be an object with a string `role`"))
            return None
        role, content = m["role"], m.get("content")
        if not isinstance(content, str):
            problems.append(Problem(line, f"{where}.content", "wrong_type",
                                    f"{where}.content must be a string, got {_type_name(content)}",
                                    _excerpt(content)))
            continue
        if role == "system" and i == 0 and system is None:
            system = content
            continue
        if role not in ("user", "assistant"):
            problems.append(Problem(line, f"{where}.role", "bad_messages",
                                    f"{where}.role is {role!r}; use user or assistant "
                                    "(system only as the first message)"))
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            problems.append(Problem(line, f"{where}.role", "bad_messages",
                                    f"{where}.role is {role!r} where {expected!r} was due: "
                                    "turns must alternate user/assistant, starting with user"))
            continue
        if not content.strip():
            problems.append(Problem(line, f"{where}.content", "empty_field",
                                    f"{where}.content is empty"))
        turns.append((role, content))
    if len(problems) == before and (not turns or turns[-1][0] != "assistant"):
        problems.append(Problem(line, "messages", "bad_messages",
                                "the last turn must be the assistant's (its answer is what is "
                                "trained on)"))
    names = _image_list(obj, line, problems)
    if names is not None:
        placeholders = sum(c.count(IMAGE_PLACEHOLDER) for _, c in turns)
        if placeholders != len(names):
            problems.append(Problem(line, "images", "bad_messages",
                                    f"{placeholders} `{IMAGE_PLACEHOLDER}` placeholder(s) but "
                                    f"{len(names)} image(s); give one image per placeholder"))
        elif check_images:
            images = _check_images(names, base_dir, line, problems, "images")
    if len(problems) > before:
        return None
    turns = [(r, c.replace(IMAGE_PLACEHOLDER, IMAGE)) for r, c in turns]
    return Example(line, system or None, turns, images if names and check_images else [])


def check_record(obj: object, line: int, base_dir: Path, problems: list[Problem],
                 check_images: bool = True, build: bool = True) -> Example | bool | None:
    """Checks one parsed record, appending problems; returns the Example when it has no error
    (with `build=False`, a clean plain record returns True instead of an Example)."""
    # Fast path for the common clean instruction record: same checks, fewer calls (validate's
    # speed target is 2x a bare json.loads loop).
    if type(obj) is dict and obj.keys() <= _PLAIN_FIELDS:
        instruction, output = obj.get("instruction"), obj.get("output")
        input_text, system = obj.get("input", ""), obj.get("system", "")
        if (type(instruction) is str and type(output) is str and type(input_text) is str
                and type(system) is str and instruction.strip() and output.strip()
                and "<|" not in instruction + input_text + output + system):
            if not build:
                return True
            return Example(line, system or None,
                           [("user", user_text(instruction, input_text)), ("assistant", output)])
    if not isinstance(obj, dict):
        problems.append(Problem(line, None, "not_object",
                                f"each record must be a JSON object, got {_type_name(obj)}",
                                _excerpt(obj)))
        return None
    known = MESSAGES_FIELDS if "messages" in obj else INSTRUCTION_FIELDS
    for key in obj.keys() - known:
        problems.append(Problem(line, key, "unknown_field", f"unknown field `{key}` (ignored)"))
    before = sum(p.is_error for p in problems)
    if "messages" in obj:
        example = _check_messages(obj, line, problems, base_dir, check_images)
    else:
        instruction = _check_string(obj, "instruction", line, problems, required=True,
                                    non_empty=True)
        input_text = _check_string(obj, "input", line, problems, required=False, non_empty=False)
        output = _check_string(obj, "output", line, problems, required=True, non_empty=True)
        system = _check_string(obj, "system", line, problems, required=False, non_empty=False)
        names = _image_list(obj, line, problems)
        images = []
        if names and check_images:
            images = _check_images(names, base_dir, line, problems,
                                   "image" if "image" in obj else "images")
        if sum(p.is_error for p in problems) > before:
            return None
        example = Example(line, system or None,
                          [("user", user_text(instruction, input_text or "", len(names))),
                           ("assistant", output)], images)
    if example is not None:
        for role, content in example.messages:
            hit = _SPECIAL_TOKEN_RE.search(content.replace(IMAGE, ""))
            if hit:
                problems.append(Problem(line, None, "special_token",
                                        f"the text holds {hit.group()}, which the tokenizer "
                                        "reads as a control token, not as text"))
                break
    return example


def _fix_record(obj: object) -> dict | None:
    """The --fix rule: numbers and booleans in string fields become strings, a null `input`
    becomes "". Anything else wrong is left for the check to refuse."""
    if not isinstance(obj, dict):
        return None
    fixed = dict(obj)
    for name in _STRING_FIELDS:
        value = fixed.get(name)
        if isinstance(value, (bool, int, float)):
            fixed[name] = json.dumps(value) if isinstance(value, bool) else str(value)
    if "input" in fixed and fixed["input"] is None:
        fixed["input"] = ""
    return fixed


# --- whole files ---------------------------------------------------------------------------------

def _scan(path: Path, *, on_example: Callable[[Example], None] | None, check_images: bool,
          max_problems: int | None, fix_out: Path | None,
          on_progress: Callable[[int], None] | None) -> ValidationReport:
    report = ValidationReport(path=str(path))
    base_dir = path.parent
    seen: dict[int, int] = {}
    tracking_stopped = False

    def keep(problem: Problem) -> None:
        if problem.is_error:
            report.error_counts[problem.code] += 1
            if max_problems is None or len(report.errors) < max_problems:
                report.errors.append(problem)
        else:
            report.warning_counts[problem.code] += 1
            if max_problems is None or len(report.warnings) < max_problems:
                report.warnings.append(problem)

    out = None
    if fix_out is not None:
        out = fix_out.open("w", encoding="utf-8", newline="\n")
    try:
        for item in _iter_items(path, keep):
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
            obj = item.obj
            if out is not None and example is None:
                # The report keeps the original problems; the copy gets the fixed record if the
                # fix rule makes it valid.
                obj = _fix_record(item.obj)
                if obj is not None:
                    example = check_record(obj, item.line, base_dir, [], check_images)
            duplicate_of = None
            if example is not None:
                digest = hash(item.raw)
                if len(seen) < DUPLICATE_TRACK_LIMIT:
                    duplicate_of = seen.setdefault(digest, item.line)
                else:
                    duplicate_of = seen.get(digest, item.line)
                    if not tracking_stopped:
                        tracking_stopped = True
                        keep(Problem(None, None, "duplicate", "duplicate check stopped after "
                                     f"{DUPLICATE_TRACK_LIMIT:,} distinct records (memory cap); "
                                     "later records are checked only against those"))
                if duplicate_of != item.line:
                    problems.append(Problem(item.line, None, "duplicate",
                                            f"exact duplicate of line {duplicate_of}"))
                else:
                    duplicate_of = None
            if problems:
                for p in problems:
                    keep(p)
            if example is None:
                if out is not None:
                    report.dropped_lines.append(item.line)
                continue
            if not problems or not any(p.is_error for p in problems):
                report.records_ok += 1
            if out is not None:
                if duplicate_of is not None:
                    report.dropped_lines.append(item.line)
                else:
                    out.write(json.dumps(obj, ensure_ascii=False) + "\n")
                    report.fixed_records += 1
            if on_example is not None:
                on_example(example)
    finally:
        if out is not None:
            out.close()
    if report.records == 0:
        keep(Problem(None, None, "no_records",
                     "no records: the file is empty or holds only blank lines"))
    return report


def validate_file(path: str | os.PathLike, *, max_problems: int | None = None,
                  fix_out: str | os.PathLike | None = None, check_images: bool = True,
                  on_progress: Callable[[int], None] | None = None) -> ValidationReport:
    """Checks a data file and reports every problem with its line number.

    Args:
        path: A JSONL file, or a JSON file holding one array of records.
        max_problems: Keep at most this many errors and as many warnings in the report (counts
            stay complete).
        fix_out: Write a cleaned JSONL copy here: no BOM, LF line endings, numbers and booleans
            in string fields turned into strings, duplicates and unfixable records left out
            (listed in `dropped_lines`). Must not be the input.
        check_images: Open referenced images to check they exist and are readable.
        on_progress: Called with the count of records read so far, every 10,000 records.

    Raises:
        UsageError: The file can't be read, or `fix_out` is the input.
    """
    path = Path(path)
    fix_path = Path(fix_out) if fix_out is not None else None
    if fix_path is not None and fix_path.exists() and path.exists() and (
            fix_path.resolve() == path.resolve()):
        raise UsageError("--fix must name a new file, not the input; the input is never changed")
    report = _scan(path, on_example=None, check_images=check_images, max_problems=max_problems,
                   fix_out=fix_path, on_progress=on_progress)
    if fix_path is not None:
        report.fixed_path = str(fix_path)
    return report


def scan_examples(path: str | os.PathLike, on_example: Callable[[Example], None], *,
                  check_images: bool = True) -> ValidationReport:
    """Streams a data file, calling `on_example` for each valid record; returns the report.

    Memory stays constant apart from what `on_example` keeps. Pair it with `require_valid`.
    """
    return _scan(Path(path), on_example=on_example, check_images=check_images, max_problems=50,
                 fix_out=None, on_progress=None)


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
                  check_images: bool = True) -> tuple[list[Example], ValidationReport]:
    """Reads and checks a data file, returning its valid records as Examples.

    Raises:
        DataError: The file has invalid records (and `skip_invalid` is off), or none valid.
        UsageError: The file can't be read.
    """
    examples: list[Example] = []
    report = scan_examples(path, examples.append, check_images=check_images)
    require_valid(report, skip_invalid=skip_invalid)
    return examples, report
