"""A text-trained Llama 3.2 Vision (Mllama) run as a plain Llama checkpoint (`--merge
--text-only`), and as a GGUF file with `--gguf`.

For text input Mllama skips its cross-attention layers: with no `cross_attention_states` they are
never run. What is left between the embeddings and the head is a Llama 3.1 8B-shaped decoder, so a
text-only run's merged model can be written as a `LlamaForCausalLM` that transformers, vLLM and
llama.cpp's converter all load, and as a GGUF file that llama.cpp and Ollama run. The conversion:

* drops the cross-attention layers and renumbers the rest (the 11B's 40 layers become 32);
* trims the embedding to the vocabulary the head predicts (see `llama_weights` for why);
* writes `config.json` in Meta's Llama 3.1 format (`rope_theta` + `rope_scaling`), which every
  transformers version and serving stack reads, with the tokenizer in the Hub's format
  (`PreTrainedTokenizerFast`), Meta's Llama 3.1 chat template (assets/llama3_1_chat_template.jinja),
  and a generation config that stops at `<|eot_id|>`.

The folder is loaded back with plain transformers and its logits on the probe prompt compared
with the merged Mllama model's; a mismatch fails the export and nothing is left behind.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

from llamalora.errors import ModelError
from llamalora.events import Status
from llamalora.export.card import write_llama_card
from llamalora.export.gguf_file import (gguf_bytes, gguf_summary, llama_shape, verify_gguf,
                                        write_gguf_target)
from llamalora.export.merge import Merged, merge
from llamalora.export.result import ExportResult
from llamalora.export.source import ExportSource
from llamalora.export.target import Target, Targets, check_room, format_size
from llamalora.export.verify import DTYPES, TOLERANCE, Check, logit_diff, verify
from llamalora.families.mllama import MLLAMA
from llamalora.template import BOS, EOT, PAD
from llamalora.tokenizer import load_tokenizer

SHARD_BYTES = 5 * 2**30  # safetensors shards of at most 5 GiB, as transformers writes them
# Llama 3's vocabulary, which Mllama's text model has: <|begin_of_text|>, and the ids a reply
# ends with: <|end_of_text|>, <|eom_id|>, <|eot_id|>.
LLAMA3_BOS_ID = 128000
LLAMA3_STOP_IDS = (128001, 128008, 128009)
# Meta's chat template of Llama 3.1 Instruct (tokenizer_config.json of
# meta-llama/Llama-3.1-8B-Instruct, Llama 3.1 Community License), unchanged. It is the text-only
# form of the Llama 3.2 Vision template: a system block with "Cutting Knowledge Date: December
# 2023" and "Today Date: 26 Jul 2024" (a fixed date, where the Vision template asks the clock),
# then the turns. vLLM and transformers render it; llama.cpp runs it with --jinja; Ollama maps it
# to its own "llama3-instruct" template.
CHAT_TEMPLATE_FILE = (Path(__file__).resolve().parent.parent / "assets"
                      / "llama3_1_chat_template.jinja")


def llama31_chat_template() -> str:
    return CHAT_TEMPLATE_FILE.read_text(encoding="utf-8")


# --- Mllama text model -> Llama -----------------------------------------------------------------

@dataclass
class LlamaLayout:
    """How the Mllama text model maps onto the Llama one."""

    kept_layers: list[int]  # Mllama layer index of each Llama layer, in order
    dropped_layers: list[int]  # the cross-attention layers
    embedding_rows: int  # rows of the source embedding
    vocab_size: int  # rows kept (= the head's)


def llama_layout(text_config, embedding_rows: int) -> LlamaLayout:
    cross = MLLAMA.skipped_layers(text_config)
    kept = [i for i in range(text_config.num_hidden_layers) if i not in cross]
    return LlamaLayout(kept, cross, embedding_rows, text_config.vocab_size)


def llama_weights(state: dict, text_config) -> tuple[dict, LlamaLayout]:
    """The merged text model's weights under `LlamaForCausalLM` names (tensors are views).

    * `model.layers.N.*` of a cross-attention layer is dropped; the self-attention layers keep
      their weights (the same names in both classes) and are renumbered 0, 1, ...
    * The embedding is cut to the head's rows. Mllama's has 8 more (`vocab_size + 8`): id 128256 is
      `<|image|>`, which marks where an image's cross-attention goes and means nothing without
      it, and the other 7 are never produced by the tokenizer. The head predicts only the first
      128,256 ids, so no text input or output uses the extra rows; trimming gives the shape every
      Llama 3.1 tool expects (llama.cpp requires the embedding and the output to have one row per
      vocabulary entry, and its converter refuses token ids past config.vocab_size), and the
      exported tokenizer drops `<|image|>` to match.

    Raises:
        ModelError: A weight that is neither (the base is not the architecture described).
    """
    embedding = state["model.embed_tokens.weight"]
    layout = llama_layout(text_config, embedding.shape[0])
    if layout.embedding_rows < layout.vocab_size:
        raise ModelError(f"the embedding has {layout.embedding_rows} rows, fewer than the "
                         f"vocabulary's {layout.vocab_size}")
    renumber = {old: new for new, old in enumerate(layout.kept_layers)}
    dropped = set(layout.dropped_layers)
    out = {}
    for name, tensor in state.items():
        if name == "model.embed_tokens.weight":
            out[name] = tensor[:layout.vocab_size]
        elif name in ("model.norm.weight", "lm_head.weight"):
            out[name] = tensor
        elif name.startswith("model.layers."):
            index, rest = name[len("model.layers."):].split(".", 1)
            if int(index) in dropped:
                continue
            if int(index) not in renumber:
                raise ModelError(f"{name}: layer {index} is past the config's "
                                 f"{text_config.num_hidden_layers} layers")
            out[f"model.layers.{renumber[int(index)]}.{rest}"] = tensor
        else:
            raise ModelError(f"unexpected weight {name} in the text model; --text-only knows "
                             "Llama 3.2 Vision and Llama checkpoints")
    if getattr(text_config, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)
    return out, layout


def llama_config(text_config, layout: LlamaLayout, dtype: str) -> dict:
    """config.json of the Llama model, in Meta's Llama 3.1 format: `rope_theta` and `rope_scaling`
    (not transformers 5's `rope_parameters`), so transformers 4 and 5, vLLM and llama.cpp's
    converter all read the llama3 rope scaling from it."""
    rope = dict(getattr(text_config, "rope_parameters", None)
                or getattr(text_config, "rope_scaling", None) or {})
    theta = rope.pop("rope_theta", getattr(text_config, "rope_theta", 500000.0))
    head_dim = text_config.hidden_size // text_config.num_attention_heads
    config = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": LLAMA3_BOS_ID,
        "eos_token_id": list(LLAMA3_STOP_IDS),
        "hidden_act": getattr(text_config, "hidden_act", "silu"),
        "hidden_size": text_config.hidden_size,
        "initializer_range": getattr(text_config, "initializer_range", 0.02),
        "intermediate_size": text_config.intermediate_size,
        "max_position_embeddings": text_config.max_position_embeddings,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": text_config.num_attention_heads,
        "num_hidden_layers": len(layout.kept_layers),
        "num_key_value_heads": text_config.num_key_value_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": text_config.rms_norm_eps,
        "rope_scaling": (rope if rope.get("rope_type", "default") != "default" else None),
        "rope_theta": theta,
        "tie_word_embeddings": bool(getattr(text_config, "tie_word_embeddings", False)),
        "torch_dtype": DTYPES[dtype],
        "use_cache": True,
        "vocab_size": layout.vocab_size,
    }
    if head_dim * text_config.num_attention_heads != text_config.hidden_size:
        raise ModelError("hidden_size is not a multiple of num_attention_heads")
    if getattr(text_config, "pad_token_id", None) is not None:
        config["pad_token_id"] = text_config.pad_token_id
    return config


def check_llama_names(weights: dict, config: dict) -> None:
    """The weights are exactly what `LlamaForCausalLM(config)` has, name for name and shape for
    shape (built on the meta device: no memory)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):  # a deep copy: LlamaConfig rewrites the rope dict it is given
        model = LlamaForCausalLM(LlamaConfig(**copy.deepcopy(config)))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config["tie_word_embeddings"]:
        expected.pop("lm_head.weight", None)
    got = {k: tuple(v.shape) for k, v in weights.items()}
    if got != expected:
        missing = sorted(set(expected) - set(got))[:2]
        extra = sorted(set(got) - set(expected))[:2]
        shapes = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])[:2]
        raise ModelError(f"the converted weights do not fit LlamaForCausalLM (missing {missing}, "
                         f"extra {extra}, other shape {shapes})")


