"""A Llama-architecture export as one GGUF file (llama.cpp, Ollama), and its check.

Written through the `gguf` package (gguf-py) the way llama.cpp's `convert_hf_to_gguf.py` writes a
Llama: tensor names from gguf-py's map, Q and K permuted for llama.cpp's rotary layout, llama3
rope scaling as the `rope_freqs.weight` tensor, 1-D tensors in f32 and the rest in f16 or Q8_0,
and the vocabulary as `gpt2` BPE with the pre-tokenizer llama.cpp splits text with. The merges,
special ids, add-BOS flag and chat template come through gguf-py's `SpecialVocab` reading the
exported folder, as the converter reads it.

The file is checked by reading it back: its metadata and vocabulary with gguf-py (what llama.cpp
reads), the chat template rendering the probe prompt to the ids training used, and its weights
through transformers' GGUF loader, whose logits on the probe prompt must match the merged model's.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from llamalora.errors import MissingExtraError, ModelError, UsageError
from llamalora.events import Status
from llamalora.export.target import Target
from llamalora.export.verify import (DTYPES, PROBE_QUESTION, TOLERANCE, Check, Probe, logit_diff,
                                     verify)
from llamalora.template import ChatTemplate, render_segments

GGUF_TYPES = ("f16", "q8_0")
GGUF_HINT = "pip install 'gguf>=0.19'"  # a core dependency: missing only if removed
# Max |logit difference| of the GGUF, relative to the largest |logit|. f16 holds bf16 and fp16
# weights exactly (fp32 ones round to 11 bits, hence at least fp16's tolerance). Q8_0 rounds each
# weight to a step of 1/127 of its block's largest, which moves a tiny model's probe logits by a
# few percent of the largest; 15% leaves room for a deeper model (benchmarks/gpu_export_check.sh
# q8 measures the 11B's), while a wrong tensor layout moves the logits by about as much as they are.
GGUF_Q8_TOLERANCE = 0.15
# f16 holds no bf16 value below 6e-5 exactly (those become subnormals, off by up to 3e-8), so an
# f16 GGUF is not bit for bit the bf16 folder; in a deep bf16 model such a change can move the
# logits by as much as any change of summation order does, past bf16's 2%. That noise is measured
# on the spot: the merged model's logits with attention through SDPA's math kernel against its
# default one (BENCHMARKS.md, "export-adapter --merge --text-only --gguf on the full-size 11B").
GGUF_NOISE_FACTOR = 2.0
METADATA_BYTES = 8 * 2**20  # the vocabulary and merges: ~5 MiB for Llama 3's 128k tokens

# llama.cpp's name for each BPE pre-tokenizer it can reproduce, by the pre_tokenizer steps of
# tokenizer.json. llama.cpp's converter tells them apart by hashing the ids a test text
# tokenizes to (get_vocab_base_pre), which knows only the vocabularies it lists; the split is
# what llama.cpp re-implements (llama-vocab.cpp), so it is matched here, and any vocabulary
# trained with it converts.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}"
                 r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {
    (("Split", _LLAMA3_SPLIT, "Isolated", False), ("ByteLevel", False, False)): "llama-bpe",
    (("ByteLevel", True, False),): "gpt-2",  # GPT-2's regex on bytes
    (("Digits", True), ("ByteLevel", True, False)): "smollm",  # the same, digits one by one
}


def check_gguf_type(gguf_type: str) -> None:
    if gguf_type not in GGUF_TYPES:
        raise UsageError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")


def require_gguf():
    """The `gguf` module, or MissingExtraError naming how to install it."""
    try:
        import gguf
    except ImportError as exc:
        raise MissingExtraError(f"--gguf needs the gguf package: {GGUF_HINT}") from exc
    return gguf


def gguf_share(gguf_type: str, dtype: str) -> float:
    """The share of the largest logit a GGUF's logits may differ by; `verify_gguf` allows
    GGUF_NOISE_FACTOR times the model's rounding noise where that is more."""
    return GGUF_Q8_TOLERANCE if gguf_type == "q8_0" else max(TOLERANCE[dtype], TOLERANCE["fp16"])


# --- what llama.cpp needs to know of the model ----------------------------------------------

