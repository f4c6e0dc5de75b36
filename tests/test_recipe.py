"""The recipe's pieces that need no model: which records each step's passes take."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from llamalora.batching import Tokenized
from llamalora.families.base import TextBatches
from llamalora.packing import padded_length
from llamalora.recipe import StepBatches


def _batches(lengths: list[int], graphs: bool, steps: int = 3) -> StepBatches:
    train = [Tokenized(line=i, input_ids=[5] * n, labels=[-100] + [5] * (n - 1))
             for i, n in enumerate(lengths)]
    config = SimpleNamespace(batch_size=2, gradient_accumulation_steps=2, max_seq_length=100,
                             max_steps=steps, num_train_epochs=1, seed=0)
    plan = SimpleNamespace(train=train, steps=steps)
    par = SimpleNamespace(world_size=1, rank=0)
    setup = SimpleNamespace(compute_dtype="float32", graphs=graphs, packing=True, pad_id=0,
                            image_processor=None, batch_maker=TextBatches())
    return StepBatches(config, plan, par, setup, torch.device("cpu"))


def test_graphed_steps_fuse_micro_batches_up_to_one_micro_batch_of_tokens():
    lengths = [90, 10, 20, 30, 95, 95, 5, 5, 60, 40, 50, 50]
    eager, graphed = _batches(lengths, graphs=False), _batches(lengths, graphs=True)
    for step in range(3):
        micro = eager.rows(step)
        rows = graphed.rows(step)
        assert len(micro) == 2 and all(len(b) == 2 for b in micro)
        # the same records, in as few rows as fit batch size x max length (200) tokens
        assert [t.line for b in rows for t in b] == [t.line for b in micro for t in b]
        assert all(sum(map(len, r)) <= 200 for r in rows)
        assert all(sum(map(len, a)) + len(b[0]) > 200 for a, b in zip(rows, rows[1:]))
    batches, n_targets, n_real = graphed(0)
    assert n_real == sum(len(t) for r in graphed.rows(0) for t in r)
    assert n_targets == n_real - sum(len(r) for r in graphed.rows(0))  # first labels are -100
    assert all(b["input_ids"].shape[1] == padded_length(b["input_ids"].shape[1]) for b in batches)


def test_shape_examples_cover_every_step_once_per_shape():
    lengths = [90, 10, 20, 30, 95, 95, 5, 5, 60, 40, 50, 50]
    graphed = _batches(lengths, graphs=True)
    shapes = {(b["input_ids"].shape[1], b["target_ids"].shape[0])
              for b in graphed.shape_examples(0)}
    used = set()
    for step in range(3):
        for b in graphed(step)[0]:
            used.add((b["input_ids"].shape[1], b["target_ids"].shape[0]))
    assert shapes == used


def test_graphs_of_the_first_step_are_captured_before_it_the_rest_after_it():
    """`_capture_graphs`: the first step waits only for its own shapes' captures; every other
    shape is captured once, when the loop calls back after that step (none after a failure)."""
    from llamalora.recipe import _capture_graphs

    class Step:
        failure = ""

        def __init__(self):
            self.calls = []

        def warm(self, batches):
            self.calls.append([(b["input_ids"].shape[1], b["target_ids"].shape[0])
                               for b in batches])

    lengths = [65, 64, 90, 95, 10, 10, 60, 70, 100, 99, 40, 45]
    shape = lambda b: (b["input_ids"].shape[1], b["target_ids"].shape[0])  # noqa: E731
    for start in (0, 1, 2):  # 1, 2: a resumed run, whose first step is its own
        graphed, step, said = _batches(lengths, graphs=True), Step(), []
        rest = _capture_graphs(step, graphed, start, said.append)
        assert step.calls == [list(dict.fromkeys(shape(b) for b in graphed(start)[0]))]
        rest()
        later = {shape(b) for s in range(start, 3) for b in graphed(s)[0]} - set(step.calls[0])
        assert bool(later) == (start < 2)  # the last step uses both shapes
        assert step.calls[1:] == ([sorted(later)] if later else [])
        assert [e.message.split(",")[0] for e in said] == [
            f"Captured {len(step.calls[0])} CUDA graph(s) for the first step",
            *([f"Captured {len(later)} CUDA graph(s) for the other steps"] if later else [])]
    step = Step()
    step.failure = "RuntimeError: no capture here"
    _capture_graphs(step, _batches(lengths, graphs=True), 0, said.append)()
    assert step.calls == []


def test_cuda_graphs_are_chosen_only_where_they_were_measured(monkeypatch):
    from llamalora.config import TrainConfig
    from llamalora.parallel import Sharded, Single
    from llamalora.recipe import _choose_graphs

    class Props:
        total_memory = 40 * 2**30

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: Props())
    plan = SimpleNamespace(with_vision=False, memory_gib_fused={"8bit": 20.0, "none": 50.0},
                           memory_gib_fused_checkpointed={"8bit": 12.0, "none": 30.0})
    cuda, cpu, one = torch.device("cuda", 0), torch.device("cpu"), Single()
    cfg = lambda **kw: TrainConfig(data_path="x", **kw)  # noqa: E731
    assert _choose_graphs(cfg(), plan, cuda, False, one) == (True, "")
    assert _choose_graphs(cfg(), plan, cpu, False, one) == (False, "")
    assert _choose_graphs(cfg(cuda_graphs=True), plan, cpu, False, one) == (
        False, "--cuda-graphs ignored: they need a CUDA GPU")
    on, why = _choose_graphs(cfg(quant="none"), plan, cuda, False, one)  # 50 GiB > 0.9 x 40
    assert not on and "50.0 GiB" in why and "40 GiB" in why
    assert _choose_graphs(cfg(quant="none", cuda_graphs=True), plan, cuda, False, one) == (
        True, "")
    assert _choose_graphs(cfg(cuda_graphs=False), plan, cuda, False, one) == (False, "")
    # checkpointed graphs: the fused row's checkpointed estimate must fit (30 GiB <= 36)
    assert _choose_graphs(cfg(quant="none"), plan, cuda, True, one) == (True, "")
    monkeypatch.setattr("llamalora.recipe.GRAPHS_WITH_CHECKPOINTING", False)
    assert _choose_graphs(cfg(), plan, cuda, True, one) == (False, "")
    monkeypatch.setattr("llamalora.recipe.GRAPHS_WITH_CHECKPOINTING", True)
    assert _choose_graphs(cfg(cuda_graphs=True), plan, cuda, True, one, offload=True) == (
        False, "--cuda-graphs ignored: not with --offload-activations")
    # --no-packing: the batches stay as asked, padded and eager
    assert _choose_graphs(cfg(packing=False), plan, cuda, False, one) == (False, "")
    assert _choose_graphs(cfg(packing=False, cuda_graphs=True), plan, cuda, False, one) == (
        False, "--cuda-graphs ignored: not with --no-packing")
    # records with images: the plan's graphed estimate (a micro-batch a pass) must fit
    vision = SimpleNamespace(with_vision=True, memory_gib_fused={"8bit": 34.0, "none": 51.0},
                             memory_gib_fused_checkpointed={"8bit": 20.0, "none": 37.0})
    assert _choose_graphs(cfg(), vision, cuda, False, one) == (True, "")  # 34 GiB <= 36
    on, why = _choose_graphs(cfg(quant="none"), vision, cuda, False, one)  # 51 GiB > 36
    assert not on and why == ("CUDA graphs off: a micro-batch of 2 records with their images "
                              "needs an estimated 51.0 GiB with them, this GPU has 40 GiB")
    assert _choose_graphs(cfg(quant="none", cuda_graphs=True), vision, cuda, False, one) == (
        True, "")
    assert _choose_graphs(cfg(quant="none"), vision, cuda, True, one)[0] is False  # 37 > 36
    monkeypatch.setattr("llamalora.recipe.GRAPHS_WITH_CHECKPOINTING", False)
    assert _choose_graphs(cfg(cuda_graphs=True), vision, cuda, True, one) == (
        False, "--cuda-graphs ignored: not with gradient checkpointing")
    monkeypatch.setattr("llamalora.recipe.GRAPHS_WITH_CHECKPOINTING", True)
    fsdp = Sharded(0, 0, 2, settings=None)
    assert _choose_graphs(cfg(cuda_graphs=True), plan, cuda, False, fsdp) == (
        False, "--cuda-graphs ignored: not with FSDP")
    on, why = _choose_graphs(cfg(compile=True), plan, cuda, False, one)
    assert not on and "--compile" in why
    assert _choose_graphs(cfg(compile=True, cuda_graphs=True), plan, cuda, False, one) == (
        True, "")


def _run_fake_loop(steps: int, start: int, order: list, after_first=None) -> None:
    """`_run_steps` over fake steps and batches, recording into `order` each batch made
    ("batch", i), step run ("step", i) and loss read ("read", i)."""
    from llamalora.recipe import _run_steps

    class Step:
        failure = ""
        model = SimpleNamespace(train=lambda: None)
        scheduler = SimpleNamespace(get_last_lr=lambda: [1e-4])

        def __call__(self, micro, n_targets):
            order.append(("step", micro[0]))
            loss = torch.tensor(1.0, dtype=torch.float64)
            loss.item = lambda: order.append(("read", micro[0])) or 1.0
            return loss, None

    class Batches:
        device = torch.device("cpu")

        def __call__(self, index):
            order.append(("batch", index))
            return [index], 4, 10

        def epoch_at(self, done):
            return 0.0

    _run_steps(SimpleNamespace(eval_steps=0, save_steps=0), SimpleNamespace(steps=steps, eval=[]),
               SimpleNamespace(start_step=start), SimpleNamespace(sum=lambda x: x, any=lambda x: x),
               Step(), Batches(), SimpleNamespace(), SimpleNamespace(log=lambda event: None),
               lambda event: None, after_first=after_first)


def test_the_loop_calls_back_once_after_its_first_step():
    """`_run_steps` runs `after_first` (the captures of the other shapes) once, right after the
    run's first step, a resumed run's included, before the second step starts."""
    for start in (0, 2):
        order = []
        _run_fake_loop(5, start, order, after_first=lambda: order.append(("capture",)))
        steps = [e for e in order if e[0] in ("step", "capture")]
        assert steps == [("step", start), ("capture",)] + [("step", i)
                                                          for i in range(start + 1, 5)]


def test_the_loop_makes_the_next_batch_while_a_step_runs():
    """`_run_steps` asks for step N+1's batch after queueing step N and before reading its
    loss (the host works while the GPU does), each batch once, none past the last step; each
    step is fed its own batch."""
    order = []
    _run_fake_loop(4, 1, order)
    assert order == [("batch", 1), ("step", 1), ("batch", 2), ("read", 1),
                     ("step", 2), ("batch", 3), ("read", 2), ("step", 3), ("read", 3)]