# --- writing the folder -----------------------------------------------------------------------

def write_safetensors(folder: Path, weights: dict) -> list[str]:
    """Shards of at most SHARD_BYTES with transformers' names and index; returns the file names."""
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for name, tensor in weights.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    if current:
        shards.append(current)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for file, shard in zip(names, shards):
        # One shard at a time on the CPU, each tensor with its own storage.
        save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in shard.items()},
                  str(folder / file), metadata={"format": "pt"})
        for k, v in shard.items():
            weight_map[k] = file
            total += v.numel() * v.element_size()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n",
                                                              encoding="utf-8")
    return names


def write_tokenizer(folder: Path, base_model: str, vocab_size: int, max_length: int,
                    chat_template: str) -> None:
    """The base's tokenizer without the ids the model no longer has (`<|image|>`), in the Hub's
    format (`PreTrainedTokenizerFast`, as Meta's Llama 3.1 repos ship it), with `<|eot_id|>` as
    the end-of-sequence token and the chat template in tokenizer_config.json.

    transformers 5's save_pretrained would write `tokenizer_class: TokenizersBackend`, which
    transformers 4 (what many vLLM releases run on) cannot load; this format loads on both.
    """
    data = json.loads(load_tokenizer(base_model).tokenizer.to_str())
    added = [t for t in data.get("added_tokens", []) if t["id"] < vocab_size]
    data["added_tokens"] = added
    vocab = data.get("model", {}).get("vocab", {})
    if isinstance(vocab, dict) and any(i >= vocab_size for i in vocab.values()):
        data["model"]["vocab"] = {k: i for k, i in vocab.items() if i < vocab_size}
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False) + "\n",
                                           encoding="utf-8")
    contents = {t["content"] for t in added}
    for needed in (BOS, EOT):
        if needed not in contents:
            raise ModelError(f"the base's tokenizer has no {needed}; --text-only needs a Llama 3 "
                             "tokenizer")
    special = {"bos_token": BOS, "eos_token": EOT}
    if PAD in contents:
        special["pad_token"] = PAD
    config = {
        "added_tokens_decoder": {
            str(t["id"]): {"content": t["content"], "lstrip": t.get("lstrip", False),
                           "normalized": t.get("normalized", False),
                           "rstrip": t.get("rstrip", False),
                           "single_word": t.get("single_word", False),
                           "special": t.get("special", True)} for t in added},
        **special,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": True,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (folder / "tokenizer_config.json").write_text(
        json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n",
                                                    encoding="utf-8")


