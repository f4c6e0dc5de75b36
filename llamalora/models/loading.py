"""Loading a base model for LoRA training, generation or export: a checkpoint folder, a Hub id
or a short name -> a frozen model, quantized as asked except its vision side and lm_head.

Which classes load it, what stays unquantized and what runs after loading are the model
family's (`llamalora.families`); the quantization is `llamalora.quant`'s. The base stays
frozen; the vision side runs without autograd, so images cost no activation memory for
backward.

torch and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from llamalora import quant as quantization, weights
from llamalora.errors import ConfigError, MissingExtraError, ModelError, first_line
from llamalora.attention import use_varlen_text_attention
from llamalora.families import family_of, image_families
from llamalora.models.names import resolve_model

if TYPE_CHECKING:
    import torch


def load_base_model(name_or_path: str, *, quant: str = "8bit", with_vision: bool = False,
                    device: str | None = None, dtype: str | None = None):
    """Loads a base model, quantized as asked except the vision side and lm_head.

    Args:
        name_or_path: Hub id, local folder, or a short name (`"tiny"`, ...).
        quant: `"8bit"` (LLM.int8), `"4bit"` (NF4, double quantization) or `"none"`.
        with_vision: Load the family's class with the vision tower (needed for images; for
            Mllama `MllamaForConditionalGeneration` instead of the text-only
            `MllamaForCausalLM`).
        device: Torch device string; default: this process's GPU (`LOCAL_RANK` under torchrun)
            if CUDA is available, else the CPU.
        dtype: Weights' dtype name ("bfloat16", ...); default: bf16 on GPUs that support it,
            fp16 on other GPUs, fp32 on the CPU.

    Returns:
        `(model, info)`; info has `quant`, `compute_dtype` (e.g. "bfloat16"), `device`,
        `model_class`, `params_total` (unquantized count) and `base_model` (the resolved folder
        or hub id).

    Raises:
        ConfigError: Unknown `quant` or unusable `device`.
        MissingExtraError: `quant` needs bitsandbytes and it is not installed.
        ModelError: The model can't be found, read or quantized.
    """
    import torch

    quantization.backend_of(quant)  # an unknown name fails before anything loads
    path = resolve_model(name_or_path)
    target = _resolve_device(device)
    dtype = getattr(torch, dtype) if dtype else compute_dtype(target)
    config = _load_config(path)
    family = family_of(config)
    if with_vision and not family.takes_images:
        raise ModelError(f"--model {name_or_path} is a {getattr(config, 'model_type', '?')} "
                         f"model; records with images need a {image_families()} model")
    model = _from_pretrained(family.load_class(with_vision), name_or_path, path, config,
                             quant=quant, dtype=dtype, target=target, quiet=not with_vision)
    _check_vision_unquantized(model, family)
    if family.prepare is not None:
        family.prepare(model, with_vision)
    info = {"quant": quant, "compute_dtype": str(dtype).removeprefix("torch."),
            "device": str(target), "model_class": type(model).__name__,
            "params_total": _count_params(model), "base_model": path}
    return model, info


def _from_pretrained(model_cls, name: str, path: str, config, *, quant: str, dtype, target,
                     quiet: bool):
    """`model_cls.from_pretrained` at `quant`, every weight of the checkpoint's read.

    A text-only class leaves a checkpoint's vision weights unread, and transformers reports
    each as UNEXPECTED in a long table (`quiet` drops it); missing weights are checked here
    instead.
    """
    kwargs = {"config": config, "dtype": dtype, "device_map": {"": str(target)},
              "output_loading_info": True}
    keep = family_of(config).keep_unquantized
    quant_config = quantization.quantization_config(quant, dtype, keep)
    if quant_config is not None:
        kwargs["quantization_config"] = quant_config
    report = _drop_load_report() if quiet else contextlib.nullcontext()
    try:
        with report, quantization.loading(quant), weights.fast_reads():
            model, loading = model_cls.from_pretrained(path, trust_remote_code=False, **kwargs)
    except ImportError as exc:
        raise MissingExtraError(f"loading with --quant {quant} failed: {first_line(exc)}; "
                                f"{quantization.install_hint(quant)}") from exc
    except Exception as exc:  # hub, file and quantization errors come in many types
        raise ModelError(_explain_load_error(name, path, exc)) from exc
    missing = sorted(loading.get("missing_keys") or [])
    if missing:
        raise ModelError(f"--model {name}: {len(missing)} weights are missing from the "
                         f"checkpoint (e.g. {missing[0]}); its files don't match its config")
    return model


def load_model_for_training(name_or_path: str, *, quant: str = "8bit", with_vision: bool = False,
                            device: str | None = None, gradient_checkpointing: bool = False,
                            offload_activations: bool = False, dtype: str | None = None):
    """Loads a frozen base model ready for LoRA (see `load_base_model` for the arguments;
    FSDP runs load on the CPU in the GPU's `dtype`, then shard).

    Every base weight is frozen; layer norms keep the load dtype (no blanket fp32 upcast, which
    mixes bf16 and fp32 on GPU). The vision tower and projector run under `torch.no_grad()`.
    The text self-attention takes packed records' lengths instead of a mask
    (`attention.use_varlen_text_attention`). `gradient_checkpointing` recomputes each decoder
    layer in backward (non-reentrant); `offload_activations` also keeps the layers' inputs,
    which checkpointing saves, in pinned host memory until backward.
    """
    model, info = load_base_model(name_or_path, quant=quant, with_vision=with_vision,
                                  device=device, dtype=dtype)
    _prepare_for_training(model, gradient_checkpointing, offload_activations)
    return model, info


def load_model_for_inference(name_or_path: str, *, quant: str = "8bit",
                             with_vision: bool = False, device: str | None = None,
                             dtype: str | None = None):
    """Loads a frozen base model for generation and export: eval mode, KV cache on.

    See `load_base_model` for the arguments and return value.
    """
    model, info = load_base_model(name_or_path, quant=quant, with_vision=with_vision,
                                  device=device, dtype=dtype)
    _freeze(model, use_cache=True)
    model.eval()
    return model, info


def model_family(name_or_path: str):
    """The family (`llamalora.families`) of a checkpoint, from its config alone.

    Raises:
        ModelError: The config can't be read.
    """
    return family_of(_load_config(resolve_model(name_or_path)))


def load_image_processor(name_or_path: str):
    """The model folder's image processor (its family's: Mllama's makes tiles).

    Raises:
        ModelError: The folder has none.
    """
    from transformers import AutoImageProcessor

    path = resolve_model(name_or_path)
    try:
        return AutoImageProcessor.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:
        raise ModelError(f"cannot load the image processor of {name_or_path} ({first_line(exc)})"
                         f"; images need a {image_families()} model folder") from exc


def _resolve_device(device: str | None) -> torch.device:
    import torch

    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from exc
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for, but CUDA is not available here")
        if target.index is None:  # a bare "cuda" means this process's GPU under torchrun
            target = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return target


def compute_dtype(target: torch.device) -> torch.dtype:
    import torch

    if target.type == "cuda":
        with torch.cuda.device(target):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # CPU matmuls in half precision are slow and lossy


def _load_config(path: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:
        raise ModelError(_explain_load_error(path, path, exc)) from exc


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


@contextlib.contextmanager
def _drop_load_report():
    log = logging.getLogger("transformers.modeling_utils")
    report_filter = _DropLoadReport()
    log.addFilter(report_filter)
    try:
        yield
    finally:
        log.removeFilter(report_filter)


def _exception_chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _explain_load_error(name: str, path: str, exc: BaseException) -> str:
    """One line saying why `name` didn't load and what to pass instead."""
    fallback = "pass --model tiny or a local model folder"
    local = Path(path).expanduser()
    # A hub id is "owner/name"; anything else with a separator is meant as a folder.
    looks_local = (local.exists() or path.startswith((".", "/", "~"))
                   or (os.sep in path and path.count("/") != 1))
    if looks_local and not local.exists():
        return f"--model {name}: no such folder {local}; {fallback}, or a hub id like " \
               "meta-llama/Llama-3.2-11B-Vision-Instruct"
    if local.is_dir() and not (local / "config.json").is_file():
        return f"--model {name}: {local} has no config.json; pass a folder saved with " \
               "save_pretrained, or --model tiny"
    names = {type(e).__name__ for e in _exception_chain(exc)}
    text = " ".join(str(e) for e in _exception_chain(exc)).lower()
    if names & {"GatedRepoError"} or any(w in text for w in ("gated", "401 client error",
                                                            "403 client error", "restricted")):
        return (f"--model {name} is gated: accept its license on https://huggingface.co/{name} "
                f"and log in with `hf auth login`, or {fallback}")
    if names & {"RepositoryNotFoundError"} or "not a valid model identifier" in text:
        return f"--model {name}: no such folder or hub model; check the spelling, or {fallback}"
    if names & {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError",
                "ConnectionError", "ConnectTimeout", "ReadTimeout"} or any(
            w in text for w in ("offline", "connect", "couldn't connect", "timed out")):
        return (f"--model {name} could not be downloaded (offline?); fetch it first with "
                f"`hf download {name}` where there is internet, or {fallback}")
    return f"cannot load --model {name} ({first_line(exc)}); {fallback}"


def _check_vision_unquantized(model, family) -> None:
    bad = [n for n, m in model.named_modules()
           if quantization.is_quantized_layer(m) and family.in_vision(n)]
    if bad:
        raise ModelError(f"the vision tower was quantized ({bad[0]}); this transformers version "
                         "ignores llm_int8_skip_modules as used here; pass --quant none")


def _count_params(model) -> int:
    import torch

    total = 0
    for p in model.parameters():
        # A 4-bit weight is stored packed; its quant_state keeps the logical shape.
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        total += int(torch.Size(shape).numel()) if shape is not None else p.numel()
    return total


def _freeze(model, *, use_cache: bool) -> None:
    """No base weight trains; the KV cache is on for generation, off for training (where it
    only costs memory)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None:
            config.use_cache = use_cache


def _prepare_for_training(model, gradient_checkpointing: bool, offload: bool = False) -> None:
    _freeze(model, use_cache=False)
    use_varlen_text_attention(model)
    if gradient_checkpointing:
        # Checkpointed blocks need an input that requires grad, or nothing reaches LoRA.
        model.enable_input_require_grads()
        # transformers 5.24 renamed gradient_checkpointing_enable (now a deprecated alias) to
        # activation_checkpointing_enable; older 5.x versions have only the first. Both take
        # `offload`: each checkpointed layer's saved input (its hidden states) goes to pinned
        # host memory through torch's `save_on_cpu` and comes back for the recompute.
        kwargs = {"use_reentrant": False}
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs, offload=offload)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs,
                                                offload=offload)
    for module in family_of(model.config).vision_modules(model):
        _run_without_autograd(module)


def _run_without_autograd(module: torch.nn.Module) -> None:
    """Makes `module` always run under `torch.no_grad()`.

    The frozen tower needs no gradient, but autograd would still keep its activations for
    backward (LoRA sits downstream): that ran out of 80 GB with 2 images on the 11B.
    """
    import torch

    if getattr(module, "_llamalora_no_grad", False):
        return
    forward = module.forward

    @functools.wraps(forward)
    def no_grad_forward(*args, **kwargs):
        with torch.no_grad():
            return forward(*args, **kwargs)

    module.forward = no_grad_forward
    module._llamalora_no_grad = True


