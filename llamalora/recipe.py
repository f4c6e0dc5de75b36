"""The training recipe: `train(config) -> TrainResult`, read top to bottom.

    open the run folder -> plan -> processes and model -> optimizer and schedule -> restore
    -> the loop of optimizer steps -> save

It never prints: progress goes to the `on_event` callback as `llamalora.events` objects, and
problems are raised as llamalora errors. What differs between one process, data-parallel and FSDP
lives behind `llamalora.parallel`; one optimizer step is `llamalora.step.TrainStep`; the folder,
its lock and its atomic saves are `llamalora.rundir.RunFolder`; metrics and trackers are
`llamalora.trackers`.
"""

from __future__ import annotations

import json
import math
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from llamalora import __version__, parallel, quant, trackers
from llamalora.batching import batch_order, record_lengths
from llamalora.config import QUANT_CHOICES, TrainConfig
from llamalora.errors import LlamaLoraError, ModelError
from llamalora.events import (CheckpointSaved, EvalDone, ModelReady, OnEvent, PlanReady, Status,
                              StepDone, TrainFinished, TrainResult)
from llamalora.families import Family, family_of_model
from llamalora.packing import IGNORE_INDEX, Tokenized, static_shape
from llamalora.plan import Plan, choose_memory, fits_gpu, plan_training
from llamalora.provenance import package_versions
from llamalora.rundir import CHECKPOINTS, RunFolder
from llamalora.step import GraphedStep, TrainStep
from llamalora.template import pad_token_id, template_of

# The packages a run's llamalora.json records.
RUN_VERSIONS = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "tokenizers")


class TrainingInterrupted(LlamaLoraError):
    """SIGINT/SIGTERM stopped the run after saving a checkpoint."""

    exit_code = 130


