"""Qwen2-VL and Qwen2.5-VL (`families/qwen2_vl.py`) and `--model tiny-qwen2-vl`: images as tokens
of the text, M-RoPE positions per record, packing, quantization, chat and export on the CPU; and
plain Qwen2 text checkpoints through the generic causal-LM path."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from typer.testing import CliRunner

from llamalora.batching import Tokenized, tokenize_examples
from llamalora.cli.main import app
from llamalora.data import load_examples
from llamalora.families import CAUSAL_LM, family_of
from llamalora.families.qwen2_vl import QWEN2_VL, QwenBatches
from llamalora.step import loss_sum

from conftest import MEMO, needs_bnb, write_jsonl

runner = CliRunner()
IMAGE_PAD, PAD = 261, 256  # the tiny model's <|image_pad|> and <|endoftext|>


def _tiny_qwen_config():
    from llamalora.models.tiny_qwen2_vl import tiny_qwen2_vl_config

    return tiny_qwen2_vl_config()


def test_both_qwen_vl_model_types_are_one_family_with_its_own_facts():
    from transformers import Qwen2Config, Qwen2VLConfig

    config = _tiny_qwen_config()
    assert family_of(config) is QWEN2_VL and family_of(Qwen2VLConfig()) is QWEN2_VL
    assert family_of(config.text_config) is QWEN2_VL  # qwen2_5_vl_text
    assert family_of(Qwen2Config()) is CAUSAL_LM  # plain Qwen2 text: the generic path
    assert QWEN2_VL.keep_unquantized == ["lm_head", "model.visual", "visual"]
    assert QWEN2_VL.in_vision("model.visual.blocks.0.mlp.gate_proj")
    assert not QWEN2_VL.in_vision("model.language_model.layers.0.mlp.gate_proj")
    assert QWEN2_VL.takes_images and QWEN2_VL.adapter_prefixes is None
    state = {"base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight": 1}
    assert QWEN2_VL.adapter_keys(state, to_vision=False) is state  # one class: one name


def test_its_export_is_the_whole_model_and_its_steps_stay_eager():
    from types import SimpleNamespace

    from llamalora.errors import UsageError
    from llamalora.export.source import ExportSource
    from llamalora.recipe import _choose_graphs

    source = ExportSource(SimpleNamespace(run={}), "base", None, _tiny_qwen_config())
    assert source.export_kind(merge=True, text_only=False, gguf=False, state_dict=False) == \
        "merged" and source.merges_with_vision
    with pytest.raises(UsageError, match="--text-only: the language model of a Qwen2-VL run"):
        source.export_kind(merge=True, text_only=True, gguf=False, state_dict=False)
    with pytest.raises(UsageError, match="--gguf: llama.cpp's llama architecture"):
        source.export_kind(merge=True, text_only=False, gguf=True, state_dict=False)
    config = SimpleNamespace(cuda_graphs=True, packing=True, compile=None)
    par = SimpleNamespace(shards_weights=False)
    plan = SimpleNamespace(with_vision=False)
    assert _choose_graphs(config, plan, torch.device("cuda"), False, par, family=QWEN2_VL) == (
        False, "--cuda-graphs ignored: not with Qwen2-VL models")


@pytest.fixture(scope="module")
def folder():
    from pathlib import Path

    from llamalora.models.names import resolve_model

    return Path(resolve_model("tiny-qwen2-vl"))


@pytest.fixture(scope="module")
def processor(folder):
    from llamalora.models.loading import load_image_processor

    return load_image_processor(folder)


@pytest.fixture(scope="module")
def tokenizer(folder):
    from llamalora.tokenizer import load_tokenizer

    return load_tokenizer(folder).tokenizer


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    where = tmp_path_factory.mktemp("qwen-images")
    Image.new("RGB", (60, 30), (200, 20, 20)).save(where / "wide.png")
    Image.new("RGB", (24, 24), (0, 90, 200)).save(where / "square.png")  # below min_pixels
    Image.new("RGB", (200, 120), (10, 200, 10)).save(where / "big.png")  # above max_pixels
    return where


def _records(tokenizer, where, records: list[dict]) -> list[Tokenized]:
    examples, _ = load_examples(write_jsonl(where / "d.jsonl", records))
    items, _ = tokenize_examples(tokenizer, examples, max_seq_length=512)
    return items


@pytest.fixture(scope="module")
def records(tokenizer, images):
    """Records with 0, 1 and 2 images, one of them two turns long."""
    items = _records(tokenizer, images, [
        {"instruction": "What is rebar?", "output": "A steel bar in concrete."},
        {"instruction": "What is shown?", "output": "A red form.", "image": "wide.png"},
        {"messages": [{"role": "user", "content": "<image>What is this?"},
                      {"role": "assistant", "content": "A blue tile."},
                      {"role": "user", "content": "And this one? <image>"},
                      {"role": "assistant", "content": "A green post."}],
         "images": ["square.png", "big.png"]},
        {"instruction": "양생이란?", "output": "습도와 온도를 유지하는 일.", "image": "square.png"},
    ])
    assert [len(t.images) for t in items] == [0, 1, 2, 1]
    assert [t.input_ids.count(IMAGE_PAD) for t in items] == [0, 1, 2, 1]
    return items


@pytest.fixture(scope="module")
def model(folder):
    """The tiny model with LoRA (r 4, no dropout, B drawn so every LoRA weight has a gradient),
    in float64, loaded for training (the text attention on llamalora's varlen function)."""
    from llamalora.models.loading import load_model_for_training
    from llamalora.models.lora import attach_lora

    torch.manual_seed(0)
    loaded, _ = load_model_for_training(folder, quant="none", with_vision=True, device="cpu")
    loaded = attach_lora(loaded, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in loaded.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return loaded.to(torch.float64)


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss, n = loss_sum(model, batch)
    loss.backward()
    return loss.detach(), int(n), {k: p.grad.clone() for k, p in model.named_parameters()
                                   if p.grad is not None}


def _assert_trains_alike(model, batch, reference):
    ref_loss, ref_n, ref_grads = _loss_and_grads(model, reference)
    loss, n, grads = _loss_and_grads(model, batch)
    assert n == ref_n
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-8, atol=1e-10)


@pytest.mark.slow
def test_tiny_qwen2_vl_is_a_folder_transformers_reads(folder, processor, tokenizer, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from llamalora.models.tiny_qwen2_vl import tiny_qwen2_vl_model_dir
    from llamalora.template import template_of

    assert json.loads((folder / "llamalora_tiny.json").read_text())["name"] == "tiny-qwen2-vl"
    assert type(processor).__name__.startswith("Qwen2VLImageProcessor")
    assert type(AutoModelForImageTextToText.from_pretrained(folder)).__name__ == \
        "Qwen2_5_VLForConditionalGeneration"
    text = "콘크리트 rebar!"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False).ids) == text
    assert [tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_end|>", "<|image_pad|>")
            ] == [PAD, 258, IMAGE_PAD]
    # llamalora's template rendering is transformers' apply_chat_template, image part included
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}]
    ours = template_of(tokenizer).render(messages, add_generation_prompt=True)
    assert ours == AutoTokenizer.from_pretrained(folder).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|>q<|im_end|>" in ours
    again = tiny_qwen2_vl_model_dir(tmp_path)  # a second build: the same weights
    assert hashlib.sha256((again / "model.safetensors").read_bytes()).digest() == \
        hashlib.sha256((folder / "model.safetensors").read_bytes()).digest()


