"""export-adapter's core: the options and every target are checked before any weights load, the
export asked for is written into staging paths and checked, and only then moved into place."""

from __future__ import annotations

from pathlib import Path

from llamalora.errors import UsageError
from llamalora.export.adapter import write_adapter, write_state_dict
from llamalora.export.gguf_file import check_gguf_type, require_gguf
from llamalora.export.llama import export_llama
from llamalora.export.merge import export_merged
from llamalora.export.result import ExportResult
from llamalora.export.source import open_source
from llamalora.export.target import check_targets, discard, publish
from llamalora.export.verify import DTYPES


def export_adapter(run: str | Path, out: str | Path | None, *, merge: bool = False,
                   dtype: str = "bf16", state_dict: str | Path | None = None,
                   overwrite: bool = False, verify: bool = True, on_event=None,
                   text_only: bool = False, gguf: str | Path | None = None,
                   gguf_type: str = "f16") -> ExportResult:
    """Exports the adapter of a run (or a checkpoint inside one).

    Args:
        run: The run folder, a checkpoint, or an adapter folder.
        out: Target folder (ignored with `state_dict`).
        merge: Merge LoRA into bf16/fp16 base weights and save a standalone model.
        dtype: bf16, fp16 or fp32: the merged weights' dtype, and the check's precision.
        state_dict: Write only the adapter state dict (torch.save) to this file.
        overwrite: Replace an earlier export at the target (never other files).
        verify: Reload what was written and compare logits on a probe prompt.
        on_event: Called with a `Status` event for each step.
        text_only: With `merge` on a Llama 3.2 Vision run: write the language model as a plain
            `LlamaForCausalLM` (the cross-attention layers dropped); text-trained runs only.
        gguf: With `merge` (and `text_only` for Llama 3.2 Vision): also write this GGUF file.
        gguf_type: The GGUF's weights: "f16" or "q8_0".

    Raises:
        UsageError, OutputExistsError, ModelError, MissingExtraError.
    """
    emit = on_event or (lambda event: None)
    _check_options(merge, dtype, text_only, gguf, gguf_type, state_dict)
    if gguf is not None:
        require_gguf()  # before any loading: the fix is one pip install
    source = open_source(run)
    kind = source.export_kind(merge=merge, text_only=text_only, gguf=gguf is not None,
                              state_dict=state_dict is not None)
    targets = check_targets(out=out, gguf=gguf, state_dict=state_dict, overwrite=overwrite,
                            sources=source.places)
    try:
        result = _WRITERS[kind](source, targets, dtype=dtype, gguf_type=gguf_type,
                                check=verify, emit=emit)
        publish(targets, {"kind": kind, **source.provenance})
    except BaseException:
        discard(targets)
        raise
    return result.finish(targets)


def _check_options(merge: bool, dtype: str, text_only: bool, gguf, gguf_type: str,
                   state_dict) -> None:
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if text_only and not merge:
        raise UsageError("--text-only writes a merged model: pass --merge --text-only")
    if text_only and state_dict is not None:
        raise UsageError("--state-dict writes the adapter alone; use it without --text-only")
    if gguf is not None and not merge:
        raise UsageError("--gguf converts the merged model: pass --merge --gguf FILE")
    if gguf is not None:
        check_gguf_type(gguf_type)


# Each kind of export, by ExportSource.export_kind: (source, targets, *, dtype, gguf_type,
# check, emit) -> ExportResult, everything written into the targets' staging paths.
_WRITERS = {"state_dict": write_state_dict, "adapter": write_adapter, "merged": export_merged,
            "llama": export_llama}