class OutOfMemory(LlamaLoraError):
    """The GPU ran out of memory; the message lists the options that lower it."""


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False,
          on_event: OnEvent | None = None, plan: Plan | None = None) -> TrainResult:
    """Runs the training recipe; returns what `llamalora.json` records.

    Raises:
        DataError, ConfigError, ModelError, OutputExistsError, MissingExtraError: before any
            step runs.
        TrainingInterrupted: SIGINT/SIGTERM; a checkpoint was saved and `--resume` continues.
        OutOfMemory, SaveError: during the run; the last checkpoint is intact.
    """
    import torch

    emit = on_event or (lambda event: None)
    par = parallel.from_environment()
    run = RunFolder(config.output_dir, is_main=par.is_main, world_size=par.world_size)
    started = time.perf_counter()
    try:
        # 1. The run folder: locked, refused if it holds something else, resume point found.
        note = run.open(overwrite=overwrite, resume=resume)
        if note and par.is_main:
            emit(Status(note, warning=True))

        # 2. Data and plan: validation happens here, before any weights load.
        plan = plan or plan_training(config)
        run.check_data(plan.data_sha256, config.data_path)
        emit(PlanReady(plan.to_dict()))

        # 3. Processes and model.
        par = par.for_run(config, plan)
        device = par.start()
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        model, setup = _build_model(config, plan, par, device, emit)
        params = [p for p in model.parameters() if p.requires_grad]
        emit(ModelReady(**setup.event_fields(), trainable_params=sum(p.numel() for p in params)))

        # 4. Optimizer and schedule, restored on resume.
        optimizer, scheduler = _optimizer(config, plan, params, par, device)
        if run.resume_from is not None:
            weights, state = run.load_checkpoint()
            par.load_state(model, optimizer, weights, state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"])
            emit(Status(f"Resuming from {run.resume_from.name}"))

        # 5. The loop.
        step = (GraphedStep if setup.graphs else TrainStep)(model, optimizer, scheduler, params,
                                                             par, config.max_grad_norm)
        batches = StepBatches(config, plan, par, setup, device)
        capture_rest = _capture_graphs(step, batches, run.start_step, emit) if setup.graphs \
            else None
        log = trackers.open_trackers(
            config.report_to_list(), run.path, run_name=run.path.name, config=config.to_dict(),
            logging_steps=config.logging_steps, resume_step=run.start_step,
            warn=lambda message: emit(Status(message, warning=True))) if par.is_main else _NoLog()
        with log:
            losses = _run_steps(config, plan, run, par, step, batches, setup, log, emit,
                                after_first=capture_rest)

        # 6. Save: adapter, tokenizer (+ image processor), then llamalora.json last.
        result = _result(config, plan, setup, losses, par, device, started)
        result.fsdp = par.report(model)  # per-rank memory under FSDP (a collective), else None
        adapter, _ = par.full_state(model, None)  # a collective under FSDP: every rank gathers
        if par.is_main:
            run.save_final(model, adapter, setup.saved_with_adapter(),
                           lambda: _finish(result, run))
        par.close()
        emit(TrainFinished(result))
        return result
    finally:
        run.close()


# --- the model ---------------------------------------------------------------------------------

@dataclass
class ModelSetup:
    """What was loaded and which paths the step takes."""

    model_path: str
    model_class: str
    quant: str
    compute_dtype: str
    device: str
    kernels: str
    gradient_checkpointing: bool
    compiled: bool
    packing: bool
    graphs: bool  # each step one padded row, its pass replayed from a CUDA graph
    tokenizer: object  # the transformers tokenizer saved next to the adapter
    image_processor: object | None
    pad_id: int
    batch_maker: object  # the family's batches (`families.base.TextBatches`)
    offload_activations: bool = False  # checkpointed layer inputs in host memory

    @property
    def batches(self) -> str:
        if self.graphs and self.image_processor is not None:
            return "packed, each micro-batch one row at a static length (CUDA graphs)"
        if self.graphs:
            return "packed, one row per step at a static length (CUDA graphs)"
        return "packed" if self.packing else "padded to the longest record"

    def event_fields(self) -> dict:
        return {"model_class": self.model_class, "quant": self.quant,
                "compute_dtype": self.compute_dtype, "device": self.device,
                "kernels": self.kernels, "batches": self.batches,
                "gradient_checkpointing": self.gradient_checkpointing,
                "compiled": self.compiled}

    def saved_with_adapter(self) -> list:
        return [x for x in (self.tokenizer, self.image_processor) if x is not None]


def _build_model(config: TrainConfig, plan: Plan, par, device, emit) -> tuple[object, ModelSetup]:
    """Loads the frozen base, attaches LoRA, picks the kernels, shards, compiles."""
    if device.type == "cuda":
        import torch

        # cuDNN's attention builds a plan for every new sequence length, and packed batches
        # bring a new length nearly every step; the other SDPA kernels need no plan.
        torch.backends.cuda.enable_cudnn_sdp(False)
    from llamalora.models.loading import load_image_processor, load_model_for_training
    from llamalora.models.lora import attach_lora
    from llamalora.models.names import resolve_model

    checkpointing, offload, why = _choose_checkpointing(config, plan, device)
    if why:
        emit(Status(why))
    emit(Status(f"Loading {config.model} ({config.quant})"))
    model_path = resolve_model(config.model)
    model, info = load_model_for_training(
        model_path, quant=config.quant, with_vision=plan.with_vision,
        gradient_checkpointing=checkpointing, offload_activations=offload,
        **par.load_options())
    model = attach_lora(model, r=config.lora_rank, alpha=config.lora_alpha,
                        dropout=config.lora_dropout, target_modules=config.target_modules)
    # from_pretrained returns a model in eval mode, and the first step's CUDA graphs are
    # captured before the loop: a graph keeps the mode it was captured in, so a capture in eval
    # mode would replay every step without LoRA's dropout and without checkpointing.
    model.train()
    kernels = quant.enable_kernels(model, config.kernels)
    if par.prepare(model) is not None:  # FSDP: each GPU keeps its share of every weight
        emit(Status(f"Sharded over {par.world_size} processes (FSDP2)"))
    family = family_of_model(model)
    graphs, why = _choose_graphs(config, plan, device, checkpointing, par, offload=offload,
                                 family=family)
    if why:
        emit(Status(why))
    if plan.with_vision and family.kernel_note is not None:
        kernels += f"; {family.kernel_note(device, graphs)}"
    compiled, why = _choose_compile(config, plan, device, checkpointing,
                                    sharded=par.shards_weights, graphs=graphs)
    if compiled:
        from llamalora.speed import compile_layers

        emit(Status(f"Compiling {compile_layers(model)} decoder layers: the first steps take "
                    "1-2 minutes longer"))
    elif why:
        emit(Status(why))
    tokenizer = _tokenizer_folder(model_path)
    image_processor = load_image_processor(model_path) if plan.with_vision else None
    return model, ModelSetup(
        model_path=model_path, model_class=info["model_class"], quant=config.quant,
        compute_dtype=info["compute_dtype"], device=str(device), kernels=kernels,
        gradient_checkpointing=checkpointing, compiled=compiled,
        packing=config.packing, graphs=graphs, tokenizer=tokenizer,
        image_processor=image_processor, pad_id=_pad_id(tokenizer, model_path),
        batch_maker=family.batches(model, image_processor), offload_activations=offload)


def _optimizer(config: TrainConfig, plan: Plan, params: list, par, device):
    """AdamW (fused into one kernel on CUDA, as HF Trainer's default) and transformers' schedule
    of `--lr-scheduler`, with `--warmup-ratio` of the steps warming up."""
    import torch
    from transformers import get_scheduler

    fused = True if device.type == "cuda" and par.fused_optimizer else None
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate,
                                  weight_decay=config.weight_decay, fused=fused)
    scheduler = get_scheduler(config.scheduler_name(), optimizer,
                              num_warmup_steps=math.ceil(plan.steps * config.warmup_ratio),
                              num_training_steps=plan.steps)
    return optimizer, scheduler


