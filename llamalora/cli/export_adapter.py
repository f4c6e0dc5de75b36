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

  llamalora export-adapter out/ --out llama/ --merge --text-only --gguf llama/model.gguf
"""


@handle_errors
def export_adapter(
    run: Annotated[Path, typer.Argument(help="A finished run, a checkpoint inside one, or an "
                                             "adapter folder.", show_default=False)],
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="Folder to write (refused if it exists, unless --overwrite).",
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
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing target.")
                         ] = False,
    no_verify: Annotated[bool, typer.Option(
        "--no-verify", help="Skip reloading the export and comparing logits.")] = False,
    text_only: Annotated[bool, typer.Option(
        "--text-only", help="With --merge: write a plain Llama checkpoint (the cross-attention "
                            "layers dropped) that llama.cpp, Ollama and vLLM serve; for runs "
                            "trained on text only.")] = False,
    gguf: Annotated[Path | None, typer.Option(
        "--gguf", help="With --merge --text-only: also write this .gguf file (llama.cpp, "
                       "Ollama).", show_default=False)] = None,
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
    from llamalora.export import export_adapter as run_export

    result = run_export(run, out_dir, merge=merge, dtype=dtype, state_dict=state_dict,
                        overwrite=overwrite, verify=not no_verify,
                        on_event=lambda event: info(event.message), text_only=text_only,
                        gguf=gguf, gguf_type=gguf_type)
    if result.kind == "llama" and result.max_logit_diff is not None:
        checks = [("the Llama folder with plain transformers", result.max_logit_diff,
                   result.tolerance, result.details["adapter_diff"])]
        if result.gguf is not None:
            checks.append((f"the GGUF ({result.gguf['type']}) with transformers' GGUF loader",
                           result.gguf["max_logit_diff"], result.gguf["tolerance"],
                           result.gguf["adapter_diff"]))
        for what, diff, tol, adapter_diff in checks:
            info(f"Reloaded {what}: max logit difference {diff:.3g} vs the merged Mllama model "
                 f"(tolerance {tol:.3g}), {adapter_diff:.3g} vs the Mllama model + adapter")
    elif result.max_logit_diff is not None:
        info(f"Reloaded and compared on a probe prompt: max logit difference "
             f"{result.max_logit_diff:.3g} (tolerance {result.tolerance:.3g})")
    if result.merge_diff is not None:
        info(f"Merging into {dtype} moved the probe logits by at most {result.merge_diff:.3g} "
             f"(largest logit {result.logit_scale:.3g}); --dtype fp32 keeps the merge exact")
    if json_out:
        print_json(result.to_dict())
    else:
        out.print(f"Wrote {result.kind} to {result.out} ({result.bytes_written / 2**20:.1f} MiB)")
        if result.gguf is not None:
            out.print(f"Wrote GGUF ({result.gguf['type']}) to {result.gguf['path']} "
                      f"({result.gguf['bytes'] / 2**20:.1f} MiB)")
