"""Long records: packed text self-attention through the varlen seam (no [L, L] mask), the
response loss in chunks, and what the plan turns on for a record that won't fit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llamalora import attention, step
from llamalora.packing import pack, pack_padded, with_loss_index
from llamalora.step import loss_sum, response_loss

from conftest import make_records, tiny_lora_model


def _records(lengths: list[int], seed: int = 0):
    return make_records(lengths, seed, prompt_share=1 / 3)


def _loss_and_grads(model, batch: dict):
    loss, n = loss_sum(model, batch)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), int(n), grads


def _per_record(q, k, v, cu_seqlens, max_seqlen, scale):
    """A stand-in for flash attention's varlen kernel with its contract (tokens [n, heads,
    dim], key heads shared by query heads, causal within each record), one record at a time."""
    assert q.shape[0] == k.shape[0] and max_seqlen >= int(cu_seqlens.diff().max())
    out = torch.zeros_like(q)
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            out[a:b] = F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                is_causal=True, scale=scale, enable_gqa=True).transpose(0, 1)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["masked", "flash"])
def test_varlen_seam_equals_masked_attention_for_packed_rows(monkeypatch, kernel):
    """fp64 on the CPU: a packed row and a static row (zero-length records to its slot count)
    through `_text_attention` give the loss and LoRA gradients of SDPA with transformers' own
    mask for the records it finds in the position ids. `flash` runs the kernel's branch with a
    per-record stand-in for the kernel, which checks the layout the kernel is given."""
    model = tiny_lora_model(torch.float64)
    assert attention.uses_varlen_text_attention(model)
    items = _records([37, 12, 60, 5], seed=3)
    lengths = [len(t) for t in items]
    attention.use_varlen_text_attention(model, enable=False)
    assert not attention.uses_varlen_text_attention(model)
    reference = _loss_and_grads(model, pack(items))  # SDPA, transformers' mask
    assert attention.use_varlen_text_attention(model) == 2  # the tiny model's self-attention
    if kernel == "flash":
        monkeypatch.setattr(attention, "_takes_text_flash", lambda tensor: True)
        monkeypatch.setattr(attention, "_flash_text", _per_record)
    from transformers import AttentionInterface

    calls = []
    seam = attention._text_attention
    monkeypatch.setitem(AttentionInterface._global_mapping, attention.TEXT,
                        lambda *a, **k: calls.append(k.get("llamalora_cu_seqlens")) or seam(*a, **k))
    packed = with_loss_index(pack(items), lengths)
    assert packed["cu_seqlens"].tolist() == [0, 37, 49, 109, 114]
    for batch in (packed, pack_padded(items, pad_id=128004)):
        calls.clear()
        loss, n, grads = _loss_and_grads(model, batch)
        assert len(calls) == 2 and all(c is not None for c in calls)  # every layer, varlen
        assert n == reference[1]
        torch.testing.assert_close(loss, reference[0], rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(grads, reference[2], rtol=1e-9, atol=1e-11)
    # the lengths decide the result: one record over the row is another loss
    wrong = {**packed, "cu_seqlens": torch.tensor([0, sum(lengths)], dtype=torch.int32),
             "max_seqlen": sum(lengths)}
    assert not torch.allclose(loss_sum(model, wrong)[0].detach(), reference[0])


def test_sequence_mask_keeps_each_record_causal_and_to_itself():
    cu = torch.tensor([0, 2, 5, 6, 6, 6], dtype=torch.int32)
    mask = attention.sequence_mask(cu, 6)[0, 0].int()
    assert mask.tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0],
                             [0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0],
                             [0, 0, 0, 0, 0, 1]]


def test_padded_rows_carry_no_mask_to_the_varlen_seam():
    """Rows padded on the right need no mask: each row is causal on its own (its padding after
    its tokens), which `varlen_kwargs` describes as one record a row."""
    from types import SimpleNamespace

    batch = {"input_ids": torch.zeros(3, 5, dtype=torch.long),
             "attention_mask": torch.ones(3, 5, dtype=torch.long)}
    base = SimpleNamespace(**{attention._VARLEN_FLAG: True})
    inputs = dict(batch)
    kwargs = step._attention_inputs(base, batch, inputs)
    assert "attention_mask" not in inputs
    assert kwargs["llamalora_cu_seqlens"].tolist() == [0, 5, 10, 15]
    assert kwargs["llamalora_max_seqlen"] == 5


def _head(vocab: int, hidden: int, trainable: bool = False):
    head = torch.nn.Linear(hidden, vocab, bias=False, dtype=torch.float64)
    head.weight.requires_grad_(trainable)
    return head


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_chunked_response_loss_and_gradients_equal_the_full_loss(monkeypatch, rows):
    """fp64: `response_loss` a few positions at a time (`LOSS_ROWS`, lowered here) gives the
    summed cross-entropy of all the logits at once and its gradient to the hidden states,
    with ignored (-100) positions in chunks of their own and among others."""
    monkeypatch.setattr(step, "LOSS_ROWS", rows)
    g = torch.Generator().manual_seed(0)
    head = _head(50, 16)
    hidden = torch.randn(23, 16, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (23,), generator=g)
    targets[[0, 3, 4, 5, 6, 7, 22]] = -100
    loss, count = response_loss(head, hidden, targets)
    assert count == 16
    (grad,) = torch.autograd.grad(loss * 0.37, hidden)  # the step scales the loss
    full = F.cross_entropy(head(hidden), targets, reduction="sum")
    (want,) = torch.autograd.grad(full * 0.37, hidden)
    torch.testing.assert_close(loss, full, rtol=1e-13, atol=0)
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-15)
    with torch.no_grad():  # eval: the same loss, no gradient kept
        torch.testing.assert_close(response_loss(head, hidden, targets)[0], full.detach())


def test_a_trainable_head_takes_the_full_logits_with_its_gradient():
    """`_LinearCrossEntropy` never computes the head's gradient: a head whose weight trains
    goes through autograd with every logit at once, and gets its gradient."""
    g = torch.Generator().manual_seed(1)
    head = _head(40, 8, trainable=True)
    hidden = torch.randn(9, 8, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 40, (9,), generator=g)
    loss, _ = response_loss(head, hidden, targets)
    assert loss.grad_fn is not None and "LinearCrossEntropy" not in type(loss.grad_fn).__name__
    loss.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_the_frozen_head_path_keeps_no_logits():
    """What backward keeps is the gradient to the hidden states, not a [positions, vocab]
    tensor: the loss's graph saves one tensor of the hidden states' shape."""
    head = _head(1000, 8)
    hidden = torch.randn(300, 8, dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t,
                                                  lambda t: t):
        response_loss(head, hidden, torch.randint(0, 1000, (300,)))
    assert saved == [hidden.shape]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_flash_varlen_equals_masked_attention_in_bf16():
    """The kernel itself: causal varlen flash attention with 4 query heads a key head, records
    of uneven lengths and trailing zero-length records, against SDPA with the dense mask in
    fp32, forward and gradients."""
    g = torch.Generator(device="cuda").manual_seed(0)
    lengths = [300, 17, 1024, 5, 700]
    n = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist(), n, n, n],
                      dtype=torch.int32, device="cuda")

    def rand(heads):
        return torch.randn(n, heads, 128, device="cuda", generator=g, dtype=torch.bfloat16,
                           requires_grad=True)

    q, k, v = rand(32), rand(8), rand(8)
    grad_out = torch.randn(n, 32, 128, device="cuda", generator=g, dtype=torch.bfloat16)
    scale = 128 ** -0.5
    out = attention._flash_text(q, k, v, cu, 2048, scale)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = attention._masked_text(*ref_in, cu, scale, 0.0)
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out.float())
    for got, want in ((out, ref), *zip(grads, ref_grads)):
        err = (got.float() - want).norm() / want.norm()
        assert err < 1e-2, err


def _eleven_b(tmp_path):
    """A model folder with the 11B's config and the bundled tokenizer, no weights: what the
    plan reads."""
    from transformers import AutoTokenizer

    from llamalora.families.mllama import default_config as mllama_default_config
    from llamalora.tokenizer import bundled_tokenizer_dir

    model = tmp_path / "11b"
    mllama_default_config().save_pretrained(model)
    AutoTokenizer.from_pretrained(bundled_tokenizer_dir()).save_pretrained(model)
    return model


def test_a_128k_token_record_plans_checkpointing_and_offload_on_80_gib(tmp_path):
    """One record of ~128k tokens at 8-bit (the 11B, text only): without checkpointing the
    plan needs hundreds of GiB; on an 80 GiB card it turns on checkpointing and keeps the
    checkpointed layer inputs in host memory, and says so with its estimates; on a 141 GiB card
    (an H200) checkpointing alone fits."""
    import json

    from llamalora.config import TrainConfig
    from llamalora.plan import choose_memory, plan_training

    words = " ".join(f"w{i % 997}" for i in range(64_000))  # 2 tokens a word
    (tmp_path / "long.jsonl").write_text(json.dumps(
        {"instruction": "Continue the text.", "output": words}) + "\n")
    plan = plan_training(TrainConfig(data_path=str(tmp_path / "long.jsonl"),
                                     model=str(_eleven_b(tmp_path)), output_dir=str(tmp_path / "o"),
                                     max_seq_length=131_072))
    assert 120_000 < plan.tokens_per_epoch <= 131_072 and plan.truncation.records_over == 0
    assert plan.memory_gib["8bit"] > 500  # no checkpointing
    on_80 = choose_memory(plan, "8bit", 80.0)
    assert (on_80.gradient_checkpointing, on_80.offload_activations) == (True, True)
    assert on_80.estimate_gib == plan.memory_gib_offloaded["8bit"] <= 0.9 * 80
    assert plan.memory_gib_checkpointed["8bit"] > 0.9 * 80  # checkpointing alone won't fit
    assert on_80.why.startswith("Gradient checkpointing on, each layer's input in host memory")
    assert f"{plan.memory_gib_checkpointed['8bit']} GiB" in on_80.why
    on_h200 = choose_memory(plan, "8bit", 141.0)
    assert (on_h200.gradient_checkpointing, on_h200.offload_activations) == (True, False)
    assert on_h200.estimate_gib == plan.memory_gib_checkpointed["8bit"]
    # asked not to offload on 80 GiB: as asked, and said that it may not fit
    kept = choose_memory(plan, "8bit", 80.0, offload_activations=False)
    assert not kept.offload_activations and "may not fit" in kept.why
    assert plan.to_dict()["estimated_peak_gib_offloaded"] == plan.memory_gib_offloaded


def test_the_estimate_grows_linearly_with_the_tokens():
    """No term grows with the square of the length (no mask; the loss in chunks): equal steps
    in tokens add equal memory once the loss chunk is full."""
    from llamalora.families.mllama import default_config as mllama_default_config
    from llamalora.plan import count_params, estimate_peak_gib

    counts = count_params(mllama_default_config(), with_vision=False)
    for ckpt, offload in ((False, False), (True, False), (True, True)):
        at = [estimate_peak_gib(counts, quant="8bit", tokens=n, gradient_checkpointing=ckpt,
                                lora_params=0, offload=offload)
              for n in (32_000, 64_000, 96_000, 128_000)]
        steps = [b - a for a, b in zip(at, at[1:])]
        assert max(steps) - min(steps) <= 0.2, (ckpt, offload, at)


def test_a_memory_cap_is_the_gpu_the_plan_fits(monkeypatch):
    """`torch.cuda.set_per_process_memory_fraction` stands in a smaller card: the run plans for
    the capped size (a 24 GiB cap on an 80 GiB card), not the card's."""
    from types import SimpleNamespace

    from llamalora.config import TrainConfig
    from llamalora.recipe import _choose_checkpointing

    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: SimpleNamespace(total_memory=80 * 2**30))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    plan = SimpleNamespace(memory_gib={"8bit": 30.0}, memory_gib_checkpointed={"8bit": 15.0},
                           memory_gib_offloaded={"8bit": 12.0})
    cuda, config = torch.device("cuda", 0), TrainConfig(data_path="x")
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)
    assert _choose_checkpointing(config, plan, cuda) == (False, False, "")
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 0.3)
    on, offload, why = _choose_checkpointing(config, plan, cuda)
    assert (on, offload) == (True, False) and "this GPU has 24 GiB" in why


