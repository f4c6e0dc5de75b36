"""What the training recipe reports while it runs, and what it returns.

The recipe never prints: it hands these events to an `on_event` callback (the CLI draws them,
trackers log them) and returns a `TrainResult`, which `llamalora.json` serializes. Events are
plain frozen dataclasses so a consumer can `match` on their type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Status:
    """A line for the user: what the run is doing, or (warning=True) something to look at."""

    message: str
    warning: bool = False


@dataclass(frozen=True)
class PlanReady:
    """The plan (`Plan.to_dict()`), once the data is checked and tokenized."""

    plan: dict


@dataclass(frozen=True)
class ModelReady:
    """The model is loaded, LoRA attached, and the step's paths chosen."""

    model_class: str
    quant: str
    compute_dtype: str
    device: str
    trainable_params: int
    kernels: str
    batches: str
    gradient_checkpointing: bool
    compiled: bool


@dataclass(frozen=True)
class StepDone:
    """One optimizer step. `to_record()` is its metrics.jsonl line."""

    step: int
    total_steps: int
    loss: float
    learning_rate: float
    grad_norm: float | None
    tokens: int
    tokens_per_s: float
    epoch: float
    step_time_s: float
    gpu_mem_gib: float | None = None
    eval_loss: float | None = None

    def to_record(self) -> dict:
        record = {"step": self.step, "loss": round(self.loss, 6),
                  "learning_rate": self.learning_rate, "tokens": self.tokens,
                  "tokens_per_s": round(self.tokens_per_s, 1), "epoch": round(self.epoch, 4),
                  "step_time_s": round(self.step_time_s, 4)}
        if self.grad_norm is not None:
            record["grad_norm"] = round(self.grad_norm, 6)
        if self.gpu_mem_gib is not None:
            record["gpu_mem_gib"] = self.gpu_mem_gib
        if self.eval_loss is not None:
            record["eval_loss"] = round(self.eval_loss, 6)
        return record


@dataclass(frozen=True)
class EvalDone:
    """The eval loss after the last step (evals between steps ride on `StepDone.eval_loss`)."""

    step: int
    eval_loss: float


@dataclass(frozen=True)
class CheckpointSaved:
    step: int
    path: str


@dataclass
class TrainResult:
    """A finished run: what `train` returns and `llamalora.json` holds."""

    llamalora_version: str
    config: dict
    plan: dict
    base_model: str
    model_class: str
    quant: str
    compute_dtype: str
    kernels: str
    gradient_checkpointing: bool
    compiled: bool
    batches: str
    data_sha256: str
    final_train_loss: float | None
    final_eval_loss: float | None
    real_tokens_per_s: float | None
    steps_run: int
    wall_time_s: float
    peak_gpu_mem_gib: float | None
    device: str
    world_size: int
    versions: dict
    loss_plot: str | None = None
    fsdp: dict | None = None
    trackers: list[str] = field(default_factory=list)
    offload_activations: bool = False  # checkpointed layer inputs in host memory

    def to_dict(self) -> dict:
        data = asdict(self)
        if data["fsdp"] is None:
            del data["fsdp"]
        return data


@dataclass(frozen=True)
class TrainFinished:
    """The last event: the run's result, after every file is written."""

    result: TrainResult


Event = Status | PlanReady | ModelReady | StepDone | EvalDone | CheckpointSaved | TrainFinished
OnEvent = Callable[[Event], None]


@dataclass(frozen=True)
class EvalProgress:
    """`evaluate` has answered `done` of `total` (records x models); `model` is answering."""

    done: int
    total: int
    model: str
