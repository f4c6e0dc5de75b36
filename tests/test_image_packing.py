"""Records with images packed into one row give the padded batch's loss and gradients (tiny
vision model, CPU, float64)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer

from llamalora.batching import tokenize_examples
from llamalora.data import load_examples
from llamalora.families.mllama import MllamaBatches
from llamalora.packing import FORWARD_CONTEXT, collate, pack
from llamalora.step import loss_sum
from llamalora.tokenizer import BUNDLED_TOKENIZER_DIR

from conftest import write_jsonl

TOK = Tokenizer.from_file(str(BUNDLED_TOKENIZER_DIR / "tokenizer.json"))
pytestmark = pytest.mark.slow


def _tiny_vision_lora(device="cpu", dtype=None, lora_b_std=0.2):
    """The tiny vision model with LoRA (r 4, no dropout), LoRA's B drawn (`lora_b_std`; 0 keeps
    peft's zeros) and the cross-attention gates opened (zero at init, as in Mllama's
    pretraining start) so that images change the loss."""
    from llamalora.models.loading import load_model_for_training
    from llamalora.models.lora import attach_lora

    torch.manual_seed(0)
    model, _ = load_model_for_training("tiny", quant="none", with_vision=True, device=device,
                                       dtype=dtype)
    model = attach_lora(model, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and lora_b_std:
                p.normal_(0, lora_b_std)
            if "cross_attn_attn_gate" in name or "cross_attn_mlp_gate" in name:
                p.fill_(0.8)
    return model


@pytest.fixture(scope="module")
def vision_model():
    return _tiny_vision_lora().to(torch.float64)


@pytest.fixture(scope="module")
def processor():
    from llamalora.models.loading import load_image_processor

    return load_image_processor("tiny")


def add_vision_inputs(batch, image_lists, processor):
    return MllamaBatches(image_processor=processor).add_images(batch, image_lists)


def pack_vision(items, processor):
    return MllamaBatches(image_processor=processor).pack_images(items)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Records with 0, 1 and 2 images of 1 and 2 tiles, one of them two turns long."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("imgs")
    Image.new("RGB", (60, 30), (200, 20, 20)).save(folder / "wide.png")  # 2 tiles
    Image.new("RGB", (24, 24), (0, 90, 200)).save(folder / "square.png")  # 1 tile
    Image.new("RGB", (20, 80), (10, 200, 10)).save(folder / "tall.png")  # 2 tiles
    recs = [
        {"instruction": "What is rebar?", "output": "A steel bar in concrete."},
        {"instruction": "What is shown?", "output": "A red form.", "image": "wide.png"},
        {"messages": [{"role": "user", "content": "<image>What is this?"},
                      {"role": "assistant", "content": "A blue tile."},
                      {"role": "user", "content": "And this one? <image>"},
                      {"role": "assistant", "content": "A green post."}],
         "images": ["square.png", "tall.png"]},
        {"instruction": "양생이란?", "input": "콘크리트", "output": "습도와 온도를 유지하는 일."},
        {"instruction": "Describe.", "output": "Blue.", "image": "square.png"},
    ]
    examples, _ = load_examples(write_jsonl(folder / "d.jsonl", recs))
    items, _ = tokenize_examples(TOK, examples, max_seq_length=512)
    assert [len(t.images) for t in items] == [0, 1, 2, 0, 1]
    return items


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss, n = loss_sum(model, batch)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), int(n), grads


def _assert_trains_alike(model, batch, reference, loss_tol, grad_rtol, grad_atol):
    """`batch` gives `reference`'s labelled-token count, loss and gradients."""
    ref_loss, ref_n, ref_grads = _loss_and_grads(model, reference)
    loss, n, grads = _loss_and_grads(model, batch)
    assert n == ref_n
    torch.testing.assert_close(loss, ref_loss, rtol=loss_tol, atol=loss_tol)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=grad_rtol, atol=grad_atol)