@pytest.mark.slow
def test_packed_rows_give_the_padded_loss_and_gradients(model, processor, records):
    """Each record's images expanded in place, its M-RoPE positions restarting at 0: one packed
    row trains exactly as the padded batch (float64)."""
    maker = QwenBatches(model, processor)
    packed, padded = maker.packed(records), maker.padded(records, PAD)
    assert packed["input_ids"].shape[0] == 1 and packed["position_ids"].shape[:2] == (4, 1)
    grid = packed["image_grid_thw"]
    assert grid.shape == (4, 3) and torch.equal(grid, padded["image_grid_thw"])
    tokens = (grid.prod(-1) // 4).tolist()  # 2 x 2 patches a token
    assert int((packed["input_ids"] == IMAGE_PAD).sum()) == sum(tokens)
    assert min(tokens) == 4 and max(tokens) <= 16  # min_pixels and max_pixels bound them
    assert packed["pixel_values"].shape[0] == int(grid.prod(-1).sum())
    starts = packed["cu_seqlens"][:-1].tolist()
    assert packed["position_ids"][0, 0, starts].tolist() == [0] * len(records)
    _assert_trains_alike(model, packed, padded)


@pytest.mark.slow
def test_positions_are_the_models_own_get_rope_index(model, processor, records):
    """The positions the batch carries equal the ones the model makes itself from the image
    tokens and grids (no position_ids given)."""
    batch = QwenBatches(model, processor).padded(records[2:3], PAD)
    own = {k: v for k, v in batch.items() if k != "position_ids"}
    own["mm_token_type_ids"] = (own["input_ids"] == IMAGE_PAD).int()
    model.get_base_model().model.rope_deltas = None
    rows = batch["position_ids"][1:, 0]
    assert not torch.equal(rows[1], rows[0])  # an image's height and width rows differ
    _assert_trains_alike(model, batch, own)


@pytest.mark.slow
def test_a_records_images_stay_its_own_in_a_packed_row(model, processor, records):
    maker = QwenBatches(model, processor)
    with torch.no_grad():
        together, _ = loss_sum(model, maker.packed(records[:3]))
        alone = sum(loss_sum(model, maker.packed([t]))[0] for t in records[:3])
    torch.testing.assert_close(together, alone, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_the_image_reaches_the_text(model, processor, records, images):
    maker = QwenBatches(model, processor)
    other = Tokenized(records[1].line, records[1].input_ids, records[1].labels,
                      [images / "big.png"])
    with torch.no_grad():
        red, _ = loss_sum(model, maker.packed(records[1:2]))
        green, _ = loss_sum(model, maker.packed([other]))
    assert abs(float(red - green)) > 1e-6


@pytest.mark.slow
def test_the_varlen_text_attention_is_sdpa_under_m_rope(model, processor, records):
    """llamalora's text attention over a packed row (records apart by their lengths) gives
    transformers' own SDPA over the padded batch, its mask and the 4-row positions."""
    from llamalora.attention import use_varlen_text_attention

    maker = QwenBatches(model, processor)
    packed, padded = maker.packed(records), maker.padded(records, PAD)
    ours = _loss_and_grads(model, packed)
    assert use_varlen_text_attention(model, enable=False) == 2  # the 2 text layers
    try:
        reference = _loss_and_grads(model, {k: v for k, v in padded.items()
                                            if k not in ("loss_index", "loss_targets")})
    finally:
        use_varlen_text_attention(model)
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-10, atol=1e-10)
    for k in reference[2]:
        torch.testing.assert_close(ours[2][k], reference[2][k], rtol=1e-8, atol=1e-10)


@pytest.mark.slow
def test_an_image_whose_pad_truncation_cut_is_left_out(model, processor, records):
    cut = records[2].input_ids.index(IMAGE_PAD) + 3  # the first image's pad kept, not the second
    short = Tokenized(0, records[2].input_ids[:cut], records[2].labels[:cut],
                      list(records[2].images))
    batch = QwenBatches(model, processor).packed([short])
    assert batch["image_grid_thw"].shape[0] == 1
    with torch.no_grad():
        loss_sum(model, batch)  # features and image tokens agree


@needs_bnb
@pytest.mark.slow
@pytest.mark.parametrize("quant,layer,kernel", [("8bit", "Linear8bitLt", "int8-dequant"),
                                                ("4bit", "Linear4bit", "nf4-dequant")])
def test_quantized_loads_keep_the_vision_tower_and_lora_off_it(folder, processor, records,
                                                               quant, layer, kernel):
    """The language model quantized, the tower and lm_head not, LoRA off the tower (whose MLP has
    gate/up/down projections too); llamalora's kernels on Qwen's biased q/k/v give
    bitsandbytes' loss within the 8-bit path's rounding of the activations."""
    from llamalora import quant as quantization
    from llamalora.models.loading import load_model_for_training
    from llamalora.models.lora import attach_lora

    loaded, info = load_model_for_training(folder, quant=quant, with_vision=True, device="cpu")
    kinds = {n: type(m).__name__ for n, m in loaded.named_modules()}
    quantized = [n for n, k in kinds.items() if k == layer]
    assert quantized and all(n.startswith("model.language_model.layers.") for n in quantized)
    assert kinds["model.visual.blocks.0.mlp.gate_proj"] == "Linear"
    assert kinds["model.visual.merger.mlp.0"] == "Linear" and kinds["lm_head"] == "Linear"
    lora = attach_lora(loaded, target_modules="all-linear")
    adapted = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert len(adapted) == 2 * 7 * 2 and not any(".visual." in n for n in adapted)
    batch = QwenBatches(lora, processor).packed(records)
    with torch.no_grad():
        plain, _ = loss_sum(lora, batch)
        assert quantization.enable_kernels(lora, "fast") == f"{kernel} (14 layers)"
        fast, _ = loss_sum(lora, batch)
    torch.testing.assert_close(fast, plain, rtol=2e-2, atol=0)


@pytest.mark.slow
def test_text_turns_take_the_static_decoder_with_generates_tokens(folder, tokenizer):
    from llamalora import decode
    from llamalora.chat import prompt_ids
    from llamalora.models.loading import load_model_for_inference

    loaded, _ = load_model_for_inference(folder, quant="none", with_vision=True, device="cpu")
    ids = prompt_ids(tokenizer, None, [("user", "What is rebar? 철근")])
    assert decode.supported(loaded) is None
    ours = list(decode.StaticDecoder(loaded, graphs=False).generate(
        ids, max_new_tokens=10, stop_ids=[258], choose=lambda logits: logits.argmax(-1)))
    with torch.inference_mode():
        out = loaded.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                              do_sample=False, max_new_tokens=10, eos_token_id=[258],
                              pad_token_id=PAD, temperature=None, top_p=None, top_k=None)
    assert ours == out[0, len(ids):].tolist()[:len(ours)] and len(ours) == 10


