"""Training options: one dataclass whose fields carry each option's default, help text and
command-line spellings, checked in `__post_init__` with messages that quote the bad value.

Defaults are the old one-file script's, so its users get the same run: 8-bit Llama 3.2 11B
Vision-Instruct, LoRA r 8 / alpha 32 / dropout 0.05 on q,k,v,o, batch 2 x accumulation 2,
max length 512, 3 epochs, learning rate 2e-4.

Options also come from a YAML or JSON file (`load_config_file`), such as a finished run's
`llamalora.json`; `TrainConfig.from_sources` layers defaults < file < command line. This module
never imports torch: the CLI builds `train --help` from it.
"""

from __future__ import annotations

import difflib
import functools
import json
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


from llamalora.errors import ConfigError

DEFAULT_MODEL = "meta-llama/Llama-3.2-11B-Vision-Instruct"

QUANT_CHOICES = ("8bit", "4bit", "none")
KERNEL_CHOICES = ("auto", "fast", "plain")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj"
# --lr-scheduler's names -> transformers.get_scheduler's. All three start with the linear
# warm-up over --warmup-ratio of the steps; transformers' own "constant" would skip it, so ours
# is its "constant_with_warmup".
LR_SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
REPORT_TO_CHOICES = ("none", "tensorboard", "wandb", "trackio")


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    """Raises ConfigError quoting the bad value when `value` is not one of `choices`."""
    if value not in choices:
        raise ConfigError(f"--{option} must be one of {', '.join(choices)}, got {value!r}")


def lora_target_names(target_modules: str) -> list[str]:
    """The projection names a `--target-modules` value stands for.

    Args:
        target_modules: `"all-linear"` or a comma list of names from `LORA_TARGETS`.

    Raises:
        ConfigError: An unknown or empty list.
    """
    text = (target_modules or "").strip()
    if text == "all-linear":
        return list(LORA_TARGETS)
    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    unknown = [n for n in names if n not in LORA_TARGETS]
    if unknown or not names:
        raise ConfigError(f"--target-modules: unknown {', '.join(unknown) or 'empty list'}; use "
                          f"all-linear or some of {','.join(LORA_TARGETS)}")
    return names


def report_to_names(report_to: str) -> list[str]:
    """The trackers a `--report-to` value names, besides metrics.jsonl (always written).

    Args:
        report_to: `"none"` or a comma list of names from `REPORT_TO_CHOICES` other than none.

    Returns:
        The tracker names in the order given, without duplicates; `[]` for none.

    Raises:
        ConfigError: An unknown name, an empty list, or none mixed with trackers.
    """
    names = list(dict.fromkeys(t.strip() for t in (report_to or "").split(",") if t.strip()))
    unknown = [n for n in names if n not in REPORT_TO_CHOICES]
    if unknown or not names or ("none" in names and len(names) > 1):
        why = (f"unknown {', '.join(unknown)}" if unknown else "empty list" if not names
               else "none can't be combined with a tracker")
        raise ConfigError(f"--report-to {report_to!r}: {why}; use none or a comma list of "
                          f"{', '.join(REPORT_TO_CHOICES[1:])}")
    return [] if names == ["none"] else names


def _opt(default, help_text: str, *flags: str):
    """A field with its help and CLI spellings; each flag also gets its underscore twin
    (`--lora-rank` and `--lora_rank`, as the old script spelled them)."""
    spelled = []
    for decl in flags:
        twin = "/".join("--" + f[2:].replace("-", "_") for f in decl.split("/"))
        # `--packing/--no-packing` keeps one pair: Click would list `--packing` twice.
        spelled += [decl] + ([twin] if twin.split("/")[0] != decl.split("/")[0] else [])
    return field(default=default, metadata={"help": help_text,
                                            "flags": tuple(dict.fromkeys(spelled))})