def test_packed_images_give_the_padded_loss_and_gradients(vision_model, processor, records):
    padded = add_vision_inputs(collate(records, pad_id=128004), [t.images for t in records],
                               processor)
    packed = pack_vision(records, processor)
    # One row; only the 4 real images reach the vision tower (the padded batch computes 5 rows
    # of 2 image slots: 10, a blank one for each text record among them).
    assert packed["input_ids"].shape[0] == 1 and packed["pixel_values"].shape[:2] == (1, 4)
    assert padded["pixel_values"].shape[:2] == (5, 2)
    _assert_trains_alike(vision_model, packed, padded, loss_tol=1e-9, grad_rtol=1e-7,
                         grad_atol=1e-9)
    assert any("cross_attn" in k for k in _loss_and_grads(vision_model, packed)[2])


def test_cross_attention_mask_is_block_diagonal_by_record(processor, records):
    packed = pack_vision(records, processor)
    mask = packed["cross_attention_mask"][0]  # [tokens, images, tiles]
    starts = [0]
    for t in records:
        starts.append(starts[-1] + len(t))
    image_of = [1, 2, 2, 4]  # the record of each of the 4 images, in order
    for image, record in enumerate(image_of):
        seen = mask[:, image].any(-1).nonzero()[:, 0]
        assert starts[record] <= int(seen.min()) and int(seen.max()) < starts[record + 1]
    # Text records and the tokens before a record's first <|image|> see nothing.
    for record in (0, 3):
        assert not mask[starts[record]:starts[record + 1]].any()
    # Tiles: a 1-tile image is seen on its first tile only.
    assert not mask[:, 1, 1:].any() and mask[:, 1, 0].any()  # square.png in record 2


def test_a_text_record_beside_images_is_trained_as_alone(vision_model, processor, records):
    """Tokens that see no image get nothing from cross-attention (as vLLM and SGLang run
    Mllama), so a text record's loss does not depend on the images packed next to it."""
    with torch.no_grad():
        alone, _ = loss_sum(vision_model, pack(records[:1]))
        beside, _ = loss_sum(vision_model, pack_vision(records[:2], processor))
        image_only, _ = loss_sum(vision_model, pack_vision(records[1:2], processor))
    torch.testing.assert_close(beside, alone + image_only, rtol=1e-9, atol=1e-9)


def _with_runs(batch, device="cpu"):
    from llamalora.families.mllama_attention import CrossAttentionRuns

    runs = CrossAttentionRuns.from_mask(batch["cross_attention_mask"].cpu()).to(device)
    return {**batch, FORWARD_CONTEXT: runs}


