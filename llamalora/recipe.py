"""The training recipe: data -> plan -> model -> loop -> save, read top to bottom.

`plan_training` checks and tokenizes the data and estimates memory without loading weights (what
`--dry-run` shows). `train` runs the whole recipe. Neither prints: progress goes to the `on_event`
callback, and problems are raised as llamalora errors.

Data-parallel runs (torchrun / accelerate launch) give each rank its own quantized copy of the
model; LoRA gradients are summed across ranks by one all-reduce per optimizer step, and only rank 0
writes files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from llamalora import __version__, fsdp
from llamalora.batching import IGNORE_INDEX, Tokenized, add_vision_inputs, batch_order, collate, pack
from llamalora.checkpoint import (CHECKPOINTS, RUN_MARKER, FolderLock, commit_checkpoint,
                                  last_checkpoint, prepare_output_dir, write_json_atomic)
from llamalora.config import TrainConfig
from llamalora.errors import ConfigError, LlamaLoraError, ModelError, OutputExistsError
from llamalora.parallel import world
from llamalora.plan import Plan, plan_training

Event = Callable[[str, dict], None]


class TrainingInterrupted(LlamaLoraError):
    """SIGINT/SIGTERM stopped the run after saving a checkpoint."""

    exit_code = 130


class SaveError(LlamaLoraError):
    """A checkpoint or the final adapter could not be written (full disk, permissions)."""


class OutOfMemory(LlamaLoraError):
    """The GPU ran out of memory; the message lists the options that lower it."""


# --- the run -------------------------------------------------------------------------------------

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


def _lr_factor(step: int, total: int, warmup: int) -> float:
    # Linear warm-up, then linear decay to zero (the HF Trainer default the old script used).
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


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


def _loss_sum(model, batch: dict):
    """Summed cross-entropy over the tokens with a label, and their count.

    Logits are computed only at positions whose next token has a label: on prompt-masked data
    that skips most of the 128k-vocabulary projection, and no [batch, length, vocab] tensor is
    ever built.
    """
    import torch
    import torch.nn.functional as F

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = base.model(**inputs, use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    logits = base.lm_head(hidden[:, :-1][keep])
    # At least fp32 (bf16 logits lose the loss); float64 models stay float64.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss = F.cross_entropy(logits, targets[keep], reduction="sum")
    return loss, torch.count_nonzero(keep)


def _to_device(batch: dict, device, dtype) -> dict:
    out = {}
    for k, v in batch.items():
        v = v.to(device)
        out[k] = v.to(dtype) if v.is_floating_point() else v
    return out


def _all_reduce(tensor, world_size: int):
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor


def _evaluate(model, items: list[Tokenized], config: TrainConfig, ctx: dict) -> float:
    import torch

    rank, world_size = ctx["rank"], ctx["world_size"]
    order = sorted(range(len(items)), key=lambda i: len(items[i]))
    batches = [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    total = torch.zeros(2, dtype=torch.float64, device=ctx["device"])
    model.eval()
    with torch.no_grad():
        if world_size > 1 and fsdp.is_sharded(model):  # FSDP hook: as many passes as any rank
            fsdp.run_fillers(len(batches[rank::world_size]), lambda b: _loss_sum(model, b),
                             ctx["device"])
        for b in batches[rank::world_size]:
            batch, _, _ = ctx["make_batch"]([items[i] for i in b])
            loss, n = _loss_sum(model, batch)
            total += torch.stack([loss.double(), n.double()])
    model.train()
    _all_reduce(total, world_size)
    return (total[0] / total[1].clamp(min=1)).item()


def _save_adapter(model, folder: Path) -> None:
    model.save_pretrained(str(folder), safe_serialization=True)
    (folder / "README.md").unlink(missing_ok=True)  # peft's empty card; export writes a real one


@contextlib.contextmanager
def _staging(tmp: Path, failure: Callable[[OSError], str]):
    """A fresh temporary folder to write a save into; on OSError (a full disk, permissions) it is
    removed and `SaveError(failure(exc))` raised, so nothing half-written is left behind."""
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        yield tmp
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SaveError(failure(exc)) from exc


def _save_checkpoint(model, optimizer, scheduler, output_dir: Path, step: int, state: dict,
                     keep: int) -> Path:
    import torch

    root = output_dir / CHECKPOINTS
    final = root / f"step-{step:06d}"

    def failure(exc: OSError) -> str:
        previous = last_checkpoint(output_dir)
        return (f"could not write the checkpoint of step {step} to {root} "
                f"({exc.strerror or exc}); "
                + (f"{previous} is intact: free space, then rerun with --resume"
                   if previous else "no earlier checkpoint exists: free space and rerun"))

    with _staging(root / f".tmp-step-{step:06d}", failure) as tmp:
        _save_adapter(model, tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": _rng_state()}, tmp / "training_state.pt")
        commit_checkpoint(tmp, final, state, keep)
    return final


def _metrics_rewind(path: Path, step: int) -> None:
    """On resume, drop metric lines written after the checkpoint we continue from."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False,
          on_event: Event | None = None, plan: Plan | None = None) -> dict:
    """Runs the training recipe and returns the summary written to llamalora.json.

    Raises:
        DataError, ConfigError, ModelError, OutputExistsError: before any step runs.
        TrainingInterrupted: SIGINT/SIGTERM; a checkpoint was saved and `--resume` continues.
    """
    import torch

    emit = on_event or (lambda kind, data: None)
    rank, local_rank, world_size = world()
    output_dir = Path(config.output_dir)
    is_main = rank == 0

    # 1. Output folder: lock it against a second run first (so --overwrite can never clear a
    # folder another run is writing), then refuse to clobber, then find the checkpoint.
    lock = FolderLock(output_dir)
    if is_main:
        if output_dir.exists() and not output_dir.is_dir():
            raise OutputExistsError(f"{output_dir} is a file; pass a folder to --output-dir")
        output_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    try:
        if is_main:
            prepare_output_dir(output_dir, overwrite=overwrite, resume=resume)
        if resume and (output_dir / RUN_MARKER).is_file():
            raise OutputExistsError(f"the run in {output_dir} already finished; pass "
                                    "--overwrite to train it again, or another --output-dir")
        start_ckpt = last_checkpoint(output_dir) if resume else None
        if resume and start_ckpt is None and is_main:
            emit("warning", {"message": f"no checkpoint in {output_dir}; starting from step 0"})
        if start_ckpt is not None:
            saved = json.loads((start_ckpt / "state.json").read_text())
            ckpt_world = saved.get("world_size", 1)
            if ckpt_world != world_size:  # the message names the launch that fits it
                how = (f"torchrun --nproc-per-node {ckpt_world} -m llamalora train ... --resume"
                       if ckpt_world > 1 else "llamalora train ... --resume, without torchrun")
                raise ConfigError(f"the checkpoint in {start_ckpt} was made with {ckpt_world} "
                                  f"process(es), this run has {world_size}; resume it with "
                                  f"{ckpt_world} ({how}), or drop --resume and pass --overwrite "
                                  "to start anew")

        # 2. Data and plan (validation happens here, before any weights load).
        plan = plan or plan_training(config)
        if start_ckpt is not None and saved.get("data_sha256") != plan.data_sha256:
            raise ConfigError(f"{config.data_path} changed since the checkpoint in {start_ckpt}; "
                              "resume needs the same data (or start anew with --overwrite)")
        emit("plan", plan.to_dict())
        fsdp_run = fsdp.settings(config, plan, world_size)  # FSDP hook: None unless asked for

        # 3. Distributed setup and the model.
        if world_size > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend)
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.cuda.reset_peak_memory_stats(device)
            # cuDNN's attention builds a plan for every new sequence length, and packed batches
            # bring a new length nearly every step; the other SDPA kernels need no plan.
            torch.backends.cuda.enable_cudnn_sdp(False)
        _seed_everything(config.seed)
        from llamalora import fastlinear
        from llamalora.models import (attach_lora, load_image_processor, load_model_for_training,
                                      resolve_model)

        checkpointing, why = _choose_checkpointing(config, plan, device)
        if why:
            emit("status", {"message": why})
        emit("status", {"message": f"Loading {config.model} ({config.quant})"})
        model_path = resolve_model(config.model)
        if fsdp_run:  # FSDP hook: load into CPU memory (in turn, if asked), shard below
            fsdp.wait_turn(fsdp_run, rank)
        model, info = load_model_for_training(
            model_path, quant=config.quant, with_vision=plan.with_vision,
            gradient_checkpointing=checkpointing,
            **(fsdp.load_options(device) if fsdp_run else {"device": str(device)}))
        model = attach_lora(model, r=config.lora_rank, alpha=config.lora_alpha,
                            dropout=config.lora_dropout, target_modules=config.target_modules)
        info["kernels"] = fastlinear.enable(model, config.kernels)
        if fsdp_run:  # FSDP hook: each GPU keeps its share of every weight
            info.update(device=str(device), fsdp=fsdp.shard(model, device, fsdp_run, rank))
            emit("status", {"message": f"Sharded over {world_size} processes (FSDP2)"})
        info["gradient_checkpointing"] = checkpointing
        info["compiled"], why = _choose_compile(config, plan, device, checkpointing,
                                                sharded=bool(fsdp_run))
        if info["compiled"]:
            from llamalora.speed import compile_layers

            emit("status", {"message": f"Compiling {compile_layers(model)} decoder layers: the "
                                       "first steps take 1-2 minutes longer"})
        elif why:
            emit("status", {"message": why})
        packing = config.packing and not plan.with_vision
        info["batches"] = "packed" if packing else "padded to the longest record"
        compute_dtype = getattr(torch, info["compute_dtype"])
        trainable = [p for p in model.parameters() if p.requires_grad]
        emit("model", {**info, "trainable_params": sum(p.numel() for p in trainable)})

        tokenizer_src = _tokenizer_folder(model_path)
        pad_id = _pad_id(tokenizer_src)
        image_processor = load_image_processor(model_path) if plan.with_vision else None

        def make_batch(items: list[Tokenized]) -> tuple[dict, int, int]:
            """The micro-batch on the device, its count of loss tokens and of real tokens."""
            batch = pack(items) if packing else collate(items, pad_id)
            if image_processor is not None:
                add_vision_inputs(batch, [t.images for t in items], image_processor)
            # Counted on the host: reading them back from the GPU would stall every step.
            n_targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            return _to_device(batch, device, compute_dtype), n_targets, sum(map(len, items))

        ctx = {"rank": rank, "world_size": world_size, "device": device,
               "make_batch": make_batch}

        # 4. Optimizer and schedule; restore them on resume.
        # One fused kernel instead of a dozen per parameter chunk (HF Trainer's default on CUDA
        # too); FSDP's sharded parameters keep the default implementation.
        fused = True if device.type == "cuda" and not fsdp_run else None
        optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate,
                                      weight_decay=config.weight_decay, fused=fused)
        warmup = math.ceil(plan.steps * config.warmup_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: _lr_factor(s, plan.steps, warmup))
        start_step = 0
        if start_ckpt is not None:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            weights = load_file(str(start_ckpt / "adapter_model.safetensors"))
            state = torch.load(start_ckpt / "training_state.pt", weights_only=True,
                               map_location="cpu")
            if fsdp_run:  # FSDP hook: cut the one-GPU layout into this rank's shards
                fsdp.load_full_state(model, optimizer, weights, state["optimizer"])
            else:
                set_peft_model_state_dict(model, weights)
                optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"])
            start_step = saved["step"]
            emit("status", {"message": f"Resuming from {start_ckpt.name}"})
        metrics_path = output_dir / "metrics.jsonl"
        if is_main:
            if start_ckpt is not None:
                _metrics_rewind(metrics_path, start_step)
            else:
                metrics_path.unlink(missing_ok=True)

        # 5. The loop. Step s consumes micro-batches [s*M, (s+1)*M) of an endless epoch stream,
        # M = accumulation x world size; rank r takes every world_size-th of them.
        lengths = [len(t) for t in plan.train]
        num_batches = math.ceil(len(plan.train) / config.batch_size)
        per_step = config.gradient_accumulation_steps * world_size
        total_positions = plan.steps * per_step if config.max_steps else math.ceil(
            config.num_train_epochs * num_batches)
        orders: dict[int, list[list[int]]] = {}

        def micro_batches(step: int) -> list[list[int]]:
            picked = []
            for k in range(per_step):
                pos = step * per_step + k
                if pos >= total_positions or k % world_size != rank:
                    continue
                epoch = pos // num_batches
                if epoch not in orders:
                    orders.clear()
                    orders[epoch] = batch_order(lengths, config.batch_size, config.seed, epoch)
                picked.append(orders[epoch][pos % num_batches])
            return picked

        stop = _StopFlag()
        stop.install()
        model.train()
        metrics_file = metrics_path.open("a", encoding="utf-8") if is_main else None
        started = time.perf_counter()
        real_tokens_total = 0
        train_time = 0.0
        last_loss = eval_loss = None
        eval_every = config.eval_steps or config.save_steps
        try:
            for step in range(start_step, plan.steps):
                t0 = time.perf_counter()
                picked = micro_batches(step)
                made = [make_batch([plan.train[i] for i in b]) for b in picked]
                batches = [b for b, _, _ in made]
                n_targets = float(sum(n for _, n, _ in made))
                n_real = float(sum(n for _, _, n in made))
                if world_size > 1:
                    counts = torch.tensor([n_targets, n_real], device=device)
                    _all_reduce(counts, world_size)
                    n_targets, n_real = counts.tolist()
                step_loss = torch.zeros((), dtype=torch.float64, device=device)
                try:
                    if fsdp_run:  # FSDP hook: as many passes as the busiest rank
                        fsdp.run_fillers(len(batches), lambda b: _loss_sum(model, b)[0].backward(),
                                         device)
                    for batch in batches:
                        loss, _ = _loss_sum(model, batch)
                        (loss / max(n_targets, 1)).backward()
                        step_loss += loss.detach().double()
                except torch.OutOfMemoryError as exc:
                    raise OutOfMemory(_oom_advice(config, plan, done=step, device=device,
                                                  checkpointing=checkpointing)) from exc
                if world_size > 1 and not fsdp_run:  # FSDP reduced them in backward
                    for p in trainable:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                    flat = torch.cat([p.grad.reshape(-1) for p in trainable])
                    _all_reduce(flat, world_size)
                    offset = 0
                    for p in trainable:
                        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
                        offset += p.numel()
                _all_reduce(step_loss, world_size)
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.perf_counter() - t0
                train_time += dt
                real_tokens_total += int(n_real)
                last_loss = step_loss.item() / max(n_targets, 1)
                done = step + 1
                record = {"step": done, "loss": round(last_loss, 6), "learning_rate": lr,
                          "tokens": int(n_real), "tokens_per_s": round(n_real / dt, 1),
                          "epoch": round(done * per_step / num_batches, 4),
                          "step_time_s": round(dt, 4)}
                if device.type == "cuda":
                    peak = torch.cuda.max_memory_allocated(device)
                    record["gpu_mem_gib"] = round(peak / 2**30, 2)
                if plan.eval and eval_every and done % eval_every == 0 and done < plan.steps:
                    eval_loss = _evaluate(model, plan.eval, config, ctx)
                    record["eval_loss"] = round(eval_loss, 6)
                if is_main and (done % config.logging_steps == 0 or "eval_loss" in record
                                or done == plan.steps):
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                emit("step", {**record, "total_steps": plan.steps})

                flag = torch.tensor([1.0 if stop.requested else 0.0], device=device)
                _all_reduce(flag, world_size)
                interrupted = flag.item() > 0
                save_now = (config.save_steps and done % config.save_steps == 0
                            and done < plan.steps) or (interrupted and done < plan.steps)
                if save_now and fsdp_run:  # FSDP hook: every rank gathers, rank 0 saves
                    saving = fsdp.gathered(model, optimizer)
                if save_now and is_main:
                    path = _save_checkpoint(*(saving if fsdp_run else (model, optimizer)),
                                            scheduler, output_dir, done,
                                            {"step": done, "world_size": world_size,
                                             "data_sha256": plan.data_sha256,
                                             "config": config.to_dict()},
                                            config.save_total_limit)
                    emit("checkpoint", {"step": done, "path": str(path)})
                if interrupted and done < plan.steps:
                    # Every rank waits here for rank 0's checkpoint: a rank that exited first
                    # would say "checkpoint saved" before it was, and make torchrun stop rank 0
                    # mid-save (SIGTERM, then SIGKILL 30 s later).
                    _all_reduce(torch.zeros(1, device=device), world_size)
                    raise TrainingInterrupted(
                        f"stopped at step {done}/{plan.steps}; checkpoint saved in "
                        f"{output_dir / CHECKPOINTS}. Continue with the same command plus "
                        "--resume")
            if plan.eval:
                eval_loss = _evaluate(model, plan.eval, config, ctx)
                if is_main:
                    metrics_file.write(json.dumps({"step": plan.steps,
                                                   "eval_loss": round(eval_loss, 6)}) + "\n")
                emit("eval", {"step": plan.steps, "eval_loss": eval_loss})
        finally:
            stop.restore()
            if metrics_file is not None:
                metrics_file.close()

        # 6. Save: adapter, tokenizer (+ processor), then llamalora.json last.
        summary = {
            "llamalora_version": __version__, "config": config.to_dict(), "plan": plan.to_dict(),
            "base_model": info["base_model"], "model_class": info["model_class"],
            "quant": config.quant, "compute_dtype": info["compute_dtype"],
            "kernels": info["kernels"], "gradient_checkpointing": checkpointing,
            "compiled": info["compiled"],
            "batches": info["batches"],
            "data_sha256": plan.data_sha256,
            "final_train_loss": last_loss, "final_eval_loss": eval_loss,
            "real_tokens_per_s": round(real_tokens_total / train_time, 1) if train_time else None,
            "steps_run": plan.steps - start_step, "wall_time_s": round(
                time.perf_counter() - started, 2),
            "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            if device.type == "cuda" else None,
            "device": str(device), "world_size": world_size, "versions": _versions(),
        }
        if fsdp_run:  # FSDP hook: per-rank memory in the summary; every rank gathers the adapter
            summary["fsdp"] = fsdp.report(model, device, info["fsdp"])
            model = fsdp.gathered(model)[0]
        if is_main:
            _save_final(model, output_dir, tokenizer_src, model_path if plan.with_vision else None,
                        summary, metrics_path)
        emit("done", summary)
        return summary
    finally:
        lock.release()


