"""Text decoding with a static KV cache, one token a CUDA graph replay.

transformers' `generate` spends most of a decoding step on the host at batch 1: each of the 32
layers runs a few dozen small kernels (LoRA adds five per projection), each launched from Python,
so the 11B's step took ~45 ms in bf16 where reading the weights takes ~4 ms (issue 13). Here the
model's own decoder layers run unchanged (its attention, norms, rotary embedding, PEFT's LoRA
layers, llamalora's int8 kernels), but over a KV cache of fixed size that this module owns, so a
decoding step has the same shapes every time and is captured once as a CUDA graph and replayed.

Why not transformers' StaticCache with `torch.compile`: compiling the 11B takes a minute, the
int8 matmuls are custom ops it cannot see into, and the cache and mask API changed between the
transformers releases we support (5.17's `past_key_values=`, 5.24's `cache=`); the layer call
below is the one interface both share.

Text only: a conversation with an image needs Mllama's cross-attention layers and their cached
image states, and goes through `generate` (`ChatSession` decides).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

from llamalora.attention import sdpa_or_own

# The cache holds this many positions at least, and grows in such steps: one capture serves a
# whole conversation of ordinary length, and attending over the unused, masked tail costs little
# (~0.1 ms a token at 4,096 positions on the 11B).
CACHE_STEP = 2048
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
    ids: torch.Tensor  # input buffer
    position: torch.Tensor  # the cache positions written
    last: torch.Tensor | None  # the index whose logits a prefill returns
    logits: torch.Tensor  # output buffer, rewritten by each replay


class _StaticKV:
    """The KV cache the decoder layers write into: `update` is the call they make on theirs."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, length: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (1, kv_heads, length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.length = length
        # Set before each forward: the cache positions it writes, and how many leading slots
        # its attention sees (a prefill's own; a decoding step's, all of them).
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.visible = length
        self._slot: dict[int, int] = {}  # the model's layer_idx -> our list index

    def bind(self, layer_indices: list[int]) -> None:
        self._slot = {idx: i for i, idx in enumerate(layer_indices)}

    def update(self, key, value, layer_idx, *args, **kwargs):
        i = self._slot[layer_idx]
        self.keys[i].index_copy_(2, self.position, key)
        self.values[i].index_copy_(2, self.position, value)
        return self.keys[i][:, :, :self.visible], self.values[i][:, :, :self.visible]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        # Part of the Cache interface; the layer calls of 5.24 never make it, and the GPU
        # (5.17) runs were made with it in place, so it stays.
        return self.length