# --- batches -----------------------------------------------------------------------------------

class StepBatches:
    """The micro-batches of each optimizer step, on the device.

    Step s consumes micro-batches [s*M, (s+1)*M) of an endless stream of epochs (M = accumulation
    x world size); rank r takes every world_size-th of them. Each epoch's order is seeded
    (`batch_order`), so a resumed run sees the batches an uninterrupted one would.
    """

    def __init__(self, config: TrainConfig, plan: Plan, par, setup: ModelSetup, device):
        import torch

        self.config, self.plan, self.par, self.setup, self.device = config, plan, par, setup, device
        self.dtype = getattr(torch, setup.compute_dtype)
        self.lengths = record_lengths(plan.train)
        self.per_epoch = math.ceil(len(plan.train) / config.batch_size)
        self.per_step = config.gradient_accumulation_steps * par.world_size
        self.positions = plan.steps * self.per_step if config.max_steps else math.ceil(
            config.num_train_epochs * self.per_epoch)
        self._orders: dict[int, list[list[int]]] = {}

    def epoch_at(self, done_steps: int) -> float:
        return done_steps * self.per_step / self.per_epoch

    def __call__(self, step: int) -> tuple[list[dict], float, float]:
        """(this rank's micro-batches, labelled tokens and real tokens of the step on every
        rank). The counts are made on the host: reading them back from the GPU would stall."""
        import torch

        made = [self.make(items, static=self.setup.graphs) for items in self.rows(step)]
        n_targets, n_real = float(sum(m[1] for m in made)), float(sum(m[2] for m in made))
        if self.par.world_size > 1:  # the step's counts over every rank
            counts = torch.tensor([n_targets, n_real], dtype=torch.float64, device=self.device)
            n_targets, n_real = self.par.sum(counts).tolist()
        return [m[0] for m in made], n_targets, n_real

    def rows(self, step: int) -> list[list[Tokenized]]:
        """This rank's records of `step`, one list per pass: its micro-batches, or with CUDA
        graphs the micro-batches fused into rows of at most batch size x max length tokens
        (the most one padded micro-batch could hold, so fusing never needs more memory)."""
        picked = []
        for k in range(self.per_step):
            pos = step * self.per_step + k
            if pos >= self.positions or k % self.par.world_size != self.par.rank:
                continue
            epoch = pos // self.per_epoch
            if epoch not in self._orders:
                self._orders = {epoch: batch_order(self.lengths, self.config.batch_size,
                                                   self.config.seed, epoch)}
            picked.append([self.plan.train[i] for i in self._orders[epoch][pos % self.per_epoch]])
        if not self.setup.graphs or self.setup.image_processor is not None:
            # images stay one row per micro-batch: a fused pass holds every image's
            # cross-attention inputs at once (32.4 against 22.2 GiB at 8-bit, BENCHMARKS.md)
            return picked
        budget = self.config.batch_size * self.config.max_seq_length
        fused: list[list[Tokenized]] = []
        for item in (t for b in picked for t in b):
            if fused and sum(map(len, fused[-1])) + len(item) <= budget:
                fused[-1].append(item)
            else:
                fused.append([item])
        return fused

    def shape_examples(self, start: int) -> list[dict]:
        """One static row on the device for each padded shape the steps from `start` on will
        use, in the order they first use them, to capture their CUDA graphs ahead of those
        steps (`_capture_graphs`)."""
        seen: dict[tuple[int, int, int], list[Tokenized]] = {}
        for step in range(start, self.plan.steps):
            for items in self.rows(step):
                seen.setdefault(static_shape(items), items)
        self._orders = {}
        return [self.make(items, static=True)[0] for items in seen.values()]

    def make(self, items: list[Tokenized], static: bool = False) -> tuple[dict, int, int]:
        """One micro-batch on the device, its count of loss tokens and of real tokens (the
        records' own, as tokenized)."""
        from llamalora.step import to_device

        maker, pad_id = self.setup.batch_maker, self.setup.pad_id
        if static:
            batch = maker.static(items, pad_id)
            n_targets = int((batch["target_ids"] != IGNORE_INDEX).sum())
        else:
            batch = maker.packed(items) if self.setup.packing else maker.padded(items, pad_id)
            n_targets = batch["loss_targets"].numel()
        return to_device(batch, self.device, self.dtype), n_targets, sum(map(len, items))

    def eval_batches(self) -> list[list[Tokenized]]:
        """This rank's share of the held-out records, in batches of similar length."""
        items = self.plan.eval
        order = sorted(range(len(items)), key=record_lengths(items).__getitem__)
        size = self.config.batch_size
        batches = [[items[i] for i in order[k:k + size]] for k in range(0, len(order), size)]
        return batches[self.par.rank::self.par.world_size]


