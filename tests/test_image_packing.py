"""Records with images packed into one row give the padded batch's loss and gradients (tiny
vision model, CPU, float64)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer

from llamalora.batching import (add_vision_inputs, collate, pack, pack_vision,
                                tokenize_examples)
from llamalora.data import load_examples
from llamalora.step import loss_sum
from llamalora.tokenizer import BUNDLED_TOKENIZER_DIR

from conftest import write_jsonl

TOK = Tokenizer.from_file(str(BUNDLED_TOKENIZER_DIR / "tokenizer.json"))
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vision_model():
    from llamalora.models import attach_lora, load_model_for_training

    torch.manual_seed(0)
    model, _ = load_model_for_training("tiny", quant="none", with_vision=True, device="cpu")
    model = attach_lora(model, r=4, alpha=8, dropout=0.0).to(torch.float64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
        # Open the cross-attention gates (zero at init in the tiny model, as in Mllama's
        # pretraining start) so that images change the loss.
        for name, p in model.named_parameters():
            if "cross_attn_attn_gate" in name or "cross_attn_mlp_gate" in name:
                p.fill_(0.8)
    return model


@pytest.fixture(scope="module")
def processor():
    from llamalora.models import load_image_processor

    return load_image_processor("tiny")


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


def test_packed_images_give_the_padded_loss_and_gradients(vision_model, processor, records):
    padded = add_vision_inputs(collate(records, pad_id=128004), [t.images for t in records],
                               processor)
    packed = pack_vision(records, processor)
    # One row; only the 4 real images reach the vision tower (the padded batch computes 5 rows
    # of 2 image slots: 10, a blank one for each text record among them).
    assert packed["input_ids"].shape[0] == 1 and packed["pixel_values"].shape[:2] == (1, 4)
    assert padded["pixel_values"].shape[:2] == (5, 2)
    ref_loss, ref_n, ref_grads = _loss_and_grads(vision_model, padded)
    loss, n, grads = _loss_and_grads(vision_model, packed)
    assert n == ref_n
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-9)
    assert grads.keys() == ref_grads.keys() and any("cross_attn" in k for k in grads)
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-7, atol=1e-9)


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
    from llamalora.attention import CrossAttentionRuns

    runs = CrossAttentionRuns.from_mask(batch["cross_attention_mask"].cpu()).to(device)
    return {**batch, "cross_attention_runs": runs}


def test_cross_attention_by_runs_is_the_masked_attention(vision_model, processor, records,
                                                          tmp_path):
    """`attention.CrossAttentionRuns`: runs of tokens attend to just the tiles they see, with no
    mask; loss and gradients equal transformers' masked SDPA over the whole row (the same batch
    without runs), packed and padded, with two images side by side in one turn (the runs
    after them see tiles that are not consecutive: the index path)."""
    from PIL import Image

    from llamalora.attention import CROSS, VISION

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
        runs = fast["cross_attention_runs"].rows
        assert any(isinstance(s, torch.Tensor) for row in runs for _, _, s in row)
        loss, n, grads = _loss_and_grads(vision_model, fast)
        ref_loss, ref_n, ref_grads = _loss_and_grads(vision_model, batch)
        assert n == ref_n
        torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)
        for k in ref_grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-8, atol=1e-10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fast_attention_on_the_gpu_is_sdpas(processor, records):
    """On CUDA in bf16: the vision tower through cuDNN's attention and cross-attention by runs
    (flash) give the loss and gradients of transformers' SDPA (memory-efficient kernel, masks),
    within bf16 rounding."""
    import copy

    from llamalora.models import attach_lora, load_model_for_training
    from llamalora.step import to_device

    torch.manual_seed(0)
    model, _ = load_model_for_training("tiny", quant="none", with_vision=True, device="cuda")
    model = attach_lora(model, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
            if "cross_attn_attn_gate" in name or "cross_attn_mlp_gate" in name:
                p.fill_(0.8)
    batch = to_device(pack_vision(records, processor), torch.device("cuda"), torch.bfloat16)
    fast = _loss_and_grads(model, _with_runs(batch, "cuda"))
    for m in model.modules():  # back to transformers' own SDPA everywhere
        if type(m).__name__ in ("MllamaVisionAttention", "MllamaTextCrossAttention"):
            m.config = copy.copy(m.config)
            m.config._attn_implementation_internal = "sdpa"
    plain = _loss_and_grads(model, batch)
    torch.testing.assert_close(fast[0], plain[0], rtol=2e-2, atol=1e-2)
    for k in plain[2]:
        torch.testing.assert_close(fast[2][k].float(), plain[2][k].float(), rtol=5e-2, atol=5e-2)


def test_training_batches_carry_their_runs(processor, records):
    """The recipe's micro-batches bring the runs cross-attention takes, made on the host, packed
    and padded; text-only batches have none."""
    from types import SimpleNamespace

    from llamalora.recipe import StepBatches

    for packing in (True, False):
        setup = SimpleNamespace(compute_dtype="float32", graphs=False, packing=packing,
                                pad_id=128004, image_processor=processor)
        batches = StepBatches(SimpleNamespace(batch_size=5, gradient_accumulation_steps=1,
                                              max_seq_length=512, max_steps=1,
                                              num_train_epochs=1, seed=0),
                              SimpleNamespace(train=records, steps=1),
                              SimpleNamespace(world_size=1, rank=0), setup, torch.device("cpu"))
        made, _, _ = batches.make(records)
        runs = made["cross_attention_runs"]
        assert len(runs.rows) == made["input_ids"].shape[0]
        assert all(not isinstance(s, list) for row in runs.rows for _, _, s in row)  # moved
        assert any(isinstance(s, slice) for row in runs.rows for _, _, s in row)
    text_only, _, _ = batches.make([records[0], records[3]])
    assert "cross_attention_runs" not in text_only


@pytest.mark.parametrize("layout", ["packed", "padded", "one record"])
def test_host_made_loss_index_and_mask_change_nothing(vision_model, processor, records, layout):
    """`step.with_loss_index` (what training's batches carry, so the step never waits on the
    GPU) gives the loss and gradients of the boolean-mask gather and transformers' own search
    for the records in the position ids."""
    from llamalora.step import with_loss_index

    def make(items):
        if layout == "padded":
            return add_vision_inputs(collate(items, pad_id=128004), [t.images for t in items],
                                     processor)
        return pack_vision(items, processor)

    items = records[2:3] if layout == "one record" else records
    lengths = None if layout == "padded" else [len(t) for t in items]
    host = with_loss_index(make(items), lengths)
    assert ("segment_ids" in host) == (layout == "packed")
    assert ("position_ids" in host) == (layout == "packed")  # padded rows have a mask instead
    assert host["loss_index"].numel() == host["loss_targets"].numel() > 0
    ref_loss, ref_n, ref_grads = _loss_and_grads(vision_model, make(items))
    loss, n, grads = _loss_and_grads(vision_model, host)
    assert n == ref_n
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-10, atol=1e-12)