def test_cross_attention_by_runs_is_the_masked_attention(vision_model, processor, records,
                                                          tmp_path):
    """`mllama_attention.CrossAttentionRuns`: runs of tokens attend to just the tiles they see, with no
    mask; loss and gradients equal transformers' masked SDPA over the whole row (the same batch
    without runs), packed and padded, with two images side by side in one turn (the runs
    after them see tiles that are not consecutive: the index path)."""
    from PIL import Image

    from llamalora.families.mllama_attention import CROSS, VISION

    layers = {type(m).__name__: m.config._attn_implementation for m in vision_model.modules()
              if type(m).__name__ in ("MllamaVisionAttention", "MllamaTextCrossAttention")}
    assert layers == {"MllamaVisionAttention": VISION, "MllamaTextCrossAttention": CROSS}
    Image.new("RGB", (24, 24), (0, 90, 200)).save(tmp_path / "square.png")  # 1 tile
    Image.new("RGB", (60, 30), (200, 20, 20)).save(tmp_path / "wide.png")  # 2 tiles
    both = {"messages": [{"role": "user", "content": "<image><image>Compare them."},
                         {"role": "assistant", "content": "One is blue, one is red."}],
            "images": ["square.png", "wide.png"]}
    examples, _ = load_examples(write_jsonl(tmp_path / "d.jsonl", [both]))
    side_by_side, _ = tokenize_examples(TOK, examples, max_seq_length=512)
    items = records + side_by_side
    for batch in (pack_vision(items, processor),
                  add_vision_inputs(collate(items, pad_id=128004), [t.images for t in items],
                                    processor)):
        fast = _with_runs(batch)
        runs = fast[FORWARD_CONTEXT].rows
        assert any(isinstance(s, torch.Tensor) for row in runs for _, _, s in row)
        _assert_trains_alike(vision_model, fast, batch, loss_tol=1e-10, grad_rtol=1e-8,
                             grad_atol=1e-10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fast_attention_on_the_gpu_is_sdpas(processor, records):
    """On CUDA in bf16: the vision tower through cuDNN's attention, and cross-attention by runs
    (flash) or, as a static row takes it, with the dense mask on cuDNN, give the loss and
    gradients of transformers' SDPA (memory-efficient kernel, masks), within bf16 rounding."""
    import copy

    from llamalora.attention import static_forward
    from llamalora.step import to_device

    model = _tiny_vision_lora("cuda")
    batch = to_device(pack_vision(records, processor), torch.device("cuda"), torch.bfloat16)
    fast = _loss_and_grads(model, _with_runs(batch, "cuda"))
    with static_forward():  # the dense mask, as a static row takes it
        dense = _loss_and_grads(model, batch)
    for m in model.modules():  # back to transformers' own SDPA everywhere
        if type(m).__name__ in ("MllamaVisionAttention", "MllamaTextCrossAttention"):
            m.config = copy.copy(m.config)
            m.config._attn_implementation_internal = "sdpa"
    plain = _loss_and_grads(model, batch)
    for ours in (fast, dense):
        torch.testing.assert_close(ours[0], plain[0], rtol=2e-2, atol=1e-2)
        assert ours[2].keys() == plain[2].keys()
        for k in plain[2]:
            torch.testing.assert_close(ours[2][k].float(), plain[2][k].float(), rtol=5e-2,
                                       atol=5e-2)


def _vision_mask(tiles, max_tiles, patches, slot, dtype):
    """Mllama's vision attention mask for images of these many real tiles, as transformers
    builds it."""
    from transformers.models.mllama.modeling_mllama import _prepare_aspect_ratio_attention_mask

    aspect = torch.tensor([[1] * t + [0] * (max_tiles - t) for t in tiles])
    return _prepare_aspect_ratio_attention_mask(aspect, patches, slot, dtype)


def _varlen_reference(q, k, v, cu_q, cu_k, used_k, max_len, scale):
    """What `mllama_attention._flash_varlen` computes, one sequence at a time with plain SDPA."""
    import torch.nn.functional as F

    out = torch.zeros_like(q)
    for i in range(len(used_k)):
        a, b, start, n = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(used_k[i])
        assert b - a <= max_len and n <= max_len
        if b > a and n:
            out[a:b] = F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[start:start + n].transpose(0, 1),
                v[start:start + n].transpose(0, 1), scale=scale).transpose(0, 1)
    return out


def test_vision_attention_without_its_mask_is_the_masked_attention():
    """`mllama_attention._split_by_padding` (the vision tower's attention on CUDA: tokens reordered,
    then real queries over all keys and padding queries over the real keys) equals SDPA with
    Mllama's mask, in fp64, for images of 1, 4 and 2 real tiles out of 4; a padding image slot
    (no real tile) gets zeros."""
    import torch.nn.functional as F

    from llamalora.families.mllama_attention import _split_by_padding

    torch.manual_seed(0)
    tiles, heads, dim, patches, slot = [1, 4, 0, 2], 2, 8, 5, 8
    mask = _vision_mask(tiles, 4, patches, slot, torch.float64)
    q, k, v = (torch.randn(len(tiles), heads, 4 * slot, dim, dtype=torch.float64)
               for _ in range(3))
    out = _split_by_padding(q, k, v, mask, dim ** -0.5, _varlen_reference)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    assert out.shape == ref.shape
    real_images = [i for i, t in enumerate(tiles) if t]
    torch.testing.assert_close(out[real_images], ref[real_images], rtol=1e-12, atol=1e-12)
    assert torch.equal(out[2], torch.zeros_like(out[2]))


