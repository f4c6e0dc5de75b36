"""llamalora.data's validator: one test per error and warning code, each at its exact line."""

from __future__ import annotations

import json

import pytest

from llamalora.data import ERROR_CODES, WARNING_CODES, load_examples, validate_file
from llamalora.errors import DataError, UsageError

from conftest import GOOD, write_jsonl

OK = json.dumps(GOOD[0], ensure_ascii=False)


def _check(tmp_path, second_line: str | bytes, code: str, *, field="unset", line=2):
    path = tmp_path / "d.jsonl"
    body = second_line if isinstance(second_line, bytes) else second_line.encode()
    path.write_bytes(OK.encode() + b"\n" + body + b"\n" + OK.replace("거푸집", "철근").encode()
                     + b"\n")
    report = validate_file(path)
    found = [p for p in report.errors + report.warnings if p.code == code]
    assert found, (code, [p.to_dict() for p in report.errors + report.warnings])
    assert found[0].line == line
    if field != "unset":
        assert found[0].field == field
    return report, found[0]


@pytest.mark.parametrize("record, field, words", [
    ({"instruction": "a", "output": 42}, "output", "a number"),
    ({"instruction": "a", "output": None}, "output", "null"),
    ({"instruction": "a", "output": ["x", "y"]}, "output", "a list"),
    ({"instruction": "a", "output": {"t": 1}}, "output", "an object"),
    ({"instruction": "a", "output": True}, "output", "a boolean"),
    ({"instruction": 3, "output": "b"}, "instruction", "a number"),
    ({"instruction": "a", "input": [], "output": "b"}, "input", "a list"),
])
def test_wrong_type_says_which(tmp_path, record, field, words):
    report, problem = _check(tmp_path, json.dumps(record), "wrong_type", field=field)
    assert words in problem.message
    assert report.records == 3 and report.records_ok == 2


def test_invalid_utf8(tmp_path):
    _check(tmp_path, b'{"instruction": "\xff", "output": "b"}', "invalid_utf8", field=None)


def test_invalid_json_has_message_and_column(tmp_path):
    _, p = _check(tmp_path, '{"instruction": "a", "output": }', "invalid_json", field=None)
    assert "column 32" in p.message and "Expecting value" in p.message


def test_not_object(tmp_path):
    _check(tmp_path, '["instruction", "output"]', "not_object", field=None)


def test_missing_field_hints_at_alias(tmp_path):
    _, p = _check(tmp_path, '{"instruction": "a", "answer": "b"}', "missing_field",
                  field="output")
    assert "`answer`" in p.message


def test_missing_instruction(tmp_path):
    _check(tmp_path, '{"output": "b"}', "missing_field", field="instruction")


@pytest.mark.parametrize("record, field", [
    ({"instruction": "  ", "output": "b"}, "instruction"),
    ({"instruction": "a", "output": "\n\t"}, "output"),
])
def test_empty_field(tmp_path, record, field):
    _check(tmp_path, json.dumps(record), "empty_field", field=field)


def test_image_missing_and_unreadable(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    _check(tmp_path, '{"instruction": "a", "output": "b", "image": "nope.png"}', "image_missing",
           field="image")
    _check(tmp_path, '{"instruction": "a", "output": "b", "images": ["bad.png"]}',
           "image_unreadable", field="images")


def test_good_image_passes(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(tmp_path / "ok.png")
    report = validate_file(write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "what?", "output": "red", "image": "ok.png"}]))
    assert report.ok and report.records_ok == 1


@pytest.mark.parametrize("record, words", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     "alternate"),
    ({"messages": [{"role": "user", "content": "a"}]}, "last turn"),
    ({"messages": [{"role": "bot", "content": "a"}]}, "'bot'"),
    ({"messages": [{"role": "user", "content": "<image>a"}, {"role": "assistant", "content": "b"}],
      "images": []}, "placeholder"),
    ({"messages": "hi"}, "non-empty list"),
])
def test_bad_messages(tmp_path, record, words):
    _, p = _check(tmp_path, json.dumps(record), "bad_messages")
    assert words in p.message


