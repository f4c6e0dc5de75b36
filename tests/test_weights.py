"""Reading base weights with pread (llamalora.weights): the bytes safetensors reads, and the same
loaded model through transformers' loader, with and without quantization."""

from __future__ import annotations

import contextlib

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file

from llamalora import weights
from llamalora.models import loading, tiny

from conftest import needs_bnb

GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                           reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny.tiny_model_dir(tmp_path_factory.mktemp("tiny-cache"))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
def test_read_tensor_gives_the_bytes_safetensors_reads(tmp_path, monkeypatch, device):
    # Several chunks for the larger tensor (a small CHUNK: on CUDA both staging buffers in
    # turn), odd sizes, a scalar and an empty one.
    monkeypatch.setattr(weights, "CHUNK", 1000)
    tensors = {"big": torch.randn(37, 129).to(torch.bfloat16), "f32": torch.randn(5, 3),
               "ids": torch.arange(7, dtype=torch.int64), "mask": torch.rand(9) > 0.5,
               "scalar": torch.tensor(2.5, dtype=torch.float16),
               "empty": torch.zeros(0, 4, dtype=torch.int8)}
    path = str(tmp_path / "w.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    where = weights.tensor_locations(path)
    assert where.keys() == tensors.keys()
    reference = load_file(path)
    staging = weights._Staging().get(torch.device(device)) if device == "cuda" else None
    for name, loc in where.items():
        got = weights.read_tensor(loc, torch.device(device), staging)
        want = reference[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert got.device.type == device and torch.equal(got.cpu(), want), name


def test_a_truncated_file_is_an_error(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(100)}, str(path))
    where = weights.tensor_locations(str(path))["a"]
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(OSError, match="truncated"):
        weights.read_tensor(where, torch.device("cpu"))


def _load(tiny_dir, monkeypatch, quant: str, device: str, reads: list):
    """load_base_model with the pread path on `device` (the CPU here only for the test: a run
    takes it for CUDA devices), counting the tensors it read."""
    stock = weights.fast_reads

    @contextlib.contextmanager
    def counted(devices=("cuda",)):
        with stock(devices=(device,)) as ahead:
            yield ahead
            reads.append(ahead.reads if ahead is not None else 0)

    with monkeypatch.context() as patch:
        patch.setattr(weights, "fast_reads", counted)
        return loading.load_base_model(str(tiny_dir), quant=quant, device=device)[0]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
@pytest.mark.parametrize("quant", ["none", pytest.param("8bit", marks=needs_bnb)])
def test_the_loaded_model_equals_transformers_own_load(tiny_dir, monkeypatch, quant, device):
    """Through transformers' loader: its thread pool (none) and its one-at-a-time quantizing
    path (8bit, read ahead here). Every weight, int8 values and scales included, is the same."""
    reads: list[int] = []
    ours = _load(tiny_dir, monkeypatch, quant, device, reads)
    stock, _ = loading.load_base_model(str(tiny_dir), quant=quant, device=device)
    assert reads and reads[0] > 0, "transformers' loader did not take the pread path"
    a, b = ours.state_dict(), stock.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    if quant == "8bit":
        q = ours.model.layers[0].self_attn.q_proj
        assert q.weight.dtype == torch.int8 and q.weight.device.type == device
        assert torch.equal(q.weight.SCB, stock.model.layers[0].self_attn.q_proj.weight.SCB)


def test_read_ahead_serves_tensors_taken_out_of_order(tmp_path):
    tensors = {f"t{i}": torch.full((3,), float(i)) for i in range(10)}
    path = str(tmp_path / "w.safetensors")
    save_file(tensors, path)
    where = weights.tensor_locations(path)
    ahead = weights._ReadAhead(readers=2, lookahead=2)
    try:
        keys = [ahead.add(where[f"t{i}"], torch.device("cpu")) for i in range(10)]
        for i in [7, 0, 9, 1, 2, 3, 4, 5, 6, 8]:  # 7 and 9 were never started when taken
            assert torch.equal(ahead.take(keys[i]), tensors[f"t{i}"])
        assert ahead.reads == 10
    finally:
        ahead.close()


def test_a_loader_without_the_functions_taken_over_loads_as_before(monkeypatch):
    from transformers import core_model_loading

    monkeypatch.delattr(core_model_loading, "spawn_materialize")
    with weights.fast_reads() as ahead:
        assert ahead is None