def _choose_checkpointing(config: TrainConfig, plan: Plan, device) -> tuple[bool, str]:
    """--gradient-checkpointing as given, else on only where the plan won't fit without it.

    Recomputing every layer in backward costs about a third of the step; memory to avoid it is
    usually there, since LoRA's base is frozen and quantized. On the CPU it stays off.
    """
    if config.gradient_checkpointing is not None:
        return config.gradient_checkpointing, ""
    if device.type != "cuda":
        return False, ""
    import torch

    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    need = plan.memory_gib[config.quant]
    if need <= 0.9 * total:
        return False, ""
    return True, (f"Gradient checkpointing on: the plan estimates {need} GiB without it, this GPU "
                  f"has {total:.0f} GiB (with it: "
                  f"{plan.memory_gib_checkpointed[config.quant]} GiB)")


COMPILE_MIN_STEPS = 100  # below this the 1-2 min compile rarely pays for itself


def _choose_compile(config: TrainConfig, plan: Plan, device, checkpointing: bool,
                    sharded: bool = False) -> tuple[bool, str]:
    """--compile as given, else on for long enough text-only runs on CUDA without checkpointing.

    Compiled layers cut a step's kernel launches by more than half, and at LoRA batch sizes the
    step is bound by launches. Images, checkpointing and FSDP stay eager: not measured compiled.
    """
    if config.compile is not None:
        if config.compile and (plan.with_vision or checkpointing or sharded):
            return False, ("--compile ignored: layers are compiled only for text-only runs "
                           "without gradient checkpointing or FSDP")
        return config.compile, ""
    if device.type != "cuda" or plan.with_vision or checkpointing or sharded:
        return False, ""
    if plan.steps < COMPILE_MIN_STEPS:
        return False, (f"Layers not compiled: {plan.steps} steps are too few to pay for compiling "
                       "(--compile forces it)")
    return True, ""