def test_messages_non_string_content_is_wrong_type(tmp_path):
    rec = {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "b"}]}
    _check(tmp_path, json.dumps(rec), "wrong_type", field="messages[0].content")


def test_no_records(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n\n")
    report = validate_file(path)
    assert [p.code for p in report.errors] == ["no_records"]
    assert report.errors[0].line is None
    assert report.warning_counts["blank_line"] == 3


def test_bom_blank_line_unknown_field_duplicate_special_token(tmp_path):
    path = tmp_path / "w.jsonl"
    dup = json.dumps(GOOD[1])
    path.write_bytes(b"\xef\xbb\xbf" + OK.encode() + b"\r\n\r\n" + dup.encode() + b"\r\n"
                     + b'{"instruction": "a", "output": "b", "note": 1}\r\n' + dup.encode()
                     + b'\r\n{"instruction": "a<|eot_id|>", "output": "b"}\r\n')
    report = validate_file(path)
    assert report.ok and report.records == 5 and report.records_ok == 5
    got = {(p.code, p.line, p.field) for p in report.warnings}
    assert got == {("bom", 1, None), ("blank_line", 2, None), ("unknown_field", 4, "note"),
                   ("duplicate", 5, None), ("special_token", 6, None)}
    assert "line 3" in next(p for p in report.warnings if p.code == "duplicate").message


def test_every_code_is_tested():
    # Keeps this file honest when a code is added.
    source = open(__file__, encoding="utf-8").read()
    for code in ERROR_CODES + WARNING_CODES:
        assert f'"{code}"' in source, code


def test_json_array_lines_are_where_records_start(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a",\n'
                    '   "output": 7},\n  {"output": "x"}\n]\n')
    report = validate_file(path)
    assert [(p.line, p.code) for p in report.errors] == [(3, "wrong_type"), (5, "missing_field")]
    assert report.records == 3 and report.records_ok == 1


def test_json_array_syntax_error_line(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n {"instruction": "a", "output": "b"}\n {"instruction": "c"}\n]')
    report = validate_file(path)
    assert [(p.line, p.code) for p in report.errors] == [(3, "invalid_json")]


def test_missing_file_and_folder_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        validate_file(tmp_path / "nope.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="dataset folder .*empty"):
        validate_file(tmp_path / "empty")


def test_fix_writes_clean_copy_and_keeps_input(tmp_path):
    path = tmp_path / "in.jsonl"
    raw = (b"\xef\xbb\xbf" + OK.encode() + b"\r\n"
           + b'{"instruction": "n", "output": 42, "input": null}\r\n\r\n'
           + b'{"instruction": "t", "output": true}\r\n'
           + b'{"instruction": "l", "output": ["a", "b"]}\r\n'
           + OK.encode() + b"\r\n")
    path.write_bytes(raw)
    out = tmp_path / "out.jsonl"
    report = validate_file(path, fix_out=out)
    assert path.read_bytes() == raw
    assert report.fixed_records == 3 and report.dropped_lines == [5, 6]
    clean = validate_file(out)
    assert clean.ok and not clean.warnings and clean.records == 3
    lines = out.read_text(encoding="utf-8").split("\n")
    assert json.loads(lines[1]) == {"instruction": "n", "output": "42", "input": ""}
    assert json.loads(lines[2])["output"] == "true"
    assert b"\r" not in out.read_bytes()


def test_fix_refuses_the_input_as_output(tmp_path, good_file):
    with pytest.raises(UsageError, match="new file"):
        validate_file(good_file, fix_out=good_file)


def test_load_examples_refuses_with_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", GOOD + [{"instruction": "x", "output": 1}])
    with pytest.raises(DataError, match="line 4"):
        load_examples(path)
    examples, report = load_examples(path, skip_invalid=True)
    assert len(examples) == 3 and report.records == 4


def test_examples_carry_the_conversation(tmp_path, good_file):
    examples, _ = load_examples(good_file)
    assert examples[0].messages == [("user", "다음 건설 용어를 설명하세요.\n거푸집"),
                                    ("assistant", GOOD[0]["output"])]
    assert examples[2].system == "건설 용어 도우미입니다."
    assert [e.line for e in examples] == [1, 2, 3]


def test_messages_record_images_become_image_tokens(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    rec = {"messages": [{"role": "system", "content": "s"},
                        {"role": "user", "content": "<image>what?"},
                        {"role": "assistant", "content": "black"},
                        {"role": "user", "content": "sure?"},
                        {"role": "assistant", "content": "yes"}], "images": ["a.png"]}
    examples, _ = load_examples(write_jsonl(tmp_path / "m.jsonl", [rec]))
    ex = examples[0]
    assert ex.system == "s" and ex.images == [tmp_path / "a.png"]
    assert ex.messages[0] == ("user", "<|image|>what?") and len(ex.messages) == 4


def test_fifo_is_refused_not_waited_on(tmp_path):
    import os

    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="regular file"):
        validate_file(fifo)


def test_record_too_large_is_skipped_unread(tmp_path, monkeypatch):
    import llamalora.data as data

    monkeypatch.setattr(data, "MAX_RECORD_BYTES", 1000)
    big = json.dumps({"instruction": "a", "output": "x" * 5000})
    _check(tmp_path, big, "record_too_large", field=None)
    path = tmp_path / "a.json"
    path.write_text("[\n" + OK + ",\n" + big + ",\n" + OK + "\n]\n", encoding="utf-8")
    report = validate_file(path)
    assert [(p.line, p.code) for p in report.errors] == [(3, "record_too_large")]


def test_deeply_nested_json_is_an_error_not_a_crash(tmp_path):
    deep = '{"instruction": "a", "output": ' + "[" * 200_000 + "]" * 200_000 + "}"
    _, p = _check(tmp_path, deep, "invalid_json", field=None)
    assert "nested" in p.message


def test_truncated_and_oversized_images(tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64), "red").save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    Image.new("1", (9000, 9000)).save(tmp_path / "bomb.png")  # 81M pixels, a few KB on disk
    _, p = _check(tmp_path, '{"instruction": "a", "output": "b", "image": "cut.png"}',
                  "image_unreadable")
    _, p = _check(tmp_path, '{"instruction": "a", "output": "b", "image": "bomb.png"}',
                  "image_unreadable")
    assert "pixel" in p.message


def test_large_json_array_streams_with_right_lines(tmp_path):
    # Over several 1 MiB read chunks: every element keeps its own start line.
    recs = [{"instruction": f"term {i}", "output": "정의 " * 50} for i in range(3000)]
    recs[2500]["output"] = 5
    path = tmp_path / "big.json"
    path.write_text("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\n]",
                    encoding="utf-8")
    assert path.stat().st_size > 2**20
    report = validate_file(path)
    assert report.records == 3000
    assert [(p.line, p.code) for p in report.errors] == [(2502, "wrong_type")]


def test_duplicate_tracking_is_capped(tmp_path, monkeypatch):
    import llamalora.data as data

    monkeypatch.setattr(data, "DUPLICATE_TRACK_LIMIT", 2)
    recs = [{"instruction": f"t{i}", "output": "o"} for i in range(4)] + [
        {"instruction": "t0", "output": "o"}, {"instruction": "t3", "output": "o"}]
    report = validate_file(write_jsonl(tmp_path / "d.jsonl", recs))
    dups = [(p.line, p.message[:22]) for p in report.warnings if p.code == "duplicate"]
    assert dups == [(None, "duplicate check stoppe"), (5, "exact duplicate of lin")]


@pytest.mark.slow
@pytest.mark.parametrize("as_array", [False, True])
def test_validate_memory_stays_flat_on_a_large_file(tmp_path, as_array):
    import subprocess
    import sys

    line = json.dumps({"instruction": "다음 건설 용어를 설명하세요.", "input": "거푸집",
                       "output": "콘크리트를 굳히는 임시 틀입니다. " * 6}, ensure_ascii=False)
    n = 250_000  # ~100 MB
    path = tmp_path / ("big.json" if as_array else "big.jsonl")
    with path.open("w", encoding="utf-8") as f:
        f.write("[\n" if as_array else "")
        for i in range(n):
            f.write(line.replace("설명하세요.", f"설명하세요. {i}"))
            f.write(",\n" if as_array and i < n - 1 else "\n")
        f.write("]\n" if as_array else "")
    assert path.stat().st_size > 90 * 2**20
    # VmHWM is this process's own peak; ru_maxrss would include the forking parent's.
    code = ("import re, sys; from llamalora.data import validate_file; "
            "r = validate_file(sys.argv[1]); assert r.records == %d and r.ok, r.error_counts; "
            "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])" % n)
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                         text=True, check=True)
    peak_mib = int(out.stdout.strip()) / 1024
    assert peak_mib < 120, peak_mib  # the file is ~100 MB; memory must not grow with it


