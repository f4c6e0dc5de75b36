"""Where an export may write, checked before any weights load, and how it lands there.

The rules, for every path an export writes (`--out`, `--gguf`, `--state-dict`):

* never the run it reads, a folder inside it, or a folder that contains it;
* a folder: a new one, an empty one, or (with `--overwrite`) one that holds an earlier export, known
  by the marker `llamalora_export.json` written last into it and listing what it wrote; a folder
  with anything else in it is the user's and is refused;
* a file: a new one or (with `--overwrite`) one this export wrote before, known by the hidden
  record `.NAME.llamalora.json` beside it, which holds the file's size and modification time: a
  file that changed since is no longer taken for ours;
* the place is writable (a file is made and removed there: `os.access` says yes to root on a
  read-only mount) and its disk has room.

Everything is written into a hidden staging path beside the target and renamed into place once
checked; a failure removes the staging path and leaves the target as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from llamalora import __version__
from llamalora.adapters import EXPORT_MARKER
from llamalora.errors import OutputExistsError, UsageError
from llamalora.rundir import apply_umask, write_json_atomic

# Each disk must keep this share of what is written free beyond it.
ROOM_MARGIN = 0.05


@dataclass
class Target:
    """One path an export writes: the folder or file the user named and where it is built."""

    path: Path
    staging: Path
    is_dir: bool
    flag: str  # the option that named it, for messages
    in_folder: bool = False  # a file inside the --out folder: it moves with the folder
    files: list[str] = field(default_factory=list)  # a folder's entries, filled when published


@dataclass
class Targets:
    """Everything one export writes: the --out folder, or the --state-dict file; the --gguf file."""

    folder: Target | None = None
    gguf: Target | None = None
    state_dict: Target | None = None

    def __iter__(self):
        return iter(t for t in (self.folder, self.gguf, self.state_dict) if t is not None)


def check_targets(*, out, gguf, state_dict, overwrite: bool, sources: list[Path]) -> Targets:
    """Every target of one export, after the rules above (the --out folder first: a --gguf file
    inside it goes with it). Nothing is left behind when one is refused."""
    targets = Targets()
    try:
        if state_dict is not None:
            targets.state_dict = check_file(state_dict, flag="--state-dict", suffix=None,
                                            overwrite=overwrite, sources=sources)
            return targets
        targets.folder = check_folder(out, overwrite=overwrite, sources=sources)
        if gguf is not None:
            targets.gguf = check_file(gguf, flag="--gguf", suffix=".gguf", overwrite=overwrite,
                                      sources=sources, folder=targets.folder)
    except BaseException:
        discard(targets)
        raise
    return targets


def format_size(nbytes: float) -> str:
    """1.2 GiB, 3.4 MiB or 5.6 KiB: never a size rounded to nothing."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes / 2**10:.1f} KiB"


def check_folder(out: str | Path, *, overwrite: bool, sources: list[Path]) -> Target:
    """The `--out` folder, after the rules above; its staging folder is made (the write probe).

    Raises:
        UsageError: It is a file, overlaps the run, or can't be written.
        OutputExistsError: It holds files, and is not an earlier export (or no --overwrite).
    """
    out = Path(out)
    _refuse_overlap(out, "--out", sources)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file; --out takes a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not overwrite:
        raise OutputExistsError(f"{out} exists and is not empty; pass --overwrite to replace an "
                                "earlier export there, or another --out")
    if entries:
        foreign = [name for name in entries if name not in _exported_files(out)]
        if foreign:
            raise OutputExistsError(
                f"{out} holds files llamalora's export did not write ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); --overwrite only replaces an earlier "
                "export: pick another --out")
    staging = out.with_name(f".{out.name}.tmp")
    try:
        _clear(staging)  # a crashed export's
        staging.mkdir(parents=True)
    except OSError as exc:
        raise UsageError(f"cannot write to {out.parent} ({exc.strerror or exc}); pick a "
                         "writable --out") from exc
    return Target(out, staging, True, "--out")


