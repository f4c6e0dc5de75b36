"""`llamalora train`: LoRA on an 8-bit (or 4-bit, or bf16) Llama 3.2 base."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from llamalora.cli._console import err, info, out, print_json, quiet_libraries, spinner, warn
from llamalora.cli._errors import handle_errors
from llamalora.cli._options import JsonOpt
from llamalora.config import OptionSpec, TrainConfig, load_config_file
from llamalora.errors import UsageError
from llamalora.events import CheckpointSaved, Event, ModelReady, Status, StepDone, TrainResult
from llamalora.rundir import check_output_dir

EXAMPLES = """Examples:

  llamalora train data/sample.jsonl --model tiny --output-dir runs/demo

  llamalora train --data-path data.jsonl --output-dir out/ --quant 8bit

  llamalora train --config run.yaml --learning-rate 1e-4

  llamalora train --config out/llamalora.json --output-dir out2/

  torchrun --nproc-per-node 2 -m llamalora train data.jsonl --output-dir out/

  llamalora train --data_path data.jsonl --output_dir out/ --num_train_epochs 3

--config takes a YAML or JSON file whose keys are the option names (lora_rank or lora-rank);
flags given with it win over the file. A finished run's llamalora.json replays that run. The
old script's flags, as in the last example, all still work. `--model tiny` is a tiny
random-weight model for trying the pipeline on a CPU: it produces no useful language.
"""


@handle_errors
def train(
    data: Annotated[Path | None, typer.Argument(help="Training data (or use --data-path).",
                                                show_default=False)] = None,
    config_file: Annotated[Path | None, typer.Option(
        "--config", help="A YAML or JSON file of these options (keys: option names), or a "
                         "finished run's llamalora.json to replay it; flags win over it.",
        show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint "
                                                          "in --output-dir.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier run in "
                                                                "--output-dir.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the data and print the plan "
                                                            "without loading weights.")] = False,
    json_out: JsonOpt = False,
    **options: Any,
) -> None:
    """Fine-tune a LoRA adapter on a quantized Llama 3.2 base."""
    config = _build_config(data, config_file, options, dry_run)
    from llamalora.parallel import world

    is_main = world()[0] == 0
    if is_main and not dry_run:  # before the imports and the planning, not after
        check_output_dir(Path(config.output_dir), overwrite=overwrite, resume=resume)
    quiet_libraries()
    from llamalora.plan import plan_training
    from llamalora.recipe import train as run_training

    with spinner("Checking and tokenizing the data"):
        plan = plan_training(config)
    if is_main:
        if plan.model_note:
            warn(plan.model_note)
        if plan.data_note:
            info(plan.data_note)
        # A dry run's plan is its result (stdout, unless --json prints it there as JSON); a
        # run's plan is progress (stderr).
        _render_plan(plan.to_dict(), config, _result_line if dry_run and not json_out else info)
    if dry_run:
        if json_out and is_main:
            print_json({"plan": plan.to_dict()})
        return
    renderer = _ProgressRenderer(enabled=is_main)
    with renderer:
        result = run_training(config, resume=resume, overwrite=overwrite,
                              on_event=renderer.on_event, plan=plan)
    if is_main:
        _render_result(result, config.output_dir, json_out)


def _build_config(data: Path | None, config_file: Path | None, options: dict,
                  dry_run: bool) -> TrainConfig:
    """The run's options: defaults < --config file < flags (the DATA argument is --data-path)."""
    given = {name: value for name, value in options.items() if value is not None}
    if data is not None:
        if "data_path" in given and Path(given["data_path"]) != data:
            raise UsageError("the data path is given twice with different values; keep one")
        given["data_path"] = str(data)
    config = TrainConfig.from_sources(load_config_file(config_file) if config_file else {},
                                      given)
    if not config.data_path:
        raise UsageError("give the training data as an argument, with --data-path, or as "
                         "data_path in --config")
    if not config.output_dir and not dry_run:
        raise UsageError("pass --output-dir for the adapter and checkpoints")
    return config


def _config_option(spec: OptionSpec) -> inspect.Parameter:
    """One TrainConfig field as a keyword parameter: None by default, so only the flags given
    override --config, with the field's real default shown in the help."""
    shown = ("" if spec.default in (None, "") else
             f"  [default: {'on' if spec.default else 'off'}]" if spec.kind is bool else
             f"  [default: {spec.default}]")
    option = typer.Option(*spec.flags, help=spec.help + shown, show_default=False)
    return inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[spec.kind | None, option])


