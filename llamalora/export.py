"""Exporting a run: a clean PEFT adapter folder, a merged standalone model, or a bare state dict;
for a text-trained run also a plain Llama checkpoint and a GGUF file (llamalora/export_llama.py).

Every export is checked after writing: what was written is loaded back the way a user would load it
(plain peft, plain transformers, or torch.load) and compared with the model it came from.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from llamalora.adapters import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterInfo, apply_adapter,
                                find_adapter, rename_keys)
from llamalora.errors import ModelError, OutputExistsError, UsageError
from llamalora.events import OnEvent, Status
from llamalora.template import render_segments, template_of
from llamalora.tokenizer import encode_segments

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Max |logit difference| allowed, relative to the largest |logit| (at least 1). bf16 keeps 8 bits
# of mantissa: one rounding step near a logit of 24 is 0.125, and a merge reorders the sums.
TOLERANCE = {"bf16": 2e-2, "fp16": 5e-3, "fp32": 1e-4}
# The probe is a chat prompt built like training's, so the check exercises the real format.
PROBE_QUESTION = "다음 건설 용어를 설명하세요.\n거푸집"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "preprocessor_config.json", "processor_config.json")


@dataclass
class ExportResult:
    """What was written and how well it matched on the probe prompt."""

    out: Path
    kind: str  # adapter | merged | state_dict | llama (--merge --text-only)
    files: list[str] = field(default_factory=list)
    max_logit_diff: float | None = None
    tolerance: float | None = None  # absolute: the dtype's relative tolerance x logit_scale
    logit_scale: float | None = None  # the largest |logit| on the probe prompt (at least 1)
    merge_diff: float | None = None  # merged vs unmerged model, before saving (--merge only)
    bytes_written: int = 0
    details: dict | None = None  # --text-only: layers kept and dropped, vocabulary rows, timings
    gguf: dict | None = None  # --gguf: path, type, bytes, its max_logit_diff and tolerance

    def to_dict(self) -> dict:
        out = {"out": str(self.out), "kind": self.kind, "files": self.files,
               "max_logit_diff": self.max_logit_diff, "tolerance": self.tolerance,
               "logit_scale": self.logit_scale, "merge_diff": self.merge_diff,
               "bytes_written": self.bytes_written}
        if self.details is not None:
            out["details"] = self.details
        if self.gguf is not None:
            out["gguf"] = self.gguf
        return out


def _check_target(out: Path, overwrite: bool, is_file: bool = False) -> None:
    if out.exists():
        if is_file and out.is_dir():
            raise UsageError(f"{out} is a folder; --state-dict takes a file path")
        if not overwrite and (is_file or any(out.iterdir())):
            raise OutputExistsError(f"{out} exists; pass --overwrite to replace it, or "
                                    "another path")


def check_disk(places: list[tuple[Path, int]], what: str) -> None:
    """Refuses an export that would not fit: the bytes each (folder, size) needs, summed per
    disk, with a 5% margin.

    Raises:
        UsageError: Naming the disk and how much it lacks.
    """
    needs: dict[int, tuple[Path, int]] = {}
    for place, nbytes in places:
        dev = place.stat().st_dev
        needs[dev] = (place, needs.get(dev, (place, 0))[1] + nbytes)
    for place, nbytes in needs.values():
        free = shutil.disk_usage(place).free
        if nbytes * 1.05 > free:
            raise UsageError(f"not enough disk for {what}: needs about {nbytes / 2**30:.1f} GiB, "
                             f"{free / 2**30:.1f} GiB free at {place}")


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    tmp.rename(out)


def _model_card(info: AdapterInfo, merged: bool, mllama: bool):
    """README.md as a huggingface_hub ModelCard (metadata header + body): an adapter's (whose
    weights file holds both layer names on an Mllama base) or a merged model's."""
    from huggingface_hub import ModelCard, ModelCardData

    run, cfg = info.run, info.run.get("config", {})
    lines = [
        "# LoRA adapter trained with llamalora", "",
        f"- Base model: `{info.base_model}` (quantization during training: {info.quant or '?'})",
        f"- Data: `{cfg.get('data_path', '?')}` (sha256 `{run.get('data_sha256', '?')}`)",
        f"- LoRA: r={cfg.get('lora_rank', '?')}, alpha={cfg.get('lora_alpha', '?')}, "
        f"dropout={cfg.get('lora_dropout', '?')}, modules={cfg.get('target_modules', '?')}",
        f"- Final train loss: {run.get('final_train_loss')}; eval loss: "
        f"{run.get('final_eval_loss')}",
        f"- Steps: {run.get('plan', {}).get('steps', '?')}, max length "
        f"{cfg.get('max_seq_length', '?')}, learning rate {cfg.get('learning_rate', '?')}",
        "", "## Load it", ""]
    where = "<this folder>" if merged else info.base_model
    load = [f'model = AutoModelForCausalLM.from_pretrained("{where}")']
    if mllama:  # text-only class, or the vision one
        load = ["from transformers import MllamaForConditionalGeneration",
                load[0] + "  # text only, or:",
                f'# model = MllamaForConditionalGeneration.from_pretrained("{where}")']
    if merged:
        lines += ["A standalone model with the LoRA merged in; no peft needed:", "", "```python",
                  "from transformers import AutoModelForCausalLM", *load, "```"]
    else:
        lines += [
            "```python", "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            *[line.replace("model = ", "base = ", 1) for line in load],
            'model = PeftModel.from_pretrained(base, "<this folder>")', "```", "",
            "Prompts use the chat template of the tokenizer saved here, the one the adapter was "
            "trained on (`apply_chat_template` builds them; so does `llamalora chat --adapter "
            "<this folder>`)."]
        if mllama:
            lines += ["", "The weights file holds each LoRA weight under both layer names "
                      "(`model.layers.*` of the text-only model and "
                      "`model.language_model.layers.*` of the vision model), so it loads onto "
                      "either class."]
    data = ModelCardData(library_name="transformers" if merged else "peft",
                         base_model=info.base_model, tags=["lora", "llamalora"])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def _probe_logits(model, tokenizer, device, math_attention: bool = False):
    """The model's logits on the probe prompt; `math_attention`: through SDPA's plain math
    kernel (the same function summed in another order, to measure the model's rounding noise)."""
    import contextlib

    import torch

    segments = render_segments(None, [("user", PROBE_QUESTION)], add_generation_prompt=True,
                               template=template_of(tokenizer))
    ids = [t for seg, _ in encode_segments(tokenizer, [segments])[0] for t in seg]
    ids = torch.tensor([ids], device=device)
    if math_attention:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernel = sdpa_kernel(SDPBackend.MATH)
    else:
        kernel = contextlib.nullcontext()
    with torch.inference_mode(), kernel:
        return model(input_ids=ids).logits.float().cpu()


