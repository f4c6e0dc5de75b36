"""llamalora.data's validator: one test per error and warning code, each at its exact line."""

from __future__ import annotations

import json
from pathlib import Path

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
    assert "column 32" in p.text and "Expecting value" in p.text


def test_not_object(tmp_path):
    _check(tmp_path, '["instruction", "output"]', "not_object", field=None)


def test_missing_field_hints_at_alias(tmp_path):
    _, p = _check(tmp_path, '{"instruction": "a", "answer": "b"}', "missing_field",
                  field="output")
    assert "`answer`" in p.text


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
    assert words in p.text


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


def test_fix_never_replaces_or_removes_what_is_there(tmp_path, good_file):
    """An existing file (even one no record would be written to) and a folder under the
    name are refused and left as they were."""
    mine = tmp_path / "mine.txt"
    mine.write_text("the user's notes")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "output": ["x"]}])
    for data in (good_file, bad):
        with pytest.raises(UsageError) as caught:
            validate_file(data, fix_out=mine)
        assert str(caught.value) == (f"--fix {mine} already exists; name a new file (or move "
                                     "that one away first)")
        assert mine.read_text() == "the user's notes"
    (tmp_path / "folder").mkdir()
    with pytest.raises(UsageError, match="already exists"):
        validate_file(good_file, fix_out=tmp_path / "folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "folder", "good.jsonl",
                                                          "mine.txt"]


def test_fix_writes_the_copy_whole_or_not_at_all(tmp_path, good_file, monkeypatch):
    """The copy is renamed into place once complete: a run that fails midway leaves neither
    the copy nor its temporary sibling; one that writes no record leaves no file."""
    from llamalora.data import scan

    out = tmp_path / "out.jsonl"
    monkeypatch.setattr(scan._Scan, "run", lambda self: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        validate_file(good_file, fix_out=out)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.jsonl"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "output": ["x"]}])
    report = validate_file(bad, fix_out=out)
    assert report.fixed_records == 0 and report.fixed_path is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl"]
    assert validate_file(good_file, fix_out=out).fixed_path == str(out) and out.is_file()


def test_fix_into_a_folder_that_cannot_be_written_names_the_option(tmp_path, good_file,
                                                                    monkeypatch):
    import pathlib

    real = pathlib.Path.open

    def refuse(self, mode="r", *args, **kwargs):
        if "x" in mode:
            raise PermissionError(13, "Permission denied")
        return real(self, mode, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", refuse)
    with pytest.raises(UsageError) as caught:
        validate_file(good_file, fix_out=tmp_path / "out.jsonl")
    assert str(caught.value) == (f"--fix {tmp_path / 'out.jsonl'}: cannot write there "
                                 "(Permission denied); name a new file in a writable folder")


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
    # A template that takes a system message next to images (not Llama 3.2 Vision's).
    examples, _ = load_examples(write_jsonl(tmp_path / "m.jsonl", [rec]),
                                system_with_images=True)
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
    import llamalora.data.readers as readers

    monkeypatch.setattr(readers, "MAX_RECORD_BYTES", 1000)
    big = json.dumps({"instruction": "a", "output": "x" * 5000})
    _check(tmp_path, big, "record_too_large", field=None)
    path = tmp_path / "a.json"
    path.write_text("[\n" + OK + ",\n" + big + ",\n" + OK + "\n]\n", encoding="utf-8")
    report = validate_file(path)
    assert [(p.line, p.code) for p in report.errors] == [(3, "record_too_large")]


def test_deeply_nested_json_is_an_error_not_a_crash(tmp_path):
    deep = '{"instruction": "a", "output": ' + "[" * 200_000 + "]" * 200_000 + "}"
    _, p = _check(tmp_path, deep, "invalid_json", field=None)
    assert "nested" in p.text


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
    assert "pixel" in p.text


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
    import llamalora.data.scan as scan

    monkeypatch.setattr(scan, "DUPLICATE_TRACK_LIMIT", 2)
    recs = [{"instruction": f"t{i}", "output": "o"} for i in range(4)] + [
        {"instruction": "t0", "output": "o"}, {"instruction": "t3", "output": "o"}]
    report = validate_file(write_jsonl(tmp_path / "d.jsonl", recs))
    dups = [(p.line, p.text[:22]) for p in report.warnings if p.code == "duplicate"]
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
    ex = _one(tmp_path, rec, image_root=tmp_path / "images", system_with_images=True)
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
              system_with_images=True)
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
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]},
     "bad_messages", "conversations[1].role", "human or gpt"),
    ({"instruction": "a", "output": "b", "system": "s", "system_prompt": "t"}, "wrong_type",
     "system", "not both"),
])
def test_wrong_layouts_get_a_hint(tmp_path, record, code, field, words):
    _, p = _check(tmp_path, json.dumps(record), code, field=field)
    assert words in p.text, p.text


