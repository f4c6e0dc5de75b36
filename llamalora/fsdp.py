"""Fully sharded training (torch FSDP2) for bf16 bases too large for one GPU.

`accelerate launch --config_file benchmarks/fsdp2.yaml -m llamalora train data.jsonl --quant none
--output-dir out/` starts one process per GPU with `ACCELERATE_USE_FSDP=true` and `FSDP_*`
variables in the environment; `train` reads them here (`settings`) and, instead of giving each
rank a whole copy of the model (data-parallel), splits every weight across the ranks:

* Loading: each rank reads the checkpoint into CPU memory in the GPU's compute dtype (bf16), LoRA
  is attached there, and `fully_shard` moves only this rank's 1/N of every weight to its GPU, one
  decoder layer at a time. No GPU ever holds the whole model. With `fsdp_cpu_ram_efficient_loading:
  true` the ranks load one after another, so the host holds one CPU copy at a time, not N.
* Sharding: torch's `fully_shard` (FSDP2) on every decoder layer (the model's `_no_split_modules`,
  or `fsdp_transformer_layer_cls_to_wrap`), then on the text model and on `lm_head`, the two
  modules the loss calls. A layer's weights are all-gathered just before it runs and freed after.
* Gradients: FSDP2 reduce-scatters them in backward, set here to sum (not average) across ranks,
  which is what the manual all-reduce of the data-parallel path does; that all-reduce is skipped.
  Clipping with `torch.nn.utils.clip_grad_norm_` on the sharded (DTensor) gradients computes the
  norm over all shards.
* Saving: torch's `get_state_dict` / `set_state_dict` (full state, offloaded to the CPU) gather
  the LoRA weights and the optimizer state for rank 0 to save and cut them back into shards on
  `--resume` (`llamalora.parallel.Sharded`), so adapters and checkpoints are the same files a
  one-GPU run writes.
* Every rank must run the same modules the same number of times (each runs the all-gathers), so
  `run_fillers` first tops up a rank that has fewer micro-batches in a step (or eval batches)
  with one-row batches whose labels are all -100: they run forward and backward, add nothing.

Why `fully_shard` and not accelerate's `Accelerator`: the training loop is llamalora's own (manual
accumulation, the loss on labelled positions only, its own checkpoints); `fully_shard` shards the
model in place and leaves that loop as it is, and FSDP2 shards each parameter on its own, so the
frozen bf16 base and the fp32 LoRA weights in the same layer need no flattening rules
(`use_orig_params`) as FSDP1 did. accelerate is only the launcher.

Not supported (refused with a ConfigError naming the alternative): 8-bit and 4-bit bases
(bitsandbytes' quantized weights don't shard; use torchrun data-parallel for those), records with
images (ranks would skip different cross-attention layers and the vision tower, and FSDP needs
all ranks to run the same modules), fsdp_version 1, parameter offloading, and FSDP's own
activation checkpointing (use --gradient-checkpointing).
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from llamalora.errors import ConfigError, ModelError
from llamalora.quant import backend_name

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")
_EXAMPLE = "benchmarks/fsdp2.yaml"


@dataclass(frozen=True)
class FsdpSettings:
    """What the accelerate FSDP config asks for, as far as llamalora uses it."""

    world_size: int
    reshard_after_forward: bool = True
    wrap_classes: tuple[str, ...] = ()  # empty: the model's `_no_split_modules`
    sequential_loading: bool = False    # fsdp_cpu_ram_efficient_loading

    def to_dict(self) -> dict:
        return {"world_size": self.world_size,
                "reshard_after_forward": self.reshard_after_forward,
                "wrap_classes": list(self.wrap_classes),
                "sequential_loading": self.sequential_loading}


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = env.get(name, "").strip().lower()
    if not value:
        return default
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name}={env[name]!r} in the environment: expected true or false")


def from_env(env: Mapping[str, str] | None = None, world_size: int = 1) -> FsdpSettings | None:
    """The FSDP settings accelerate launch put in `env` (default: os.environ), or None.

    None when FSDP was not asked for (`ACCELERATE_USE_FSDP` unset or false) or there is only one
    process (one process has nothing to shard across; it trains as a plain run).

    Raises:
        ConfigError: An FSDP setting llamalora does not support, naming the fix.
    """
    env = os.environ if env is None else env
    if not _flag(env, "ACCELERATE_USE_FSDP", False) or world_size < 2:
        return None
    version = env.get("FSDP_VERSION", "1").strip()
    if version != "2":
        raise ConfigError(f"the accelerate config asks for FSDP version {version}; llamalora "
                          f"shards with FSDP2: set `fsdp_version: 2` (see {_EXAMPLE})")
    if _flag(env, "FSDP_OFFLOAD_PARAMS", False):
        raise ConfigError("fsdp_offload_params: true is not supported; set it to false (the "
                          "weights are split across the GPUs instead)")
    if _flag(env, "FSDP_ACTIVATION_CHECKPOINTING", False):
        raise ConfigError("fsdp_activation_checkpointing: true is not supported; set it to false "
                          "and pass --gradient-checkpointing to llamalora train")
    policy = env.get("FSDP_AUTO_WRAP_POLICY", "").strip().upper()
    if policy not in ("", "TRANSFORMER_BASED_WRAP"):
        raise ConfigError(f"fsdp_auto_wrap_policy: {policy} is not supported; llamalora shards "
                          "per decoder layer: use TRANSFORMER_BASED_WRAP")
    # FSDP2 configs carry true/false; FSDP1-style strategy names are accepted for the same thing.
    reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().upper()
    if reshard in ("TRUE", "FULL_SHARD", "1"):
        reshard_after_forward = True
    elif reshard in ("FALSE", "SHARD_GRAD_OP", "0"):
        reshard_after_forward = False
    else:
        raise ConfigError(f"fsdp_reshard_after_forward: {reshard.lower()} is not supported; use "
                          "true (less memory) or false (fewer all-gathers)")
    classes = tuple(c.strip() for c in env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",")
                    if c.strip())
    return FsdpSettings(world_size=world_size, reshard_after_forward=reshard_after_forward,
                        wrap_classes=classes,
                        sequential_loading=_flag(env, "FSDP_CPU_RAM_EFFICIENT_LOADING", False))


def settings(config, plan, world_size: int) -> FsdpSettings | None:
    """`from_env`, plus the refusals that depend on the run: quantized bases and images.

    Raises:
        ConfigError: FSDP was asked for with options it can't serve.
    """
    found = from_env(world_size=world_size)
    if found is None:
        return None
    if config.quant != "none":
        raise ConfigError(f"--quant {config.quant} can't be sharded with FSDP "
                          f"({backend_name(config.quant)}' quantized weights don't split across "
                          "GPUs): pass --quant none to "
                          "shard the bf16 weights, or launch with torchrun (data-parallel, one "
                          f"{config.quant} copy per GPU)")
    if plan.with_vision:
        raise ConfigError("records with images can't be trained with FSDP yet (each GPU would "
                          "run different parts of the model); launch with torchrun "
                          "(data-parallel) instead, or train on text-only records")
    return found


# --- loading and sharding ------------------------------------------------------------------

def load_options(device) -> dict:
    """`load_model_for_training` keywords: into CPU memory, in the dtype `device` computes in
    (bf16 on recent GPUs; fp32 on the CPU, as a plain CPU run)."""
    from llamalora.models.loading import compute_dtype  # the rule a one-GPU run loads by

    return {"device": "cpu", "dtype": str(compute_dtype(device)).removeprefix("torch.")}


def wait_turn(fsdp: FsdpSettings, rank: int) -> None:
    """With sequential loading, waits until the ranks before this one have loaded and sharded
    (`shard` passes the turn on). Without it, returns at once."""
    if fsdp.sequential_loading:
        import torch.distributed as dist

        for _ in range(rank):
            dist.barrier()


def pass_turn(fsdp: FsdpSettings, rank: int) -> None:
    """With sequential loading, lets the ranks after this one load (the barriers `wait_turn`
    waits on)."""
    if fsdp.sequential_loading:
        import torch.distributed as dist

        for _ in range(rank, fsdp.world_size):
            dist.barrier()


def shard(model, device, fsdp: FsdpSettings, rank: int) -> dict:
    """Shards a LoRA-wrapped model (on the CPU) across the ranks onto `device`, in place.

    Each decoder layer is moved to the GPU and cut to this rank's share before the next one,
    so the GPU never holds more than one whole layer. The optimizer must be built afterwards
    (the parameters become DTensor shards).

    Returns:
        What the run records about the sharding (settings, number of sharded units).

    Raises:
        ConfigError: `fsdp_transformer_layer_cls_to_wrap` names a class the model lacks.
        ModelError: Nothing to shard, or a weight was left outside every shard.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    known = sorted(getattr(base, "_no_split_modules", None) or [])
    names = set(fsdp.wrap_classes or known)
    layers = [m for m in base.modules() if type(m).__name__ in names]
    unknown = sorted(set(fsdp.wrap_classes) - {type(m).__name__ for m in layers})
    if unknown:
        raise ConfigError(f"fsdp_transformer_layer_cls_to_wrap names {', '.join(unknown)}, which "
                          f"{type(base).__name__} does not have; leave it out (llamalora shards "
                          "each decoder layer) or name some of " + (", ".join(known) or "its "
                                                                    "layer classes"))
    if not layers:
        raise ModelError(f"{type(base).__name__} names no layer class to shard by; set "
                         "fsdp_transformer_layer_cls_to_wrap in the accelerate config")
    mesh = init_device_mesh(device.type, (fsdp.world_size,))
    options = {"mesh": mesh, "reshard_after_forward": fsdp.reshard_after_forward}
    for layer in layers:
        fully_shard(layer, **options)
    # The loss calls the text model and lm_head directly (not the model's forward): each is a
    # unit of its own, holding what the layers leave (embeddings, final norm, lm_head).
    for unit in (getattr(base, "model", None), getattr(base, "lm_head", None)):
        if unit is not None and not isinstance(unit, FSDPModule):
            fully_shard(unit, **options)
    left = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
    if left:
        raise ModelError(f"{len(left)} weights were left outside every FSDP shard (e.g. "
                         f"{left[0]}); this model's layout is not supported with FSDP")
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        # Sum gradients over the ranks, as the data-parallel all-reduce does: the loss is
        # already divided by the step's label count over all ranks. Plain sums (no pre/post
        # scaling ops) work on NCCL and gloo alike.
        force_sum = getattr(unit, "set_force_sum_reduction_for_comms", None)  # torch >= 2.8
        if force_sum is not None:
            force_sum(True)
        divide = getattr(unit, "set_gradient_divide_factor", None) or \
            unit.set_reduce_scatter_divide_factor  # the older name
        divide(1.0)
    pass_turn(fsdp, rank)
    return {**fsdp.to_dict(), "units": len(units)}


