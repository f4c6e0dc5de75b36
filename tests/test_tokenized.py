"""The tokenized cache (llamalora.tokenized): the same records as tokenize_examples, reused by
fingerprint, read by the ranks that did not build it, and a plan that holds no token lists."""

from __future__ import annotations

import json

import pytest

import llamalora.tokenized as tokenized
from llamalora.batching import tokenize_examples
from llamalora.data import load_examples
from llamalora.errors import DataError
from llamalora.tokenizer import load_tokenizer

from conftest import GOOD, MEMO, write_jsonl

TOK = load_tokenizer("bundled").tokenizer
OPTIONS = dict(max_seq_length=64, train_on_prompt=False, truncation="truncate")
RECORDS = GOOD + MEMO + [{"instruction": "long " * 60, "output": "cut"}]  # 3 over 64 tokens


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    # The session's cache is content-addressed and shared: a test's first build must be its own.
    monkeypatch.setenv("LLAMALORA_HOME", str(tmp_path / "home"))


@pytest.fixture
def counted(monkeypatch):
    """Counts the records tokenize_records is given (the map runs in this process)."""
    calls = []
    real = tokenized.tokenize_records

    def counting(tokenizer, examples, **kw):
        calls.append(len(examples))
        return real(tokenizer, examples, **kw)

    monkeypatch.setattr(tokenized, "tokenize_records", counting)
    return calls


def _same(records, expected):
    assert len(records) == len(expected)
    for got, want in zip(records, expected):
        assert (got.line, got.input_ids, got.labels, got.images) == (
            want.line, want.input_ids, want.labels, want.images)
    assert records.lengths == [len(t) for t in expected]


def test_cache_equals_tokenize_examples_and_is_reused(tmp_path, counted):
    path = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    first = tokenized.tokenize_data(str(path), TOK, **OPTIONS)
    assert not first.reused and sum(counted) == len(RECORDS)
    examples, _ = load_examples(path)
    expected, summary = tokenize_examples(TOK, examples, **OPTIONS)
    _same(tokenized.Records(first.table, first.kept()), expected)
    assert first.truncation == summary and summary.records_over == 3
    assert first.records == len(RECORDS) and not first.with_vision

    counted.clear()
    notes = []
    second = tokenized.tokenize_data(str(path), TOK, **OPTIONS, on_status=notes.append)
    assert second.reused and counted == [] and "from the cache" in notes[0]
    _same(tokenized.Records(second.table, second.kept()), expected)

    # Another option tokenizes again (from the stored examples); other data is another entry.
    third = tokenized.tokenize_data(str(path), TOK, **{**OPTIONS, "truncation": "drop"})
    assert not third.reused and third.truncation.records_dropped == 3
    assert len(third.kept()) == len(RECORDS) - 3
    path.write_text(path.read_text() + '{"instruction": "new", "output": "one"}\n')
    assert tokenized.tokenize_data(str(path), TOK, **OPTIONS).records == len(RECORDS) + 1


def test_other_ranks_read_what_rank_0_built(tmp_path, counted):
    path = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    built = tokenized.tokenize_data(str(path), TOK, **OPTIONS)
    counted.clear()
    read = tokenized.tokenize_data(str(path), TOK, **OPTIONS, builder=False)
    assert counted == [] and read.truncation == built.truncation
    assert read.column("length").tolist() == built.column("length").tolist()