def check_file(path: str | Path, *, flag: str, suffix: str | None, overwrite: bool,
               sources: list[Path], folder: Target | None = None) -> Target:
    """A file target (`--gguf`, `--state-dict`) after the rules above. A file inside the `--out`
    folder is built inside that folder's staging and goes with it.

    Raises:
        UsageError: Wrong suffix, a folder, overlaps the run, or can't be written.
        OutputExistsError: It exists, and is not a file this export wrote (or no --overwrite).
    """
    path = Path(path)
    if suffix is not None and path.suffix.lower() != suffix:
        raise UsageError(f"{flag} takes a file name ending in {suffix}, got {path}")
    if path.is_dir():
        raise UsageError(f"{path} is a folder; {flag} takes a file path")
    if folder is not None:
        top, where = folder.path.resolve(), path.resolve()
        if where.parent == top:
            return Target(path, folder.staging / path.name, False, flag, in_folder=True)
        if where == top or top in where.parents:
            # Only the folder's own top level moves with it: a file deeper down would be
            # written into the folder that the published one replaces.
            raise UsageError(f"{flag} {path} is inside --out {folder.path} but not at its top; "
                             "name a file directly in that folder, or one outside it")
    _refuse_overlap(path, flag, sources)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists; pass --overwrite to replace it, or another "
                                "path")
    if path.exists() and not _is_ours(path):
        raise OutputExistsError(f"{path} was not written by llamalora's export (or changed "
                                f"since); --overwrite only replaces its own files: pick another "
                                f"{flag} path")
    # Readers want the real suffix (transformers' GGUF loader checks it).
    staging = path.with_name(f".{path.stem}.tmp{path.suffix}")
    probe = path.with_name(f".{path.name}.probe")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
        staging.unlink(missing_ok=True)  # a crashed export's
    except OSError as exc:
        raise UsageError(f"cannot write to {path.parent} ({exc.strerror or exc}); pick a "
                         f"writable {flag} path") from exc
    return Target(path, staging, False, flag)


def check_room(needs: list[tuple[Target, int]], what: str) -> None:
    """Refuses an export that would not fit: the bytes each target needs, summed per disk.

    Raises:
        UsageError: Naming the disk, what is needed and what is free.
    """
    per_disk: dict[int, tuple[Path, int]] = {}
    for target, nbytes in needs:
        place = target.staging.parent
        disk = place.stat().st_dev
        per_disk[disk] = (place, per_disk.get(disk, (place, 0))[1] + nbytes)
    for place, nbytes in per_disk.values():
        free = shutil.disk_usage(place).free
        if nbytes * (1 + ROOM_MARGIN) > free:
            raise UsageError(f"not enough disk for {what}: needs about {format_size(nbytes)}, "
                             f"{format_size(free)} free at {place}; free some space or "
                             "write elsewhere")


def publish(targets: Targets, record: dict) -> None:
    """Moves a checked export into place, with the user's umask. Each folder's marker, each
    file's record, is written before its rename, so a crash never leaves an export that a later
    --overwrite would take for the user's."""
    record = {"written_by": f"llamalora {__version__} export-adapter", **record}
    for target in targets:
        if target.in_folder:
            continue  # went with the folder
        apply_umask(target.staging)
        if target.is_dir:
            _publish_folder(target, record)
        else:
            stat = target.staging.stat()
            write_json_atomic(_record_path(target.path), {**record, "file": target.flag[2:],
                                                    "bytes": stat.st_size,
                                                    "mtime_ns": stat.st_mtime_ns})
            os.replace(target.staging, target.path)


def _publish_folder(target: Target, record: dict) -> None:
    target.files = sorted(p.name for p in target.staging.iterdir()) + [EXPORT_MARKER]
    write_json_atomic(target.staging / EXPORT_MARKER, {**record, "files": target.files})
    old = target.path.with_name(f".{target.path.name}.old")
    _clear(old)
    if target.path.exists():
        os.replace(target.path, old)
    os.replace(target.staging, target.path)
    _clear(old)


def discard(targets: Targets) -> None:
    """Removes what a failed export staged; the targets stay as they were."""
    for target in targets:
        _clear(target.staging)


def _refuse_overlap(path: Path, flag: str, sources: list[Path]) -> None:
    where = path.resolve()
    for source in sources:
        source = source.resolve()
        if where == source or source.is_relative_to(where) or where.is_relative_to(source):
            raise UsageError(f"{flag} {path} would write into the run it exports ({source}); "
                             "pick a path outside it")


def _exported_files(folder: Path) -> set[str]:
    """What an earlier export wrote into `folder` (its marker's list), or nothing."""
    try:
        marker = json.loads((folder / EXPORT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    return set(marker.get("files", [])) | {EXPORT_MARKER}


def _record_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.llamalora.json")


def _is_ours(path: Path) -> bool:
    try:
        record = json.loads(_record_path(path).read_text(encoding="utf-8"))
        stat = path.stat()
    except (OSError, ValueError):
        return False
    return record.get("bytes") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns


def _clear(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
