"""`export-adapter --merge --gguf` of a plain Llama with another tokenizer than Llama 3's: a tiny
random LlamaForCausalLM shaped like SmolLM2 (tied embeddings, a GPT-2 style byte-level BPE trained
here with `tokenizers`, the ChatML template), exported without --text-only, read back by
transformers' GGUF loader, by gguf-py, and (where llama-cpp-python is installed) by llama.cpp."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from llamalora.cli.main import app

from conftest import MEMO

runner = CliRunner()
# SmolLM2-135M-Instruct's chat template (its chat_template.jinja), unchanged.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2, as in SmolLM2
QUESTION = "Define the construction term.\nformwork"


def _tokenizer(digits: bool):
    """A byte-level BPE trained on a few sentences: GPT-2's split, or SmolLM's (digits one by
    one, then GPT-2's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.pre_tokenizer = (pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level]) if digits else byte_level)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [f"{r['instruction']} {r.get('input', '')} {r['output']}" for r in MEMO] + [
        QUESTION, "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        "system user assistant 2024 3.14"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus * 20, trainer)
    return tokenizer


def smollm_shaped(folder, digits: bool = False):
    """The base: weights seeded, the embedding (tied to the head) widened so that logits reach
    ~10 and a wrong tensor layout could not hide under the tolerance."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer(digits)
    folder.mkdir(parents=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
         "unk_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast",
         "model_max_length": 2048}))
    (folder / "chat_template.jinja").write_text(CHATML)
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, rope_theta=100000.0,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            model.model.embed_tokens.weight.normal_(0.0, 0.5)
    model.to(torch.bfloat16).save_pretrained(str(folder))
    return folder


def lora_adapter(base, folder):
    """A LoRA on every linear layer with random B, so the merge changes every layer."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = get_peft_model(LlamaForCausalLM.from_pretrained(str(base)), LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module", params=[False, True], ids=["gpt-2", "smollm"])
def exported(request, tmp_path_factory):
    """(base folder, merged folder, GGUF path, the CLI's JSON) for each pre-tokenizer."""
    tmp = tmp_path_factory.mktemp("smollm")
    base = smollm_shaped(tmp / "base", digits=request.param)
    adapter = lora_adapter(base, tmp / "adapter")
    out, gguf = tmp / "merged", tmp / "merged.gguf"
    r = runner.invoke(app, ["export-adapter", str(adapter), "--out", str(out), "--merge",
                            "--gguf", str(gguf), "--json"])
    assert r.exit_code == 0, r.output
    return base, out, gguf, json.loads(r.stdout), "smollm" if request.param else "gpt-2"


def _prompt_ids(folder) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}],
                                         add_generation_prompt=True, return_dict=False)


