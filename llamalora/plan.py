"""The plan train prints before it loads weights: data, steps, and an estimate of peak GPU memory.

Parameter counts come from instantiating the model's config on the meta device (no weights, no
download beyond config.json), so the estimate fits whatever checkpoint is given. The estimate is
a model of where memory goes, not a measurement: llamalora.json records the measured peak.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from llamalora.batching import Tokenized, TruncationSummary, split_eval
from llamalora.config import QUANT_CHOICES as QUANTS, TrainConfig
from llamalora.errors import ConfigError, ModelError
from llamalora.families import family_of, known_config
from llamalora.models.names import resolve_model
from llamalora.parallel import world
from llamalora.quant import bytes_per_weight, check_packages, plain_activation_factor
from llamalora.tokenized import Records, tokenize_data
from llamalora.tokenizer import load_model_tokenizer

GIB = 1024**3


@dataclass
class ParamCounts:
    """Parameters of the part of the model train loads, by how they are stored."""

    quantizable: int  # language-model linear weights (what 8-bit / 4-bit applies to)
    other: int  # embeddings, lm_head, norms, and the vision tower when loaded
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    kv_hidden: int = 0  # key (and value) width: key heads x head width (grouped-query)
    active_layers: int = 0  # layers that run: text-only batches skip cross-attention layers
    cross_layers: int = 0  # cross-attention layers that run (with the vision tower)
    image_states: int = 0  # image states per image the cross-attention reads (tiles x patches)
    image_tokens: int = 0  # tokens an image adds to the text at most (images inside the text)
    # in + out features summed over the language model's linears of each name ("q_proj": ...):
    # what LoRA of rank r adds is r times this, per adapted name.
    lora_dims: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.quantizable + self.other


def count_params(config, with_vision: bool, model_path: str | None = None) -> ParamCounts:
    """Counts parameters without allocating them (meta device), for any family's config: the
    text-only model, or the one with its vision tower (`with_vision`). `model_path`: the
    checkpoint's folder, where a family reads how many tokens an image adds at most."""
    family = family_of(config)
    model = family.meta_model(config, with_vision)
    quantizable = 0
    lora_dims: dict[str, int] = {}
    for name, module in model.named_modules():
        if _is_linear(module) and not family.in_vision(name) and not name.endswith("lm_head"):
            quantizable += module.weight.numel()
            short = name.rsplit(".", 1)[-1]
            lora_dims[short] = lora_dims.get(short, 0) + module.in_features + module.out_features
    # parameters() yields a tied embedding / lm_head weight once, as it is stored.
    other = sum(p.numel() for p in model.parameters()) - quantizable
    text = config.get_text_config()
    cross = len(family.skipped_layers(text))
    heads = text.num_attention_heads
    kv_hidden = ((getattr(text, "num_key_value_heads", None) or heads)
                 * (getattr(text, "head_dim", None) or text.hidden_size // heads))
    return ParamCounts(quantizable, other, text.hidden_size, text.num_hidden_layers,
                       text.intermediate_size, text.vocab_size, kv_hidden=kv_hidden,
                       active_layers=text.num_hidden_layers - (0 if with_vision else cross),
                       lora_dims=lora_dims, cross_layers=cross if with_vision else 0,
                       image_states=family.image_states(config) if with_vision else 0,
                       image_tokens=family.image_tokens(config, model_path)
                       if with_vision else 0)


def _is_linear(module) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear)


def lora_param_count(counts: ParamCounts, rank: int, targets: list[str]) -> int:
    """LoRA parameters: r x (in + out) per adapted projection, over every layer that has it
    (cross-attention layers included, as peft adapts them too)."""
    return int(rank * sum(counts.lora_dims.get(t, 0) for t in targets))


# Bytes a micro-batch keeps per image state, per text hidden width and cross-attention layer:
# LoRA's dropout copies of the image states for k_proj and v_proj, in bf16 (2 x 2), and what the
# cross-attention layers keep beside them. Fitted to the measured peaks of 8-bit and bf16 runs of
# the 11B with 2 and 4 images a micro-batch (15.5-26.9 GiB eager, 15.6-27.8 GiB with CUDA graphs;
# BENCHMARKS.md, "Records with images"; tests/test_image_packing.py holds the estimates to
# them), with `layer_activation_bytes` for the text: 4.5 eager puts the estimates 0.1-1.7 GiB
# over them; CUDA-graph runs peak higher (the static rows' padding and the graphs' pool; not
# broken down): 5.5 covers them by 0.1-2.0 GiB. Those peaks were measured with the text
# self-attention on SDPA and a dense mask.
_IMAGE_STATE_BYTES = {False: 4.5, True: 5.5}  # by CUDA graphs


def layer_activation_bytes(counts: ParamCounts) -> int:
    """Bytes one token keeps for backward in one decoder layer, without checkpointing, in bf16
    with LoRA (dropout on) on q, k, v, o and the base frozen: both RMSNorms' fp32 inputs (4 +
    4 hidden widths), each LoRA projection's dropped input and its mask (3 x 4), flash
    attention's query, key, value and output (2 + 2 x key width + 2), the MLP's gate, SiLU and
    up outputs (3 x 2 intermediate widths); a frozen base matmul keeps nothing. Autograd's saved
    tensors for a scaled-down layer on the CPU add up to this within 5% (the loss and final
    norm aside)."""
    kv = counts.kv_hidden or counts.hidden
    return 24 * counts.hidden + 4 * kv + 6 * counts.intermediate


def estimate_peak_gib(counts: ParamCounts, *, quant: str, tokens: int,
                      gradient_checkpointing: bool, lora_params: int,
                      response_share: float = 1.0, plain_kernels: bool = False,
                      images: int = 0, graphs: bool = False, offload: bool = False) -> float:
    """Estimated peak GPU memory in GiB for one pass of `tokens` tokens (a micro-batch, or a
    CUDA graph's fused row).

    Weights at their stored size; LoRA weights, gradients and AdamW state in fp32 (16 bytes
    each); per token and layer, `layer_activation_bytes` (no checkpointing) or the layer's
    bf16 input alone (checkpointing; none on the GPU with `offload`); the final norm's fp32
    input; the response loss's gradient to its hidden states (bf16) and, at the peak, the larger
    of one loss chunk's fp32 logits and scratch (`step.LOSS_ROWS` positions) and one layer's
    backward (its gradients, ~6 intermediate + 8 hidden widths a token; with checkpointing also
    its recomputed activations, and with `offload` its input brought back); for `images` in a
    micro-batch, what cross-attention keeps of their states (`_IMAGE_STATE_BYTES`; one layer's
    with checkpointing, which recomputes the rest), or for a family that puts an image's tokens
    in the text, those tokens as more of the pass's (no loss on them); CUDA context and
    allocator slack on top.
    No term grows with the square of the length: attention is flash's varlen kernel.
    `plain_kernels`: the base runs through the quantization backend's own layers
    (`--kernels plain`), which may keep more for backward (`quant.plain_activation_factor`).
    """
    from llamalora.step import LOSS_ROWS

    hidden = counts.hidden
    answer = math.ceil(tokens * response_share)
    tokens += images * counts.image_tokens
    weights = counts.quantizable * bytes_per_weight(quant) + counts.other * 2
    lora = lora_params * 16
    full = layer_activation_bytes(counts)
    kept = 0 if offload and gradient_checkpointing else 2 * hidden if gradient_checkpointing \
        else full
    activations = tokens * (kept * (counts.active_layers or counts.layers) + 4 * hidden)
    if plain_kernels:
        activations *= plain_activation_factor(quant)
    loss_chunk = min(answer, LOSS_ROWS) * counts.vocab * (4 + 4 + 2)
    backward = tokens * (6 * counts.intermediate + 8 * hidden)
    if gradient_checkpointing:
        backward += tokens * (full + (2 * hidden if offload else 0))
    kept_layers = min(1, counts.cross_layers) if gradient_checkpointing else counts.cross_layers
    image_states = (images * counts.image_states * counts.hidden * kept_layers
                    * _IMAGE_STATE_BYTES[graphs])
    peak = (weights + lora + activations + answer * 2 * hidden + max(loss_chunk, backward)
            + image_states)
    return round(peak * 1.1 / GIB + 0.6, 1)


def heaviest(lengths: list[int], records: int, budget: int | None = None) -> int:
    """The most tokens `records` records of these lengths can put in one pass: the longest
    ones; with `budget` (a fused row's token budget, `recipe.StepBatches.rows`), the largest
    total of at most `records` whole records that fits the budget (two records of 3,200 tokens
    fill 6,400 of a budget of 8,192, not 8,192), or the longest record where none fits.

    A row takes records in the step's order, so any of them may share one: the bound is a
    subset sum, found with one bitset of reachable totals per record count."""
    if budget is None or not lengths:
        return sum(heapq.nlargest(records, lengths))
    counts = {n: c for n, c in Counter(lengths).items() if n <= budget}
    mask = (1 << (budget + 1)) - 1
    reach = [1] + [0] * records  # reach[k]: bit t set when k records can total t tokens
    for n, count in counts.items():
        for _ in range(min(count, records, budget // n)):
            for k in range(records, 0, -1):
                reach[k] |= (reach[k - 1] << n) & mask
    best = max(bits.bit_length() - 1 for bits in reach)
    return max(best, max(lengths))


@dataclass
class MemoryChoice:
    """What a run turns on to fit a GPU, by the plan's estimates: checkpointing when the
    activations would not fit, then the checkpointed layer inputs in host memory."""

    gradient_checkpointing: bool
    offload_activations: bool
    estimate_gib: float
    why: str  # empty when nothing is turned on


def choose_memory(plan: "Plan", quant: str, total_gib: float,
                  gradient_checkpointing: bool | None = None,
                  offload_activations: bool | None = None) -> MemoryChoice:
    """The first of no checkpointing, checkpointing, and checkpointing with offload whose
    estimate fits `total_gib` with a tenth to spare (`fits_gpu`), among those the options allow
    (None: either); where none fits, the last allowed. Recomputing costs about a third of a
    step; offload adds a copy of each layer's input to the host and back. `why` says what the
    choice turned on that the options left open, and on what estimates."""
    rows = [(False, False, plan.memory_gib[quant]),
            (True, False, plan.memory_gib_checkpointed[quant]),
            (True, True, plan.memory_gib_offloaded[quant])]
    allowed = [r for r in rows if gradient_checkpointing in (None, r[0])
               and offload_activations in (None, r[1])] or rows[-1:]
    fitting = [r for r in allowed if fits_gpu(r[2], total_gib)]
    ckpt, offload, need = (fitting or allowed[-1:])[0]
    gpu = f"this GPU has {total_gib:.0f} GiB"
    short = "" if fitting else " (it may not fit either)"
    why = ""
    if offload and offload_activations is None and gradient_checkpointing is None:
        why = (f"Gradient checkpointing on, each layer's input in host memory: the plan "
               f"estimates {rows[0][2]} GiB without checkpointing and {rows[1][2]} GiB with "
               f"it, {gpu} (with both: {need} GiB{short})")
    elif offload and offload_activations is None:
        why = (f"Checkpointed layer inputs in host memory: the plan estimates {rows[1][2]} GiB "
               f"with checkpointing alone, {gpu} (with them there: {need} GiB{short})")
    elif ckpt and gradient_checkpointing is None:
        why = (f"Gradient checkpointing on: the plan estimates {rows[0][2]} GiB without it, "
               f"{gpu} (with it: {need} GiB{short})")
    return MemoryChoice(ckpt, offload, need, why)


def fits_gpu(need_gib: float, total_gib: float) -> bool:
    """Whether an estimate fits a GPU of `total_gib` with a tenth to spare."""
    return need_gib <= 0.9 * total_gib


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
    memory_gib_fused_checkpointed: dict[str, float]  # the same with checkpointing
    # Checkpointing with each layer's input in host memory until backward.
    memory_gib_offloaded: dict[str, float]
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
                "estimated_peak_gib_fused_checkpointed": self.memory_gib_fused_checkpointed,
                "estimated_peak_gib_offloaded": self.memory_gib_offloaded,
                "params": self.params, "data_sha256": self.data_sha256,
                "model_note": self.model_note, "held_out": self.held_out}


def load_model_config(model: str):
    """The model's config, or for an id whose architecture a family knows (the default model's)
    that architecture's, when its config.json can't be fetched."""
    from pathlib import Path

    from transformers import AutoConfig

    from llamalora.hub import hub_reachable, unreachable_reason

    # The cache only when the Hub is unreachable: its retries would take ~25 s to fail.
    local_only = not Path(model).exists() and not hub_reachable()
    try:
        return AutoConfig.from_pretrained(model, trust_remote_code=False,
                                          local_files_only=local_only), ""
    except Exception as exc:
        known = known_config(model)
        if known is not None:
            return known, (f"config.json of {model} could not be fetched "
                           f"({type(exc).__name__}); the plan uses its architecture's defaults")
        if local_only:
            raise ModelError(f"--model {model}: its config.json is not in the local Hugging Face "
                             f"cache, and {unreachable_reason()}; pass a local folder or `tiny`, "
                             "or run once where the Hub is reachable") from exc
        raise ModelError(f"cannot read the config of --model {model!r} ({exc}); pass a local "
                         "folder, `tiny`, or log in for a gated hub model") from exc


def plan_training(config: TrainConfig) -> Plan:
    """Checks and tokenizes the data and estimates memory; loads no weights.

    Raises:
        DataError: Invalid records (refused with validate's line-numbered messages).
        ConfigError / ModelError: Options or the model can't be used.
        MissingExtraError: A `--report-to` tracker is not installed.
    """
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
    check_packages(config.quant)
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
    counts = count_params(model_config, with_vision, model)
    targets = config.target_module_list()
    lora = lora_param_count(counts, config.lora_rank, targets)
    tokens_per_epoch = sum(train_set.lengths)
    response_share = sum(train_set.targets) / max(1, tokens_per_epoch)

    memory = _memory_estimates(config, counts, lora, train_set, with_vision, response_share)
    return Plan(config=config, records=data.records, train_records=len(train_set),
                eval_records=len(eval_set), with_vision=with_vision,
                tokens_per_epoch=tokens_per_epoch, steps=steps,
                steps_per_epoch=steps_per_epoch, world_size=world_size,
                effective_batch=config.batch_size * per_step, truncation=truncation,
                **memory,
                params={"base": counts.total, "lora": lora},
                data_sha256=data.data_fingerprint, model_note="; ".join(
                    n for n in (tok_note, cfg_note) if n),
                train=train_set, eval=eval_set, data_note="; ".join(notes),
                held_out=_held_out(config, data.column("line")[kept[eval_idx]].tolist()))


def _memory_estimates(config: TrainConfig, counts: ParamCounts, lora: int, train_set,
                      with_vision: bool, response_share: float) -> dict[str, dict[str, float]]:
    """`Plan`'s memory_gib* fields: each path's estimate at each quantization."""
    # The most images a micro-batch can hold: batch size x the most a record has.
    images = config.batch_size * max(train_set.image_counts, default=0) if with_vision else 0
    # The heaviest pass: a micro-batch of the longest records; with CUDA graphs a text step's
    # records fused into rows of at most batch x max length tokens (`recipe.StepBatches.rows`).
    micro = heaviest(train_set.lengths, config.batch_size)
    fused = micro if with_vision else heaviest(
        train_set.lengths, config.batch_size * config.gradient_accumulation_steps,
        budget=config.batch_size * config.max_seq_length)

    def estimate(checkpointing: bool, tokens: int = micro, graphs: bool = False,
                 offload: bool = False) -> dict[str, float]:
        return {q: estimate_peak_gib(counts, quant=q, tokens=tokens,
                                     gradient_checkpointing=checkpointing, lora_params=lora,
                                     response_share=response_share,
                                     plain_kernels=config.kernels == "plain", images=images,
                                     graphs=graphs, offload=offload) for q in QUANTS}

    # Unset checkpointing (auto) is planned without; train() turns it on if that won't fit.
    return {"memory_gib": estimate(bool(config.gradient_checkpointing)),
            "memory_gib_checkpointed": estimate(True),
            "memory_gib_offloaded": estimate(True, offload=True),
            "memory_gib_fused": estimate(False, fused, graphs=True),
            "memory_gib_fused_checkpointed": estimate(True, fused, graphs=True)}


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
