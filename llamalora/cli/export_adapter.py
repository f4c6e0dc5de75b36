"""`llamalora export-adapter`: a clean adapter folder, a merged model, or a bare state dict."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llamalora.cli._console import info, out, print_json, quiet_libraries
from llamalora.cli._errors import handle_errors
from llamalora.cli._options import JsonOpt
from llamalora.errors import UsageError

EXAMPLES = """Examples:

  llamalora export-adapter runs/demo --out adapter/

  llamalora export-adapter out/ --out merged/ --merge --dtype bf16

  llamalora export-adapter out/checkpoints/step-000100 --state-dict lora_adapter_state_dict.pt

  llamalora export-adapter runs/demo --out runs/demo-merged --merge --gguf runs/demo.gguf

  llamalora export-adapter out/ --out llama/ --merge --text-only --gguf llama/model.gguf
"""


@handle_errors
def export_adapter(
    run: Annotated[Path, typer.Argument(help="A finished run, a checkpoint inside one, or an "
                                             "adapter folder.", show_default=False)],
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="Folder to write: a new or empty one, or an earlier export (with "
                      "--overwrite).",
        show_default=False)] = None,
    merge: Annotated[bool, typer.Option(
        "--merge", help="Merge LoRA into the base weights (loaded in --dtype, never "
                        "quantized) and save a standalone model.")] = False,
    dtype: Annotated[str, typer.Option(
        "--dtype", help="bf16, fp16 or fp32: weights of the merged model, and the precision of "
                        "the check.")] = "bf16",
    state_dict: Annotated[Path | None, typer.Option(
        "--state-dict", help="Write only the adapter's state dict (torch.save) to this .pt "
                             "file.", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace an earlier export at the target (never other files).")
                         ] = False,
    no_verify: Annotated[bool, typer.Option(
        "--no-verify", help="Skip reloading the export and comparing logits.")] = False,
    text_only: Annotated[bool, typer.Option(
        "--text-only", help="With --merge of a Llama 3.2 Vision run: write its language model "
                            "as a plain Llama checkpoint (the cross-attention layers dropped) "
                            "that llama.cpp, Ollama and vLLM serve; for runs trained on text "
                            "only.")] = False,
    gguf: Annotated[Path | None, typer.Option(
        "--gguf", help="With --merge (and --text-only for Llama 3.2 Vision): also write "
                       "this .gguf file (llama.cpp, Ollama).", show_default=False)] = None,
    gguf_type: Annotated[str, typer.Option(
        "--gguf-type", help="f16 or q8_0 (8-bit, about half the size): the GGUF's weights.")
                         ] = "f16",
    json_out: JsonOpt = False,
) -> None:
    """Export a trained adapter: PEFT folder, merged model, plain Llama + GGUF, or state dict."""
    if state_dict is None and out_dir is None:
        raise UsageError("pass --out DIR (or --state-dict FILE.pt)")
    if state_dict is not None and (merge or out_dir is not None):
        raise UsageError("--state-dict writes one file; use it without --out and --merge")
    quiet_libraries()
    from llamalora.export import exporter  # not at import: every command's start reads this file

    result = exporter.export_adapter(run, out_dir, merge=merge, dtype=dtype, state_dict=state_dict,
                                   overwrite=overwrite, verify=not no_verify,
                                   on_event=lambda event: info(event.message),
                                   text_only=text_only, gguf=gguf, gguf_type=gguf_type)
    _report_checks(result, dtype)
    if json_out:
        print_json(result.to_dict())
    else:
        out.print(f"Wrote {result.kind} to {result.out} ({result.bytes_written / 2**20:.1f} MiB)")
        if result.gguf is not None:
            out.print(f"Wrote GGUF ({result.gguf['type']}) to {result.gguf['path']} "
                      f"({result.gguf['bytes'] / 2**20:.1f} MiB)")


def _report_checks(result, dtype: str) -> None:
    """The checks' figures on stderr: each reload against the model it came from, and what
    merging into `dtype` moved (with what that rounding normally moves)."""
    reference = "the merged Mllama model" if result.kind == "llama" else "the merged model"
    unmerged = "the Mllama model + adapter" if result.kind == "llama" else "the model + adapter"
    if result.kind == "llama" and result.max_logit_diff is not None:
        info(f"Reloaded the Llama folder with plain transformers: max logit difference "
             f"{result.max_logit_diff:.3g} vs {reference} (tolerance {result.tolerance:.3g}), "
             f"{result.details['adapter_diff']:.3g} vs {unmerged}")
    elif result.max_logit_diff is not None:
        info(f"Reloaded and compared on a probe prompt: max logit difference "
             f"{result.max_logit_diff:.3g} (tolerance {result.tolerance:.3g})")
    gguf = result.gguf or {}
    if "max_logit_diff" in gguf:
        info(f"Reloaded the GGUF ({gguf['type']}) with transformers' GGUF loader: max logit "
             f"difference {gguf['max_logit_diff']:.3g} vs {reference} (tolerance "
             f"{gguf['tolerance']:.3g}), {gguf['adapter_diff']:.3g} vs {unmerged}")
    drift = result.merge_drift
    if result.merge_diff is not None and drift is not None:
        info(f"Merging into {dtype} moved the probe logits by at most {result.merge_diff:.3g} "
             f"(largest {drift['logit_scale']:.3g}); {dtype} rounding alone moves this model's "
             f"logits by {drift['noise']:.3g} (the same merged model through another attention "
             f"kernel), and the most likely next token stayed the same at {drift['same_top']} "
             f"of {drift['positions']} prompt positions"
            + ("" if dtype == "fp32" else "; --dtype fp32 keeps the merge exact"))
