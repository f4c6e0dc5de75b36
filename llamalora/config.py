"""Training options: one dataclass with help text and checks that quote the bad value.

Defaults are the old one-file script's, so its users get the same run: 8-bit Llama 3.2 11B
Vision-Instruct, LoRA r 8 / alpha 32 / dropout 0.05 on q,k,v,o, batch 2 x accumulation 2,
max length 512, 3 epochs, learning rate 2e-4.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from llamalora.errors import ConfigError
from llamalora.tokenizer import DEFAULT_MODEL

QUANT_CHOICES = ("8bit", "4bit", "none")
KERNEL_CHOICES = ("auto", "fast", "plain")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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


def _opt(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass
class TrainConfig:
    """Everything one training run needs; `llamalora.json` records it."""

    data_path: str = _opt("", "Training data: JSONL, or a JSON array of records.")
    output_dir: str = _opt("", "Folder for the adapter, checkpoints and metrics.")
    model: str = _opt(DEFAULT_MODEL, "Hub id, local folder, or `tiny` (a built-in random model).")
    quant: str = _opt("8bit", "Base weights: 8bit (LLM.int8), 4bit (NF4) or none (bf16).")
    lora_rank: int = _opt(8, "LoRA rank r; higher fits more but costs memory.")
    lora_alpha: float = _opt(32, "LoRA alpha; the update is scaled by alpha / r.")
    lora_dropout: float = _opt(0.05, "Dropout on the LoRA input.")
    target_modules: str = _opt("q_proj,k_proj,v_proj,o_proj",
                               "Comma-separated projections to adapt, or all-linear.")
    batch_size: int = _opt(2, "Records per device per micro-batch.")
    gradient_accumulation_steps: int = _opt(2, "Micro-batches per optimizer step.")
    max_seq_length: int = _opt(512, "Longest sequence in tokens; longer records are cut.")
    num_train_epochs: float = _opt(3.0, "Passes over the data (fractions allowed).")
    max_steps: int = _opt(0, "Stop after this many optimizer steps (0: use the epochs).")
    learning_rate: float = _opt(2e-4, "Peak learning rate (AdamW).")
    warmup_ratio: float = _opt(0.03, "Share of steps with a linear warm-up.")
    weight_decay: float = _opt(0.0, "AdamW weight decay.")
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm (0: off).")
    eval_fraction: float = _opt(0.0, "Share of records held out for eval loss (0: none).")
    eval_steps: int = _opt(0, "Eval every N steps (0: at each save and at the end).")
    save_steps: int = _opt(100, "Checkpoint every N steps (0: only at the end).")
    save_total_limit: int = _opt(2, "Checkpoints kept; older ones are removed.")
    logging_steps: int = _opt(1, "Write a metrics line every N steps.")
    seed: int = _opt(42, "Seed for the data order, the split, and LoRA init.")
    train_on_prompt: bool = _opt(False, "Also compute loss on the prompt tokens.")
    truncation: str = _opt("truncate", "Records over max_seq_length: truncate or drop.")
    gradient_checkpointing: bool | None = _opt(
        None, "Recompute activations in backward to save memory (default: only when the plan "
              "says the run would not fit the GPU without it).")
    kernels: str = _opt("auto", "Base-layer matmuls: fast (llamalora's kernels on the stored "
                                "8/4-bit weights), plain (bitsandbytes' own), or auto (fast on "
                                "CUDA GPUs).")
    compile: bool | None = _opt(
        None, "torch.compile the decoder layers (default: on CUDA GPUs for text-only runs of "
              "100+ steps without checkpointing; the first steps then take 1-2 min longer).")
    packing: bool = _opt(True, "Pack each micro-batch's records into one padding-free row "
                               "(text-only data).")
    skip_invalid: bool = _opt(False, "Leave invalid records out instead of refusing the data.")

    def __post_init__(self) -> None:
        check_choice("quant", self.quant, QUANT_CHOICES)
        check_choice("kernels", self.kernels, KERNEL_CHOICES)
        if self.truncation not in ("truncate", "drop"):
            raise ConfigError(f"--truncation must be truncate or drop, got {self.truncation!r}")
        positive = {"lora_rank": self.lora_rank, "batch_size": self.batch_size,
                    "gradient_accumulation_steps": self.gradient_accumulation_steps,
                    "max_seq_length": self.max_seq_length, "learning_rate": self.learning_rate,
                    "lora_alpha": self.lora_alpha}
        for name, value in positive.items():
            if not value > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
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

    def target_module_list(self) -> list[str]:
        return lora_target_names(self.target_modules)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def help_texts(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}
