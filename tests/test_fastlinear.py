"""The fast base-layer paths (llamalora.quant.fastlinear) and padding-free packing.

CPU: the torch int8 and NF4 paths against exact references and against bitsandbytes, packing
against padding, and the Triton kernels' arithmetic under Triton's interpreter (when triton is
installed). GPU (`-m gpu`): the compiled kernels in bf16 at the 11B's shapes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from llamalora.config import TrainConfig
from llamalora.packing import collate, pack
from llamalora.quant import fastlinear
from llamalora.recipe import _choose_checkpointing
from llamalora.step import loss_sum

from conftest import MEMO, make_records as _records, needs_bnb, needs_triton, write_jsonl


def _int8_layer(out_features: int, in_features: int, seed: int = 0):
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    dense = torch.nn.Linear(in_features, out_features, bias=False)
    layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False,
                                threshold=6.0)
    layer.load_state_dict(dense.state_dict())
    layer = layer.to("cpu")  # quantizes: weight.data is int8 CB, weight.SCB the row absmax
    if layer.weight.dtype != torch.int8:  # older bnb quantize on the first .to(device) only
        layer.weight = bnb.nn.Int8Params(layer.weight.data, requires_grad=False,
                                         has_fp16_weights=False)._quantize("cpu")
    return dense, layer


def _dequantized(layer) -> torch.Tensor:
    return layer.weight.data.double() * fastlinear._int8_scales(layer).double()[:, None] / 127


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@needs_bnb
def test_torch_int8_path_is_exact_on_the_stored_weight_and_close_to_bitsandbytes():
    dense, layer = _int8_layer(48, 96)
    assert layer.weight.dtype == torch.int8
    x = torch.randn(2, 7, 96, requires_grad=True)
    model = torch.nn.Sequential(layer)
    plain_y = layer(x).detach()

    assert fastlinear.enable(model, "fast") == "int8-dequant (1 layers)"
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    w = _dequantized(layer)
    assert _rel(y, x.double() @ w.t()) < 1e-6
    assert _rel(x.grad, grad.double() @ w) < 1e-6
    # LLM.int8 also rounds the input to int8; the two agree to that rounding, and the fast path
    # is the closer one to the unquantized layer.
    assert _rel(y, plain_y) < 0.03
    exact = dense(x).detach()
    assert _rel(y, exact) <= _rel(plain_y, exact)

    fastlinear.disable(model)
    assert torch.equal(layer(x).detach(), plain_y)


@needs_bnb
def test_enable_reports_the_path_and_plain_or_cpu_auto_keep_bitsandbytes():
    _, layer = _int8_layer(16, 32)
    model = torch.nn.Sequential(layer)
    assert fastlinear.enable(model, "auto") == "bitsandbytes"  # CPU: bnb is the reference path
    assert "forward" not in vars(layer)
    assert fastlinear.enable(model, "plain") == "bitsandbytes"
    assert fastlinear.enable(torch.nn.Sequential(torch.nn.Linear(4, 4)), "fast").startswith("none")
    with pytest.raises(Exception, match="one of auto, fast, plain"):
        fastlinear.enable(model, "turbo")


@needs_bnb
def test_nf4_path_matches_bitsandbytes_and_keeps_no_dequantized_weight():
    import bitsandbytes as bnb

    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 32, bias=False)
    layer = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict(dense.state_dict())
    layer = layer.to("cpu")
    if getattr(layer.weight, "quant_state", None) is None:
        pytest.skip("this bitsandbytes does not quantize 4-bit weights on the CPU")
    x = torch.randn(5, 64, requires_grad=True)
    plain = layer(x).detach()
    model = torch.nn.Sequential(layer)
    assert fastlinear.enable(model, "fast") == "nf4-dequant (1 layers)"
    y = layer(x)
    y.sum().backward()
    w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert _rel(y, plain) < 1e-5
    assert _rel(x.grad, torch.ones(5, 32) @ w) < 1e-5


def test_pack_layout():
    a, b = _records([4, 3])
    batch = pack([a, b])
    assert batch["input_ids"].tolist() == [a.input_ids + b.input_ids]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    # each record's first label is masked, so no token learns across a boundary
    assert batch["labels"].tolist() == [[-100] + a.labels[1:] + [-100] + b.labels[1:]]
    assert "attention_mask" not in batch


def test_packed_loss_and_gradients_equal_the_padded_batch():
    from llamalora.models.loading import load_model_for_training
    from llamalora.models.lora import attach_lora

    model, _ = load_model_for_training("tiny", quant="none", device="cpu")
    model = attach_lora(model, r=4, alpha=8, dropout=0.0)
    for p in model.parameters():
        if p.requires_grad:  # LoRA B starts at zero; make the adapter matter
            torch.nn.init.normal_(p, std=0.05)
    items = _records([9, 23, 5, 17], seed=1)
    grads = []
    for batch in (collate(items, pad_id=0), pack(items)):
        model.zero_grad()
        loss, n = loss_sum(model, batch)
        loss.backward()
        # (the cross-attention layers' LoRA gets none: text-only batches skip those layers)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()
                                if p.requires_grad and p.grad is not None]))
        grads.append(loss.detach())
        assert int(n) == sum(sum(1 for x in t.labels[1:] if x != -100) for t in items)
    assert _rel(grads[3], grads[1]) < 1e-5  # summed loss
    assert _rel(grads[2], grads[0]) < 1e-4  # LoRA gradients


@pytest.mark.slow  # trains 25 steps at 8-bit
@needs_bnb
def test_training_on_the_fast_int8_path_learns(tmp_path):
    from llamalora.recipe import train

    data = write_jsonl(tmp_path / "d.jsonl", MEMO[:3])
    summary = train(TrainConfig(data_path=str(data), output_dir=str(tmp_path / "out"),
                                model="tiny", quant="8bit", kernels="fast",
                                batch_size=3, gradient_accumulation_steps=1, max_steps=25,
                                learning_rate=5e-3, lora_rank=8, save_steps=0, seed=0))
    assert summary.kernels.startswith("int8-dequant")
    assert summary.batches == "packed"
    losses = [r["loss"] for r in map(json.loads,
                                     (tmp_path / "out" / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]


def test_auto_checkpointing_follows_the_plan(monkeypatch):
    class FakePlan:
        memory_gib = {"8bit": 30.0, "4bit": 20.0, "none": 70.0}
        memory_gib_checkpointed = {"8bit": 15.0, "4bit": 10.0, "none": 40.0}
        memory_gib_offloaded = {"8bit": 12.0, "4bit": 8.0, "none": 25.0}

    class Props:
        total_memory = 40 * 2**30

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: Props())
    cuda = torch.device("cuda", 0)
    cfg = lambda **kw: TrainConfig(data_path="x", **kw)  # noqa: E731
    assert _choose_checkpointing(cfg(quant="8bit"), FakePlan, cuda) == (False, False, "")
    # 70 GiB without, 40 with checkpointing (> 0.9 x 40): its layer inputs go to the host too
    on, offload, why = _choose_checkpointing(cfg(quant="none"), FakePlan, cuda)
    assert on and offload and all(f"{x} GiB" in why for x in ("70.0", "40.0", "25.0"))
    assert _choose_checkpointing(cfg(quant="none", offload_activations=False), FakePlan,
                                 cuda)[:2] == (True, False)  # as asked, though it won't fit
    on, offload, why = _choose_checkpointing(cfg(quant="none", gradient_checkpointing=True),
                                             FakePlan, cuda)
    assert (on, offload) == (True, True) and why.startswith("Checkpointed layer inputs")
    assert _choose_checkpointing(cfg(quant="none", gradient_checkpointing=False), FakePlan,
                                 cuda) == (False, False, "")
    assert _choose_checkpointing(cfg(quant="8bit"), FakePlan, torch.device("cpu")) == (
        False, False, "")
    assert _choose_checkpointing(cfg(gradient_checkpointing=True, offload_activations=True),
                                 FakePlan, torch.device("cpu")) == (True, False, "")


# --- the Triton kernels' arithmetic, interpreted on the CPU ------------------------------------

_INTERPRETED = textwrap.dedent("""
    import torch
    import triton.runtime.interpreter as interp
    # triton 3.5-3.6's interpreter turns 1-element arrays into ints with int(), which numpy 2.4
    # refuses; read the element instead.
    _patch = interp._patch_lang_tensor
    def _fixed(tensor, scope):
        _patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    interp._patch_lang_tensor = _fixed
    from llamalora.quant import triton_int8 as T

    torch.manual_seed(0)
    worst = 0.0
    for M, K, N in [(1, 96, 80), (3, 160, 33), (4, 64, 200)]:
        cb = torch.randint(-127, 128, (N, K), dtype=torch.int8)
        scale = (torch.rand(N) + 0.5) / 127
        x = torch.randn(M, K)
        for cfg in (dict(BLOCK_N=16, BLOCK_K=32), dict(BLOCK_N=8, BLOCK_K=64)):
            got = T.gemv(x, cb, scale.reshape(-1, 1), config=cfg)
            ref = x.double() @ (cb.double() * scale.double()[:, None]).t()
            assert torch.isfinite(got).all()
            worst = max(worst, ((got.double() - ref).norm() / ref.norm()).item())
    # The dequantization: the fp32 product rounded once, bit for bit torch's (odd sizes hit the
    # tile edges). The interpreter rounds fp32 to bf16 toward zero where GPUs round to nearest
    # even (the GPU test checks that), so for bf16 it must equal the truncated product instead.
    for N, K in [(8, 1024), (5, 300), (70, 33)]:
        cb = torch.randint(-127, 128, (N, K), dtype=torch.int8)
        scale = ((torch.rand(N) + 0.5) / 127).reshape(-1, 1)
        product = cb.float() * scale
        truncated = (product.view(torch.int32) & -65536).view(torch.float32).bfloat16()
        for dtype in (torch.bfloat16, torch.float16):
            want = product.to(dtype)
            for block in ((4, 1024), (2, 64)):
                got = T.dequant(cb, scale, dtype, block=block)
                assert got.dtype == dtype and (torch.equal(got, want) if dtype == torch.float16
                                               else torch.equal(got, truncated)), (N, K, block)
    print(worst)