def test_a_failed_build_reaches_the_waiting_ranks(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", GOOD + [{"instruction": "x", "output": 1}])
    with pytest.raises(DataError, match="line 4") as built:
        tokenized.tokenize_data(str(path), TOK, **OPTIONS)
    with pytest.raises(DataError) as waited:
        tokenized.tokenize_data(str(path), TOK, **OPTIONS, builder=False)
    assert str(waited.value) == str(built.value)


def test_parquet_and_skip_invalid(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [dict(r) for r in GOOD] + [{"instruction": "x", "output": ""}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    data = tokenized.tokenize_data(str(tmp_path / "d.parquet"), TOK, **OPTIONS,
                                   skip_invalid=True)
    assert data.records == 3 and data.column("line").tolist() == [1, 2, 3]


@pytest.mark.slow
def test_num_proc_2_gives_the_same_records(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": f"{r['instruction']} {i}", "output": r["output"]}
        for i in range(300) for r in GOOD])
    two = tokenized.tokenize_data(str(path), TOK, **OPTIONS, num_proc=2)
    assert len(list((tokenized.cache_root()).glob("*/tokenized-*_of_00002.arrow"))) == 2
    expected, _ = tokenize_examples(TOK, load_examples(path)[0], **OPTIONS)
    _same(tokenized.Records(two.table, two.kept()), expected)
    again = tokenized.tokenize_data(str(path), TOK, **OPTIONS, num_proc=2)
    assert again.reused and len(again.table) == 900


def test_the_plan_holds_records_not_token_lists(tmp_path):
    from llamalora.config import TrainConfig
    from llamalora.plan import plan_training

    path = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    plan = plan_training(TrainConfig(data_path=str(path), model="tiny", max_seq_length=64,
                                     eval_fraction=0.2))
    assert isinstance(plan.train, tokenized.Records) and isinstance(plan.eval, tokenized.Records)
    # the last record's response is cut away whole, so it is left out
    assert plan.records == len(RECORDS) and plan.truncation.dropped_lines == [len(RECORDS)]
    assert (plan.train_records, plan.eval_records) == (len(plan.train), len(plan.eval)) == (6, 1)
    assert plan.tokens_per_epoch == sum(plan.train.lengths) == sum(map(len, plan.train))
    assert sorted(t.line for t in [*plan.train, *plan.eval]) == list(range(1, len(RECORDS)))


def test_images_survive_the_cache(tmp_path):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    path = write_jsonl(tmp_path / "d.jsonl", GOOD + [
        {"instruction": "What colour?", "output": "black", "image": "a.png"}])
    data = tokenized.tokenize_data(str(path), TOK, **OPTIONS, image_root=str(tmp_path / "imgs"))
    records = tokenized.Records(data.table, data.kept())
    assert data.with_vision and records[3].images == [tmp_path / "imgs" / "a.png"]
    assert records[0].images == [] and TOK.token_to_id("<|image|>") in records[3].input_ids


@pytest.mark.slow
def test_worker_processes_render_with_the_tokenizers_own_template(tmp_path):
    """A checkpoint's template reaches the tokenizing processes (a pickled tokenizer loses what
    was attached to it) and is part of the cache key."""
    from tokenizers import Tokenizer

    from llamalora.template import ChatTemplate, attach_template
    from llamalora.tokenizer import BUNDLED_TOKENIZER_DIR

    from conftest import LLAMA3_TEMPLATE

    own = Tokenizer.from_file(str(BUNDLED_TOKENIZER_DIR / "tokenizer.json"))  # not the shared one
    attach_template(own, ChatTemplate(LLAMA3_TEMPLATE, (("bos_token", "<|begin_of_text|>"),
                                                        ("eos_token", "<|end_of_text|>"))))
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": f"{r['instruction']} {i}", "output": r["output"]}
        for i in range(300) for r in GOOD])
    two = tokenized.tokenize_data(str(path), own, **OPTIONS, num_proc=2)
    expected, _ = tokenize_examples(own, load_examples(path)[0], **OPTIONS)
    _same(tokenized.Records(two.table, two.kept()), expected)
    bundled = tokenized.tokenize_data(str(path), TOK, **OPTIONS, num_proc=2)
    assert not bundled.reused  # another template, another key
    assert tokenized.Records(bundled.table, bundled.kept())[0].input_ids != expected[0].input_ids


