"""What every training recipe of the benchmarks shares: the LoRA settings, the records as
llamalora tokenizes them, the order they are taken in, the step clock, peak memory and versions.

speed.py runs the recipes (llamalora, HF Trainer, Unsloth through unsloth_run.py) in child
processes; each takes these from here, so that no recipe imports the harness that runs it.
"""

from __future__ import annotations

import math
import time

LORA = {"r": 8, "alpha": 32, "dropout": 0.05, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}
LEARNING_RATE = 2e-4
RECORDS_PER_STEP = 4


def load_records(spec: dict, *, train_on_prompt: bool):
    """The data tokenized exactly as llamalora tokenizes it (template, truncation, labels)."""
    from llamalora.batching import tokenize_examples
    from llamalora.data import load_examples
    from llamalora.models.names import resolve_model
    from llamalora.tokenizer import load_model_tokenizer

    examples, _ = load_examples(spec["data"])
    tokenizer, _ = load_model_tokenizer(resolve_model(spec["model"]))
    records, _ = tokenize_examples(tokenizer, examples, max_seq_length=spec["max_seq_length"],
                                   train_on_prompt=train_on_prompt)
    return records


def step_batches(lengths: list[int], steps: int, seed: int) -> list[list[int]]:
    """The records of each optimizer step as a one-GPU llamalora run at batch 4 x 1 takes them:
    step s is batch s of the epoch stream, each epoch in `batch_order`'s seeded order."""
    from llamalora.batching import batch_order

    per_epoch = math.ceil(len(lengths) / RECORDS_PER_STEP)
    orders: dict[int, list[list[int]]] = {}
    out = []
    for s in range(steps):
        epoch = s // per_epoch
        if epoch not in orders:
            orders[epoch] = batch_order(lengths, RECORDS_PER_STEP, seed, epoch)
        out.append(orders[epoch][s % per_epoch])
    return out


def peak_gib(spec: dict) -> float | None:
    import torch

    if spec["device"] != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def step_clock(cuda: bool):
    """A Trainer callback that times each optimizer step with the GPU synchronized at its edges.

    A step is timed from the end of the previous one (the start of training for the first), so
    it includes fetching and collating its micro-batches, as llamalora's step_time_s does: HF
    Trainer fetches a step's micro-batches before on_step_begin. The begin-to-end time is kept
    as compute_time_s.
    """
    import torch
    from transformers import TrainerCallback

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    class StepClock(TrainerCallback):
        def __init__(self):
            self.rows: list[dict] = []
            self.masks: list = []  # attention-mask sums of this step's micro-batches
            self.last = self.begin = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = now()

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin = now()

        def on_step_end(self, args, state, control, **kwargs):
            end = now()
            tokens = int(sum(m.item() for m in self.masks))
            self.masks.clear()
            self.rows.append({"step": state.global_step, "step_time_s": round(end - self.last, 4),
                              "compute_time_s": round(end - self.begin, 4), "tokens": tokens})
            self.last = end

        def on_log(self, args, state, control, logs=None, **kwargs):
            # Logged right after on_step_end of the same step (logging_steps=1).
            last = self.rows[-1] if self.rows else {}
            if logs and "loss" in logs and last.get("step") == state.global_step:
                last["loss"] = float(logs["loss"])

    return StepClock()


def versions() -> dict:
    from llamalora.provenance import package_versions
    from llamalora.recipe import RUN_VERSIONS  # the list llamalora.json records

    return package_versions(RUN_VERSIONS)
