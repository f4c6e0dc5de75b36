"""The tiny model, loading for training (none / 8-bit, text only and with vision), and LoRA."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from llamalora import quant
from llamalora.config import LORA_TARGETS, lora_target_names
from llamalora.errors import ConfigError, MissingExtraError, ModelError
from llamalora.families.mllama import MLLAMA
from llamalora.models import loading, lora, tiny
from llamalora.quant import bitsandbytes as bnb_backend

from conftest import needs_bnb

IMAGE_TOKEN = 128256
PAD = 128004


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # One build for the module; tests pass its path, so none of them writes to a real home.
    return tiny.tiny_model_dir(tmp_path_factory.mktemp("tiny-cache"))


def _image_batch(folder):
    """Two prompts, each with one image, through the folder's own processor."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    batch = processor(text=["<|image|>Describe the picture.", "<|image|>What is this?"],
                      images=[[Image.new("RGB", (60, 30), (200, 20, 20))],
                              [Image.new("RGB", (24, 24), (0, 90, 200))]],
                      padding=True, return_tensors="pt")
    labels = batch["input_ids"].clone()
    labels[(labels == IMAGE_TOKEN) | (batch["attention_mask"] == 0)] = -100
    return dict(batch), labels


# --- the tiny model ---------------------------------------------------------------------------

