"""The tiny random Qwen2.5-VL (`--model tiny-qwen2-vl`): the real classes at toy sizes, with the
checkpoint's image processor and a small tokenizer built here, so Qwen2-VL's image path (image
tokens inside the text, M-RoPE positions) trains, chats and exports on a CPU in seconds.

The tokenizer is byte-level BPE without merges (every UTF-8 byte one token, so any text
encodes) plus Qwen's special tokens, with Qwen2-VL's ChatML chat template; images are resized to
between 56x56 and 112x112 pixels, 4 to 16 image tokens each.
"""

from __future__ import annotations

import json
from pathlib import Path

from llamalora.models.home import cached_folder
from llamalora.models.tiny import LM_HEAD_STD, MARKER, save_weights, seeded_fp32, write_marker

TINY_QWEN2_VL_MODEL = "tiny-qwen2-vl"

# Bump the version when the architecture, the tokenizer or the init changes.
_DIRNAME = "tiny-qwen2_5-vl-v1"
_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>")
_IDS = {token: 256 + i for i, token in enumerate(_SPECIAL)}  # after the 256 byte tokens
_PATCH, _MERGE = 14, 2
_TEXT = {
    "vocab_size": 256 + len(_SPECIAL), "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 4096, "tie_word_embeddings": False,
    # M-RoPE's temporal, height and width sections of the rotary half-width (16 / 2 = 2 + 3 + 3)
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                        "mrope_section": [2, 3, 3]},
    "bos_token_id": _IDS["<|endoftext|>"], "eos_token_id": _IDS["<|im_end|>"],
    "pad_token_id": _IDS["<|endoftext|>"],
}
_VISION = {
    "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
    "out_hidden_size": _TEXT["hidden_size"], "patch_size": _PATCH, "spatial_merge_size": _MERGE,
    "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [1],
    "tokens_per_second": 2,
}
# Qwen2-VL's preprocessor_config.json in the hub's format, at toy sizes.
_PREPROCESSOR = {
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
    "min_pixels": 56 * 56, "max_pixels": 112 * 112, "merge_size": _MERGE,
    "patch_size": _PATCH, "temporal_patch_size": 2, "resample": 3, "rescale_factor": 1 / 255,
}
# Qwen2-VL-Instruct's chat template: ChatML, a default system message, and an image part as
# <|vision_start|><|image_pad|><|vision_end|> (the processor repeats the pad per image token).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_qwen2_vl_model_dir(cache_dir: str | Path | None = None) -> Path:
    """The folder of the tiny random-weight Qwen2.5-VL, built on first use: an ordinary
    Hugging Face folder (config, bf16 safetensors, generation config, tokenizer with its chat
    template, image processor config) that `Qwen2_5_VLForConditionalGeneration` loads. Its
    weights are random but fixed (seed 0).

    Raises:
        ModelError: The folder can't be written.
    """
    return cached_folder(cache_dir, _DIRNAME, MARKER, _build, "the tiny Qwen2.5-VL model")


def tiny_qwen2_vl_config():
    """The tiny model's `Qwen2_5_VLConfig`."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(_TEXT), vision_config=dict(_VISION),
        image_token_id=_IDS["<|image_pad|>"], video_token_id=_IDS["<|video_pad|>"],
        vision_start_token_id=_IDS["<|vision_start|>"],
        vision_end_token_id=_IDS["<|vision_end|>"], tie_word_embeddings=False)


def write_tokenizer(folder: Path) -> None:
    """tokenizer.json (byte-level BPE, no merges, Qwen's special tokens) and
    tokenizer_config.json with the chat template, in the hub's format."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {char: i for i, char in enumerate(sorted(byte_chars))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in _SPECIAL])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE,
              "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
              "unk_token": None, "model_max_length": _TEXT["max_position_embeddings"],
              "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n",
                                                   encoding="utf-8")


def _build(folder: Path) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    with seeded_fp32():
        model = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_vl_config())
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, LM_HEAD_STD)
    model.generation_config = GenerationConfig(
        bos_token_id=_IDS["<|endoftext|>"], pad_token_id=_IDS["<|endoftext|>"],
        eos_token_id=[_IDS["<|im_end|>"], _IDS["<|endoftext|>"]])
    save_weights(model, folder)
    write_tokenizer(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps(_PREPROCESSOR, indent=2) + "\n", encoding="utf-8")
    write_marker(folder, TINY_QWEN2_VL_MODEL, _DIRNAME)
