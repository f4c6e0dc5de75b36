"""Option types shared by the commands, with the old script's underscore spellings as aliases."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llamalora.config import QUANT_CHOICES

DataPathArg = Annotated[str, typer.Argument(
    help="Training data: JSONL, a JSON array, parquet, CSV or Arrow file, a dataset folder, or "
         "a Hub dataset id (ORG/NAME).", show_default=False)]
SplitOpt = Annotated[str, typer.Option(
    "--split", help="The split of a dataset folder or Hub dataset.")]
ImageRootOpt = Annotated[Path | None, typer.Option(
    "--image-root", help="Folder that relative image paths start from (default: the data "
                         "file's folder).", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object to stdout instead "
                                                      "of tables.")]
MaxSeqLenOpt = Annotated[int, typer.Option(
    "--max-seq-length", "--max_seq_length", min=16,
    help="Longest training sequence in tokens; longer records are cut.")]
TokenizerOpt = Annotated[str, typer.Option(
    "--tokenizer", help="Hub id or local folder of the tokenizer; falls back to the bundled "
                        "Llama 3.2 tokenizer when a Llama id can't be loaded.")]
SkipInvalidOpt = Annotated[bool, typer.Option(
    "--skip-invalid", help="Leave invalid records out (and say how many) instead of refusing "
                           "the file.")]
BaseModelOpt = Annotated[str | None, typer.Option(
    "--model", help="Base model (default: the one the adapter was trained on).",
    show_default=False)]
InferenceQuantOpt = Annotated[str | None, typer.Option(
    "--quant", help=f"{', '.join(QUANT_CHOICES[:-1])} or {QUANT_CHOICES[-1]} (default: what the "
                    "run trained with).",
    show_default=False)]
KernelsOpt = Annotated[str, typer.Option(
    "--kernels", help="Base-layer matmuls: fast, plain (bitsandbytes') or auto (fast on CUDA "
                      "GPUs).")]
