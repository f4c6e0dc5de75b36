"""The plain Hugging Face recipe for records with images, timed per step (GPU or CPU).

    python3 benchmarks/hf_image_baseline.py DATA --model /tmp/m11b [--steps 12] [--json out.json]

HF Trainer + PEFT on `MllamaForConditionalGeneration` in bf16, as the transformers and TRL
vision fine-tuning guides write it: the chat template renders each record, the Mllama processor
collates a batch (padding to the longest, images per record), labels are the input ids with
padding and `<|image|>` masked. LoRA r 8 / alpha 32 / dropout 0.05 on q, k, v, o of the language
model (as llamalora trains), batch 2 x accumulation 2, no gradient checkpointing, 4 records a
step in file order. Only the reading of the JSONL and the turns as `apply_chat_template`'s
messages go through llamalora; the model, collator and loop are transformers' and peft's. The processor wants at least one
image per record of a batch, so give an all-image set (make_image_data.py without --mixed).
Prints one JSON line: median step (after 3), records/s, peak memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

IMAGE = "<|image|>"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from PIL import Image
    from transformers import (AutoTokenizer, MllamaForConditionalGeneration,
                              MllamaImageProcessor, MllamaProcessor, Trainer, TrainerCallback,
                              TrainingArguments)

    from llamalora.data import load_examples
    from llamalora.template import chat_messages

    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if not tokenizer.chat_template:  # the tiny test model's: Meta's template, as bundled
        from llamalora.tokenizer import BUNDLED_TOKENIZER_DIR

        tokenizer.chat_template = AutoTokenizer.from_pretrained(
            BUNDLED_TOKENIZER_DIR).chat_template
    processor = MllamaProcessor(image_processor=MllamaImageProcessor.from_pretrained(args.model),
                                tokenizer=tokenizer, chat_template=tokenizer.chat_template)
    examples, _ = load_examples(args.data)
    if any(not e.images for e in examples):
        sys.exit("every record needs an image here (the processor's collator wants one per row)")

    feed = [{"messages": chat_messages(e.system, e.messages, parts=True),
             "images": [str(p) for p in e.images]}
            for e in examples]
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)

    def collate(features):
        texts = [processor.apply_chat_template(f["messages"], tokenize=False) for f in features]
        images = [[Image.open(p).convert("RGB") for p in f["images"]] for f in features]
        batch = processor(text=texts, images=images, padding=True, return_tensors="pt",
                          add_special_tokens=False)
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        labels[labels == image_id] = -100
        batch["labels"] = labels
        return batch

    dtype = torch.bfloat16 if cuda else torch.float32
    model = MllamaForConditionalGeneration.from_pretrained(
        args.model, dtype=dtype, device_map={"": "cuda:0" if cuda else "cpu"})
    model = get_peft_model(model, LoraConfig(
        r=8, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)$"))

    times: list[float] = []

    class Clock(TrainerCallback):
        last = 0.0

        def _now(self):
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_begin(self, *a, **k):
            self.last = self._now()

        def on_step_end(self, *a, **k):
            now = self._now()
            times.append(now - self.last)
            self.last = now

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    training = TrainingArguments(
        output_dir="/tmp/hf-image-baseline", per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_steps=args.steps, learning_rate=2e-4,
        bf16=cuda, logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
        train_sampling_strategy="sequential", remove_unused_columns=False,
        dataloader_num_workers=0, disable_tqdm=True, use_cpu=not cuda)
    Trainer(model=model, args=training, train_dataset=feed, data_collator=collate,
            callbacks=[Clock()]).train()
    median = statistics.median(times[3:] or times)
    result = {"recipe": "HF Trainer + PEFT, bf16, processor collator", "steps": len(times),
              "median_step_s": round(median, 4), "records_per_s": round(4 / median, 2),
              "first_step_s": round(times[0], 2),
              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
    print(json.dumps(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
