"""Untrusted files, secrets and concurrent runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llamalora.checkpoint import FolderLock
from llamalora.cli.main import app
from llamalora.config import TrainConfig
from llamalora.errors import OutputExistsError
from llamalora.recipe import train

from conftest import MEMO, write_jsonl

PACKAGE = Path(__file__).resolve().parent.parent / "llamalora"


def _sources() -> dict[Path, str]:
    return {p: p.read_text(encoding="utf-8") for p in PACKAGE.rglob("*.py")}


def test_every_torch_load_is_weights_only():
    calls = [(p.name, m.group(0)) for p, text in _sources().items()
             for m in re.finditer(r"torch\.load\([^)]*\)", text)]
    assert calls, "no torch.load found: the pattern is stale"
    assert all("weights_only=True" in call for _, call in calls), calls


def test_remote_code_is_never_trusted():
    for path, text in _sources().items():
        assert "trust_remote_code=True" not in text, path


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
