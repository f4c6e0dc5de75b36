"""train on the tiny model: plan, refusals, loss, resume, images."""

from __future__ import annotations

import json
import os
import signal

import pytest
from typer.testing import CliRunner

from llamalora.cli.main import app
from llamalora.config import TrainConfig
from llamalora.errors import ConfigError, DataError, OutputExistsError
from llamalora.events import CheckpointSaved
from llamalora.recipe import TrainingInterrupted, train

from conftest import MEMO, needs_bnb, write_jsonl

runner = CliRunner()


def _config(tmp_path, **kw) -> TrainConfig:
    data = write_jsonl(tmp_path / "memo.jsonl", MEMO)
    base = dict(data_path=str(data), output_dir=str(tmp_path / "out"), model="tiny",
                quant="none", max_seq_length=64, learning_rate=1e-2, warmup_ratio=0.0,
                lora_dropout=0.05, save_steps=0, max_steps=12, gradient_checkpointing=False)
    base.update(kw)
    return TrainConfig(**base)


@needs_bnb  # the default --quant 8bit: --dry-run checks that bitsandbytes imports
def test_old_script_command_line_dry_run(repo_root):
    args = ["train", "--data_path", str(repo_root / "data" / "sample.jsonl"), "--output_dir",
            "unused", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
            "--max_seq_length", "512", "--num_train_epochs", "3", "--lora_rank", "8",
            "--lora_alpha", "32", "--lora_dropout", "0.05", "--target_modules",
            "q_proj,k_proj,v_proj,o_proj", "--model_name_or_path", "tiny", "--dry-run", "--json"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)["plan"]
    assert plan["records"] == 133 and plan["effective_batch"] == 4
    # 67 micro-batches of 2 per epoch, 2 per optimizer step: 3 epochs = 201 micro-batches.
    assert plan["steps_per_epoch"] == 34 and plan["steps"] == 101
    assert set(plan["estimated_peak_gib"]) == {"8bit", "4bit", "none"}
    assert "Plan:" in r.stderr
    assert not (repo_root / "unused").exists()


@pytest.mark.slow  # builds the 11B's text model on the meta device: ~10-25 s here
def test_default_model_dry_run_works_offline(repo_root):
    r = runner.invoke(app, ["train", str(repo_root / "data" / "sample.jsonl"), "--dry-run",
                            "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)["plan"]
    assert 9.5e9 < plan["params"]["base"] < 10e9  # the 11B's text model
    assert "bundled" in r.stderr


def test_bad_data_refused_before_any_model_loads(tmp_path, monkeypatch):
    import llamalora.models.loading as models

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_model_for_training", boom)
    data = write_jsonl(tmp_path / "bad.jsonl", MEMO + [{"instruction": "x", "output": 7}])
    r = runner.invoke(app, ["train", str(data), "--model", "tiny", "--output-dir",
                            str(tmp_path / "o")])
    assert r.exit_code == 1 and "line 5" in r.stderr and "Traceback" not in r.output
    with pytest.raises(DataError):
        train(_config(tmp_path, data_path=str(data)))


def test_non_empty_output_dir_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="not empty"):
        train(_config(tmp_path))
    with pytest.raises(OutputExistsError, match="did not write"):
        train(_config(tmp_path), overwrite=True)
    assert (out / "mine.txt").read_text() == "keep me"


def test_bad_options_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="quant"):
        _config(tmp_path, quant="3bit")
    with pytest.raises(ConfigError, match="target-modules"):
        _config(tmp_path, target_modules="q_proj,lm_head")
    r = runner.invoke(app, ["train", "x.jsonl", "--output-dir", "o", "--quant", "3bit"])
    assert r.exit_code == 2 and r.stderr.startswith("Error: --quant")


def _adapter(out):
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["none", pytest.param("8bit", marks=needs_bnb),
                                   pytest.param("4bit", marks=needs_bnb)])
def test_loss_falls_and_adapter_loads_with_plain_peft(tmp_path, quant):
    summary = train(_config(tmp_path, quant=quant, max_steps=25, eval_fraction=0.25,
                            eval_steps=10, gradient_checkpointing=True))
    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 25 and losses[-1] < 0.5 * losses[0]
    assert {"step", "loss", "learning_rate", "tokens", "tokens_per_s", "epoch"} <= set(rows[0])
    assert any("eval_loss" in r for r in rows)
    run = json.loads((out / "llamalora.json").read_text())
    assert run["quant"] == quant and run["final_train_loss"] == summary.final_train_loss
    assert run["data_sha256"] and run["real_tokens_per_s"] > 0 and run["final_eval_loss"]
    assert (out / "loss.png").is_file()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert os.path.isdir(cfg["base_model_name_or_path"])  # the tiny model's folder

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, str(out))
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert b and all(p.abs().sum() > 0 for p in b[:4])  # trained weights, not the zero init


