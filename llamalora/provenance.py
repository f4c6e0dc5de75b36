"""What a run or an eval records of its inputs: the versions of the packages it ran on, and the
SHA-256 of the files it read."""

from __future__ import annotations

import hashlib
import importlib.metadata as metadata
from collections.abc import Iterable
from typing import BinaryIO


def package_versions(names: Iterable[str]) -> dict[str, str | None]:
    """Each distribution's installed version, None where it is not installed."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def sha256_of(file: BinaryIO) -> str:
    """The hex SHA-256 of an open binary file from where it stands, read in 1 MiB pieces
    (`hashlib.file_digest` needs Python 3.11)."""
    h = hashlib.sha256()
    for chunk in iter(lambda: file.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()