def test_vision_encoders_in_padding_order_give_the_masked_loss(vision_model, processor, records,
                                                             monkeypatch):
    """`mllama_attention._encoder_in_padding_order` (on CUDA: each vision encoder puts its tokens real
    first once, and every layer's attention reads them so): the loss and gradients of the
    model's own masked attention, fp64 on the CPU through the reference varlen kernel, the
    intermediate hidden states Mllama reads put back in its order."""
    from llamalora.families import mllama_attention as attention

    encoders = [m for m in vision_model.modules() if type(m).__name__ == "MllamaVisionEncoder"]
    assert len(encoders) == 2 and all(e._llamalora_padding_order for e in encoders)
    batch = pack_vision(records, processor)
    reference = _loss_and_grads(vision_model, batch)
    calls = []

    def kernel(*args):
        calls.append(args[0].shape)
        return _varlen_reference(*args)

    monkeypatch.setattr(attention, "_sortable", lambda *args: True)
    monkeypatch.setattr(attention, "_flash_varlen", kernel)
    loss, n, grads = _loss_and_grads(vision_model, batch)
    layers = sum(len(e.layers) for e in encoders)
    assert len(calls) == layers
    assert n == reference[1]
    torch.testing.assert_close(loss, reference[0], rtol=1e-10, atol=1e-10)
    for k in grads:
        torch.testing.assert_close(grads[k], reference[2][k], rtol=1e-8, atol=1e-10)


def test_an_encoder_reorders_only_where_every_layer_takes_the_flash_path():
    """`mllama_attention._sortable`: the reorder is for CUDA half-precision activations under an
    additive mask with no gradient inside, every layer on `_vision_attention`; anything else
    (another attention implementation, a trainable weight, fp32, a boolean mask) runs the
    encoder as transformers wrote it. Tensors are stood in for: only their attributes are read."""
    from types import SimpleNamespace

    from llamalora.families.mllama_attention import VISION, _sortable

    def tensor(dtype=torch.bfloat16, shape=(2, 8, 4), requires_grad=False):
        return SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype, shape=shape,
                               ndim=len(shape), requires_grad=requires_grad)

    def encoder(implementations):
        module = torch.nn.Module()
        module.weight = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        module.layers = [SimpleNamespace(self_attn=SimpleNamespace(
            config=SimpleNamespace(_attn_implementation=i))) for i in implementations]
        return module

    hidden, mask = tensor(), tensor(shape=(2, 1, 8, 8))
    assert _sortable(encoder([VISION, VISION]), hidden, mask)
    assert not _sortable(encoder([VISION, "sdpa"]), hidden, mask)
    trainable = encoder([VISION])
    trainable.weight.requires_grad_(True)
    assert not _sortable(trainable, hidden, mask)
    with torch.no_grad():
        assert _sortable(trainable, hidden, mask)
    assert not _sortable(encoder([VISION]), tensor(torch.float32), mask)
    assert not _sortable(encoder([VISION]), hidden, tensor(torch.bool, (2, 1, 8, 8)))
    assert not _sortable(encoder([VISION]), hidden, None)
    assert not _sortable(encoder([VISION]), hidden, tensor(shape=(2, 1, 9, 9)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "graphed"])
def test_vision_attention_on_flash_is_the_masked_attention(graphed):
    """On CUDA in bf16, at the 11B's shapes (16 heads of 80, 4 tile slots of 1,608 tokens):
    the vision attention's varlen call gives SDPA's masked result (fp32 math) within bf16
    rounding, for images of 1, 2, 4 and 3 real tiles; eager on torch's flash attention, and
    captured in a CUDA graph and replayed on FlashAttention-4 where it is installed."""
    import types

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from llamalora.attention import graph_kernels
    from llamalora.families import mllama_attention as attention

    torch.manual_seed(0)
    tiles = [1, 2, 4, 3]
    mask = _vision_mask(tiles, 4, 1601, 1608, torch.bfloat16).cuda()
    q, k, v = (torch.randn(4, 16, 4 * 1608, 80, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))

    def call():
        return attention._vision_attention(types.SimpleNamespace(training=False), q, k, v, mask,
                                           scaling=80 ** -0.5)[0]

    with torch.no_grad():
        if graphed:
            with graph_kernels():
                expected = (attention._fa4_varlen if attention._fa4_runs_on(q.device)
                            else attention._flash_varlen)
                assert attention._varlen_kernel(q.device) is expected
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    call()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = call()
            q.copy_(torch.randn_like(q))  # a replay reads the new inputs
            graph.replay()
        else:
            assert attention._varlen_kernel(q.device) is attention._flash_varlen
            out = call()
        with sdpa_kernel(SDPBackend.MATH):
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                 attn_mask=mask.float()).transpose(1, 2)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-3)