# --- the loop ------------------------------------------------------------------------------

def run_fillers(count: int, run: Callable[[dict], object], device) -> None:
    """Runs `run` on filler batches until this rank has made as many passes as the busiest.

    Under FSDP every rank must run the same modules as often (each forward and backward
    all-gathers and reduce-scatters with the other ranks), but a step's micro-batches, or the
    eval batches, don't always split evenly. A filler is one short row whose labels are all
    -100: its loss and label count are 0, so it adds nothing to the loss, the counts or any
    gradient. `count` is this rank's number of real passes. A collective: call it on every
    rank before the real passes (after them, a rank that is done would wait in it while
    another still all-gathers for its next batch).
    """
    import torch
    import torch.distributed as dist

    most = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    for _ in range(int(most.item()) - count):
        run({"input_ids": torch.zeros((1, 2), dtype=torch.long, device=device),
             "labels": torch.full((1, 2), -100, dtype=torch.long, device=device)})


# --- what the run records ---------------------------------------------------------------

def report(model, device, sharding: dict) -> dict:
    """What llamalora.json records about an FSDP run: the sharding and, per rank, the GiB of
    weights it holds, its peak GPU memory and its process's peak host memory. A collective."""
    import torch
    import torch.distributed as dist

    held = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    mine = {"weights_gib": round(held / 2**30, 3),
            "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            if device.type == "cuda" else None,
            # ru_maxrss is in KiB on Linux
            "host_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                       / 2**20, 2)}
    ranks: list = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    return {**sharding, "ranks": ranks}
