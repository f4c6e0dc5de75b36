"""README.md model cards (huggingface_hub ModelCard: a metadata header and a body) for each kind of
export. The header's `base_model` is the base's Hub id, or absent where it has none: the Hub and
llama.cpp's converter read it as a repository, which a local folder is not."""

from __future__ import annotations

from pathlib import Path

from llamalora.export.source import ExportSource


def _run_lines(source: ExportSource) -> list[str]:
    run, cfg = source.info.run, source.info.run.get("config", {})
    where = (f"trained on the local copy `{source.base_path}`; "
             if source.hub_id and source.base_path != source.hub_id else "")
    return [
        f"- Base model: `{source.base_name}` ({where}quantization during training: "
        f"{source.info.quant or '?'})",
        f"- Data: `{cfg.get('data_path', '?')}` (sha256 `{run.get('data_sha256', '?')}`)",
        f"- LoRA: r={cfg.get('lora_rank', '?')}, alpha={cfg.get('lora_alpha', '?')}, "
        f"dropout={cfg.get('lora_dropout', '?')}, modules={cfg.get('target_modules', '?')}",
        f"- Final train loss: {run.get('final_train_loss')}; eval loss: "
        f"{run.get('final_eval_loss')}",
        f"- Steps: {run.get('plan', {}).get('steps', '?')}, max length "
        f"{cfg.get('max_seq_length', '?')}, learning rate {cfg.get('learning_rate', '?')}"]


def _save(folder: Path, source: ExportSource, library: str, lines: list[str], **extra) -> None:
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name=library, base_model=source.hub_id,
                         tags=["lora", "llamalora", *extra.pop("tags", [])], **extra)
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n").save(
        folder / "README.md")


def _load_lines(source: ExportSource, where: str) -> list[str]:
    # The classes the family's merged model loads with: the text-only one first, or the others.
    first, *others = source.family.merged_classes
    load = [f"from transformers import {first}", f'model = {first}.from_pretrained("{where}")']
    if others:
        load = [load[0], f"from transformers import {', '.join(others)}",
                load[1] + "  # text only, or:",
                *(f'# model = {name}.from_pretrained("{where}")' for name in others)]
    return load


def write_adapter_card(folder: Path, source: ExportSource) -> None:
    load = _load_lines(source, source.base_name)
    lines = ["# LoRA adapter trained with llamalora", "", *_run_lines(source), "",
             "## Load it", "", "```python", "from peft import PeftModel",
             *[line.replace("model = ", "base = ", 1) for line in load],
             'model = PeftModel.from_pretrained(base, "<this folder>")', "```", "",
             "Prompts use the chat template of the tokenizer saved here, the one the adapter was "
             "trained on (`apply_chat_template` builds them; so does `llamalora chat --adapter "
             "<this folder>`)."]
    if source.family.adapter_prefixes:
        lines += ["", "The weights file holds each LoRA weight under both layer names "
                  "(`model.layers.*` of the text-only model and "
                  "`model.language_model.layers.*` of the vision model), so it loads onto "
                  "either class."]
    _save(folder, source, "peft", lines)


def write_merged_card(folder: Path, source: ExportSource, gguf_name: str | None) -> None:
    lines = ["# Model fine-tuned with llamalora", "", *_run_lines(source), "", "## Load it", "",
             "A standalone model with the LoRA merged in; no peft needed:", "", "```python",
             *_load_lines(source, "<this folder>"), "```", *_gguf_lines(gguf_name)]
    _save(folder, source, "transformers", lines)


def write_llama_card(folder: Path, source: ExportSource, vocab_size: int,
                     gguf_name: str | None) -> None:
    lines = [
        "# Llama model fine-tuned with llamalora", "",
        f"The language model of `{source.base_name}` with a LoRA adapter merged in, written as "
        "a plain `LlamaForCausalLM`: the cross-attention (image) layers, which text input never "
        f"runs, are left out, and the vocabulary is the {vocab_size:,} ids the head predicts.",
        "", *_run_lines(source), "",
        "## Run it", "", "```bash", "vllm serve <this folder>", "```", "",
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("<this folder>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this folder>")  # has the chat template',
        "```", *_gguf_lines(gguf_name)]
    _save(folder, source, "transformers", lines, tags=["llama"],
          pipeline_tag="text-generation")


def _gguf_lines(gguf_name: str | None) -> list[str]:
    if not gguf_name:
        return []
    return ["", f"`{gguf_name}`, the GGUF written with it, runs in llama.cpp "
            f"(`llama-cli -m {gguf_name}`) and Ollama (`FROM ./{gguf_name}` in a Modelfile)."]
