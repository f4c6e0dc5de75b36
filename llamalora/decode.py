"""Text decoding with a static KV cache, one token a CUDA graph replay, for one prompt (chat,
serve) or a batch of them (eval: several prompts per replay, each row at its own length).

transformers' `generate` spends most of a decoding step on the host at batch 1: each of the 32
layers runs a few dozen small kernels (LoRA adds five per projection), each launched from Python,
so the 11B's step took ~45 ms in bf16 where reading the weights takes ~4 ms. Here the
model's own decoder layers run unchanged (its attention, norms, rotary embedding, PEFT's LoRA
layers, llamalora's int8 kernels), but over a KV cache of fixed size that this module owns, so a
decoding step has the same shapes every time and is captured once as a CUDA graph and replayed.

Why not transformers' StaticCache with `torch.compile`: compiling the 11B takes a minute, the
int8 matmuls are custom ops it cannot see into, and the cache and mask API changed between the
transformers versions we support (5.17's `past_key_values=`, 5.24's `cache=`); the layer call
below is the one interface both share.

Text only: a conversation with an image needs the model's own image path (Mllama's
cross-attention layers and their cached image states, say), and goes through `generate`
(`ChatSession` decides). Layers a family's text forward skips (Mllama's
cross-attention layers) are skipped here too; a family can keep its text turns off this path
(`Family.static_decoder`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

from llamalora.attention import sdpa_or_own
from llamalora.families import family_of_model

# The cache holds this many positions at least, and grows in such steps: one capture serves a
# whole conversation of ordinary length, and attending over the unused, masked tail costs little
# (~0.1 ms a token at 4,096 positions on the 11B).
CACHE_STEP = 2048
# A batch's cache grows in smaller steps: every row attends over the whole cache at each step, so
# the unused tail costs rows x its length, and a batch's lengths are known when it starts.
BATCH_CACHE_STEP = 256
# Prompts are padded to a power of two from this length up, so a handful of prefill graphs (each
# captured at its first use, ~1 s on the 11B) serve every prompt.
MIN_PREFILL_BUCKET = 64


def prefill_bucket(n: int) -> int:
    """The padded length a prompt of `n` tokens is prefilled at."""
    return max(MIN_PREFILL_BUCKET, 1 << (n - 1).bit_length())


class _Captured(NamedTuple):
    """A recorded step and the tensors it reads and writes, which must outlive it: a replay
    reads their memory, whoever owns it by then."""

    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor  # input buffer [rows, length]
    position: torch.Tensor  # the cache positions each row writes [rows, length]
    last: torch.Tensor | None  # the index in each row whose logits a prefill returns [rows]
    logits: torch.Tensor  # output buffer [rows, vocab], rewritten by each replay


class _StaticKV:
    """The KV cache the decoder layers write into: `update` is the call they make on theirs.

    One row per sequence; each row writes the positions `position` holds for it, so the rows of
    a batch decode at their own lengths."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, rows: int, length: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (rows, kv_heads, length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.rows, self.length = rows, length
        self.row_index = torch.arange(rows, device=device)
        # Set before each forward: the cache positions it writes ([rows, tokens]), and how many
        # leading slots its attention sees (a prefill's own; a decoding step's, all of them).
        self.position = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.visible = length
        self._slot: dict[int, int] = {}  # the model's layer_idx -> our list index

    def bind(self, layer_indices: list[int]) -> None:
        self._slot = {idx: i for i, idx in enumerate(layer_indices)}

    def update(self, key, value, layer_idx, *args, **kwargs):
        i = self._slot[layer_idx]
        # key: [rows, kv_heads, tokens, head_dim]; row r's tokens go to its own positions.
        rows = self.row_index[:, None]
        self.keys[i][rows, :, self.position] = key.transpose(1, 2)
        self.values[i][rows, :, self.position] = value.transpose(1, 2)
        return self.keys[i][:, :, :self.visible], self.values[i][:, :, :self.visible]

    def keep_rows(self, index: torch.Tensor) -> None:
        """Drops the rows not in `index` (finished sequences of a batch)."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.rows = len(index)
        self.row_index = torch.arange(self.rows, device=index.device)
        self.position = self.position[:self.rows]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        # Part of the Cache interface, which transformers 5.17's layer calls read.
        return self.length



def _unwrap(model):
    """(text decoder, output head) of a causal LM, or of a model with a vision side whose
    decoder is its `language_model`, PEFT-wrapped or not."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = inner.model
    decoder = getattr(decoder, "language_model", decoder)
    return decoder, inner.get_output_embeddings()


