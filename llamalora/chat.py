"""Talking to a trained adapter: load base + adapter, build prompts with the training template,
generate with streaming.

Prompts come from `template.render_segments(..., add_generation_prompt=True)` and are tokenized by
`tokenizer.encode_segments`, exactly as training tokenized its prompts, so train and chat cannot
drift apart. Generation stops at the template's stop tokens (`<|eot_id|>`, `<|im_end|>`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llamalora.adapters import AdapterInfo, apply_adapter, find_adapter
from llamalora.data import image_error, read_image
from llamalora.errors import ConfigError, UsageError
from llamalora.families import family_of_model, image_families
from llamalora.quant import default_quant, enable_kernels, graph_safe, has_quantized_layers
from llamalora.template import IMAGE, pad_token_id, render_segments, template_of
from llamalora.tokenizer import encode_segments


@dataclass
class Reply:
    """One answer and how fast it came."""

    text: str
    new_tokens: int  # generated, the stop token not counted
    first_token_s: float
    decode_tokens_per_s: float
    prompt_tokens: int = 0
    # "stop" (a stop token ended it), "length" (max_new_tokens did), or "interrupted" (the
    # caller's `should_stop` did).
    finish_reason: str = "stop"


@dataclass
class GenerationOptions:
    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.9

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")


class _Streamer:
    """transformers' streamer protocol: `put` gets the prompt first, then one token at a time."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None, stop_ids: list[int]):
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.on_text = on_text
        self.ids: list[int] = []
        self.printed = ""
        self.prompt_seen = False
        self.start = time.perf_counter()
        self.first_at: float | None = None

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        if self.first_at is None:
            self.first_at = time.perf_counter()
        if self.on_text is None:
            return  # timing only: no copy to the host, no decoding
        self.ids.extend(int(t) for t in value.reshape(-1).tolist() if int(t) not in self.stop_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        # Hold back an incomplete UTF-8 sequence (Korean is 3 bytes a syllable).
        if text.endswith("\ufffd"):
            return
        if self.on_text is not None and len(text) > len(self.printed):
            self.on_text(text[len(self.printed):])
        self.printed = text

    def end(self) -> None:
        if self.on_text is None:
            return
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.on_text is not None and len(text) > len(self.printed):
            self.on_text(text[len(self.printed):])
        self.printed = text


@dataclass
class ChatSession:
    """A conversation with history. `ask` answers one user turn and keeps it."""

    model: object
    tokenizer: object  # tokenizers.Tokenizer
    image_processor: object | None
    device: object
    base_model: str
    adapter: AdapterInfo | None
    quant: str
    system: str | None = None
    kernels: str = "bitsandbytes"
    lora_merged: bool = False  # see merge_for_decoding
    history: list[tuple[str, str]] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)

    @functools.cached_property
    def stop_ids(self) -> list[int]:
        """The tokenizer's ids of the tokens a reply ends at."""
        ids = [self.tokenizer.token_to_id(t) for t in template_of(self.tokenizer).stops]
        return [i for i in ids if i is not None]

    @functools.cached_property
    def batches(self):
        """The model family's prompt batches (`families.base.TextBatches`), images included."""
        return family_of_model(self.model).batches(self.model, self.image_processor)

    @functools.cached_property
    def pad_id(self) -> int:
        return pad_token_id(self.tokenizer)

    @functools.cached_property
    def static_decoder(self):
        """The static-cache decoder for text turns, or None where `generate` runs instead."""
        from llamalora import decode

        if decode.supported(self.model) is not None:
            return None
        import torch

        # bitsandbytes' own int8 layer syncs with the host (outlier columns), which a CUDA graph
        # cannot hold; llamalora's kernels (`--kernels auto|fast`) can.
        graphs = graph_safe(self.model) and torch.cuda.is_available()
        return decode.StaticDecoder(self.model, graphs=graphs)

    @property
    def decoding(self) -> str:
        """How text turns are decoded, as the start-of-chat line says it."""
        decoder = self.static_decoder
        if decoder is None:
            from llamalora import decode

            return f"transformers generate ({decode.supported(self.model)})"
        path = "static cache + CUDA graphs" if decoder.graphs else "static cache"
        return path + (", LoRA merged into the weights" if self.lora_merged else "")

    def _decode(self, decoder, ids: list[int], options: GenerationOptions,
                streamer: _Streamer, should_stop: Callable[[], bool] | None) -> list[int]:
        import torch

        streamer.put(ids)
        new = []
        for token in decoder.generate(ids, max_new_tokens=options.max_new_tokens,
                                      stop_ids=self.stop_ids, choose=_chooser(options)):
            new.append(token)
            streamer.put(torch.tensor([token]))
            if should_stop is not None and should_stop():
                break
        streamer.end()
        return new

    def _generate(self, batch: dict, options: GenerationOptions, streamer: _Streamer,
                  should_stop: Callable[[], bool] | None = None):
        """transformers' `generate`: conversations with images take it (the model's own image
        path), and models the static decoder can't run."""
        import torch

        sample = options.temperature > 0
        kwargs = {"do_sample": sample, "max_new_tokens": options.max_new_tokens,
                  "eos_token_id": self.stop_ids, "pad_token_id": self.pad_id, "streamer": streamer}
        if sample:
            kwargs.update(temperature=options.temperature, top_p=options.top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if should_stop is not None:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList([_StopWhen(should_stop)])
        with torch.inference_mode():
            return self.model.generate(**batch, **kwargs)

    def reset(self) -> None:
        self.history.clear()
        self.images.clear()

    def prompt_ids(self, user: str, image: Path | None = None) -> list[int]:
        content = (IMAGE + user) if image is not None else user
        return prompt_ids(self.tokenizer, self.system, self.history + [("user", content)])

    def check_image(self, image: str | Path) -> Path:
        """`image` as a path the model can read.

        Raises:
            UsageError: The model has no vision tower, or the file is missing or unreadable.
        """
        path = Path(image)
        if self.image_processor is None:
            raise UsageError(f"this model has no vision tower; images need a {image_families()} "
                             "model (or --model tiny)")
        if not path.is_file():
            raise UsageError(f"image not found: {path}")
        try:
            read_image(path)
        except Exception as exc:  # PIL raises many types for bad files
            raise UsageError(f"image cannot be read: {path} ({image_error(exc)})") from exc
        return path

    def ask(self, user: str, *, image: str | Path | None = None,
            options: GenerationOptions | None = None,
            on_text: Callable[[str], None] | None = None) -> Reply:
        """Generates the assistant's answer to `user` (streamed through `on_text`)."""
        options = options or GenerationOptions()
        image_path = self.check_image(image) if image is not None else None
        ids = self.prompt_ids(user, image_path)
        reply = self.complete(ids, self.images + ([image_path] if image_path else []), options,
                              on_text=on_text)
        self.history += [("user", (IMAGE + user) if image_path else user),
                         ("assistant", reply.text)]
        if image_path is not None:
            self.images.append(image_path)
        return reply

    def complete(self, ids: list[int], images: list[Path], options: GenerationOptions, *,
                 on_text: Callable[[str], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> Reply:
        """The answer after prompt `ids` (images: the conversation's, in order), streamed
        through `on_text`; `should_stop()`, asked after each token, ends it early."""
        from llamalora.step import to_device

        batch = self.batches.prompt([ids], self.pad_id, images)
        prompt_length = batch["input_ids"].shape[1]  # a family may put images' tokens in it
        dtype = next(p.dtype for p in self.model.parameters() if p.is_floating_point())
        batch = to_device(batch, self.device, dtype)
        streamer = _Streamer(self.tokenizer, on_text, self.stop_ids)
        decoder = self.static_decoder if not images else None
        if decoder is not None:
            new = self._decode(decoder, ids, options, streamer, should_stop)
        else:
            new = self._generate(batch, options, streamer, should_stop)[0, prompt_length:].tolist()
        end = time.perf_counter()
        stopped = bool(new) and new[-1] in self.stop_ids
        new = [t for t in new if t not in self.stop_ids]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        first = (streamer.first_at or end) - streamer.start
        decode_s = end - (streamer.first_at or end)
        finish = "stop" if stopped else (
            "length" if len(new) >= options.max_new_tokens else "interrupted")
        return Reply(text, len(new), first,
                     (len(new) - 1) / decode_s if decode_s > 0 and len(new) > 1 else 0.0,
                     prompt_tokens=prompt_length, finish_reason=finish)


class _StopWhen:
    """A transformers stopping criterion that asks the caller (`should_stop()`) each token."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool,
                          device=input_ids.device)


def prompt_ids(tokenizer, system: str | None, turns: list[tuple[str, str]]) -> list[int]:
    """The token ids a model is prompted with for a conversation ending with a user turn:
    `render_segments` with the generation prompt, each segment tokenized as training tokenized
    it, so the prompt is what training saw before each answer."""
    segments = render_segments(system, turns, add_generation_prompt=True,
                               template=template_of(tokenizer))
    return [t for ids, _ in encode_segments(tokenizer, [segments])[0] for t in ids]


def merge_for_decoding(model) -> bool:
    """Folds the LoRA weights into an unquantized base on a GPU (peft's `merge_adapter`, as
    `export-adapter --merge` does); says whether it did.

    At batch 1 the LoRA layers' ~900 small kernels a token were 1.7 ms of the bf16 11B's
    11.8 ms (BENCHMARKS.md). A quantized base keeps them: folding into int8 or NF4
    weights would round the adapter away. The CPU keeps them too: nothing to gain there.
    """
    import torch

    if not torch.cuda.is_available() or not hasattr(model, "merge_adapter"):
        return False
    if has_quantized_layers(model):
        return False
    model.merge_adapter()
    return True


def _chooser(options: GenerationOptions):
    """The next-token rule `generate` follows with these options: argmax, or transformers'
    warpers (temperature, generate's default top-k of 50, top-p) and a draw from what is left."""
    import torch

    if options.temperature <= 0:
        return lambda logits: logits.argmax(-1)
    from transformers.generation.logits_process import (LogitsProcessorList,
                                                        TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    warpers = LogitsProcessorList([TemperatureLogitsWarper(options.temperature),
                                   TopKLogitsWarper(50), TopPLogitsWarper(options.top_p)])

    def choose(logits):
        scores = warpers(None, logits)
        return torch.multinomial(torch.softmax(scores, dim=-1), 1).view(1)

    return choose


def open_chat(adapter: str | Path | None, *, model: str | None = None, quant: str | None = None,
              no_adapter: bool = False, with_vision: bool = False,
              system: str | None = None, kernels: str = "auto",
              merge: bool = True) -> ChatSession:
    """Loads the base model (from the adapter's config unless `model`) and the adapter.

    Args:
        adapter: A run folder, checkpoint, or exported adapter. May be None with `no_adapter`
            and `model`.
        model: Base model override (hub id, folder, or `tiny`).
        quant: 8bit / 4bit / none; default: the run's.
        no_adapter: Answer with the base model alone.
        with_vision: Load the vision tower where the model has one (needed for images).
        system: The system message.
        kernels: Base-layer matmuls, as train's `--kernels` (auto: llamalora's on CUDA GPUs).
        merge: Fold the adapter into an unquantized base where that is faster
            (`merge_for_decoding`); False keeps it apart, so that it can be switched off.

    Raises:
        UsageError, ModelError, ConfigError.
    """
    from llamalora.models.loading import (load_image_processor, load_model_for_inference,
                                          model_family)
    from llamalora.models.names import resolve_model
    from llamalora.tokenizer import load_model_tokenizer

    info = find_adapter(adapter) if adapter is not None else None
    base = model or (info.base_model if info else None)
    if not base:
        raise UsageError("no base model: pass --adapter DIR from a run, or --model")
    quant = quant or (info.quant if info else None) or default_quant()
    base_path = resolve_model(base)
    family = model_family(base_path)
    with_vision = with_vision and family.takes_images
    loaded, load_info = load_model_for_inference(base_path, quant=quant, with_vision=with_vision)
    if info is not None and not no_adapter:
        loaded = apply_adapter(loaded, info.folder)
    merged = merge and info is not None and not no_adapter and merge_for_decoding(loaded)
    kernel_path = enable_kernels(loaded, kernels)
    tokenizer, _ = load_model_tokenizer(base_path)
    image_processor = load_image_processor(base_path) if with_vision else None
    return ChatSession(model=loaded, tokenizer=tokenizer, image_processor=image_processor,
                       device=load_info["device"], base_model=base,
                       adapter=None if no_adapter else info, quant=quant, system=system,
                       kernels=kernel_path, lora_merged=merged)
