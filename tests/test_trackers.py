"""Trackers: metrics.jsonl, TensorBoard read back, fake wandb/trackio, failures and extras."""

from __future__ import annotations

import json
import sys
import types

import pytest

from llamalora.errors import ConfigError, MissingExtraError
from llamalora.events import CheckpointSaved, EvalDone, Status, StepDone
from llamalora.trackers import TRACKERS, Trackers, check_trackers, open_trackers

TOTAL = 6


def step(n: int, *, loss: float | None = None, eval_loss: float | None = None,
         gpu: float | None = None, grad_norm: float | None = 0.5) -> StepDone:
    return StepDone(step=n, total_steps=TOTAL, loss=2.0 - 0.1 * n if loss is None else loss,
                    learning_rate=1e-4 * n, grad_norm=grad_norm, tokens=100 + n,
                    tokens_per_s=1000.0 + n, epoch=n / TOTAL, step_time_s=0.25,
                    gpu_mem_gib=gpu, eval_loss=eval_loss)


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def open_(tmp_path, names=(), warnings=None, **kw) -> Trackers:
    kw.setdefault("logging_steps", 1)
    return open_trackers(list(names), tmp_path, run_name="run-1", config={"lr": 1e-4},
                         warn=(warnings.append if warnings is not None else _no_warning),
                         **kw)


def _no_warning(message: str) -> None:
    raise AssertionError(f"unexpected warning: {message}")


# ---------------------------------------------------------------- metrics.jsonl

def test_metrics_logging_steps_eval_and_last_step(tmp_path):
    with open_(tmp_path, logging_steps=4) as t:
        for n in range(1, TOTAL + 1):
            t.log(step(n, eval_loss=1.5 if n == 3 else None))
            t.log(Status("ignored"))
            t.log(CheckpointSaved(step=n, path="x"))
        t.log(EvalDone(step=TOTAL, eval_loss=1.23456789))
    rows = lines(tmp_path / "metrics.jsonl")
    # 3 has an eval loss, 4 is a multiple of logging_steps, 6 is the last step.
    assert [r["step"] for r in rows] == [3, 4, 6, 6]
    assert rows[0] == step(3, eval_loss=1.5).to_record()
    assert rows[0]["eval_loss"] == 1.5
    assert rows[1] == step(4).to_record()
    assert rows[-1] == {"step": 6, "eval_loss": 1.234568}


def test_metrics_flushed_per_line(tmp_path):
    t = open_(tmp_path, logging_steps=1)
    t.log(step(1))
    t.log(step(2))
    # Read while still open: a crash now must keep both steps.
    assert [r["step"] for r in lines(tmp_path / "metrics.jsonl")] == [1, 2]
    t.close()
    t.close()  # idempotent
    with pytest.raises(ValueError):
        t.log(step(3))


def test_fresh_run_starts_the_file_anew(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 9, "loss": 1.0}\n')
    with open_(tmp_path) as t:
        t.log(step(1))
    assert [r["step"] for r in lines(tmp_path / "metrics.jsonl")] == [1]


def test_resume_rewinds_metrics(tmp_path):
    with open_(tmp_path) as t:
        for n in range(1, TOTAL + 1):
            t.log(step(n))
    # A kill mid-write leaves half a line; the rewind drops it instead of failing.
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "lo')
    with open_(tmp_path, resume_step=4) as t:
        t.log(step(5, loss=0.7))
    rows = lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[-1]["loss"] == 0.7
    assert not list(tmp_path.glob("*.tmp"))


def test_logging_steps_must_be_positive(tmp_path):
    with pytest.raises(ValueError):
        open_(tmp_path, logging_steps=0)


# ---------------------------------------------------------------- TensorBoard

def _scalars(log_dir, tag) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _tags(log_dir) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_tensorboard_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    with open_(tmp_path, ["tensorboard"], logging_steps=2) as t:
        for n in range(1, TOTAL + 1):
            t.log(step(n, gpu=3.5 if n == 4 else None, grad_norm=None if n == 6 else 0.5,
                       eval_loss=1.9 if n == 3 else None))
        t.log(EvalDone(step=TOTAL, eval_loss=1.25))
    log_dir = tmp_path / "tensorboard"
    assert list(log_dir.glob("events.out.tfevents.*"))
    assert _tags(log_dir) == {"train/loss", "train/learning_rate", "train/grad_norm",
                              "train/tokens_per_s", "train/gpu_mem_gib", "eval/loss"}
    loss = _scalars(log_dir, "train/loss")
    assert [s for s, _ in loss] == [2, 3, 4, 6]
    assert [v for _, v in loss] == pytest.approx([1.8, 1.7, 1.6, 1.4], rel=1e-6)
    assert _scalars(log_dir, "train/learning_rate") == [
        (s, pytest.approx(1e-4 * s, rel=1e-6)) for s in (2, 3, 4, 6)]
    assert _scalars(log_dir, "train/tokens_per_s") == [
        (s, pytest.approx(1000.0 + s)) for s in (2, 3, 4, 6)]
    assert _scalars(log_dir, "train/grad_norm") == [(s, 0.5) for s in (2, 3, 4)]
    assert _scalars(log_dir, "train/gpu_mem_gib") == [(4, 3.5)]
    assert _scalars(log_dir, "eval/loss") == [(3, pytest.approx(1.9)), (6, 1.25)]