def test_a_record_no_fix_rule_changes_is_checked_once(tmp_path, monkeypatch):
    """validate asks whether --fix would mend an invalid record; where the fix rules change
    nothing it does not check the record again (a missing image's folder search, twice)."""
    from llamalora.data import images

    calls = []
    real = images.ImageRoot.missing_fix
    monkeypatch.setattr(images.ImageRoot, "missing_fix",
                        lambda self, name: calls.append(name) or real(self, name))
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b",
                                               "image": "zz.png"}])
    report = validate_file(path)
    assert not report.ok and report.fixable == 0 and calls == ["zz.png"]


def test_missing_image_names_the_path_tried_and_the_option(tmp_path, monkeypatch):
    _png(tmp_path / "images" / "a.png")
    record = '{"instruction": "a", "output": "b", "image": "a.png"}'
    # The folder to pass is shown as the user would type it: relative to the current folder
    # when near it, whole when far (where the suite runs from must not matter).
    monkeypatch.chdir(tmp_path)
    _, p = _check(tmp_path, record, "image_missing", field="image")
    assert str(tmp_path / "a.png") in p.text
    assert "pass --image-root images" in p.text
    far = tmp_path / "w" / "x" / "y"
    far.mkdir(parents=True)
    monkeypatch.chdir(far)
    _, p = _check(tmp_path, record, "image_missing", field="image")
    assert f"pass --image-root {tmp_path / 'images'}" in p.text
    _, p = _check(tmp_path, '{"instruction": "a", "output": "b", "image": "zz.png"}',
                  "image_missing", field="image")
    assert "--image-root DIR" in p.text
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
    assert result.stderr == (f"Error: nothing written to {out}: none of the 1 record(s) is "
                             "valid, even after the renames and conversions --fix makes; fix "
                             "the lines listed by hand\n")


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


def test_hub_id_with_the_hub_unreachable_fails_at_once(tmp_path, monkeypatch, hub_unreachable):
    """No `datasets` call (its five retries took ~25 s), one line that says why."""
    import time

    import datasets

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("asked the Hub"))
    start = time.perf_counter()
    with pytest.raises(UsageError) as caught:
        validate_file("someorg/missing-set")
    assert str(caught.value) == (
        "cannot load the Hub dataset someorg/missing-set: the Hugging Face Hub is unreachable "
        "(offline?); pass a local file or folder, or set HF_HUB_OFFLINE=1 to read the copy an "
        "earlier run cached")
    assert time.perf_counter() - start < 5


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


SYSTEM_WITH_IMAGES = ("`system_prompt` next to images: Llama 3.2 Vision's chat template takes no "
                      "system message with images (nor do vLLM and Ollama), so stats and train "
                      "stop here; move its text into the first user turn (--fix does this)")