@dataclass
class TrainConfig:
    """Everything one training run needs; `llamalora.json` records it."""

    data_path: str = _opt("", "Training data: JSONL, a JSON array, parquet, CSV or Arrow file, a "
                              "dataset folder, or a Hub dataset id (ORG/NAME).", "--data-path")
    split: str = _opt("train", "The split of a dataset folder or Hub dataset.", "--split")
    image_root: str = _opt("", "Folder that relative image paths start from (default: the data "
                               "file's folder).", "--image-root")
    output_dir: str = _opt("", "Folder for the adapter, checkpoints and metrics.", "--output-dir")
    model: str = _opt(DEFAULT_MODEL, "Hub id, local folder, or `tiny` (a built-in random model).",
                      "--model", "--model-name-or-path")
    quant: str = _opt("8bit", "Base weights: 8bit (LLM.int8), 4bit (NF4) or none (bf16).",
                      "--quant")
    lora_rank: int = _opt(8, "LoRA rank r; higher fits more but costs memory.", "--lora-rank")
    lora_alpha: float = _opt(32, "LoRA alpha; the update is scaled by alpha / r.", "--lora-alpha")
    lora_dropout: float = _opt(0.05, "Dropout on the LoRA input.", "--lora-dropout")
    target_modules: str = _opt(DEFAULT_LORA_TARGETS,
                               "Comma-separated projections to adapt, or all-linear.",
                               "--target-modules")
    batch_size: int = _opt(2, "Records per device per micro-batch.",
                           "--per-device-train-batch-size", "--batch-size")
    gradient_accumulation_steps: int = _opt(2, "Micro-batches per optimizer step.",
                                            "--gradient-accumulation-steps")
    max_seq_length: int = _opt(512, "Longest sequence in tokens (16 or more); longer records are "
                                    "cut.", "--max-seq-length")
    num_train_epochs: float = _opt(3.0, "Passes over the data (fractions allowed).",
                                   "--num-train-epochs")
    max_steps: int = _opt(0, "Stop after this many optimizer steps (0: use the epochs).",
                          "--max-steps")
    learning_rate: float = _opt(2e-4, "Peak learning rate (AdamW).", "--learning-rate", "--lr")
    lr_scheduler: str = _opt("linear", "Learning rate after the warm-up: linear (decays to 0), "
                                       "cosine (decays to 0 on a half cosine) or constant.",
                             "--lr-scheduler")
    warmup_ratio: float = _opt(0.03, "Share of steps with a linear warm-up from 0 to the peak "
                                     "learning rate, before any --lr-scheduler.", "--warmup-ratio")
    weight_decay: float = _opt(0.0, "AdamW weight decay (decoupled; 0: none).", "--weight-decay")
    max_grad_norm: float = _opt(1.0, "Clip the gradient's L2 norm to this (0: no clipping).",
                                "--max-grad-norm")
    eval_fraction: float = _opt(0.0, "Share of records held out for eval loss (0: none).",
                                "--eval-fraction")
    eval_steps: int = _opt(0, "Eval every N steps (0: at each save and at the end).",
                           "--eval-steps")
    save_steps: int = _opt(100, "Checkpoint every N steps (0: only at the end).", "--save-steps")
    save_total_limit: int = _opt(2, "Checkpoints kept; older ones are removed (0: keep all).",
                                 "--save-total-limit")
    logging_steps: int = _opt(1, "Write a metrics line every N steps.", "--logging-steps")
    report_to: str = _opt("none", "Also log metrics to: none, or a comma list of tensorboard, "
                                  "wandb, trackio (metrics.jsonl is always written).",
                          "--report-to")
    seed: int = _opt(42, "Seed for the data order, the split, and LoRA init.", "--seed")
    train_on_prompt: bool = _opt(False, "Also compute loss on the prompt tokens.",
                                 "--train-on-prompt/--no-train-on-prompt")
    truncation: str = _opt("truncate", "Records over max_seq_length: truncate or drop.",
                           "--truncation")
    gradient_checkpointing: bool | None = _opt(
        None, "Recompute activations in backward to save memory (default: only when the plan "
              "says the run would not fit the GPU without it).",
        "--gradient-checkpointing/--no-gradient-checkpointing")
    offload_activations: bool | None = _opt(
        None, "With gradient checkpointing, keep each layer's saved input in host memory until "
              "backward (default: only when the plan says checkpointing alone would not fit the "
              "GPU; CUDA graphs stay off with it).",
        "--offload-activations/--no-offload-activations")
    kernels: str = _opt("auto", "Base-layer matmuls: fast (llamalora's kernels on the stored "
                                "8/4-bit weights), plain (bitsandbytes' own), or auto (fast on "
                                "CUDA GPUs).", "--kernels")
    cuda_graphs: bool | None = _opt(
        None, "Replay each step's packed rows from CUDA graphs, one per padded shape, so the "
              "GPU never waits on Python (default: on CUDA GPUs where the step fits; with images "
              "each micro-batch is a row; off with --no-packing, FSDP or gradient "
              "checkpointing).",
        "--cuda-graphs/--no-cuda-graphs")
    compile: bool | None = _opt(
        None, "torch.compile the decoder layers (default: on CUDA GPUs for text-only runs of "
              "100+ steps without checkpointing or CUDA graphs; the first steps then take 1-2 "
              "min longer).",
        "--compile/--no-compile")
    packing: bool = _opt(True, "Pack each micro-batch's records into one padding-free row "
                               "(records with images too: each sees only its own).",
                         "--packing/--no-packing")
    skip_invalid: bool = _opt(False, "Leave invalid records out instead of refusing the data.",
                              "--skip-invalid/--no-skip-invalid")
    num_proc: int = _opt(0, "Processes that tokenize the data (0: one for under 50,000 records, "
                            "else up to 8).", "--num-proc", "--preprocessing-num-workers")

    def __post_init__(self) -> None:
        for spec in self.options():
            _check_type(spec, getattr(self, spec.name), "--" + spec.name.replace("_", "-"))
        check_choice("quant", self.quant, QUANT_CHOICES)
        check_choice("kernels", self.kernels, KERNEL_CHOICES)
        check_choice("lr-scheduler", self.lr_scheduler, tuple(LR_SCHEDULERS))
        if self.truncation not in ("truncate", "drop"):
            raise ConfigError(f"--truncation must be truncate or drop, got {self.truncation!r}")
        positive = {"lora_rank": self.lora_rank, "batch_size": self.batch_size,
                    "gradient_accumulation_steps": self.gradient_accumulation_steps,
                    "max_seq_length": self.max_seq_length, "learning_rate": self.learning_rate,
                    "lora_alpha": self.lora_alpha, "logging_steps": self.logging_steps}
        for name, value in positive.items():
            if not value > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.max_seq_length < 16:  # room for the template's header tokens and an answer
            raise ConfigError(f"--max-seq-length must be at least 16, got {self.max_seq_length}")
        for name in ("num_train_epochs", "weight_decay", "max_grad_norm", "eval_steps",
                     "save_steps", "save_total_limit", "num_proc"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be 0 or more, got "
                                  f"{getattr(self, name)}")
        if self.max_steps < 0 or (self.max_steps == 0 and not self.num_train_epochs > 0):
            raise ConfigError("give --num-train-epochs > 0 or --max-steps > 0, got "
                              f"{self.num_train_epochs} epochs and {self.max_steps} steps")
        for name in ("lora_dropout", "warmup_ratio"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1), got "
                                  f"{getattr(self, name)}")
        if not 0 <= self.eval_fraction < 0.5:
            raise ConfigError(f"--eval-fraction must be in [0, 0.5), got {self.eval_fraction}")
        lora_target_names(self.target_modules)
        report_to_names(self.report_to)

    def target_module_list(self) -> list[str]:
        return lora_target_names(self.target_modules)

    def scheduler_name(self) -> str:
        """transformers' name of the `--lr-scheduler` schedule (each with its warm-up)."""
        return LR_SCHEDULERS[self.lr_scheduler]

    def report_to_list(self) -> list[str]:
        return report_to_names(self.report_to)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def options(cls) -> list[OptionSpec]:
        """Each field as an option: what `train --help` and config files are built from."""
        return list(_option_specs(cls))

    @classmethod
    def from_sources(cls, file_values: dict | None = None,
                     cli_values: dict | None = None) -> TrainConfig:
        """Defaults, overridden by a config file's values, overridden by the command line's.

        Args:
            file_values: From `load_config_file` (or any mapping of option names to values).
            cli_values: Option names to the values given as flags; None means not given.

        Raises:
            ConfigError: An unknown key (naming the nearest option), a value of the wrong type,
                or an option out of range.
        """
        merged = _field_values(file_values or {}, where="")
        merged.update(_field_values({k: v for k, v in (cli_values or {}).items()
                                     if v is not None}, where=""))
        return cls(**merged)