def write_generation_config(folder: Path, base_path: str) -> None:
    """The base's generation settings (sampling defaults, if any), stopping at every Llama 3 end
    token, <|eot_id|> included."""
    from transformers import GenerationConfig

    try:
        base = GenerationConfig.from_pretrained(base_path).to_diff_dict()
    except Exception:  # the base has none
        base = {}
    base.pop("transformers_version", None)
    eos = base.get("eos_token_id")
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
    base["eos_token_id"] = sorted(set(eos) | set(LLAMA3_STOP_IDS))
    base.setdefault("bos_token_id", LLAMA3_BOS_ID)
    (folder / "generation_config.json").write_text(json.dumps(base, indent=2) + "\n",
                                                   encoding="utf-8")


def check_rotary(model, reference_inv_freq) -> None:
    """The reloaded model's rotary frequencies are the Mllama model's (llama3 scaling read)."""
    import torch

    inv_freq = model.model.rotary_emb.inv_freq.float().cpu()
    if not torch.allclose(inv_freq, reference_inv_freq, rtol=1e-6, atol=0):
        raise ModelError("the Llama checkpoint reloads with other rotary frequencies than the "
                         "Mllama model (rope scaling lost); nothing was written")




# --- the export -------------------------------------------------------------------------------

@dataclass
class _Converted:
    """The merged text model as a Llama: weights (views), config.json, and what was done."""

    weights: dict
    config: dict
    layout: LlamaLayout

    @property
    def params(self) -> int:
        return sum(t.numel() for t in self.weights.values())


def convert(state: dict, text_config, dtype: str) -> _Converted:
    weights, layout = llama_weights(state, text_config)
    config = llama_config(text_config, layout, dtype)
    check_llama_names(weights, config)
    return _Converted(weights, config, layout)