# --- the loop ----------------------------------------------------------------------------------

@dataclass
class _Losses:
    last_train: float | None = None
    last_eval: float | None = None
    steps_run: int = 0
    real_tokens: int = 0
    train_time: float = 0.0


def _capture_graphs(step: GraphedStep, batches: StepBatches, start: int, emit):
    """Captures the CUDA graphs of the first step's shapes now; returns what captures every
    other shape the run will use, which the loop calls once that step is done. A run then shows
    its first loss without waiting for all of them (each shape's capture takes about a second;
    benchmarks/HISTORY.md, "`llamalora train` at the default flags"), and no later step waits on
    a capture."""
    examples = batches.shape_examples(start)  # in the order the steps first use them
    first = len({static_shape(items) for items in batches.rows(start)})

    def capture(part: list[dict], which: str) -> None:
        if not part or step.failure:  # a failed capture: the steps run eagerly and say why
            return
        started = time.perf_counter()
        step.warm(part)
        if not step.failure:
            emit(Status(f"Captured {len(part)} CUDA graph(s) {which}, one per padded step "
                        f"shape, in {time.perf_counter() - started:.1f} s"))

    capture(examples[:first], "for the first step")
    return lambda: capture(examples[first:], "for the other steps")


def _run_steps(config: TrainConfig, plan: Plan, run: RunFolder, par, step, batches: StepBatches,
               setup: ModelSetup, log, emit, after_first=None) -> _Losses:
    """Every optimizer step from the resume point on, with evals, checkpoints and a clean stop
    on SIGINT/SIGTERM (every rank stops after the same step, with a checkpoint).
    `after_first` runs once the first of them is done (`_capture_graphs`)."""
    import torch

    device = batches.device
    losses = _Losses()
    eval_every = config.eval_steps or config.save_steps
    stop = _StopFlag()
    stop.install()
    step.model.train()
    warned = False
    t0 = time.perf_counter()
    upcoming = batches(run.start_step) if run.start_step < plan.steps else None
    try:
        for index in range(run.start_step, plan.steps):
            micro, n_targets, n_real = upcoming
            lr = step.scheduler.get_last_lr()[0]  # the rate this step uses
            try:
                loss, norm = step(micro, n_targets)
                # The step is queued, not done: the next one's batch is made on the host while
                # the GPU runs it (an image step's pictures take tens of ms of host time, which
                # the GPU would wait for if the batch were made after the sync below).
                upcoming = batches(index + 1) if index + 1 < plan.steps else None
            except torch.OutOfMemoryError as exc:
                raise OutOfMemory(_oom_advice(config, plan, done=index, device=device,
                                              checkpointing=setup.gradient_checkpointing,
                                              offload=setup.offload_activations)) from exc
            loss = par.sum(loss)
            if step.failure and not warned:
                warned = True
                emit(Status(f"CUDA graphs off, steps run eagerly: {step.failure}", warning=True))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            # This step's queueing, the next one's batch, and the wait for the GPU.
            dt = time.perf_counter() - t0
            done = index + 1
            losses.train_time += dt
            losses.real_tokens += int(n_real)
            losses.steps_run += 1
            losses.last_train = loss.item() / max(n_targets, 1)
            eval_loss = None
            if plan.eval and eval_every and done % eval_every == 0 and done < plan.steps:
                eval_loss = losses.last_eval = _evaluate(step.model, batches, par)
            event = StepDone(
                step=done, total_steps=plan.steps, loss=losses.last_train, learning_rate=lr,
                grad_norm=norm.item() if norm is not None else None, tokens=int(n_real),
                tokens_per_s=n_real / dt, epoch=batches.epoch_at(done), step_time_s=dt,
                gpu_mem_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                if device.type == "cuda" else None, eval_loss=eval_loss)
            log.log(event)
            emit(event)
            if after_first is not None and index == run.start_step:
                after_first()

            interrupted = par.any(stop.requested)
            if done < plan.steps and ((config.save_steps and done % config.save_steps == 0)
                                      or interrupted):
                _save_checkpoint(run, par, step, config, plan, done, emit)
            if interrupted and done < plan.steps:
                # Every rank waits here for rank 0's checkpoint: a rank that exited first would
                # say "checkpoint saved" before it was, and make torchrun stop rank 0 mid-save.
                par.wait()
                raise TrainingInterrupted(
                    f"stopped at step {done}/{plan.steps}; checkpoint saved in "
                    f"{run.path / CHECKPOINTS}. Continue with the same command plus --resume")
            t0 = time.perf_counter()  # evals, checkpoints and captures are no step's time
        if plan.eval:
            losses.last_eval = _evaluate(step.model, batches, par)
            event = EvalDone(step=plan.steps, eval_loss=losses.last_eval)
            log.log(event)
            emit(event)
    finally:
        stop.restore()
    return losses


