"""How the processes of a run train together: one process, data-parallel, or FSDP2.

The recipe talks to one small interface and never asks which it has:

* `Single`: one process; every method does nothing (or the plain thing).
* `DataParallel` (torchrun / accelerate launch): each rank holds its own quantized copy of the
  model; the LoRA gradients are summed over the ranks by one all-reduce per optimizer step (one
  flat buffer, since LoRA's many small tensors would cost one collective each), and only rank 0
  writes files.
* `Sharded` (accelerate launch with an FSDP2 config, bf16 only): every weight is split across the
  ranks (`llamalora.fsdp`); gradients are reduce-scattered in backward, every rank runs as many
  passes as the busiest, and the full state for saving comes from torch's distributed
  `get_state_dict` / `set_state_dict`.

`from_environment()` reads the launcher's variables; `for_run(config, plan)` turns a multi-process
run into `Sharded` where the accelerate config asks for FSDP.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from llamalora import fsdp
from llamalora.errors import ConfigError


def world() -> tuple[int, int, int]:
    """(rank, local rank, world size) from the torchrun / accelerate environment."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


class Single:
    """One process: nothing to share."""

    name = "single"
    fused_optimizer = True  # fused AdamW on CUDA (HF Trainer's default there too)
    shards_weights = False  # FSDP: every rank holds a slice of each weight (compile, CUDA graphs
                            # and images are not supported then)

    def __init__(self, rank: int = 0, local_rank: int = 0, world_size: int = 1):
        self.rank, self.local_rank, self.world_size = rank, local_rank, world_size
        self.is_main = rank == 0
        self.device = None

    def for_run(self, config, plan) -> Single:
        return self

    def start(self):
        """Picks this process's device (and joins the process group); returns the device."""
        import torch

        self.device = torch.device(f"cuda:{self.local_rank}" if torch.cuda.is_available()
                                   else "cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self.device

    def load_options(self) -> dict:
        """`load_model_for_training` keywords: straight onto this process's device."""
        return {"device": str(self.device)}

    def prepare(self, model) -> dict | None:
        """Called once LoRA is attached; what the run records about it (None: nothing)."""
        return None

    def sum(self, tensor):
        """Sums `tensor` over the ranks, in place; returns it."""
        return tensor

    def sync_gradients(self, params: list) -> None:
        """Makes every rank's gradients the sum over the ranks."""

    def even_out(self, count: int, run: Callable[[dict], object]) -> None:
        """Tops this rank up to the busiest rank's number of passes (FSDP only)."""

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any (a stop request, say)."""
        return flag

    def wait(self) -> None:
        """Returns once every rank got here."""

    def full_state(self, model, optimizer) -> tuple[dict | None, dict | None]:
        """(LoRA weights, optimizer state) in the one-process layout, for rank 0 to save. None
        for the weights means "peft collects them itself". A collective under FSDP."""
        return None, optimizer.state_dict() if optimizer is not None else None

    def load_state(self, model, optimizer, adapter: dict, optimizer_state: dict) -> None:
        """Loads a one-process-layout checkpoint into this rank's model and optimizer."""
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, adapter)
        optimizer.load_state_dict(optimizer_state)

    def report(self, model) -> dict | None:
        """Per-rank facts for llamalora.json (FSDP only). A collective."""
        return None

    def close(self) -> None:
        """Leaves the process group this run joined (after the last collective)."""