def _unwrap(model):
    """(text decoder, output head) of a Llama, Mllama text or Mllama model, PEFT-wrapped or not."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = inner.model
    decoder = getattr(decoder, "language_model", decoder)  # MllamaForConditionalGeneration
    return decoder, inner.get_output_embeddings()


def supported(model) -> str | None:
    """None when `StaticDecoder` can run this model; otherwise why not (said to the user)."""
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


class StaticDecoder:
    """Greedy or sampled decoding of one sequence for a loaded text model.

    `generate(ids, ...)` yields new token ids one at a time. The first call on a CUDA device
    captures the decoding step (about a second on the 11B); later calls replay it. On a CPU, or
    with `graphs=False`, the same step runs eagerly.
    """

    def __init__(self, model, *, graphs: bool = True):
        self.model = model
        self.decoder, self.head = _unwrap(model)
        config = self.decoder.config
        skip = set(getattr(self.decoder, "cross_attention_layers", None) or [])
        # Mllama skips its cross-attention layers when there is no image; so do we.
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
        # Captured steps by input length: 1 is the decoding step, larger ones prefills.
        self._graphs: dict[int, _Captured] = {}
        self._ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self._pos = torch.zeros(1, dtype=torch.long, device=self.device)

    # --- the model step ---------------------------------------------------------------------

    def _forward(self, ids: torch.Tensor, position: torch.Tensor,
                 last: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (fp32) at index `last` of `ids` (default: the final one), writing the K/V of
        `position` into the cache.

        A prefill (several tokens from position 0) attends causally over the cache's first
        slots, as `generate`'s prefill does (mask None: sdpa's causal kernel); a decoding step
        attends over the whole cache, masked past its position.
        """
        cache = self.cache
        n = ids.shape[1]
        cache.position = position
        cache.visible = n if n > 1 else cache.length
        hidden = self.decoder.embed_tokens(ids)
        position_ids = position[None]
        embeddings = self.decoder.rotary_emb(hidden, position_ids=position_ids)
        mask = None
        if n == 1 or not self._bool_mask:
            allowed = (self._slots[None, :cache.visible] <= position[:, None])[None, None]
            mask = allowed if self._bool_mask else torch.zeros(
                allowed.shape, dtype=hidden.dtype, device=self.device).masked_fill(
                ~allowed, torch.finfo(hidden.dtype).min)  # eager attention adds its mask
        extra = {"cache_position": position} if self._cache_position else {}
        for layer in self.layers:
            out = layer(hidden, attention_mask=mask, position_ids=position_ids,
                        position_embeddings=embeddings, use_cache=True,
                        **{self._cache_kw: cache}, **extra)
            hidden = out[0] if isinstance(out, tuple) else out
        hidden = hidden[:, -1:] if last is None else hidden.index_select(1, last)
        return self.head(self.decoder.norm(hidden))[:, -1].float()

    def _ensure_cache(self, needed: int) -> None:
        if self.cache is not None and self.cache.length >= needed:
            return
        length = -(-needed // CACHE_STEP) * CACHE_STEP
        self.cache = None
        self._graphs.clear()  # they hold the old cache's buffers
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.cache = _StaticKV(len(self.layers), self.kv_heads, self.head_dim, length,
                               self.dtype, self.device)
        self.cache.bind([getattr(layer.self_attn, "layer_idx", i) for layer, i in
                         zip(self.layers, self.layer_indices)])
        self._slots = torch.arange(length, device=self.device)

    def _captured(self, length: int) -> _Captured:
        """The step for `length` input tokens as a CUDA graph, recorded at its first use."""
        if length in self._graphs:
            return self._graphs[length]
        if length == 1:
            ids, position, last = self._ids, self._pos, None
        else:
            ids = torch.zeros(1, length, dtype=torch.long, device=self.device)
            position = torch.arange(length, device=self.device)
            last = torch.zeros(1, dtype=torch.long, device=self.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            # Warm-up off the capture: Triton autotunes, cuBLAS picks its kernels. It writes
            # K/V that the replay then writes again.
            for _ in range(2):
                self._forward(ids, position, last)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._forward(ids, position, last)
        self._graphs[length] = _Captured(graph, ids, position, last, logits)
        return self._graphs[length]

    def _prefill(self, ids: list[int]) -> torch.Tensor:
        n = len(ids)
        if not self.pad_prompts:
            return self._forward(torch.tensor([ids], device=self.device),
                                 torch.arange(n, device=self.device))
        # The prompt is padded to a length bucket so that a few graphs serve every prompt; the
        # padding comes after the prompt, which attends causally, so it changes nothing the
        # prompt sees, and its K/V slots are masked until decoding overwrites them.
        length = prefill_bucket(n)
        padded = torch.tensor([ids + [0] * (length - n)], device=self.device)
        last = torch.tensor([n - 1], device=self.device)
        if not self.graphs:
            return self._forward(padded, torch.arange(length, device=self.device), last)
        step = self._captured(length)
        step.ids.copy_(padded)
        step.last.copy_(last)
        step.graph.replay()
        return step.logits

    def _decode(self, token: torch.Tensor, position: int) -> torch.Tensor:
        self._ids.copy_(token.view(1, 1))
        self._pos.fill_(position)
        if not self.graphs:
            return self._forward(self._ids, self._pos)
        step = self._captured(1)
        step.graph.replay()
        return step.logits

    # --- decoding ---------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, ids: list[int], *, max_new_tokens: int, stop_ids: list[int],
                 choose: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[int]:
        """Yields up to `max_new_tokens` new ids after `ids`, ending after a stop id.

        `choose(logits [1, V] fp32) -> [1]` picks each next token (argmax, or transformers'
        sampling warpers and a draw). The first prompt of a length bucket and the first
        decoding step are captured (on a CUDA device), later ones replayed.
        """
        n = len(ids)
        self._ensure_cache(max(n + max_new_tokens, prefill_bucket(n) if self.pad_prompts else n))
        logits = self._prefill(ids)
        for i in range(max_new_tokens):
            token = choose(logits)
            value = int(token)  # the one host sync of a step: stream it, check the stop
            yield value
            if value in stop_ids or i == max_new_tokens - 1:
                return
            logits = self._decode(token, n + i)
