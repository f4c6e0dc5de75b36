"""One optimizer step as one unit: the loss of its micro-batches, backward, gradient sync, clip,
update. Its inputs are tensors already on the device (and what a family's batches worked out on
the host, `packing.FORWARD_CONTEXT`) and it reads nothing back to the host, so a step can run
ahead of the Python that queued it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from llamalora.attention import (graph_kernels, sequence_mask, static_forward,
                                 uses_varlen_text_attention, varlen_kwargs)
from llamalora.errors import first_line
from llamalora.packing import FORWARD_CONTEXT, IGNORE_INDEX

# Response positions whose logits one pass of `_LinearCrossEntropy` holds: 2,048 x 128,256
# words in fp32 is 1 GiB (plus as much for logsumexp's scratch), where a 16k-token answer's
# logits at once are 8 GiB and their fp32 copy and gradient as much again.
LOSS_ROWS = 2048


def loss_sum(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over the tokens with a label, and their count.

    Logits are computed only at positions whose next token has a label: on prompt-masked data
    that skips most of the 128k-vocabulary projection, and no [batch, length, vocab] tensor is
    ever built (`response_loss`).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "target_index" in batch:
        return _static_loss_sum(base, batch)
    inputs = {k: v for k, v in batch.items() if k not in _HOST_MADE}
    inputs.update(_attention_inputs(base, batch, inputs))
    with batch.get(FORWARD_CONTEXT) or contextlib.nullcontext():
        hidden = base.model(**inputs, use_cache=False).last_hidden_state
    if "loss_index" in batch:  # made on the host (`packing.with_loss_index`): no sync
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, batch["loss_index"])
        targets = batch["loss_targets"]
    else:
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE_INDEX
        hidden, targets = hidden[:, :-1][keep], labels[keep]
    return response_loss(base.lm_head, hidden, targets)


# Keys of a batch that are not model inputs.
_HOST_MADE = ("labels", FORWARD_CONTEXT, "loss_index", "loss_targets", "cu_seqlens",
              "max_seqlen")
# Keys of a static row (`packing.pack_padded`) that are not model inputs.
_STATIC_MADE = ("cu_seqlens", "target_index", "target_ids")


def _attention_inputs(base, batch: dict, inputs: dict) -> dict:
    """What the model's text self-attention needs to keep each record of a row to itself: the
    records' lengths (`attention.varlen_kwargs`), or for a model on SDPA a packed row's mask.

    A row's records come from its `cu_seqlens` (`packing.with_loss_index`, `pack_padded`,
    whose padded length serves as the longest record, fixed with the shape); a bare `pack` row
    finds them in its position ids, which waits for the GPU; rows without either (one record,
    or records padded on the right) are each causal on their own.
    """
    ids = batch["input_ids"]
    rows, length = ids.shape
    cu, longest = batch.get("cu_seqlens"), batch.get("max_seqlen", length)
    if not uses_varlen_text_attention(base):  # transformers' own masks, or this one
        return {} if cu is None or rows > 1 else {"attention_mask": sequence_mask(cu, length)}
    if cu is None and rows == 1 and "position_ids" in batch:
        starts = (batch["position_ids"][0] == 0).nonzero()[:, 0]
        cu = torch.cat([starts, starts.new_full((1,), length)]).to(torch.int32)
    elif cu is None:
        cu = torch.arange(rows + 1, device=ids.device, dtype=torch.int32) * length
    inputs.pop("attention_mask", None)  # right padding: causal rows need no mask
    return varlen_kwargs(cu, longest)


def _static_loss_sum(base, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """`loss_sum` of a `packing.pack_padded` row (a family's, with its image inputs beside):
    every shape is fixed by the padded lengths and nothing reads the data's values back, so the
    pass can be captured in a CUDA graph."""
    inputs = {k: v for k, v in batch.items() if k not in _STATIC_MADE}
    inputs.update(_attention_inputs(base, batch, inputs))
    with static_forward():  # what depends on the data (attention runs) stays out
        hidden = base.model(**inputs, use_cache=False).last_hidden_state
    return response_loss(base.lm_head, hidden[0, batch["target_index"]], batch["target_ids"])


def response_loss(lm_head, hidden: torch.Tensor, targets: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy of `lm_head(hidden)` against `targets`, -100 ignored; the count
    of the others), in at least fp32 (bf16 logits lose the loss; float64 stays float64).

    A frozen plain `nn.Linear` head (every llamalora run's: LoRA never adapts lm_head) goes
    through `_LinearCrossEntropy`, `LOSS_ROWS` positions at a time; any other head (trainable,
    wrapped, sharded by FSDP) computes every position's logits at once, with autograd.
    """
    count = torch.count_nonzero(targets != IGNORE_INDEX)
    weight = getattr(lm_head, "weight", None)
    if type(lm_head) is torch.nn.Linear and lm_head.bias is None and not weight.requires_grad:
        return _LinearCrossEntropy.apply(hidden, weight, targets), count
    logits = lm_head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum"), count


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` (weight frozen), a chunk of positions at a
    time: forward computes each chunk's gradient to its hidden states at once and keeps only
    that ([positions, hidden], in the hidden states' dtype), never all the logits, as Liger
    Kernel's fused linear cross-entropy does. Backward scales it by the loss's gradient (the
    step's 1 / labelled tokens), where autograd would scale the logits' gradient before the
    matmul: one more rounding of a bf16 value. Every shape is fixed by the inputs' (a CUDA
    graph can hold it)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        acc = torch.promote_types(hidden.dtype, torch.float32)
        want_grad = ctx.needs_input_grad[0]
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad = torch.empty_like(hidden) if want_grad else None
        for start in range(0, hidden.shape[0], LOSS_ROWS):
            part = slice(start, start + LOSS_ROWS)
            loss, part_grad = _chunk_loss(hidden[part], weight, targets[part], acc, want_grad)
            total += loss
            if want_grad:
                grad[part] = part_grad
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None


def _chunk_loss(hidden, weight, targets, acc, want_grad: bool):
    """One chunk of `_LinearCrossEntropy`: (its summed loss, d loss / d hidden or None). The
    gradient of cross-entropy to the logits is softmax minus the target's one-hot."""
    logits = F.linear(hidden, weight).to(acc)
    lse = torch.logsumexp(logits, dim=-1)
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, 0)[:, None]
    weight_of = valid.to(acc)[:, None]
    loss = ((lse - logits.gather(1, safe)[:, 0]) * weight_of[:, 0]).sum()
    if not want_grad:
        return loss, None
    probs = logits.sub_(lse[:, None]).exp_()  # in place: one [chunk, vocab] buffer
    probs.scatter_add_(1, safe, -weight_of).mul_(weight_of)
    return loss, probs.to(hidden.dtype) @ weight


def to_device(batch: dict, device, dtype) -> dict:
    """The batch on `device`; floating tensors (pixels) in the compute dtype.

    Pixels go to a CUDA device in that dtype (half an fp32 copy's bytes) from pinned memory: a
    copy of tens of MB from pageable memory may hold the host until the GPU has run what was
    queued before it, and the recipe makes the next step's batch while a step runs. The token
    tensors are a few KB: pinned memory for each new size would cost more than it saves.
    """
    device = torch.device(device)
    out = {}
    for k, v in batch.items():
        if not isinstance(v, torch.Tensor):
            out[k] = v.to(device) if hasattr(v, "to") else v  # runs move; a length stays
            continue
        if v.is_floating_point():
            v = v.to(dtype)
            if device.type == "cuda" and v.device.type == "cpu":
                v = v.pin_memory()
        out[k] = v.to(device, non_blocking=True)
    return out


class TrainStep:
    """Forward and backward of one optimizer step's micro-batches, then the update.

    The loss is normalized over the whole step (`n_targets`: the labelled tokens of every
    micro-batch on every rank), so splitting a step into more micro-batches changes memory, not
    the update.

    Args:
        model: The LoRA-wrapped model (training mode).
        optimizer / scheduler: Built over `params`.
        params: The trainable parameters.
        parallel: The run's `parallel` strategy (gradient sync, fillers).
        max_grad_norm: Clip the gradients' global norm to this (0: no clipping).
    """

    failure = ""  # GraphedStep: why its graphs could not be captured (the steps run eagerly)

    def __init__(self, model, optimizer, scheduler, params: list, parallel, max_grad_norm: float):
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.params = params
        self.parallel = parallel
        self.max_grad_norm = max_grad_norm

    def __call__(self, batches: list[dict], n_targets: float
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Runs the step; returns (summed loss over its labelled tokens, this rank's part, as a
        float64 tensor; the gradient norm before clipping, or None without clipping)."""
        device = self.params[0].device
        step_loss = torch.zeros((), dtype=torch.float64, device=device)
        # Under FSDP every rank must run as many passes as the busiest one.
        self.parallel.even_out(len(batches), lambda b: loss_sum(self.model, b)[0].backward())
        for batch in batches:
            loss, _ = loss_sum(self.model, batch)
            (loss / max(n_targets, 1.0)).backward()
            step_loss += loss.detach().double()
        return step_loss, self._update()

    def _update(self) -> torch.Tensor | None:
        """Gradient sync, clipping, the optimizer and schedule steps; returns the norm before
        clipping (None without clipping). Gradients are None afterwards."""
        self.parallel.sync_gradients(self.params)
        norm = None
        if self.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm


class GraphedStep(TrainStep):
    """`TrainStep` whose forward and backward replay a CUDA graph: one per padded shape.

    At LoRA batch sizes the eager step is bound by the host: a decoder layer launches ~180
    kernels per forward and backward, each costing more host time than GPU time, so the GPU
    waits. A graph replays the whole pass with one launch. A step takes `pack_padded` rows (its
    micro-batches fused up to a token budget), whose shapes repeat: each set of input shapes is
    warmed up and captured once (`warm`: the recipe captures the first step's before it and the
    rest right after it), later passes of those shapes only copy their inputs in and replay. A
    static row carries nothing worked out from the data on the host (a graph would replay the
    first row's): its forward runs under `attention.static_forward`, whose paths are fixed by the
    row's shapes (a family's attention that picks its work by the data takes its fixed one).
    The optimizer update stays outside the graph (fused AdamW is a few launches), so a graph
    never bakes in a learning rate and the first steps need no special optimizer state.
    """

    WARMUP = 2  # eager passes before a capture: autograd, cuBLAS and Triton set up outside it

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # each input's name and shape (`packing.static_shape` fixes them)
        self.graphs: dict[tuple, _Graph] = {}
        self._sum: list = []  # a step's gradients summed over its rows, per parameter
        self._pool = None  # one memory pool for every graph: they never run at the same time

    def __call__(self, batches: list[dict], n_targets: float
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.failure:
            return super().__call__(batches, n_targets)
        try:
            graphs = [self._graph_for(batch) for batch in batches]
        except RuntimeError as exc:
            self._give_up(exc)
            return super().__call__(batches, n_targets)
        step_loss = None
        for index, (graph, batch) in enumerate(zip(graphs, batches)):
            for name, tensor in graph.inputs.items():
                tensor.copy_(batch[name], non_blocking=True)
            graph.scale.fill_(1.0 / max(n_targets, 1.0))
            graph.graph.replay()
            step_loss = graph.loss.clone() if step_loss is None else step_loss + graph.loss
            if len(batches) > 1:  # rows of one step: the next replay rewrites the buffers
                self._add_grads(index, graph.grads)
        # The graph owns the gradient buffers: lent to the parameters for the update only.
        grads = self._sum if len(batches) > 1 else graphs[0].grads
        for p, grad in zip(self.params, grads):
            p.grad = grad
        return step_loss, self._update()

    def _add_grads(self, index: int, grads: list) -> None:
        """Sums the rows' gradients per parameter. A parameter a pass never reaches has none
        (as in an eager step), and which those are can differ between rows: a text row leaves
        out the LoRA of layers only images run, a row with images does not."""
        if index == 0:
            self._sum = [None if g is None else g.clone() for g in grads]
            return
        both = [(s, g) for s, g in zip(self._sum, grads) if s is not None and g is not None]
        if both:
            torch._foreach_add_([s for s, _ in both], [g for _, g in both])
        self._sum = [g.clone() if s is None and g is not None else s
                     for s, g in zip(self._sum, grads)]

    def warm(self, batches: list[dict]) -> int:
        """Captures a graph for each batch's shape now (values don't matter), so no step of
        the run waits on a capture. Returns how many graphs there are."""
        try:
            for batch in batches:
                self._graph_for(batch)
        except RuntimeError as exc:
            self._give_up(exc)
        return len(self.graphs)

    def _give_up(self, exc: RuntimeError) -> None:
        """Something in the pass can't be captured (a host sync, say): the run goes on eagerly,
        and the recipe says why (`failure`)."""
        self.failure = first_line(exc, limit=300)
        self.graphs.clear()
        self.optimizer.zero_grad(set_to_none=True)  # what a half-done warm-up left
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def _graph_for(self, batch: dict) -> _Graph:
        key = tuple((name, tuple(tensor.shape)) for name, tensor in sorted(batch.items()))
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._capture(batch)
        return graph

    def _capture(self, batch: dict) -> _Graph:
        # The warm-up passes draw dropout masks; the generators are put back afterwards, so a
        # run's random stream (and a resumed run's) doesn't depend on how many shapes it captured.
        cpu, cuda = torch.get_rng_state(), torch.cuda.get_rng_state()
        try:
            return self._capture_with(batch)
        finally:
            torch.set_rng_state(cpu)
            torch.cuda.set_rng_state(cuda)

    def _capture_with(self, batch: dict) -> _Graph:
        inputs = {name: tensor.clone() for name, tensor in batch.items()}
        scale = torch.ones((), dtype=torch.float32, device=self.params[0].device)

        def forward_backward():
            loss, _ = loss_sum(self.model, inputs)
            (loss * scale).backward()
            return loss.detach().double()

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with graph_kernels():
            with torch.cuda.stream(side):
                for _ in range(self.WARMUP):
                    forward_backward()
                    for p in self.params:
                        p.grad = None
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                loss = forward_backward()
        self._pool = graph.pool()
        grads = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        return _Graph(graph, inputs, scale, loss, grads)


class _Graph:
    """One captured pass: its graph, the static tensors it reads and writes."""

    def __init__(self, graph, inputs: dict, scale, loss, grads: list):
        self.graph, self.inputs, self.scale, self.loss, self.grads = graph, inputs, scale, loss, grads
