"""`llamalora train`: LoRA on an 8-bit (or 4-bit, or bf16) Llama 3.2 base."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from llamalora.cli._console import err, info, out, quiet_libraries, spinner, warn
from llamalora.cli._errors import handle_errors
from llamalora.cli._options import JsonOpt, MaxSeqLenOpt, SkipInvalidOpt
from llamalora.config import TrainConfig
from llamalora.errors import UsageError
from llamalora.tokenizer import DEFAULT_MODEL

H = TrainConfig.help_texts()

EXAMPLES = """Examples:

  llamalora train data/sample.jsonl --model tiny --output-dir runs/demo

  llamalora train --data-path data.jsonl --output-dir out/ --quant 8bit

  torchrun --nproc-per-node 2 -m llamalora train data.jsonl --output-dir out/

  llamalora train --data_path data.jsonl --output_dir out/ --num_train_epochs 3

The old script's flags, as in the last example, all still work. `--model tiny` is a tiny
random-weight model for trying the pipeline on a CPU: it produces no useful language.
"""


def _opt(*names: str, help_key: str, **kw):
    return typer.Option(*names, help=H[help_key], **kw)


@handle_errors
def train(
    data: Annotated[Path | None, typer.Argument(help="Training data (or use --data-path).",
                                                show_default=False)] = None,
    data_path: Annotated[Path | None, _opt("--data-path", "--data_path", help_key="data_path",
                                           show_default=False)] = None,
    output_dir: Annotated[Path | None, _opt("--output-dir", "--output_dir",
                                            help_key="output_dir", show_default=False)] = None,
    model: Annotated[str, _opt("--model", "--model-name-or-path", "--model_name_or_path",
                               help_key="model")] = DEFAULT_MODEL,
    quant: Annotated[str, _opt("--quant", help_key="quant")] = "8bit",
    batch_size: Annotated[int, _opt("--per-device-train-batch-size",
                                    "--per_device_train_batch_size", "--batch-size",
                                    help_key="batch_size")] = 2,
    grad_accum: Annotated[int, _opt("--gradient-accumulation-steps",
                                    "--gradient_accumulation_steps",
                                    help_key="gradient_accumulation_steps")] = 2,
    max_seq_length: MaxSeqLenOpt = 512,
    epochs: Annotated[float, _opt("--num-train-epochs", "--num_train_epochs",
                                  help_key="num_train_epochs")] = 3.0,
    max_steps: Annotated[int, _opt("--max-steps", "--max_steps", help_key="max_steps")] = 0,
    lora_rank: Annotated[int, _opt("--lora-rank", "--lora_rank", help_key="lora_rank")] = 8,
    lora_alpha: Annotated[float, _opt("--lora-alpha", "--lora_alpha",
                                      help_key="lora_alpha")] = 32,
    lora_dropout: Annotated[float, _opt("--lora-dropout", "--lora_dropout",
                                        help_key="lora_dropout")] = 0.05,
    target_modules: Annotated[str, _opt("--target-modules", "--target_modules",
                                        help_key="target_modules")] = "q_proj,k_proj,v_proj,o_proj",
    learning_rate: Annotated[float, _opt("--learning-rate", "--learning_rate", "--lr",
                                         help_key="learning_rate")] = 2e-4,
    warmup_ratio: Annotated[float, _opt("--warmup-ratio", "--warmup_ratio",
                                        help_key="warmup_ratio")] = 0.03,
    eval_fraction: Annotated[float, _opt("--eval-fraction", help_key="eval_fraction")] = 0.0,
    eval_steps: Annotated[int, _opt("--eval-steps", help_key="eval_steps")] = 0,
    save_steps: Annotated[int, _opt("--save-steps", "--save_steps", help_key="save_steps")] = 100,
    save_total_limit: Annotated[int, _opt("--save-total-limit", help_key="save_total_limit")] = 2,
    logging_steps: Annotated[int, _opt("--logging-steps", help_key="logging_steps")] = 1,
    seed: Annotated[int, _opt("--seed", help_key="seed")] = 42,
    train_on_prompt: Annotated[bool, _opt("--train-on-prompt", help_key="train_on_prompt")] = False,
    truncation: Annotated[str, _opt("--truncation", help_key="truncation")] = "truncate",
    gradient_checkpointing: Annotated[bool | None, _opt(
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help_key="gradient_checkpointing", show_default=False)] = None,
    kernels: Annotated[str, _opt("--kernels", help_key="kernels")] = "auto",
    packing: Annotated[bool, _opt("--packing/--no-packing", help_key="packing")] = True,
    compile_layers: Annotated[bool | None, _opt("--compile/--no-compile", help_key="compile",
                                                show_default=False)] = None,
    skip_invalid: SkipInvalidOpt = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint "
                                                          "in --output-dir.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier run in "
                                                                "--output-dir.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the data and print the plan "
                                                            "without loading weights.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Fine-tune a LoRA adapter on a quantized Llama 3.2 base."""
    path = data or data_path
    if path is None:
        raise UsageError("give the training data as an argument or with --data-path")
    if data is not None and data_path is not None and data != data_path:
        raise UsageError("the data path is given twice with different values; keep one")
    if output_dir is None and not dry_run:
        raise UsageError("pass --output-dir for the adapter and checkpoints")
    config = TrainConfig(
        data_path=str(path), output_dir=str(output_dir or ""), model=model, quant=quant,
        lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        target_modules=target_modules, batch_size=batch_size,
        gradient_accumulation_steps=grad_accum, max_seq_length=max_seq_length,
        num_train_epochs=epochs, max_steps=max_steps, learning_rate=learning_rate,
        warmup_ratio=warmup_ratio, eval_fraction=eval_fraction, eval_steps=eval_steps,
        save_steps=save_steps, save_total_limit=save_total_limit, logging_steps=logging_steps,
        seed=seed,
        train_on_prompt=train_on_prompt, truncation=truncation,
        gradient_checkpointing=gradient_checkpointing, kernels=kernels, packing=packing,
        compile=compile_layers,
        skip_invalid=skip_invalid)

    quiet_libraries()
    from llamalora.parallel import world
    from llamalora.plan import plan_training
    from llamalora.recipe import train as run_training

    is_main = world()[0] == 0
    with spinner("Checking and tokenizing the data"):
        plan = plan_training(config)
    if is_main:
        if plan.model_note:
            warn(plan.model_note)
        _render_plan(plan.to_dict(), config)
    if dry_run:
        if json_out and is_main:
            out.print_json(json.dumps({"plan": plan.to_dict()}))
        return
    renderer = _ProgressRenderer(enabled=is_main)
    with renderer:
        summary = run_training(config, resume=resume, overwrite=overwrite,
                               on_event=renderer.on_event, plan=plan)
    if not is_main:
        return
    if json_out:
        out.print_json(json.dumps(summary, default=str))
    else:
        out.print(f"Adapter saved to {output_dir}")
        out.print(f"final loss {summary['final_train_loss']:.4f}"
                  + (f", eval loss {summary['final_eval_loss']:.4f}"
                     if summary["final_eval_loss"] is not None else "")
                  + f", {summary['real_tokens_per_s']} real tokens/s, "
                    f"{summary['wall_time_s']} s")
        out.print(f"Chat with it: llamalora chat --adapter {output_dir}")


