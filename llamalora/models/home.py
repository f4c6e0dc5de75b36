"""llamalora's cache folder and the folders built once inside it (the tiny models, SmolLM2)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from llamalora.errors import ModelError
from llamalora.rundir import apply_umask


def llamalora_home() -> Path:
    """`$LLAMALORA_HOME`, else `~/.cache/llamalora`."""
    env = os.environ.get("LLAMALORA_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llamalora"


def cache_root(cache_dir: str | Path | None) -> Path:
    """`cache_dir` as given, else `llamalora_home()`."""
    return Path(cache_dir).expanduser() if cache_dir is not None else llamalora_home()


def cached_folder(cache_dir: str | Path | None, dirname: str, marker: str,
                  build: Callable[[Path], None], what: str) -> Path:
    """`cache_dir/dirname`, made by `build(folder)` unless it holds `marker` (written last).

    Raises:
        ModelError: The folder can't be written.
    """
    root = cache_root(cache_dir)
    target = root / dirname
    if (target / marker).is_file():
        return target
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        # Built beside the target and renamed in one step, so a crash leaves no half folder.
        tmp = Path(tempfile.mkdtemp(prefix=f".{dirname}.", dir=root))
        build(tmp)
        apply_umask(tmp)  # mkdtemp's 0700 and safetensors' 0600 would hide a shared cache
        if target.exists() and not (target / marker).is_file():
            shutil.rmtree(target)  # not ours or from an old layout: rebuild it
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished first (the target is now a non-empty folder).
            if not (target / marker).is_file():
                raise
    except OSError as exc:
        raise ModelError(f"cannot write {what} to {target} ({exc}); set LLAMALORA_HOME "
                         "to a writable folder") from exc
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
