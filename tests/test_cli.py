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


@pytest.mark.parametrize("command", ["validate", "stats", "train", "export-adapter", "chat",
                                     "eval", "serve"])
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
    """Every error fixed into OUT: exit 0, and the last line says to use OUT."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": 5}\n')
    out = tmp_path / "out.jsonl"
    r = run("validate", str(path), "--fix", str(out))
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines() == [
        f"Wrote 1 record(s) to {out}",
        "  changed: 1 turned `output` into a string (line 1)",
        f"Fixed: every record with an error is fixed in {out}; use that file (the input is "
        "unchanged)"]
    assert run("validate", str(out)).exit_code == 0


def test_validate_fix_that_leaves_records_out_says_why_and_exits_1(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [
        {"instruction": "a", "answer": "b"}, {"instruction": "a", "output": "b"},
        {"instruction": "c", "output": ["x", "y"]}])
    out = tmp_path / "out.jsonl"
    r = run("validate", str(path), "--fix", str(out))
    assert r.exit_code == 1
    assert r.stderr.splitlines() == [
        f"Wrote 1 record(s) to {out}",
        "  changed: 1 renamed `answer` to `output` (line 1)",
        "  left out: 1 duplicate after the fix (line 2 (same as 1)), 1 wrong_type (line 3)",
        f"Error: 1 record(s) could not be fixed and were left out of {out}; fix those lines in "
        "the input by hand (see the problems listed) and run --fix again"]


@pytest.mark.parametrize("records, hint", [
    ([{"instruction": "a", "output": 5}, {"question": "q", "output": "b"}],
     ", or write a cleaned copy with --fix OUT"),
    ([{"instruction": "a", "output": 5}, {"instruction": "a", "output": ["x"]}],
     "; --fix OUT fixes 1 of the 2 records, the other 1 need fixing by hand"),
    ([{"instruction": "a", "output": "b", "image": "nope.png"}], ""),
])
def test_validate_suggests_fix_only_for_what_it_fixes(tmp_path, records, hint):
    path = write_jsonl(tmp_path / "d.jsonl", records)
    r = run("validate", str(path))
    assert r.exit_code == 1
    n = len(records)
    assert r.stderr == f"Error: {n} error(s) in {n} record(s); fix the lines listed{hint}\n"


def test_validate_prints_each_fix_whole_at_80_columns(tmp_path, monkeypatch):
    """A LLaVA-style file whose images sit in a sibling folder: the folder to pass is one
    plain line below the table, whole at 80 columns, and the error line does not offer --fix
    (it does not find images)."""
    from PIL import Image

    (tmp_path / "visual_genome_images").mkdir()
    (tmp_path / "data").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "visual_genome_images" / "2316470.png")
    records = [{"id": str(i), "image": "2316470.png", "conversations": [
        {"from": "human", "value": f"<image>\nQuestion {i}?"}, {"from": "gpt", "value": "Yes."}]}
        for i in range(2)]
    (tmp_path / "data" / "llava.json").write_text(json.dumps(records, indent=1))
    monkeypatch.chdir(tmp_path / "data")
    monkeypatch.setenv("COLUMNS", "80")
    r = run("validate", "llava.json")
    assert r.exit_code == 1
    lines = r.stdout.splitlines()
    assert lines[lines.index("Fixes:") + 1:] == [
        "  lines 2, 16 (image_missing): it is at ../visual_genome_images/2316470.png: pass "
        "--image-root ../visual_genome_images"]
    assert r.stderr == "Error: 2 error(s) in 2 record(s); fix the lines listed\n"
    assert run("validate", "llava.json", "--image-root", "../visual_genome_images"
               ).exit_code == 0


def test_validate_json_of_an_unreadable_input_is_still_a_report(tmp_path):
    r = run("validate", str(tmp_path / "missing.jsonl"), "--json")
    assert r.exit_code == 2
    message = f"{tmp_path / 'missing.jsonl'}: no such file; check the path (a Hub dataset is " \
              "given as ORG/NAME)"
    assert json.loads(r.stdout) == {
        "path": str(tmp_path / "missing.jsonl"), "records": 0, "records_ok": 0,
        "errors": [{"line": None, "field": None, "code": "unreadable", "message": message}],
        "warnings": [], "error_counts": {"unreadable": 1}, "warning_counts": {}}
    assert r.stderr == f"Error: {message}\n"


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
    assert json.loads(r.stdout)["left_out"] == {"missing_field": {"count": 1, "lines": [4]}}
    assert r.stderr == (f"Warning: Left out 1 invalid record(s) (--skip-invalid): 1 "
                        f"missing_field (line 4); `llamalora validate {path}` lists their "
                        "problems\n")


def test_train_skip_invalid_and_drops_say_what_they_left_out(tmp_path):
    """--skip-invalid and --truncation drop name each reason and its lines; a dry run's plan is
    its result, on stdout."""
    path = write_jsonl(tmp_path / "d.jsonl", GOOD + [
        {"instruction": "x"}, {"instruction": "y", "output": 3},
        {"instruction": "long " * 200, "output": "z"}])
    r = run("train", str(path), "--model", "tiny", "--dry-run", "--skip-invalid",
            "--truncation", "drop", "--max-seq-length", "128")
    assert r.exit_code == 0, r.output
    assert (f"Left out 2 invalid record(s) (--skip-invalid): 1 missing_field (line 4), 1 "
            f"wrong_type (line 5); `llamalora validate {path}` lists their problems"
            ) in " ".join(r.stderr.split())  # stderr wraps at the terminal's width
    plan = r.stdout.splitlines()
    assert plan[0].startswith("Plan: 3 training record(s);") and "Plan:" not in r.stderr
    assert plan[1] == ("Truncation at 128 (drop): 1 record(s) over, 2 response token(s) cut, 1 "
                       "record(s) left out (over the limit with --truncation drop: line 6)")


def test_data_commands_import_no_torch(good_file):
    import subprocess
    import sys

    code = ("import sys; from llamalora.cli.main import app; from typer.testing import CliRunner;"
            f"r = CliRunner().invoke(app, ['stats', {str(good_file)!r}, '--tokenizer', 'bundled']);"
            f"r2 = CliRunner().invoke(app, ['validate', {str(good_file)!r}]);"
            "assert r.exit_code == 0 and r2.exit_code == 0, r.output;"
            "bad = [m for m in ('torch', 'transformers', 'peft', 'llamalora.export')"
            " if m in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_eval_and_serve_help_import_no_torch():
    import subprocess
    import sys

    code = ("import sys; from llamalora.cli.main import app; from typer.testing import CliRunner;"
            "rs = [CliRunner().invoke(app, [c, '--help']) for c in ('eval', 'serve')];"
            "assert all(r.exit_code == 0 for r in rs), [r.output for r in rs];"
            "bad = [m for m in ('torch', 'transformers', 'peft', 'fastapi', 'uvicorn',"
            " 'sacrebleu', 'rouge_score') if m in sys.modules];"
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


# --- Each command with its core patched where the command imports it: what the core receives. ---

import sys
import types
from dataclasses import replace
from pathlib import Path

import llamalora.cli.train as train_cmd
from llamalora.config import TrainConfig
from llamalora.events import (CheckpointSaved, EvalDone, ModelReady, PlanReady, Status, StepDone,
                              TrainFinished, TrainResult)

PLAN = {"records": 3, "train_records": 3, "eval_records": 0, "tokens_per_epoch": 120, "steps": 2,
        "steps_per_epoch": 1, "effective_batch": 4, "world_size": 1,
        "truncation": {"max_seq_length": 512, "mode": "truncate", "records_over": 0,
                       "response_tokens_lost": 0, "records_dropped": 0},
        "estimated_peak_gib": {"8bit": 12.5, "4bit": 8.0, "none": 22.0},
        "params": {"base": 9.8e9, "lora": 2.6e6}, "with_vision": False}


def _result(config: TrainConfig) -> TrainResult:
    return TrainResult(
        llamalora_version="0.1.0", config=config.to_dict(), plan=PLAN, base_model=config.model,
        model_class="MllamaForCausalLM", quant=config.quant, compute_dtype="bfloat16",
        kernels="plain", gradient_checkpointing=False, compiled=False, batches="packed",
        data_sha256="ab" * 32, final_train_loss=0.5, final_eval_loss=None,
        real_tokens_per_s=1234.5, steps_run=2, wall_time_s=3.25, peak_gpu_mem_gib=None,
        device="cpu", world_size=1, versions={"torch": "x"})


@pytest.fixture
def core(monkeypatch):
    """Fakes train's core (plan, recipe, world) and records what each call received."""
    calls = {}

    def plan_training(config):
        calls["plan_config"] = config
        return types.SimpleNamespace(to_dict=lambda: PLAN, model_note=None, data_note="")

    def train(config, *, resume, overwrite, on_event, plan):
        calls["train"] = {"config": config, "resume": resume, "overwrite": overwrite, "plan": plan}
        on_event(Status("Loading tiny (none)"))
        on_event(StepDone(step=1, total_steps=2, loss=1.0, learning_rate=2e-4, grad_norm=None,
                          tokens=10, tokens_per_s=100.0, epoch=0.5, step_time_s=0.1))
        result = _result(config)
        on_event(TrainFinished(result))
        return result

    import llamalora.parallel
    import llamalora.plan

    monkeypatch.setattr(llamalora.plan, "plan_training", plan_training)
    monkeypatch.setattr(llamalora.parallel, "world", lambda: (0, 0, 1))
    # The recipe imports torch: a stand-in module keeps these tests free of it.
    monkeypatch.setitem(sys.modules, "llamalora.recipe", types.SimpleNamespace(train=train))
    monkeypatch.setattr(train_cmd, "quiet_libraries", lambda: None)
    return calls