def test_system_prompt_beside_images_is_an_error_that_fix_moves(tmp_path):
    """An LLaVA record with `system_prompt` and an image: validate says what stats and train say
    (the error, under the record's own key), and --fix moves the text into the first user turn
    and says so; the copy then validates, and stats reads it."""
    from llamalora.stats import compute_stats
    from llamalora.tokenizer import load_tokenizer

    _png(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "s.jsonl", [
        {"instruction": "What is it?", "output": "Red.", "image": "a.png", "system": "Be brief."},
        {"instruction": "What is it?", "output": "Red.", "system": "Be brief."},
        {"conversations": [{"from": "human", "value": "<image>Color?"},
                           {"from": "gpt", "value": "Red."}],
         "image": "a.png", "system_prompt": "Be brief."},
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "<image>Color?"},
                      {"role": "assistant", "content": "Red."}], "images": ["a.png"]}])
    report = validate_file(path)
    assert [(p.line, p.field, p.code) for p in report.errors] == [
        (1, "system", "system_with_images"), (3, "system_prompt", "system_with_images"),
        (4, "messages[0]", "system_with_images")]
    assert report.errors[1].text == SYSTEM_WITH_IMAGES and report.fixable == 3
    with pytest.raises(DataError, match="line 1: .*`system` next to images"):
        compute_stats(path, load_tokenizer("bundled").tokenizer)
    out = tmp_path / "fixed.jsonl"
    report = validate_file(path, fix_out=out)
    assert report.fixed_records == 4 and not report.left_out
    assert report.changes.to_dict() == {
        "moved `system` into the instruction (a system message next to images)":
            {"count": 1, "lines": [1]},
        "moved `system_prompt` into the first user turn (a system message next to images)":
            {"count": 1, "lines": [3]},
        "moved the system turn into the first user turn (a system message next to images)":
            {"count": 1, "lines": [4]}}
    fixed = [json.loads(line) for line in out.read_text().splitlines()]
    assert fixed[0] == {"instruction": "Be brief.\n\nWhat is it?", "output": "Red.",
                        "image": "a.png"}
    assert fixed[2]["conversations"][0]["value"] == "Be brief.\n\n<image>Color?"
    assert fixed[3]["messages"][0] == {"role": "user", "content": "Be brief.\n\n<image>Color?"}
    assert validate_file(out).ok
    stats = compute_stats(out, load_tokenizer("bundled").tokenizer)
    assert len(stats.lengths) == 4
    # A template that takes a system message with images: stats and train keep the records.
    examples, report = load_examples(path, system_with_images=True)
    assert report.ok and examples[2].system == "Be brief."


def test_duplicates_are_counted_over_every_record(tmp_path):
    """35 exact duplicates, 15 of them of an invalid record, are 35 duplicate warnings."""
    bad = {"instruction": "a", "output": 7}
    recs = [GOOD[0]] * 21 + [bad] * 16 + [GOOD[1]]
    report = validate_file(write_jsonl(tmp_path / "d.jsonl", recs))
    assert report.warning_counts["duplicate"] == 35
    assert report.error_counts["wrong_type"] == 16 and report.records_ok == 22
    dup = next(p for p in report.warnings if p.line == 23)
    assert dup.message == "exact duplicate of line 22"


def test_fix_says_why_it_left_each_record_out(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [
        {"instruction": "a", "output": "b"},
        {"instruction": "a", "response": "b"},  # the same as line 1 once renamed
        {"instruction": "a", "output": "b"},  # an exact duplicate of line 1
        {"instruction": "c", "output": ["x"]},  # no rule fixes a list
        {"instruction": "d", "answer": "e", "input": None},
    ], raw_lines=None)
    with path.open("a") as f:
        f.write("{not json\n")
    out = tmp_path / "out.jsonl"
    report = validate_file(path, fix_out=out)
    assert report.fixed_records == 2 and report.dropped_lines == [2, 3, 4, 6]
    assert report.left_out.summary() == ("1 duplicate after the fix (line 2 (same as 1)), "
                                         "1 duplicate (line 3 (same as 1)), 1 wrong_type "
                                         "(line 4), 1 invalid_json (line 6)")
    assert report.changes.summary() == ("1 renamed `answer` to `output` (line 5), 1 turned a "
                                        "null `input` into \"\" (line 5)")
    assert report.left_out_invalid == 2
    assert report.to_dict()["fixed"]["left_out"]["duplicate after the fix"] == {
        "count": 1, "lines": [2]}


def test_null_input_says_fix_does_this(tmp_path):
    _, p = _check(tmp_path, '{"instruction": "a", "input": null, "output": "b"}', "wrong_type",
                  field="input")
    assert p.text == "`input` must be a string, got null; give \"\" or leave it out (--fix does this)"


def test_an_unreadable_input_has_a_report_too():
    from llamalora.data import unreadable_report

    report = unreadable_report("x.jsonl", "x.jsonl: no such file; check the path")
    assert report.to_dict() == {
        "path": "x.jsonl", "records": 0, "records_ok": 0,
        "errors": [{"line": None, "field": None, "code": "unreadable",
                    "message": "x.jsonl: no such file; check the path"}],
        "warnings": [], "error_counts": {"unreadable": 1}, "warning_counts": {}}


