"""Where a run's metrics go: always `metrics.jsonl`, plus the trackers `--report-to` names.

The recipe opens one `Trackers` on rank 0 only (the caller decides; other ranks open nothing)
and hands it every event. `metrics.jsonl` is the record of the run: the loss plot and resume
read it, so it is written whatever happens to a tracker. A tracker that fails is warned about
once and switched off; the run goes on.

The tracker packages are optional extras and heavy to import, so they are imported only when
a tracker is checked or opened.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from llamalora.config import REPORT_TO_CHOICES, report_to_names
from llamalora.errors import MissingExtraError, first_line
from llamalora.events import EvalDone, StepDone
from llamalora.rundir import write_atomic

TRACKERS = REPORT_TO_CHOICES[1:]
"""The tracker names `--report-to` accepts (besides `none`)."""

TENSORBOARD_DIR = "tensorboard"
"""The folder in the output directory that holds TensorBoard's event files."""

METRICS_FILE = "metrics.jsonl"

_EVENT_FILES = "events.out.tfevents.*"


def check_trackers(names: list[str]) -> list[str]:
    """Checks that every named tracker's package imports.

    Call it before any weights load (the recipe and `--dry-run` do), so a missing extra fails
    in seconds, not after the model is on the GPU.

    Args:
        names: tracker names from `--report-to` (`[]` or `["none"]`: none).

    Returns:
        The trackers to open, in order, without repeats.

    Raises:
        ConfigError: the names break `config.report_to_names`' rule (an unknown one, say).
        MissingExtraError: one or more packages do not import; one message names them all and
            the pip command that installs them.
    """
    wanted = report_to_names(",".join(names) or "none")
    missing, broken = [], []
    for name in wanted:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            missing.append(name)
        except Exception as exc:  # a broken install (a protobuf clash, say) is as fatal
            missing.append(name)
            broken.append(f"{name}: {first_line(exc)}")
    if missing:
        listed = ", ".join(missing)
        why = f" ({'; '.join(broken)})" if broken else ""
        raise MissingExtraError(f"--report-to {listed} needs {listed} installed{why}: "
                                f"pip install 'llamalora[{','.join(missing)}]'")
    return wanted


def _scalars(event: StepDone | EvalDone) -> dict[str, float]:
    """The tracker metrics of one event, under the tags every tracker shares."""
    if isinstance(event, EvalDone):
        return {"eval/loss": event.eval_loss}
    scalars = {"train/loss": event.loss, "train/learning_rate": event.learning_rate,
               "train/tokens_per_s": event.tokens_per_s}
    if event.grad_norm is not None:
        scalars["train/grad_norm"] = event.grad_norm
    if event.gpu_mem_gib is not None:
        scalars["train/gpu_mem_gib"] = event.gpu_mem_gib
    if event.eval_loss is not None:
        scalars["eval/loss"] = event.eval_loss
    return scalars


class _TensorBoard:
    def __init__(self, output_dir: Path, resume_step: int, **_):
        from torch.utils.tensorboard import SummaryWriter

        log_dir = output_dir / TENSORBOARD_DIR
        if not resume_step:
            # A fresh run starts anew, as metrics.jsonl does: old event files would draw a
            # second curve over the same steps.
            for stale in log_dir.glob(_EVENT_FILES):
                stale.unlink()
        # purge_step makes readers drop the points an interrupted run logged after the
        # checkpoint we resume from, so the curve has no duplicates.
        self._writer = SummaryWriter(str(log_dir),
                                     purge_step=resume_step + 1 if resume_step else None)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        self._writer.close()


class _WandB:
    def __init__(self, output_dir: Path, run_name: str, config: dict, **_):
        import wandb

        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "llamalora"),
                               name=run_name, config=config, dir=str(output_dir))

    def log(self, scalars: dict[str, float], step: int) -> None:
        # The run's own log, not wandb.log: it cannot land in another run opened elsewhere.
        self._run.log(scalars, step=step)

    def close(self) -> None:
        self._run.finish()


class _Trackio:
    def __init__(self, run_name: str, config: dict, **_):
        import trackio

        self._trackio = trackio
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "llamalora"), name=run_name,
                     config=config)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self._trackio.log(scalars, step=step)

    def close(self) -> None:
        self._trackio.finish()


_BACKENDS = {"tensorboard": _TensorBoard, "wandb": _WandB, "trackio": _Trackio}


