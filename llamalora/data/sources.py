"""Where records come from: a JSON/JSONL file (our streaming reader), or a table through
`datasets` (a parquet/CSV/Arrow file, a dataset folder, or a Hub dataset id)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from llamalora.data.readers import Item, Warn, iter_json_file, open_checked
from llamalora.data.tables import TABLE_FILES, iter_rows, load_table
from llamalora.errors import UsageError
from llamalora.provenance import sha256_of

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

    def items(self, warn: Warn) -> Iterator[Item]:
        if self.kind == "json":
            return iter_json_file(self.path, warn)
        return iter_rows(self.table())

    def table(self):
        """The rows as a `datasets.Dataset` (loaded once; memory-mapped from its cache)."""
        if self._table is None:
            self._table = load_table(self.name, self.path, self.split)
        return self._table

    def fingerprint(self) -> str:
        """What identifies the data: the file's SHA-256, or the dataset's fingerprint."""
        if self.kind == "json":
            with open_checked(self.path) as f:
                return sha256_of(f)
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