def export_llama(source: ExportSource, targets: Targets, *, dtype: str, gguf_type: str,
                 check: bool, emit) -> ExportResult:
    """Merges the run's adapter into the Mllama language model, writes it into the --out
    folder as a Llama (and the --gguf file), and checks both against the merged model."""
    folder, gguf = targets.folder, targets.gguf
    source.refuse_text_only()
    _check_room(source, folder, gguf, dtype, gguf_type, emit)
    clock = _Clock()
    merged = merge(source, dtype, with_vision=False, check=check)
    clock.lap("merge_s")
    llama = convert(merged.model.state_dict(), source.text_config, dtype)
    files = _write_folder(source, folder, llama)
    clock.lap("write_llama_s")
    if gguf is not None:
        write_gguf_target(gguf, llama.weights, _llama_config(llama.config), folder.staging,
                          inv_freq=merged.inv_freq, gguf_type=gguf_type,
                          base_name=source.base_name, hub_id=source.hub_id, emit=emit)
        clock.lap("write_gguf_s")
    write_llama_card(folder.staging, source, llama.layout.vocab_size,
                     gguf.path.name if gguf is not None else None)
    result = ExportResult(folder.path, "llama", details={
        "layers": len(llama.layout.kept_layers),
        "dropped_cross_attention_layers": llama.layout.dropped_layers,
        "vocab_rows": [llama.layout.embedding_rows, llama.layout.vocab_size],
        "params": llama.params, "shards": files, "timings_s": clock.timings})
    merged.model = llama = None  # the reloads below need its memory
    got = _verify_llama(folder, gguf, merged, dtype, gguf_type, emit, result, clock) \
        if check else None
    if gguf is not None:
        result.gguf = gguf_summary(gguf, gguf_type, got, merged.noise, merged.unmerged)
    return result


class _Clock:
    def __init__(self):
        self.timings: dict[str, float] = {}
        self.start = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self.start, 2)
        self.start = now


def _check_room(source: ExportSource, folder: Target, gguf: Target | None, dtype: str,
                gguf_type: str, emit) -> None:
    """The conversion on the meta device (names and shapes only) gives the sizes to check."""
    llama = convert(source.meta_text_weights(), source.text_config, dtype)
    folder_bytes = llama.params * (4 if dtype == "fp32" else 2)
    needs = [(folder, folder_bytes)]
    if gguf is not None:
        needs.append((gguf, gguf_bytes(llama.weights, gguf_type)))
    layout = llama.layout
    emit(Status(f"Llama model: {len(layout.kept_layers)} decoder layers (cross-attention layers "
                f"{layout.dropped_layers} dropped), {llama.params / 1e9:.2f}B parameters, "
                f"vocabulary {layout.embedding_rows} -> {layout.vocab_size} rows; needs about "
                f"{format_size(sum(n for _, n in needs))} on disk"))
    check_room(needs, "the export")


def _write_folder(source: ExportSource, folder: Target, llama: _Converted) -> list[str]:
    staging = folder.staging
    (staging / "config.json").write_text(json.dumps(llama.config, indent=2) + "\n",
                                         encoding="utf-8")
    files = write_safetensors(staging, llama.weights)
    write_generation_config(staging, source.base_path)
    write_tokenizer(staging, source.base_path, llama.layout.vocab_size,
                    llama.config["max_position_embeddings"], llama31_chat_template())
    return files


def _llama_config(config: dict):
    from transformers import LlamaConfig

    return LlamaConfig(**copy.deepcopy(config))  # LlamaConfig rewrites the rope dict it is given


def _verify_llama(folder: Target, gguf: Target | None, merged: Merged, dtype: str,
                  gguf_type: str, emit, result: ExportResult, clock: _Clock) -> Check | None:
    """Reloads the folder (and the GGUF): fills `result`, returns the GGUF's check."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    result.note_drift(merged.drift)
    emit(Status("Checking the export: reloading the Llama folder with plain transformers"))

    def reload():
        model = AutoModelForCausalLM.from_pretrained(
            str(folder.staging), dtype=getattr(torch, DTYPES[dtype]),
            device_map={"": merged.probe.device}, trust_remote_code=False)
        if not isinstance(model, LlamaForCausalLM):
            raise ModelError(f"the folder reloads as {type(model).__name__}, not "
                             "LlamaForCausalLM")
        check_rotary(model, merged.inv_freq)
        return model

    check = verify("the Llama checkpoint", reload, merged.expected, merged.probe,
                   share=TOLERANCE[dtype])
    result.max_logit_diff, result.tolerance = check.max_logit_diff, check.tolerance
    result.logit_scale = check.logit_scale
    result.details["adapter_diff"] = logit_diff(merged.unmerged, check.logits)[0]
    clock.lap("verify_llama_s")
    if gguf is None:
        return None
    config = json.loads((folder.staging / "config.json").read_text(encoding="utf-8"))
    got = verify_gguf(gguf, llama_shape(_llama_config(config)), folder.staging, merged.expected,
                      merged.probe, gguf_type=gguf_type, dtype=dtype, noise=merged.noise,
                      emit=emit)
    clock.lap("verify_gguf_s")
    return got