class DataParallel(Single):
    """Several processes, each with a whole model; gradients summed by all-reduce."""

    name = "data-parallel"

    joined = False  # this run started the process group (so it ends it too)

    def start(self):
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            self.joined = True
        return super().start()

    def close(self) -> None:
        import torch.distributed as dist

        if self.joined and dist.is_initialized():
            # Every rank gets here before any tears the group down, and none leaves it to the
            # interpreter's exit: a gloo thread still holding work then can abort the process.
            dist.barrier()
            dist.destroy_process_group()
            self.joined = False

    def for_run(self, config, plan) -> Single:
        found = fsdp.settings(config, plan, self.world_size)
        return self if found is None else Sharded(self.rank, self.local_rank, self.world_size,
                                                  found)

    def sum(self, tensor):
        import torch.distributed as dist

        dist.all_reduce(tensor)
        return tensor

    def sync_gradients(self, params: list) -> None:
        import torch

        for p in params:
            if p.grad is None:  # a rank whose batches skipped a module
                p.grad = torch.zeros_like(p)
        flat = self.sum(torch.cat([p.grad.reshape(-1) for p in params]))
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()

    def any(self, flag: bool) -> bool:
        import torch

        return self.sum(torch.tensor([1.0 if flag else 0.0], device=self.device)).item() > 0

    def wait(self) -> None:
        import torch

        self.sum(torch.zeros(1, device=self.device))


class Sharded(DataParallel):
    """FSDP2: each rank holds 1/N of every weight (see `llamalora.fsdp`)."""

    name = "fsdp2"
    fused_optimizer = False  # DTensor shards take the default AdamW
    shards_weights = True

    def __init__(self, rank: int, local_rank: int, world_size: int, settings):
        super().__init__(rank, local_rank, world_size)
        self.settings = settings
        self.sharding: dict = {}

    def for_run(self, config, plan) -> Single:
        return self

    def load_options(self) -> dict:
        fsdp.wait_turn(self.settings, self.rank)  # with sequential loading, one rank at a time
        return fsdp.load_options(self.device)

    def prepare(self, model) -> dict:
        self.sharding = fsdp.shard(model, self.device, self.settings, self.rank)
        return self.sharding

    def sync_gradients(self, params: list) -> None:
        pass  # reduce-scattered (summed) in backward

    def even_out(self, count: int, run: Callable[[dict], object]) -> None:
        fsdp.run_fillers(count, run, self.device)

    def full_state(self, model, optimizer) -> tuple[dict | None, dict | None]:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict, get_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True,
                                   ignore_frozen_params=True)
        if optimizer is None:
            return get_model_state_dict(model, options=options), None
        weights, optim = get_state_dict(model, optimizer, options=options)
        # Offloaded full state lands on rank 0 only; the others get empty dicts.
        return weights, _by_index(optim) if optim else None

    def load_state(self, model, optimizer, adapter: dict, optimizer_state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        names = _lora_names(model)
        missing = sorted(set(names) - set(adapter))
        extra = sorted(set(adapter) - set(names))
        if missing or extra:
            raise ConfigError(f"the checkpoint's adapter does not match the model "
                              f"({len(missing)} missing, {len(extra)} unexpected weights, e.g. "
                              f"{(missing or extra)[0]}); resume with the same --target-modules "
                              "and --lora-rank")
        weights = {fqn: adapter[key] for key, fqn in names.items()}
        set_state_dict(model, optimizer, model_state_dict=weights,
                       optim_state_dict=_by_name(optimizer_state, optimizer, model),
                       options=StateDictOptions(full_state_dict=True, strict=False))

    def report(self, model) -> dict:
        return fsdp.report(model, self.device, self.sharding)


def from_environment() -> Single:
    """The strategy the launcher asked for: `Single` unless WORLD_SIZE > 1."""
    rank, local_rank, world_size = world()
    if world_size > 1:
        return DataParallel(rank, local_rank, world_size)
    return Single()


def _lora_names(model) -> dict[str, str]:
    """The adapter file's key (peft drops the adapter name) -> the parameter's full name."""
    adapter = getattr(model, "active_adapter", "default")
    return {name.replace(f".{adapter}.", "."): name for name, p in model.named_parameters()
            if p.requires_grad}


# torch's full optimizer state is keyed by parameter name; a one-process checkpoint (what
# `optimizer.state_dict()` gives) by position. Saving in the one-process layout keeps a
# checkpoint the same files whatever the launch.

def _by_index(state: dict) -> dict:
    order = [name for group in state["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
    return {"state": {index[n]: v for n, v in state["state"].items()}, "param_groups": groups}


def _by_name(state: dict, optimizer, model) -> dict:
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {order[int(i)]: v for i, v in state["state"].items()},
            "param_groups": groups}
