"""Where export-adapter may write: never over the user's files or the run it reads, an unusable
target refused in seconds before any weights load, files with the user's umask, and the base
named as the Hub knows it. No test here loads a model."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llamalora.cli.main import app

from conftest import tiny_adapter

runner = CliRunner()
RUN = {"config": {"model": "tiny", "data_path": "d.jsonl"}, "plan": {"with_vision": False}}


def _export(*args):
    return runner.invoke(app, ["export-adapter", *map(str, args)])


def _refused(r, code: int, *phrases: str) -> str:
    """One `Error:` line on stderr that says why, and nothing else there."""
    assert r.exit_code == code, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def run(tmp_path) -> Path:
    """A finished run of the tiny model: its adapter, record, metrics and plot."""
    folder = tiny_adapter(tmp_path, run=RUN)
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (folder / "loss.png").write_bytes(b"\x89PNG")
    return folder


@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to load a model fails the test: a refusal must come first."""
    import llamalora.models.loading

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the target was refused")

    monkeypatch.setattr(llamalora.models.loading, "load_model_for_inference", refuse)


def test_overwrite_keeps_a_folder_of_the_users_files(run, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    (mine / "config.json").write_text("{}")
    before = _snapshot(mine)
    r = _export(run, "--out", mine, "--overwrite", "--no-verify")
    _refused(r, 1, "holds files llamalora's export did not write (config.json, notes.txt)",
             "pick another --out")
    assert _snapshot(mine) == before


@pytest.mark.parametrize("where", ["the run", "its parent", "inside it"])
def test_the_run_itself_survives_overwrite(run, where):
    out = {"the run": run, "its parent": run.parent, "inside it": run / "export"}[where]
    before = _snapshot(run.parent)
    r = _export(run, "--out", out, "--overwrite", "--no-verify")
    _refused(r, 2, "would write into the run it exports", "pick a path outside it")
    assert _snapshot(run.parent) == before


@pytest.mark.parametrize("args", [
    ["--state-dict", "{run}/adapter_model.safetensors", "--overwrite"],
    ["--state-dict", "{run}/new.pt"],
    ["--out", "{tmp}/out", "--merge", "--text-only", "--gguf", "{run}/model.gguf"],
])
def test_no_file_is_written_into_the_run(run, tmp_path, args):
    before = _snapshot(run)
    r = _export(run, *[a.format(run=run, tmp=tmp_path) for a in args])
    _refused(r, 2, "would write into the run it exports")
    assert _snapshot(run) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("out, gguf", [("out", "out/sub/m.gguf"), ("m.gguf", "m.gguf")])
def test_a_gguf_below_the_out_folders_top_is_refused(run, tmp_path, out, gguf):
    """Only the top of --out moves with it; a GGUF deeper down (or at --out itself) would be
    lost when the published folder replaces the old one."""
    out, gguf = tmp_path / out, tmp_path / gguf
    r = _export(run, "--out", out, "--merge", "--text-only", "--gguf", gguf)
    _refused(r, 2, f"--gguf {gguf} is inside --out {out} but not at its top")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in [run])


def test_overwrite_replaces_an_earlier_export_and_nothing_else(run, tmp_path):
    out = tmp_path / "exported"
    assert _export(run, "--out", out, "--no-verify").exit_code == 0
    marker = json.loads((out / "llamalora_export.json").read_text())
    assert set(marker["files"]) == {p.name for p in out.iterdir()}
    assert marker["kind"] == "adapter" and marker["source"] == str(run.resolve())
    _refused(_export(run, "--out", out, "--no-verify"), 1, "pass --overwrite")
    assert _export(run, "--out", out, "--no-verify", "--overwrite").exit_code == 0
    # A file the user put in since makes the folder theirs.
    (out / "notes.txt").write_text("mine")
    _refused(_export(run, "--out", out, "--no-verify", "--overwrite"), 1, "(notes.txt)")
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "exported"]  # no leftovers


def test_a_file_written_before_is_replaced_a_users_file_is_not(run, tmp_path):
    ours, theirs = tmp_path / "lora.pt", tmp_path / "theirs.pt"
    assert _export(run, "--state-dict", ours).exit_code == 0
    assert _export(run, "--state-dict", ours, "--overwrite").exit_code == 0
    theirs.write_bytes(b"my weights")
    _refused(_export(run, "--state-dict", theirs, "--overwrite"), 1,
             "was not written by llamalora's export")
    assert theirs.read_bytes() == b"my weights"
    with ours.open("ab") as f:  # changed since: no longer taken for the export's
        f.write(b"x")
    _refused(_export(run, "--state-dict", ours, "--overwrite"), 1, "or changed since")


