"""The model-family seam (`llamalora.families`), the quantization interface (`llamalora.quant`),
and the one pad-id rule: what the rest of the package asks instead of testing model types."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models

from llamalora import quant
from llamalora.config import DEFAULT_MODEL, QUANT_CHOICES, TrainConfig
from llamalora.errors import ConfigError
from llamalora.families import CAUSAL_LM, FAMILIES, family_of, image_families, known_config
from llamalora.families.llama import LLAMA
from llamalora.families.mllama import MLLAMA
from llamalora.template import ChatTemplate, pad_token_id


def _config(model_type: str):
    from types import SimpleNamespace

    return SimpleNamespace(model_type=model_type)


def test_each_config_finds_its_family_and_others_the_plain_causal_lm():
    assert family_of(_config("mllama")) is MLLAMA
    assert family_of(_config("mllama_text_model")) is MLLAMA  # the text-only class's config
    assert family_of(_config("llama")) is LLAMA
    assert family_of(_config("qwen2")) is CAUSAL_LM and family_of(None) is CAUSAL_LM
    types = [t for f in FAMILIES for t in f.model_types]
    assert len(types) == len(set(types)), "two families claim one model type"
    assert "Llama 3.2 Vision" in image_families() and "Llama" not in image_families().split(
        " or ")


def test_mllama_keeps_its_vision_side_and_lm_head_out_of_quantization():
    assert MLLAMA.keep_unquantized == ["lm_head", "model.vision_model",
                                       "model.multi_modal_projector", "vision_model",
                                       "multi_modal_projector"]
    assert LLAMA.keep_unquantized == ["lm_head"]
    assert MLLAMA.in_vision("model.vision_model.transformer.layers.0.self_attn.q_proj")
    assert not MLLAMA.in_vision("model.language_model.layers.0.cross_attn.k_proj")
    assert MLLAMA.takes_images and not LLAMA.takes_images and not CAUSAL_LM.takes_images


def test_mllama_adapter_keys_move_between_its_two_classes_and_back():
    text = {"base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight": 1,
            "base_model.model.lm_head.weight": 2}
    vision = MLLAMA.adapter_keys(text, to_vision=True)
    assert "base_model.model.model.language_model.layers.3.self_attn.q_proj.lora_A.weight" \
        in vision and "base_model.model.lm_head.weight" in vision
    assert MLLAMA.adapter_keys(vision, to_vision=False) == text
    assert LLAMA.adapter_keys(text, to_vision=True) is text  # one name serves: unchanged


def test_the_default_models_architecture_is_known_offline():
    config = known_config(DEFAULT_MODEL)
    assert config.model_type == "mllama" and config.vision_config.image_size == 560
    assert known_config("someone/else") is None


def test_mllama_counts_for_the_plan_come_from_its_family():
    from llamalora.plan import count_params

    config = known_config(DEFAULT_MODEL)
    text = count_params(config, with_vision=False)
    vision = count_params(config, with_vision=True)
    assert text.active_layers == 40 - 8 and text.cross_layers == 0 and text.image_states == 0
    assert vision.active_layers == 40 and vision.cross_layers == 8
    assert vision.image_states == 4 * ((560 // 14) ** 2 + 1)  # tiles x (patches + class token)
    assert vision.quantizable == text.quantizable  # the vision tower stays unquantized


def test_the_quantization_interface_names_its_backend_and_sizes():
    assert quant.backend_name("8bit") == quant.backend_name("4bit") == "bitsandbytes"
    assert quant.backend_name("none") == "" and quant.install_hint("none") == ""
    assert quant.bytes_per_weight("8bit") == pytest.approx(1.0 + 4 / 4096)
    assert quant.bytes_per_weight("4bit") < quant.bytes_per_weight("8bit") \
        < quant.bytes_per_weight("none") == 2.0
    assert quant.plain_activation_factor("8bit") == 2.5
    assert quant.plain_activation_factor("none") == 1.0
    assert set(quant.BACKENDS) | {quant.NONE} == set(QUANT_CHOICES)
    assert quant.default_quant() == TrainConfig().quant
    quant.check_packages("none")  # needs nothing
    with pytest.raises(ConfigError, match="--quant must be one of"):
        quant.backend_of("int3")


def _tokenizer(tokens: list[str]):
    vocab = {t: i for i, t in enumerate(["[UNK]", *tokens])}
    return Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))


def test_one_pad_rule_the_declared_pad_then_llama3s_then_a_stop_token():
    declared = ChatTemplate("", (("pad_token", "<pad>"), ("eos_token", "<eos>")))
    tok = _tokenizer(["<pad>", "<|finetune_right_pad_id|>", "<eos>"])
    assert pad_token_id(tok, declared) == 1
    tok = _tokenizer(["<|finetune_right_pad_id|>", "<eos>"])
    assert pad_token_id(tok, declared) == 1  # no <pad> in the vocabulary: Llama 3's
    tok = _tokenizer(["a", "<eos>"])
    assert pad_token_id(tok, declared) == 2  # neither: the eos token, a stop token
    assert pad_token_id(_tokenizer(["a"]), declared) == 0  # none of them: any id serves


def test_the_bundled_tokenizer_pads_with_llama3s_padding_token():
    from llamalora.tokenizer import load_tokenizer

    assert pad_token_id(load_tokenizer("bundled").tokenizer) == 128004


def _export_source(config, run: dict | None = None):
    from llamalora.export.source import ExportSource

    info = type("Info", (), {"run": run or {}})()
    return ExportSource(info, "base", None, config)


def test_export_kinds_follow_the_family():
    from transformers import LlamaConfig

    from llamalora.errors import UsageError

    mllama = _export_source(known_config(DEFAULT_MODEL))
    assert mllama.export_kind(merge=True, text_only=True, gguf=True, state_dict=False) == "llama"
    with pytest.raises(UsageError, match="--merge --text-only --gguf"):
        mllama.export_kind(merge=True, text_only=False, gguf=True, state_dict=False)
    assert mllama.merges_with_vision and mllama.skipped_layers == [3, 8, 13, 18, 23, 28, 33, 38]
    llama = _export_source(LlamaConfig(num_hidden_layers=2))
    # a plain Llama has nothing for --text-only to drop, and GGUFs as it is
    assert llama.export_kind(merge=True, text_only=True, gguf=True, state_dict=False) == "merged"
    assert not llama.merges_with_vision and llama.skipped_layers == []
    assert llama.export_kind(merge=False, text_only=False, gguf=False, state_dict=False) == \
        "adapter"


def test_a_model_card_loads_the_merged_model_with_its_familys_classes():
    from transformers import LlamaConfig

    from llamalora.export.card import _load_lines

    lines = _load_lines(_export_source(known_config(DEFAULT_MODEL)), "x")
    assert lines == ["from transformers import AutoModelForCausalLM",
                     "from transformers import MllamaForConditionalGeneration",
                     'model = AutoModelForCausalLM.from_pretrained("x")  # text only, or:',
                     '# model = MllamaForConditionalGeneration.from_pretrained("x")']
    assert _load_lines(_export_source(LlamaConfig()), "x") == [
        "from transformers import AutoModelForCausalLM",
        'model = AutoModelForCausalLM.from_pretrained("x")']