@pytest.mark.slow
def test_sigint_then_resume_matches_uninterrupted_run(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    train(_config(tmp_path / "a", max_steps=10, save_steps=4))
    cut = _config(tmp_path / "b", max_steps=10, save_steps=4)

    def on_event(event):
        if isinstance(event, CheckpointSaved) and event.step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted, match="--resume"):
        train(cut, on_event=on_event)
    out = tmp_path / "b" / "out"
    assert not (out / "llamalora.json").exists()
    assert (out / "checkpoints" / "step-000005" / "state.json").is_file()
    train(cut, resume=True)
    with pytest.raises(OutputExistsError, match="already finished"):
        train(cut, resume=True)
    a, b = _adapter(tmp_path / "a" / "out"), _adapter(out)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))


@pytest.mark.slow
def test_records_with_images_train_on_the_vision_model(tmp_path):
    from PIL import Image

    for i, color in enumerate(["red", "blue"]):
        Image.new("RGB", (40, 30), color).save(tmp_path / f"img{i}.png")
    recs = [{"instruction": "What color?", "output": "red", "image": "img0.png"},
            {"instruction": "What color?", "output": "blue", "image": "img1.png"},
            {"instruction": "No image here.", "output": "fine"},
            {"instruction": "And this?", "output": "red again", "image": "img0.png"}]
    data = write_jsonl(tmp_path / "v.jsonl", recs)
    runs = {}
    # 2 x 2: the loss is normalized over the step's two micro-batches either way.
    for packing in (True, False):
        runs[packing] = train(_config(tmp_path, data_path=str(data), max_steps=6, batch_size=2,
                                      gradient_accumulation_steps=2, lora_dropout=0.0,
                                      packing=packing, output_dir=str(tmp_path / f"{packing}")))
    summary = runs[True]
    assert summary.model_class == "MllamaForConditionalGeneration"
    assert summary.plan["with_vision"] is True
    assert summary.batches == "packed" and runs[False].batches == "padded to the longest record"
    # Records with images packed into one row train as the padded batch does.
    assert summary.final_train_loss == pytest.approx(runs[False].final_train_loss, rel=1e-4)
    assert (tmp_path / "True" / "preprocessor_config.json").is_file()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_gloo_run_equals_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo) trains the same adapter as 1 process that takes
    the same 4 micro-batches per step by accumulation."""
    import subprocess
    import sys

    data = write_jsonl(tmp_path / "memo.jsonl", MEMO * 2)
    common = ["--model", "tiny", "--quant", "none", "--max-steps", "3", "--max-seq-length", "64",
              "--lora-dropout", "0", "--learning-rate", "1e-2", "--save-steps", "0",
              "--no-gradient-checkpointing", "--warmup-ratio", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "-m", "llamalora", "train", str(data), "--output-dir",
                          str(tmp_path / "two"), "--gradient-accumulation-steps", "2", *common],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stderr.count("Plan:") == 1  # only rank 0 speaks
    run = json.loads((tmp_path / "two" / "llamalora.json").read_text())
    assert run["world_size"] == 2 and run["plan"]["effective_batch"] == 8
    one = _config(tmp_path, data_path=str(data), output_dir=str(tmp_path / "one"), max_steps=3,
                  lora_dropout=0.0, gradient_accumulation_steps=4)
    train(one)
    a, b = _adapter(tmp_path / "two"), _adapter(tmp_path / "one")
    # Equal up to summation order (all-reduce vs accumulation), which Adam's first steps amplify.
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


@pytest.mark.slow
def test_the_first_graphs_are_captured_in_training_mode(tmp_path, monkeypatch):
    """A CUDA graph keeps the mode it was captured in (dropout, checkpointing), and the first
    step's graphs are captured before the loop: every module must be training by then. On the
    CPU, the graphed path runs with a step that records the mode its captures would see."""
    from llamalora import recipe
    from llamalora.step import TrainStep

    seen = []

    class RecordingStep(TrainStep):
        def warm(self, batches):
            seen.append(all(m.training for m in self.model.modules()))
            return len(batches)

    monkeypatch.setattr(recipe, "_choose_graphs", lambda *a, **k: (True, ""))
    monkeypatch.setattr(recipe, "GraphedStep", RecordingStep)
    train(_config(tmp_path, max_steps=2, lora_dropout=0.1))
    assert seen and all(seen)