def supported(model) -> str | None:
    """None when `StaticDecoder` can run this model; otherwise why not (said to the user)."""
    family = family_of_model(model)
    if not family.static_decoder:
        return f"not for {family.name} models"
    try:
        decoder, head = _unwrap(model)
    except AttributeError as exc:
        return f"not a Llama-shaped decoder ({exc})"
    missing = [n for n in ("layers", "config", "embed_tokens", "norm", "rotary_emb")
               if not hasattr(decoder, n)]
    if missing:
        return f"not a Llama-shaped decoder (no {', '.join(missing)})"
    layers, config = decoder.layers, decoder.config
    if head is None:
        return "no output head"
    attn = sdpa_or_own(config)
    if attn not in ("sdpa", "eager"):
        return f"attention implementation {attn!r}"  # flash kernels want 2D masks
    if not len(layers):
        return "no decoder layers"
    return None


def adapter_state(model) -> tuple | None:
    """Which LoRA adapters a forward of `model` runs: (disabled, active names), as peft's layers
    read them; None for a model without adapters.

    peft decides in Python, inside each layer's forward, so a captured graph holds the state it
    was captured in: graphs are kept per state, and `disable_adapter()` or `set_adapter(name)`
    between calls selects another set instead of replaying the wrong one.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            return bool(module.disable_adapters), tuple(module.active_adapters)
    return None


class StaticDecoder:
    """Greedy or sampled decoding for a loaded text model: one sequence (`generate`) or a batch
    of prompts of any lengths at once (`generate_batch`).

    The first call on a CUDA device captures the decoding step (about a second on the 11B) for
    its number of rows and the model's adapter state; later calls replay it. On a CPU, or with
    `graphs=False`, the same step runs eagerly.
    """

    def __init__(self, model, *, graphs: bool = True):
        self.model = model
        self.decoder, self.head = _unwrap(model)
        config = self.decoder.config
        # The layers the model's own text forward skips (Mllama's cross-attention layers).
        skip = set(family_of_model(model).skipped_layers(config))
        self.layer_indices = [i for i in range(len(self.decoder.layers)) if i not in skip]
        self.layers = [self.decoder.layers[i] for i in self.layer_indices]
        heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.device = self.decoder.embed_tokens.weight.device
        self.dtype = self.decoder.embed_tokens.weight.dtype
        self.graphs = graphs and self.device.type == "cuda"
        self.pad_prompts = self.graphs  # (tests set it on the CPU to check the padding)
        params = inspect.signature(self.layers[0].forward).parameters
        # The cache keyword: `cache` from transformers 5.24, `past_key_values` before.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._cache_position = "cache_position" in params
        self._bool_mask = sdpa_or_own(config) == "sdpa"
        self.cache: _StaticKV | None = None
        # Captured steps by (rows, input length, adapter state): length 1 is the decoding step,
        # larger ones prefills. They share one memory pool: a replay's logits are read before
        # any other graph replays, so no two need their memory at once.
        self._graphs: dict[tuple, _Captured] = {}
        self._pool = None
        self._state: tuple | None = None  # the adapter state of the call in progress

    # --- the model step ---------------------------------------------------------------------

    def _forward(self, ids: torch.Tensor, position: torch.Tensor,
                 last: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (fp32, [rows, vocab]) at index `last` of each row of `ids` (default: the final
        one), writing the K/V of `position` ([rows, tokens]) into the cache.

        A prefill (several tokens from position 0) attends causally over the cache's first
        slots, as `generate`'s prefill does (mask None: sdpa's causal kernel); a decoding step
        attends over the whole cache, each row masked past its own position.
        """
        cache = self.cache
        n = ids.shape[1]
        cache.position = position
        # A captured step attends over the whole cache (its shapes fixed), an eager one only up
        # to the furthest row's position: on a CPU the unused tail is real work.
        cache.visible = n if n > 1 else (
            cache.length if self.graphs else int(position.max()) + 1)
        hidden = self.decoder.embed_tokens(ids)
        embeddings = self.decoder.rotary_emb(hidden, position_ids=position)
        mask = None
        if n == 1 or not self._bool_mask:
            allowed = (self._slots[:cache.visible] <= position[:, :, None])[:, None]
            mask = allowed if self._bool_mask else torch.zeros(
                allowed.shape, dtype=hidden.dtype, device=self.device).masked_fill(
                ~allowed, torch.finfo(hidden.dtype).min)  # eager attention adds its mask
        extra = {"cache_position": position[0]} if self._cache_position else {}
        for layer in self.layers:
            out = layer(hidden, attention_mask=mask, position_ids=position,
                        position_embeddings=embeddings, use_cache=True,
                        **{self._cache_kw: cache}, **extra)
            hidden = out[0] if isinstance(out, tuple) else out
        hidden = hidden[:, -1] if last is None else hidden[cache.row_index, last]
        return self.head(self.decoder.norm(hidden)).float()

    def _ensure_cache(self, rows: int, needed: int) -> None:
        cache = self.cache
        if cache is not None and cache.rows == rows and cache.length >= needed:
            return
        step = CACHE_STEP if rows == 1 else BATCH_CACHE_STEP
        length = -(-needed // step) * step
        self.cache = None
        self._graphs.clear()  # they hold the old cache's buffers
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.cache = _StaticKV(len(self.layers), self.kv_heads, self.head_dim, rows, length,
                               self.dtype, self.device)
        self.cache.bind([getattr(layer.self_attn, "layer_idx", i) for layer, i in
                         zip(self.layers, self.layer_indices)])
        self._slots = torch.arange(length, device=self.device)

    def reserve(self, rows: int, needed: int) -> None:
        """Allocates the cache for `rows` sequences of up to `needed` positions now, so that
        later calls within it keep their captured graphs (eval: its longest prompt)."""
        self._ensure_cache(rows, needed)

    def _captured(self, length: int) -> _Captured:
        """The step for `length` input tokens a row as a CUDA graph, recorded at its first use
        (for the cache's rows and the current adapter state)."""
        rows = self.cache.rows
        key = (rows, length, self._state)
        if key in self._graphs:
            return self._graphs[key]
        ids = torch.zeros(rows, length, dtype=torch.long, device=self.device)
        position = torch.arange(length, device=self.device).repeat(rows, 1)
        last = None if length == 1 else torch.zeros(rows, dtype=torch.long, device=self.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            # Warm-up off the capture: Triton autotunes, cuBLAS picks its kernels. It writes
            # K/V that the replay then writes again.
            for _ in range(2):
                self._forward(ids, position, last)
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(ids, position, last)
        self._graphs[key] = _Captured(graph, ids, position, last, logits)
        return self._graphs[key]

    def _prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Logits after each prompt's last token, the prompts right-padded to one length: the
        padding comes after a row's prompt, which attends causally, so it changes nothing the
        prompt sees, and its K/V slots are masked until decoding overwrites them."""
        rows, longest = self.cache.rows, max(map(len, prompts))
        # Padded to a length bucket so that a few graphs serve every prompt.
        length = prefill_bucket(longest) if self.pad_prompts else longest
        padded = torch.tensor([p + [0] * (length - len(p)) for p in prompts], device=self.device)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        if not self.graphs:
            position = torch.arange(length, device=self.device).repeat(rows, 1)
            return self._forward(padded, position, last if rows > 1 or self.pad_prompts
                                 else None)
        step = self._captured(length)
        step.ids.copy_(padded)
        step.last.copy_(last)
        step.graph.replay()
        return step.logits

    def _decode(self, tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Logits after one more token a row (`tokens` [rows]), written at `position` [rows]."""
        if not self.graphs:
            return self._forward(tokens.view(-1, 1), position.view(-1, 1))
        step = self._captured(1)
        step.ids.copy_(tokens.view(-1, 1))
        step.position.copy_(position.view(-1, 1))
        step.graph.replay()
        return step.logits

    # --- decoding ---------------------------------------------------------------------------

    def _steps(self, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int],
               choose: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[list[int]]:
        """Each step's new token of every row (a finished row repeats its stop id).

        Ends when every row has reached a stop id or `max_new_tokens`. Without graphs, finished
        rows leave the batch (the cache keeps only the others' rows): on a CPU a row costs its
        share of every matmul, and answers end at very different lengths; a captured graph
        keeps its rows, where a spare row costs next to nothing."""
        rows = max(len(prompts), self.cache.rows if self.graphs and self.cache else 0)
        prompts = prompts + [[0]] * (rows - len(prompts))  # rows a captured graph has spare
        longest = max(map(len, prompts))
        self._ensure_cache(rows, max(longest + max_new_tokens,
                                     prefill_bucket(longest) if self.pad_prompts else longest))
        self._state = adapter_state(self.model) if self.graphs else None
        logits = self._prefill(prompts)
        position = torch.tensor([len(p) for p in prompts], device=self.device)
        live = [True] * len(prompts) + [False] * (rows - len(prompts))
        at = list(range(rows))  # the row of the batch each row of the cache holds
        last = [0] * rows
        for i in range(max_new_tokens):
            tokens = choose(logits)
            for row, value in zip(at, tokens.tolist()):  # the one host sync of a step
                last[row] = value
            yield list(last)
            live = [on and v not in stop_ids for on, v in zip(live, last)]
            if not any(live) or i == max_new_tokens - 1:
                return
            keep = [j for j, row in enumerate(at) if live[row]]
            if not self.graphs and len(keep) < len(at):
                index = torch.tensor(keep, device=self.device)
                self.cache.keep_rows(index)
                tokens, position, at = tokens[index], position[index], [at[j] for j in keep]
            logits = self._decode(tokens, position + i)

    @torch.inference_mode()
    def generate(self, ids: list[int], *, max_new_tokens: int, stop_ids: list[int],
                 choose: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[int]:
        """Yields up to `max_new_tokens` new ids after `ids`, ending after a stop id.

        `choose(logits [1, V] fp32) -> [1]` picks each next token (argmax, or transformers'
        sampling warpers and a draw). The first prompt of a length bucket and the first
        decoding step are captured (on a CUDA device), later ones replayed.
        """
        if self.cache is not None and self.cache.rows != 1:
            self._ensure_cache(1, 1)  # a batch's cache: back to one row
        for values in self._steps([ids], max_new_tokens, stop_ids, choose):
            yield values[0]

    @torch.inference_mode()
    def generate_batch(self, prompts: list[list[int]], *, max_new_tokens: int,
                       stop_ids: list[int], rows: int | None = None) -> list[list[int]]:
        """Greedy answers to several prompts at once: each one's new ids, up to and including
        its stop id (or `max_new_tokens` of them).

        `rows` pads the batch to that many rows where steps are captured, so that one graph
        serves batches of any size up to it (pass the largest batch); call `reserve` first to
        size the cache for the longest prompt.
        """
        if self.graphs and rows and (self.cache is None or self.cache.rows != rows):
            longest = max(map(len, prompts))
            self._ensure_cache(rows, max(longest + max_new_tokens, prefill_bucket(longest)))
        out: list[list[int]] = [[] for _ in prompts]
        for values in self._steps(prompts, max_new_tokens, stop_ids,
                                  lambda logits: logits.argmax(-1)):
            for row, value in zip(out, values):
                if not row or (row[-1] not in stop_ids and len(row) < max_new_tokens):
                    row.append(value)
        return out