def test_flash_attention_4_runs_only_in_a_graphs_passes(monkeypatch):
    """`mllama_attention._varlen_kernel`: FlashAttention-4 only inside `graph_kernels` (a graph's
    warm-up and capture) and only where it runs; else torch's flash attention. The start-of-run
    line says the same."""
    from llamalora.attention import graph_kernels
    from llamalora.families import mllama_attention as attention

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(attention, "_fa4_problem", lambda device: None)
    assert attention._varlen_kernel(cuda) is attention._flash_varlen
    with graph_kernels():
        assert attention._varlen_kernel(cuda) is attention._fa4_varlen
    assert attention._varlen_kernel(cuda) is attention._flash_varlen
    assert attention.vision_attention_kernel(cuda, graphs=True) == \
        "FlashAttention-4 (CUDA graphs)"
    assert attention.vision_attention_kernel(cuda, graphs=False) == "torch flash attention"
    monkeypatch.setattr(attention, "_fa4_problem", lambda device: "not installed")
    with graph_kernels():
        assert attention._varlen_kernel(cuda) is attention._flash_varlen
    assert attention.vision_attention_kernel(cuda, graphs=True) == \
        "torch flash attention (FlashAttention-4: not installed)"
    assert attention.vision_attention_kernel("cpu", graphs=True) == "SDPA"
    monkeypatch.undo()
    assert not attention._fa4_runs_on(torch.device("cpu"))


def test_a_flash_attention_4_that_does_not_import_leaves_torchs_kernel(tmp_path, monkeypatch):
    """An installed FlashAttention-4 whose import fails (here an OSError, as a missing native
    library gives) is not used, and the start-of-run line says why, instead of the run
    stopping."""
    from llamalora.attention import graph_kernels
    from llamalora.families import mllama_attention as attention

    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)
    (tmp_path / "flash_attn" / "__init__.py").write_text("")
    (tmp_path / "flash_attn" / "cute" / "__init__.py").write_text("")
    (tmp_path / "flash_attn" / "cute" / "interface.py").write_text(
        "raise OSError('libcute_dsl_runtime.so: cannot open shared object file\\n"
        "  searched: /usr/lib, /usr/local/lib')\n")
    import sys

    for name in [n for n in sys.modules if n.split(".")[0] == "flash_attn"]:
        monkeypatch.delitem(sys.modules, name)  # a real one already imported: put back after
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.delenv("LLAMALORA_NO_FA4", raising=False)
    monkeypatch.delenv("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", raising=False)
    attention._fa4_problem.cache_clear()
    try:
        cuda = torch.device("cuda", 0)
        assert not attention._fa4_runs_on(cuda)
        with graph_kernels():
            assert attention._varlen_kernel(cuda) is attention._flash_varlen
        line = attention.vision_attention_kernel(cuda, graphs=True)
        assert line == ("torch flash attention (FlashAttention-4: flash_attn.cute did not "
                        "import (OSError: libcute_dsl_runtime.so: cannot open shared object "
                        "file))")  # its first line only
        monkeypatch.setenv("LLAMALORA_NO_FA4", "1")
        attention._fa4_problem.cache_clear()
        assert attention.vision_attention_kernel(cuda, graphs=True) == \
            "torch flash attention (FlashAttention-4: LLAMALORA_NO_FA4 is set)"
    finally:
        attention._fa4_problem.cache_clear()
        for name in [n for n in sys.modules if n.split(".")[0] == "flash_attn"]:
            del sys.modules[name]  # the stand-in's; monkeypatch restores any real ones


