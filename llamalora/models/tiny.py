"""The tiny random Mllama (`--model tiny`): the real classes at toy sizes, so every path of the
11B (8-bit and 4-bit loading, images, packing, export) runs on a CPU in seconds.

The text side has the real vocabulary (so the bundled tokenizer's ids all embed) and one
cross-attention layer between two self-attention layers; the vision side is the real class at
28x28 px tiles (4 patches of 14 px), up to 2 tiles per image.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

from llamalora.bundled import bundled_tokenizer_dir
from llamalora.families.mllama import IMAGE_TOKEN_ID
from llamalora.models.home import cached_folder

TINY_MODEL = "tiny"

# Bump the version when the tiny architecture or its init changes, so old caches are not reused.
_DIRNAME = "tiny-mllama-v1"
MARKER = "llamalora_tiny.json"  # written last: a folder without it is not a tiny model

_IMAGE_SIZE = 28
_MAX_TILES = 2
_TEXT = {
    "vocab_size": 128256, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 3, "cross_attention_layers": [1],
    "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 131072,
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192},
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "pad_token_id": 128004,
    "tie_word_embeddings": False,
}
_VISION = {
    "hidden_size": 32, "intermediate_size": 64, "attention_heads": 2,
    "num_hidden_layers": 2, "num_global_layers": 1,
    "image_size": _IMAGE_SIZE, "patch_size": 14, "max_num_tiles": _MAX_TILES,
    # Must equal the image processor's order for max_image_tiles=2: (1,1), (1,2), (2,1).
    "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]],
    # The vision output concatenates the last layer with these layers' outputs.
    "intermediate_layers_indices": [0, 1], "vision_output_dim": 32 * 3,
}
# With the base frozen, a logit is at most |lm_head row| * |final-norm output| ~ std * hidden.
# At the default init (0.02) that is ~1.3 for hidden 64, so no adapter could push the loss on
# a 128k vocabulary below ~10.6; 0.5 lets LoRA memorize a few records in ~100 steps.
LM_HEAD_STD = 0.5
# Mllama initializes the cross-attention gates to 0 (tanh(0) = 0 switches the image path off);
# a nonzero gate makes images change the tiny model's output, as they do the 11B's.
_CROSS_ATTN_GATE = 0.5
# Llama 3.2 Vision's preprocessor_config.json, written by hand in the hub's format (not by a
# transformers class) so every transformers 5.x reads it, with or without torchvision.
_PREPROCESSOR = {
    "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True,
    "do_resize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "MllamaImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711], "max_image_tiles": _MAX_TILES,
    "processor_class": "MllamaProcessor", "resample": 2, "rescale_factor": 1 / 255,
    "size": {"height": _IMAGE_SIZE, "width": _IMAGE_SIZE},
}


def tiny_model_dir(cache_dir: str | Path | None = None) -> Path:
    """The folder of the tiny random-weight Mllama model, built on first use.

    The folder is an ordinary Hugging Face model folder (config, safetensors weights, generation
    config, tokenizer, image processor config), loadable by `from_pretrained` as either
    `MllamaForConditionalGeneration` or `MllamaForCausalLM`. Its weights are random but fixed
    (seed 0), so two builds are byte-identical on one software stack.

    Args:
        cache_dir: Folder that holds `tiny-mllama-v1/`; defaults to `llamalora_home()`.

    Returns:
        The path of the complete folder.

    Raises:
        ModelError: The folder can't be written.
    """
    return cached_folder(cache_dir, _DIRNAME, MARKER, _build, "the tiny model")


def tiny_config():
    """The tiny Mllama's `MllamaConfig`."""
    from transformers import MllamaConfig

    return MllamaConfig(text_config=dict(_TEXT), vision_config=dict(_VISION),
                        image_token_index=IMAGE_TOKEN_ID)


@contextlib.contextmanager
def seeded_fp32():
    """Random weights made here are seed 0's, in fp32, whatever the caller's random state and
    default dtype (both are put back)."""
    import torch

    previous_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(0)
        torch.set_default_dtype(torch.float32)
        try:
            yield
        finally:
            torch.set_default_dtype(previous_dtype)


def save_weights(model, folder: Path) -> None:
    """bf16 safetensors, as real checkpoints ship (and half the size); loading casts them to
    the compute dtype."""
    import torch

    model.to(torch.bfloat16).save_pretrained(str(folder), safe_serialization=True)


def write_marker(folder: Path, name: str, layout: str) -> None:
    """The file that makes `folder` complete (`cached_folder`), written last."""
    marker = {"name": name, "layout": layout,
              "note": "random weights for trying the pipeline; the model knows nothing"}
    (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def _build(folder: Path) -> None:
    from transformers import GenerationConfig, MllamaForConditionalGeneration

    import torch

    with seeded_fp32():
        model = MllamaForConditionalGeneration(tiny_config())
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, LM_HEAD_STD)
            for layer in model.model.language_model.layers:
                if hasattr(layer, "cross_attn_attn_gate"):
                    layer.cross_attn_attn_gate.fill_(_CROSS_ATTN_GATE)
                    layer.cross_attn_mlp_gate.fill_(_CROSS_ATTN_GATE)
    model.generation_config = GenerationConfig(
        bos_token_id=128000, eos_token_id=[128001, 128008, 128009], pad_token_id=128004)
    save_weights(model, folder)
    # The bundled files are copied unchanged: their format is the hub's, which every
    # transformers 5.x reads, and their license notice must travel with them.
    for name in ("tokenizer.json", "tokenizer_config.json", "NOTICE"):
        source = bundled_tokenizer_dir() / name
        if source.is_file():
            shutil.copyfile(source, folder / name)
    (folder / "preprocessor_config.json").write_text(
        json.dumps(_PREPROCESSOR, indent=2) + "\n", encoding="utf-8")
    write_marker(folder, TINY_MODEL, _DIRNAME)