def test_tensorboard_resume_purges_later_points(tmp_path):
    pytest.importorskip("tensorboard")
    with open_(tmp_path, ["tensorboard"]) as t:
        for n in range(1, TOTAL + 1):
            t.log(step(n, loss=float(n)))
    # Continue from the step-4 checkpoint: the first run's 5 and 6 must go.
    with open_(tmp_path, ["tensorboard"], resume_step=4) as t:
        for n in (5, 6):
            t.log(step(n, loss=10.0 * n))
    assert _scalars(tmp_path / "tensorboard", "train/loss") == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0), (6, 60.0)]


def test_tensorboard_fresh_run_drops_old_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    with open_(tmp_path, ["tensorboard"]) as t:
        for n in range(1, TOTAL + 1):
            t.log(step(n, loss=float(n)))
    with open_(tmp_path, ["tensorboard"]) as t:
        t.log(step(1, loss=7.0))
    assert _scalars(tmp_path / "tensorboard", "train/loss") == [(1, 7.0)]
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1


# ---------------------------------------------------------------- fake wandb / trackio

class _Recorder:
    """Stands in for a tracker package: records every call, and can be told to fail."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.fail: dict[str, int] = {}  # call name -> fail from this many calls on

    def record(self, call, /, *args, **kwargs):
        self.calls.append((call, args, kwargs))
        n = sum(1 for c in self.calls if c[0] == call)
        if call in self.fail and n >= self.fail[call]:
            raise RuntimeError(f"{call} exploded\nsecond line")

    def of(self, name) -> list[tuple]:
        return [(a, k) for c, a, k in self.calls if c == name]


@pytest.fixture
def fake_wandb(monkeypatch):
    rec = _Recorder()
    module = types.ModuleType("wandb")

    class Run:
        def log(self, data, step=None):
            rec.record("log", data, step=step)

        def finish(self):
            rec.record("finish")

    def init(**kwargs):
        rec.record("init", **kwargs)
        return Run()

    module.init = init
    module.log = lambda *a, **k: rec.record("module.log", *a, **k)
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    return rec


@pytest.fixture
def fake_trackio(monkeypatch):
    rec = _Recorder()
    module = types.ModuleType("trackio")
    module.init = lambda **kwargs: rec.record("init", **kwargs)
    module.log = lambda metrics, step=None: rec.record("log", metrics, step=step)
    module.finish = lambda: rec.record("finish")
    monkeypatch.setitem(sys.modules, "trackio", module)
    monkeypatch.delenv("TRACKIO_PROJECT", raising=False)
    return rec


def _run_steps(t: Trackers) -> None:
    for n in range(1, TOTAL + 1):
        t.log(step(n, eval_loss=1.9 if n == 3 else None))
    t.log(EvalDone(step=TOTAL, eval_loss=1.25))


def test_wandb_init_log_finish(tmp_path, fake_wandb, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "my-proj")
    with open_(tmp_path, ["wandb"], logging_steps=2) as t:
        _run_steps(t)
    assert fake_wandb.of("init") == [((), {"project": "my-proj", "name": "run-1",
                                           "config": {"lr": 1e-4}, "dir": str(tmp_path)})]
    logs = fake_wandb.of("log")
    assert [k["step"] for _, k in logs] == [2, 3, 4, 6, 6]
    first = logs[0][0][0]
    assert first == {"train/loss": pytest.approx(1.8), "train/learning_rate": 2e-4,
                     "train/grad_norm": 0.5, "train/tokens_per_s": 1002.0}
    assert logs[1][0][0]["eval/loss"] == 1.9
    assert logs[-1][0][0] == {"eval/loss": 1.25}
    assert fake_wandb.of("finish") == [((), {})]
    assert fake_wandb.of("module.log") == []


def test_wandb_default_project(tmp_path, fake_wandb):
    open_(tmp_path, ["wandb"]).close()
    assert fake_wandb.of("init")[0][1]["project"] == "llamalora"


def test_trackio_init_log_finish(tmp_path, fake_trackio, monkeypatch):
    monkeypatch.setenv("TRACKIO_PROJECT", "tproj")
    t = open_(tmp_path, ["trackio"], logging_steps=2)
    _run_steps(t)
    t.close()
    t.close()
    assert fake_trackio.of("init") == [((), {"project": "tproj", "name": "run-1",
                                             "config": {"lr": 1e-4}})]
    assert [k["step"] for _, k in fake_trackio.of("log")] == [2, 3, 4, 6, 6]
    assert fake_trackio.of("log")[2][0][0]["train/loss"] == pytest.approx(1.6)
    assert fake_trackio.of("finish") == [((), {})]  # once, though closed twice


def test_tracker_failing_mid_run_warns_once(tmp_path, fake_wandb, fake_trackio):
    fake_wandb.fail["log"] = 2  # the second log call and every later one would fail
    warnings: list[str] = []
    with open_(tmp_path, ["wandb", "trackio"], warnings) as t:
        assert t.active == ["wandb", "trackio"]
        _run_steps(t)
        assert t.active == ["trackio"]
    assert len(warnings) == 1
    assert "wandb" in warnings[0] and "log step 2" in warnings[0]
    assert "RuntimeError: log exploded" in warnings[0] and "second line" not in warnings[0]
    # wandb got steps 1 and 2 (which raised), nothing later, and is not finished.
    assert [k["step"] for _, k in fake_wandb.of("log")] == [1, 2]
    assert fake_wandb.of("finish") == []
    # The others went on.
    assert [k["step"] for _, k in fake_trackio.of("log")] == [1, 2, 3, 4, 5, 6, 6]
    assert fake_trackio.of("finish") == [((), {})]
    assert [r["step"] for r in lines(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6, 6]


def test_tracker_failing_to_start_or_close(tmp_path, fake_wandb, fake_trackio):
    fake_wandb.fail["init"] = 1
    fake_trackio.fail["finish"] = 1
    warnings: list[str] = []
    with open_(tmp_path, ["wandb", "trackio"], warnings) as t:
        assert t.names == ["wandb", "trackio"] and t.active == ["trackio"]
        t.log(step(1))
    assert len(warnings) == 2
    assert warnings[0].startswith("wandb failed to start")
    assert warnings[1].startswith("trackio failed to close")
    assert [k["step"] for _, k in fake_trackio.of("log")] == [1]
    assert [r["step"] for r in lines(tmp_path / "metrics.jsonl")] == [1]


# ---------------------------------------------------------------- extras

def test_missing_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(MissingExtraError) as err:
        check_trackers(["wandb"])
    assert "pip install 'llamalora[wandb]'" in str(err.value)
    # open_trackers checks too, before it touches metrics.jsonl.
    with pytest.raises(MissingExtraError):
        open_(tmp_path, ["wandb"])
    assert not (tmp_path / "metrics.jsonl").exists()


def test_missing_packages_one_message(monkeypatch, fake_trackio):
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(MissingExtraError) as err:
        check_trackers(["tensorboard", "trackio", "wandb"])
    message = str(err.value)
    assert "pip install 'llamalora[tensorboard,wandb]'" in message
    assert "trackio" not in message


def test_check_trackers_none_and_unknown(fake_wandb):
    assert check_trackers([]) == check_trackers(["none"]) == []
    assert check_trackers(["wandb", "wandb"]) == ["wandb"]
    with pytest.raises(ConfigError, match="mlflow"):
        check_trackers(["mlflow"])
    with pytest.raises(ConfigError, match="none can't be combined"):
        check_trackers(["none", "wandb"])  # the same rule as --report-to's text
    assert TRACKERS == ("tensorboard", "wandb", "trackio")


def test_import_stays_light():
    import subprocess

    code = ("import sys, llamalora.trackers; "
            "print(sorted(m for m in ('torch', 'tensorboard', 'wandb', 'trackio') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_dry_run_names_a_missing_tracker_before_any_data_work(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from llamalora.cli.main import app

    monkeypatch.setitem(sys.modules, "wandb", None)
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "q", "output": "a"}\n', encoding="utf-8")
    r = CliRunner().invoke(app, ["train", str(data), "--model", "tiny", "--dry-run",
                                 "--report-to", "wandb"])
    assert r.exit_code == 1, r.output
    assert "pip install 'llamalora[wandb]'" in r.stderr and "Plan:" not in r.stderr