@pytest.mark.slow
def test_the_plan_counts_an_images_tokens_at_the_processors_largest(folder, images, tmp_path):
    from llamalora.config import TrainConfig
    from llamalora.plan import count_params, plan_training

    config = _tiny_qwen_config()
    assert count_params(config, True, str(folder)).image_tokens == 112 * 112 // 28 ** 2
    assert count_params(config, False, str(folder)).image_tokens == 0
    data = write_jsonl(images / "plan.jsonl", [
        {"instruction": "What is shown?", "output": "A red form.", "image": "wide.png"}] * 4)
    with_images = plan_training(TrainConfig(data_path=str(data), model="tiny-qwen2-vl"))
    assert with_images.with_vision
    text = plan_training(TrainConfig(data_path=str(write_jsonl(tmp_path / "t.jsonl", MEMO)),
                                     model="tiny-qwen2-vl"))
    assert not text.with_vision and text.params["base"] == with_images.params["base"]


@pytest.mark.slow
@pytest.mark.slow
def test_chat_counts_the_prompt_tokens_the_model_saw(images):
    """An image is one <|image_pad|> in the prompt's ids and its merged patches in the model's
    input: usage (serve's prompt_tokens) counts the latter. The model is freed with the
    session (no cache keeps it)."""
    import gc
    import weakref

    from transformers import AutoImageProcessor

    from llamalora.chat import GenerationOptions, open_chat
    from llamalora.models.names import resolve_model

    session = open_chat(None, model="tiny-qwen2-vl", quant="none", with_vision=True)
    options = GenerationOptions(max_new_tokens=2, temperature=0)
    plain = session.ask("What is shown?", options=options).prompt_tokens
    session.reset()
    shown = session.ask("What is shown?", image=images / "wide.png", options=options)
    from PIL import Image

    grid = AutoImageProcessor.from_pretrained(resolve_model("tiny-qwen2-vl"))(
        images=[Image.open(images / "wide.png")], return_tensors="pt")["image_grid_thw"][0]
    patches = int(grid.prod()) // 4  # merged 2 x 2
    # <|vision_start|>, the image's tokens, <|vision_end|>
    assert shown.prompt_tokens == plain + 2 + patches
    model = weakref.ref(session.model)
    del session
    gc.collect()
    assert model() is None