@dataclass(frozen=True)
class LlamaShape:
    """The hyperparameters a llama GGUF carries, read from a transformers Llama config."""

    layers: int
    context: int
    hidden: int
    feed_forward: int
    heads: int
    kv_heads: int
    rope_theta: float
    rope: dict  # rope_parameters less rope_theta (llama3 scaling, or rope_type "default")
    rms_eps: float
    vocab_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def llama_shape(config) -> LlamaShape:
    """Raises ModelError for a config llama.cpp's llama architecture can't hold."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    theta = rope.pop("rope_theta", getattr(config, "rope_theta", 10000.0))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        raise ModelError("the GGUF's llama architecture needs hidden_size = heads x head_dim")
    return LlamaShape(config.num_hidden_layers, config.max_position_embeddings,
                      config.hidden_size, config.intermediate_size, config.num_attention_heads,
                      config.num_key_value_heads, float(theta), rope, config.rms_norm_eps,
                      config.vocab_size)


def rope_factors(shape: LlamaShape):
    """llama.cpp's `rope_freqs.weight` for llama3 rope scaling: each frequency's divisor, as
    convert_hf_to_gguf.py computes it; None without llama3 scaling."""
    import torch

    rope = shape.rope
    if str(rope.get("rope_type", rope.get("type", ""))).lower() != "llama3":
        return None
    dim = shape.head_dim
    freqs = 1.0 / (shape.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def check_rope_factors(shape: LlamaShape, reference_inv_freq) -> None:
    """llama.cpp divides the plain rotary frequencies by rope_freqs.weight: the result must be
    the merged model's own rotary frequencies."""
    import torch

    factors = rope_factors(shape)
    dim = shape.head_dim
    base = 1.0 / (shape.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if factors is not None:
        base = base / factors
    if not torch.allclose(base, reference_inv_freq, rtol=1e-5, atol=0):
        raise ModelError("the GGUF's rope settings would not give the model's rotary "
                         "frequencies")


# --- the vocabulary -------------------------------------------------------------------------

def pre_tokenizer_name(data: dict) -> str:
    """llama.cpp's name for how tokenizer.json `data` splits text (see _PRE_TOKENIZERS).

    Raises:
        ModelError: A tokenizer llama.cpp would split differently.
    """
    model = data.get("model", {})
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    name = _PRE_TOKENIZERS.get(tuple(_step(s) for s in steps))
    if (name is None or data.get("normalizer") is not None or model.get("type") != "BPE"
            or model.get("byte_fallback")):
        raise ModelError("the tokenizer is not a byte-level BPE that llama.cpp splits the same "
                         "way (Llama 3's, GPT-2's or SmolLM's pre-tokenizer, no normalizer), so "
                         "no GGUF was written")
    return name


def _step(step: dict) -> tuple:
    kind = step.get("type")
    if kind == "ByteLevel":
        return (kind, bool(step.get("use_regex", True)), bool(step.get("add_prefix_space")))
    if kind == "Split":
        return (kind, step.get("pattern", {}).get("Regex"), step.get("behavior"),
                bool(step.get("invert")))
    if kind == "Digits":
        return (kind, bool(step.get("individual_digits")))
    return (kind,)


def gguf_vocab(folder: Path, vocab_size: int):
    """(tokens, token types, pre-tokenizer, adds BOS) from the folder's tokenizer.json, as
    convert_hf_to_gguf.py derives them for a GPT-2 style BPE vocabulary (get_vocab_base): every
    id below vocab_size, added special tokens as control tokens, missing ids as [PADn]."""
    import gguf
    from tokenizers import Tokenizer

    text = (folder / "tokenizer.json").read_text(encoding="utf-8")
    data = json.loads(text)
    pre = pre_tokenizer_name(data)
    by_id = {i: t for t, i in data["model"]["vocab"].items()}
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else
                         gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    # Whether the tokenizer itself puts BOS first (Llama 3 does, SmolLM2 does not: its chat
    # template writes every special token); llama.cpp otherwise guesses from the vocabulary.
    tokenizer = Tokenizer.from_str(text)
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    marked = tokenizer.encode("a", add_special_tokens=True).ids
    adds_bos = len(marked) > len(plain) and marked[0] in added
    return tokens, types, pre, adds_bos


# --- writing --------------------------------------------------------------------------------

def permute_rotary(weight, n_head: int):
    # HF keeps each head's rotary pairs in two halves; llama.cpp interleaves them
    # (convert_hf_to_gguf.py, LlamaModel.permute).
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_plan(weights: dict, shape: LlamaShape) -> list[tuple[str, str | None]]:
    """(gguf name, HF name) in file order; rope_freqs first (HF name None), as llama.cpp's
    converter writes them."""
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, shape.layers)
    plan = []
    if rope_factors(shape) is not None:
        plan.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", None))
    for name in weights:
        new = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ModelError(f"gguf-py has no llama name for {name}")
        plan.append((new, name))
    return plan