def _save_checkpoint(run: RunFolder, par, step, config: TrainConfig, plan: Plan, done: int,
                     emit) -> None:
    adapter, optimizer_state = par.full_state(step.model, step.optimizer)  # every rank gathers
    if not par.is_main:
        return
    path = run.save_checkpoint(
        done, step.model, adapter,
        {"optimizer": optimizer_state, "scheduler": step.scheduler.state_dict(),
         "rng": _rng_state()},
        {"step": done, "world_size": par.world_size, "data_sha256": plan.data_sha256,
         "config": config.to_dict()}, config.save_total_limit)
    emit(CheckpointSaved(step=done, path=str(path)))


def _evaluate(model, batches: StepBatches, par) -> float:
    """The mean loss over the held-out records' labelled tokens, over every rank."""
    import torch

    from llamalora.step import loss_sum

    mine = batches.eval_batches()
    total = torch.zeros(2, dtype=torch.float64, device=batches.device)
    model.eval()
    with torch.no_grad():
        par.even_out(len(mine), lambda b: loss_sum(model, b))
        for items in mine:
            loss, n = loss_sum(model, batches.make(items)[0])
            total += torch.stack([loss.double(), n.double()])
    model.train()
    par.sum(total)
    return (total[0] / total[1].clamp(min=1)).item()


# --- the result --------------------------------------------------------------------------------

def _result(config: TrainConfig, plan: Plan, setup: ModelSetup, losses: _Losses, par, device,
            started: float) -> TrainResult:
    import torch

    return TrainResult(
        llamalora_version=__version__, config=config.to_dict(), plan=plan.to_dict(),
        base_model=setup.model_path, model_class=setup.model_class, quant=config.quant,
        compute_dtype=setup.compute_dtype, kernels=setup.kernels,
        gradient_checkpointing=setup.gradient_checkpointing, compiled=setup.compiled,
        batches=setup.batches, data_sha256=plan.data_sha256,
        final_train_loss=losses.last_train, final_eval_loss=losses.last_eval,
        real_tokens_per_s=round(losses.real_tokens / losses.train_time, 1)
        if losses.train_time else None,
        steps_run=losses.steps_run, wall_time_s=round(time.perf_counter() - started, 2),
        peak_gpu_mem_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda" else None,
        device=str(device), world_size=par.world_size, versions=package_versions(RUN_VERSIONS),
        trackers=config.report_to_list(), offload_activations=setup.offload_activations)