@pytest.mark.slow
def test_validate_json_report_of_many_warnings_stays_small(tmp_path):
    """`validate --json` on 100,000 records, nearly all duplicates (one warning each): the
    report is written straight to stdout, not re-parsed and highlighted (which took ~650 MB)."""
    import subprocess
    import sys

    line = json.dumps({"instruction": "용어를 설명하세요.", "input": "거푸집",
                       "output": "임시 틀입니다."}, ensure_ascii=False)
    path = tmp_path / "dups.jsonl"
    path.write_text((line + "\n") * 100_000, encoding="utf-8")
    code = ("import re, sys; from llamalora.cli.main import main; sys.argv = ['llamalora', "
            "'validate', sys.argv[1], '--json']\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1], "
            "file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                         text=True, check=True)
    report = json.loads(out.stdout)
    assert report["records"] == 100_000 and len(report["warnings"]) == 99_999
    peak_mib = int(out.stderr.strip().splitlines()[-1]) / 1024
    assert peak_mib < 200, peak_mib


# --- the layouts users have --------------------------------------------------------------------

def _png(path, color="red"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path


def _one(tmp_path, record, warnings=(), **kwargs):
    examples, report = load_examples(write_jsonl(tmp_path / "d.jsonl", [record]), **kwargs)
    assert report.ok and [p.code for p in report.warnings] == list(warnings), \
        [p.to_dict() for p in report.warnings]
    return examples[0]


def test_sharegpt_and_llava_conversations(tmp_path):
    _png(tmp_path / "images" / "coco" / "a.png")
    rec = {"id": "0001", "image": "coco/a.png", "system_prompt": "Be exact.",
           "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                             {"from": "gpt", "value": "A red square."},
                             {"from": "human", "value": "Sure?"},
                             {"from": "gpt", "value": "Yes."}]}
    ex = _one(tmp_path, rec, ["system_with_images"], image_root=tmp_path / "images")
    assert ex.system == "Be exact." and ex.images == [tmp_path / "images" / "coco" / "a.png"]
    assert ex.messages == [("user", "<|image|>\nWhat is it?"), ("assistant", "A red square."),
                           ("user", "Sure?"), ("assistant", "Yes.")]


def test_messages_with_from_value_and_a_system_turn(tmp_path):
    rec = {"messages": [{"from": "system", "value": "s"}, {"from": "user", "value": "q"},
                        {"from": "assistant", "value": "a"}]}
    ex = _one(tmp_path, rec)
    assert ex.system == "s" and ex.messages == [("user", "q"), ("assistant", "a")]


def test_openai_content_parts_place_images(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png", "blue")
    rec = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Compare "}, {"type": "image", "image": "a.png"},
        {"type": "text", "text": " and "}, {"type": "image_url", "image_url": {"url": "b.png"}}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red, blue."}]}]}
    ex = _one(tmp_path, rec)
    assert ex.messages[0] == ("user", "Compare <|image|> and <|image|>")
    assert ex.images == [tmp_path / "a.png", tmp_path / "b.png"]
    # image parts without paths take the record's `images`, in order
    rec2 = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                          "text": "?"}]},
                         {"role": "assistant", "content": "red"}], "images": ["a.png"]}
    assert _one(tmp_path, rec2).messages[0] == ("user", "<|image|>?")