def test_train_hands_the_config_to_the_core(core, tmp_path):
    r = run("train", "d.jsonl", "--output-dir", str(tmp_path / "o"), "--model", "tiny",
            "--lr-scheduler", "cosine", "--report-to", "tensorboard", "--weight-decay", "0.01",
            "--max-grad-norm", "0.5", "--no-packing", "--resume")
    assert r.exit_code == 0, r.output
    got = core["train"]
    assert got["config"] is core["plan_config"] and got["plan"].to_dict() is PLAN
    assert (got["resume"], got["overwrite"]) == (True, False)
    assert got["config"] == TrainConfig(
        data_path="d.jsonl", output_dir=str(tmp_path / "o"), model="tiny", lr_scheduler="cosine",
        report_to="tensorboard", weight_decay=0.01, max_grad_norm=0.5, packing=False)
    assert r.stdout.splitlines() == [
        f"Adapter saved to {tmp_path / 'o'}", "final loss 0.5000, 1234.5 real tokens/s, 3.25 s",
        f"Chat with it: llamalora chat --adapter {tmp_path / 'o'}"]
    assert "Plan: 3 training record(s)" in r.stderr and "Loading tiny (none)" in r.stderr


def test_train_json_is_the_result_dict(core, tmp_path):
    r = run("train", "d.jsonl", "--output-dir", "o", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == _result(core["train"]["config"]).to_dict()


def test_train_dry_run_skips_the_recipe(core):
    r = run("train", "d.jsonl", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"plan": PLAN} and "train" not in core
    assert core["plan_config"].output_dir == ""
    r = run("train", "d.jsonl", "--dry-run")
    assert r.stdout.startswith("Plan: 3 training record(s); 120 tokens per epoch") and \
        r.stderr == ""


def test_train_refuses_the_output_folder_before_planning(core, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    r = run("train", "d.jsonl", "--output-dir", str(tmp_path / "o"))
    assert r.exit_code == 1 and "plan_config" not in core
    assert r.stderr == (f"Error: {tmp_path / 'o'} is not empty; pass --overwrite to replace it, "
                        "--resume to continue its last checkpoint, or another --output-dir\n")
    r = run("train", "d.jsonl", "--output-dir", str(tmp_path / "o"), "--overwrite")
    assert r.exit_code == 1 and "did not write (notes.txt)" in r.stderr and "plan_config" not in core


# Every spelling today's train accepts (and the old script's --weight_decay, --max_grad_norm).
OLD_FLAGS = [
    ("--data-path", "a.jsonl", "data_path", "a.jsonl"),
    ("--data_path", "a.jsonl", "data_path", "a.jsonl"),
    ("--output-dir", "out1", "output_dir", "out1"),
    ("--output_dir", "out1", "output_dir", "out1"),
    ("--model", "tiny", "model", "tiny"),
    ("--model-name-or-path", "tiny", "model", "tiny"),
    ("--model_name_or_path", "tiny", "model", "tiny"),
    ("--quant", "4bit", "quant", "4bit"),
    ("--per-device-train-batch-size", "3", "batch_size", 3),
    ("--per_device_train_batch_size", "3", "batch_size", 3),
    ("--batch-size", "3", "batch_size", 3),
    ("--gradient-accumulation-steps", "5", "gradient_accumulation_steps", 5),
    ("--gradient_accumulation_steps", "5", "gradient_accumulation_steps", 5),
    ("--max-seq-length", "256", "max_seq_length", 256),
    ("--max_seq_length", "256", "max_seq_length", 256),
    ("--num-train-epochs", "1.5", "num_train_epochs", 1.5),
    ("--num_train_epochs", "1.5", "num_train_epochs", 1.5),
    ("--max-steps", "7", "max_steps", 7),
    ("--max_steps", "7", "max_steps", 7),
    ("--lora-rank", "16", "lora_rank", 16),
    ("--lora_rank", "16", "lora_rank", 16),
    ("--lora-alpha", "8", "lora_alpha", 8.0),
    ("--lora_alpha", "8", "lora_alpha", 8.0),
    ("--lora-dropout", "0.1", "lora_dropout", 0.1),
    ("--lora_dropout", "0.1", "lora_dropout", 0.1),
    ("--target-modules", "all-linear", "target_modules", "all-linear"),
    ("--target_modules", "q_proj,v_proj", "target_modules", "q_proj,v_proj"),
    ("--learning-rate", "1e-4", "learning_rate", 1e-4),
    ("--learning_rate", "1e-4", "learning_rate", 1e-4),
    ("--lr", "1e-4", "learning_rate", 1e-4),
    ("--warmup-ratio", "0.1", "warmup_ratio", 0.1),
    ("--warmup_ratio", "0.1", "warmup_ratio", 0.1),
    ("--eval-fraction", "0.2", "eval_fraction", 0.2),
    ("--eval-steps", "4", "eval_steps", 4),
    ("--save-steps", "9", "save_steps", 9),
    ("--save_steps", "9", "save_steps", 9),
    ("--save-total-limit", "3", "save_total_limit", 3),
    ("--logging-steps", "2", "logging_steps", 2),
    ("--seed", "1", "seed", 1),
    ("--train-on-prompt", None, "train_on_prompt", True),
    ("--truncation", "drop", "truncation", "drop"),
    ("--gradient-checkpointing", None, "gradient_checkpointing", True),
    ("--no-gradient-checkpointing", None, "gradient_checkpointing", False),
    ("--kernels", "plain", "kernels", "plain"),
    ("--packing", None, "packing", True),
    ("--no-packing", None, "packing", False),
    ("--compile", None, "compile", True),
    ("--no-compile", None, "compile", False),
    ("--skip-invalid", None, "skip_invalid", True),
    ("--weight_decay", "0.1", "weight_decay", 0.1),
    ("--max_grad_norm", "0.3", "max_grad_norm", 0.3),
]


@pytest.mark.parametrize("flag, value, name, expected", OLD_FLAGS)
def test_every_old_flag_sets_its_field(core, flag, value, name, expected):
    r = run("train", "--data-path", "d.jsonl", "--output-dir", "o", flag,
            *([value] if value is not None else []))
    assert r.exit_code == 0, r.output
    config = core["train"]["config"]
    assert getattr(config, name) == expected
    others = {f: v for f, v in config.to_dict().items() if f != name}
    base = TrainConfig(data_path="d.jsonl", output_dir="o").to_dict()
    assert others == {f: v for f, v in base.items() if f != name}


# A valid value other than the default, for each field given on the command line below.
VALUES = {int: "17", float: "0.25", "data_path": "x.jsonl", "output_dir": "o2", "model": "tiny",
          "quant": "4bit", "target_modules": "all-linear", "lr_scheduler": "cosine",
          "report_to": "wandb", "truncation": "drop", "kernels": "fast", "split": "test",
          "image_root": "images"}


@pytest.mark.parametrize("spec", TrainConfig.options(), ids=lambda s: s.name)
def test_every_generated_flag_parses(core, spec):
    # Each spelling in the field's metadata reaches the field, negations included.
    if spec.kind is bool:
        cases = [(flag, [], i == 0) for decl in spec.flags
                 for i, flag in enumerate(decl.split("/"))]
    else:
        value = VALUES[spec.name if spec.kind is str else spec.kind]
        cases = [(flag, [value], spec.kind(value)) for flag in spec.flags]
    for flag, args, want in cases:
        data = [] if spec.name == "data_path" else ["d.jsonl"]
        r = run("train", *data, "--output-dir", "o", flag, *args)
        assert r.exit_code == 0, (flag, r.output)
        got = getattr(core["train"]["config"], spec.name)
        assert got == want, flag
        assert spec.kind is bool or got != spec.default, flag


def test_help_lists_every_option_with_its_help():
    r = run("train", "--help")
    assert r.exit_code == 0
    text = " ".join(r.stdout.split())  # undo Click's wrapping
    for spec in TrainConfig.options():
        for decl in spec.flags:
            for flag in decl.split("/"):
                assert flag in text, flag
        assert " ".join(spec.help.split()[:4]) in text, spec.name
    for new in ("--config", "--lr-scheduler", "--report-to", "--weight-decay", "--weight_decay",
                "--max-grad-norm", "--max_grad_norm", "--resume", "--overwrite", "--dry-run",
                "--json", "llamalora train --config out/llamalora.json"):
        assert new in text, new
    assert "[default: 0.0002]" in text and "[default: q_proj,k_proj,v_proj,o_proj]" in text
    assert "[default: on]" in text  # --packing


def _yaml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_config_file_between_defaults_and_flags(core, tmp_path):
    cfg = _yaml(tmp_path / "run.yaml", "data_path: from-file.jsonl\noutput-dir: file-out\n"
                                       "lora_rank: 16\nlearning_rate: 1e-4\nseed: 7\n"
                                       "packing: false\ntrain_on_prompt: true\n")
    r = run("train", "--config", str(cfg), "--lr", "3e-4", "--output_dir", "flag-out",
            "--packing", "--no-train-on-prompt")
    assert r.exit_code == 0, r.output
    c = core["train"]["config"]
    assert (c.data_path, c.output_dir) == ("from-file.jsonl", "flag-out")
    assert (c.lora_rank, c.seed, c.learning_rate) == (16, 7, 3e-4)  # file, file, flag
    assert (c.packing, c.train_on_prompt) == (True, False)  # flags beat the file's booleans
    assert c.batch_size == 2 and c.quant == "8bit"  # defaults where neither says
    r = run("train", "d.jsonl", "--config", str(cfg))
    assert r.exit_code == 0 and core["train"]["config"].data_path == "d.jsonl"


def test_replay_of_a_recorded_run(core, tmp_path):
    recorded = TrainConfig(data_path="data/memo.jsonl", output_dir=str(tmp_path / "out"),
                           model="tiny", quant="none", lora_rank=4, max_steps=12,
                           learning_rate=1e-5, lr_scheduler="constant", eval_fraction=0.25,
                           gradient_checkpointing=False, report_to="wandb,trackio")
    (tmp_path / "out").mkdir()
    record = _yaml(tmp_path / "out" / "llamalora.json",
                   json.dumps(_result(recorded).to_dict(), indent=2))
    r = run("train", "--config", str(record), "--overwrite")  # its own folder holds the record
    assert r.exit_code == 0, r.output
    assert core["train"]["config"] == recorded
    r = run("train", "--config", str(record), "--output-dir", str(tmp_path / "again"),
            "other.jsonl")
    assert r.exit_code == 0, r.output
    assert core["train"]["config"] == replace(recorded, output_dir=str(tmp_path / "again"),
                                              data_path="other.jsonl")


@pytest.mark.parametrize("text, words", [
    ("lora_rnak: 4\n", ["unknown key 'lora_rnak'", "did you mean 'lora_rank'"]),
    ("gradient_acumulation_steps: 4\n", ["did you mean 'gradient_accumulation_steps'"]),
    ("lora_rank: 4.5\n", ["lora_rank must be an integer, got 4.5 (float)"]),
    ("packing: sometimes\n", ["packing must be true or false"]),
    ("quant: 3bit\n", ["--quant must be one of 8bit, 4bit, none, got '3bit'"]),
    ("lora_rank: [\n", ["is not valid YAML"]),
])
def test_bad_config_file_is_exit_2_with_one_line(core, tmp_path, text, words):
    cfg = _yaml(tmp_path / "run.yaml", text)
    r = run("train", "d.jsonl", "--output-dir", "o", "--config", str(cfg))
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("Error:") and len(r.stderr.strip().splitlines()) == 1
    for word in words:
        assert word in r.stderr
    assert "plan_config" not in core and r.stdout == ""


def test_missing_config_file_names_it(core, tmp_path):
    r = run("train", "--config", str(tmp_path / "nope.yaml"))
    assert r.exit_code == 2 and "nope.yaml does not exist" in r.stderr


def test_train_needs_data_and_an_output_dir(core, tmp_path):
    r = run("train", "--output-dir", "o")
    assert r.exit_code == 2 and "data_path in --config" in r.stderr
    r = run("train", "d.jsonl")
    assert r.exit_code == 2 and "pass --output-dir" in r.stderr
    r = run("train", "d.jsonl", "--data-path", "e.jsonl", "--output-dir", "o")
    assert r.exit_code == 2 and "given twice" in r.stderr
    assert "plan_config" not in core


def test_progress_renderer_draws_typed_events(capsys):
    renderer = train_cmd._ProgressRenderer(enabled=True)
    config = TrainConfig(data_path="d", output_dir="o")
    with renderer:
        renderer.on_event(PlanReady(PLAN))
        renderer.on_event(Status("Loading tiny (none)"))
        renderer.on_event(Status("no checkpoint in o; starting from step 0", warning=True))
        renderer.on_event(ModelReady(model_class="MllamaForCausalLM", quant="8bit",
                                     compute_dtype="bfloat16", device="cuda:0",
                                     trainable_params=2_621_440, kernels="fast",
                                     batches="packed", gradient_checkpointing=True,
                                     compiled=False))
        renderer.on_event(StepDone(step=3, total_steps=10, loss=1.23456, learning_rate=2e-4,
                                   grad_norm=0.5, tokens=512, tokens_per_s=1234.4, epoch=0.3,
                                   step_time_s=0.4, gpu_mem_gib=3.5))
        task = renderer.progress.tasks[0]
        assert (task.total, task.completed) == (10, 3)
        assert task.fields["stats"] == "loss 1.2346 lr 2.00e-04 1234 tok/s mem 3.5 GiB"
        renderer.on_event(StepDone(step=4, total_steps=10, loss=1.0, learning_rate=1e-4,
                                   grad_norm=None, tokens=512, tokens_per_s=1000.0, epoch=0.4,
                                   step_time_s=0.4, eval_loss=0.75))
        assert task.completed == 4
        assert task.fields["stats"] == "loss 1.0000 lr 1.00e-04 1000 tok/s eval 0.7500"
        renderer.on_event(CheckpointSaved(step=4, path="o/checkpoints/step-000004"))
        renderer.on_event(EvalDone(step=10, eval_loss=0.7))
        renderer.on_event(TrainFinished(_result(config)))
    lines = capsys.readouterr().err.splitlines()
    assert lines[:5] == [
        "Loading tiny (none)",
        "Warning: no checkpoint in o; starting from step 0",
        "Loaded MllamaForCausalLM (8bit, bfloat16) on cuda:0; 2,621,440 trainable parameters",
        "Base-layer kernels: fast; batches packed; gradient checkpointing on; layers eager",
        "Saved checkpoint o/checkpoints/step-000004"]


def test_progress_renderer_off_on_other_ranks(capsys):
    renderer = train_cmd._ProgressRenderer(enabled=False)
    with renderer:
        renderer.on_event(Status("hello"))
    assert capsys.readouterr().err == ""


def test_validate_passes_its_options_to_the_core(monkeypatch, tmp_path):
    import llamalora.cli.validate as validate_cmd
    from llamalora.data import ValidationReport

    seen = []

    def fake(path, *, max_problems, fix_out, image_root, split):
        seen.append((path, max_problems, fix_out, image_root, split))
        return ValidationReport(path=str(path), records=2, records_ok=2, fixed_records=2,
                                fixed_path=fix_out and str(fix_out))

    monkeypatch.setattr(validate_cmd, "validate_file", fake)
    assert run("validate", "d.jsonl").exit_code == 0
    assert run("validate", "org/set", "--json", "--split", "test").exit_code == 0
    r = run("validate", "d.jsonl", "--max-errors", "3", "--fix", str(tmp_path / "c.jsonl"),
            "--image-root", str(tmp_path))
    assert r.exit_code == 0, r.output
    assert seen == [("d.jsonl", 50, None, None, "train"), ("org/set", 100_000, None, None, "test"),
                    ("d.jsonl", 3, tmp_path / "c.jsonl", tmp_path, "train")]


def test_stats_passes_its_options_to_the_core(monkeypatch):
    import llamalora.cli.stats as stats_cmd

    seen = {}
    monkeypatch.setattr(stats_cmd, "load_tokenizer", lambda name: types.SimpleNamespace(
        tokenizer="TOK", source=f"src:{name}", fallback_reason=None))

    def fake(path, tokenizer, **kw):
        seen.update(path=path, tokenizer=tokenizer, **{k: v for k, v in kw.items()
                                                        if k != "on_progress"})
        return types.SimpleNamespace(skipped_invalid=0, to_dict=lambda: {"records": 1})

    monkeypatch.setattr(stats_cmd, "compute_stats", fake)
    r = run("stats", "d.jsonl", "--tokenizer", "bundled", "--max_seq_length", "128",
            "--batch-size", "8", "--skip-invalid", "--json", "--image-root", "imgs")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"records": 1}
    assert seen == {"path": "d.jsonl", "tokenizer": "TOK", "tokenizer_name": "src:bundled",
                    "max_seq_length": 128, "batch_size": 8, "skip_invalid": True,
                    "image_root": Path("imgs"), "split": "train"}


def test_export_adapter_passes_its_options_to_the_core(monkeypatch, tmp_path):
    import llamalora.cli.export_adapter as export_cmd
    from llamalora.export import ExportResult, exporter

    seen = {}

    def fake(run_dir, out_dir, **kw):
        seen.update(run=run_dir, out=out_dir, **{k: v for k, v in kw.items() if k != "on_event"})
        return ExportResult(out=out_dir, kind="merged", bytes_written=2**20)

    monkeypatch.setattr(exporter, "export_adapter", fake)
    monkeypatch.setattr(export_cmd, "quiet_libraries", lambda: None)
    r = run("export-adapter", "runs/a", "--out", str(tmp_path / "m"), "--merge", "--dtype",
            "fp32", "--no-verify")
    assert r.exit_code == 0, r.output
    assert seen == {"run": Path("runs/a"), "out": tmp_path / "m", "merge": True, "dtype": "fp32",
                    "state_dict": None, "overwrite": False, "verify": False, "text_only": False,
                    "gguf": None, "gguf_type": "f16"}
    assert r.stdout.strip() == f"Wrote merged to {tmp_path / 'm'} (1.0 MiB)"
    r = run("export-adapter", "runs/a", "--out", str(tmp_path / "m"), "--merge", "--text-only",
            "--gguf", "m.gguf", "--gguf-type", "q8_0")
    assert r.exit_code == 0, r.output
    assert (seen["text_only"], seen["gguf"], seen["gguf_type"]) == (True, Path("m.gguf"), "q8_0")


def test_chat_passes_its_options_to_the_core(monkeypatch):
    import llamalora.chat
    import llamalora.cli.chat as chat_cmd

    seen = {}

    class Session:
        base_model, quant, kernels, adapter = "tiny", "none", "plain", None
        decoding = "static cache"

        def ask(self, prompt, *, image, options, on_text):
            seen["ask"] = (prompt, image, options)
            on_text("거푸집은 틀입니다.")
            return types.SimpleNamespace(new_tokens=3, first_token_s=0.1,
                                         decode_tokens_per_s=30.0)

    def open_chat(adapter, **kw):
        seen["open"] = {"adapter": adapter, **kw}
        return Session()

    monkeypatch.setattr(llamalora.chat, "open_chat", open_chat)
    monkeypatch.setattr(chat_cmd, "quiet_libraries", lambda: None)
    r = run("chat", "--model", "tiny", "--no-adapter", "--prompt", "거푸집이란?",
            "--temperature", "0", "--max-new-tokens", "7", "--system", "짧게.", "--kernels",
            "plain")
    assert r.exit_code == 0, r.output
    assert seen["open"] == {"adapter": None, "model": "tiny", "quant": None, "no_adapter": True,
                            "with_vision": False, "system": "짧게.", "kernels": "plain"}
    assert seen["ask"] == ("거푸집이란?", None, llamalora.chat.GenerationOptions(7, 0.0, 0.9))
    assert r.stdout == "거푸집은 틀입니다.\n"
    # --image starts from --image-root; a missing root is refused before any model loads
    r = run("chat", "--model", "tiny", "--no-adapter", "--prompt", "?", "--image", "a.png",
            "--image-root", str(Path.cwd()))
    assert r.exit_code == 0, r.output
    assert seen["ask"][1] == Path.cwd() / "a.png" and seen["open"]["with_vision"]
    seen.clear()
    r = run("chat", "--model", "tiny", "--no-adapter", "--prompt", "?", "--image-root", "nope/")
    assert r.exit_code == 2 and "--image-root nope: no such folder" in r.stderr and not seen
    r = run("serve", "run", "--image-root", "nope/")  # the same check, before any import
    assert r.exit_code == 2 and r.stderr == "Error: --image-root nope: no such folder\n"


def test_another_librarys_error_is_one_line_of_it():
    from llamalora.errors import first_line

    native = OSError("libfoo.so: cannot open shared object file\n  at loader.c:12\n")
    assert first_line(native) == "OSError: libfoo.so: cannot open shared object file"
    assert first_line(native, with_type=False, limit=9) == "libfoo.so"
    assert first_line(RuntimeError()) == first_line(RuntimeError("  \n")) == "RuntimeError"