def _finish(result: TrainResult, run: RunFolder) -> dict:
    """Once the adapter is in place: the loss plot, then the record llamalora.json holds."""
    plot = _plot_losses(run.metrics, run.path / "loss.png")
    result.loss_plot = str(plot) if plot else None
    return result.to_dict()


class _NoLog:
    """What ranks other than 0 log to: nothing."""

    def log(self, event) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


# --- small pieces ------------------------------------------------------------------------------

class _StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it between optimizer steps."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _rng_state() -> dict:
    import torch

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _choose_checkpointing(config: TrainConfig, plan: Plan, device) -> tuple[bool, bool, str]:
    """(--gradient-checkpointing, --offload-activations, why): as given, else what the plan says
    this GPU needs (`plan.choose_memory`): nothing where it fits without.

    Recomputing every layer in backward costs about a third of the step; memory to avoid it is
    usually there, since LoRA's base is frozen and quantized. On the CPU checkpointing stays off
    unless asked, and offload off (the activations are in host memory already); offload needs
    checkpointing (the inputs it moves are what checkpointing keeps).
    """
    ckpt, offload = config.gradient_checkpointing, config.offload_activations
    if device.type != "cuda":
        return bool(ckpt), False, ""
    if ckpt is not None and (offload is not None or not ckpt):
        return bool(ckpt), bool(ckpt and offload), ""
    choice = choose_memory(plan, config.quant, _gpu_gib(device), ckpt, offload)
    return choice.gradient_checkpointing, choice.offload_activations, choice.why


def _fits_gpu(need_gib: float, device) -> tuple[bool, float]:
    """Whether a plan's estimate fits this GPU with a tenth to spare; and the GPU's GiB."""
    total = _gpu_gib(device)
    return fits_gpu(need_gib, total), total


def _gpu_gib(device) -> float:
    """The GiB this process may use on `device`: the card's, times the fraction set with
    `torch.cuda.set_per_process_memory_fraction` (how a smaller card is stood in for)."""
    import torch

    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch 2.6+
    if fraction is None or not torch.cuda.is_available():  # (tests stand in a card's size)
        return total
    return total * fraction(device)


# CUDA graphs over checkpointed layers: each replay's recompute draws its forward's dropout
# masks (checkpointing restores the generator's state, which a graph keeps as a seed and an
# offset; an exact gradient check over 3 replays, BENCHMARKS.md, "Long records").
# False keeps checkpointed runs eager, as before.
GRAPHS_WITH_CHECKPOINTING = True


def _choose_graphs(config: TrainConfig, plan: Plan, device, checkpointing: bool,
                   par, offload: bool = False, family: Family | None = None) -> tuple[bool, str]:
    """--cuda-graphs as given, else on for packed CUDA runs whose step fits.

    A graph needs the step's micro-batches as packed rows (text-only micro-batches fused, so
    `--gradient-accumulation-steps` only sets how many records a step takes, not how many passes
    it makes), and shapes that repeat: not with --no-packing. FSDP stays eager (not measured
    with graphs), so does offload (a graph would keep the first step's host buffers) and, unless
    `GRAPHS_WITH_CHECKPOINTING`, checkpointing; so does an explicit --compile, unless
    --cuda-graphs is asked for too (the two together were not measured). Records with images get
    one graph per micro-batch shape, with cross-attention on the dense mask: 1.8-2.7x the eager
    step, at 0.2-1.1 GiB more memory (BENCHMARKS.md), which the plan's graphed estimate
    counts. A capture that fails (`GraphedStep.failure`) leaves the steps eager. A model family
    whose steps (or steps with images) were never captured stays eager (`Family.cuda_graphs`,
    `graph_images`).
    """
    asked = config.cuda_graphs
    unsupported = (f"{family.name} models" if family is not None and not family.cuda_graphs
                   else f"{family.name} models' images" if family is not None
                   and plan.with_vision and not family.graph_images
                   else "FSDP" if par.shards_weights
                   else "--offload-activations" if offload
                   else "gradient checkpointing" if checkpointing
                   and not GRAPHS_WITH_CHECKPOINTING
                   else "--no-packing" if not config.packing else "")
    if device.type != "cuda" or asked is False:
        return False, ("--cuda-graphs ignored: they need a CUDA GPU"
                       if asked and device.type != "cuda" else "")
    if unsupported:
        return False, f"--cuda-graphs ignored: not with {unsupported}" if asked else ""
    if asked is None and config.compile:
        return False, "CUDA graphs off: --compile asked for compiled layers instead"
    fused = plan.memory_gib_fused_checkpointed if checkpointing else plan.memory_gib_fused
    need = fused[config.quant]
    fits, total = _fits_gpu(need, device)
    if asked is None and not fits:
        what = (f"a micro-batch of {config.batch_size} records with their images"
                if plan.with_vision else f"one pass over a step's {config.batch_size} x "
                f"{config.gradient_accumulation_steps} records")
        return False, (f"CUDA graphs off: {what} needs an estimated {need} GiB with them, this "
                       f"GPU has {total:.0f} GiB")
    return True, ""


