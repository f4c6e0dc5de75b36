"""One optimizer step: the static (CUDA-graph) row equals the packed one; graphed steps equal
eager ones on a GPU."""

from __future__ import annotations

import pytest
import torch

from llamalora.packing import pack, pack_padded, padded_length
from llamalora.step import GraphedStep, TrainStep, loss_sum

from conftest import make_records, tiny_lora_model


def _records(lengths: list[int], seed: int = 0):
    return make_records(lengths, seed, prompt_share=1 / 3)


def test_padded_lengths_are_few_and_cover():
    assert [padded_length(n) for n in (0, 1, 128, 129, 1024, 1025, 1281)] == [
        128, 128, 128, 256, 1024, 1280, 1536]
    assert len({padded_length(n) for n in range(1, 2049)}) == 12  # 8 up to 1,024, 4 beyond


def test_pack_padded_layout():
    a, b = _records([5, 4])
    batch = pack_padded([a, b], pad_id=7)
    assert batch["input_ids"].shape == (1, 128)
    assert batch["input_ids"][0, 9:].eq(7).all()
    # the records, the padding as a record of its own, zero-length records to 8 slots
    assert batch["cu_seqlens"].tolist() == [0, 5, 9, 128, 128, 128, 128, 128, 128]
    assert batch["cu_seqlens"].dtype == torch.int32
    assert batch["position_ids"][0, :11].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1]
    # positions p whose next token has a label, and that label; within a record only
    want = [(p, a.labels[p + 1]) for p in range(4) if a.labels[p + 1] != -100] + \
        [(5 + p, b.labels[p + 1]) for p in range(3) if b.labels[p + 1] != -100]
    n = len(want)
    assert list(zip(batch["target_index"][:n].tolist(), batch["target_ids"][:n].tolist())) == want
    assert batch["target_ids"][n:].eq(-100).all() and batch["target_ids"].shape == (128,)


@pytest.mark.slow
def test_static_row_loss_and_gradients_equal_the_packed_row():
    model = tiny_lora_model(torch.float64)
    items = _records([37, 12, 60, 5], seed=3)
    results = []
    for batch in (pack(items), pack_padded(items, pad_id=128004)):
        loss, n = loss_sum(model, batch)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        results.append((loss.detach(), int(n), grads))
    (packed, n_packed, g_packed), (static, n_static, g_static) = results
    assert n_packed == n_static == sum(sum(x != -100 for x in t.labels[1:]) for t in items)
    torch.testing.assert_close(static, packed)
    torch.testing.assert_close(g_static, g_packed)


class _Null:
    def even_out(self, count, run):
        pass

    def sync_gradients(self, params):
        pass


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphed_steps_equal_eager_steps():
    """Five steps, two of them of two rows, in two padded shapes (graphs are replayed): the
    same losses and LoRA weights as eager steps, in fp32 so only summation order differs."""
    from llamalora.models.loading import load_model_for_training
    from llamalora.models.lora import attach_lora

    runs = []
    for cls in (TrainStep, GraphedStep):
        torch.manual_seed(0)
        model, _ = load_model_for_training("tiny", quant="none", device="cuda", dtype="float32")
        model = attach_lora(model, r=4, alpha=8, dropout=0.0)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        step = cls(model, opt, sched, params, _Null(), max_grad_norm=1.0)
        losses = []
        # rows per step: one, or two (whose gradients the graphed step sums)
        plan = [[[30, 40]], [[50, 20]], [[100, 90], [20]], [[35, 35]], [[60, 10], [30, 40]]]
        for i, rows in enumerate(plan):
            batches = [{k: v.cuda() for k, v in pack_padded(_records(r, seed=i * 3 + j),
                                                              pad_id=0).items()}
                       for j, r in enumerate(rows)]
            n = float(sum((b["target_ids"] != -100).sum() for b in batches))
            loss, _ = step(batches, n)
            losses.append(loss.item() / n)
        runs.append((losses, {k: v.detach().cpu() for k, v in model.named_parameters()
                              if v.requires_grad}, getattr(step, "graphs", {})))
    (eager, w_eager, _), (graphed, w_graphed, graphs) = runs
    assert len(graphs) == 2  # (128, 128) and (256, 128)
    torch.testing.assert_close(graphed, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w_graphed, w_eager, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_a_failed_capture_falls_back_to_eager_steps(monkeypatch):
    """If a pass can't be captured, the step says why and runs eagerly: the same update as
    `TrainStep` (the fallback runs on the CPU too, where capture is never tried)."""
    runs = []
    for cls in (TrainStep, GraphedStep):
        model = tiny_lora_model()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        step = cls(model, opt, sched, params, _Null(), max_grad_norm=1.0)
        if cls is GraphedStep:
            def refuse(batch):
                raise RuntimeError("operation not permitted when stream is capturing\nmore")
            monkeypatch.setattr(step, "_capture", refuse)
        batch = pack_padded(_records([30, 40], seed=1), pad_id=0)
        n = float((batch["target_ids"] != -100).sum())
        losses = [step([batch], n)[0].item() for _ in range(2)]
        runs.append((losses, step, {k: v.detach().clone() for k, v in model.named_parameters()
                                    if v.requires_grad}))
    (eager, _, w_eager), (fallback, graphed, w_fallback) = runs
    assert graphed.failure == "RuntimeError: operation not permitted when stream is capturing"
    assert graphed.graphs == {} and TrainStep.failure == ""
    assert fallback == eager
    torch.testing.assert_close(w_fallback, w_eager, rtol=0, atol=0)


def test_graphed_rows_gradients_sum_per_parameter_when_rows_reach_different_ones():
    """A text row leaves cross-attention's LoRA without a gradient, a row with images does not:
    a step's rows are summed parameter by parameter, whichever row comes first."""
    from types import SimpleNamespace

    a, b, c = torch.ones(2), torch.full((3,), 2.0), torch.full((1,), 3.0)
    for rows, want in ((([a, None, b], [a, c, None]), [2 * a, c, b]),
                       (([a, None, None], [None, c, b], [a, c, b]), [2 * a, 2 * c, 2 * b])):
        step = SimpleNamespace(_sum=[])
        for index, grads in enumerate(rows):
            GraphedStep._add_grads(step, index, grads)
        assert len(step._sum) == len(want)
        for got, expected in zip(step._sum, want):
            torch.testing.assert_close(got, expected)
    assert a.tolist() == [1.0, 1.0]  # the graphs' own buffers are never added into
