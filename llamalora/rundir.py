"""Run folders on disk: the folder lock, the refusals, the resume point, atomic saves.

A checkpoint is written into a hidden temporary folder and renamed into place only once every
file is on disk, with `state.json` last; a folder without `state.json` is never taken for one.
A finished run is marked by `llamalora.json`, written last. `RunFolder` is what the recipe holds:
it opens the folder (lock, then refusals, then the checkpoint to resume) and saves into it; only
rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from llamalora.errors import ConfigError, LlamaLoraError, OutputExistsError


class SaveError(LlamaLoraError):
    """A checkpoint or the final adapter could not be written (full disk, permissions)."""

RUN_MARKER = "llamalora.json"
CHECKPOINTS = "checkpoints"
STATE = "state.json"
LOCK = ".llamalora.lock"
# Everything a run writes at the top of its folder; --overwrite removes only these.
RUN_FILES = {RUN_MARKER, CHECKPOINTS, "adapter_model.safetensors", "adapter_config.json",
             "metrics.jsonl", "loss.png", "README.md", "tensorboard", "wandb", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
             "preprocessor_config.json", "processor_config.json", ".final.tmp", "eval"}
# What only a run writes: a folder of RUN_FILES' common names (README.md, eval/, tokenizer
# files) without one of these may be the user's, and --overwrite leaves it alone.
RUN_EVIDENCE = {RUN_MARKER, CHECKPOINTS, "metrics.jsonl", ".final.tmp"}


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Writes `text` to a temporary sibling, fsyncs it and renames it over `path`: a reader (or
    what a crash leaves) sees the old file or the new one, never half of one. The sibling is
    named for this process, so ranks that write the same file don't share one; a write that
    fails removes it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False))


def apply_umask(path: Path) -> None:
    """Gives `path` and everything under it the mode a new file or folder gets from the umask.

    safetensors (0.8) writes each file as a temporary file, which is created 0600, and renames it
    into place: without this, weights would be readable by their owner alone, unlike the
    config and tokenizer files written beside them.
    """
    umask = os.umask(0o022)
    os.umask(umask)
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


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


def _refuse_existing(output_dir: Path, *, overwrite: bool, resume: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputExistsError(f"{output_dir} is a file; pass a folder to --output-dir")
    existing = [p for p in output_dir.iterdir() if p.name != LOCK] if output_dir.is_dir() else []
    if existing and not (overwrite or resume):
        raise OutputExistsError(f"{output_dir} is not empty; pass --overwrite to replace it, "
                                "--resume to continue its last checkpoint, or another "
                                "--output-dir")
    if existing and overwrite and not resume:
        # --overwrite replaces a run, never a folder of the user's own files.
        names = sorted(p.name for p in existing)
        foreign = [n for n in names if n not in RUN_FILES]
        if foreign or not RUN_EVIDENCE.intersection(names):
            shown = foreign or names
            raise OutputExistsError(
                f"{output_dir} holds files llamalora did not write ({', '.join(shown[:3])}"
                f"{', ...' if len(shown) > 3 else ''}); --overwrite only replaces a run "
                "folder: pick another --output-dir")


def _refuse_finished(output_dir: Path) -> None:
    """--resume of a run that finished."""
    if (output_dir / RUN_MARKER).is_file():
        raise OutputExistsError(f"the run in {output_dir} already finished; pass "
                                "--overwrite to train it again, or another --output-dir")


def check_output_dir(output_dir: Path, *, overwrite: bool, resume: bool) -> None:
    """The refusals of a run folder, made without touching it: train makes them before it plans
    (minutes on a large data set); `RunFolder.open` makes them again under the lock."""
    _refuse_existing(output_dir, overwrite=overwrite, resume=resume)
    if resume:
        _refuse_finished(output_dir)


def prepare_output_dir(output_dir: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuses a non-empty folder unless --overwrite (which clears it) or --resume."""
    _refuse_existing(output_dir, overwrite=overwrite, resume=resume)
    existing = [p for p in output_dir.iterdir() if p.name != LOCK] if output_dir.is_dir() else []
    if existing and overwrite and not resume:
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


# --- the folder a run holds ------------------------------------------------------------------

