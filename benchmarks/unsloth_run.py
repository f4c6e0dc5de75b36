"""Unsloth's own recommended path on the records and batches llamalora's benchmarks use: the
Unsloth baseline of benchmarks/speed.py (`unsloth-bf16`, `-8bit`, `-4bit`) and
benchmarks/long_speed.py. Not a re-implementation: Unsloth loads the model and LoRA, patches
the model and TRL's SFT trainer, and trains; only the data and the clock are ours.

    # the wheels, made where the package index is reachable: bash benchmarks/gpu_wheels_unsloth.sh
    python3 benchmarks/speed.py --model /tmp/m11b --recipes unsloth-bf16 llamalora-none

What runs (Unsloth 2026.10.9, TRL 1.15): `FastVisionModel.from_pretrained` of the local folder
(Unsloth loads Llama 3.2 Vision, Mllama, through its vision class; records without images train
its language model), in the spec's precision (`load_in_16bit` bf16, `load_in_8bit`,
`load_in_4bit`), Unsloth's gradient checkpointing (`use_gradient_checkpointing="unsloth"`, which
offloads the checkpointed activations to host memory); `FastVisionModel.get_peft_model` with
LoRA r 8 / alpha 32 / dropout 0.05 on the language model's attention (q, k, v, o), none on the
vision tower or the MLPs; TRL's `SFTTrainer` and `SFTConfig` as Unsloth patches them,
padding-free, batch 2 x accumulation 2, bf16, AdamW, the same learning rate and schedule as
benchmarks/speed.py's HF recipes. The records are llamalora's own tokenization (the same ids and
the same prompt mask, as TRL's `completion_mask`), fed in llamalora's step order (sequential
sampler), so every recipe sees the same tokens each step.

Unsloth reads the network at import unless told not to: the switches below are set before
anything imports huggingface_hub (this module is imported by speed.py's child process before
any model code), and the folder is read with `local_files_only=True`.
"""

from __future__ import annotations

import os

OFFLINE = {"UNSLOTH_DISABLE_STATISTICS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1",
           "UNSLOTH_STUDIO_DISABLED": "1", "WANDB_DISABLED": "true"}
LOAD = {"none": {"load_in_16bit": True, "load_in_4bit": False},
        "bf16": {"load_in_16bit": True, "load_in_4bit": False},
        "8bit": {"load_in_8bit": True, "load_in_4bit": False},
        "4bit": {"load_in_4bit": True}}


def set_offline(work: str) -> None:
    """The environment Unsloth needs here, before it (or huggingface_hub) is imported; its
    compiled-module cache goes under `work`, not the current folder."""
    os.environ.update(OFFLINE)
    os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", os.path.join(work, "unsloth_compiled_cache"))


def sft_rows(records, batches: list[list[int]]) -> list[dict]:
    """The records in step order, as TRL's tokenized rows: `input_ids` and `completion_mask` (1
    where llamalora's labels train, so the prompt mask is the same)."""
    out = []
    for batch in batches:
        for i in batch:
            record = records[i]
            out.append({"input_ids": list(record.input_ids),
                        "completion_mask": [int(x != -100) for x in record.labels]})
    return out


def run(spec: dict) -> dict:
    """One Unsloth run of `spec` (speed.py's spec: model, data, quant, steps, seed,
    max_seq_length, output_dir); per-step rows (time, real tokens, loss) and peak memory."""
    set_offline(spec["output_dir"])
    import unsloth  # noqa: F401  (first: it patches transformers, peft and trl)
    from unsloth import FastVisionModel

    import torch
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from harness import (LEARNING_RATE, LORA, load_records, peak_gib, step_batches, step_clock,
                         versions)

    records = load_records(spec, train_on_prompt=False)
    rows = sft_rows(records, step_batches([len(r) for r in records], spec["steps"], spec["seed"]))
    set_seed(spec["seed"])
    torch.cuda.reset_peak_memory_stats()
    model, tokenizer = FastVisionModel.from_pretrained(
        spec["model"], max_seq_length=spec["max_seq_length"], dtype=torch.bfloat16,
        use_gradient_checkpointing="unsloth", local_files_only=True, **LOAD[spec["quant"]])
    model = FastVisionModel.get_peft_model(
        model, finetune_vision_layers=False, finetune_language_layers=True,
        finetune_attention_modules=True, finetune_mlp_modules=False, r=LORA["r"],
        lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], bias="none",
        use_gradient_checkpointing="unsloth", random_state=spec["seed"])
    FastVisionModel.for_training(model)
    clock = step_clock(cuda=True)
    model.register_forward_pre_hook(lambda module, args, kwargs: clock.masks.append(
        kwargs["attention_mask"].sum() if kwargs.get("attention_mask") is not None
        else kwargs["input_ids"].new_tensor(kwargs["input_ids"].numel())), with_kwargs=True)
    config = SFTConfig(
        output_dir=spec["output_dir"], per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_steps=spec["steps"], learning_rate=LEARNING_RATE,
        warmup_steps=0.03, lr_scheduler_type="linear", bf16=True, padding_free=True,
        max_length=spec["max_seq_length"], completion_only_loss=True, logging_steps=1,
        save_strategy="no", eval_strategy="no", report_to="none", seed=spec["seed"],
        train_sampling_strategy="sequential", dataloader_num_workers=0, disable_tqdm=True,
        dataset_num_proc=1)
    trainer = SFTTrainer(model=model, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(rows), args=config, callbacks=[clock])
    trainer.train()
    return {"rows": clock.rows, "peak_gpu_mem_gib": peak_gib(spec), "kernels": "unsloth",
            "gradient_checkpointing": True, "batches": "padding-free (TRL / Unsloth)",
            "versions": {**versions(), "unsloth": _version("unsloth"),
                         "unsloth_zoo": _version("unsloth_zoo"), "trl": _version("trl")}}


def _version(name: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