def _diff(a, b) -> tuple[float, float]:
    scale = max(1.0, a.abs().max().item())
    return (a - b).abs().max().item(), scale


def export_adapter(run: str | Path, out: str | Path, *, merge: bool = False, dtype: str = "bf16",
                   state_dict: str | Path | None = None, overwrite: bool = False,
                   verify: bool = True,
                   on_event: OnEvent | None = None, text_only: bool = False,
                   gguf: str | Path | None = None, gguf_type: str = "f16") -> ExportResult:
    """Exports the adapter of a run (or a checkpoint inside one).

    Args:
        run: The run folder, a checkpoint, or an adapter folder.
        out: Target folder (ignored with `state_dict`).
        merge: Merge LoRA into bf16/fp16 base weights and save a standalone model.
        dtype: bf16, fp16 or fp32: the merged weights' dtype, and the check's precision.
        state_dict: Write only the adapter state dict (torch.save) to this file.
        overwrite: Replace an existing target.
        verify: Reload what was written and compare logits on a probe prompt.
        text_only: With `merge`, write the language model as a plain `LlamaForCausalLM` (the
            cross-attention layers dropped); text-trained runs only.
        gguf: With `text_only`, also write this GGUF file (llama.cpp, Ollama).
        gguf_type: The GGUF's weights: "f16" or "q8_0".

    Raises:
        UsageError, OutputExistsError, ModelError.
    """
    emit = on_event or (lambda event: None)
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    _check_text_only_options(merge, text_only, gguf, gguf_type, state_dict)
    info = find_adapter(run)
    if text_only and _trained_with_vision(info):
        raise UsageError(f"{info.run_dir} was trained with images: its answers depend on the "
                         "cross-attention layers that --text-only drops; export it with --merge "
                         "(the full vision model) instead")
    from safetensors.torch import load_file, save_file

    weights = load_file(str(info.folder / ADAPTER_WEIGHTS))

    if state_dict is not None:
        import torch

        target = Path(state_dict)
        _check_target(target, overwrite, is_file=True)
        tmp = target.with_name(f".{target.name}.tmp")
        torch.save(weights, tmp)
        tmp.replace(target)
        loaded = torch.load(target, weights_only=True)
        same = loaded.keys() == weights.keys() and all(
            torch.equal(loaded[k], weights[k]) for k in weights)
        if not same:
            raise ModelError(f"{target} did not read back equal to the adapter")
        return ExportResult(target, "state_dict", [target.name], 0.0, 0.0,
                            target.stat().st_size)

    out = Path(out)
    _check_target(out, overwrite)
    gguf_path = None
    if gguf is not None:
        from llamalora.export_llama import gguf_target, require_gguf

        require_gguf()  # before any loading: the fix is one pip install
        gguf_path = gguf_target(gguf, out, overwrite)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        if text_only:
            result = _export_llama(info, tmp, out, dtype, verify, emit, gguf_path, gguf_type)
        elif merge:
            result = _export_merged(info, tmp, out, dtype, verify, emit)
        else:
            # Each weight under both layer names of Mllama (safetensors wants separate storage
            # for each); a plain Llama has one.
            both = dict(weights)
            for to_vision in (True, False) if _is_mllama(info) else ():
                both.update({k: v.clone() for k, v in rename_keys(weights, to_vision).items()
                             if k not in both})
            save_file(both, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            shutil.copy2(info.folder / ADAPTER_CONFIG, tmp / ADAPTER_CONFIG)
            for name in TOKENIZER_FILES:
                if (info.run_dir / name).is_file():
                    shutil.copy2(info.run_dir / name, tmp / name)
            _model_card(info, merged=False, mllama=_is_mllama(info)).save(tmp / "README.md")
            result = ExportResult(out, "adapter")
            if verify:
                emit(Status("Checking the export: plain peft vs the run's adapter"))
                (result.max_logit_diff, result.tolerance,
                 result.logit_scale) = _verify_adapter(info, tmp, dtype)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.out = out
    result.files = sorted(p.name for p in out.iterdir())
    result.bytes_written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return result


def _check_text_only_options(merge: bool, text_only: bool, gguf, gguf_type: str,
                             state_dict) -> None:
    if text_only and not merge:
        raise UsageError("--text-only writes a merged model: pass --merge --text-only")
    if gguf is not None and not text_only:
        raise UsageError("--gguf converts the text-only Llama model: pass --merge --text-only "
                         "--gguf FILE")
    if text_only and state_dict is not None:
        raise UsageError("--state-dict writes the adapter alone; use it without --text-only")
    if gguf is not None:
        from llamalora.export_llama import check_gguf_type

        check_gguf_type(gguf_type)


def _export_llama(info: AdapterInfo, tmp: Path, out: Path, dtype: str, verify: bool, emit,
                  gguf_path: Path | None, gguf_type: str) -> ExportResult:
    from llamalora.export_llama import export_text_llama

    done = export_text_llama(info, tmp, out, dtype=dtype, verify=verify, emit=emit,
                             gguf_path=gguf_path, gguf_type=gguf_type)
    return ExportResult(out, "llama", max_logit_diff=done.max_logit_diff,
                        tolerance=done.tolerance, logit_scale=done.logit_scale,
                        merge_diff=done.merge_diff, details=done.details, gguf=done.gguf)


def _load_base(info: AdapterInfo, dtype: str, with_vision: bool):
    from llamalora.models import load_model_for_inference
    from llamalora.models import resolve_model

    return load_model_for_inference(resolve_model(info.base_model), quant="none",
                                    with_vision=with_vision, dtype=DTYPES[dtype])


def _is_mllama(info: AdapterInfo) -> bool:
    from llamalora.models import resolve_model
    from llamalora.plan import load_model_config

    config, _ = load_model_config(resolve_model(info.base_model))
    return getattr(config, "model_type", None) == "mllama"


def _trained_with_vision(info: AdapterInfo) -> bool:
    return bool(info.run.get("plan", {}).get("with_vision"))


def _verify_adapter(info: AdapterInfo, folder: Path, dtype: str) -> tuple[float, float, float]:
    """Logits of base + the run's adapter vs base + plain `PeftModel.from_pretrained(folder)`."""
    from llamalora.models import preload_bitsandbytes, resolve_model

    preload_bitsandbytes()
    from peft import PeftModel

    from llamalora.tokenizer import load_model_tokenizer

    tokenizer, _ = load_model_tokenizer(resolve_model(info.base_model))
    base, load_info = _load_base(info, dtype, _trained_with_vision(info))
    reference = apply_adapter(base, info.folder)
    expected = _probe_logits(reference, tokenizer, load_info["device"])
    base = reference.unload()  # the same base weights, adapter removed
    exported = PeftModel.from_pretrained(base, str(folder))
    got = _probe_logits(exported, tokenizer, load_info["device"])
    diff, scale = _diff(expected, got)
    tol = TOLERANCE[dtype] * scale
    if diff > tol:
        raise ModelError(f"the exported adapter gives different logits (max diff {diff:.3g} > "
                         f"{tol:.3g}); the export was not written")
    return diff, tol, scale


def _export_merged(info: AdapterInfo, tmp: Path, out: Path, dtype: str, verify: bool,
                   emit) -> ExportResult:
    import torch
    from transformers import AutoModelForCausalLM, MllamaForConditionalGeneration

    from llamalora.plan import count_params
    from llamalora.models import resolve_model
    from llamalora.plan import load_model_config
    from llamalora.tokenizer import load_model_tokenizer

    # The merge always goes into the full vision model, text-only runs too: the result is a
    # complete Mllama checkpoint that AutoModelForCausalLM (text) and
    # MllamaForConditionalGeneration (images) both load, like the original.
    trained_with_vision = _trained_with_vision(info)
    base_path = resolve_model(info.base_model)
    config, _ = load_model_config(base_path)
    with_vision = getattr(config, "model_type", None) == "mllama"
    need = count_params(config, with_vision).total * (4 if dtype == "fp32" else 2)
    emit(Status(f"The merged model needs about {need / 2**30:.2f} GiB on disk "
                f"({shutil.disk_usage(tmp).free / 2**30:.1f} GiB free)"))
    check_disk([(tmp, need)], "the merged model")
    base, load_info = _load_base(info, dtype, with_vision)
    model = apply_adapter(base, info.folder)
    tokenizer, _ = load_model_tokenizer(base_path)
    device = load_info["device"]
    unmerged = _probe_logits(model, tokenizer, device) if verify else None
    merged = model.merge_and_unload()
    expected = _probe_logits(merged, tokenizer, device) if verify else None
    merged.save_pretrained(str(tmp), safe_serialization=True, max_shard_size="5GB")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(base_path, trust_remote_code=False).save_pretrained(str(tmp))
    if with_vision:
        from llamalora.models import load_image_processor

        load_image_processor(base_path).save_pretrained(str(tmp))
    _model_card(info, merged=True, mllama=_is_mllama(info)).save(tmp / "README.md")
    result = ExportResult(out, "merged")
    if verify:
        # Rounding W + BA to the target dtype moves the logits a little; reported, not refused
        # (--dtype fp32 keeps it exact).
        result.merge_diff, _ = _diff(unmerged, expected)
        del merged, model, base
        emit(Status("Checking the export: reloading with plain transformers"))
        cls = MllamaForConditionalGeneration if trained_with_vision else AutoModelForCausalLM
        reloaded = cls.from_pretrained(str(tmp), dtype=getattr(torch, DTYPES[dtype]),
                                       trust_remote_code=False).to(device)
        got = _probe_logits(reloaded, tokenizer, device)
        diff, scale = _diff(expected, got)
        tol = TOLERANCE[dtype] * scale
        if diff > tol:
            raise ModelError(f"the merged model gives different logits (max diff {diff:.3g} > "
                             f"{tol:.3g}); nothing was written")
        result.max_logit_diff, result.tolerance, result.logit_scale = diff, tol, scale
    return result