def test_fix_copy_in_another_folder_keeps_its_images(tmp_path, monkeypatch):
    """--fix writing to another folder rewrites relative image paths to start from the copy's
    folder: the copy validates clean from there, without --image-root."""
    _png(tmp_path / "data" / "img" / "a.png")
    _png(tmp_path / "data" / "img" / "b.png", "blue")
    path = write_jsonl(tmp_path / "data" / "d.jsonl", [
        {"instruction": "<image>What?", "response": "red", "image": "img/a.png"},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "img/b.png"},
                                                   {"type": "text", "text": "What?"}]},
                      {"role": "assistant", "content": "blue"}]},
        {"instruction": "x", "output": "y", "image": str(tmp_path / "data" / "img" / "a.png")}])
    out = tmp_path / "elsewhere" / "fix" / "out.jsonl"
    out.parent.mkdir(parents=True)
    report = validate_file(path, fix_out=out)
    assert report.fixed_records == 3
    assert report.changes.to_dict()[
        "rewrote relative image paths to start from the copy's folder"]["lines"] == [1, 2]
    fixed = [json.loads(line) for line in out.read_text().splitlines()]
    assert fixed[0]["image"] == "../../data/img/a.png"
    assert fixed[1]["messages"][0]["content"][0]["image"] == "../../data/img/b.png"
    assert fixed[2]["image"] == str(tmp_path / "data" / "img" / "a.png")  # absolute: kept
    monkeypatch.chdir(tmp_path)
    again = validate_file(out)
    assert again.ok and again.records_ok == 3 and not again.warnings


def test_images_under_another_prefix_get_the_root_that_works(tmp_path, monkeypatch):
    """Qwen-VL's demo layout: records say `demo/images/x.png`, the files are in `images/`. The
    hint names the root and the prefix dropped; --image-root that root then finds them."""
    _png(tmp_path / "images" / "x.png")
    monkeypatch.chdir(tmp_path)
    path = write_jsonl(tmp_path / "demo.jsonl", [
        {"messages": [{"role": "user", "content": "<image>What?"},
                      {"role": "assistant", "content": "red"}],
         "images": ["demo/images/x.png"]}])
    (p,) = validate_file(path).errors
    assert p.message == f"image not found: {tmp_path / 'demo' / 'images' / 'x.png'}"
    assert p.fix == ("it is at images/x.png: pass --image-root . (a path not found under "
                     "--image-root is tried without its leading folders, here `demo/`)")
    examples, report = load_examples(path, image_root=".")
    assert report.ok and examples[0].images == [Path("images/x.png")]
    # The data's own folder, implied, resolves paths as written.
    assert not validate_file(path).ok


# --- tool calling -------------------------------------------------------------------------------