def _lora_model(device: str = "cpu", dtype=torch.float64, **load):
    """`conftest.tiny_lora_model` with loading options (checkpointing, offload) and a device."""
    from llamalora.models.loading import load_model_for_training
    from llamalora.models.lora import attach_lora

    torch.manual_seed(0)
    model, _ = load_model_for_training("tiny", quant="none", device=device, **load)
    model = attach_lora(model, r=4, alpha=8, dropout=0.0).to(dtype)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model


@pytest.mark.slow
def test_checkpointed_layers_recompute_with_the_records_lengths(monkeypatch):
    """A checkpointed layer's recompute in backward sees the row's records too (they travel as
    the layers' keyword arguments, which checkpointing keeps): the loss and gradients of the
    packed row without checkpointing, eager and static."""
    from transformers import AttentionInterface

    items = _records([37, 12, 60, 5], seed=3)
    batches = (with_loss_index(pack(items), [len(t) for t in items]),
               pack_padded(items, pad_id=128004))
    plain, checkpointed = _lora_model().train(), _lora_model(gradient_checkpointing=True).train()
    calls = []
    seam = attention._text_attention
    monkeypatch.setitem(AttentionInterface._global_mapping, attention.TEXT,
                        lambda *a, **k: calls.append(k.get("llamalora_cu_seqlens")) or seam(*a, **k))
    for batch in batches:
        calls.clear()
        want = _loss_and_grads(plain, batch)
        assert len(calls) == 2  # two self-attention layers, once each
        calls.clear()
        got = _loss_and_grads(checkpointed, batch)
        assert len(calls) == 4 and all(c is not None for c in calls)  # and their recompute
        torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(got[2], want[2], rtol=1e-9, atol=1e-11)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offloaded_checkpointing_on_the_gpu_gives_the_same_gradients():
    """Checkpointing with the layer inputs in pinned host memory (transformers' offload) and
    without: the same loss and gradients, bf16 through the flash kernel."""
    items = _records([300, 120, 700], seed=4)
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v
             for k, v in with_loss_index(pack(items), [len(t) for t in items]).items()}
    results = [_loss_and_grads(_lora_model("cuda", torch.bfloat16, gradient_checkpointing=True,
                                           offload_activations=offload).train(), batch)
               for offload in (False, True)]
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][2], results[0][2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphed_checkpointed_steps_equal_eager_steps():
    """CUDA graphs over checkpointed layers (`recipe.GRAPHS_WITH_CHECKPOINTING`): three steps in
    two static shapes give the eager checkpointed steps' losses and LoRA weights (fp32, no
    dropout: the graphs draw other masks than eager steps)."""
    from llamalora.step import GraphedStep, TrainStep

    class Alone:
        def even_out(self, count, run):
            pass

        def sync_gradients(self, params):
            pass

    runs = []
    for cls in (TrainStep, GraphedStep):
        model = _lora_model("cuda", torch.float32, gradient_checkpointing=True).train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        step = cls(model, opt, sched, params, Alone(), max_grad_norm=1.0)
        losses = []
        for i, lengths in enumerate([[30, 40], [50, 20], [100, 90]]):
            batch = {k: v.cuda() for k, v in pack_padded(_records(lengths, seed=i),
                                                          pad_id=0).items()}
            n = float((batch["target_ids"] != -100).sum())
            losses.append(step([batch], n)[0].item() / n)
        assert not step.failure, step.failure
        runs.append((losses, {k: v.detach().cpu() for k, v in model.named_parameters()
                              if v.requires_grad}))
    (eager, w_eager), (graphed, w_graphed) = runs
    torch.testing.assert_close(graphed, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w_graphed, w_eager, rtol=1e-3, atol=1e-5)


def test_a_fused_row_is_planned_at_the_whole_records_it_can_hold():
    """`plan.heaviest` with a row budget: the most whole records can fill (what
    `recipe.StepBatches.rows` can put in one row); at most the step's records."""
    from llamalora.plan import heaviest

    assert heaviest([3200] * 40, 4, budget=8192) == 6400  # a third record does not fit
    assert heaviest([5000, 3000, 190, 100], 4, budget=8192) == 8190
    assert heaviest([100] * 10, 4, budget=8192) == 400  # the step's 4 records
    assert heaviest([3200] * 4, 2) == 6400  # a micro-batch: its longest records
    # Not longest first: 5,000 leaves no room for a 4,000, but two 4,000s share a row
    assert heaviest([5000, 4000, 4000], 3, budget=8192) == 8000
    assert heaviest([9000, 100], 4, budget=8192) == 9000  # a record over the budget, alone
