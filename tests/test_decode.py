"""The static-cache decoder gives the tokens transformers' `generate` gives (CPU, eager; the
CUDA-graph replay of the same step is checked by the `gpu` tests at the end)."""

from __future__ import annotations

import pytest
import torch

from llamalora import decode
from llamalora.decode import StaticDecoder

from conftest import tiny_lora_model

STOPS = [128001, 128008, 128009]


def _plain(model, ids: list[int], n: int) -> list[int]:
    device = model.get_input_embeddings().weight.device
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([ids], device=device),
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                                                       device=device),
                             max_new_tokens=n, do_sample=False,
                             temperature=None, top_p=None, top_k=None, eos_token_id=STOPS,
                             pad_token_id=128004)
    return out[0, len(ids):].tolist()


def _ours(decoder, ids: list[int], n: int) -> list[int]:
    return list(decoder.generate(ids, max_new_tokens=n, stop_ids=STOPS,
                                 choose=lambda logits: logits.argmax(-1)))


@pytest.fixture(scope="module")
def model():
    return tiny_lora_model(torch.float64).eval()


def test_greedy_tokens_equal_generate(model):
    decoder = StaticDecoder(model)
    assert not decoder.graphs  # no CUDA here
    for ids in ([128000, 9906, 1917], list(range(500, 540))):
        expected = _plain(model, ids, 24)
        assert len(set(expected)) > 2  # a sequence that says something about the cache
        assert _ours(decoder, ids, 24) == expected


def test_padded_prompts_give_the_same_tokens(model, monkeypatch):
    """The graphed path pads each prompt to a length bucket (here 16 and 32, past the end of
    the first cache): the padding changes no token."""
    monkeypatch.setattr(decode, "MIN_PREFILL_BUCKET", 16)
    monkeypatch.setattr(decode, "CACHE_STEP", 16)
    decoder = StaticDecoder(model)
    decoder.pad_prompts = True
    for ids in ([128000, 9906, 1917], list(range(500, 520)), [128000, 11]):
        assert _ours(decoder, ids, 12) == _plain(model, ids, 12)
    assert decoder.cache.length == 32


def test_cache_grows_and_is_reused(model, monkeypatch):
    monkeypatch.setattr(decode, "CACHE_STEP", 16)
    decoder = StaticDecoder(model)
    short = [128000, 9906, 1917]
    assert _ours(decoder, short, 10) == _plain(model, short, 10)
    first = decoder.cache
    assert first.length == 16
    long = list(range(700, 730))  # needs 30 + 12 positions: a new cache of 48
    assert _ours(decoder, long, 12) == _plain(model, long, 12)
    assert decoder.cache.length == 48
    # A shorter prompt after a longer one: stale K/V past the prompt must stay masked.
    assert _ours(decoder, short, 10) == _plain(model, short, 10)
    assert decoder.cache.length == 48


def test_stops_at_a_stop_id(model):
    decoder = StaticDecoder(model)
    ids = [128000, 9906, 1917]
    first = _ours(decoder, ids, 1)[0]
    got = list(decoder.generate(ids, max_new_tokens=20, stop_ids=[first],
                                choose=lambda logits: logits.argmax(-1)))
    assert got == [first]


PROMPTS = [[128000, 9906, 1917], list(range(500, 540)), [128000, 11], list(range(900, 917))]


def test_a_batch_gives_each_prompt_its_own_greedy_answer(model):
    """Prompts of four lengths in one batch: each row's tokens are the one-prompt decoder's and
    generate's, also for a row that stops early (its stop id) while the others go on."""
    single = [_ours(StaticDecoder(model), ids, 16) for ids in PROMPTS]
    assert single == [_plain(model, ids, 16) for ids in PROMPTS]
    # Row 1 stops at a token it first gives after a few others; rows without it run to the end.
    k = next(k for k, t in enumerate(single[1]) if k >= 2 and single[1].index(t) == k
             and any(t not in other for other in single))
    stop = single[1][k]
    expected = []
    for tokens in single:
        cut = tokens.index(stop) + 1 if stop in tokens else len(tokens)
        expected.append(tokens[:cut])
    assert len(expected[1]) == k + 1 and max(map(len, expected)) == 16
    decoder = StaticDecoder(model)
    assert decoder.generate_batch(PROMPTS, max_new_tokens=16, stop_ids=[stop]) == expected
    assert decoder.cache.rows == sum(len(e) == 16 for e in expected) < 4  # stopped rows left
    # The same decoder then serves one prompt again (its cache back to one row).
    assert _ours(decoder, PROMPTS[2], 16) == single[2]


def test_a_padded_batch_gives_the_same_answers(model, monkeypatch):
    """As the graphed path runs it: prompts padded to a length bucket, spare rows filled."""
    monkeypatch.setattr(decode, "MIN_PREFILL_BUCKET", 16)
    decoder = StaticDecoder(model)
    decoder.pad_prompts = True
    decoder.reserve(6, 64)
    decoder.graphs = True  # the row padding of a captured batch (no capture: see _steps)
    monkeypatch.setattr(decoder, "_prefill", lambda prompts: StaticDecoder._prefill(
        _Eager(decoder), prompts))
    monkeypatch.setattr(decoder, "_decode", lambda tokens, position: StaticDecoder._decode(
        _Eager(decoder), tokens, position))
    got = decoder.generate_batch(PROMPTS, max_new_tokens=12, stop_ids=STOPS, rows=6)
    assert decoder.cache.rows == 6
    assert got == [_plain(model, ids, 12) for ids in PROMPTS]


