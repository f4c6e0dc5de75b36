"""Run folders on disk: atomic checkpoints, the finished-run marker, and the folder lock.

A checkpoint is written into a hidden temporary folder and renamed into place only once every
file is on disk, with `state.json` last; a folder without `state.json` is never taken for one.
A finished run is marked by `llamalora.json`, written last.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from llamalora.errors import OutputExistsError

RUN_MARKER = "llamalora.json"
CHECKPOINTS = "checkpoints"
STATE = "state.json"
LOCK = ".llamalora.lock"
# Everything a run writes at the top of its folder; --overwrite removes only these.
RUN_FILES = {RUN_MARKER, CHECKPOINTS, "adapter_model.safetensors", "adapter_config.json",
             "metrics.jsonl", "loss.png", "README.md", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "chat_template.jinja", "preprocessor_config.json",
             "processor_config.json", ".final.tmp"}


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict) -> None:
    """Writes JSON to a temporary sibling, fsyncs it and renames it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith("step-") and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def last_checkpoint(output_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def commit_checkpoint(tmp_dir: Path, final_dir: Path, state: dict, keep: int) -> None:
    """Finishes a checkpoint written into `tmp_dir`: state.json last, then one rename."""
    write_json_atomic(tmp_dir / STATE, state)
    fsync_dir(tmp_dir)
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)
    for old in checkpoint_dirs(final_dir.parent.parent)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def is_finished_run(path: Path) -> bool:
    return (path / RUN_MARKER).is_file() and (path / "adapter_model.safetensors").is_file()


def prepare_output_dir(output_dir: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuses a non-empty folder unless --overwrite (which clears it) or --resume."""
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputExistsError(f"{output_dir} is a file; pass a folder to --output-dir")
    existing = [p for p in output_dir.iterdir() if p.name != LOCK] if output_dir.is_dir() else []
    if existing and not (overwrite or resume):
        raise OutputExistsError(f"{output_dir} is not empty; pass --overwrite to replace it, "
                                "--resume to continue its last checkpoint, or another "
                                "--output-dir")
    if existing and overwrite and not resume:
        # --overwrite replaces a run, never a folder of the user's own files.
        foreign = sorted(p.name for p in existing if p.name not in RUN_FILES)
        if foreign:
            raise OutputExistsError(
                f"{output_dir} holds files llamalora did not write ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); --overwrite only replaces a run "
                "folder: pick another --output-dir")
        # The marker goes first, so a crash mid-clear never leaves a folder that looks finished.
        (output_dir / RUN_MARKER).unlink(missing_ok=True)
        for p in existing:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)


class FolderLock:
    """An exclusive lock on a run folder: a file holding the owner's pid; stale ones are taken."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK
        self.held = False

    def acquire(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pid = self._owner()
                if pid is not None and _alive(pid):
                    raise OutputExistsError(
                        f"{self.path.parent} is in use by another llamalora run (pid {pid}); "
                        "wait for it or use another --output-dir") from None
                self.path.unlink(missing_ok=True)  # stale: its owner is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.held = True
            return
        raise OutputExistsError(f"could not lock {self.path.parent}; try again")

    def _owner(self) -> int | None:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