def test_lora_runs_in_the_activation_dtype(processor, records):
    """In a bf16 model, every LoRA layer (text self-attention, and cross-attention, whose k and v
    see every image state) takes its bf16 input as it comes (peft would cast it to the fp32
    weights) while the weights and their gradients stay fp32; the loss is peft's within bf16
    rounding."""

    losses, seen = [], {}
    for ours in (True, False):
        model = _tiny_vision_lora(dtype="bfloat16")
        watched = {n: m for n, m in model.named_modules()
                   if n.endswith(("cross_attn.k_proj.lora_A.default",
                                  "cross_attn.q_proj.lora_A.default",
                                  "self_attn.v_proj.lora_A.default"))}
        assert {n.split(".")[-4] for n in watched} == {"cross_attn", "self_attn"}
        if not ours:  # peft's own forward
            for n, m in model.named_modules():
                if hasattr(m, "cast_input_dtype_enabled"):
                    m.cast_input_dtype_enabled = True
                    for part in (*m.lora_A.values(), *m.lora_B.values()):
                        del part.forward
        for n, m in watched.items():
            m.register_forward_pre_hook(
                lambda mod, args, n=n, ours=ours: seen.setdefault((ours, n), args[0].dtype)
                and None)
        loss, _ = loss_sum(model, pack_vision(records, processor))
        loss.backward()
        losses.append(loss.detach().float())
        for n, m in watched.items():
            assert m.weight.dtype == torch.float32 and m.weight.grad.dtype == torch.float32
    for (ours, name), dtype in seen.items():
        assert dtype == (torch.bfloat16 if ours else torch.float32), (ours, name, dtype)
    assert len(seen) == 2 * len(watched)
    torch.testing.assert_close(losses[0], losses[1], rtol=2e-2, atol=2e-2)