def _blocked_targets(tmp_path) -> list[Path]:
    """Places nobody can write, root included: under a file, and in sysfs."""
    (tmp_path / "a-file").write_text("")
    places = [tmp_path / "a-file" / "out"]
    if Path("/sys").is_dir():
        places.append(Path("/sys/llamalora-export-test"))
    return places


@pytest.mark.parametrize("args", [["--merge"], ["--merge", "--text-only"]])
def test_an_unwritable_target_fails_in_seconds_before_loading(run, tmp_path, no_loading, args):
    for out in _blocked_targets(tmp_path):
        start = time.perf_counter()
        r = _export(run, "--out", out, *args)
        _refused(r, 2, "cannot write to", "pick a writable --out")
        assert time.perf_counter() - start < 5


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root writes into a read-only folder anyway")
def test_a_read_only_folder_fails_before_loading(run, tmp_path, no_loading):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        r = _export(run, "--out", locked / "out", "--merge", "--text-only")
        _refused(r, 2, "cannot write to", "Permission denied")
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("args, needs", [
    (["--merge"], "needs about 31.6 MiB, 1.0 MiB free"),  # the tiny Mllama in bf16
    # Its Llama folder (31.6 MiB) and f16 GGUF on the same disk, summed
    (["--merge", "--text-only", "--gguf", "{tmp}/m.gguf"], "needs about 70.9 MiB, 1.0 MiB free"),
])
def test_a_full_disk_fails_in_seconds_before_loading(run, tmp_path, no_loading, monkeypatch,
                                                     args, needs):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))
    start = time.perf_counter()
    r = _export(run, "--out", tmp_path / "out", *[a.format(tmp=tmp_path) for a in args])
    message = _refused_after_status(r, needs, "free some space or write elsewhere")
    assert "0.0 GiB" not in message and time.perf_counter() - start < 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # nothing left behind


def _refused_after_status(r, *phrases: str) -> str:
    """A refusal after the export's own 'needs about' status line."""
    assert r.exit_code == 2, r.output
    error = r.stderr.strip().splitlines()[-1]
    assert error.startswith("Error: not enough disk for"), r.stderr
    for phrase in phrases:
        assert phrase in error, error
    return error


def test_files_are_written_with_the_users_umask(run, tmp_path):
    previous = os.umask(0o022)
    try:
        out = tmp_path / "exported"
        assert _export(run, "--out", out, "--no-verify").exit_code == 0
        assert _export(run, "--state-dict", tmp_path / "lora.pt").exit_code == 0
    finally:
        os.umask(previous)
    for path in [*out.iterdir(), tmp_path / "lora.pt"]:
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert out.stat().st_mode & 0o777 == 0o755


def test_the_cached_base_and_trains_adapter_keep_the_umask(tmp_path):
    """The two other writers of weights: the cached tiny model, and a run's adapter (rundir)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamalora.models.tiny import tiny_model_dir
    from llamalora.rundir import save_adapter

    previous = os.umask(0o022)
    try:
        cached = tiny_model_dir(cache_dir=tmp_path / "cache")
        model = get_peft_model(LlamaForCausalLM(LlamaConfig(
            vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1)), LoraConfig(r=2))
        (tmp_path / "adapter").mkdir()
        save_adapter(model, tmp_path / "adapter")
    finally:
        os.umask(previous)
    for path in [cached / "model.safetensors", tmp_path / "adapter" / "adapter_model.safetensors"]:
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert cached.stat().st_mode & 0o777 == 0o755


def test_the_export_names_the_base_as_the_hub_knows_it(tmp_path):
    """A base converted from a Hub release (`--model smollm2`'s folder says so in its marker):
    the exported config and card name the release; the local copy is provenance only, and what
    llamalora itself loads the export onto."""
    import shutil

    from huggingface_hub import ModelCard

    from llamalora.adapters import find_adapter
    from llamalora.models.tiny import tiny_model_dir

    base = tmp_path / "converted"
    shutil.copytree(tiny_model_dir(), base)
    (base / "llamalora_model.json").write_text(json.dumps({"name": "smollm2"}))
    run = tiny_adapter(tmp_path, run=RUN)
    config = json.loads((run / "adapter_config.json").read_text())
    (run / "adapter_config.json").write_text(json.dumps(
        {**config, "base_model_name_or_path": str(base)}))
    out = tmp_path / "exported"
    assert _export(run, "--out", out, "--no-verify").exit_code == 0
    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert json.loads((out / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == hub_id
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == hub_id and f"local copy `{base}`" in card.text
    assert json.loads((out / "llamalora_export.json").read_text())["base_model_local"] == str(base)
    assert find_adapter(out).base_model == str(base)  # chat and export load the copy here