def _rewind(path: Path, step: int) -> None:
    """Drops metric lines written after `step`, the checkpoint a resumed run continues from."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if line.strip() and json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except (ValueError, AttributeError):
            pass  # a line cut short by a kill mid-write: it was never a whole record
    write_atomic(path, "".join(line + "\n" for line in kept))


class Trackers:
    """`metrics.jsonl` and the open trackers of one run; make it with `open_trackers`.

    Open it on rank 0 only. Use it as a context manager, or call `close` when the run ends.

    Attributes:
        names: the trackers asked for, in order.
        metrics_path: the `metrics.jsonl` file.
    """

    def __init__(self, names: list[str], metrics_path: Path, logging_steps: int,
                 warn: Callable[[str], None]):
        self.names = names
        self.metrics_path = metrics_path
        self._logging_steps = logging_steps
        self._warn = warn
        self._backends: dict[str, object] = {}
        self._file = None

    @property
    def active(self) -> list[str]:
        """The trackers still on: those asked for, less any that failed."""
        return list(self._backends)

    def _guard(self, name: str, what: str, call: Callable[[], object]) -> None:
        try:
            call()
        except Exception as exc:
            # One warning, then the tracker is off: a dead connection would fail every step.
            self._backends.pop(name, None)
            self._warn(f"{name} failed to {what} ({first_line(exc)}); it is off for the rest of "
                       f"the run, {self.metrics_path.name} still gets every metric")

    def log(self, event: object) -> None:
        """Records one event; events other than `StepDone` and `EvalDone` are ignored.

        A `StepDone` is recorded when its step is a multiple of `logging_steps`, when it has an
        eval loss, or when it is the last step; an `EvalDone` always. The same events go to
        `metrics.jsonl` (one flushed line each) and to every tracker still on.

        Args:
            event: an event from `llamalora.events`.
        """
        if isinstance(event, StepDone):
            if not (event.step % self._logging_steps == 0 or event.eval_loss is not None
                    or event.step == event.total_steps):
                return
            record = event.to_record()
        elif isinstance(event, EvalDone):
            record = {"step": event.step, "eval_loss": round(event.eval_loss, 6)}
        else:
            return
        if self._file is None:
            raise ValueError("Trackers.log after close")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # the file is the run's record: a crash keeps every logged step
        scalars = _scalars(event)
        for name, backend in list(self._backends.items()):
            self._guard(name, f"log step {event.step}",
                        lambda backend=backend: backend.log(scalars, event.step))

    def close(self) -> None:
        """Closes `metrics.jsonl` and finishes every tracker; a second call does nothing."""
        if self._file is not None:
            self._file.close()
            self._file = None
        for name, backend in list(self._backends.items()):
            self._guard(name, "close", backend.close)
        self._backends.clear()

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_trackers(names: list[str], output_dir: Path, *, run_name: str, config: dict,
                  logging_steps: int, resume_step: int = 0,
                  warn: Callable[[str], None]) -> Trackers:
    """Opens `metrics.jsonl` and the named trackers for a run. Call it on rank 0 only.

    A fresh run (`resume_step == 0`) starts `metrics.jsonl` and the TensorBoard folder anew; a
    resumed one keeps what was logged up to `resume_step` and drops what came after.

    Args:
        names: tracker names from `--report-to` (`[]` or `["none"]`: none).
        output_dir: the run's output folder. `metrics.jsonl` goes here, TensorBoard's event
            files under `output_dir / "tensorboard"`, W&B's files under `output_dir / "wandb"`.
        run_name: the run's name in W&B and trackio.
        config: the run's options, recorded by W&B and trackio.
        logging_steps: a step is logged when it is a multiple of this (and see `Trackers.log`).
        resume_step: the checkpoint step a resumed run continues from; 0 for a fresh run.
        warn: called with one line when a tracker fails to open, log or close; that tracker
            is then off and the run goes on.

    Returns:
        The open `Trackers`; close it (or use it as a context manager) when the run ends.

    Raises:
        ConfigError: a name is not a tracker.
        MissingExtraError: a tracker's package does not import.
    """
    if logging_steps < 1:
        raise ValueError(f"logging_steps must be >= 1, got {logging_steps}")
    wanted = check_trackers(names)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    trackers = Trackers(wanted, output_dir / METRICS_FILE, logging_steps, warn)
    if resume_step > 0:
        _rewind(trackers.metrics_path, resume_step)
    trackers._file = trackers.metrics_path.open("a" if resume_step > 0 else "w",
                                                encoding="utf-8")
    for name in wanted:
        def start(name=name):
            trackers._backends[name] = _BACKENDS[name](
                output_dir=output_dir, run_name=run_name, config=config,
                resume_step=resume_step)
        trackers._guard(name, "start", start)
    return trackers