def test_alpaca_image_list_system_prompt_and_placeholders(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    ex = _one(tmp_path, {"instruction": "Which is left?", "output": "a",
                         "image": ["a.png", "b.png"], "system_prompt": "s"},
              ["system_with_images"])
    assert ex.messages[0] == ("user", "<|image|><|image|>Which is left?") and ex.system == "s"
    ex = _one(tmp_path, {"instruction": "Left <image>, right <image>: same?", "output": "yes",
                         "images": ["a.png", "b.png"]})
    assert ex.messages[0] == ("user", "Left <|image|>, right <|image|>: same?")
    assert len(ex.images) == 2


@pytest.mark.parametrize("record, code, field, words", [
    ({"instruction": "Describe <image>", "output": "x"}, "bad_messages", "images",
     "1 `<image>` placeholder(s) but 0 image(s)"),
    ({"instruction": "a", "output": "b", "video": "v.mp4"}, "video_unsupported", "video",
     "not supported"),
    ({"conversations": [{"from": "human", "value": "<video>?"}, {"from": "gpt", "value": "b"}],
      "videos": ["v.mp4"]}, "video_unsupported", "videos", "images"),
    ({"instruction": "a", "response": "b"}, "missing_field", "output", "`response`: rename"),
    ({"prompt": "a", "output": "b"}, "missing_field", "instruction", "`prompt`: rename"),
    ({"input": "a", "output": "b"}, "missing_field", "instruction", "`input`: rename"),
    ({"instruction": "t", "instances": [{"input": "a", "output": "b"}]}, "missing_field",
     "output", "`instances`"),
    ({"text": "plain text"}, "missing_field", "instruction", "plain text"),
    ({"instruction": "a", "output": {"text": "b", "score": 1}}, "wrong_type", "output",
     "`output.text`"),
    ({"instruction": "a", "input": {"context": "c"}, "output": "b"}, "wrong_type", "input",
     "`input.context`"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "function_call",
                                                         "value": "b"}]},
     "bad_messages", "conversations[1].role", "human or gpt"),
    ({"instruction": "a", "output": "b", "system": "s", "system_prompt": "t"}, "wrong_type",
     "system", "not both"),
])
def test_wrong_layouts_get_a_hint(tmp_path, record, code, field, words):
    _, p = _check(tmp_path, json.dumps(record), code, field=field)
    assert words in p.message, p.message