def _with_config_options(command):
    """Gives `command` (whose `**options` collects them) one option per TrainConfig field,
    after --config, so `--help` and parsing both come from the fields."""
    params = list(inspect.signature(command, eval_str=True).parameters.values())
    at = [p.name for p in params].index("config_file") + 1
    generated = [_config_option(spec) for spec in TrainConfig.options()]
    assert not {p.name for p in generated} & {p.name for p in params}
    rest = [p.replace(kind=p.KEYWORD_ONLY) for p in params[at:] if p.kind is not p.VAR_KEYWORD]
    command.__signature__ = inspect.Signature(params[:at] + generated + rest)
    return command


train = _with_config_options(train)


def _render_result(result: TrainResult, output_dir: str, json_out: bool) -> None:
    if json_out:
        print_json(result.to_dict())
        return
    parts = []  # no train loss when no step ran (a resume from the last step)
    if result.final_train_loss is not None:
        parts.append(f"final loss {result.final_train_loss:.4f}")
    if result.final_eval_loss is not None:
        parts.append(f"eval loss {result.final_eval_loss:.4f}")
    parts += [f"{result.real_tokens_per_s} real tokens/s", f"{result.wall_time_s} s"]
    out.print(f"Adapter saved to {output_dir}")
    out.print(", ".join(parts))
    out.print(f"Chat with it: llamalora chat --adapter {output_dir}")


def _result_line(text: str) -> None:
    out.print(text, markup=False, soft_wrap=True)


def _render_plan(p: dict, config: TrainConfig, say) -> None:
    t = p["truncation"]
    mem = p["estimated_peak_gib"]
    dropped = t["records_dropped"]
    why = ("over the limit with --truncation drop" if t["mode"] == "drop" else
           "no response token left after the cut")
    lines = t.get("dropped_lines", [])[:5]
    left_out = (f" ({why}: {'line' if len(lines) == 1 else 'lines'} "
                f"{', '.join(map(str, lines))}{' and more' if dropped > len(lines) else ''})"
                if dropped and lines else "")
    say(f"Plan: {p['train_records']} training record(s)"
        + (f", {p['eval_records']} held out for eval" if p["eval_records"] else "")
        + f"; {p['tokens_per_epoch']} tokens per epoch; {p['steps']} optimizer step(s) "
          f"({p['steps_per_epoch']} per epoch) of {p['effective_batch']} record(s) "
          f"= {config.batch_size} x {config.gradient_accumulation_steps} accumulation x "
          f"{p['world_size']} process(es)")
    say(f"Truncation at {t['max_seq_length']} ({t['mode']}): {t['records_over']} record(s) "
        f"over, {t['response_tokens_lost']} response token(s) cut, {dropped} record(s) left "
        f"out{left_out}")
    say(f"Model: {config.model}, {p['params']['base'] / 1e9:.2f}B parameters"
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

    def on_event(self, event: Event) -> None:
        if not self.enabled:
            return
        say = self.progress.console.print
        match event:
            case Status(message=message, warning=True):
                say(f"Warning: {message}", markup=False)
            case Status(message=message):
                say(message, markup=False)
            case ModelReady():
                say(f"Loaded {event.model_class} ({event.quant}, {event.compute_dtype}) on "
                    f"{event.device}; {event.trainable_params:,} trainable parameters",
                    markup=False)
                say(f"Base-layer kernels: {event.kernels}; batches {event.batches}; gradient "
                    f"checkpointing {'on' if event.gradient_checkpointing else 'off'}; layers "
                    f"{'compiled' if event.compiled else 'eager'}", markup=False)
            case StepDone():
                if self.task is None:
                    self.task = self.progress.add_task("train", total=event.total_steps,
                                                       stats="", completed=event.step - 1)
                mem = f" mem {event.gpu_mem_gib} GiB" if event.gpu_mem_gib is not None else ""
                ev = f" eval {event.eval_loss:.4f}" if event.eval_loss is not None else ""
                self.progress.update(self.task, completed=event.step, stats=(
                    f"loss {event.loss:.4f} lr {event.learning_rate:.2e} "
                    f"{event.tokens_per_s:.0f} tok/s{mem}{ev}"))
            case CheckpointSaved(path=path):
                say(f"Saved checkpoint {path}", markup=False)
            case _:  # PlanReady is drawn from plan_training; EvalDone and TrainFinished at the end
                pass
