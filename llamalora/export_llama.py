"""A text-trained run as a plain Llama checkpoint, and as a GGUF file (`--merge --text-only`).

For text input Llama 3.2 Vision (Mllama) skips its cross-attention layers: with no
`cross_attention_states` they are never run. What is left between the embeddings and the head is a
Llama 3.1 8B-shaped decoder, so a text-only run's merged model can be written as a
`LlamaForCausalLM` that transformers, vLLM and llama.cpp's converter all load, and as a GGUF file
that llama.cpp and Ollama run. The conversion:

* drops the cross-attention layers and renumbers the rest (the 11B's 40 layers become 32);
* trims the embedding to the vocabulary the head predicts (see `llama_weights` for why);
* writes `config.json` in Meta's Llama 3.1 format (`rope_theta` + `rope_scaling`), which every
  transformers version and serving stack reads, with the tokenizer in the Hub's format
  (`PreTrainedTokenizerFast`), a Llama 3.1 chat template, and a generation config that stops at
  `<|eot_id|>`;
* writes the GGUF through the `gguf` package the way llama.cpp's `convert_hf_to_gguf.py` writes a
  Llama 3: tensor names from gguf-py's map, Q and K permuted for llama.cpp's rotary layout, the
  llama3 rope scaling as the `rope_freqs.weight` tensor, the vocabulary as `gpt2` BPE with the
  `llama-bpe` pre-tokenizer, 1-D tensors in f32 and the rest in f16 or Q8_0.

Everything written is loaded back the way a user would (transformers for the folder, transformers'
GGUF loader for the file) and its logits on the probe prompt compared with the Mllama model the run
trained; a mismatch fails the export and nothing is left behind.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from llamalora.errors import MissingExtraError, ModelError, UsageError

GGUF_TYPES = ("f16", "q8_0")
GGUF_HINT = "pip install 'gguf>=0.19'"  # a core dependency: missing only if removed
# Max |logit difference| of the GGUF, relative to the largest |logit|. f16 holds bf16 and fp16
# weights exactly (fp32 ones round to 11 bits, hence at least fp16's tolerance). Q8_0 rounds each
# weight to a step of 1/127 of its block's largest: on the probe prompt that moved the tiny
# model's logits by 1.9% (bf16) and 3.3% (fp32) of the largest one, for an adapter with random B;
# 15% leaves room for a deeper model (benchmarks/gpu_export_check.sh q8 measures the 11B's) while
# a wrong tensor layout moves the logits by about as much as they are.
GGUF_Q8_TOLERANCE = 0.15
# f16 holds no bf16 value below 6e-5 exactly (those become subnormals, off by up to 3e-8), so an
# f16 GGUF is not bit for bit the bf16 folder; in a deep bf16 model such a change can move the
# logits by as much as any change of summation order does. That noise is measured on the spot:
# the merged model's logits with attention through SDPA's math kernel against its default one.
# The full-size random 11B's f16 GGUF differed by 0.305 against a largest logit of 6.95 (H200,
# 2026-12-01), above the 2% bf16 tolerance; a wrong tensor layout moves logits by ~100%.
GGUF_NOISE_FACTOR = 2.0
SHARD_BYTES = 5 * 2**30  # safetensors shards of at most 5 GiB, as transformers writes them
# The ids the Llama 3 tokenizer ends a reply with: <|end_of_text|>, <|eom_id|>, <|eot_id|>.
LLAMA3_STOP_IDS = (128001, 128008, 128009)
EOT = "<|eot_id|>"

# Meta's chat template of Llama 3.1 Instruct (tokenizer_config.json of
# meta-llama/Llama-3.1-8B-Instruct, Llama 3.1 Community License), unchanged. It is the text-only
# form of the Llama 3.2 Vision template: a system block with "Cutting Knowledge Date: December
# 2023" and "Today Date: 26 Jul 2024" (a fixed date, where the Vision template asks the clock),
# then the turns. vLLM and transformers render it; llama.cpp runs it with --jinja; Ollama maps it
# to its own "llama3-instruct" template. If the run's record names the template it was trained
# with, pass that instead (`chat_template=`).
LLAMA31_CHAT_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# llama.cpp names a BPE pre-tokenizer by the sha256 of the ids its tokenizer gives this text
# (convert_hf_to_gguf.py, get_vocab_base_pre); this hash is Meta-Llama-3-8B's, "llama-bpe".
_PRE_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
    "sure I'll make it, 'D you like some tea? We'Ve a'lL")
_LLAMA_BPE_HASH = "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5"


def gguf_tolerance(gguf_type: str, dtype: str, scale: float, noise: float) -> float:
    """The largest logit difference a GGUF may show against the merged model: its format's
    share of the largest logit (`scale`), or twice the model's measured rounding `noise` when
    that is more (GGUF_NOISE_FACTOR)."""
    from llamalora.export import TOLERANCE

    share = GGUF_Q8_TOLERANCE if gguf_type == "q8_0" else max(TOLERANCE[dtype],
                                                                TOLERANCE["fp16"])
    return max(share * scale, GGUF_NOISE_FACTOR * noise)


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


# --- Mllama text model -> Llama -----------------------------------------------------------------

@dataclass
class LlamaLayout:
    """How the Mllama text model maps onto the Llama one."""

    kept_layers: list[int]  # Mllama layer index of each Llama layer, in order
    dropped_layers: list[int]  # the cross-attention layers
    embedding_rows: int  # rows of the source embedding
    vocab_size: int  # rows kept (= the head's)


def text_config_of(config):
    """The language model's config: an Mllama's text_config, or a Llama config itself."""
    model_type = getattr(config, "model_type", None)
    if model_type == "mllama":
        return config.text_config
    if model_type in ("mllama_text_model", "llama"):
        return config
    raise ModelError(f"--text-only converts Llama 3.2 Vision (mllama) or Llama models; this base "
                     f"is a {model_type or '?'} model")


def llama_layout(text_config, embedding_rows: int) -> LlamaLayout:
    cross = sorted(set(getattr(text_config, "cross_attention_layers", None) or []))
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
        "bos_token_id": 128000,
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
        "torch_dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype],
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
    from llamalora.tokenizer import load_tokenizer

    data = json.loads(load_tokenizer(base_model).tokenizer.to_str())
    added = [t for t in data.get("added_tokens", []) if t["id"] < vocab_size]
    data["added_tokens"] = added
    vocab = data.get("model", {}).get("vocab", {})
    if isinstance(vocab, dict) and any(i >= vocab_size for i in vocab.values()):
        data["model"]["vocab"] = {k: i for k, i in vocab.items() if i < vocab_size}
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False) + "\n",
                                           encoding="utf-8")
    contents = {t["content"] for t in added}
    for needed in ("<|begin_of_text|>", EOT):
        if needed not in contents:
            raise ModelError(f"the base's tokenizer has no {needed}; --text-only needs a Llama 3 "
                             "tokenizer")
    special = {"bos_token": "<|begin_of_text|>", "eos_token": EOT}
    if "<|finetune_right_pad_id|>" in contents:
        special["pad_token"] = "<|finetune_right_pad_id|>"
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
    base.setdefault("bos_token_id", 128000)
    (folder / "generation_config.json").write_text(json.dumps(base, indent=2) + "\n",
                                                   encoding="utf-8")


def write_model_card(folder: Path, info, gguf_name: str | None) -> None:
    from huggingface_hub import ModelCard, ModelCardData

    run, cfg = info.run, info.run.get("config", {})
    lines = [
        "# Llama model fine-tuned with llamalora", "",
        f"The language model of `{info.base_model}` with a LoRA adapter merged in, written as a "
        "plain `LlamaForCausalLM`: the cross-attention (image) layers, which text input never "
        "runs, are left out, and the vocabulary is the 128,256 ids the head predicts.", "",
        f"- Data: `{cfg.get('data_path', '?')}` (sha256 `{run.get('data_sha256', '?')}`)",
        f"- LoRA: r={cfg.get('lora_rank', '?')}, alpha={cfg.get('lora_alpha', '?')}, "
        f"modules={cfg.get('target_modules', '?')}",
        f"- Final train loss: {run.get('final_train_loss')}; eval loss: "
        f"{run.get('final_eval_loss')}", "",
        "## Run it", "", "```bash", "vllm serve <this folder>", "```", "",
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("<this folder>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this folder>")  # has the chat template',
        "```"]
    if gguf_name:
        lines += ["", f"`{gguf_name}`, the GGUF written with it, runs in llama.cpp "
                  f"(`llama-cli -m {gguf_name}`) and Ollama (`FROM ./{gguf_name}` in a Modelfile)."]
    data = ModelCardData(library_name="transformers", base_model=info.base_model,
                         tags=["lora", "llamalora", "llama"], pipeline_tag="text-generation")
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n").save(folder / "README.md")


# --- GGUF ---------------------------------------------------------------------------------------

def _gguf_tokenizer(folder: Path):
    """tokens, token types and pre-tokenizer name, as convert_hf_to_gguf.py derives them for a
    GPT-2 style BPE vocabulary (get_vocab_base)."""
    import gguf
    from hashlib import sha256
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if sha256(str(tokenizer.encode(_PRE_CHECK_TEXT)).encode()).hexdigest() != _LLAMA_BPE_HASH:
        raise ModelError("the tokenizer splits text differently from Llama 3's; llama.cpp would "
                         "not know its pre-tokenizer, so no GGUF was written")
    vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else
                         gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types, "llama-bpe"


def rope_factors(config: dict):
    """llama.cpp's `rope_freqs.weight` for llama3 rope scaling: each frequency's divisor, as
    convert_hf_to_gguf.py computes it; None without llama3 scaling."""
    import torch

    rope = config.get("rope_scaling") or {}
    if str(rope.get("rope_type", rope.get("type", ""))).lower() != "llama3":
        return None
    dim = config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / (config["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
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


def _permute_rotary(weight, n_head: int):
    # HF keeps each head's rotary pairs in two halves; llama.cpp interleaves them
    # (convert_hf_to_gguf.py, LlamaModel.permute).
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_plan(weights: dict, config: dict) -> list[tuple[str, str | None]]:
    """(gguf name, HF name) in file order; rope_freqs first (HF name None), as llama.cpp's
    converter writes them."""
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    plan = []
    if rope_factors(config) is not None:
        plan.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", None))
    for name in weights:
        new = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ModelError(f"gguf-py has no llama name for {name}")
        plan.append((new, name))
    return plan


def gguf_tensor(weights: dict, config: dict, name: str | None):
    """The tensor written for HF weight `name` (None: the rope factors), Q and K permuted."""
    if name is None:
        return rope_factors(config)
    tensor = weights[name]
    if name.endswith("q_proj.weight"):
        tensor = _permute_rotary(tensor, config["num_attention_heads"])
    elif name.endswith("k_proj.weight"):
        tensor = _permute_rotary(tensor, config["num_key_value_heads"])
    return tensor


def quantize_q8_0(tensor):
    """gguf.quants.quantize(x, Q8_0), bit for bit (ggml's reference rounding), computed by torch
    on the tensor's device: gguf-py's numpy takes ~4 minutes for 8B parameters on one core.

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


def _gguf_qtype(name: str, ndim: int, gguf_type: str):
    import gguf

    T = gguf.GGMLQuantizationType
    if ndim <= 1 or name.endswith("_norm.weight"):
        return T.F32
    return T.Q8_0 if gguf_type == "q8_0" else T.F16


def _gguf_nbytes(shape, qtype) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = math.prod(shape)
    return n // block * size


def gguf_bytes(weights: dict, config: dict, gguf_type: str) -> int:
    """The GGUF's tensor data size (for the disk check)."""
    total = 0
    for name, tensor in weights.items():
        qtype = _gguf_qtype(name, tensor.dim(), gguf_type)
        total += _gguf_nbytes(tuple(tensor.shape), qtype)
    return total + 8 * 2**20  # metadata: the vocabulary and merges take ~5 MiB


def write_gguf(path: Path, weights: dict, config: dict, tokenizer_folder: Path, gguf_type: str,
               name: str) -> None:
    """Writes a llama GGUF (one file), streaming one tensor at a time.

    The metadata is what convert_hf_to_gguf.py writes for a Llama 3.1 folder; the tokenizer's
    merges, special ids, add-BOS flag and chat template come through gguf-py's SpecialVocab
    reading the exported folder, as the converter reads it.
    """
    import numpy as np
    import torch

    gguf = require_gguf()
    check_gguf_type(gguf_type)
    T = gguf.GGMLQuantizationType
    tokens, types, pre = _gguf_tokenizer(tokenizer_folder)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_vocab_size(config["vocab_size"])
        writer.add_context_length(config["max_position_embeddings"])
        writer.add_embedding_length(config["hidden_size"])
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_block_count(config["num_hidden_layers"])
        writer.add_head_count(config["num_attention_heads"])
        writer.add_head_count_kv(config["num_key_value_heads"])
        writer.add_rope_freq_base(config["rope_theta"])
        writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
        writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if gguf_type == "q8_0"
                             else gguf.LlamaFileType.MOSTLY_F16)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(tokenizer_folder, load_merges=True)
        if not special.merges:
            raise ModelError("the exported tokenizer has no BPE merges")
        special.add_to_gguf(writer, quiet=True)

        plan = []
        for gguf_name, hf_name in gguf_plan(weights, config):
            shape = (tuple(weights[hf_name].shape) if hf_name is not None
                     else (config["hidden_size"] // config["num_attention_heads"] // 2,))
            qtype = _gguf_qtype(gguf_name, len(shape), gguf_type)
            dtype = np.float16 if qtype == T.F16 else np.float32
            writer.add_tensor_info(gguf_name, shape, np.dtype(dtype), _gguf_nbytes(shape, qtype),
                                   raw_dtype=qtype)
            plan.append((hf_name, qtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for hf_name, qtype in plan:
            with torch.no_grad():
                tensor = gguf_tensor(weights, config, hf_name).detach()
                if qtype == T.F16:  # the same rounding as numpy's astype, done on the device
                    data = tensor.to(torch.float16).cpu().numpy()
                elif qtype == T.Q8_0:
                    data = quantize_q8_0(tensor)
                else:
                    data = tensor.to(torch.float32).cpu().numpy()
            writer.write_tensor_data(data)
            del tensor, data
    finally:
        writer.close()


# --- checks -----------------------------------------------------------------------------------

def check_rotary(model, reference_inv_freq) -> None:
    """The reloaded model's rotary frequencies are the Mllama model's (llama3 scaling read)."""
    import torch

    inv_freq = model.model.rotary_emb.inv_freq.float().cpu()
    if not torch.allclose(inv_freq, reference_inv_freq, rtol=1e-6, atol=0):
        raise ModelError("the Llama checkpoint reloads with other rotary frequencies than the "
                         "Mllama model (rope scaling lost); nothing was written")


def check_rope_factors(config: dict, reference_inv_freq) -> None:
    """llama.cpp divides the plain rotary frequencies by rope_freqs.weight: the result must be
    the Mllama model's llama3-scaled frequencies."""
    import torch

    factors = rope_factors(config)
    if factors is None:
        return
    dim = config["hidden_size"] // config["num_attention_heads"]
    base = 1.0 / (config["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if not torch.allclose(base / factors, reference_inv_freq, rtol=1e-5, atol=0):
        raise ModelError("the GGUF's rope factors would not give the model's rotary frequencies")


def check_gguf_file(path: Path, config: dict, folder: Path) -> None:
    """What llama.cpp reads besides the weights, read back with gguf-py: the shape metadata, the
    rope factors, and a vocabulary equal to the folder's tokenizer.json (every token at its id,
    control tokens marked, the merges in order, the special ids, the chat template).

    gguf-py reads what llama.cpp reads; transformers' tokenizer built from a GGUF is a rebuild
    whose pre-tokenizer handling has changed across 5.x releases, so it is no judge of the file.
    """
    gguf = require_gguf()
    reader = gguf.GGUFReader(str(path))

    def value(key: str):
        field = reader.get_field(key)
        if field is None:
            raise ModelError(f"the GGUF has no {key}")
        return field.contents()

    want = {"llama.block_count": config["num_hidden_layers"],
            "llama.context_length": config["max_position_embeddings"],
            "llama.embedding_length": config["hidden_size"],
            "llama.feed_forward_length": config["intermediate_size"],
            "llama.attention.head_count": config["num_attention_heads"],
            "llama.attention.head_count_kv": config["num_key_value_heads"],
            "llama.rope.dimension_count": config["hidden_size"] // config["num_attention_heads"],
            "llama.rope.freq_base": config["rope_theta"],
            "llama.attention.layer_norm_rms_epsilon": config["rms_norm_eps"],
            "general.architecture": "llama", "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": "llama-bpe"}
    for key, expected in want.items():
        got = value(key)
        same = (math.isclose(got, expected, rel_tol=1e-6) if isinstance(expected, float)
                else got == expected)
        if not same:
            raise ModelError(f"the GGUF's {key} is {got!r}, not {expected!r}")

    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    tok_config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    by_id = {i: t for t, i in data["model"]["vocab"].items()}
    added = {t["id"]: t for t in data["added_tokens"]}
    by_id.update({i: t["content"] for i, t in added.items()})
    tokens = value("tokenizer.ggml.tokens")
    if len(tokens) != config["vocab_size"] or any(
            tokens[i] != by_id.get(i, f"[PAD{i}]") for i in range(len(tokens))):
        raise ModelError("the GGUF's token list is not the tokenizer's")
    types = value("tokenizer.ggml.token_type")
    control = {i for i, t in added.items() if t.get("special")}
    if [i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL] != sorted(control):
        raise ModelError("the GGUF marks other tokens as control tokens than the tokenizer")
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    if value("tokenizer.ggml.merges") != merges:
        raise ModelError("the GGUF's BPE merges are not the tokenizer's")
    ids = {t["content"]: i for i, t in added.items()}
    for key, token in (("bos", "bos_token"), ("eos", "eos_token"), ("padding", "pad_token")):
        if tok_config.get(token) and value(f"tokenizer.ggml.{key}_token_id") != ids[
                tok_config[token]]:
            raise ModelError(f"the GGUF's {key} token is not {tok_config[token]}")
    if value("tokenizer.chat_template") != tok_config["chat_template"]:
        raise ModelError("the GGUF's chat template is not the tokenizer's")
    factors = rope_factors(config)
    stored = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if (factors is None) != (stored is None) or (
            factors is not None and not (stored.data == factors.numpy()).all()):
        raise ModelError("the GGUF's rope_freqs.weight is not the llama3 rope scaling")


# --- the export -------------------------------------------------------------------------------

@dataclass
class LlamaExport:
    """What `export_text_llama` wrote and measured (folded into ExportResult by the caller)."""

    max_logit_diff: float | None = None  # Llama folder vs the merged Mllama model
    tolerance: float | None = None
    logit_scale: float | None = None
    merge_diff: float | None = None
    details: dict = field(default_factory=dict)
    gguf: dict | None = None


def gguf_target(gguf_path: str | Path, out: Path, overwrite: bool) -> Path:
    target = Path(gguf_path)
    if target.suffix.lower() != ".gguf":
        raise UsageError(f"--gguf takes a file name ending in .gguf, got {target}")
    if target.is_dir():
        raise UsageError(f"{target} is a folder; --gguf takes a file path")
    if target.exists() and not overwrite and not _inside(target, out):
        from llamalora.errors import OutputExistsError

        raise OutputExistsError(f"{target} exists; pass --overwrite to replace it, or another "
                                "path")
    return target


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().parent == folder.resolve()


def export_text_llama(info, tmp: Path, out: Path, *, dtype: str, verify: bool, emit,
                      gguf_path: Path | None = None, gguf_type: str = "f16",
                      chat_template: str = LLAMA31_CHAT_TEMPLATE) -> LlamaExport:
    """Merges the run's adapter into the language model and writes the Llama folder into `tmp`
    (and the GGUF beside it, or inside it if `gguf_path` is in `out`); checks both.

    The caller renames `tmp` to `out`; the GGUF is renamed into place here only after every check
    passed (a failure leaves no file).
    """
    import torch

    from llamalora.adapters import apply_adapter
    from llamalora.events import Status
    from llamalora.export import DTYPES, TOLERANCE, _diff, _load_base, _probe_logits
    from llamalora.models import resolve_model
    from llamalora.plan import load_model_config
    from llamalora.tokenizer import load_model_tokenizer

    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 2)
        clock = now

    base_path = resolve_model(info.base_model)
    config, _ = load_model_config(base_path)
    text_config = text_config_of(config)
    _refuse_trained_cross_attention(info, text_config)

    base, load_info = _load_base(info, dtype, with_vision=False)
    device = load_info["device"]
    model = apply_adapter(base, info.folder)
    tokenizer, _ = load_model_tokenizer(base_path)
    lap("load_s")
    adapter_logits = _probe_logits(model, tokenizer, device) if verify else None
    merged = model.merge_and_unload()
    expected = _probe_logits(merged, tokenizer, device) if verify else None
    noise = (_diff(expected, _probe_logits(merged, tokenizer, device, math_attention=True))[0]
             if verify and gguf_path is not None else None)  # see GGUF_NOISE_FACTOR
    inner = getattr(merged, "model", merged)
    reference_inv_freq = inner.rotary_emb.inv_freq.detach().float().cpu().clone()
    lap("merge_s")

    weights, layout = llama_weights(merged.state_dict(), text_config)
    cfg = llama_config(text_config, layout, dtype)
    check_llama_names(weights, cfg)
    n_params = sum(t.numel() for t in weights.values())
    folder_bytes = sum(t.numel() * t.element_size() for t in weights.values())
    gguf_file_bytes = gguf_bytes(weights, cfg, gguf_type) if gguf_path is not None else 0
    emit(Status(f"Llama model: {len(layout.kept_layers)} decoder layers (cross-attention layers "
                f"{layout.dropped_layers} dropped), {n_params / 1e9:.2f}B parameters, vocabulary "
                f"{layout.embedding_rows} -> {layout.vocab_size} rows; needs about "
                f"{(folder_bytes + gguf_file_bytes) / 2**30:.2f} GiB on disk"))
    _check_disk(tmp, folder_bytes, gguf_path, gguf_file_bytes)

    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    files = write_safetensors(tmp, weights)
    write_generation_config(tmp, base_path)
    write_tokenizer(tmp, base_path, layout.vocab_size, cfg["max_position_embeddings"],
                    chat_template)
    lap("write_llama_s")

    gguf_tmp = None
    gguf_in_folder = gguf_path is not None and _inside(gguf_path, out)
    if gguf_path is not None:
        emit(Status(f"Writing the GGUF ({gguf_type}) to {gguf_path}"))
        gguf_tmp = (tmp / gguf_path.name if gguf_in_folder
                    else gguf_path.with_name(f".{gguf_path.stem}.tmp.gguf"))  # readers want .gguf
        gguf_tmp.parent.mkdir(parents=True, exist_ok=True)
        name = f"{Path(info.base_model).name or 'llama'} + LoRA (llamalora)"
        check_rope_factors(cfg, reference_inv_freq)
        try:
            write_gguf(gguf_tmp, weights, cfg, tmp, gguf_type, name)
        except BaseException:
            gguf_tmp.unlink(missing_ok=True)
            raise
        lap("write_gguf_s")
    write_model_card(tmp, info, gguf_path.name if gguf_path is not None else None)
    del weights, merged, model, base
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    result = LlamaExport()
    result.details = {"layers": len(layout.kept_layers),
                      "dropped_cross_attention_layers": layout.dropped_layers,
                      "vocab_rows": [layout.embedding_rows, layout.vocab_size],
                      "params": n_params, "shards": files, "timings_s": timings}
    try:
        if verify:
            result.merge_diff, _ = _diff(adapter_logits, expected)
            emit(Status("Checking the export: reloading the Llama folder with plain transformers"))
            from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

            torch_dtype = getattr(torch, DTYPES[dtype])
            reloaded = AutoModelForCausalLM.from_pretrained(
                str(tmp), dtype=torch_dtype, device_map={"": device}, trust_remote_code=False)
            if not isinstance(reloaded, LlamaForCausalLM):
                raise ModelError(f"the folder reloads as {type(reloaded).__name__}, not "
                                 "LlamaForCausalLM")
            check_rotary(reloaded, reference_inv_freq)
            got = _probe_logits(reloaded, tokenizer, device)
            del reloaded
            diff, scale = _diff(expected, got)
            tol = TOLERANCE[dtype] * scale
            result.details["adapter_diff"] = _diff(adapter_logits, got)[0]
            if diff > tol:
                raise ModelError(f"the Llama checkpoint gives different logits (max diff "
                                 f"{diff:.3g} > {tol:.3g}); nothing was written")
            result.max_logit_diff, result.tolerance, result.logit_scale = diff, tol, scale
            lap("verify_llama_s")
            if gguf_tmp is not None:
                emit(Status("Checking the export: reloading the GGUF with transformers' GGUF "
                            "loader"))
                check_gguf_file(gguf_tmp, cfg, tmp)
                # The folder's config: transformers' GGUF loader reads no llama3 rope scaling
                # (llama.cpp takes it from rope_freqs.weight, checked just above).
                from_gguf = AutoModelForCausalLM.from_pretrained(
                    str(gguf_tmp.parent), gguf_file=gguf_tmp.name,
                    config=LlamaConfig.from_pretrained(str(tmp)), dtype=torch_dtype,
                    device_map={"": device}, trust_remote_code=False)
                got = _probe_logits(from_gguf, tokenizer, device)
                del from_gguf
                gdiff, _ = _diff(expected, got)
                gtol = gguf_tolerance(gguf_type, dtype, scale, noise)
                if gdiff > gtol:
                    raise ModelError(f"the GGUF ({gguf_type}) gives different logits (max diff "
                                     f"{gdiff:.3g} > {gtol:.3g}); nothing was written")
                result.gguf = {"max_logit_diff": gdiff, "tolerance": gtol, "noise": noise,
                               "adapter_diff": _diff(adapter_logits, got)[0]}
                lap("verify_gguf_s")
        if gguf_tmp is not None:
            final = out / gguf_path.name if gguf_in_folder else gguf_path
            if not gguf_in_folder:
                gguf_tmp.replace(gguf_path)
            result.gguf = {"path": str(final), "type": gguf_type,
                           "bytes": (gguf_path if not gguf_in_folder else gguf_tmp).stat().st_size,
                           **(result.gguf or {})}
    except BaseException:
        if gguf_tmp is not None and not gguf_in_folder:
            gguf_tmp.unlink(missing_ok=True)
        raise
    return result


def _refuse_trained_cross_attention(info, text_config) -> None:
    """A LoRA weight on a cross-attention layer that moved from zero means images trained it; the
    text-only model would silently lose it."""
    from safetensors import safe_open

    from llamalora.adapters import ADAPTER_WEIGHTS

    cross = set(getattr(text_config, "cross_attention_layers", None) or [])
    if not cross:
        return
    with safe_open(str(info.folder / ADAPTER_WEIGHTS), framework="pt") as f:
        for key in f.keys():
            parts = key.split(".")
            if "lora_B" not in parts or "layers" not in parts:
                continue
            index = parts[parts.index("layers") + 1]
            if index.isdigit() and int(index) in cross and f.get_tensor(key).abs().max() > 0:
                raise UsageError(f"the adapter changed cross-attention layer {index} ({key}): it "
                                 "was trained with images, and a text-only Llama has no "
                                 "cross-attention layers; export it with --merge (the full "
                                 "vision model) instead")


def _check_disk(tmp: Path, folder_bytes: int, gguf_path: Path | None, gguf_bytes_: int) -> None:
    from llamalora.export import check_disk

    places = [(tmp, folder_bytes)]
    if gguf_path is not None:
        places.append((gguf_path.parent if gguf_path.parent.exists() else tmp, gguf_bytes_))
    check_disk(places, "the export")