def _render_plan(p: dict, config: TrainConfig) -> None:
    t = p["truncation"]
    mem = p["estimated_peak_gib"]
    info(f"Plan: {p['train_records']} training record(s)"
         + (f", {p['eval_records']} held out for eval" if p["eval_records"] else "")
         + f"; {p['tokens_per_epoch']} tokens per epoch; {p['steps']} optimizer step(s) "
           f"({p['steps_per_epoch']} per epoch) of {p['effective_batch']} record(s) "
           f"= {config.batch_size} x {config.gradient_accumulation_steps} accumulation x "
           f"{p['world_size']} process(es)")
    info(f"Truncation at {t['max_seq_length']} ({t['mode']}): {t['records_over']} record(s) "
         f"over, {t['response_tokens_lost']} response token(s) cut, {t['records_dropped']} "
         "record(s) left out")
    info(f"Model: {config.model}, {p['params']['base'] / 1e9:.2f}B parameters"
         f"{' with the vision tower' if p['with_vision'] else ' (text only)'}, "
         f"LoRA {p['params']['lora'] / 1e6:.2f}M; estimated peak GPU memory: "
         + ", ".join(f"{q} {gib} GiB{' (chosen)' if q == config.quant else ''}"
                     for q, gib in mem.items()))


class _ProgressRenderer:
    """Turns the core's events into a Rich progress bar on stderr (rank 0 only)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total}"),
                                 TextColumn("{task.fields[stats]}"), TimeElapsedColumn(),
                                 TimeRemainingColumn(), console=err, disable=not enabled)
        self.task = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def on_event(self, kind: str, data: dict) -> None:
        if not self.enabled:
            return
        if kind == "status":
            self.progress.console.print(data["message"], markup=False)
        elif kind == "warning":
            self.progress.console.print(f"Warning: {data['message']}", markup=False)
        elif kind == "model":
            self.progress.console.print(
                f"Loaded {data['model_class']} ({data['quant']}, {data['compute_dtype']}) on "
                f"{data['device']}; {data['trainable_params']:,} trainable parameters",
                markup=False)
            self.progress.console.print(
                f"Base-layer kernels: {data['kernels']}; batches {data['batches']}; gradient "
                f"checkpointing {'on' if data['gradient_checkpointing'] else 'off'}; layers "
                f"{'compiled' if data['compiled'] else 'eager'}",
                markup=False)
        elif kind == "step":
            if self.task is None:
                self.task = self.progress.add_task("train", total=data["total_steps"], stats="",
                                                   completed=data["step"] - 1)
            mem = f" mem {data['gpu_mem_gib']} GiB" if "gpu_mem_gib" in data else ""
            ev = f" eval {data['eval_loss']:.4f}" if "eval_loss" in data else ""
            self.progress.update(self.task, completed=data["step"], stats=(
                f"loss {data['loss']:.4f} lr {data['learning_rate']:.2e} "
                f"{data['tokens_per_s']:.0f} tok/s{mem}{ev}"))
        elif kind == "checkpoint":
            self.progress.console.print(f"Saved checkpoint {data['path']}", markup=False)
