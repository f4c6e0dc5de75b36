"""What an export reads: the run's adapter and its base, read once and without weights.

What the export turns on about the base is its model family's (`llamalora.families`): whether
its language model can be written as a plain Llama (Mllama's, whose cross-attention layers text
input never runs), whether its merged model is GGUF-able, which class a merge goes into, and how
its adapter's keys are named.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from llamalora.adapters import ADAPTER_WEIGHTS, AdapterInfo, find_adapter
from llamalora.errors import UsageError
from llamalora.families import Family, family_of
from llamalora.models.names import hub_id_of, resolve_model
from llamalora.plan import load_model_config


@dataclass
class ExportSource:
    """A run's adapter and what is known of its base."""

    info: AdapterInfo
    base_path: str  # what llamalora loads: a local folder or a hub id
    hub_id: str | None  # what the Hub calls the base, where it has one
    config: object  # the base's transformers config

    @property
    def provenance(self) -> dict:
        """What an export's marker records: the adapter, and the base as named and as loaded."""
        return {"source": str(self.info.folder.resolve()), "base_model": self.base_name,
                "base_model_local": self.base_path}

    def export_kind(self, *, merge: bool, text_only: bool, gguf: bool, state_dict: bool) -> str:
        """state_dict, adapter, merged, or llama (a family's language model as a plain Llama,
        `Family.text_only_export`). A plain Llama has no layers for --text-only to drop: its
        merged model is the Llama one, and its GGUF needs no --text-only.

        Raises:
            UsageError: --gguf of a family whose merged model isn't GGUF-able (Mllama's without
                --text-only), or --text-only of one whose vision tower can't be dropped.
        """
        if state_dict:
            return "state_dict"
        if not merge:
            return "adapter"
        family = self.family
        if family.text_only_export and text_only:
            return "llama"
        if text_only and family.takes_images:
            raise UsageError(f"--text-only: the language model of a {family.name} run can't be "
                             "written on its own; pass --merge for the whole model")
        if gguf and not family.gguf:
            raise UsageError(f"--gguf converts the text-only Llama model of a {family.name} run: "
                             "pass --merge --text-only --gguf FILE" if family.text_only_export
                             else f"--gguf: llama.cpp's llama architecture can't hold a "
                             f"{family.name} model; pass --merge without --gguf")
        return "merged"

    @property
    def family(self) -> Family:
        return family_of(self.config)

    @property
    def text_config(self):
        """The language model's config (an Mllama's text_config; a Llama's own)."""
        return self.config.get_text_config()

    @property
    def skipped_layers(self) -> list[int]:
        """The layers a text forward skips (Mllama's cross-attention layers)."""
        return self.family.skipped_layers(self.text_config)

    @property
    def trained_with_vision(self) -> bool:
        return bool(self.info.run.get("plan", {}).get("with_vision"))

    @property
    def base_name(self) -> str:
        """How exported files name the base: its Hub id where it has one."""
        return self.hub_id or self.base_path

    @property
    def places(self) -> list[Path]:
        """The folders an export reads and so must never write into."""
        return [self.info.run_dir, self.info.folder]

    @functools.cached_property
    def tokenizer(self):
        """The base's tokenizer (tokenizers.Tokenizer) with the chat template the run used."""
        from llamalora.tokenizer import load_model_tokenizer

        return load_model_tokenizer(self.base_path)[0]

    @property
    def merges_with_vision(self) -> bool:
        """A run of a family with a vision side is merged into the whole model, text-only runs
        too (`Family.merge_with_vision`): the result is a complete checkpoint that the family's
        classes all load (Mllama's text-only and vision ones), like the original."""
        return self.family.merge_with_vision

    def merged_class(self):
        """The class that loads the merged model back for its check: the one the run trained."""
        return self.family.load_class(self.trained_with_vision)

    def adapter_weights(self) -> dict:
        from safetensors.torch import load_file

        return load_file(str(self.info.folder / ADAPTER_WEIGHTS))

    def adapter_weights_for_peft(self) -> dict:
        """The adapter's weights for a PEFT folder: where the family's two classes name the
        layers differently (Mllama), each under both names, each with its own storage as
        safetensors wants, so it loads onto either; otherwise as they are."""
        weights = self.adapter_weights()
        out = dict(weights)
        for to_vision in (True, False) if self.family.adapter_prefixes else ():
            out.update({k: v.clone() for k, v in
                        self.family.adapter_keys(weights, to_vision).items() if k not in out})
        return out

    def save_processor(self, folder: Path) -> None:
        """The image processor beside a merged model, for a family that takes images."""
        if self.family.takes_images:
            from llamalora.models.loading import load_image_processor

            load_image_processor(self.base_path).save_pretrained(str(folder))

    def meta_text_weights(self) -> dict:
        """The text-only model's weights on the meta device: names and shapes, no memory."""
        return self.family.meta_model(self.config, with_vision=False).state_dict()

    def load_base(self, dtype: str, with_vision: bool):
        """The base in `dtype` ("bfloat16", ...), never quantized: (model, device)."""
        from llamalora.models.loading import load_model_for_inference

        model, info = load_model_for_inference(self.base_path, quant="none",
                                               with_vision=with_vision, dtype=dtype)
        return model, info["device"]

    def refuse_text_only(self) -> None:
        """A run trained with images can't lose the cross-attention layers its answers use.

        Raises:
            UsageError: The run's record, or a cross-attention LoRA weight that moved from zero
                (a bare adapter has no record), says images trained it.
        """
        fix = "export it with --merge (the full vision model) instead"
        if self.trained_with_vision:
            raise UsageError(f"{self.info.run_dir} was trained with images: its answers depend "
                             f"on the cross-attention layers that --text-only drops; {fix}")
        cross = set(self.skipped_layers)
        if not cross:
            return
        from safetensors import safe_open

        with safe_open(str(self.info.folder / ADAPTER_WEIGHTS), framework="pt") as f:
            for key in f.keys():
                parts = key.split(".")
                if "lora_B" not in parts or "layers" not in parts:
                    continue
                index = parts[parts.index("layers") + 1]
                if index.isdigit() and int(index) in cross and f.get_tensor(key).abs().max() > 0:
                    raise UsageError(f"the adapter changed cross-attention layer {index} ({key}):"
                                     " it was trained with images, and a text-only Llama has no "
                                     f"cross-attention layers; {fix}")


def open_source(run: str | Path) -> ExportSource:
    """Finds the run's adapter (a run, a checkpoint, or an exported adapter) and reads its base's
    config.

    Raises:
        UsageError: No adapter there.
        ModelError: The base's config can't be read.
    """
    info = find_adapter(run)
    base_path = resolve_model(info.base_model)
    config, _ = load_model_config(base_path)
    return ExportSource(info, base_path, hub_id_of(info.base_model), config)