""")


@needs_triton
def test_triton_kernels_compute_the_dequantized_product_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip().splitlines()[-1]) < 1e-6


# --- GPU ----------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [1, 3, 77, 700])
@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)])
def test_int8_paths_on_gpu_match_the_dequantized_product(tokens, shape):
    out_f, in_f = shape
    cb = torch.randint(-127, 128, (out_f, in_f), dtype=torch.int8, device="cuda")
    scale = (torch.rand(out_f, 1, device="cuda") * 0.2 + 0.01) / 127
    w = cb.double() * scale.double()
    use_triton = fastlinear.triton_available(torch.device("cuda"))
    x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = fastlinear.int8_linear(x, cb, scale, use_triton)
    g = torch.randn_like(y)
    y.backward(g)
    assert _rel(y, x.double() @ w.t()) < 1e-2
    assert _rel(x.grad, g.double() @ w) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(14336, 4096), (4096, 14336), (1000, 300)])
@needs_triton
def test_triton_dequant_on_gpu_is_torchs_product_bit_for_bit(shape):
    from llamalora.quant import triton_int8

    cb = torch.randint(-127, 128, shape, dtype=torch.int8, device="cuda")
    scale = (torch.rand(shape[0], 1, device="cuda") * 0.2 + 0.01) / 127
    for dtype in (torch.bfloat16, torch.float16):
        want = torch.mul(cb, scale, out=torch.empty(shape, dtype=dtype, device="cuda"))
        assert torch.equal(triton_int8.dequant(cb, scale, dtype), want)


def test_auto_compile_is_for_long_text_runs_on_cuda():
    from llamalora.recipe import COMPILE_MIN_STEPS, _choose_compile

    class FakePlan:
        with_vision = False
        steps = COMPILE_MIN_STEPS

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    cfg = lambda **kw: TrainConfig(data_path="x", **kw)  # noqa: E731
    assert _choose_compile(cfg(), FakePlan, cuda, False) == (True, "")
    assert _choose_compile(cfg(), FakePlan, cpu, False) == (False, "")
    assert _choose_compile(cfg(), FakePlan, cuda, True) == (False, "")  # checkpointing: eager
    assert _choose_compile(cfg(), FakePlan, cuda, False, sharded=True) == (False, "")
    short = type("Short", (FakePlan,), {"steps": COMPILE_MIN_STEPS - 1})
    on, why = _choose_compile(cfg(), short, cuda, False)
    assert not on and "too few" in why
    assert _choose_compile(cfg(compile=True), short, cuda, False) == (True, "")
    vision = type("Vision", (FakePlan,), {"with_vision": True})
    on, why = _choose_compile(cfg(compile=True), vision, cuda, False)
    assert not on and "ignored" in why


@pytest.mark.parametrize("command", [["train", "d.jsonl", "--output-dir", "o"],
                                     ["chat", "--adapter", "a", "--prompt", "hi"]])
def test_unknown_kernels_is_one_usage_error(command, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from llamalora.cli.main import app

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}])
    r = CliRunner().invoke(app, [*command, "--kernels", "turbo"])
    assert r.exit_code == 2
    assert r.stderr.strip().startswith("Error:") and "auto, fast" in r.stderr
    assert "Traceback" not in r.output


def test_triton_is_used_only_where_it_can_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("LLAMALORA_NO_TRITON", raising=False)
    assert not fastlinear.triton_available(torch.device("cpu"))
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fastlinear.triton_available(torch.device("cpu"))
    monkeypatch.setenv("LLAMALORA_NO_TRITON", "1")  # the escape hatch README names
    assert not fastlinear.triton_available(torch.device("cpu"))


@pytest.mark.slow
@needs_bnb
def test_compiled_layers_match_eager_and_compile_once_for_every_length():
    """torch.compile on the CPU (inductor builds C++): ~1-2 minutes here."""
    import torch._dynamo

    from llamalora.models.lora import attach_lora

    from llamalora.models.loading import load_model_for_training
    from llamalora.speed import compile_layers

    def run(compiled: bool):
        torch.manual_seed(0)
        model, _ = load_model_for_training("tiny", quant="8bit", device="cpu")
        model = attach_lora(model, r=4, alpha=8, dropout=0.0)
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.05)
        fastlinear.enable(model, "fast")  # the int8 custom ops inside the compiled graph
        if compiled:
            assert compile_layers(model) == 3
        # Every layer (layer 0 included: its input requires grad like the others') and every
        # length must reuse the one graph: a recompile is an error.
        torch._dynamo.config.error_on_recompile = compiled
        out = []
        for i, lengths in enumerate(([9, 23, 5], [17, 30, 12], [40, 8, 3])):
            model.zero_grad()
            loss, _ = loss_sum(model, pack(_records(lengths, seed=i)))
            loss.backward()
            out.append((loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()
                                                  if p.grad is not None])))
        return out

    try:
        eager, compiled = run(False), run(True)
    finally:
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()
    for (le, ge), (lc, gc) in zip(eager, compiled):
        assert _rel(lc, le) < 1e-4
        assert _rel(gc, ge) < 1e-3


def test_compile_cache_key_carries_the_ops_source(monkeypatch):
    """A compile cache written by another version of the custom ops must not be reused (it
    would hand back that version's backward): compile_layers adds the ops' source hash to
    torch's cache key, after any tag of the user's, once."""
    import hashlib
    from pathlib import Path

    from llamalora import speed

    monkeypatch.setattr(torch.compiler.config, "cache_key_tag", "users-own")
    speed.tag_compile_cache()
    speed.tag_compile_cache()
    digest = hashlib.sha256(Path(fastlinear.__file__).read_bytes()).hexdigest()[:16]
    assert torch.compiler.config.cache_key_tag == f"users-own+llamalora-ops-{digest}"
