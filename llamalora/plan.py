"""The plan train prints before it loads weights: data, steps, and an estimate of peak GPU memory.

Parameter counts come from instantiating the model's config on the meta device (no weights, no
download beyond config.json), so the estimate fits whatever checkpoint is given. The estimate is
a model of where memory goes, not a measurement: llamalora.json records the measured peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 1024**3
# Bytes per base weight of a quantized linear layer, scales included.
_LINEAR_BYTES = {"8bit": 1.0 + 4 / 4096, "4bit": 0.5 + 0.0625 + 4 / 4096, "none": 2.0}


@dataclass
class ParamCounts:
    """Parameters of the part of the model train loads, by how they are stored."""

    quantizable: int  # language-model linear weights (what 8-bit / 4-bit applies to)
    other: int  # embeddings, lm_head, norms, and the vision tower when loaded
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    active_layers: int = 0  # layers that run: text-only batches skip cross-attention layers

    @property
    def total(self) -> int:
        return self.quantizable + self.other


def mllama_default_config():
    """The Llama 3.2 11B Vision architecture (MllamaConfig defaults, 560-pixel tiles)."""
    from transformers import MllamaConfig

    config = MllamaConfig()
    config.vision_config.image_size = 560
    return config


def count_params(config, with_vision: bool) -> ParamCounts:
    """Counts parameters without allocating them (meta device)."""
    import torch
    from transformers import MllamaForCausalLM, MllamaForConditionalGeneration

    with torch.device("meta"):
        if with_vision:
            model = MllamaForConditionalGeneration(config)
        else:
            model = MllamaForCausalLM(config.text_config)
    quantizable = other = 0
    for name, module in model.named_modules():
        in_text_model = "vision" not in name and "projector" not in name
        if isinstance(module, torch.nn.Linear) and in_text_model and not name.endswith("lm_head"):
            quantizable += module.weight.numel()
    other = sum(p.numel() for p in model.parameters()) - quantizable
    text = config.text_config
    skipped = 0 if with_vision else len(getattr(text, "cross_attention_layers", None) or [])
    return ParamCounts(quantizable, other, text.hidden_size, text.num_hidden_layers,
                       text.intermediate_size, text.vocab_size,
                       active_layers=text.num_hidden_layers - skipped)


def lora_param_count(counts: ParamCounts, rank: int, targets: list[str], kv_ratio: float = 0.25
                     ) -> int:
    """LoRA parameters: r x (in + out) per adapted projection and layer."""
    h, i = counts.hidden, counts.intermediate
    shape = {"q_proj": (h, h), "k_proj": (h, h * kv_ratio), "v_proj": (h, h * kv_ratio),
             "o_proj": (h, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    return int(sum(rank * sum(shape[t]) for t in targets) * counts.layers)


def estimate_peak_gib(counts: ParamCounts, *, quant: str, batch_size: int, seq_len: int,
                      gradient_checkpointing: bool, lora_params: int,
                      response_share: float = 1.0, bnb_int8_layers: bool = False) -> float:
    """Estimated peak GPU memory in GiB for one training step.

    Weights at their stored size; LoRA weights, gradients and AdamW state in fp32 (16 bytes each);
    activations per token and layer (bf16: the layer input alone with checkpointing, ~20 hidden
    widths plus the MLP's 3 intermediate widths without); logits only for the tokens with loss,
    in fp32 with their gradient; CUDA context and allocator slack on top. `bnb_int8_layers`:
    the 8-bit base runs through bitsandbytes' own layers, which keep more for backward.
    """
    tokens = batch_size * seq_len
    weights = counts.quantizable * _LINEAR_BYTES[quant] + counts.other * 2
    lora = lora_params * 16
    per_layer = 2 * (counts.hidden if gradient_checkpointing
                     else 20 * counts.hidden + 3 * counts.intermediate)
    # With checkpointing one layer is recomputed at a time: add one layer's full activations.
    recompute = tokens * 2 * (20 * counts.hidden + 3 * counts.intermediate) \
        if gradient_checkpointing else 0
    activations = tokens * per_layer * (counts.active_layers or counts.layers) + recompute
    if quant == "8bit" and bnb_int8_layers:
        # bnb's LLM.int8 (`--kernels plain`) keeps int8 copies and outlier columns of each
        # input for backward; seen on an H100 as ~2.5x the bf16 activation memory of the step.
        activations *= 2.5
    logits = math.ceil(tokens * response_share) * counts.vocab * (2 + 4 + 4)
    return round((weights + lora + activations + logits) * 1.1 / GIB + 0.6, 1)
