"""export-adapter --merge --text-only [--gguf]: the text model as a plain Llama and a GGUF file.

The end-to-end export of a trained run (Llama folder and f16 GGUF, answers checked) is in
test_chat_export.py, which has the trained run; here are the pieces, the refusals, and a q8_0
export of an untrained adapter.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from llamalora.cli.main import app
from llamalora.errors import ModelError
from llamalora.export.gguf_file import llama_shape, permute_rotary, rope_factors
from llamalora.export.llama import (check_llama_names, llama31_chat_template, llama_config,
                                    llama_weights)

from conftest import tiny_adapter

runner = CliRunner()


def _text_config(**over):
    from llamalora.models.tiny import tiny_config

    config = tiny_config().text_config
    for k, v in over.items():
        setattr(config, k, v)
    return config


def test_cross_attention_layers_are_dropped_and_the_rest_renumbered():
    config = SimpleNamespace(num_hidden_layers=5, cross_attention_layers=[1, 3], vocab_size=10,
                             tie_word_embeddings=False)
    state = {"model.embed_tokens.weight": torch.randn(18, 4), "model.norm.weight": torch.ones(4),
             "lm_head.weight": torch.randn(10, 4)}
    for i in range(5):
        kind = "cross_attn" if i in (1, 3) else "self_attn"
        state[f"model.layers.{i}.{kind}.q_proj.weight"] = torch.full((4, 4), float(i))
        state[f"model.layers.{i}.input_layernorm.weight"] = torch.full((4,), float(i))
    weights, layout = llama_weights(state, config)
    assert layout.kept_layers == [0, 2, 4] and layout.dropped_layers == [1, 3]
    # Llama layer j holds Mllama layer kept_layers[j], untouched.
    for new, old in enumerate((0, 2, 4)):
        assert torch.equal(weights[f"model.layers.{new}.self_attn.q_proj.weight"],
                           state[f"model.layers.{old}.self_attn.q_proj.weight"])
        assert weights[f"model.layers.{new}.input_layernorm.weight"][0].item() == old
    assert not any("cross_attn" in k or ".3." in k for k in weights)
    # The 8 extra embedding rows go; the head's 10 rows stay.
    assert torch.equal(weights["model.embed_tokens.weight"],
                       state["model.embed_tokens.weight"][:10])
    assert weights["lm_head.weight"] is state["lm_head.weight"]
    with pytest.raises(ModelError, match="unexpected weight"):
        llama_weights({**state, "model.vision_model.x": torch.ones(1)}, config)


def test_converted_tiny_model_has_exactly_llamas_weights():
    from transformers import MllamaForCausalLM

    text = _text_config()
    with torch.device("meta"):
        mllama = MllamaForCausalLM(text)
    weights, layout = llama_weights(mllama.state_dict(), text)
    config = llama_config(text, layout, "bf16")
    check_llama_names(weights, config)  # raises on any missing, extra or reshaped weight
    assert config["num_hidden_layers"] == 2 and config["vocab_size"] == 128256
    assert weights["model.embed_tokens.weight"].shape[0] == 128256 < layout.embedding_rows
    broken = dict(weights)
    broken.pop("model.layers.1.mlp.up_proj.weight")
    with pytest.raises(ModelError, match="missing"):
        check_llama_names(broken, config)


def test_llama_config_keeps_the_llama3_rope_for_every_reader(tmp_path):
    """config.json in Meta's format reloads with the Mllama model's rotary frequencies."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.mllama.modeling_mllama import MllamaRotaryEmbedding

    text = _text_config()
    _, layout = llama_weights({"model.embed_tokens.weight": torch.zeros(128264, 1)}, text)
    config = llama_config(text, layout, "bf16")
    assert config["rope_scaling"]["rope_type"] == "llama3" and "rope_theta" in config
    assert "rope_parameters" not in config  # transformers 4 would ignore it
    (tmp_path / "config.json").write_text(json.dumps(config))
    reloaded = LlamaConfig.from_pretrained(tmp_path)
    assert torch.equal(LlamaRotaryEmbedding(reloaded).inv_freq,
                       MllamaRotaryEmbedding(text).inv_freq)