@dataclass(frozen=True)
class OptionSpec:
    """One TrainConfig field as an option: `kind` is int, float, str or bool; `optional` means
    None is allowed (the tri-state flags, where None is automatic); `flags` are Click's
    declarations, `--x/--no-x` for booleans."""

    name: str
    kind: type
    optional: bool
    default: Any
    help: str
    flags: tuple[str, ...]


@functools.cache
def _option_specs(cls: type) -> tuple[OptionSpec, ...]:
    hints = typing.get_type_hints(cls)
    specs = []
    for f in fields(cls):
        args = typing.get_args(hints[f.name])  # (bool, NoneType) for `bool | None`
        kind = next(a for a in args if a is not type(None)) if args else hints[f.name]
        specs.append(OptionSpec(f.name, kind, type(None) in args, f.default, f.metadata["help"],
                                f.metadata["flags"]))
    return tuple(specs)


_WANTED = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _check_type(spec: OptionSpec, value: Any, label: str) -> Any:
    """`value` if it fits `spec` (a float field takes ints too), else a ConfigError naming
    `label` and the type wanted."""
    if value is None and spec.optional:
        return value
    ok = (isinstance(value, spec.kind) and not (spec.kind is int and isinstance(value, bool))
          or spec.kind is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        wanted = _WANTED[spec.kind] + (" or null (automatic)" if spec.optional else "")
        raise ConfigError(f"{label} must be {wanted}, got {value!r} ({type(value).__name__})")
    return value


def _key_names() -> dict[str, str]:
    """Every key a config file may use -> its field: the field names and each flag's name
    (`per_device_train_batch_size`, `lr`), with dashes or underscores."""
    names = {}
    for spec in TrainConfig.options():
        names[spec.name] = spec.name
        for decl in spec.flags:
            names[decl.split("/")[0][2:].replace("-", "_")] = spec.name
    return names


def _field_values(values: dict, where: str) -> dict[str, Any]:
    """`values` keyed by field name, each checked for its type; `where` prefixes errors."""
    names = _key_names()
    specs = {s.name: s for s in TrainConfig.options()}
    out: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for key, value in values.items():
        name = names.get(str(key).replace("-", "_"))
        if name is None:
            nearest = difflib.get_close_matches(str(key).replace("-", "_"), list(names), n=1,
                                                cutoff=0)
            raise ConfigError(f"{where}unknown key {key!r}; did you mean {nearest[0]!r}? "
                              "(`llamalora train --help` lists the options)")
        if name in given_as:
            raise ConfigError(f"{where}{name} is given twice (as {given_as[name]!r} and "
                              f"{key!r}); keep one")
        spec = specs[name]
        # YAML 1.1 reads `2e-4` (no dot) as text; take it as the number it spells.
        if spec.kind is float and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        out[name] = _check_type(spec, value, f"{where}{key}")
        given_as[name] = str(key)
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Reads train options from a YAML or JSON file, keyed by field name and type-checked.

    Keys are option names with underscores or dashes (`lora_rank`, `lora-rank`, or a flag's
    other name such as `per_device_train_batch_size`). A finished run's `llamalora.json` (a
    mapping with `llamalora_version` and `config`) gives its recorded `config`, so the run
    replays. Relative paths in the file are taken as given, like flags: from the current folder.

    Raises:
        ConfigError: The file is missing or unreadable, is not valid YAML/JSON, does not hold a
            mapping, or has an unknown key or a value of the wrong type; the message names it.
    """
    path = Path(path)
    if not path.is_file():
        if path.is_dir() and (path / "llamalora.json").is_file():
            raise ConfigError(f"--config {path} is a folder; pass {path / 'llamalora.json'} to "
                              "replay its run")
        why = "is not a file" if path.exists() else "does not exist"
        raise ConfigError(f"--config {path} {why}; pass a YAML or JSON file of train options")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path} is not UTF-8 text; pass a YAML or JSON file") from None
    except OSError as exc:
        raise ConfigError(f"can't read --config {path}: {exc.strerror or exc}") from None
    data = _parse(path, text)
    if data is None:  # an empty file: nothing to override
        return {}
    if isinstance(data, dict) and "llamalora_version" in data and "config" in data:
        data = data["config"]
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of option names to values (like "
                          f"`lora_rank: 16`), not a {type(data).__name__}")
    return _field_values(data, where=f"{path}: ")


def _parse(path: Path, text: str) -> Any:
    # .json goes through json: YAML 1.1 would read json.dumps' `1e-05` as text.
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, "
                              f"column {exc.colno}") from None
    import yaml  # only for --config: every command imports this module

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML: {problem}{where}") from None
