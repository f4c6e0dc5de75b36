"""Faults during training: out of GPU memory, a full disk, and kill -9 at random moments."""

from __future__ import annotations

import errno
import os
import json
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

import llamalora.rundir as rundir
import llamalora.step as step_mod
from llamalora.adapters import find_adapter
from llamalora.cli.main import app
from llamalora.config import TrainConfig
from llamalora.events import CheckpointSaved
from llamalora.plan import plan_training
from llamalora.recipe import OutOfMemory, train
from llamalora.rundir import SaveError
from llamalora.rundir import checkpoint_dirs

from conftest import MEMO, needs_bnb, write_jsonl


def _config(tmp_path, **kw) -> TrainConfig:
    data = write_jsonl(tmp_path / "memo.jsonl", MEMO)
    base = dict(data_path=str(data), output_dir=str(tmp_path / "out"), model="tiny",
                quant="none", max_seq_length=64, max_steps=6, save_steps=2,
                gradient_checkpointing=False)
    base.update(kw)
    return TrainConfig(**base)


@needs_bnb  # the message is about --quant 8bit, which loads through bitsandbytes
def test_out_of_memory_names_what_lowers_it(tmp_path, monkeypatch):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(step_mod, "loss_sum", oom)
    config = _config(tmp_path, quant="8bit")
    plan = plan_training(config)
    plan.memory_gib = {"8bit": 19.7, "4bit": 13.1, "none": 27.0}  # the 11B's, not tiny's
    with pytest.raises(OutOfMemory) as info:
        train(config, plan=plan)
    message = str(info.value)
    assert "step 1" in message and "--quant 4bit (estimated 13.1 GiB)" in message
    assert "estimated 19.7 GiB for --quant 8bit" in message
    assert "--batch-size 1 with --gradient-accumulation-steps 4" in message
    assert "--gradient-checkpointing" in message and "--max-seq-length" in message
    r = CliRunner().invoke(app, ["train", str(tmp_path / "memo.jsonl"), "--model", "tiny",
                                 "--output-dir", str(tmp_path / "cli"), "--max-steps", "2"])
    assert r.exit_code == 1 and "Error: out of GPU memory" in r.stderr
    assert "Traceback" not in r.output


@pytest.mark.slow  # trains 6 steps, then 4 more on resume
def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real_save = torch.save

    def on_event(event):
        if isinstance(event, CheckpointSaved) and event.step == 2:
            def full(*a, **k):
                raise OSError(errno.ENOSPC, "No space left on device")
            monkeypatch.setattr(torch, "save", full)

    with pytest.raises(SaveError, match="No space left on device") as info:
        train(_config(tmp_path), on_event=on_event)
    assert "step-000002 is intact" in str(info.value)
    out = tmp_path / "out"
    assert [p.name for p in checkpoint_dirs(out)] == ["step-000002"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    monkeypatch.setattr(torch, "save", real_save)
    summary = train(_config(tmp_path), resume=True)
    assert summary.steps_run == 4


@pytest.mark.slow
def test_kill_9_at_random_moments_never_leaves_a_false_good_folder(tmp_path):
    """SIGKILL a real `llamalora train` at random times; afterwards the folder is either a
    finished run or resolves to a complete checkpoint that --resume finishes from."""
    data = write_jsonl(tmp_path / "memo.jsonl", MEMO)
    rng = random.Random(1234)
    cmd = [sys.executable, "-m", "llamalora", "train", str(data), "--model", "tiny", "--quant",
           "none", "--max-seq-length", "64", "--max-steps", "40", "--save-steps", "1",
           "--save-total-limit", "1", "--no-gradient-checkpointing"]
    # The tiny model is built once up front so kills land in training and saving.
    from llamalora.models.tiny import tiny_model_dir

    tiny_model_dir()
    outcomes = []
    for trial in range(3):
        out = tmp_path / f"run{trial}"
        proc = subprocess.Popen(cmd + ["--output-dir", str(out)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        # Wait for the first checkpoint, then kill at a random moment after it.
        deadline = time.time() + 120
        while time.time() < deadline and not checkpoint_dirs(out) and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        finished = (out / "llamalora.json").is_file()
        info = find_adapter(out)
        if finished:
            assert info.folder == out
        else:
            state = json.loads((info.folder / "state.json").read_text())
            assert (info.folder / "adapter_model.safetensors").stat().st_size > 0
            assert (info.folder / "training_state.pt").is_file()
            r = subprocess.run(cmd + ["--output-dir", str(out), "--resume"],
                               capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr[-2000:]
            assert (out / "llamalora.json").is_file()
            outcomes.append(state["step"])
    assert outcomes, "every kill landed after the run finished; the test proved nothing"


@pytest.mark.slow  # trains 6 steps, then 2 more on resume
def test_crash_inside_the_final_save_is_not_taken_for_a_finished_run(tmp_path, monkeypatch):
    """Dies between moving the adapter into place and writing llamalora.json: the folder must
    resolve to its last complete checkpoint, and --resume must finish it."""
    real_replace = os.replace
    moved = []

    def crash_after_first_move(src, dst):
        if str(src).find(".final.tmp") >= 0:
            if moved:
                raise KeyboardInterrupt("simulated kill during the final save")
            moved.append(dst)
        return real_replace(src, dst)

    monkeypatch.setattr(rundir.os, "replace", crash_after_first_move)
    with pytest.raises(KeyboardInterrupt):
        train(_config(tmp_path))
    monkeypatch.setattr(rundir.os, "replace", real_replace)
    out = tmp_path / "out"
    assert moved and not (out / "llamalora.json").exists()
    assert find_adapter(out).folder == out / "checkpoints" / "step-000004"
    summary = train(_config(tmp_path), resume=True)
    assert summary.steps_run == 2 and (out / "llamalora.json").is_file()
