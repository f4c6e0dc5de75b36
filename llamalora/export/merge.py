"""`--merge`: the LoRA merged into the base's weights, loaded in `--dtype` (never the quantized copy
a run may have trained on), saved as a standalone checkpoint that plain transformers loads; for a
plain Llama base also as a GGUF (`--gguf`). The merge step itself serves `--text-only` too.
"""

from __future__ import annotations

from dataclasses import dataclass

from llamalora.adapters import apply_adapter
from llamalora.events import Status
from llamalora.export.card import write_merged_card
from llamalora.export.gguf_file import (gguf_bytes, gguf_summary, gguf_weights, llama_shape,
                                        verify_gguf, write_gguf_target)
from llamalora.export.result import ExportResult
from llamalora.export.source import ExportSource
from llamalora.export.target import Target, Targets, check_room, format_size
from llamalora.export.verify import (DTYPES, TOLERANCE, Drift, Probe, drift, logit_diff,
                                     probe_for, probe_logits, verify)
from llamalora.template import template_of


@dataclass
class Merged:
    """The merged model and what the checks compare against (None with --no-verify)."""

    model: object
    probe: Probe
    inv_freq: object | None  # a text model's rotary frequencies, for the GGUF's rope check
    expected: object | None  # the merged model's probe logits
    unmerged: object | None  # the base + adapter's
    noise: float | None  # the merged model's own rounding noise (see verify.Drift)
    drift: Drift | None


def merge(source: ExportSource, dtype: str, *, with_vision: bool, check: bool) -> Merged:
    """Loads the base in `dtype`, puts the run's adapter on it, and merges it in; with `check`,
    records the probe logits before and after, and the merged model's rounding noise."""
    base, device = source.load_base(DTYPES[dtype], with_vision)
    model = apply_adapter(base, source.info.folder)
    probe = probe_for(source.tokenizer, device)
    unmerged = probe_logits(model, probe) if check else None
    merged = model.merge_and_unload()
    rotary = getattr(getattr(merged, "model", None), "rotary_emb", None)
    inv_freq = rotary.inv_freq.detach().float().cpu().clone() if rotary is not None else None
    if not check:
        return Merged(merged, probe, inv_freq, None, None, None, None)
    expected = probe_logits(merged, probe)
    noise = logit_diff(expected, probe_logits(merged, probe, math_attention=True))[0]
    return Merged(merged, probe, inv_freq, expected, unmerged, noise,
                  drift(unmerged, expected, noise))


def export_merged(source: ExportSource, targets: Targets, *, dtype: str, gguf_type: str,
                  check: bool, emit) -> ExportResult:
    """Writes the merged checkpoint into the --out folder (and a plain Llama's GGUF) and checks
    it with plain transformers."""
    from llamalora.plan import count_params

    folder, gguf = targets.folder, targets.gguf
    with_vision = source.merges_with_vision
    need = count_params(source.config, with_vision).total * (4 if dtype == "fp32" else 2)
    needs = [(folder, need)]
    if gguf is not None:
        needs.append((gguf, gguf_bytes(gguf_weights(source.meta_text_weights(),
                                                    source.config), gguf_type)))
    emit(Status(f"The merged model needs about {format_size(sum(n for _, n in needs))} on disk"))
    check_room(needs, "the merged model")
    merged = merge(source, dtype, with_vision=with_vision, check=check)
    merged.model.save_pretrained(str(folder.staging), safe_serialization=True,
                                 max_shard_size="5GB")
    _save_tokenizer(source, folder)
    write_merged_card(folder.staging, source, gguf.path.name if gguf is not None else None)
    config = merged.model.config
    if gguf is not None:
        write_gguf_target(gguf, gguf_weights(merged.model.state_dict(), config), config,
                          folder.staging, inv_freq=merged.inv_freq, gguf_type=gguf_type,
                          base_name=source.base_name, hub_id=source.hub_id, emit=emit)
    result = ExportResult(folder.path, "merged")
    got = None
    if check:
        merged.model = None  # the reloads need its memory
        _verify_merged(source, merged, folder, dtype, emit, result)
        if gguf is not None:
            got = verify_gguf(gguf, llama_shape(config), folder.staging, merged.expected,
                              merged.probe, gguf_type=gguf_type, dtype=dtype,
                              noise=merged.noise, emit=emit)
    if gguf is not None:
        result.gguf = gguf_summary(gguf, gguf_type, got, merged.noise, merged.unmerged)
    return result


def _save_tokenizer(source: ExportSource, folder: Target) -> None:
    """The base's tokenizer, with the chat template the run trained with (a base without one
    trained with llamalora's default), and its image processor if it has one."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.base_path, trust_remote_code=False)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = template_of(source.tokenizer).text
    tokenizer.save_pretrained(str(folder.staging))
    source.save_processor(folder.staging)


def _verify_merged(source: ExportSource, merged: Merged, folder: Target, dtype: str, emit,
                   result: ExportResult) -> None:
    """Reloads the folder with plain transformers; records how far the merge itself moved the
    logits (rounding W + BA to `dtype`: reported, not refused; --dtype fp32 keeps it exact)."""
    import torch

    result.note_drift(merged.drift)
    emit(Status("Checking the export: reloading with plain transformers"))
    cls = source.merged_class()
    check = verify("the merged model", lambda: cls.from_pretrained(
        str(folder.staging), dtype=getattr(torch, DTYPES[dtype]), trust_remote_code=False).to(
            merged.probe.device), merged.expected, merged.probe, share=TOLERANCE[dtype])
    result.max_logit_diff, result.tolerance = check.max_logit_diff, check.tolerance
    result.logit_scale = check.logit_scale