class _Eager:
    """The decoder seen with graphs off, for the padding test's prefill and decoding steps."""

    def __init__(self, decoder):
        self._decoder = decoder

    def __getattr__(self, name):
        return False if name == "graphs" else getattr(self._decoder, name)


def test_adapter_state_follows_peft_switching(model):
    """What a captured graph is keyed by: peft's disable_adapter() and set_adapter() change it."""
    from peft import LoraConfig

    on = decode.adapter_state(model)
    assert on == (False, ("default",))
    with model.disable_adapter():
        assert decode.adapter_state(model) == (True, ("default",))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    model.set_adapter("other")
    try:
        assert decode.adapter_state(model) == (False, ("other",))
    finally:
        model.set_adapter("default")
        model.delete_adapter("other")
    assert decode.adapter_state(model) == on
    assert decode.adapter_state(model.get_base_model()) == on  # peft's layers, either way


@pytest.mark.needs_bnb
def test_8bit_greedy_tokens_equal_generate():
    pytest.importorskip("bitsandbytes")
    from llamalora.models.loading import load_model_for_training
    from llamalora.models.lora import attach_lora

    torch.manual_seed(0)
    model, _ = load_model_for_training("tiny", quant="8bit", device="cpu")
    model = attach_lora(model, r=4, alpha=8, dropout=0.0).eval()
    ids = list(range(300, 320))
    assert _ours(StaticDecoder(model), ids, 16) == _plain(model, ids, 16)


def test_full_vision_model_decodes_text_through_its_language_model():
    from llamalora.models.loading import load_model_for_inference

    model, _ = load_model_for_inference("tiny", quant="none", with_vision=True)
    assert type(model).__name__ == "MllamaForConditionalGeneration"
    assert decode.supported(model) is None
    decoder = StaticDecoder(model)
    # Mllama's cross-attention layers are skipped for text, as Mllama itself skips them.
    assert len(decoder.layers) < len(decoder.decoder.layers)
    ids = [128000, 9906, 1917, 374]
    assert _ours(decoder, ids, 12) == _plain(model, ids, 12)


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["none", "8bit"])
def test_cuda_graph_replay_gives_the_eager_tokens(quant):
    """On a GPU the step is captured once and replayed over two prompts of different lengths:
    the tokens are the eager step's (the same kernels), and in fp32 also generate's."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from llamalora.models.loading import load_model_for_training
    from llamalora.models.lora import attach_lora
    from llamalora.quant import fastlinear

    torch.manual_seed(0)
    dtype = "float32" if quant == "none" else None
    model, _ = load_model_for_training("tiny", quant=quant, device="cuda", dtype=dtype)
    model = attach_lora(model, r=4, alpha=8, dropout=0.0).eval()
    fastlinear.enable(model, "auto")
    graphed, eager = StaticDecoder(model), StaticDecoder(model, graphs=False)
    eager.pad_prompts = True  # the same shapes, so the same kernels
    assert graphed.graphs
    for ids in ([128000, 9906, 1917], list(range(500, 540))):
        tokens = _ours(graphed, ids, 24)
        assert tokens == _ours(eager, ids, 24)
        if quant == "none":
            assert tokens == _plain(model, ids, 24)
    state = decode.adapter_state(model)
    # one decoding step, one prompt bucket, for one row and this adapter state
    assert set(graphed._graphs) == {(1, 1, state), (1, 64, state)}


@pytest.mark.gpu
def test_cuda_graphs_of_a_batch_keep_base_and_tuned_apart():
    """A batch through captured graphs, with the adapter on, then off, then on again: each
    state replays its own graphs, and the rows equal the eager (padded) decoder's."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = tiny_lora_model().to("cuda").eval()
    graphed, eager = StaticDecoder(model), StaticDecoder(model, graphs=False)
    eager.pad_prompts = True
    graphed.reserve(4, 128)
    run = dict(max_new_tokens=16, stop_ids=STOPS)
    tuned = graphed.generate_batch(PROMPTS[:3], rows=4, **run)
    assert tuned == eager.generate_batch(PROMPTS[:3], **run)
    with model.disable_adapter():
        base = graphed.generate_batch(PROMPTS, rows=4, **run)
        assert base == eager.generate_batch(PROMPTS, **run)
    assert base[:3] != tuned
    assert graphed.generate_batch(PROMPTS[:3], rows=4, **run) == tuned
    states = {key[2] for key in graphed._graphs}
    assert states == {(False, ("default",)), (True, ("default",))}


def test_chat_merges_lora_only_into_an_unquantized_base_on_a_gpu(monkeypatch):
    from llamalora.chat import merge_for_decoding

    model = tiny_lora_model(torch.float64).eval()
    ids = list(range(300, 320))
    before = _ours(StaticDecoder(model), ids, 12)
    assert not merge_for_decoding(model)  # no GPU: kept as trained
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert merge_for_decoding(model)
    assert all(m.merged for m in model.modules() if hasattr(m, "merged_adapters"))
    assert _ours(StaticDecoder(model), ids, 12) == before


@pytest.mark.needs_bnb
def test_chat_keeps_lora_apart_from_an_8bit_base(monkeypatch):
    pytest.importorskip("bitsandbytes")
    from llamalora.chat import merge_for_decoding
    from llamalora.models.loading import load_model_for_training
    from llamalora.models.lora import attach_lora

    model, _ = load_model_for_training("tiny", quant="8bit", device="cpu")
    model = attach_lora(model, r=4, alpha=8, dropout=0.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not merge_for_decoding(model)
