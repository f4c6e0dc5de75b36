"""Model families, one module each: what differs between Llama 3.2 Vision (`mllama`), Llama
(`llama`), Qwen2-VL and Qwen2.5-VL (`qwen2_vl`), and any other causal LM transformers knows
(`base.CAUSAL_LM`).

`family_of(config)` is the one question the rest of the package asks about a checkpoint; adding
a family is its module and its line in `FAMILIES` (see docs/models.md).
"""

from __future__ import annotations

from llamalora.families.base import CAUSAL_LM, Family
from llamalora.families.llama import LLAMA
from llamalora.families.mllama import MLLAMA
from llamalora.families.qwen2_vl import QWEN2_VL

FAMILIES: tuple[Family, ...] = (MLLAMA, QWEN2_VL, LLAMA)
_BY_MODEL_TYPE = {model_type: f for f in FAMILIES for model_type in f.model_types}


def family_of(config) -> Family:
    """The family of a transformers config (by `model_type`); the plain causal LM's for any
    model type no family claims."""
    return _BY_MODEL_TYPE.get(getattr(config, "model_type", None), CAUSAL_LM)


def family_of_model(model) -> Family:
    """The family of a loaded model, PEFT-wrapped or not."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return family_of(getattr(inner, "config", None))


def known_config(model_id: str):
    """The config of a model id some family knows the architecture of (the default model's),
    for a plan made where its config.json can't be fetched; None for any other id."""
    for family in FAMILIES:
        make = family.known_configs.get(model_id)
        if make is not None:
            return make()
    return None


def image_families() -> str:
    """The families that take images, as a message names them."""
    return " or ".join(f.name for f in FAMILIES if f.takes_images)
