"""The command line through CliRunner: stdout and stderr apart, exit codes, every --help."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from llamalora.cli.main import app

from conftest import GOOD, write_jsonl

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(args))


def test_root_help_and_version():
    r = run("--help")
    assert r.exit_code == 0 and "validate" in r.stdout and "stats" in r.stdout
    r = run("--version")
    assert r.exit_code == 0 and r.stdout.startswith("llamalora ")


@pytest.mark.parametrize("command", ["validate", "stats", "train", "export-adapter", "chat"])
def test_every_command_has_help(command):
    r = run(command, "--help")
    assert r.exit_code == 0, r.output
    assert "Usage" in r.stdout and "Examples" in r.stdout


def test_validate_clean_file(good_file):
    r = run("validate", str(good_file))
    assert r.exit_code == 0
    assert "records" in r.stdout and r.stderr == ""


def test_validate_json_report_shape(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", GOOD + [{"instruction": "x", "output": 3},
                                                     {"instruction": "y", "output": "z", "k": 1}])
    r = run("validate", str(path), "--json")
    assert r.exit_code == 1
    report = json.loads(r.stdout)
    assert set(report) >= {"path", "records", "records_ok", "errors", "warnings"}
    assert report["records"] == 5 and report["records_ok"] == 4
    assert report["errors"] == [{"line": 4, "field": "output", "code": "wrong_type",
                                 "message": report["errors"][0]["message"]}]
    assert report["warnings"][0]["code"] == "unknown_field"
    assert r.stderr.startswith("Error: 1 error(s) in 1 record(s)")


def test_validate_missing_file_is_exit_2_without_traceback(tmp_path):
    r = run("validate", str(tmp_path / "missing.jsonl"))
    assert r.exit_code == 2
    assert r.stdout == ""
    assert r.stderr.startswith("Error:") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_validate_fix_round_trip(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": 5}\n')
    out = tmp_path / "out.jsonl"
    r = run("validate", str(path), "--fix", str(out))
    assert r.exit_code == 1 and "Wrote 1 record(s)" in r.stderr
    assert run("validate", str(out)).exit_code == 0


def test_bad_option_is_exit_2():
    r = run("stats", "x.jsonl", "--max-seq-length", "0")
    assert r.exit_code == 2


def test_stats_json_and_fallback_note(good_file):
    r = run("stats", str(good_file), "--json", "--max-seq-length", "64")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    for key in ("records", "max_seq_length", "tokens", "prompt_tokens", "response_tokens",
                "over_max", "over_max_lines", "response_tokens_lost", "responses_fully_lost",
                "suggested_max_seq_length", "padding", "total_tokens"):
        assert key in d
    assert set(d["tokens"]) == {"min", "mean", "p50", "p90", "p95", "p99", "max"}
    assert d["max_seq_length"] == 64
    assert "bundled" in r.stderr  # the hub is off in tests: the fallback is announced


def test_stats_table_and_plot(good_file, tmp_path):
    png = tmp_path / "h.png"
    r = run("stats", str(good_file), "--tokenizer", "bundled", "--plot", str(png))
    assert r.exit_code == 0, r.output
    assert "p99" in r.stdout and "Padding share" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stats_refuses_invalid_then_skips(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", GOOD + [{"instruction": "x"}])
    r = run("stats", str(path), "--tokenizer", "bundled")
    assert r.exit_code == 1 and "line 4" in r.stderr and r.stdout == ""
    r = run("stats", str(path), "--tokenizer", "bundled", "--skip-invalid", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["records"] == 3
    assert "left out 1 invalid record" in r.stderr


def test_data_commands_import_no_torch(good_file):
    import subprocess
    import sys

    code = ("import sys; from llamalora.cli.main import app; from typer.testing import CliRunner;"
            f"r = CliRunner().invoke(app, ['stats', {str(good_file)!r}, '--tokenizer', 'bundled']);"
            f"r2 = CliRunner().invoke(app, ['validate', {str(good_file)!r}]);"
            "assert r.exit_code == 0 and r2.exit_code == 0, r.output;"
            "bad = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("command", [["validate"], ["stats", "--tokenizer", "bundled"],
                                     ["train", "--dry-run", "--model", "tiny"]])
@pytest.mark.parametrize("kind", ["missing", "folder", "fifo", "unreadable"])
def test_unusable_data_paths_exit_2_with_one_line(tmp_path, monkeypatch, command, kind):
    import os
    from pathlib import Path

    path = tmp_path / "data.jsonl"
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "unreadable":
        path.write_text('{"instruction": "a", "output": "b"}\n')
        real_open = Path.open

        def denied(self, *a, **k):
            if self == path:
                raise PermissionError(13, "Permission denied")
            return real_open(self, *a, **k)

        monkeypatch.setattr(Path, "open", denied)  # root can read any file; simulate a denial
    r = run(command[0], str(path), *command[1:])
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("Error:") and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.output
