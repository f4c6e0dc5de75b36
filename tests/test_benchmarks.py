"""benchmarks/speed.py: its generated data, its resume logic, and a 2-step run of every recipe."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_bnb

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "speed.py"


def _load_speed():
    spec = importlib.util.spec_from_file_location("speed_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


speed = _load_speed()


def test_default_data_has_the_promised_mix(tmp_path):
    from llamalora.tokenizer import load_tokenizer

    stats = speed.make_data(tmp_path / "d.jsonl")
    lines = (tmp_path / "d.jsonl").read_text(encoding="utf-8").splitlines()
    assert stats["records"] == len(lines) == 1000 == len(set(lines))  # no record repeats
    assert 200 <= stats["long_records"] <= 300  # 20-30% long answers
    assert 5 <= stats["over_max_length"] <= 60  # a few over 512
    tokenizer = load_tokenizer("bundled").tokenizer
    lengths = [speed._training_length(tokenizer, json.loads(line)) for line in lines]
    low, high = speed.SHORT_TOKENS
    assert all(low <= n <= high or 200 <= n <= 620 for n in lengths)
    for word in ("설명", "Define", "Translate", "step by step", "단계별"):  # both languages, all kinds
        assert any(word in line for line in lines), word


def test_default_data_is_deterministic(tmp_path):
    speed.make_data(tmp_path / "a.jsonl", records=150)
    speed.make_data(tmp_path / "b.jsonl", records=150)
    speed.make_data(tmp_path / "c.jsonl", records=150, seed=1)
    a, b, c = ((tmp_path / f"{x}.jsonl").read_bytes() for x in "abc")
    assert a == b != c


def test_step_batches_are_llamalora_batches():
    from llamalora.batching import batch_order

    lengths = [5, 90, 7, 300, 40, 41, 12, 60, 8, 200]  # 3 batches of up to 4 per epoch
    steps = speed.step_batches(lengths, 5, seed=3)
    assert steps[:3] == batch_order(lengths, 4, 3, 0)
    assert steps[3:] == batch_order(lengths, 4, 3, 1)[:2]


def test_summarize_counts_steps_after_skip():
    rows = [{"step_time_s": 9.0, "tokens": 10, "loss": 3.0},
            {"step_time_s": 1.0, "tokens": 100, "loss": 2.0},
            {"step_time_s": 3.0, "tokens": 300, "loss": 1.0}]
    s = speed.summarize(rows, skip=1)
    assert s["steps_counted"] == 2 and s["median_step_s"] == 2.0
    assert s["real_tokens_per_s"] == 100.0 and s["final_loss"] == 1.0
    assert speed.summarize(rows, skip=5)["steps_counted"] == 3  # fewer steps than skip: all


def test_resume_keeps_successes_and_reruns_failures(tmp_path, monkeypatch):
    ran = []

    def fake_child(spec, work, log_dir, name):
        ran.append(name)
        return {"error": "OutOfMemoryError: boom"} if name == "a" else {"rows": [], "ok": name}

    monkeypatch.setattr(speed, "run_child", fake_child)
    previous = {"a": {"error": "old failure"}, "b": {"ok": "kept"}, "z": {"ok": "other"},
                "y": {"error": "not kept"}}
    specs = {"a": {}, "b": {}, "c": {"after": "a"}, "d": {}}
    report = {"runs": {}}
    saved = []
    speed.run_specs(specs, report, previous, tmp_path, tmp_path, lambda r: saved.append(1))
    assert ran == ["a", "d"]  # b kept, c skipped because a failed
    runs = report["runs"]
    assert runs["b"] == {"ok": "kept"} and runs["z"] == {"ok": "other"} and "y" not in runs
    assert runs["c"]["error"] == "not run: a failed" and runs["a"]["error"].startswith("OutOf")
    assert len(saved) == 3  # after each run, not for the kept one


def _run_script(tmp_path, *extra) -> tuple[dict, str]:
    out = tmp_path / "report.json"
    cmd = [sys.executable, str(SCRIPT), "--model", "tiny", "--device", "cpu", "--records", "40",
           "--max-seq-length", "192", "--work-dir", str(tmp_path / "work"), "--json-out",
           str(out), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text()), r.stdout


@pytest.mark.slow
@needs_bnb  # 8-bit and 4-bit recipes
def test_every_speed_recipe_runs_two_steps_on_the_tiny_model(tmp_path):
    report, table = _run_script(tmp_path, "--steps", "2", "--skip", "1")
    recipes = report["recipes"]
    assert list(recipes) == speed.DEFAULT_RECIPES  # all but Unsloth's (its own wheels)
    for name, r in recipes.items():
        assert "error" not in r, (name, r["error"])
        assert r["steps_run"] == 2 and r["steps_counted"] == 1
        assert r["real_tokens_per_s"] > 0 and r["median_step_s"] > 0
        assert r["records_per_s"] == pytest.approx(speed.RECORDS_PER_STEP / r["median_step_s"],
                                                   rel=1e-2)
        assert math.isfinite(r["final_loss"]) and r["ratio_to_old"] > 0
        assert f"| {name} |" in table
    assert recipes["old"]["ratio_to_old"] == 1.0
    # The HF recipes take llamalora's batches of 4; llamalora groups its 2 x 2 by its own order.
    assert not report["same_tokens_per_step"]
    assert recipes["old"]["gradient_checkpointing"] and recipes["llamalora-8bit"]["kernels"]
    assert report["data_stats"]["records"] == 40


@pytest.mark.slow
@needs_bnb  # 8-bit and 4-bit runs
def test_numerics_mode_runs_on_the_tiny_model(tmp_path):
    report, table = _run_script(tmp_path, "--numerics", "--numerics-steps", "2")
    rows = report["numerics"]
    assert list(rows) == list(speed.NUMERICS_QUANTS)
    for quant, r in rows.items():
        assert "error" not in r, (quant, r["error"])
        assert r["steps"] == 2 and r["eval_records"] >= 1 and r["eval_tokens"] > 0
        for key in ("max_rel_loss_diff", "mean_rel_loss_diff", "llamalora_eval_loss",
                    "plain_peft_eval_loss", "eval_rel_diff"):
            assert math.isfinite(r[key]), (quant, key)
        # The adapter gives the same eval loss on plain transformers + peft (fp32 on the CPU).
        assert r["eval_rel_diff"] < 0.01
        assert f"| {quant} |" in table


@pytest.mark.slow
def test_data_speed_measures_json_against_tables():
    """benchmarks/data_speed.py on small files: every row, and the JSON row's peak memory."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "data_speed.py"),
                          "--validate-records", "3000", "--stats-records", "300", "--repeat",
                          "1"], capture_output=True, text=True, check=True, timeout=600)
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["command"] for r in rows] == ["validate", "stats", "validate --json"]
    assert all(r["seconds"] > 0 and r["ratio"] > 0 for r in rows)
    assert rows[-1]["baseline"] == "validate (tables)" and rows[-1]["peak_mib"] > 0


