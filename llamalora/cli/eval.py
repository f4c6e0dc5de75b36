"""`llamalora eval`: base beside tuned on held-out records, scored record by record."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llamalora.cli._console import out, print_json, progress_bar, quiet_libraries
from llamalora.cli._errors import handle_errors
from llamalora.cli._options import (BaseModelOpt, ImageRootOpt, InferenceQuantOpt, JsonOpt,
                                     KernelsOpt, SplitOpt)
from llamalora.config import KERNEL_CHOICES, QUANT_CHOICES, check_choice
from llamalora.events import EvalProgress, Status

EXAMPLES = """Examples:

  llamalora eval runs/demo                      # the records the run held out

  llamalora eval out/ --data test.jsonl --max-new-tokens 256

  llamalora eval adapter/ --data test.parquet --no-base --json

Writes OUT/eval.json (summary, settings, versions) and OUT/predictions.jsonl (per record:
prompt, reference, base and tuned answers, scores); OUT is RUN/eval unless --out.
"""

# (label, key, format, better when higher)
_ROWS = [("exact match", "exact_match", "{:.1%}", True), ("chrF", "chrf", "{:.1f}", True),
         ("ROUGE-L", "rouge_l", "{:.1f}", True), ("loss", "loss", "{:.4f}", False),
         ("perplexity", "perplexity", "{:.4g}", False),
         ("answer tokens", "answer_tokens", "{:.1f}", None)]


@handle_errors
def eval_command(
    run: Annotated[Path, typer.Argument(help="A run folder (train --output-dir), a checkpoint, "
                                             "or an exported adapter.", show_default=False)],
    data: Annotated[str | None, typer.Option(
        "--data", help="Records to score (any format validate reads); default: the records the "
                       "run held out (--eval-fraction).", show_default=False)] = None,
    max_new_tokens: Annotated[int, typer.Option(
        "--max-new-tokens", min=1, help="Most tokens of each answer.")] = 128,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", min=1, help="Prompts answered at once.")] = 32,
    no_base: Annotated[bool, typer.Option(
        "--no-base", help="Score the tuned model only (no base answers).")] = False,
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="Folder for eval.json and predictions.jsonl (default: RUN/eval).",
        show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace an earlier eval's files in the output folder.")] = False,
    model: BaseModelOpt = None,
    quant: InferenceQuantOpt = None,
    kernels: KernelsOpt = "auto",
    decoding: Annotated[str, typer.Option(
        "--decoding", help="auto (the static-cache decoder, batched, where the model allows) "
                           "or generate (transformers' generate, for comparison).")] = "auto",
    show: Annotated[int, typer.Option(
        "--show", min=0, help="Records shown each way where tuned and base differ most.")] = 3,
    split: SplitOpt = "train",
    image_root: ImageRootOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Score the tuned model against the base on held-out records (exact match, chrF, ROUGE-L,
    loss)."""
    if quant is not None:
        check_choice("quant", quant, QUANT_CHOICES)
    check_choice("kernels", kernels, KERNEL_CHOICES)
    check_choice("decoding", decoding, ("auto", "generate"))
    quiet_libraries()
    from llamalora.evaluate import EvalOptions, evaluate

    options = EvalOptions(max_new_tokens, batch_size, not no_base, decoding)
    with progress_bar("eval") as bar:
        task = None

        def on_event(event) -> None:
            nonlocal task
            if isinstance(event, Status):
                bar.console.print(event.message, markup=False, soft_wrap=True)
            elif isinstance(event, EvalProgress):
                if task is None:
                    task = bar.add_task("", total=event.total)
                bar.update(task, completed=event.done, description=event.model)

        result = evaluate(run, data=data, out=out_dir, options=options, overwrite=overwrite,
                          model=model, quant=quant, kernels=kernels, split=split,
                          image_root=image_root, on_event=on_event)
    if json_out:
        print_json(result.to_dict())
        return
    _report(result, show)


def _report(result, show: int) -> None:
    """The summary table, the records that moved most each way, and where the files are."""
    from rich.table import Table

    models = result.summary["models"]
    names = [m for m in ("base", "tuned") if m in models]
    s = result.settings
    out.print(f"{result.summary['records']} records of {s['data']}, {s['max_new_tokens']} new "
              f"tokens at most, greedy; {s['base_model']} ({s['quant']}) + {s['run']}",
              markup=False, soft_wrap=True)
    table = Table(box=None, pad_edge=False)
    table.add_column("")
    for name in names:
        table.add_column(name, justify="right")
    if len(names) == 2:
        table.add_column("change", justify="right")
    for label, key, fmt, _ in _ROWS:
        values = [models[m][key] for m in names]
        cells = [fmt.format(v) if v is not None else "-" for v in values]
        if len(names) == 2:
            cells.append(_change(values, key))
        table.add_row(label, *cells)
    out.print(table)
    out.print("chrF: character 6-grams; ROUGE-L: words of any script; exact match: whole "
              "answers; loss: the model's tokens (see eval.json \"tokenization\")",
              markup=False, soft_wrap=True)
    if len(names) == 2 and show:
        rows = result.records
        gain = sorted(rows, key=_diff, reverse=True)
        _show("Tuned beats base most (chrF)", [r for r in gain if _diff(r) > 0][:show])
        _show("Base beats tuned most (chrF)", [r for r in reversed(gain) if _diff(r) < 0][:show])
    t = result.timings
    out.print(f"\nWrote {result.out}/eval.json and predictions.jsonl ({t['wall_s']:.1f} s, of "
              f"which loading {t['load_s']:.1f} s; {t['generated_tokens']} tokens generated at "
              f"{t['tokens_per_s']} tokens/s; decoding: {s['decoding']})", markup=False,
              soft_wrap=True)


def _change(values: list, key: str) -> str:
    base, tuned = values
    if base is None or tuned is None or key == "answer_tokens":
        return ""
    if key == "exact_match":
        return f"{100 * (tuned - base):+.1f} pt"
    return {"loss": f"{tuned - base:+.4f}", "perplexity": f"{tuned - base:+.4g}"}.get(
        key, f"{tuned - base:+.1f}")


def _diff(row: dict) -> float:
    return row["scores"]["tuned"]["chrf"] - row["scores"]["base"]["chrf"]


def _show(title: str, rows: list[dict]) -> None:
    if not rows:
        return
    out.print(f"\n{title}:", markup=False, soft_wrap=True)
    for r in rows:
        out.print(f"  line {r['line']}: {_cut(r['prompt'])}", markup=False, soft_wrap=True)
        out.print(f"    reference: {_cut(r['reference'])}", markup=False, soft_wrap=True)
        for name in ("base", "tuned"):
            out.print(f"    {name} (chrF {r['scores'][name]['chrf']:.1f}): {_cut(r[name])}",
                      markup=False, soft_wrap=True)


def _cut(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"