def test_missing_image_names_the_path_tried_and_the_option(tmp_path):
    _png(tmp_path / "images" / "a.png")
    _, p = _check(tmp_path, '{"instruction": "a", "output": "b", "image": "a.png"}',
                  "image_missing", field="image")
    assert str(tmp_path / "a.png") in p.message
    assert f"--image-root {tmp_path / 'images'}" in p.message
    _, p = _check(tmp_path, '{"instruction": "a", "output": "b", "image": "zz.png"}',
                  "image_missing", field="image")
    assert "--image-root DIR" in p.message
    with pytest.raises(UsageError, match="no such folder"):
        validate_file(write_jsonl(tmp_path / "x.jsonl", GOOD), image_root=tmp_path / "nope")


def test_fix_renames_and_spreads_instances(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [
        {"instruction": "a", "response": "b"},
        {"question": "q", "answer": 7},
        {"input": "only input", "output": "o"},
        {"instruction": "Translate.", "instances": [{"input": "one", "output": "하나"},
                                                    {"input": "two", "output": "둘"}]},
        {"instruction": "x", "output": {"nested": True}},
    ])
    out = tmp_path / "out.jsonl"
    report = validate_file(path, fix_out=out)
    assert not report.ok and report.fixed_records == 5 and report.dropped_lines == [5]
    fixed = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert fixed == [{"instruction": "a", "output": "b"},
                     {"instruction": "q", "output": "7"},
                     {"instruction": "only input", "output": "o"},
                     {"instruction": "Translate.", "input": "one", "output": "하나"},
                     {"instruction": "Translate.", "input": "two", "output": "둘"}]
    assert validate_file(out).ok