# --- long records (issue 31): the data, the harnesses' own parts, and a smoke run -------------

def _alpaca(tmp_path) -> Path:
    rows = [{"instruction": f"질문 {i}: 콘크리트 양생은?", "input": "" if i % 2 else "겨울",
             "output": "타설한 콘크리트가 강도를 얻도록 온도와 습도를 유지합니다. " * (3 + i)}
            for i in range(5)]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def test_long_records_are_made_to_their_token_count_from_the_sources(tmp_path):
    """benchmarks/make_long_data.py: each record is --tokens tokens in the training format (a
    cut inside a character may leave one or two short), made from the sources, cycled where
    they run out; the same seed gives the same file."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from make_long_data import INSTRUCTION

    from llamalora.tokenizer import load_tokenizer

    outs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.jsonl"
        r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_long_data.py"),
                            "--tokens", "700", "--records", "3", "--out", str(out),
                            str(_alpaca(tmp_path))], capture_output=True, text=True, check=True)
        stats = json.loads(r.stdout)
        assert stats["records"] == 3 and 697 <= stats["min_tokens"] <= stats["max_tokens"] == 700
        outs.append(out.read_text(encoding="utf-8"))
    assert outs[0] == outs[1]
    rows = [json.loads(line) for line in outs[0].splitlines()]
    tokenizer = load_tokenizer("bundled").tokenizer
    assert all(r["instruction"] == INSTRUCTION and "콘크리트" in r["output"] for r in rows)
    assert all(697 <= speed._training_length(tokenizer, r) <= 700 for r in rows)


def test_unsloth_rows_carry_llamalora_tokens_and_prompt_mask():
    """benchmarks/unsloth_run.py feeds TRL llamalora's own token ids in its step order, the
    prompt mask as TRL's completion_mask (1 where llamalora's labels train)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import unsloth_run

    from llamalora.batching import Tokenized

    records = [Tokenized(1, [5, 6, 7, 8], [-100, -100, 7, 8]), Tokenized(2, [9, 10], [9, 10])]
    rows = unsloth_run.sft_rows(records, [[1, 0]])
    assert rows == [{"input_ids": [9, 10], "completion_mask": [1, 1]},
                    {"input_ids": [5, 6, 7, 8], "completion_mask": [0, 0, 1, 1]}]
    assert unsloth_run.OFFLINE["UNSLOTH_DISABLE_STATISTICS"] == "1"
    assert unsloth_run.OFFLINE["HF_HUB_OFFLINE"] == "1"


