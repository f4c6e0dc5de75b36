"""LoRA on a frozen base: peft's LoRA layers on the language model's projections (never the
vision side, never lm_head), run in the activations' dtype."""

from __future__ import annotations

import re
import types
import warnings

from llamalora import quant
from llamalora.config import DEFAULT_LORA_TARGETS, lora_target_names
from llamalora.errors import ConfigError, MissingExtraError, ModelError, first_line
from llamalora.families import family_of_model


def lora_target_pattern(names: list[str], excluded: tuple[str, ...] = ()) -> str:
    """A regex peft matches against full module names: these projections, outside the modules
    named in `excluded` (a family's vision parts).

    A vision tower has its own q/k/v/o or gate/up/down projections; a plain name list would put
    LoRA there as well.
    """
    alternatives = "|".join(re.escape(n) for n in names)
    skipped = "".join(f"(?!.*{re.escape(part)})" for part in excluded)
    return rf"^{skipped}.*\.({alternatives})$"


def attach_lora(model, *, r: int = 8, alpha: float = 32, dropout: float = 0.05,
                target_modules: str = DEFAULT_LORA_TARGETS):
    """Wraps a frozen base model in a peft LoRA model on the language model's projections.

    The plain projection names end up in the returned model's `lora_target_names` attribute
    (peft's own config holds the regex).

    Args:
        model: A model from `load_model_for_training`.
        r: LoRA rank.
        alpha: LoRA alpha; the update is scaled by alpha / r.
        dropout: Dropout on the LoRA input.
        target_modules: `"all-linear"` (q, k, v, o, gate, up, down; never lm_head) or a comma
            list such as `DEFAULT_LORA_TARGETS` (q, k, v, o).

    Returns:
        The `peft.PeftModel`; only the LoRA weights require grad.

    Raises:
        ConfigError: Bad rank, alpha, dropout or target names, or no module matched.
        MissingExtraError: peft is not installed.
    """
    if not (isinstance(r, int) and r > 0):
        raise ConfigError(f"--lora-rank must be a positive integer, got {r!r}")
    if not alpha > 0:
        raise ConfigError(f"--lora-alpha must be positive, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise ConfigError(f"--lora-dropout must be in [0, 1), got {dropout!r}")
    names = lora_target_names(target_modules)
    family = family_of_model(model)
    quant.preload()
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise MissingExtraError("LoRA needs peft: pip install 'peft>=0.17'") from exc

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                        target_modules=lora_target_pattern(names, family.vision_parts),
                        task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():
            # peft reads transformers' deprecated `is_gradient_checkpointing`; not ours to fix.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                    category=FutureWarning)
            peft_model = get_peft_model(model, config)
    except ValueError as exc:  # peft: "Target modules ... not found in the base model"
        raise ConfigError(f"--target-modules {target_modules}: {first_line(exc)}") from exc
    lora_in_vision = [n for n, _ in peft_model.named_parameters()
                      if "lora_" in n and family.in_vision(n)]
    if lora_in_vision:  # the pattern above rules this out; guard against peft changing
        raise ModelError(f"LoRA reached the vision tower ({lora_in_vision[0]})")
    peft_model.lora_target_names = names
    lora_in_activation_dtype(peft_model)
    return peft_model


def lora_in_activation_dtype(model) -> int:
    """Runs every LoRA layer in the activations' dtype, as autocast runs a matmul; returns how
    many LoRA layers that is.

    peft casts a LoRA layer's input to its fp32 weights: fp32 copies of the input, fp32 matmuls
    without tensor cores, and 4 bytes a value kept for backward. On Mllama's cross-attention key
    and value projections, whose input is every image state of a micro-batch (6,404 an image,
    4,096 wide), those kernels were ~17 ms of an 8-bit image step's GPU time and the copies
    ~3.4 GiB of its peak (BENCHMARKS.md, "Records with images"); on the other layers, a few hundred
    text tokens each, they are many small fp32 kernels. Here the input stays as it comes (bf16
    on a GPU) and the weights are cast to it in each call: the weights, their gradients and
    the optimizer stay fp32. In an fp32 model nothing changes. (torch.autocast around the step
    would do the same here but also recast every other op, the frozen base layers' included.)
    """
    changed = 0
    for module in model.modules():
        if not (hasattr(module, "lora_A") and hasattr(module, "cast_input_dtype_enabled")):
            continue
        module.cast_input_dtype_enabled = False  # peft's switch for the cast above
        for part in (*module.lora_A.values(), *module.lora_B.values()):
            part.forward = types.MethodType(_linear_in_input_dtype, part)
        changed += 1
    return changed


def _linear_in_input_dtype(linear, x):
    import torch.nn.functional as F

    bias = None if linear.bias is None else linear.bias.to(x.dtype)
    return F.linear(x, linear.weight.to(x.dtype), bias)
