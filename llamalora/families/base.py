"""What a model family is to the rest of llamalora: a small declarative spec (`Family`) plus the
few functions that truly differ between families, and the text-only batches every family uses
for records without images (`TextBatches`).

The rest of the package asks the family of a checkpoint (`families.family_of(config)`) rather
than testing its model type: which classes load it, which modules stay out of quantization, LoRA
and autograd, how its records' images reach the model, what the plan counts, how its adapter's
keys are named, which of the fast paths (the static decoder, CUDA graphs) serve it, and how it
exports. A field left at its default is the plain causal LM's behaviour.

Nothing here imports torch or transformers until a function needs them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from llamalora.packing import Tokenized, collate, pack, pack_padded, with_loss_index


class TextBatches:
    """A model's training and prompt batches of text records: padded, packed into one row, or
    packed at a static length for a CUDA graph (`packing`), each with the loss positions listed
    on the host. A family with images makes its own (`Family.batches`), which hands its records
    without images to these.

    Args:
        model: The loaded model (PEFT-wrapped or not); a family's images may need its config.
        image_processor: The checkpoint's image processor, None without images.
    """

    def __init__(self, model=None, image_processor=None):
        self.model = model
        self.image_processor = image_processor

    def packed(self, items: list[Tokenized]) -> dict:
        """One padding-free row of `items`, each record attending to itself."""
        return with_loss_index(pack(items), [len(t) for t in items])

    def padded(self, items: list[Tokenized], pad_id: int) -> dict:
        """`items` padded on the right to the longest."""
        return with_loss_index(collate(items, pad_id))

    def static(self, items: list[Tokenized], pad_id: int) -> dict:
        """One row at `packing.static_shape(items)`'s shapes, for a CUDA graph."""
        return pack_padded(items, pad_id)

    def prompt(self, prompts: list[list[int]], pad_id: int, images: list[Path] = ()) -> dict:
        """Prompts for `generate`, padded on the left; `images` go with a single prompt (a
        conversation's, in order).

        Raises:
            ValueError: Images for a model that takes none, or for several prompts.
        """
        import torch

        if images:
            raise ValueError("this model takes no images")
        longest = max(map(len, prompts))
        ids = torch.tensor([[pad_id] * (longest - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
        return {"input_ids": ids, "attention_mask": mask}


def _no_layers(text_config) -> list[int]:
    return []


def _no_tokens(config, model_path: str | None = None) -> int:
    return 0


@dataclass(frozen=True)
class Family:
    """One model family: the facts and functions the rest of llamalora asks of a checkpoint."""

    name: str  # how messages name it
    model_types: tuple[str, ...]  # the `config.model_type` values it serves
    # transformers classes (by name, resolved when loading): the one text-only runs, chat and
    # export load, and the one with the vision tower (None: the family takes no images).
    text_class: str = "AutoModelForCausalLM"
    vision_class: str | None = None
    # Attributes of `model.model` that make up the vision side (tower, projector): never
    # quantized, never adapted by LoRA, and run without autograd (they are frozen).
    vision_parts: tuple[str, ...] = ()
    # Called on the model `loading` just loaded, with whether it was loaded with vision.
    prepare: Callable[[object, bool], None] | None = None
    # Its batches: (model, image_processor) -> a `TextBatches` (its own with images).
    batches: Callable[..., TextBatches] = TextBatches
    # The plan's counts: layers a text-only forward skips (Mllama's cross-attention layers),
    # image states each such layer reads per image, and the tokens an image adds to the sequence
    # at most (families that expand images inside the text), given the checkpoint's folder.
    skipped_layers: Callable[[object], list[int]] = _no_layers
    image_states: Callable[[object], int] = _no_tokens
    image_tokens: Callable[[object, str | None], int] = _no_tokens
    # Hub ids -> their architecture's config, for a plan made where config.json can't be had.
    known_configs: Mapping[str, Callable[[], object]] = field(
        default_factory=lambda: MappingProxyType({}))
    # Fast paths: `decode.StaticDecoder` for text turns; CUDA-graph steps for text rows, and
    # for rows with images.
    static_decoder: bool = True
    cuda_graphs: bool = True
    graph_images: bool = False
    # (device, graphs) -> what its image path runs, for the start-of-run line.
    kernel_note: Callable[[object, bool], str] | None = None
    # (the text-only class's decoder-layer prefix, the vision class's) in adapter keys, where
    # the two classes name the same layers differently; None where one name serves.
    adapter_prefixes: tuple[str, str] | None = None
    # Export: `--merge --text-only` writes its language model as a plain Llama; `--gguf`
    # converts its merged model; the classes that load its merged model (a model card's
    # example, text-only first); merges go into the vision class (the whole checkpoint).
    text_only_export: bool = False
    gguf: bool = True
    merged_classes: tuple[str, ...] = ("AutoModelForCausalLM",)
    merge_with_vision: bool = False

    @property
    def takes_images(self) -> bool:
        return self.vision_class is not None

    @property
    def keep_unquantized(self) -> list[str]:
        """Modules the quantization backend must leave alone: lm_head and the vision side.
        transformers 5 matches an entry from the start of the module name ("model.vision_model"
        covers the tower; a bare "vision_model" would not) or as a suffix; the bare names serve
        versions that matched substrings."""
        return ["lm_head", *(f"model.{part}" for part in self.vision_parts), *self.vision_parts]

    def load_class(self, with_vision: bool):
        """The transformers class to load this family's checkpoint with."""
        import transformers

        return getattr(transformers, self.vision_class if with_vision else self.text_class)

    def meta_model(self, config, with_vision: bool):
        """The model of `config` on the meta device (names and shapes, no memory)."""
        import torch

        cls = self.load_class(with_vision)
        with torch.device("meta"):
            if hasattr(cls, "from_config"):  # an Auto class
                return cls.from_config(config, trust_remote_code=False)
            return cls(config)

    def in_vision(self, name: str) -> bool:
        """Whether a parameter or module name lies in the vision side."""
        return any(part in self.vision_parts for part in name.split("."))

    def vision_modules(self, model) -> list:
        """The vision side's modules of a loaded model (`vision_parts` under `model.model`)."""
        inner = getattr(model, "model", None)
        return [m for m in (getattr(inner, part, None) for part in self.vision_parts)
                if m is not None]

    def adapter_keys(self, state: dict, to_vision: bool) -> dict:
        """An adapter's weights under the layer names of the vision class (`to_vision`) or of
        the text-only class; unchanged where the two name them alike."""
        if self.adapter_prefixes is None:
            return state
        src, dst = self.adapter_prefixes if to_vision else self.adapter_prefixes[::-1]
        return {(dst + k[len(src):] if k.startswith(src) else k): v for k, v in state.items()}

    def loaded_with_vision(self, model) -> bool:
        """Whether `model` (PEFT-wrapped or not) has this family's vision side loaded."""
        return self.takes_images and any(self.in_vision(n) for n, _ in model.named_parameters())


# Any causal LM transformers knows (Qwen2, Mistral, ...): text only, every path as for a Llama.
CAUSAL_LM = Family(name="causal LM", model_types=())