WEATHER = {"name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}


def glaive_record(call=None, tools=None) -> dict:
    """A record in LLaMA-Factory's glaive_toolcall layout (ShareGPT with function_call and
    observation turns; `tools` a JSON string)."""
    return {"conversations": [
        {"from": "human", "value": "What is the weather in Seoul?"},
        {"from": "function_call", "value": call if call is not None else json.dumps(
            {"name": "get_weather", "arguments": {"city": "Seoul"}})},
        {"from": "observation", "value": json.dumps({"temperature": 21})},
        {"from": "gpt", "value": "It is 21 degrees in Seoul."}],
        "tools": tools if tools is not None else json.dumps([WEATHER])}


def openai_record(arguments='{"city": "Seoul"}', name="get_weather") -> dict:
    return {"messages": [
        {"role": "system", "content": "Use the tools."},
        {"role": "user", "content": "What is the weather in Seoul?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
        {"role": "assistant", "content": "It is 21 degrees in Seoul."}],
        "tools": [{"type": "function", "function": WEATHER}]}


CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Seoul"}}}


def test_sharegpt_tool_calls_become_tool_turns(tmp_path):
    ex = _one(tmp_path, glaive_record())
    assert ex.tools == [{"type": "function", "function": WEATHER}]
    assert ex.messages == [
        ("user", "What is the weather in Seoul?"),
        ("tool_calls", json.dumps({"content": "", "tool_calls": [CALL]})),
        ("tool", '{"temperature": 21}'), ("assistant", "It is 21 degrees in Seoul.")]


def test_openai_tool_calls_become_tool_turns(tmp_path):
    ex = _one(tmp_path, openai_record())
    assert ex.system == "Use the tools." and ex.tools == [{"type": "function",
                                                           "function": WEATHER}]
    assert [r for r, _ in ex.messages] == ["user", "tool_calls", "tool", "assistant"]
    assert json.loads(ex.messages[1][1]) == {"content": "", "tool_calls": [{**CALL,
                                                                            "id": "call_1"}]}


@pytest.mark.parametrize("record, field, text", [
    (openai_record(arguments='{"city": Seoul}'), "messages[2].tool_calls[0].arguments",
     "messages[2].tool_calls[0].arguments is not valid JSON (Expecting value: line 1 column 10 "
     "(char 9))"),
    (openai_record(arguments='["Seoul"]'), "messages[2].tool_calls[0].arguments",
     "messages[2].tool_calls[0].arguments must be a JSON object, got a list"),
    (openai_record(name="get_wether"), "messages[2].tool_calls[0]",
     "messages[2].tool_calls[0] calls `get_wether`, which the record's `tools` does not declare "
     "(it declares `get_weather`); declare it in `tools`, or fix the name"),
    (glaive_record(call='{"name": "get_weather", "arguments": {"city": "Seoul"}'),
     "conversations[1].value", "conversations[1].value is not a valid JSON tool call "
     "(Expecting ',' delimiter: line 1 column 55 (char 54))"),
    (glaive_record(call=json.dumps({"arguments": {}})), "conversations[1].value[0]",
     "conversations[1].value[0] has no function `name`"),
])
def test_a_bad_tool_call_is_named(tmp_path, record, field, text):
    _, p = _check(tmp_path, json.dumps(record), "bad_tool_call", field=field)
    assert p.text == text


@pytest.mark.parametrize("tools, field, text", [
    ("[{not json", "tools", "`tools` is a string but not valid JSON (Expecting property name "
                            "enclosed in double quotes: line 1 column 3 (char 2))"),
    ({"name": "x"}, "tools", "`tools` must be a list of functions, got an object"),
    ([{"description": "no name"}], "tools[0]",
     "tools[0] must be a function: {\"name\": ..., \"description\": ..., \"parameters\": "
     "{...}} (or OpenAI's {\"type\": \"function\", \"function\": {...}})"),
])
def test_bad_tools_are_named(tmp_path, tools, field, text):
    _, p = _check(tmp_path, json.dumps(glaive_record(tools=tools)), "bad_tools", field=field)
    assert p.text == text


def test_tool_turns_keep_their_order(tmp_path):
    rec = glaive_record()
    rec["conversations"] = [rec["conversations"][0], rec["conversations"][2],
                            rec["conversations"][3]]
    _, p = _check(tmp_path, json.dumps(rec), "bad_messages", field="conversations[1].role")
    assert p.text == ("conversations[1].role is 'observation' where 'gpt' or 'function_call' was "
                      "due: turns go human, then gpt or function_call, then each call's result "
                      "as an observation, then gpt or function_call again")


def test_fix_into_a_missing_folder_is_refused(tmp_path, good_file):
    with pytest.raises(UsageError) as caught:
        validate_file(good_file, fix_out=tmp_path / "nope" / "out.jsonl")
    assert str(caught.value) == (f"--fix {tmp_path / 'nope' / 'out.jsonl'}: no such folder "
                                 f"{tmp_path / 'nope'}; create it or name a file in an existing "
                                 "one")


def test_a_tally_lists_each_line_once_and_counts_every_record():
    """Three records of one line (a JSON array on one line) are three, at one line; the lines
    past the first five are counted, also after the cache's round trip."""
    from llamalora.data import Tally

    tally = Tally()
    for line in (1, 1, 1, *range(10, 20)):
        tally.add("wrong_type" if line == 1 else "missing_field", line)
    summary = "10 missing_field (lines 10, 11, 12, 13, 14 and 5 more), 3 wrong_type (line 1)"
    assert tally.summary() == summary
    assert Tally.from_dict(tally.to_dict()).summary() == summary