def test_a_static_row_sends_cross_attention_to_cudnn_with_its_dense_mask(vision_model, processor,
                                                                         records, monkeypatch):
    """A CUDA-graph row (`step._static_loss_sum`) carries no runs: its cross-attention layers
    take the dense mask through `mllama_attention._dense_cross` (cuDNN's kernel on a GPU, key
    and value heads shared); an eager packed row with runs never goes there."""
    from llamalora.families import mllama_attention as attention

    seen, original = [], attention._dense_cross

    def recorded(module, query, key, value, attention_mask, **kwargs):
        seen.append((type(module).__name__, attention_mask is not None))
        return original(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(attention, "_dense_cross", recorded)
    with torch.no_grad():
        loss_sum(vision_model, MllamaBatches(image_processor=processor).static(records, 128004))
        assert seen and set(seen) == {("MllamaTextCrossAttention", True)}
        seen.clear()
        loss_sum(vision_model, _with_runs(pack_vision(records, processor)))
    assert seen == []


def test_training_batches_carry_their_runs(processor, records):
    """The recipe's micro-batches bring the runs cross-attention takes, made on the host, packed
    and padded; text-only batches have none."""
    from types import SimpleNamespace

    from llamalora.recipe import StepBatches

    for packing in (True, False):
        setup = SimpleNamespace(compute_dtype="float32", graphs=False, packing=packing,
                                pad_id=128004, image_processor=processor,
                                batch_maker=MllamaBatches(image_processor=processor))
        batches = StepBatches(SimpleNamespace(batch_size=5, gradient_accumulation_steps=1,
                                              max_seq_length=512, max_steps=1,
                                              num_train_epochs=1, seed=0),
                              SimpleNamespace(train=records, steps=1),
                              SimpleNamespace(world_size=1, rank=0), setup, torch.device("cpu"))
        made, _, _ = batches.make(records)
        runs = made[FORWARD_CONTEXT]
        assert len(runs.rows) == made["input_ids"].shape[0]
        assert all(not isinstance(s, list) for row in runs.rows for _, _, s in row)  # moved
        assert any(isinstance(s, slice) for row in runs.rows for _, _, s in row)
    text_only, _, _ = batches.make([records[0], records[3]])
    assert FORWARD_CONTEXT not in text_only


@pytest.mark.parametrize("layout", ["packed", "padded", "one record"])
def test_host_made_loss_index_and_mask_change_nothing(vision_model, processor, records, layout):
    """`packing.with_loss_index` (what training's batches carry, so the step never waits on the
    GPU) gives the loss and gradients of the boolean-mask gather and of the records found in
    the position ids."""
    from llamalora.packing import with_loss_index

    def make(items):
        if layout == "padded":
            return add_vision_inputs(collate(items, pad_id=128004), [t.images for t in items],
                                     processor)
        return pack_vision(items, processor)

    items = records[2:3] if layout == "one record" else records
    lengths = None if layout == "padded" else [len(t) for t in items]
    host = with_loss_index(make(items), lengths)
    assert ("cu_seqlens" in host) == (layout != "padded")
    assert ("position_ids" in host) == (layout == "packed")  # padded rows have a mask instead
    assert host["loss_index"].numel() == host["loss_targets"].numel() > 0
    _assert_trains_alike(vision_model, host, make(items), loss_tol=1e-12, grad_rtol=1e-10,
                         grad_atol=1e-12)


def test_static_rows_with_images_give_the_packed_loss_and_gradients(vision_model, processor,
                                                                    records):
    """`MllamaBatches.static` (what a CUDA graph of an image micro-batch replays): padded
    text, the row's images, the cross-attention mask with the padding seeing no image; the
    packed row's loss and gradients, and shapes fixed by `static_shape` alone."""
    from llamalora.packing import static_shape

    for items in (records, records[1:3], [records[0], records[3]]):
        row = MllamaBatches(image_processor=processor).static(items, pad_id=128004)
        length, slots, images, records = static_shape(items)
        assert row["input_ids"].shape == (1, length) and row["target_ids"].shape == (slots,)
        assert row["cu_seqlens"].shape == (records + 1,)
        n = sum(map(len, items))
        if images:
            assert row["pixel_values"].shape[:2] == (1, images)
            assert row["cross_attention_mask"].shape[:3] == (1, length, images)
            assert not row["cross_attention_mask"][0, n:].any()  # the padding sees nothing
        else:
            assert "pixel_values" not in row and "cross_attention_mask" not in row
        _assert_trains_alike(vision_model, row, pack_vision(items, processor), loss_tol=1e-10,
                             grad_rtol=1e-8, grad_atol=1e-10)


def test_graphed_image_steps_are_one_row_per_micro_batch(processor, records):
    """With CUDA graphs, image micro-batches are not fused (memory), each becomes a static row
    with no runs, and the rows made to capture before the first step cover every shape used."""
    from types import SimpleNamespace

    from llamalora.packing import static_shape
    from llamalora.recipe import StepBatches

    setup = SimpleNamespace(compute_dtype="float32", graphs=True, packing=True, pad_id=128004,
                            image_processor=processor,
                            batch_maker=MllamaBatches(image_processor=processor))
    config = SimpleNamespace(batch_size=2, gradient_accumulation_steps=2, max_seq_length=512,
                             max_steps=2, num_train_epochs=1, seed=0)
    train = records * 2
    batches = StepBatches(config, SimpleNamespace(train=train, steps=2),
                          SimpleNamespace(world_size=1, rank=0), setup, torch.device("cpu"))
    used = set()
    for step in range(2):
        rows = batches.rows(step)
        assert len(rows) == 2 and all(len(r) == 2 for r in rows)  # the micro-batches as they are
        made, n_targets, _ = batches(step)
        for items, row in zip(rows, made):
            assert FORWARD_CONTEXT not in row and "target_index" in row
            assert ("pixel_values" in row) == any(t.images for t in items)
            used.add(static_shape(items))
        assert n_targets == sum(int((r["target_ids"] != -100).sum()) for r in made)
    examples = batches.shape_examples(0)
    assert {(r["input_ids"].shape[1], r["target_ids"].shape[0],
             r["pixel_values"].shape[1] if "pixel_values" in r else 0,
             r["cu_seqlens"].shape[0] - 1) for r in examples} == used


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphed_image_steps_equal_eager_steps(processor, records):
    """Three steps of image micro-batches (two rows in some, a text-only row among them)
    replayed from CUDA graphs: the losses and LoRA weights of eager steps, in fp32."""
    from llamalora.step import GraphedStep, TrainStep, to_device

    class Alone:  # one process: nothing to even out or sync
        def even_out(self, count, run):
            pass

        def sync_gradients(self, params):
            pass

    cuda = torch.device("cuda")
    plan = [[records[:2], records[2:4]], [records[1:3]], [[records[0], records[3]], records[3:]]]
    runs = []
    for cls in (TrainStep, GraphedStep):
        model = _tiny_vision_lora("cuda", dtype="float32", lora_b_std=0)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        step = cls(model, opt, sched, params, Alone(), max_grad_norm=1.0)
        losses = []
        for rows in plan:
            maker = MllamaBatches(model, processor)
            batches = [to_device(maker.static(r, 128004), cuda, torch.float32) for r in rows]
            n = float(sum((b["target_ids"] != -100).sum() for b in batches))
            losses.append(step(batches, n)[0].item() / n)
        runs.append((losses, {k: v.detach().cpu() for k, v in model.named_parameters()
                              if v.requires_grad}, step))
    (eager, w_eager, _), (graphed, w_graphed, step) = runs
    assert not step.failure and any(name == "pixel_values" for key in step.graphs
                                    for name, _ in key)
    torch.testing.assert_close(graphed, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w_graphed, w_eager, rtol=1e-3, atol=1e-5)


# Peaks measured on an H200 at the defaults on benchmarks/make_image_data.py's sets: (set,
# quant, CUDA graphs) -> GiB. CUDA graphs: 2026-12-02, with the LoRA layers in bf16
# (BENCHMARKS.md, "The vision encoders in padding order"); eager: the same day, before that
# change, which lowered the graph runs' peaks by 0.1-0.3 GiB ("Image steps at their GPU work").
_MEASURED_PEAKS = {("mixed", "8bit", False): 18.82, ("mixed", "8bit", True): 19.66,
                   ("mixed", "none", False): 26.93, ("mixed", "none", True): 27.76,
                   ("single", "8bit", False): 15.54, ("single", "8bit", True): 15.64,
                   ("single", "none", False): 23.60, ("single", "none", True): 23.68}


def test_the_plan_estimates_image_runs_at_or_above_their_measured_peaks(tmp_path):
    """The plan's estimate for the 11B with images (eager: `memory_gib`; CUDA graphs:
    `memory_gib_fused`) covers each measured peak, by at most 2.5 GiB; without its image-state
    term it fell up to 4.5 GiB short. (The peaks predate the varlen text attention.)"""
    import subprocess
    import sys
    from pathlib import Path

    from transformers import AutoTokenizer

    from llamalora.config import TrainConfig
    from llamalora.families.mllama import default_config
    from llamalora.plan import plan_training

    root = Path(__file__).resolve().parents[1]
    model = tmp_path / "11b"  # the architecture's config and the tokenizer; no weights
    default_config().save_pretrained(model)
    AutoTokenizer.from_pretrained(BUNDLED_TOKENIZER_DIR).save_pretrained(model)
    for name, flags in (("mixed", ["--mixed"]), ("single", [])):
        subprocess.run([sys.executable, str(root / "benchmarks" / "make_image_data.py"),
                        str(tmp_path / name), "--records", "64", *flags], check=True,
                       capture_output=True)
        plan = plan_training(TrainConfig(data_path=str(tmp_path / name / "data.jsonl"),
                                         model=str(model), output_dir=str(tmp_path / "out")))
        for quant in ("8bit", "none"):
            for graphs, estimate in ((False, plan.memory_gib), (True, plan.memory_gib_fused)):
                peak = _MEASURED_PEAKS[(name, quant, graphs)]
                assert peak <= estimate[quant] <= peak + 2.5, (name, quant, graphs)