def test_tiny_model_is_deterministic_and_cached(tiny_dir, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("LLAMALORA_HOME", str(home))
    built = tiny.tiny_model_dir()
    assert built == home / "tiny-mllama-v1"
    assert _sha256(built / "model.safetensors") == _sha256(tiny_dir / "model.safetensors")
    assert [p.name for p in home.iterdir()] == ["tiny-mllama-v1"]  # no temp folder left
    # A complete folder is reused, not rebuilt.
    stamp = (built / "model.safetensors").stat().st_mtime_ns
    assert tiny.tiny_model_dir() == built
    assert (built / "model.safetensors").stat().st_mtime_ns == stamp


def test_tiny_model_folder_contents(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    text = config["text_config"]
    assert config["model_type"] == "mllama" and config["image_token_index"] == IMAGE_TOKEN
    assert text["vocab_size"] == 128256 and text["pad_token_id"] == PAD
    assert text["eos_token_id"] == [128001, 128008, 128009]
    assert text["cross_attention_layers"] == [1]
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [128001, 128008, 128009]
    assert generation["pad_token_id"] == PAD
    assert (tiny_dir / "NOTICE").is_file()  # the tokenizer's license travels with it


def test_incomplete_tiny_folder_is_rebuilt(tiny_dir, tmp_path):
    half = tmp_path / "tiny-mllama-v1"
    half.mkdir()
    (half / "config.json").write_text("{}")  # no marker: a leftover, not a model
    built = tiny.tiny_model_dir(tmp_path)
    assert _sha256(built / "model.safetensors") == _sha256(tiny_dir / "model.safetensors")


def test_tiny_tokenizer_and_image_processor_load(tiny_dir):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert len(tokenizer) == 128257 and tokenizer.pad_token_id == PAD
    assert tokenizer.convert_tokens_to_ids("<|image|>") == IMAGE_TOKEN
    # No torchvision here: this must work with the PIL/numpy image processor.
    processor = AutoImageProcessor.from_pretrained(tiny_dir)
    features = processor(images=[[Image.new("RGB", (60, 30))]], return_tensors="pt")
    assert tuple(features["pixel_values"].shape) == (1, 1, 2, 3, 28, 28)
    assert features["aspect_ratio_ids"].tolist() == [[2]]  # (1 tile high, 2 wide) is id 2
    assert features["aspect_ratio_mask"].tolist() == [[[1, 1]]]


# --- loading ----------------------------------------------------------------------------------

def test_text_only_load_reads_the_checkpoint_weights(tiny_dir):
    from safetensors.torch import load_file

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("transformers.modeling_utils")
    log.addHandler(handler)
    try:
        model, info = loading.load_model_for_training(str(tiny_dir), quant="none", device="cpu")
    finally:
        log.removeHandler(handler)
    assert type(model).__name__ == "MllamaForCausalLM"
    assert info == {"quant": "none", "compute_dtype": "float32", "device": "cpu",
                    "model_class": "MllamaForCausalLM", "params_total": info["params_total"],
                    "base_model": str(tiny_dir)}
    names = [n for n, _ in model.named_parameters()]
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert not any("vision_model" in n for n in names)
    # The weights are the checkpoint's, not a fresh random init.
    saved = load_file(str(tiny_dir / "model.safetensors"))
    q_key = next(k for k in saved if k.endswith("layers.0.self_attn.q_proj.weight"))
    head_key = next(k for k in saved if k.endswith("lm_head.weight"))
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, saved[q_key].float())
    assert torch.equal(model.lm_head.weight, saved[head_key].float())
    assert all(not p.requires_grad for p in model.parameters())
    assert model.config.use_cache is False
    # The unread vision weights don't produce transformers' UNEXPECTED-keys table.
    assert not any("LOAD REPORT" in r.getMessage() for r in records)


def test_vision_load_has_the_vision_tower(tiny_dir):
    model, info = loading.load_model_for_training(str(tiny_dir), quant="none", with_vision=True,
                                                 device="cpu")
    assert info["model_class"] == "MllamaForConditionalGeneration"
    names = [n for n, _ in model.named_parameters()]
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in names
    assert any(n.startswith("model.vision_model.") for n in names)
    assert any(n.startswith("model.multi_modal_projector.") for n in names)
    assert info["params_total"] == sum(p.numel() for p in model.parameters())
    assert all(not p.requires_grad for p in model.parameters())


def test_missing_weights_are_an_error(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    weights = load_file(str(broken / "model.safetensors"))
    del weights[next(k for k in weights if k.endswith("layers.2.mlp.down_proj.weight"))]
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match="missing"):
        loading.load_model_for_training(str(broken), quant="none", device="cpu")


def test_load_errors_say_how_to_fix(tmp_path):
    with pytest.raises(ModelError, match="--model tiny"):
        loading.load_model_for_training(str(tmp_path / "nowhere"), quant="none")
    with pytest.raises(ModelError, match="no config.json"):
        loading.load_model_for_training(str(tmp_path), quant="none")
    with pytest.raises(ConfigError, match="--quant"):
        loading.load_model_for_training("tiny", quant="int3")


def test_hub_errors_are_explained():
    class GatedRepoError(OSError):
        pass

    gated = loading._explain_load_error("meta-llama/x", "meta-llama/x", GatedRepoError("401"))
    assert "hf auth login" in gated and "--model tiny" in gated
    offline = loading._explain_load_error(
        "meta-llama/x", "meta-llama/x", OSError("We couldn't connect to 'https://huggingface.co'"))
    assert "hf download" in offline


def test_missing_bitsandbytes_names_the_fix(tiny_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(MissingExtraError, match=r"pip install bitsandbytes"):
        loading.load_model_for_training(str(tiny_dir), quant="8bit", device="cpu")
    quant.check_packages("none")  # needs nothing
    with pytest.raises(MissingExtraError, match=r"--quant 4bit needs bitsandbytes"):
        quant.check_packages("4bit")


@needs_bnb
def test_bitsandbytes_imports_without_building_its_compile_wrappers():
    # A fresh process, so bitsandbytes is imported here for the first time. torch.compile is
    # replaced by a recorder that returns the function as it is: the import must not call it
    # (building the wrappers is what imports Inductor), and bitsandbytes' wrapped kernel must
    # still compute, calling it once with bitsandbytes' options at its first call.
    code = """
import sys, torch
calls = []
torch.compile = lambda fn, **options: calls.append((fn.__name__, options)) or fn
from llamalora.quant.bitsandbytes import import_bitsandbytes
bnb = import_bitsandbytes()
assert not calls, calls
assert torch.compile.__name__ == "<lambda>", "torch.compile was not put back"
from bitsandbytes.backends.default import ops
codes = torch.linspace(-1, 1, 256)
out = ops._dequantize_blockwise_compute(torch.tensor([0, 255], dtype=torch.uint8),
                                        torch.tensor([2.0]), codes, 64, torch.float32)
assert out.tolist() == [-2.0, 2.0], out
assert calls == [("_dequantize_blockwise_compute", {"dynamic": False})], calls
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


@needs_bnb
def test_8bit_on_cpu_quantizes_the_language_model_only(tiny_dir):
    model, info = loading.load_model_for_training(str(tiny_dir), quant="8bit", with_vision=True,
                                                 device="cpu")
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    language = [n for n, k in kinds.items() if k == "Linear8bitLt"]
    assert "model.language_model.layers.0.self_attn.q_proj" in language
    assert "model.language_model.layers.1.cross_attn.k_proj" in language
    assert all(n.startswith("model.language_model.layers.") for n in language)
    assert kinds["model.vision_model.transformer.layers.0.self_attn.q_proj"] == "Linear"
    assert kinds["model.multi_modal_projector"] == "Linear"
    assert kinds["lm_head"] == "Linear"
    assert info["quant"] == "8bit" and info["params_total"] == sum(
        p.numel() for p in model.parameters())


@needs_bnb
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_8bit_weights_quantized_where_loaded_equal_bitsandbytes_own(tiny_dir, device,
                                                                     monkeypatch):
    import bitsandbytes as bnb

    calls = []
    quantize = bnb.functional.int8_vectorwise_quant
    monkeypatch.setattr(bnb.functional, "int8_vectorwise_quant",
                        lambda *a, **k: calls.append(1) or quantize(*a, **k))
    ours, _ = loading.load_base_model(str(tiny_dir), quant="8bit", with_vision=True, device=device)
    assert calls, "the on-device conversion did not run"
    # transformers' own conversion (through the CPU) for reference
    monkeypatch.setattr(bnb_backend, "_int8_where_loaded", contextlib.nullcontext)
    stock, _ = loading.load_base_model(str(tiny_dir), quant="8bit", with_vision=True, device=device)
    a, b = ours.state_dict(), stock.state_dict()
    assert a.keys() == b.keys()
    assert sum(t.dtype == torch.int8 for t in a.values()) == 3 * 7  # 3 layers x 7 linears
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert ours.is_loaded_in_8bit
    q = ours.model.language_model.layers[0].self_attn.q_proj
    assert q.weight.SCB is not None and q.weight.device.type == device


# --- LoRA -------------------------------------------------------------------------------------

def test_lora_target_names_and_pattern():
    import re

    assert lora_target_names("all-linear") == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert lora_target_names(" q_proj, v_proj ,q_proj") == ["q_proj", "v_proj"]
    for bad in ("q_proj,lm_head", "", "fc1"):
        with pytest.raises(ConfigError, match="--target-modules"):
            lora_target_names(bad)
    pattern = lora.lora_target_pattern(["q_proj", "o_proj"], MLLAMA.vision_parts)
    assert re.fullmatch(pattern, "model.language_model.layers.3.self_attn.q_proj")
    assert re.fullmatch(pattern, "model.layers.1.cross_attn.o_proj")
    assert not re.fullmatch(pattern, "model.vision_model.transformer.layers.0.self_attn.q_proj")
    assert not re.fullmatch(pattern, "model.layers.0.self_attn.k_proj")
    assert not re.fullmatch(pattern, "model.layers.0.self_attn.q_proj.lora_A")


def _lora_names(model) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_lora_skips_vision_and_matches_between_classes(tiny_dir):
    text, _ = loading.load_model_for_training(str(tiny_dir), quant="none", device="cpu")
    vision, _ = loading.load_model_for_training(str(tiny_dir), quant="none", with_vision=True,
                                                 device="cpu")
    text = lora.attach_lora(text, target_modules="all-linear")
    vision = lora.attach_lora(vision, target_modules="all-linear")
    assert vision.lora_target_names == list(LORA_TARGETS)
    vision_names = _lora_names(vision)
    assert vision_names and all("lora_" in n for n in vision_names)
    assert not any("vision_model" in n or "multi_modal_projector" in n or "lm_head" in n
                   for n in vision_names)
    # 3 decoder layers x 7 projections x (A, B).
    assert len(vision_names) == 3 * 7 * 2
    same = [n.replace("model.language_model.layers.", "model.layers.") for n in vision_names]
    assert same == _lora_names(text)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in same


def test_attach_lora_rejects_bad_options(tiny_dir):
    model, _ = loading.load_model_for_training(str(tiny_dir), quant="none", device="cpu")
    with pytest.raises(ConfigError, match="--lora-rank"):
        lora.attach_lora(model, r=0)
    with pytest.raises(ConfigError, match="--target-modules"):
        lora.attach_lora(model, target_modules="q_proj,fc1")


@needs_bnb
def test_8bit_forward_backward_trains_lora_only(tiny_dir):
    model, _ = loading.load_model_for_training(str(tiny_dir), quant="8bit", with_vision=True,
                                              device="cpu", gradient_checkpointing=True)
    model = lora.attach_lora(model, target_modules="q_proj,k_proj,v_proj,o_proj")
    model.train()
    batch, labels = _image_batch(tiny_dir)
    loss = model(**batch, labels=labels).loss
    assert math.isfinite(loss.item())
    loss.backward()
    with_grad = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    # lora_B starts at zero, so lora_B gets the nonzero gradient on the first step; the
    # cross-attention layer's adapters get one too, so images reach the language model.
    assert any(g.abs().sum() > 0 for n, g in with_grad.items() if "lora_B" in n)
    assert any(g.abs().sum() > 0 for n, g in with_grad.items()
               if "cross_attn" in n and "lora_B" in n)
    # The frozen tower runs without autograd: nothing of it is kept for backward.
    base = model.get_base_model().model
    out = base.vision_model(pixel_values=batch["pixel_values"],
                            aspect_ratio_ids=batch["aspect_ratio_ids"],
                            aspect_ratio_mask=batch["aspect_ratio_mask"])
    assert not out.last_hidden_state.requires_grad


@pytest.mark.slow
@needs_bnb
def test_tiny_model_memorizes_with_lora_at_8bit(tiny_dir):
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    pairs = [("거푸집이란?", "콘크리트를 굳히는 임시 틀입니다."),
             ("What is rebar?", "A steel bar that carries tension."),
             ("양생이란?", "콘크리트 강도를 위해 습도를 유지하는 과정."),
             ("Define slump.", "A test of fresh concrete consistency.")]
    rows = []
    for prompt, answer in pairs:
        p = tokenizer(f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{prompt}"
                      "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
                      add_special_tokens=False).input_ids
        a = tokenizer(answer + "<|eot_id|>", add_special_tokens=False).input_ids
        rows.append((p + a, [-100] * len(p) + a))
    length = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([i + [PAD] * (length - len(i)) for i, _ in rows])
    labels = torch.tensor([lab + [-100] * (length - len(lab)) for _, lab in rows])
    mask = (ids != PAD).long()
    torch.manual_seed(0)
    model, _ = loading.load_model_for_training(str(tiny_dir), quant="8bit", device="cpu")
    model = lora.attach_lora(model, r=8, alpha=32, dropout=0.05)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3,
                                  weight_decay=0.0)
    base = model.get_base_model()
    targets = labels[:, 1:]
    keep = targets != -100

    def answer_loss():
        hidden = base.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return F.cross_entropy(base.lm_head(hidden[:, :-1][keep]).float(), targets[keep])

    model.train()
    first = answer_loss().item()
    for _ in range(200):
        loss = answer_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        final = answer_loss().item()
    assert first > 10 and final < 0.1, (first, final)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("quant", [pytest.param("8bit", marks=needs_bnb), "none"])
def test_gpu_training_step_with_images(tiny_dir, quant):
    model, info = loading.load_model_for_training(str(tiny_dir), quant=quant, with_vision=True,
                                                 gradient_checkpointing=True)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert info["compute_dtype"] == str(dtype).removeprefix("torch.")
    assert info["device"].startswith("cuda")
    vision = model.model.vision_model
    assert vision.patch_embedding.weight.dtype == dtype  # kept in the compute dtype, not fp32
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in vision.modules())
    model = lora.attach_lora(model, target_modules="all-linear")
    model.train()
    batch, labels = _image_batch(tiny_dir)
    device = torch.device(info["device"])
    batch = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
             for k, v in batch.items()}
    loss = model(**batch, labels=labels.to(device)).loss
    assert math.isfinite(loss.item())
    loss.backward()
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert with_grad and all("lora_" in n for n in with_grad)