def test_train_chat_and_export_tiny_qwen2_vl_on_the_cpu(images, tmp_path):
    """`llamalora train` with text and image records (packed, 8-bit), chat with an image and
    without, and export-adapter: the PEFT folder and --merge reloaded and compared by the
    export's own check."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    data = write_jsonl(images / "train.jsonl", [
        *MEMO, {"instruction": "What is shown?", "output": "A red form.", "image": "wide.png"},
        {"messages": [{"role": "user", "content": "<image><image>Compare them."},
                      {"role": "assistant", "content": "Blue, then green."}],
         "images": ["square.png", "big.png"]}])
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", str(data), "--model", "tiny-qwen2-vl", "--max-steps", "2",
                            "--batch-size", "3", "--output-dir", str(run), "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["model_class"] == "Qwen2_5_VLForConditionalGeneration"
    assert result["plan"]["with_vision"] and result["final_train_loss"] > 0
    for extra in (["--image", str(images / "wide.png")], []):
        r = runner.invoke(app, ["chat", "--adapter", str(run), "--prompt", "What is shown?",
                                "--max-new-tokens", "4", "--temperature", "0", *extra])
        assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["export-adapter", str(run), "--out", str(tmp_path / "peft")])
    assert r.exit_code == 0, r.output
    base = AutoModelForImageTextToText.from_pretrained(result["base_model"])
    PeftModel.from_pretrained(base, str(tmp_path / "peft"))  # plain peft loads it
    r = runner.invoke(app, ["export-adapter", str(run), "--out", str(tmp_path / "merged"),
                            "--merge"])
    assert r.exit_code == 0, r.output
    merged = tmp_path / "merged"
    assert (merged / "preprocessor_config.json").is_file()
    assert "AutoModelForImageTextToText" in (merged / "README.md").read_text()
    r = runner.invoke(app, ["export-adapter", str(run), "--out", str(tmp_path / "x"),
                            "--merge", "--text-only"])
    assert r.exit_code == 2 and "--text-only" in r.stderr


@pytest.mark.slow
def test_qwen2_vl_shares_the_image_path(folder, processor, records, tmp_path):
    """Qwen2-VL (the first version: no window attention, its own vision blocks) through the same
    batches: packed rows train as the padded batch."""
    import shutil

    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from llamalora.models.loading import load_model_for_training
    from llamalora.models.lora import attach_lora

    tiny = _tiny_qwen_config()
    config = Qwen2VLConfig(
        text_config=tiny.text_config.to_dict(), image_token_id=tiny.image_token_id,
        video_token_id=tiny.video_token_id, vision_start_token_id=tiny.vision_start_token_id,
        vision_end_token_id=tiny.vision_end_token_id,
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2,
                       "mlp_ratio": 2, "patch_size": 14, "spatial_merge_size": 2,
                       "temporal_patch_size": 2})
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(tmp_path / "qwen2vl")
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(folder / name, tmp_path / "qwen2vl" / name)
    loaded, info = load_model_for_training(str(tmp_path / "qwen2vl"), quant="none",
                                           with_vision=True, device="cpu")
    assert info["model_class"] == "Qwen2VLForConditionalGeneration"
    loaded = attach_lora(loaded, r=4, alpha=8, dropout=0.0).to(torch.float64)
    maker = QwenBatches(loaded, processor)
    _assert_trains_alike(loaded, maker.packed(records), maker.padded(records, PAD))


@pytest.mark.slow
def test_a_plain_qwen2_text_checkpoint_trains_chats_and_exports(folder, tmp_path):
    """Qwen2ForCausalLM, which no family claims: the generic causal-LM path end to end."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from llamalora.models.tiny_qwen2_vl import write_tokenizer

    model_dir = tmp_path / "qwen2"
    text = _tiny_qwen_config().text_config
    config = Qwen2Config(vocab_size=text.vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         eos_token_id=258, pad_token_id=PAD, tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(model_dir)
    write_tokenizer(model_dir)
    data = write_jsonl(tmp_path / "d.jsonl", MEMO)
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", str(data), "--model", str(model_dir), "--quant", "none",
                            "--max-steps", "2", "--output-dir", str(run), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["model_class"] == "Qwen2ForCausalLM"
    r = runner.invoke(app, ["chat", "--adapter", str(run), "--prompt", "What is rebar?",
                            "--max-new-tokens", "3", "--temperature", "0"])
    assert r.exit_code == 0 and "static cache" in r.stderr, r.output
    r = runner.invoke(app, ["export-adapter", str(run), "--out", str(tmp_path / "m"), "--merge"])
    assert r.exit_code == 0, r.output
