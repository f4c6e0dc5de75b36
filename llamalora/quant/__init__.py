"""Quantized base weights behind one small interface.

A backend is one module here serving some `--quant` names; bitsandbytes (`8bit`, `4bit`) is the
one there is, and `none` keeps the weights in the compute dtype. For each name a backend gives
transformers' quantization config (which modules it leaves alone is the model family's to say),
the context its loading runs in, the bytes a weight takes (the plan's memory estimate), whether
a module is one of its layers, and its package check with the install hint. Adding a backend:
its module, its names in `BACKENDS`, and in `config.QUANT_CHOICES` (the option's choices).

Nothing here imports torch or the backend's package until a function needs them.
"""

from __future__ import annotations

import contextlib
from dataclasses import fields

from llamalora.config import QUANT_CHOICES, TrainConfig, check_choice
from llamalora.quant import bitsandbytes

NONE = "none"
BACKENDS = {quant: bitsandbytes for quant in bitsandbytes.QUANTS}
_FULL_PRECISION_BYTES = 2.0  # bf16 / fp16 weights (`none`)


def default_quant() -> str:
    """`--quant`'s default, where a run's record names none (`TrainConfig`'s)."""
    return next(f.default for f in fields(TrainConfig) if f.name == "quant")


def backend_of(quant: str):
    """The backend module serving `quant`, None for `none`.

    Raises:
        ConfigError: Unknown `quant`.
    """
    check_choice("quant", quant, QUANT_CHOICES)
    return BACKENDS.get(quant)


def check_packages(quant: str) -> None:
    """Imports what `quant` needs, so that a missing or broken install fails before any work
    (train's plan and --dry-run call this).

    Raises:
        ConfigError: Unknown `quant`.
        MissingExtraError: The backend's package is not installed.
        ModelError: It is installed but can't be imported.
    """
    backend = backend_of(quant)
    if backend is not None:
        backend.check_packages(quant)


def quantization_config(quant: str, dtype, keep: list[str]):
    """transformers' quantization config for `quant` (None for `none`), the modules named in
    `keep` left unquantized; checks the packages first."""
    check_packages(quant)
    backend = backend_of(quant)
    return backend.quantization_config(quant, dtype, keep) if backend is not None else None


def loading(quant: str):
    """The context a model's `from_pretrained` at `quant` runs in."""
    backend = backend_of(quant)
    return backend.loading(quant) if backend is not None else contextlib.nullcontext()


def bytes_per_weight(quant: str) -> float:
    """Bytes a linear layer's base weight takes at `quant`, scales included."""
    backend = backend_of(quant)
    return backend.BYTES_PER_WEIGHT[quant] if backend is not None else _FULL_PRECISION_BYTES


def plain_activation_factor(quant: str) -> float:
    """How much more activation memory the backend's own layers keep for backward than
    llamalora's kernels do (the plan's `--kernels plain` estimate)."""
    backend = backend_of(quant)
    return backend.PLAIN_ACTIVATION_FACTOR[quant] if backend is not None else 1.0


def install_hint(quant: str) -> str:
    """What to run (or pass) when `quant`'s package is missing."""
    backend = backend_of(quant)
    return backend.INSTALL_HINT if backend is not None else ""


def backend_name(quant: str) -> str:
    """The library behind `quant`, for messages ("bitsandbytes"); "" for `none`."""
    backend = backend_of(quant)
    return backend.NAME if backend is not None else ""


def is_quantized_layer(module) -> bool:
    """Whether `module` is a quantized layer of any backend."""
    return any(backend.is_quantized_layer(module) for backend in set(BACKENDS.values()))


def has_quantized_layers(model) -> bool:
    return any(is_quantized_layer(m) for m in model.modules())


def preload() -> None:
    """Before importing peft, which imports bitsandbytes itself: each backend's fast import."""
    for backend in set(BACKENDS.values()):
        backend.preload()


def enable_kernels(model, mode: str = "auto") -> str:
    """llamalora's matmuls for the quantized layers (`quant.fastlinear`); says which run. They
    import torch at load, so they are imported here when asked for."""
    from llamalora.quant import fastlinear

    return fastlinear.enable(model, mode)


def disable_kernels(model) -> None:
    """The backend's own layers again (`enable_kernels` undone)."""
    from llamalora.quant import fastlinear

    fastlinear.disable(model)


def graph_safe(model) -> bool:
    """Whether a CUDA graph can hold a forward of `model`'s quantized layers: bitsandbytes' own
    int8 layer syncs with the host (its outlier columns); llamalora's kernels don't."""
    from llamalora.quant import fastlinear

    return not any(is_quantized_layer(m) and not fastlinear.is_patched(m)
                   for m in model.modules())
