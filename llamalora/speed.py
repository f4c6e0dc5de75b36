"""torch.compile for the language model's decoder layers (CUDA training).

At LoRA batch sizes a training step is bound by kernel launches, not arithmetic: a decoder layer
with LoRA on q,k,v,o launches ~180 kernels per forward and backward. Compiling each layer fuses the
elementwise work around the matmuls (RMSNorm, rotary, LoRA's cast/dropout/scale/add, SiLU x up)
into a few kernels; the quantized matmuls stay llamalora's custom ops. One graph serves every
layer: their weights are graph inputs, and the sequence length is dynamic.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from llamalora.families import family_of_model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The language model's decoder layers (peft-wrapped or not), vision tower excluded."""
    family = family_of_model(model)
    for name, module in model.named_modules():
        if name.split(".")[-1] == "layers" and isinstance(module, torch.nn.ModuleList) \
                and not family.in_vision(name):
            return list(module)
    return []


def tag_compile_cache() -> None:
    """Adds a hash of llamalora's custom ops to torch's compile-cache key.

    torch keys a cached compiled layer on its traced forward graph, which names the ops but not
    the Python that computes their backward: a cache written by another version of fastlinear
    would hand back that version's backward (and fail on its arguments). With the ops' source in
    the key, each version gets its own entries.
    """
    from llamalora.quant import fastlinear

    config = getattr(torch.compiler, "config", None)
    if config is None or not hasattr(config, "cache_key_tag"):
        return
    digest = hashlib.sha256(Path(fastlinear.__file__).read_bytes()).hexdigest()[:16]
    tag = f"llamalora-ops-{digest}"
    if tag not in config.cache_key_tag:
        config.cache_key_tag = "+".join(filter(None, [config.cache_key_tag, tag]))


def compile_layers(model: torch.nn.Module) -> int:
    """Compiles each decoder layer in place; returns how many."""
    import torch._dynamo

    tag_compile_cache()
    layers = decoder_layers(model)
    # Layer 0 would otherwise get an input without requires_grad (the frozen embedding's output)
    # and every later layer one with it: two compiles of the same graph instead of one.
    model.enable_input_require_grads()
    # The self- and cross-attention layer classes compile separately; leave room for both.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
