"""JSONL and JSON-array files, streamed by our own reader so every problem names its physical
line (pyarrow's JSON reader reports none).

Each reader yields items `(line, obj, raw, problem)`: a parsed record with the bytes (or text) it
was parsed from, or the `Problem` that stopped it parsing (then `obj` is None). Plain tuples: one
is made per record, and validate's speed budget is a bare `json.loads` loop's 1.5x.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Iterator
from json.scanner import make_scanner
from pathlib import Path

from llamalora.data.problems import Problem, excerpt
from llamalora.errors import UsageError

BOM = b"\xef\xbb\xbf"
# A record larger than this is refused without being held in memory (a file that is not JSONL,
# or one line holding a whole data set, would otherwise be read whole).
MAX_RECORD_BYTES = 32 * 2**20

Item = tuple[int, object, "bytes | str", "Problem | None"]
Warn = Callable[[Problem], None]

# json.loads, less its Python layers (decode -> raw_decode and two regex matches): the C scanner
# that does the parsing, called directly. A line it does not take whole (leading or trailing
# blanks, bad JSON) goes to json.loads, which decides and words the error.
_scan_once = make_scanner(json.JSONDecoder())
_BOM_WARNING = "the file starts with a byte-order mark; --fix writes a copy without it"
_WS = re.compile(r"[ \t\n\r]*")


def open_checked(path: Path):
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
    with open_checked(path) as f:
        head = f.read(4096)
        if head.startswith(BOM):
            head = head[3:]
        while head:
            stripped = head.lstrip()
            if stripped:
                return stripped[:1]
            head = f.read(4096)
    return b""


def too_large(line: int, size: int) -> Problem:
    return Problem(line, None, "record_too_large",
                   f"record of {size / 2**20:.0f} MiB is over the {MAX_RECORD_BYTES // 2**20} "
                   "MiB limit (skipped)", fix="split it or check that the file is JSONL")


def iter_json_file(path: Path, warn: Warn) -> Iterator[Item]:
    """The records of a JSONL file, or of a file holding one JSON array."""
    if _first_char(path) == b"[":
        yield from _ArrayReader(path, warn).items()
    else:
        with open_checked(path) as f:
            yield from iter_jsonl(f, warn)


def _skip_rest(f, size: int) -> int:
    """Reads past the rest of an over-long line, 1 MiB at a time; returns the line's size."""
    while True:
        piece = f.readline(1 << 20)
        size += len(piece)
        if not piece or piece.endswith(b"\n"):
            return size


def _parse_failure(lineno: int, line: bytes, text: str | None, exc: Exception) -> Item:
    if isinstance(exc, UnicodeDecodeError):
        return lineno, None, line, Problem(
            lineno, None, "invalid_utf8", f"not valid UTF-8 (byte {exc.start + 1})",
            fix="re-save the file as UTF-8")
    if isinstance(exc, RecursionError):
        return lineno, None, line, Problem(lineno, None, "invalid_json",
                                           "invalid JSON: nested too deeply")
    return lineno, None, line, Problem(lineno, None, "invalid_json",
                                       f"invalid JSON: {exc.msg} (column {exc.colno})",
                                       excerpt(text))


def iter_jsonl(f, warn: Warn) -> Iterator[Item]:
    """One item per non-blank physical line; a line over MAX_RECORD_BYTES is skipped unread."""
    readline, scan, loads = f.readline, _scan_once, json.loads
    limit = MAX_RECORD_BYTES
    lineno = 0
    while raw := readline(limit + 1):
        lineno += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            yield lineno, None, b"", too_large(lineno, _skip_rest(f, len(raw)))
            continue
        if lineno == 1 and raw.startswith(BOM):
            raw = raw[3:]
            warn(Problem(1, None, "bom", _BOM_WARNING))
        line = raw.rstrip(b"\r\n")  # keep leading blanks so JSON columns match the file
        if not line or line.isspace():
            warn(Problem(lineno, None, "blank_line", "blank line (skipped)"))
            continue
        text = None
        try:
            text = line.decode()
            try:
                obj, end = scan(text, 0)
            except StopIteration:
                end = -1
            if end != len(text):
                obj = loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            yield _parse_failure(lineno, line, text, exc)
            continue
        yield lineno, obj, line, None