def test_a_cached_run_parses_no_tokenizer_and_imports_no_datasets(tmp_path):
    """The second run's start: the token cache is keyed on the tokenizer file's digest, so the
    file is never parsed, and the cached Arrow files are read by pyarrow alone."""
    import os
    import subprocess
    import sys
    import textwrap

    path = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    code = textwrap.dedent(f"""
        import json, sys
        from llamalora.tokenized import Records, tokenize_data
        from llamalora.tokenizer import load_tokenizer
        tok = load_tokenizer("bundled").tokenizer
        data = tokenize_data({str(path)!r}, tok, max_seq_length=64, train_on_prompt=False,
                             truncation="truncate")
        rows = Records(data.table, data.kept())
        print(json.dumps({{"reused": data.reused, "parsed": tok._parsed is not None,
                          "datasets": "datasets" in sys.modules,
                          "first": rows[0].input_ids, "n": len(rows)}}))
    """)
    env = {**os.environ, "LLAMALORA_HOME": os.environ["LLAMALORA_HOME"]}
    runs = [json.loads(subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                      capture_output=True, text=True).stdout)
            for _ in range(2)]
    assert [r["reused"] for r in runs] == [False, True]
    assert runs[0]["parsed"] and runs[0]["datasets"]  # the build tokenizes through datasets
    assert not runs[1]["parsed"] and not runs[1]["datasets"]
    assert (runs[1]["first"], runs[1]["n"]) == (runs[0]["first"], runs[0]["n"])


def test_a_file_tokenizer_parses_once_pickles_and_names_a_broken_file(tmp_path):
    import pickle

    from tokenizers import Tokenizer

    from llamalora.errors import ModelError
    from llamalora.template import template_of
    from llamalora.tokenizer import BUNDLED_TOKENIZER_DIR, FileTokenizer

    tok = load_tokenizer("bundled").tokenizer
    direct = Tokenizer.from_file(str(BUNDLED_TOKENIZER_DIR / "tokenizer.json"))
    assert tok.encode("거푸집 formwork").ids == direct.encode("거푸집 formwork").ids
    assert tok.parsed() is tok.parsed()
    copy = pickle.loads(pickle.dumps(tok))
    assert copy._parsed is None and template_of(copy) is not None
    assert copy.token_to_id("<|image|>") == 128256
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{not json")
    with pytest.raises(ModelError, match=str(broken)):
        FileTokenizer(broken).encode("x")


def test_skip_invalid_says_what_it_left_out_on_every_run(tmp_path):
    """--skip-invalid's records, by reason with their lines, on the first run and on one that
    reads the cache."""
    path = write_jsonl(tmp_path / "d.jsonl", GOOD + [{"instruction": "x"},
                                                     {"instruction": "y", "output": 3}])
    note = (f"Left out 2 invalid record(s) (--skip-invalid): 1 missing_field (line 4), 1 "
            f"wrong_type (line 5); `llamalora validate {path}` lists their problems")
    for reused in (False, True):
        notes = []
        data = tokenized.tokenize_data(str(path), TOK, **OPTIONS, skip_invalid=True,
                                       on_status=notes.append)
        assert data.reused == reused and notes[0] == note and data.records == 3


def test_tool_calls_survive_the_cache_and_are_trained_on(tmp_path):
    """A tool-calling record keeps its tools and tool turns through examples.arrow: the cache
    holds what tokenize_examples makes of it, the call among the tokens with loss."""
    tools = [{"name": "get_weather", "parameters": {"type": "object"}}]
    record = {"conversations": [
        {"from": "human", "value": "Weather in Seoul?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather",
                                                       "arguments": {"city": "Seoul"}})},
        {"from": "observation", "value": '{"temperature": 21}'},
        {"from": "gpt", "value": "21 degrees."}], "tools": json.dumps(tools)}
    path = write_jsonl(tmp_path / "t.jsonl", [record])
    options = {**OPTIONS, "max_seq_length": 512}
    data = tokenized.tokenize_data(str(path), TOK, **options)
    examples, _ = load_examples(path)
    expected, _ = tokenize_examples(TOK, examples, **options)
    _same(tokenized.Records(data.table, data.kept()), expected)
    trained = [t for t, label in zip(expected[0].input_ids, expected[0].labels) if label != -100]
    assert TOK.decode(trained, skip_special_tokens=False) == (
        '{"name": "get_weather", "parameters": {"city": "Seoul"}}<|eot_id|>21 degrees.<|eot_id|>')
