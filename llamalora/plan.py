"""The plan train prints before it loads weights: data, steps, and an estimate of peak GPU memory.

Parameter counts come from instantiating the model's config on the meta device (no weights, no
download beyond config.json), so the estimate fits whatever checkpoint is given. The estimate is
a model of where memory goes, not a measurement: llamalora.json records the measured peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from llamalora.batching import Tokenized, TruncationSummary, split_eval
from llamalora.config import QUANT_CHOICES as QUANTS, TrainConfig
from llamalora.errors import ConfigError, ModelError
from llamalora.parallel import world
from llamalora.tokenized import Records, tokenize_data
from llamalora.tokenizer import load_model_tokenizer

GIB = 1024**3
# Bytes per base weight of a quantized linear layer, scales included.
_LINEAR_BYTES = {"8bit": 1.0 + 4 / 4096, "4bit": 0.5 + 0.0625 + 4 / 4096, "none": 2.0}


@dataclass
class ParamCounts:
    """Parameters of the part of the model train loads, by how they are stored."""

    quantizable: int  # language-model linear weights (what 8-bit / 4-bit applies to)
    other: int  # embeddings, lm_head, norms, and the vision tower when loaded
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    active_layers: int = 0  # layers that run: text-only batches skip cross-attention layers
    cross_layers: int = 0  # cross-attention layers that run (with the vision tower)
    image_tokens: int = 0  # image states per image the cross-attention reads (tiles x patches)
    # in + out features summed over the language model's linears of each name ("q_proj": ...):
    # what LoRA of rank r adds is r times this, per adapted name.
    lora_dims: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.quantizable + self.other


def mllama_default_config():
    """The Llama 3.2 11B Vision architecture (MllamaConfig defaults, 560-pixel tiles)."""
    from transformers import MllamaConfig

    config = MllamaConfig()
    config.vision_config.image_size = 560
    return config


def count_params(config, with_vision: bool) -> ParamCounts:
    """Counts parameters without allocating them (meta device): Mllama (text-only or with its
    vision tower) or any causal LM config (LlamaConfig: Llama 3.x, SmolLM2)."""
    import torch
    from transformers import AutoModelForCausalLM, MllamaForCausalLM, MllamaForConditionalGeneration

    mllama = getattr(config, "model_type", None) == "mllama"
    with torch.device("meta"):
        if mllama and with_vision:
            model = MllamaForConditionalGeneration(config)
        elif mllama:
            model = MllamaForCausalLM(config.text_config)
        else:
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    quantizable = 0
    lora_dims: dict[str, int] = {}
    for name, module in model.named_modules():
        in_text_model = "vision" not in name and "projector" not in name
        if isinstance(module, torch.nn.Linear) and in_text_model and not name.endswith("lm_head"):
            quantizable += module.weight.numel()
            short = name.rsplit(".", 1)[-1]
            lora_dims[short] = lora_dims.get(short, 0) + module.in_features + module.out_features
    # parameters() yields a tied embedding / lm_head weight once, as it is stored.
    other = sum(p.numel() for p in model.parameters()) - quantizable
    text = config.get_text_config()
    cross = len(getattr(text, "cross_attention_layers", None) or [])
    skipped = 0 if with_vision else cross
    image_tokens = 0
    if mllama and with_vision:
        vision = config.vision_config
        image_tokens = vision.max_num_tiles * ((vision.image_size // vision.patch_size) ** 2 + 1)
    return ParamCounts(quantizable, other, text.hidden_size, text.num_hidden_layers,
                       text.intermediate_size, text.vocab_size,
                       active_layers=text.num_hidden_layers - skipped, lora_dims=lora_dims,
                       cross_layers=cross if with_vision else 0, image_tokens=image_tokens)


def lora_param_count(counts: ParamCounts, rank: int, targets: list[str]) -> int:
    """LoRA parameters: r x (in + out) per adapted projection, over every layer that has it
    (cross-attention layers included, as peft adapts them too)."""
    return int(rank * sum(counts.lora_dims.get(t, 0) for t in targets))


# Bytes a micro-batch keeps per image state, per text hidden width and cross-attention layer:
# LoRA's dropout copies of the image states for k_proj and v_proj, in bf16 (2 x 2; they were
# fp32 copies, and 8 fitted the peaks then). 4 puts the estimates 0.1-1.7 GiB over the eager
# peaks of 8-bit and bf16 runs with 2 and 4 images a micro-batch (H200, 2026-12-02,
# BENCHMARKS.md: 15.5-26.9 GiB). CUDA-graph runs peak higher (the static rows' padding and the
# graphs' pool; not broken down): 5.5, fitted to their peaks with every LoRA layer in bf16
# (15.6-27.8 GiB, the same day), covers them by 0.5-2.3 GiB.
_IMAGE_STATE_BYTES = {False: 4, True: 5.5}  # by CUDA graphs


def estimate_peak_gib(counts: ParamCounts, *, quant: str, batch_size: int, seq_len: int,
                      gradient_checkpointing: bool, lora_params: int,
                      response_share: float = 1.0, bnb_int8_layers: bool = False,
                      images: int = 0, graphs: bool = False) -> float:
    """Estimated peak GPU memory in GiB for one training step.

    Weights at their stored size; LoRA weights, gradients and AdamW state in fp32 (16 bytes each);
    activations per token and layer (bf16: the layer input alone with checkpointing, ~20 hidden
    widths plus the MLP's 3 intermediate widths without); logits only for the tokens with loss,
    in fp32 with their gradient; for `images` in a micro-batch, what cross-attention keeps of
    their states (`_IMAGE_STATE_BYTES`; one layer's with checkpointing, which recomputes the
    rest); CUDA context and allocator slack on top. `bnb_int8_layers`: the 8-bit base runs
    through bitsandbytes' own layers, which keep more for backward.
    """
    tokens = batch_size * seq_len
    weights = counts.quantizable * _LINEAR_BYTES[quant] + counts.other * 2
    lora = lora_params * 16
    per_layer = 2 * (counts.hidden if gradient_checkpointing
                     else 20 * counts.hidden + 3 * counts.intermediate)
    # With checkpointing one layer is recomputed at a time: add one layer's full activations.
    recompute = tokens * 2 * (20 * counts.hidden + 3 * counts.intermediate) \
        if gradient_checkpointing else 0
    activations = tokens * per_layer * (counts.active_layers or counts.layers) + recompute
    if quant == "8bit" and bnb_int8_layers:
        # bnb's LLM.int8 (`--kernels plain`) keeps int8 copies and outlier columns of each
        # input for backward; seen on an H100 as ~2.5x the bf16 activation memory of the step.
        activations *= 2.5
    logits = math.ceil(tokens * response_share) * counts.vocab * (2 + 4 + 4)
    kept_layers = min(1, counts.cross_layers) if gradient_checkpointing else counts.cross_layers
    image_states = (images * counts.image_tokens * counts.hidden * kept_layers
                    * _IMAGE_STATE_BYTES[graphs])
    return round((weights + lora + activations + logits + image_states) * 1.1 / GIB + 0.6, 1)


@dataclass
class Plan:
    """What a run will do, known before any weights load."""

    config: TrainConfig
    records: int
    train_records: int
    eval_records: int
    with_vision: bool
    tokens_per_epoch: int
    steps: int
    steps_per_epoch: int
    world_size: int
    effective_batch: int
    truncation: TruncationSummary
    memory_gib: dict[str, float]
    memory_gib_checkpointed: dict[str, float]
    # With CUDA graphs: a text step's micro-batches run as one pass (batch x accumulation records
    # at once); a micro-batch with images as its own pass, with the graph's attention inputs.
    memory_gib_fused: dict[str, float]
    params: dict[str, int]
    data_sha256: str  # the data file's SHA-256 (a table's `datasets` fingerprint)
    model_note: str = ""
    # The records by index (`tokenized.Records`: memory-mapped, not token lists) or, from tests
    # and benchmarks, plain lists of Tokenized.
    train: Records | list[Tokenized] = field(default_factory=list, repr=False)
    eval: Records | list[Tokenized] = field(default_factory=list, repr=False)
    data_note: str = ""  # e.g. that the tokenized data came from the cache
    # Where the held-out records are, for `llamalora eval`: the data file (resolved), its image
    # root, and the records' lines (a table's rows); the data is not copied.
    held_out: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"records": self.records, "train_records": self.train_records,
                "eval_records": self.eval_records, "with_vision": self.with_vision,
                "tokens_per_epoch": self.tokens_per_epoch, "steps": self.steps,
                "steps_per_epoch": self.steps_per_epoch, "world_size": self.world_size,
                "effective_batch": self.effective_batch,
                "truncation": self.truncation.to_dict(), "estimated_peak_gib": self.memory_gib,
                "estimated_peak_gib_checkpointed": self.memory_gib_checkpointed,
                "estimated_peak_gib_fused": self.memory_gib_fused,
                "params": self.params, "data_sha256": self.data_sha256,
                "model_note": self.model_note, "held_out": self.held_out}


def load_model_config(model: str):
    """The model's config, or the 11B architecture's for the default id when offline."""
    from transformers import AutoConfig

    from llamalora.tokenizer import DEFAULT_MODEL

    try:
        return AutoConfig.from_pretrained(model, trust_remote_code=False), ""
    except Exception as exc:
        if model == DEFAULT_MODEL:
            return mllama_default_config(), (f"config.json of {model} could not be fetched "
                                             f"({type(exc).__name__}); the plan uses the 11B "
                                             "architecture's defaults")
        raise ModelError(f"cannot read the config of --model {model!r} ({exc}); pass a local "
                         "folder, `tiny`, or log in for a gated hub model") from exc


def plan_training(config: TrainConfig) -> Plan:
    """Checks and tokenizes the data and estimates memory; loads no weights.

    Raises:
        DataError: Invalid records (refused with validate's line-numbered messages).
        ConfigError / ModelError: Options or the model can't be used.
        MissingExtraError: A `--report-to` tracker is not installed.
    """
    from llamalora.models import check_quant_packages, resolve_model

    from llamalora.trackers import check_trackers

    check_trackers(config.report_to_list())  # a missing extra fails here, before any data work
    model = resolve_model(config.model)
    tokenizer, tok_note = load_model_tokenizer(model)
    _, local_rank, world_size = world()
    notes = []
    data = tokenize_data(
        config.data_path, tokenizer, max_seq_length=config.max_seq_length,
        train_on_prompt=config.train_on_prompt, truncation=config.truncation,
        skip_invalid=config.skip_invalid, image_root=config.image_root or None,
        split=config.split, num_proc=config.num_proc, builder=local_rank == 0,
        on_status=notes.append)
    # After the data's own errors (a bad data file still exits 2 first): --dry-run says so too.
    check_quant_packages(config.quant)
    kept = data.kept()
    if not len(kept):
        raise ConfigError(f"no record fits --max-seq-length {config.max_seq_length} with a "
                          "response left; raise it (see `llamalora stats`)")
    train_idx, eval_idx = split_eval(len(kept), config.eval_fraction, config.seed)
    train_set, eval_set = Records(data.table, kept[train_idx]), Records(data.table,
                                                                        kept[eval_idx])
    with_vision, truncation = data.with_vision, data.truncation
    batches = math.ceil(len(train_set) / config.batch_size)
    per_step = config.gradient_accumulation_steps * world_size
    steps_per_epoch = math.ceil(batches / per_step)
    steps = config.max_steps or math.ceil(config.num_train_epochs * batches / per_step)

    model_config, cfg_note = load_model_config(model)
    counts = count_params(model_config, with_vision)
    targets = config.target_module_list()
    lora = lora_param_count(counts, config.lora_rank, targets)
    longest = max(train_set.lengths)
    tokens_per_epoch = sum(train_set.lengths)
    response_share = sum(train_set.targets) / max(1, tokens_per_epoch)

    # The most images a micro-batch can hold: batch size x the most a record has.
    images = config.batch_size * max(train_set.image_counts, default=0) if with_vision else 0

    def estimate(quant: str, checkpointing: bool, batch_size: int = config.batch_size,
                 graphs: bool = False) -> float:
        return estimate_peak_gib(counts, quant=quant, batch_size=batch_size,
                                 seq_len=longest, gradient_checkpointing=checkpointing,
                                 lora_params=lora, response_share=response_share,
                                 bnb_int8_layers=config.kernels == "plain", images=images,
                                 graphs=graphs)

    # Unset checkpointing (auto) is planned without; train() turns it on if that won't fit.
    memory = {q: estimate(q, bool(config.gradient_checkpointing)) for q in QUANTS}
    memory_checkpointed = {q: estimate(q, True) for q in QUANTS}
    memory_fused = {q: estimate(q, False, graphs=True) if with_vision else
                    estimate(q, False, config.batch_size * config.gradient_accumulation_steps)
                    for q in QUANTS}
    return Plan(config=config, records=data.records, train_records=len(train_set),
                eval_records=len(eval_set), with_vision=with_vision,
                tokens_per_epoch=tokens_per_epoch, steps=steps,
                steps_per_epoch=steps_per_epoch, world_size=world_size,
                effective_batch=config.batch_size * per_step, truncation=truncation,
                memory_gib=memory, memory_gib_checkpointed=memory_checkpointed,
                memory_gib_fused=memory_fused,
                params={"base": counts.total, "lora": lora},
                data_sha256=data.data_fingerprint, model_note="; ".join(
                    n for n in (tok_note, cfg_note) if n),
                train=train_set, eval=eval_set, data_note="; ".join(notes),
                held_out=_held_out(config, data.column("line")[kept[eval_idx]].tolist()))


def _held_out(config: TrainConfig, lines: list[int]) -> dict:
    """The held-out records by line, and the files to find them in from any folder."""
    if not lines:
        return {}

    def resolved(path: str) -> str:
        local = Path(path).expanduser()
        return str(local.resolve()) if local.exists() else path  # a Hub id stays as given

    return {"data_path": resolved(config.data_path),
            "image_root": resolved(config.image_root) if config.image_root else None,
            "lines": lines}