class RunFolder:
    """One run's output folder, from the lock to the final save.

    Args:
        path: `--output-dir`.
        is_main: This process writes (rank 0); the others only read.
        world_size: Processes in the run, checked against a checkpoint's on resume.
    """

    def __init__(self, path: str | Path, *, is_main: bool = True, world_size: int = 1):
        self.path = Path(path)
        self.is_main = is_main
        self.world_size = world_size
        self.lock = FolderLock(self.path)
        self.resume_from: Path | None = None  # the checkpoint this run continues
        self.resumed: dict = {}  # its state.json
        self.metrics = self.path / "metrics.jsonl"
        self.created = False  # this run made the folder (so a failed run takes it away again)

    def open(self, *, overwrite: bool, resume: bool) -> str:
        """Locks the folder, refuses to clobber, and finds the checkpoint to resume.

        The lock comes first, so --overwrite can never clear a folder another run is writing.
        Returns a warning for the user, or "".

        Raises:
            OutputExistsError: The folder is a file, not empty, in use, or its run finished.
            ConfigError: The checkpoint was made by another number of processes.
        """
        if self.is_main:
            if self.path.exists() and not self.path.is_dir():
                raise OutputExistsError(f"{self.path} is a file; pass a folder to --output-dir")
            self.created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
            prepare_output_dir(self.path, overwrite=overwrite, resume=resume)
        if not resume:
            return ""
        _refuse_finished(self.path)
        self.resume_from = last_checkpoint(self.path)
        if self.resume_from is None:
            return f"no checkpoint in {self.path}; starting from step 0"
        self.resumed = json.loads((self.resume_from / STATE).read_text())
        saved_world = self.resumed.get("world_size", 1)
        if saved_world != self.world_size:  # the message names the launch that fits it
            how = (f"torchrun --nproc-per-node {saved_world} -m llamalora train ... --resume"
                   if saved_world > 1 else "llamalora train ... --resume, without torchrun")
            raise ConfigError(f"the checkpoint in {self.resume_from} was made with {saved_world} "
                              f"process(es), this run has {self.world_size}; resume it with "
                              f"{saved_world} ({how}), or drop --resume and pass --overwrite "
                              "to start anew")
        return ""

    def check_data(self, data_sha256: str, data_path: str) -> None:
        """Raises ConfigError when the data changed since the checkpoint being resumed."""
        if self.resume_from is not None and self.resumed.get("data_sha256") != data_sha256:
            raise ConfigError(f"{data_path} changed since the checkpoint in {self.resume_from}; "
                              "resume needs the same data (or start anew with --overwrite)")

    @property
    def start_step(self) -> int:
        return self.resumed.get("step", 0) if self.resume_from is not None else 0

    def load_checkpoint(self) -> tuple[dict, dict]:
        """(adapter weights, training state) of the checkpoint being resumed.

        The training state is read with `weights_only=True`: a pickle in it that would run code
        is refused, not executed.
        """
        import torch
        from safetensors.torch import load_file

        import pickle

        weights = load_file(str(self.resume_from / "adapter_model.safetensors"))
        path = self.resume_from / "training_state.pt"
        try:
            state = torch.load(path, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as exc:
            raise ConfigError(f"{path} holds objects other than tensors and plain values (a "
                              "pickle that could run code), so it is not loaded; resume from a "
                              "checkpoint llamalora wrote, or start anew with --overwrite") from exc
        return weights, state

    def save_checkpoint(self, step: int, model, adapter: dict | None, training_state: dict,
                        state: dict, keep: int) -> Path:
        """Writes checkpoint `step` (adapter, optimizer/scheduler/RNG state, state.json last)
        and keeps the newest `keep`.

        Raises:
            SaveError: The disk is full or not writable; the previous checkpoint is intact.
        """
        import torch

        root = self.path / CHECKPOINTS
        final = root / f"step-{step:06d}"

        def failure(exc: OSError) -> str:
            previous = last_checkpoint(self.path)
            return (f"could not write the checkpoint of step {step} to {root} "
                    f"({exc.strerror or exc}); "
                    + (f"{previous} is intact: free space, then rerun with --resume"
                       if previous else "no earlier checkpoint exists: free space and rerun"))

        with _staging(root / f".tmp-step-{step:06d}", failure) as tmp:
            save_adapter(model, tmp, adapter)
            torch.save(training_state, tmp / "training_state.pt")
            commit_checkpoint(tmp, final, state, keep)
        return final

    def save_final(self, model, adapter: dict | None, extra: list, summary: Callable[[], dict]
                   ) -> None:
        """Writes the adapter and `extra` (objects with `save_pretrained`: tokenizer, image
        processor) into the folder, then `llamalora.json` (= `summary()`) last.

        Raises:
            SaveError: Nothing in the folder was replaced; the last checkpoint is intact.
        """
        def failure(exc: OSError) -> str:
            previous = last_checkpoint(self.path)
            return (f"could not write the final adapter to {self.path} "
                    f"({exc.strerror or exc}); nothing there was replaced"
                    + (f", and {previous} is intact (free space, then --resume repeats the "
                       "steps after it)" if previous else ""))

        with _staging(self.path / ".final.tmp", failure) as tmp:
            save_adapter(model, tmp, adapter)
            for thing in extra:
                thing.save_pretrained(str(tmp))
        (self.path / RUN_MARKER).unlink(missing_ok=True)
        for f in tmp.iterdir():
            os.replace(f, self.path / f.name)
        tmp.rmdir()
        write_json_atomic(self.path / RUN_MARKER, summary())

    def close(self) -> None:
        """Frees the lock; a folder this run created and left empty (it failed before
        writing anything) is removed, so a retry does not find a stray folder."""
        self.lock.release()
        if self.created and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()


def save_adapter(model, folder: Path, adapter: dict | None = None) -> None:
    """peft's adapter files (`adapter` = gathered LoRA weights, or None to let peft collect)."""
    model.save_pretrained(str(folder), safe_serialization=True,
                          **({"state_dict": adapter} if adapter is not None else {}))
    (folder / "README.md").unlink(missing_ok=True)  # peft's empty card; export writes a real one
    apply_umask(folder)


@contextlib.contextmanager
def _staging(tmp: Path, failure: Callable[[OSError], str]) -> Iterator[Path]:
    """A fresh temporary folder to write a save into; on OSError (a full disk, permissions) it is
    removed and `SaveError(failure(exc))` raised, so nothing half-written is left behind."""
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        yield tmp
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SaveError(failure(exc)) from exc
