"""stats against a direct computation with the tokenizer."""

from __future__ import annotations

import math

import pytest
from tokenizers import Tokenizer

from llamalora.errors import DataError, ModelError
from llamalora.stats import compute_stats, padding_share
from llamalora.tokenizer import BUNDLED_TOKENIZER_DIR, load_tokenizer

from conftest import GOOD, write_jsonl

H = "<|start_header_id|>{}<|end_header_id|>\n\n"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(str(BUNDLED_TOKENIZER_DIR / "tokenizer.json"))


def _direct(tok, rec):
    # Written out by hand, independently of llamalora.template: Meta's Llama 3.2 Vision format
    # for text-only records (a system block with the dates, then the system message if any).
    system = rec.get("system") or ""
    user = rec["instruction"] + ("\n" + rec["input"] if rec.get("input") else "")
    prompt = ("<|begin_of_text|>" + H.format("system") + "Cutting Knowledge Date: December 2023\n"
              "Today Date: 26 Jul 2024\n\n" + system + "<|eot_id|>"
              + H.format("user") + user + "<|eot_id|>" + H.format("assistant"))
    response = rec["output"] + "<|eot_id|>"
    n_prompt = len(tok.encode(prompt, add_special_tokens=False).ids)
    n_resp = len(tok.encode(response, add_special_tokens=False).ids)
    return n_prompt, n_resp


def test_bundled_tokenizer_is_llama_3_2_vision(tok):
    assert tok.get_vocab_size() == 128257
    assert tok.token_to_id("<|image|>") == 128256
    assert tok.token_to_id("<|eot_id|>") == 128009


def test_stats_equal_direct_computation(tmp_path, tok):
    long_rec = {"instruction": "콘크리트 양생 절차를 자세히 설명하세요.", "input": "",
                "output": "양생은 콘크리트가 강도를 내도록 수분과 온도를 유지하는 일입니다. " * 40}
    records = GOOD + [long_rec]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    limit = 128
    report = compute_stats(path, tok, max_seq_length=limit, batch_size=2)
    d = report.to_dict()
    direct = [_direct(tok, r) for r in records]
    totals = [p + r for p, r in direct]
    assert [(x.prompt, x.response) for x in report.lengths] == direct
    assert d["records"] == 4
    assert d["tokens"]["max"] == max(totals) and d["tokens"]["min"] == min(totals)
    assert d["tokens"]["mean"] == round(sum(totals) / 4, 1)
    assert d["over_max"] == 1 and d["over_max_lines"] == [4]
    p, r = direct[3]
    assert d["response_tokens_lost"] == p + r - limit
    assert d["responses_fully_lost"] == 0
    assert d["suggested_max_seq_length"]["max"] == math.ceil(max(totals) / 64) * 64
    truncated = [min(t, limit) for t in totals]
    assert d["total_tokens"] == sum(truncated)
    assert d["padding"]["pad_to_max"] == round(1 - sum(truncated) / (4 * limit), 4)


def test_response_fully_lost_when_prompt_fills_the_window(tmp_path, tok):
    rec = {"instruction": "단어 " * 200, "output": "짧은 답"}
    d = compute_stats(write_jsonl(tmp_path / "d.jsonl", [rec]), tok,
                      max_seq_length=64).to_dict()
    assert d["responses_fully_lost"] == 1
    assert d["response_tokens_lost"] == d["response_tokens"]["max"]


def test_padding_share():
    assert padding_share([10, 10, 10, 10], 2, grouped=True) == 0.0
    assert padding_share([1, 3, 1, 3], 2, grouped=True) == 0.0
    assert padding_share([1, 3], 2, grouped=False) == round(1 - 4 / 6, 4)


def test_invalid_records_refused_or_skipped(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", GOOD + [{"instruction": "x", "output": None}])
    with pytest.raises(DataError, match="line 4"):
        compute_stats(path, tok)
    report = compute_stats(path, tok, skip_invalid=True)
    assert report.skipped_invalid == 1 and len(report.lengths) == 3


def test_tokenizer_falls_back_for_llama_ids_only(tmp_path):
    src = load_tokenizer("meta-llama/Llama-3.2-11B-Vision-Instruct")
    assert src.fallback_reason and "bundled" in src.fallback_reason
    with pytest.raises(ModelError) as caught:
        load_tokenizer("someone/other-model")
    assert str(caught.value) == (
        "someone/other-model is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set, "
        "so only the local cache is read; pass a local model folder (or `tiny`), or run once "
        "where the Hub is reachable so it is cached")
    with pytest.raises(ModelError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_a_hub_tokenizer_with_the_hub_unreachable_fails_at_once(monkeypatch, hub_unreachable):
    """`--model someorg/somemodel` offline: the local cache only (no retries), and a message
    that says what is missing and what to do."""
    import time

    import huggingface_hub

    calls = []
    real = huggingface_hub.hf_hub_download

    def download(*args, **kwargs):
        calls.append(kwargs.get("local_files_only", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    start = time.perf_counter()
    with pytest.raises(ModelError) as caught:
        load_tokenizer("someorg/somemodel")
    assert str(caught.value) == (
        "someorg/somemodel is not in the local Hugging Face cache, and the Hugging Face Hub is "
        "unreachable (offline?); pass a local model folder (or `tiny`), or run once where the "
        "Hub is reachable so it is cached")
    assert calls == [True] and time.perf_counter() - start < 5


def test_missing_tokenizer_folder_is_a_usage_error(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from llamalora.cli.main import app

    monkeypatch.chdir(tmp_path)
    path = write_jsonl(tmp_path / "d.jsonl", GOOD)
    result = CliRunner().invoke(app, ["stats", str(path), "--tokenizer", "./typo-folder"])
    assert result.exit_code == 2
    assert "./typo-folder: no such folder" in result.stderr and "unreachable" not in result.stderr


def test_histogram_spans_the_datas_range(tmp_path, tok):
    recs = [{"instruction": "x " * n, "output": "y"} for n in (10, 40, 80, 200)]
    report = compute_stats(write_jsonl(tmp_path / "d.jsonl", recs), tok, max_seq_length=4096)
    bins = report.histogram()
    totals = sorted(r.total for r in report.lengths)
    assert bins[0].low == totals[0] and bins[-1].low <= totals[-1] <= bins[-1].high
    assert sum(b.count for b in bins) == 4 and bins[0].count >= 1 and bins[-1].count == 1
    assert bins[-1].high - totals[-1] < bins[0].high - bins[0].low + 1  # no bin past the data
    one = compute_stats(write_jsonl(tmp_path / "e.jsonl", recs[:1]), tok).histogram()
    assert one == [(totals[0], totals[0], 1)]