def gguf_tensor(weights: dict, shape: LlamaShape, name: str | None):
    """The tensor written for HF weight `name` (None: the rope factors), Q and K permuted."""
    if name is None:
        return rope_factors(shape)
    tensor = weights[name]
    if name.endswith("q_proj.weight"):
        tensor = permute_rotary(tensor, shape.heads)
    elif name.endswith("k_proj.weight"):
        tensor = permute_rotary(tensor, shape.kv_heads)
    return tensor


def quantize_q8_0(tensor):
    """gguf.quants.quantize(x, Q8_0), bit for bit (ggml's reference rounding), computed by torch
    on the tensor's device: gguf-py's numpy runs on one core, minutes for an 8B model.

    Each block of 32 weights along a row becomes an f16 scale (its largest |weight| / 127) and 32
    int8s, rounded half away from zero.
    """
    import torch

    x = tensor.to(torch.float32).reshape(-1, 32)
    d = x.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    y = x * inv
    a = y.abs()
    floored = a.floor()
    q = torch.sign(y) * (floored + (2 * (a - floored)).floor())
    blocks = torch.cat([d.to(torch.float16).view(torch.uint8), q.to(torch.int8).view(torch.uint8)],
                       dim=1)
    return blocks.reshape(*tensor.shape[:-1], tensor.shape[-1] // 32 * 34).cpu().numpy()


def _qtype(name: str, ndim: int, gguf_type: str):
    import gguf

    T = gguf.GGMLQuantizationType
    if ndim <= 1 or name.endswith("_norm.weight"):
        return T.F32
    return T.Q8_0 if gguf_type == "q8_0" else T.F16


def _nbytes(shape, qtype) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


def gguf_bytes(weights: dict, gguf_type: str) -> int:
    """The GGUF's size, for the disk check (weights may be on the meta device)."""
    total = sum(_nbytes(tuple(t.shape), _qtype(n, t.dim(), gguf_type))
                for n, t in weights.items())
    return total + METADATA_BYTES


def gguf_weights(state: dict, config) -> dict:
    """A Llama's weights as the GGUF holds them: a head tied to the embedding is not stored
    (llama.cpp then reads the embedding as the output)."""
    if getattr(config, "tie_word_embeddings", False):
        return {k: v for k, v in state.items() if k != "lm_head.weight"}
    return dict(state)


def write_gguf_target(target: Target, weights: dict, config, folder: Path, *, inv_freq,
                      gguf_type: str, base_name: str, hub_id: str | None, emit) -> LlamaShape:
    """Writes the GGUF of a Llama model (`config`, its `weights`, the tokenizer in `folder`)
    into the target's staging path; `inv_freq`: the model's rotary frequencies, which the GGUF's
    rope settings must give."""
    shape = llama_shape(config)
    check_rope_factors(shape, inv_freq)
    emit(Status(f"Writing the GGUF ({gguf_type}) to {target.path}"))
    name = f"{base_name.rstrip('/').rsplit('/', 1)[-1] or 'llama'} + LoRA (llamalora)"
    write_gguf(target.staging, weights, shape, folder, gguf_type, name, hub_id)
    return shape


def gguf_summary(target: Target, gguf_type: str, check: Check | None, noise: float | None,
                 unmerged) -> dict:
    """ExportResult.gguf: where it went, its type and size, and how it matched (also against
    the `unmerged` model + adapter's logits)."""
    out = {"path": str(target.path), "type": gguf_type, "bytes": target.staging.stat().st_size}
    if check is not None:
        out.update(max_logit_diff=check.max_logit_diff, tolerance=check.tolerance, noise=noise,
                   adapter_diff=logit_diff(unmerged, check.logits)[0])
    return out


def write_gguf(path: Path, weights: dict, shape: LlamaShape, folder: Path, gguf_type: str,
               name: str, hub_id: str | None) -> None:
    """Writes a llama GGUF (one file) from HF-named `weights`, streaming one tensor at a time;
    the vocabulary comes from the exported `folder`."""
    gguf = require_gguf()
    check_gguf_type(gguf_type)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        _write_metadata(writer, shape, gguf_type, name, hub_id)
        _write_vocab(writer, folder, shape.vocab_size)
        _write_tensors(writer, weights, shape, gguf_type)
    finally:
        writer.close()


def _write_metadata(writer, shape: LlamaShape, gguf_type: str, name: str,
                    hub_id: str | None) -> None:
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    if hub_id:  # only a real repository: a local folder is no URL anyone can open
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, hub_id.split("/")[-1])
        writer.add_base_model_organization(0, hub_id.split("/")[0])
        writer.add_base_model_repo_url(0, f"https://huggingface.co/{hub_id}")
    writer.add_vocab_size(shape.vocab_size)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_feed_forward_length(shape.feed_forward)
    writer.add_block_count(shape.layers)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if gguf_type == "q8_0"
                         else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_vocab(writer, folder: Path, vocab_size: int) -> None:
    import gguf

    tokens, types, pre, adds_bos = gguf_vocab(folder, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # gguf-py warns that Llama 3's template for a pair of sequences has an unknown separator:
    # a GGUF has no use for pairs, and the line would read as a problem with this export.
    quiet = logging.getLogger("gguf.vocab")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    finally:
        quiet.setLevel(level)
    if not special.merges:
        raise ModelError("the exported tokenizer has no BPE merges")
    if not special.chat_template:
        raise ModelError("the exported tokenizer has no chat template")
    special.add_special_token["bos"] = adds_bos
    special.add_to_gguf(writer, quiet=True)


def _write_tensors(writer, weights: dict, shape: LlamaShape, gguf_type: str) -> None:
    import numpy as np
    import torch

    import gguf

    T = gguf.GGMLQuantizationType
    plan = []
    for gguf_name, hf_name in gguf_plan(weights, shape):
        dims = (tuple(weights[hf_name].shape) if hf_name is not None else (shape.head_dim // 2,))
        qtype = _qtype(gguf_name, len(dims), gguf_type)
        dtype = np.float16 if qtype == T.F16 else np.float32
        writer.add_tensor_info(gguf_name, dims, np.dtype(dtype), _nbytes(dims, qtype),
                               raw_dtype=qtype)
        plan.append((hf_name, qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for hf_name, qtype in plan:
        with torch.no_grad():
            tensor = gguf_tensor(weights, shape, hf_name).detach()
            if qtype == T.F16:  # the same rounding as numpy's astype, done on the device
                data = tensor.to(torch.float16).cpu().numpy()
            elif qtype == T.Q8_0:
                data = quantize_q8_0(tensor)
            else:
                data = tensor.to(torch.float32).cpu().numpy()
        writer.write_tensor_data(data)
        del tensor, data


# --- checking -------------------------------------------------------------------------------

def check_gguf_file(path: Path, shape: LlamaShape, folder: Path, probe: Probe) -> None:
    """What llama.cpp reads besides the weights, read back with gguf-py: the shape metadata, the
    rope factors, a vocabulary equal to the folder's tokenizer.json (every token at its id,
    control tokens marked, the merges in order, the special ids), and a chat template that
    renders the probe prompt to the ids training gave it.

    gguf-py reads what llama.cpp reads; transformers' tokenizer built from a GGUF is a rebuild
    whose pre-tokenizer handling has changed across 5.x releases, so it is no judge of the file.
    """
    gguf = require_gguf()
    reader = gguf.GGUFReader(str(path))

    def value(key: str, required: bool = True):
        found = reader.get_field(key)
        if found is None and required:
            raise ModelError(f"the GGUF has no {key}")
        return found.contents() if found is not None else None

    _check_shape(value, shape)
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    tokens = value("tokenizer.ggml.tokens")
    want, types, pre, _ = gguf_vocab(folder, shape.vocab_size)
    if tokens != want or value("tokenizer.ggml.pre") != pre:
        raise ModelError("the GGUF's token list is not the tokenizer's")
    control = {t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    got_types = value("tokenizer.ggml.token_type")
    if {i for i, t in enumerate(got_types) if t == gguf.TokenType.CONTROL} != control:
        raise ModelError("the GGUF marks other tokens as control tokens than the tokenizer")
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    if value("tokenizer.ggml.merges") != merges:
        raise ModelError("the GGUF's BPE merges are not the tokenizer's")
    _check_special_ids(value, folder, data)
    _check_template(value, tokens, data, probe)
    factors = rope_factors(shape)
    stored = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if (factors is None) != (stored is None) or (
            factors is not None and not (stored.data == factors.numpy()).all()):
        raise ModelError("the GGUF's rope_freqs.weight is not the llama3 rope scaling")


def _check_shape(value, shape: LlamaShape) -> None:
    want = {"llama.block_count": shape.layers, "llama.context_length": shape.context,
            "llama.embedding_length": shape.hidden,
            "llama.feed_forward_length": shape.feed_forward,
            "llama.attention.head_count": shape.heads,
            "llama.attention.head_count_kv": shape.kv_heads,
            "llama.rope.dimension_count": shape.head_dim,
            "llama.rope.freq_base": shape.rope_theta,
            "llama.attention.layer_norm_rms_epsilon": shape.rms_eps,
            "general.architecture": "llama", "tokenizer.ggml.model": "gpt2"}
    for key, expected in want.items():
        got = value(key)
        same = (math.isclose(got, expected, rel_tol=1e-6) if isinstance(expected, float)
                else got == expected)
        if not same:
            raise ModelError(f"the GGUF's {key} is {got!r}, not {expected!r}")


def _check_special_ids(value, folder: Path, data: dict) -> None:
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    ids = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    for key, token in (("bos", "bos_token"), ("eos", "eos_token"), ("padding", "pad_token")):
        content = config.get(token)
        content = content.get("content") if isinstance(content, dict) else content
        if content and value(f"tokenizer.ggml.{key}_token_id") != ids.get(content):
            raise ModelError(f"the GGUF's {key} token is not {content}")


def _check_template(value, tokens: list[str], data: dict, probe: Probe) -> None:
    """The GGUF's chat template, with its own special tokens, renders the probe question to the
    ids training gave it (tokenized by the folder's tokenizer, special tokens parsed)."""
    from tokenizers import Tokenizer

    ids = {key: value(f"tokenizer.ggml.{key}_token_id", required=False) for key in ("bos", "eos")}
    special = [(f"{key}_token", tokens[i]) for key, i in ids.items() if i is not None]
    template = ChatTemplate(value("tokenizer.chat_template"), tuple(special), "the GGUF")
    text = "".join(t for t, _ in render_segments(None, [("user", PROBE_QUESTION)],
                                                 add_generation_prompt=True, template=template))
    ids = Tokenizer.from_str(json.dumps(data)).encode(text, add_special_tokens=False).ids
    if ids != probe.ids:
        raise ModelError("the GGUF's chat template renders a prompt as other tokens than the "
                         "run was trained on")


def verify_gguf(target: Target, shape: LlamaShape, folder: Path, expected, probe: Probe, *,
                gguf_type: str, dtype: str, noise: float, emit) -> Check:
    """Reads the written GGUF back: gguf-py for what llama.cpp reads, transformers' GGUF loader
    for the weights (with the folder's config: that loader reads no llama3 rope scaling, which
    llama.cpp takes from rope_freqs.weight, checked above)."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    import torch

    emit(Status("Checking the export: reloading the GGUF with transformers' GGUF loader"))
    check_gguf_file(target.staging, shape, folder, probe)

    def reload():
        # Its progress bar (tqdm's own, which transformers' switch does not reach) goes to a
        # buffer: the core prints nothing.
        with contextlib.redirect_stderr(io.StringIO()):
            return AutoModelForCausalLM.from_pretrained(
                str(target.staging.parent), gguf_file=target.staging.name,
                config=LlamaConfig.from_pretrained(str(folder)),
                dtype=getattr(torch, DTYPES[dtype]), device_map={"": probe.device},
                trust_remote_code=False)

    return verify(f"the GGUF ({gguf_type})", reload, expected, probe,
                  share=gguf_share(gguf_type, dtype), floor=GGUF_NOISE_FACTOR * noise)