@pytest.mark.slow
def test_long_speed_runs_llamalora_and_hf_on_the_tiny_model(tmp_path):
    """benchmarks/long_speed.py end to end on the CPU: records made to size, each recipe in its
    process, the table and JSON with the plan's estimate beside llamalora's runs; a second call
    with --resume keeps them."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "long_speed.py"), "--model", "tiny",
           "--device", "cpu", "--sizes", "3k=200", "--sources", str(_alpaca(tmp_path)),
           "--runs", "3k:llamalora-none,llamalora-none+ckpt,hf-packed-bf16", "--steps", "2",
           "--skip", "1", "--work-dir", str(tmp_path / "work"), "--json-out",
           str(tmp_path / "long.json"), "--resume"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "long.json").read_text())
    summary = report["summary"]
    assert list(summary) == ["3k/llamalora-none", "3k/llamalora-none+ckpt", "3k/hf-packed-bf16"]
    for name, row in summary.items():
        assert "error" not in row, (name, row)
        assert row["median_step_s"] > 0 and row["records_per_s"] > 0
        assert f"| 3k | {name.split('/')[1]} |" in r.stdout
    assert summary["3k/llamalora-none"]["estimate_gib"] > 0
    assert not summary["3k/llamalora-none"]["gradient_checkpointing"]
    assert summary["3k/llamalora-none+ckpt"]["gradient_checkpointing"]
    assert summary["3k/hf-packed-bf16"]["gradient_checkpointing"]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0 and again.stderr.count("kept from the previous report") == 3


@pytest.mark.slow
def test_eval_serve_speed_runs_on_the_tiny_model(tmp_path):
    """benchmarks/eval_serve_speed.py as the GPU scripts run it, on the tiny model."""
    script = [sys.executable, str(ROOT / "benchmarks" / "eval_serve_speed.py")]
    run, out = tmp_path / "run", tmp_path / "out"
    subprocess.run([*script, "make-run", str(run), "--model", "tiny", "--records", "6"],
                   check=True)
    assert json.loads((run / "llamalora.json").read_text())["plan"]["held_out"]["lines"] == \
        list(range(1, 7))
    for what in ("eval", "serve"):
        subprocess.run([*script, what, str(run), "--max-new-tokens", "4", "--batch-size", "3",
                        "--repeat", "1", "--quant", "none", "--out", str(out)], check=True)
    rows = json.loads((out / "eval.json").read_text())["result"]
    assert [r["records"] for r in rows] == [6, 6]
    assert rows[0]["generated_tokens"] == rows[1]["generated_tokens"] == 6 * 2 * 4
    serve = json.loads((out / "serve.json").read_text())["result"]
    assert serve["http"]["tokens"] == serve["chat"]["tokens"] == 4