COMPILE_MIN_STEPS = 100  # below this the 1-2 min compile rarely pays for itself


def _choose_compile(config: TrainConfig, plan: Plan, device, checkpointing: bool,
                    sharded: bool = False, graphs: bool = False) -> tuple[bool, str]:
    """--compile as given, else on for long enough text-only runs on CUDA without checkpointing
    or CUDA graphs.

    Compiled layers cut a step's kernel launches by more than half, and at LoRA batch sizes the
    eager step is bound by launches; a CUDA graph removes the launches without the minute of
    compiling, so with graphs layers stay eager unless --compile asks. Images, checkpointing and
    FSDP stay eager: not measured compiled.
    """
    if config.compile is not None:
        if config.compile and (plan.with_vision or checkpointing or sharded):
            return False, ("--compile ignored: layers are compiled only for text-only runs "
                           "without gradient checkpointing or FSDP")
        return config.compile, ""
    if device.type != "cuda" or plan.with_vision or checkpointing or sharded or graphs:
        return False, ""
    if plan.steps < COMPILE_MIN_STEPS:
        return False, (f"Layers not compiled: {plan.steps} steps are too few to pay for compiling "
                       "(--compile forces it)")
    return True, ""


def _oom_advice(config: TrainConfig, plan: Plan, *, done: int, device,
                checkpointing: bool, offload: bool = False) -> str:
    import torch

    total = torch.cuda.get_device_properties(device).total_memory / 2**30 \
        if device.type == "cuda" else None
    est = plan.memory_gib
    lower = sorted((q for q in QUANT_CHOICES if est[q] < est[config.quant]), key=est.get)
    options = [] if checkpointing else [
        f"--gradient-checkpointing (estimated {plan.memory_gib_checkpointed[config.quant]} GiB)"]
    if not offload:
        options.append(f"--offload-activations (with checkpointing, estimated "
                       f"{plan.memory_gib_offloaded[config.quant]} GiB)")
    options += [f"--quant {q} (estimated {est[q]} GiB)" for q in lower]
    options += [f"--batch-size {max(1, config.batch_size // 2)} with --gradient-accumulation-steps "
                f"{config.gradient_accumulation_steps * 2} (same effective batch)",
                f"a smaller --max-seq-length (now {config.max_seq_length}; see "
                "`llamalora stats`)"]
    return (f"out of GPU memory at step {done + 1}"
            + (f" ({total:.0f} GiB card)" if total else "")
            + f"; the plan estimated {est[config.quant]} GiB for --quant {config.quant}. "
            "Lower it with: " + "; ".join(options))


def _plot_losses(metrics_path: Path, out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None  # loss.png is a convenience; metrics.jsonl has the numbers
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train_pts = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    eval_pts = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train_pts:
        ax.plot(*zip(*train_pts), label="train loss")
    if eval_pts:
        ax.plot(*zip(*eval_pts), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _tokenizer_folder(model_path: str):
    """The transformers tokenizer saved next to the adapter (the bundled one for `tiny`)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
    except Exception as exc:
        raise ModelError(f"cannot load the tokenizer of {model_path} ({exc})") from exc


def _pad_id(tokenizer, model_path: str) -> int:
    """The id padding is written with (`template.pad_token_id`), looked up in the transformers
    tokenizer's own vocabulary (parsed already) with the chat template the run renders with."""
    from llamalora.tokenizer import load_model_tokenizer

    template = template_of(load_model_tokenizer(model_path)[0])  # not parsed: files only
    return pad_token_id(tokenizer.backend_tokenizer, template)
