"""Run folders: the lock, --overwrite's limits, and which checkpoints count."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llamalora.adapters import find_adapter
from llamalora.rundir import (FolderLock, commit_checkpoint, last_checkpoint,
                              prepare_output_dir, write_atomic)
from llamalora.errors import OutputExistsError, UsageError


def test_write_atomic_replaces_the_file_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    path.write_text("old", encoding="utf-8")
    write_atomic(path, "new 새")
    assert path.read_text(encoding="utf-8") == "new 새" and list(tmp_path.iterdir()) == [path]

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        write_atomic(path, "newer")
    assert path.read_text(encoding="utf-8") == "new 새" and list(tmp_path.iterdir()) == [path]


def test_second_lock_refused_while_owner_lives(tmp_path):
    first = FolderLock(tmp_path)
    first.acquire()
    with pytest.raises(OutputExistsError, match=f"pid {os.getpid()}"):
        FolderLock(tmp_path).acquire()
    first.release()
    FolderLock(tmp_path).acquire()


def test_stale_lock_is_taken(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / ".llamalora.lock").write_text(dead)
    lock = FolderLock(tmp_path)
    lock.acquire()
    assert (tmp_path / ".llamalora.lock").read_text() == str(os.getpid())


def test_overwrite_replaces_only_a_run(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000001").mkdir(parents=True)
    (run / "llamalora.json").write_text("{}")
    prepare_output_dir(run, overwrite=True, resume=False)
    assert list(run.iterdir()) == []
    (run / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="did not write"):
        prepare_output_dir(run, overwrite=True, resume=False)
    assert (run / "notes.txt").read_text() == "mine"


def test_overwrite_leaves_a_folder_of_common_names_without_a_runs_own_files(tmp_path):
    """README.md and eval/ are names a run writes, but also a user's: without a file only a run
    writes (llamalora.json, checkpoints/, metrics.jsonl) the folder is not taken for a run."""
    folder = tmp_path / "mine"
    (folder / "eval").mkdir(parents=True)
    (folder / "eval" / "results.csv").write_text("mine")
    (folder / "README.md").write_text("mine")
    with pytest.raises(OutputExistsError) as caught:
        prepare_output_dir(folder, overwrite=True, resume=False)
    assert str(caught.value) == (f"{folder} holds files llamalora did not write (README.md, "
                                 "eval); --overwrite only replaces a run folder: pick another "
                                 "--output-dir")
    assert (folder / "eval" / "results.csv").read_text() == "mine"
    (folder / "metrics.jsonl").write_text("")  # a run that stopped before its first checkpoint
    prepare_output_dir(folder, overwrite=True, resume=False)
    assert list(folder.iterdir()) == []


def test_half_written_checkpoints_do_not_count(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-000009").mkdir(parents=True)  # a save that died before its rename
    (root / "step-000008").mkdir()  # no state.json: not complete
    assert last_checkpoint(tmp_path) is None
    done = root / ".tmp-step-000004"
    done.mkdir()
    (done / "adapter_model.safetensors").write_bytes(b"")
    (done / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "tiny"}))
    commit_checkpoint(done, root / "step-000004", {"step": 4, "quant": "none"}, keep=2)
    assert last_checkpoint(tmp_path) == root / "step-000004"
    # A run folder without its finished-run marker resolves to its last complete checkpoint.
    (tmp_path / "adapter_model.safetensors").write_bytes(b"partial")
    assert find_adapter(tmp_path).folder == root / "step-000004"
    with pytest.raises(UsageError, match="no finished run"):
        find_adapter(tmp_path / "checkpoints" / "step-000008")


def test_failed_run_removes_the_folder_it_made_empty(tmp_path):
    from llamalora.rundir import RunFolder

    made = RunFolder(tmp_path / "new" / "run")
    made.open(overwrite=False, resume=False)
    made.close()  # as the recipe's `finally` does after a failure: nothing written
    assert not (tmp_path / "new" / "run").exists() and (tmp_path / "new").is_dir()

    kept = RunFolder(tmp_path / "ran")
    kept.open(overwrite=False, resume=False)
    (tmp_path / "ran" / "metrics.jsonl").write_text("{}\n")
    kept.close()
    assert (tmp_path / "ran" / "metrics.jsonl").is_file()

    (tmp_path / "mine").mkdir()  # the user's own empty folder stays
    theirs = RunFolder(tmp_path / "mine")
    theirs.open(overwrite=False, resume=False)
    theirs.close()
    assert (tmp_path / "mine").is_dir()