def _oom_advice(config: TrainConfig, plan: Plan, *, done: int, device,
                checkpointing: bool) -> str:
    import torch

    total = torch.cuda.get_device_properties(device).total_memory / 2**30 \
        if device.type == "cuda" else None
    est = plan.memory_gib
    lower = [q for q in ("4bit", "8bit") if est[q] < est[config.quant]]
    options = [] if checkpointing else [
        f"--gradient-checkpointing (estimated {plan.memory_gib_checkpointed[config.quant]} GiB)"]
    options += [f"--quant {q} (estimated {est[q]} GiB)" for q in lower]
    options += [f"--batch-size {max(1, config.batch_size // 2)} with --gradient-accumulation-steps "
                f"{config.gradient_accumulation_steps * 2} (same effective batch)",
                f"a smaller --max-seq-length (now {config.max_seq_length}; see "
                "`llamalora stats`)"]
    return (f"out of GPU memory at step {done + 1}"
            + (f" ({total:.0f} GiB card)" if total else "")
            + f"; the plan estimated {est[config.quant]} GiB for --quant {config.quant}. "
            "Lower it with: " + "; ".join(options))


def _save_final(model, output_dir: Path, tokenizer_src, vision_model_path, summary: dict,
                metrics_path: Path) -> None:
    def failure(exc: OSError) -> str:
        previous = last_checkpoint(output_dir)
        return (f"could not write the final adapter to {output_dir} ({exc.strerror or exc}); "
                "nothing there was replaced"
                + (f", and {previous} is intact (free space, then --resume repeats the steps "
                   "after it)" if previous else ""))

    with _staging(output_dir / ".final.tmp", failure) as tmp:
        _save_adapter(model, tmp)
        tokenizer_src.save_pretrained(str(tmp))
        if vision_model_path is not None:
            from llamalora.models import load_image_processor

            load_image_processor(vision_model_path).save_pretrained(str(tmp))
    (output_dir / RUN_MARKER).unlink(missing_ok=True)
    for f in tmp.iterdir():
        os.replace(f, output_dir / f.name)
    tmp.rmdir()
    plot = _plot_losses(metrics_path, output_dir / "loss.png")
    summary["loss_plot"] = str(plot) if plot else None
    write_json_atomic(output_dir / RUN_MARKER, summary)


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
        return AutoTokenizer.from_pretrained(model_path)
    except Exception as exc:
        raise ModelError(f"cannot load the tokenizer of {model_path} ({exc})") from exc


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 128004


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "tokenizers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out
