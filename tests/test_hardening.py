"""Untrusted files, secrets and concurrent runs.

Untrusted files: a checkpoint or model folder from elsewhere must never run code when llamalora
reads it. Each test plants a payload that runs when loaded unsafely (a pickle whose __reduce__
creates a marker folder; a model folder's own Python module that creates it on import), lets
llamalora read the folder, checks the marker is absent, then shows the payload is live by loading
it the unsafe way.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llamalora.cli.main import app
from llamalora.config import TrainConfig
from llamalora.errors import OutputExistsError
from llamalora.recipe import train
from llamalora.rundir import FolderLock

from conftest import MEMO, write_jsonl

runner = CliRunner()
TINY_RUN = ["--model", "tiny", "--quant", "none", "--max-seq-length", "64",
            "--no-gradient-checkpointing"]


class _RunsCode:
    """Unpickled without weights_only, this creates `marker` (a stand-in for any call)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error: ")]


def test_resume_refuses_a_training_state_that_would_run_code(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", MEMO)
    out, marker = tmp_path / "out", tmp_path / "ran"
    args = ["train", str(data), "--output-dir", str(out), "--max-steps", "2", "--save-steps",
            "1", *TINY_RUN]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    (out / "llamalora.json").unlink()  # as if it died before the end: resumable from step 1
    state_file = out / "checkpoints" / "step-000001" / "training_state.pt"
    state = torch.load(state_file, weights_only=True)
    torch.save({**state, "rng": _RunsCode(marker)}, state_file)

    r = runner.invoke(app, [*args, "--resume"])
    # unusable input: exit 2, one line that names the file and the way out
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    (error,) = _errors(r.stderr)
    assert "training_state.pt" in error and "--overwrite" in error and "weights_only" not in error
    assert not marker.exists()
    assert not (out / "llamalora.json").exists()
    torch.load(state_file, weights_only=False)  # the unsafe load the payload was made for
    assert marker.is_dir()


def _tiny_copy(tmp_path: Path) -> Path:
    from llamalora.models.tiny import tiny_model_dir

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir(), folder)
    return folder


def test_model_weights_that_would_run_code_are_refused(tmp_path):
    from safetensors.torch import load_file

    from llamalora.errors import ModelError
    from llamalora.models.loading import load_base_model

    folder, marker = _tiny_copy(tmp_path), tmp_path / "ran"
    weights = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save({**weights, "extra": _RunsCode(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="cannot load"):
        load_base_model(str(folder), quant="none")
    assert not marker.exists()
    torch.load(folder / "pytorch_model.bin", weights_only=False)
    assert marker.is_dir()


def _with_own_code(folder: Path, marker: Path) -> None:
    """Gives the folder a module that creates `marker` on import, and points its config,
    tokenizer and image processor at it (auto_map), as a hub repo with custom code does."""
    # Subclasses, not the classes themselves: loading them registers them with the auto classes.
    (folder / "own_code.py").write_text(
        f"import os\nos.makedirs({str(marker)!r}, exist_ok=True)\n"
        "import transformers as t\n"
        "class Config(t.MllamaConfig): pass\n"
        "class Model(t.MllamaForCausalLM): config_class = Config\n"
        "class Tokenizer(t.PreTrainedTokenizerFast): pass\n"
        "class ImageProcessor(t.MllamaImageProcessor): pass\n", encoding="utf-8")
    for name, auto_map in [
            ("config.json", {"AutoConfig": "own_code.Config",
                             "AutoModelForCausalLM": "own_code.Model"}),
            ("tokenizer_config.json", {"AutoTokenizer": ["own_code.Tokenizer", None]}),
            ("preprocessor_config.json", {"AutoImageProcessor": "own_code.ImageProcessor"})]:
        _edit_json(folder / name, auto_map=auto_map)


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}), encoding="utf-8")


def test_a_model_folders_own_code_never_runs(tmp_path):
    """A Llama 3.2 Vision folder that also ships code: train, chat and a merged export load it
    with transformers' own classes and never import the folder's module."""
    from llamalora.models.loading import load_image_processor

    folder, marker = _tiny_copy(tmp_path), tmp_path / "ran"
    _with_own_code(folder, marker)
    data = write_jsonl(tmp_path / "d.jsonl", MEMO)
    out = tmp_path / "out"
    model = ["--model", str(folder), *TINY_RUN[2:]]
    r = runner.invoke(app, ["train", str(data), "--output-dir", str(out), "--max-steps", "1",
                            *model])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["chat", "--adapter", str(out), "--quant", "none", "--prompt", "hi",
                            "--max-new-tokens", "2"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["export-adapter", str(out), "--out", str(tmp_path / "merged"),
                            "--merge", "--dtype", "fp32"])
    assert r.exit_code == 0, r.output
    load_image_processor(str(folder))
    assert not marker.exists()

    # Without a built-in class to fall back on, it is refused in one line.
    _edit_json(folder / "config.json", model_type="own_llama")
    r = runner.invoke(app, ["train", str(data), "--dry-run", *model])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert _errors(r.stderr) and "custom code" in r.stderr
    assert not marker.exists()

    from transformers import AutoConfig

    AutoConfig.from_pretrained(folder, trust_remote_code=True)  # what llamalora never passes
    assert marker.is_dir()


def test_a_yes_at_transformers_prompt_does_not_run_a_folders_code(tmp_path):
    # llamalora passes trust_remote_code=False: transformers refuses instead of asking.
    folder, marker = _tiny_copy(tmp_path), tmp_path / "ran"
    _with_own_code(folder, marker)
    _edit_json(folder / "config.json", model_type="own_llama")
    data = write_jsonl(tmp_path / "d.jsonl", MEMO)
    runner.invoke(app, ["train", str(data), "--dry-run", "--model", str(folder)], input="y\n")
    assert not marker.exists()


def test_a_running_train_locks_its_folder_even_against_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    held = FolderLock(out)
    held.acquire()  # another run, alive (this process)
    data = write_jsonl(tmp_path / "d.jsonl", MEMO)
    config = TrainConfig(data_path=str(data), output_dir=str(out), model="tiny", quant="none",
                         max_steps=1, max_seq_length=64)
    with pytest.raises(OutputExistsError, match="in use by another llamalora run"):
        train(config, overwrite=True)
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'
    held.release()


@pytest.mark.slow
def test_hf_token_never_reaches_outputs(tmp_path, monkeypatch):
    secret = "hf_llamaloraTestSecret1234567890"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", secret)
    data = write_jsonl(tmp_path / "d.jsonl", MEMO)
    runner = CliRunner()
    r1 = runner.invoke(app, ["train", str(data), "--model", "tiny", "--quant", "none",
                             "--output-dir", str(tmp_path / "run"), "--max-steps", "2",
                             "--save-steps", "1", "--json"])
    r2 = runner.invoke(app, ["export-adapter", str(tmp_path / "run"), "--out",
                             str(tmp_path / "adapter")])
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    for r in (r1, r2):
        assert secret not in r.stdout + r.stderr
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "llamalora.json" for p in files)
    for p in files:
        assert secret.encode() not in p.read_bytes(), p


def test_chat_refuses_a_bad_image_with_one_line(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    from llamalora.chat import ChatSession

    session = ChatSession(model=None, tokenizer=None, image_processor=object(), device="cpu",
                          base_model="tiny", adapter=None, quant="none")
    from llamalora.errors import UsageError

    with pytest.raises(UsageError, match="image cannot be read"):
        session.ask("what is this?", image=bad)