def _render(template: str, bos: str, eos: str) -> str:
    """What transformers' apply_chat_template renders (its jinja environment)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=[{"role": "user", "content": QUESTION}], add_generation_prompt=True,
        bos_token=bos, eos_token=eos)


@pytest.mark.slow
def test_plain_llama_gguf_without_text_only(exported):
    """--merge --gguf on a plain Llama: the merged folder and the GGUF, both checked."""
    _, out, gguf, result, _ = exported
    assert result["kind"] == "merged" and gguf.is_file()
    assert result["gguf"]["max_logit_diff"] <= result["gguf"]["tolerance"]
    assert result["max_logit_diff"] <= result["tolerance"]
    assert result["logit_scale"] > 5  # logits large enough for the tolerance to mean something


@pytest.mark.slow
def test_gguf_reads_back_in_transformers_with_the_folders_logits(exported):
    from transformers import AutoModelForCausalLM, LlamaConfig

    _, out, gguf, _, _ = exported
    ids = torch.tensor([_prompt_ids(out)])
    folder = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    from_gguf = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
        config=LlamaConfig.from_pretrained(str(out)))
    with torch.no_grad():
        expected, got = folder(input_ids=ids).logits, from_gguf(input_ids=ids).logits
    scale = expected.abs().max().item()
    assert scale > 5 and (got - expected).abs().max().item() <= 1e-3 * scale


@pytest.mark.slow
def test_gguf_vocabulary_and_template_are_what_llama_cpp_reads(exported):
    """gguf-py reads what llama.cpp reads: the pre-tokenizer, special ids, no BOS added (the
    ChatML template writes every special token), and a template that renders the prompt to the
    ids transformers' apply_chat_template gives."""
    import gguf as gguf_py

    base, out, gguf, _, pre = exported
    reader = gguf_py.GGUFReader(str(gguf))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == pre
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    tokens = meta["tokenizer.ggml.tokens"]
    assert tokens[:3] == SPECIAL and meta["llama.vocab_size"] == len(tokens)
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied: the embedding
    template = meta["tokenizer.chat_template"]
    assert template == CHATML
    text = _render(template, tokens[1], tokens[2])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer(text, add_special_tokens=False).input_ids == _prompt_ids(out)
    # A local folder is no repository: no URL of it, nor the path itself, in the file.
    strings = json.dumps(meta, default=str)
    assert "huggingface.co" not in strings and str(base) not in strings


@pytest.mark.slow
def test_llama_cpp_runs_the_plain_llama_gguf(exported):
    """llama.cpp itself: the template it renders with (llama-cpp-python's Jinja2ChatFormatter,
    the GGUF's bos/eos tokens) tokenizes to transformers' prompt ids, no BOS added, and its
    logits are the folder's within f16 rounding."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoModelForCausalLM

    _, out, gguf, _, _ = exported
    ids = _prompt_ids(out)
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=256, logits_all=True, verbose=False)
    assert (llm.token_bos(), llm.token_eos()) == (1, 2)
    formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"],
                                    eos_token="<|im_end|>", bos_token="<|im_start|>")
    prompt = formatter(messages=[{"role": "user", "content": QUESTION}]).prompt
    assert llm.tokenize(prompt.encode(), add_bos=True, special=True) == ids
    # Digits are where the two splits differ (SmolLM's takes them one by one).
    from transformers import AutoTokenizer

    text = "In 2024, 333 rebars cost 3.14 each: 12345 in all."
    expected_ids = AutoTokenizer.from_pretrained(str(out))(text, add_special_tokens=False)
    assert llm.tokenize(text.encode(), add_bos=False) == expected_ids.input_ids
    llm.eval(ids)
    got = torch.tensor(llm.scores[:len(ids)])
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    scale = expected.abs().max().item()
    assert scale > 5 and (got - expected).abs().max().item() <= 5e-3 * scale


@pytest.mark.slow
def test_a_hub_base_is_named_by_its_repository(tmp_path):
    """A base converted from a Hub release (as `--model smollm2`'s folder, whose marker says so):
    the merged model's card and the GGUF name the release, never the local copy."""
    import gguf as gguf_py
    from huggingface_hub import ModelCard

    base = smollm_shaped(tmp_path / "converted")
    (base / "llamalora_model.json").write_text(json.dumps({"name": "smollm2"}))
    adapter = lora_adapter(base, tmp_path / "adapter")
    out, gguf = tmp_path / "merged", tmp_path / "merged.gguf"
    r = runner.invoke(app, ["export-adapter", str(adapter), "--out", str(out), "--merge",
                            "--gguf", str(gguf), "--no-verify"])
    assert r.exit_code == 0, r.output
    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert ModelCard.load(out / "README.md").data.base_model == hub_id
    reader = gguf_py.GGUFReader(str(gguf))
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("general.")}
    assert meta["general.base_model.0.repo_url"] == f"https://huggingface.co/{hub_id}"
    assert meta["general.name"] == "SmolLM2-135M-Instruct + LoRA (llamalora)"
    assert str(base) not in json.dumps(meta, default=str)