class _ArrayReader:
    """Streams the elements of a top-level JSON array, reading 1 MiB at a time; each element's
    line is where it starts."""

    def __init__(self, path: Path, warn: Warn):
        self.path, self.warn = path, warn
        self.decoder = json.JSONDecoder()
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.buf, self.pos, self.eof = "", 0, False
        self.line, self.counted = 1, 0  # the line at buf[counted]; offsets asked for only grow
        self.read_bytes = 0
        self.lost = False  # an element's end was never found: the rest is unread

    def more(self) -> bool:
        if self.eof:
            return False
        chunk = self.f.read(1 << 20)
        if self.read_bytes == 0 and chunk.startswith(BOM):
            chunk = chunk[3:]
            self.warn(Problem(1, None, "bom", _BOM_WARNING))
        self.read_bytes += len(chunk)
        self.eof = not chunk
        self.buf += self.utf8.decode(chunk, final=self.eof)
        return not self.eof

    def skip_ws(self) -> None:
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or not self.more():
                return

    def line_at(self, offset: int) -> int:
        if offset > self.counted:
            self.line += self.buf.count("\n", self.counted, offset)
            self.counted = offset
        return self.line

    def invalid(self, message: str, at: int | None = None) -> Item:
        pos = self.pos if at is None else at
        line = self.line_at(pos)
        col = pos - (self.buf.rfind("\n", 0, pos) + 1) + 1
        return line, None, "", Problem(line, None, "invalid_json",
                                       f"invalid JSON: {message} (column {col}); the rest of "
                                       "the array is unread", excerpt(self.buf[pos:pos + 40]))

    def element(self) -> Item:
        """The next element; its problem ends the array when it can't be parsed."""
        start = self.pos
        while True:
            try:
                obj, end = self.decoder.raw_decode(self.buf, start)
                break
            except json.JSONDecodeError as exc:
                self.lost = True
                if len(self.buf) - start > MAX_RECORD_BYTES:
                    return self.line_at(start), None, "", too_large(self.line_at(start),
                                                                    len(self.buf) - start)
                if not self.more():
                    return self.invalid(exc.msg, exc.pos)
                self.lost = False
            except RecursionError:
                self.lost = True
                line = self.line_at(start)
                return line, None, "", Problem(line, None, "invalid_json",
                                               "invalid JSON: nested too deeply; the rest of "
                                               "the array is unread")
        self.pos = end
        line = self.line_at(start)
        if end - start > MAX_RECORD_BYTES:
            return line, None, "", too_large(line, end - start)
        return line, obj, self.buf[start:end], None

    def items(self) -> Iterator[Item]:
        with open_checked(self.path) as self.f:
            try:
                yield from self._elements()
            except UnicodeDecodeError:
                at = self.line + self.buf.count("\n", self.counted)
                yield at, None, "", Problem(at, None, "invalid_utf8",
                                            f"not valid UTF-8 near line {at}",
                                            fix="re-save the file as UTF-8")

    def _elements(self) -> Iterator[Item]:
        self.skip_ws()
        self.pos += 1  # the "[" that _first_char saw
        self.skip_ws()
        if self.buf.startswith("]", self.pos):
            return
        while True:
            yield self.element()
            if self.lost:
                return
            self.skip_ws()
            if self.buf.startswith(",", self.pos):
                self.pos += 1
                self.skip_ws()
            elif self.buf.startswith("]", self.pos):
                self.pos += 1
                self.skip_ws()
                if self.pos < len(self.buf):
                    yield self.invalid("extra data after the array")
                return
            else:
                yield self.invalid("expected ',' or ']'")
                return
            # Drop what is consumed once it is most of the buffer (amortized O(1)).
            if self.pos > (1 << 20):
                self.line_at(self.pos)
                self.buf, self.pos, self.counted = self.buf[self.pos:], 0, 0
