"""chat and export-adapter on a tiny model trained to memorize a few records."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from llamalora.cli.main import app
from llamalora.config import TrainConfig
from llamalora.recipe import train

from conftest import MEMO_QUESTIONS, write_jsonl

runner = CliRunner()


@pytest.fixture(scope="module")
def memorized(tmp_path_factory, _session_home):
    """A run that memorized MEMO_QUESTIONS (text only, bf16-free fp32 on the CPU)."""
    import os

    os.environ["LLAMALORA_HOME"] = str(_session_home)
    tmp = tmp_path_factory.mktemp("memo")
    data = write_jsonl(tmp / "memo.jsonl", MEMO_QUESTIONS)
    config = TrainConfig(data_path=str(data), output_dir=str(tmp / "run"), model="tiny",
                         quant="none", max_seq_length=64, learning_rate=5e-3, warmup_ratio=0.0,
                         lora_dropout=0.0, save_steps=0, max_steps=150, batch_size=3,
                         gradient_accumulation_steps=1, target_modules="all-linear",
                         lora_rank=16, gradient_checkpointing=False)
    summary = train(config)
    assert summary.final_train_loss < 0.05, summary.final_train_loss
    return tmp / "run"


def _chat(*args, input=None):
    return runner.invoke(app, ["chat", *args], input=input)


@pytest.mark.slow
def test_chat_gives_memorized_answers(memorized):
    for rec in MEMO_QUESTIONS:
        r = _chat("--adapter", str(memorized), "--prompt", rec["instruction"], "--temperature",
                  "0", "--max-new-tokens", "24")
        assert r.exit_code == 0, r.output
        assert r.stdout.strip() == rec["output"]


@pytest.mark.slow
def test_chat_equals_plain_generate(memorized):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((memorized / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, str(memorized)).eval()
    tok = AutoTokenizer.from_pretrained(str(memorized))
    # The prompt a server builds: the tokenizer's own chat template (Meta's, with its date).
    ids = tok.apply_chat_template([{"role": "user", "content": "What is rebar?"}],
                                  add_generation_prompt=True, date_string="26 Jul 2024",
                                  return_tensors="pt", return_dict=True).input_ids
    with torch.no_grad():
        gen = model.generate(input_ids=ids, max_new_tokens=24, do_sample=False,
                             eos_token_id=[128001, 128008, 128009], pad_token_id=128004)
    expected = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    r = _chat("--adapter", str(memorized), "--prompt", "What is rebar?", "--temperature", "0",
              "--max-new-tokens", "24")
    assert r.stdout.strip() == expected.strip()


@pytest.mark.slow
def test_interactive_session(memorized):
    script = "거푸집이란?\n/reset\n/bogus\nWhat is rebar?\n/exit\n"
    r = _chat("--adapter", str(memorized), "--temperature", "0", "--max-new-tokens", "24",
              input=script)
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == [MEMO_QUESTIONS[0]["output"], MEMO_QUESTIONS[1]["output"]]
    assert "history cleared" in r.stderr and "unknown command" in r.stderr


@pytest.mark.slow
def test_prompt_from_stdin_and_no_adapter(memorized):
    r = _chat("--adapter", str(memorized), "--prompt", "-", "--temperature", "0",
              "--max-new-tokens", "24", input="양생이란?\n")
    assert r.stdout.strip() == MEMO_QUESTIONS[2]["output"]
    r = _chat("--adapter", str(memorized), "--prompt", "양생이란?", "--temperature", "0",
              "--max-new-tokens", "8", "--no-adapter")
    assert r.exit_code == 0 and r.stdout.strip() != MEMO_QUESTIONS[2]["output"]


def test_chat_needs_an_adapter_or_model():
    r = _chat("--prompt", "hi")
    assert r.exit_code == 2 and r.stderr.startswith("Error: pass --adapter")


@pytest.mark.slow
def test_export_adapter_loads_with_plain_peft_on_both_classes(memorized, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, MllamaForConditionalGeneration

    out = tmp_path / "adapter"
    r = runner.invoke(app, ["export-adapter", str(memorized), "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["max_logit_diff"] <= 1e-4 * result["logit_scale"]  # fp32 on the CPU
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md",
            "tokenizer.json"} <= set(result["files"])
    assert "sha256" in (out / "README.md").read_text()
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")  # the hub reads its metadata
    assert card.data.library_name == "peft" and "lora" in card.data.tags
    assert "both layer names" in card.text and "MllamaForConditionalGeneration" in card.text
    base_path = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    from safetensors.torch import load_file

    trained = load_file(str(memorized / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)
    for cls in (AutoModelForCausalLM, MllamaForConditionalGeneration):
        model = PeftModel.from_pretrained(cls.from_pretrained(base_path), str(out))
        loaded = {n.replace(".default", "").replace("model.language_model.", "model."): p
                  for n, p in model.named_parameters() if "lora_" in n}
        assert loaded.keys() == trained.keys()
        assert all(torch.equal(loaded[k], trained[k]) for k in trained)
    # Nothing is overwritten without --overwrite.
    r = runner.invoke(app, ["export-adapter", str(memorized), "--out", str(out)])
    assert r.exit_code == 1 and "--overwrite" in r.stderr


@pytest.mark.slow
def test_text_adapter_answers_with_an_image(memorized, tmp_path):
    from PIL import Image

    Image.new("RGB", (50, 40), "green").save(tmp_path / "g.png")
    r = _chat("--adapter", str(memorized), "--prompt", "What is rebar?", "--image",
              str(tmp_path / "g.png"), "--temperature", "0", "--max-new-tokens", "12")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip()


@pytest.mark.slow
def test_merged_model_loads_with_plain_transformers(memorized, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    r = runner.invoke(app, ["export-adapter", str(memorized), "--out", str(out), "--merge",
                            "--dtype", "bf16", "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    # What was written reloads to the same logits as the merged model it came from; merging
    # into bf16 itself moves them by bf16 rounding (the tiny model's logits reach ~24).
    assert result["kind"] == "merged"
    assert result["max_logit_diff"] <= 1e-2
    assert result["merge_diff"] <= 2e-2 * result["logit_scale"]
    # The drift is told with what is normal for it: the merged model's own bf16 rounding noise
    # (another attention kernel), and how many top tokens it changed.
    drift = result["merge_drift"]
    assert 0 < drift["noise"] < 2e-2 * drift["logit_scale"]
    assert 0 < drift["same_top"] <= drift["positions"]
    assert (f"Merging into bf16 moved the probe logits by at most {result['merge_diff']:.3g} "
            f"(largest {drift['logit_scale']:.3g}); bf16 rounding alone moves this model's "
            f"logits by {drift['noise']:.3g}") in r.stderr
    assert f"the same at {drift['same_top']} of {drift['positions']} prompt positions" in r.stderr
    assert "needs about" in r.stderr
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert not any("lora" in n for n, _ in model.named_parameters())
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and "no peft needed" in card.text


@pytest.mark.slow
def test_state_dict_export(memorized, tmp_path):
    target = tmp_path / "lora_adapter_state_dict.pt"
    r = runner.invoke(app, ["export-adapter", str(memorized), "--state-dict", str(target)])
    assert r.exit_code == 0, r.output
    state = torch.load(target, weights_only=True)
    assert state and all(".lora_" in k for k in state)


@pytest.fixture(scope="module")
def exported_llama(memorized, tmp_path_factory):
    """The memorized run as a plain Llama folder with an f16 GGUF inside (the CLI's JSON too)."""
    out = tmp_path_factory.mktemp("llama") / "llama"
    r = runner.invoke(app, ["export-adapter", str(memorized), "--out", str(out), "--merge",
                            "--text-only", "--gguf", str(out / "model.gguf"), "--json"])
    assert r.exit_code == 0, r.output
    return out, json.loads(r.stdout), r.stderr


def _training_prompt_ids(tokenizer, question: str) -> list[int]:
    from llamalora.template import render_segments

    text = "".join(t for t, _ in render_segments(None, [("user", question)],
                                                 add_generation_prompt=True))
    return tokenizer(text, add_special_tokens=False).input_ids


@pytest.mark.slow
def test_text_only_export_is_a_plain_llama_with_the_runs_answers(exported_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    out, result, stderr = exported_llama
    assert result["kind"] == "llama" and result["max_logit_diff"] <= result["tolerance"]
    assert result["gguf"]["type"] == "f16"
    assert result["gguf"]["max_logit_diff"] <= result["gguf"]["tolerance"]
    assert "Reloaded the GGUF (f16) with transformers' GGUF loader: max logit" in stderr
    assert "de-quantizing" not in stderr  # the loader's own progress bar stays off stderr
    # Against the Mllama model + adapter (unmerged): within what merging into bf16 moves.
    assert result["details"]["adapter_diff"] <= 2e-2 * result["logit_scale"]
    assert result["gguf"]["adapter_diff"] <= 2e-2 * result["logit_scale"]
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "README.md", "model.gguf"} <= set(result["files"])
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 2
    assert result["details"]["dropped_cross_attention_layers"] == [1]
    assert 128009 in json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(model) is LlamaForCausalLM
    assert model.get_input_embeddings().weight.shape[0] == 128256
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.eos_token == "<|eot_id|>" and "<|image|>" not in tokenizer.get_vocab()
    assert "Today Date: 26 Jul 2024" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    # Plain transformers generate, stopping where generation_config says, gives what the run
    # memorized (prompted in the format it was trained on).
    for rec in MEMO_QUESTIONS:
        ids = torch.tensor([_training_prompt_ids(tokenizer, rec["instruction"])])
        with torch.no_grad():
            gen = model.generate(input_ids=ids, max_new_tokens=24, do_sample=False)
        assert tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True) == rec["output"]


@pytest.mark.slow
def test_llama_cpp_runs_the_gguf(exported_llama):
    """Where llama-cpp-python is installed: llama.cpp reads the GGUF's tokenizer and weights the
    way transformers reads the folder (same ids, logits within f16 rounding, same answers)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _, _ = exported_llama
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    llm = llama_cpp.Llama(model_path=str(out / "model.gguf"), n_ctx=256, logits_all=True,
                          verbose=False)
    assert llm.token_eos() == 128009 and llm.n_vocab() == 128256
    for rec in MEMO_QUESTIONS:
        ids = _training_prompt_ids(tokenizer, rec["instruction"])
        text = tokenizer.decode(ids)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        llm.reset()
        llm.eval(ids)
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0]
        got = torch.tensor(llm.scores[:len(ids)])
        assert (got - expected).abs().max() <= 5e-3 * max(1.0, expected.abs().max().item())
        answer = llm.create_completion(ids, max_tokens=24, temperature=0.0)["choices"][0]["text"]
        assert answer.strip() == rec["output"]