def test_rope_factors_are_what_llama_cpp_divides_by():
    """The 11B's dimensions: base frequencies / rope_freqs.weight == transformers' llama3 ones."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192})
    factors = rope_factors(llama_shape(config))
    base = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    expected = LlamaRotaryEmbedding(config).inv_freq
    assert torch.allclose(base / factors, expected, rtol=1e-6)
    assert factors.min() == 1.0 and factors.max() == 8.0  # high frequencies kept, low ones / 8
    assert rope_factors(llama_shape(LlamaConfig(hidden_size=4096, num_attention_heads=32))) is None


def test_rotary_permutation_is_undone_by_transformers_gguf_loader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    processor = LlamaTensorProcessor({"num_attention_heads": 4, "num_key_value_heads": 2})
    q, k = torch.randn(64, 64), torch.randn(32, 64)
    for name, weight, heads in (("blk.0.attn_q.weight", q, 4), ("blk.0.attn_k.weight", k, 2)):
        permuted = permute_rotary(weight, heads)
        assert not torch.equal(permuted, weight)
        back = processor.process(weights=permuted.numpy(), name=name).weights
        assert torch.equal(torch.from_numpy(back), weight)


def test_chat_template_is_meta_llama31_text_format():
    from transformers import AutoTokenizer

    from llamalora.tokenizer import bundled_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(bundled_tokenizer_dir())
    system = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge "
              "Date: December 2023\nToday Date: 26 Jul 2024\n\n")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "거푸집이란?"}],
                                         chat_template=llama31_chat_template(), tokenize=False,
                                         add_generation_prompt=True)
    assert text == (system + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n거푸집이란?"
                    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
         {"role": "assistant", "content": "ok"}], chat_template=llama31_chat_template(),
        tokenize=False)
    assert text == (system + "Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nhi"
                    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nok<|eot_id|>")


# --- refusals (no model is loaded for any of them) ---------------------------------------------

def _export(*args):
    return runner.invoke(app, ["export-adapter", *map(str, args)])


@pytest.mark.parametrize("args, message", [
    (["--text-only"], "pass --merge --text-only"),
    (["--merge", "--gguf", "m.gguf"], "--gguf converts the text-only Llama model"),
    (["--merge", "--text-only", "--gguf", "m.gguf", "--gguf-type", "q4_k"], "--gguf-type must"),
    (["--merge", "--text-only", "--gguf", "model.bin"], "ending in .gguf"),
])
def test_option_refusals(tmp_path, args, message):
    r = _export(tiny_adapter(tmp_path), "--out", tmp_path / "out", *args)
    assert r.exit_code == 2, r.output
    assert message in r.stderr and r.stderr.startswith("Error: ")
    assert not (tmp_path / "out").exists()


def test_run_trained_with_images_is_refused(tmp_path):
    folder = tiny_adapter(tmp_path, run={"plan": {"with_vision": True}})
    r = _export(folder, "--out", tmp_path / "out", "--merge", "--text-only")
    assert r.exit_code == 2 and "was trained with images" in r.stderr
    assert "--merge (the full vision model)" in r.stderr


def test_adapter_that_changed_a_cross_attention_layer_is_refused(tmp_path):
    """A bare adapter has no run record: a trained cross-attention LoRA gives it away."""
    r = _export(tiny_adapter(tmp_path, cross_b=0.1), "--out", tmp_path / "out", "--merge",
                "--text-only")
    assert r.exit_code == 2 and "changed cross-attention layer 1" in r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.tmp").exists()


def test_gguf_without_the_package_names_the_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    r = _export(tiny_adapter(tmp_path), "--out", tmp_path / "out", "--merge", "--text-only",
                "--gguf", tmp_path / "m.gguf")
    assert r.exit_code == 1 and "pip install 'gguf>=0.19'" in r.stderr


def test_existing_gguf_is_not_overwritten(tmp_path):
    (tmp_path / "m.gguf").write_text("mine")
    r = _export(tiny_adapter(tmp_path), "--out", tmp_path / "out", "--merge", "--text-only",
                "--gguf", tmp_path / "m.gguf")
    assert r.exit_code == 1 and "--overwrite" in r.stderr
    assert (tmp_path / "m.gguf").read_text() == "mine"


# --- a whole export, q8_0 ---------------------------------------------------------------------

@pytest.mark.slow
def test_q8_0_gguf_of_an_untrained_adapter(tmp_path, caplog):
    """An adapter with random B (every layer but the cross-attention one, as text training
    leaves it) exported through the API with a Q8_0 GGUF, read back through transformers' GGUF
    loader: within the export's Q8_0 tolerance of the Llama folder, at 34 bytes per 32 weights.
    (The export's own checks run in test_chat_export.py's f16 export; here they are skipped to
    spare CI two more reads of the 128k-token vocabulary.)"""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llamalora.export import export_adapter
    from llamalora.export.gguf_file import GGUF_Q8_TOLERANCE

    from conftest import tiny_lora_model

    model = tiny_lora_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "cross_attn" in name and "lora_B" in name:
                p.zero_()
    model.save_pretrained(str(tmp_path / "adapter"))
    gguf = tmp_path / "model-q8_0.gguf"
    result = export_adapter(tmp_path / "adapter", tmp_path / "llama", merge=True, dtype="fp32",
                            text_only=True, gguf=gguf, gguf_type="q8_0", verify=False)
    assert result.kind == "llama" and result.gguf["type"] == "q8_0" and gguf.is_file()
    # gguf-py's warning about Llama 3's pair template (which a GGUF never uses) is not shown.
    assert not [r for r in caplog.records if r.name.startswith("gguf")]
    assert result.details["layers"] == 2 and result.details["dropped_cross_attention_layers"] == [1]
    params = result.details["params"]
    assert params * 34 / 32 < result.gguf["bytes"] < params * 34 / 32 + 8 * 2**20
    # The GGUF, and beside it the record that lets a later --overwrite know it for an export's.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".model-q8_0.gguf.llamalora.json", "adapter", "llama", "model-q8_0.gguf"]

    ids = torch.tensor([list(range(128000, 128010)) + list(range(1000, 1030))])
    folder = AutoModelForCausalLM.from_pretrained(str(tmp_path / "llama"))
    q8 = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=gguf.name, dtype=torch.float32,
        config=LlamaConfig.from_pretrained(str(tmp_path / "llama")))
    with torch.no_grad():
        expected, got = folder(input_ids=ids).logits, q8(input_ids=ids).logits
    scale = expected.abs().max().item()
    assert 0 < (got - expected).abs().max().item() <= GGUF_Q8_TOLERANCE * scale

def test_q8_0_is_gguf_pys_bit_for_bit():
    import gguf

    from llamalora.export.gguf_file import quantize_q8_0

    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 96, generator=g) * 0.02
    x[0, :32] = 0  # an all-zero block (scale 0)
    x[1, :32] = torch.tensor([127.0] + [i + 0.5 for i in range(31)])  # scale 1: exact halves,
    x[2, 32:64] = -x[1, :32]  # which ggml rounds away from zero
    for t in (x, x.to(torch.bfloat16)):
        expected = gguf.quants.quantize(t.float().numpy(), gguf.GGMLQuantizationType.Q8_0)
        got = quantize_q8_0(t)
        assert got.dtype == expected.dtype and got.shape == expected.shape == (8, 102)
        assert (got == expected).all()


def test_disk_check_sums_what_goes_to_one_disk(tmp_path, monkeypatch):
    import shutil as sh
    from collections import namedtuple

    from llamalora.errors import UsageError
    from llamalora.export.target import Target, check_room

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(0, 0, 10 * 2**30))
    (tmp_path / "a").mkdir()
    a, b = (Target(p, p, True, "--out") for p in (tmp_path, tmp_path / "a"))
    check_room([(a, 6 * 2**30)], "the export")  # fits
    with pytest.raises(UsageError, match=r"needs about 12\.0 GiB, 10\.0 GiB free"):
        check_room([(a, 6 * 2**30), (b, 6 * 2**30)], "the export")
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(0, 0, 3 * 2**20))
    with pytest.raises(UsageError, match=r"needs about 20\.0 MiB, 3\.0 MiB free"):
        check_room([(a, 20 * 2**20)], "the export")  # small sizes in MiB, never "0.0 GiB"


def test_a_gguf_may_differ_by_its_formats_share_or_twice_the_models_own_noise():
    """An f16 GGUF may differ by 2% of the largest logit (bf16), or by twice the rounding noise
    the export measured (attention on SDPA's math kernel) where that is more: a deep model's f16
    GGUF can differ by more than 2% and less than twice its noise. Q8_0 keeps 15%."""
    from llamalora.export.gguf_file import GGUF_NOISE_FACTOR, gguf_share
    from llamalora.export.verify import Probe, verify

    assert gguf_share("f16", "bf16") == pytest.approx(0.02)
    assert gguf_share("f16", "fp32") == pytest.approx(5e-3)
    assert gguf_share("q8_0", "bf16") == pytest.approx(0.15)
    expected = torch.zeros(1, 3, 8)
    expected[..., 0] = 6.97
    probe = Probe([1, 2, 3], "cpu")

    def off_by(delta):  # what reloading a GGUF whose logits are `delta` away gives
        return lambda: (lambda input_ids: SimpleNamespace(logits=expected + delta))

    share = gguf_share("f16", "bf16")
    check = verify("the GGUF", off_by(0.305), expected, probe, share=share,
                   floor=GGUF_NOISE_FACTOR * 0.371)
    assert check.tolerance == pytest.approx(0.742) and check.max_logit_diff == pytest.approx(0.305)
    assert verify("the GGUF", off_by(0.1), expected, probe, share=share,
                  floor=GGUF_NOISE_FACTOR * 0.01).tolerance == pytest.approx(0.02 * 6.97)
    with pytest.raises(ModelError, match=r"the GGUF gives different logits \(max diff 0\.305"):
        verify("the GGUF", off_by(0.305), expected, probe, share=share,
               floor=GGUF_NOISE_FACTOR * 0.01)