def test_fix_with_nothing_left_writes_nothing_and_says_so(tmp_path):
    from typer.testing import CliRunner

    from llamalora.cli.main import app

    path = write_jsonl(tmp_path / "in.jsonl", [{"instruction": "a", "output": ["x"]}])
    out = tmp_path / "out.jsonl"
    report = validate_file(path, fix_out=out)
    assert report.fixed_records == 0 and report.fixed_path is None and not out.exists()
    result = CliRunner().invoke(app, ["validate", str(path), "--fix", str(out)])
    assert result.exit_code == 1 and not out.exists()
    assert "Nothing written" in result.stderr and "with --fix OUT" not in result.stderr


# --- tables through `datasets` ----------------------------------------------------------------

ROWS = [dict(GOOD[0]), {"instruction": "b", "output": "c"}, {"instruction": "d", "output": 5}]


def _table_file(tmp_path, suffix: str):
    import pyarrow as pa

    # `input` is null where a row has none; the bad row's output is "" (a column holds one type).
    rows = [dict(r) for r in ROWS]
    rows[2]["output"] = ""
    table = pa.Table.from_pylist(rows)
    path = tmp_path / f"d{suffix}"
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    elif suffix == ".csv":
        import pyarrow.csv as pc

        pc.write_csv(table, path)
    else:
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
    return path


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".arrow"])
def test_table_files_name_the_row(tmp_path, suffix):
    path = _table_file(tmp_path, suffix)
    report = validate_file(path)
    assert report.unit == "row" and report.records == 3 and report.records_ok == 2
    (p,) = report.errors
    # CSV has no empty string apart from a missing value
    code = "missing_field" if suffix == ".csv" else "empty_field"
    assert (p.line, p.field, p.code) == (3, "output", code)
    assert str(p).startswith("row 3:") and p.to_dict()["row"] == 3
    examples, _ = load_examples(path, skip_invalid=True)
    assert examples[0].messages[0] == ("user", "다음 건설 용어를 설명하세요.\n거푸집")
    assert examples[1].messages == [("user", "b"), ("assistant", "c")]


def test_dataset_folder_with_splits_loads_offline(tmp_path):
    """A Hub-style dataset folder (data/train-*.parquet, data/test-*.parquet) as
    `load_dataset` reads it; HF_HUB_OFFLINE is set for every test."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "org_name"
    (folder / "data").mkdir(parents=True)
    convo = [{"conversations": [{"from": "human", "value": f"q{i}"},
                                {"from": "gpt", "value": f"a{i}"}]} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(convo), folder / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(convo[:1]),
                   folder / "data" / "test-00000-of-00001.parquet")
    examples, report = load_examples(folder)
    assert report.records == 3 and examples[2].messages == [("user", "q2"), ("assistant", "a2")]
    assert validate_file(folder, split="test").records == 1
    with pytest.raises(UsageError, match="--split dev"):
        validate_file(folder, split="dev")


def test_hub_id_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="Hub dataset someorg/missing-set.*hf auth login"):
        validate_file("someorg/missing-set")
    with pytest.raises(UsageError, match="no such file"):
        validate_file("someorg/missing-set.jsonl")


def test_a_save_to_disk_folder_reads_by_split(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]
    DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:1])}
                ).save_to_disk(str(tmp_path / "dd"))
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    assert validate_file(tmp_path / "dd").records == 2
    assert validate_file(tmp_path / "dd", split="test").records == 1
    assert validate_file(tmp_path / "one").records_ok == 2
    with pytest.raises(UsageError, match="--split dev"):
        validate_file(tmp_path / "dd", split="dev")


def test_system_message_beside_images_is_a_warning(tmp_path):
    """Meta's Llama 3.2 Vision template refuses a system message next to images; validate
    (which knows no template) warns at the line, so stats/train's stop comes as no surprise."""
    _png(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "s.jsonl", [
        {"instruction": "What is it?", "output": "Red.", "image": "a.png", "system": "Be brief."},
        {"instruction": "What is it?", "output": "Red.", "system": "Be brief."},
        {"messages": [{"role": "user", "content": "<image>Color?"},
                      {"role": "assistant", "content": "Red."}],
         "images": ["a.png"], "system": "Be brief."}])
    report = validate_file(path)
    assert report.ok and report.records_ok == 3
    assert {(p.code, p.line, p.field) for p in report.warnings} == {
        ("system_with_images", 1, "system"), ("system_with_images", 3, "system")}
