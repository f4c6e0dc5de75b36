"""Data-parallel runs on the CPU: 2 gloo processes of the tiny model under torchrun (and
accelerate launch), stopped by a signal, resumed, refused, and fed data that does not divide.

A launch costs 10-25 s (imports, on a 2-core box); the one test with two launches is `slow`.
Signalled workers run through PROBE (below), which records each rank's pid and how it exited,
so a test can signal one rank and see how every rank ended.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llamalora.rundir import checkpoint_dirs
from llamalora.cli.main import app
from llamalora.config import TrainConfig
from llamalora.plan import plan_training
from llamalora.events import StepDone
from llamalora.recipe import TrainingInterrupted, train

from conftest import needs_bnb, write_jsonl

pytestmark = pytest.mark.multiprocess  # every test here launches 2 processes
runner = CliRunner()
# Twelve records, all different and of different lengths (so a dropped or doubled eval record
# moves the mean loss).
DISTINCT = [{"instruction": f"Term {i}: what is it?",
             "output": " ".join(["concrete", "steel", "form", "slab"][: 1 + i % 4] * (1 + i // 4))}
            for i in range(12)]
# Flags shared by every launch: deterministic (no dropout, no warm-up), no scheduled saves.
COMMON = ["--model", "tiny", "--quant", "none", "--max-seq-length", "64", "--lora-dropout", "0",
          "--learning-rate", "1e-2", "--warmup-ratio", "0", "--save-steps", "0",
          "--no-gradient-checkpointing"]
HINT = "Continue with the same command plus --resume"

# Runs llamalora like `python -m llamalora`, leaving rank<N>.pid at start and rank<N>.exit
# (exit code, and the complete checkpoints on disk at that moment) in $PROBE_DIR.
# $PROBE_SAVE_DELAY slows rank 0's checkpoint writes, to widen any race with the other ranks.
PROBE = '''
import json, os, sys, time
from pathlib import Path

probe, rank = Path(os.environ["PROBE_DIR"]), os.environ.get("RANK", "0")
(probe / f"rank{rank}.pid").write_text(str(os.getpid()))
import llamalora.recipe as t
from llamalora.rundir import checkpoint_dirs
from llamalora.cli.main import main

delay, save = float(os.environ.get("PROBE_SAVE_DELAY", "0")), t._save_checkpoint

def slow_save(*args, **kwargs):
    time.sleep(delay)
    return save(*args, **kwargs)

t._save_checkpoint = slow_save
code = 0
try:
    main()
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    raise
finally:
    out = Path(sys.argv[sys.argv.index("--output-dir") + 1])
    (probe / f"rank{rank}.exit").write_text(json.dumps(
        {"code": code, "checkpoints": [p.name for p in checkpoint_dirs(out)]}))
'''


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _torchrun(args: list[str], *, nproc: int = 2, probe: Path | None = None) -> list[str]:
    """The command line; --standalone picks a free port, so tests never share one."""
    target = [str(probe / "probe.py")] if probe else ["-m", "llamalora"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(nproc), *target, "train", *args]


def _probe(tmp_path: Path) -> Path:
    folder = tmp_path / "probe"
    folder.mkdir()
    (folder / "probe.py").write_text(PROBE, encoding="utf-8")
    return folder


def _exits(probe: Path, nproc: int = 2) -> list[dict]:
    return [json.loads((probe / f"rank{r}.exit").read_text()) for r in range(nproc)]


def _wait_for_step(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= step:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    raise AssertionError(f"no step {step} in {metrics} after {timeout} s")


def _signal_midway(proc: subprocess.Popen, metrics: Path, probe: Path,
                   rank: int | None) -> str:
    """After step 2, SIGINT to worker `rank` (torchrun itself when None); returns torchrun's
    stderr. A failing test leaves no worker behind (they run in their own session, so killing
    torchrun alone would orphan them)."""
    try:
        _wait_for_step(proc, metrics, 2)
        os.kill(proc.pid if rank is None else int((probe / f"rank{rank}.pid").read_text()),
                signal.SIGINT)
        return proc.communicate(timeout=300)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            for pid_file in probe.glob("rank*.pid"):
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.communicate()


def _llamalora_frames(text: str) -> list[str]:
    """Traceback lines inside llamalora: a worker must fail in one line, never with these."""
    return re.findall(r'File "[^"]*llamalora[/\\][^"]*"', text)


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error: ")]


def _adapter(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def _one_process(data: Path, out: Path, **kw) -> dict:
    """The same run in this process, taking by accumulation the micro-batches 2 ranks share."""
    base = dict(data_path=str(data), output_dir=str(out), model="tiny", quant="none",
                max_seq_length=64, lora_dropout=0.0, learning_rate=1e-2, warmup_ratio=0.0,
                save_steps=0, gradient_checkpointing=False)
    return train(TrainConfig(**{**base, **kw})).to_dict()


@pytest.mark.slow
def test_sigint_to_one_rank_stops_every_rank_at_one_checkpoint_and_resumes(tmp_path):
    """Ctrl-C reaching rank 1 alone: the flag is all-reduced, so both ranks stop after the same
    step, rank 0 saves, and no rank leaves before the checkpoint is on disk (rank 0's save is
    slowed by 2 s to make that visible). --resume with 1 process is refused; with 2 it finishes
    with the adapter of an uninterrupted run."""
    data = write_jsonl(tmp_path / "distinct.jsonl", DISTINCT)
    out, probe = tmp_path / "two", _probe(tmp_path)
    args = [str(data), "--output-dir", str(out), "--batch-size", "1",
            "--gradient-accumulation-steps", "1", "--max-steps", "40", *COMMON]
    proc = subprocess.Popen(_torchrun(args, probe=probe),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(PROBE_DIR=str(probe), PROBE_SAVE_DELAY="2"))
    stderr = _signal_midway(proc, out / "metrics.jsonl", probe, rank=1)
    stopped = _steps(out)[-1]
    assert 2 <= stopped < 40
    ckpt = f"step-{stopped:06d}"
    assert [p.name for p in checkpoint_dirs(out)] == [ckpt]
    state = json.loads((out / "checkpoints" / ckpt / "state.json").read_text())
    assert state["step"] == stopped and state["world_size"] == 2
    # Both ranks exited 130 after the checkpoint was complete; torchrun itself exits 1 and
    # prints its ChildFailedError report (its own, not llamalora's).
    assert _exits(probe) == [{"code": 130, "checkpoints": [ckpt]}] * 2
    assert proc.returncode != 0 and HINT in stderr and f"stopped at step {stopped}/40" in stderr
    assert not _llamalora_frames(stderr), stderr[-3000:]
    assert not (out / "llamalora.json").exists()

    # The same folder with 1 process is refused, naming the launch that fits.
    r = runner.invoke(app, ["train", *args, "--resume"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert _errors(r.stderr) == [
        f"Error: the checkpoint in {out / 'checkpoints' / ckpt} was made with 2 process(es), "
        "this run has 1; resume it with 2 (torchrun --nproc-per-node 2 -m llamalora train ... "
        "--resume), or drop --resume and pass --overwrite to start anew"]
    assert [p.name for p in checkpoint_dirs(out)] == [ckpt]

    done = subprocess.run(_torchrun([*args, "--resume"]), capture_output=True, text=True,
                          env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _steps(out) == list(range(1, 41))
    run = json.loads((out / "llamalora.json").read_text())
    assert run["world_size"] == 2 and run["steps_run"] == 40 - stopped
    # Against the same 2 processes uninterrupted: the same sums in the same order, so what is
    # left is what the stop and the resume changed (against one process, the other order of
    # summing a step's gradients alone moves the weights after 40 steps).
    straight = tmp_path / "straight"
    whole = subprocess.run(_torchrun([str(straight) if a == str(out) else a for a in args]),
                           capture_output=True, text=True, env=_env(), timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert _max_diff(_adapter(out), _adapter(straight)) < 1e-6


def test_sigint_to_the_torchrun_launcher_stops_the_workers_cleanly(tmp_path):
    """Ctrl-C in a terminal reaches torchrun only (its workers run in their own session);
    torchrun sends SIGINT on to every worker. The workers finish the step, save, and exit 130
    with the --resume hint. (torchrun SIGKILLs workers still running after --shutdown-timeout,
    30 s by default: a longer step + save loses that checkpoint, the previous one stays.)"""
    data = write_jsonl(tmp_path / "distinct.jsonl", DISTINCT)
    out, probe = tmp_path / "two", _probe(tmp_path)
    args = [str(data), "--output-dir", str(out), "--batch-size", "1", "--max-steps", "40",
            *COMMON]
    proc = subprocess.Popen(_torchrun(args, probe=probe), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(PROBE_DIR=str(probe)))
    stderr = _signal_midway(proc, out / "metrics.jsonl", probe, rank=None)
    stopped = _steps(out)[-1]
    assert 2 <= stopped < 40
    ckpt = f"step-{stopped:06d}"
    assert [p.name for p in checkpoint_dirs(out)] == [ckpt]
    assert _exits(probe) == [{"code": 130, "checkpoints": [ckpt]}] * 2
    # torchrun ends with its own SignalException traceback (exit 1); the workers' part is one
    # Error line each, with no llamalora frame.
    assert proc.returncode != 0 and HINT in stderr
    assert not _llamalora_frames(stderr), stderr[-3000:]
    assert not (out / "llamalora.json").exists()


def _interrupted_one_process_run(tmp_path: Path) -> tuple[Path, list[str]]:
    """A 1-process run stopped by SIGINT after step 3, in this process (a few seconds)."""
    data = write_jsonl(tmp_path / "distinct.jsonl", DISTINCT)
    out = tmp_path / "one"

    def on_event(event):
        if isinstance(event, StepDone) and event.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted, match="--resume"):
        train(TrainConfig(data_path=str(data), output_dir=str(out), model="tiny", quant="none",
                          max_seq_length=64, max_steps=8, save_steps=0,
                          gradient_checkpointing=False), on_event=on_event)
    assert [p.name for p in checkpoint_dirs(out)] == ["step-000003"]
    return out, [str(data), "--output-dir", str(out), "--max-steps", "8", *COMMON, "--resume"]


def test_resume_with_another_number_of_processes_is_refused(tmp_path):
    """A checkpoint of 1 process resumed by 2 (torchrun), and one of 2 resumed by 1: each is
    refused before any weights load, with one Error line naming the launch that fits."""
    out, args = _interrupted_one_process_run(tmp_path)
    ckpt = out / "checkpoints" / "step-000003"
    before = sorted(p.name for p in out.rglob("*"))

    two = subprocess.run(_torchrun(args), capture_output=True, text=True, env=_env(),
                         timeout=300)
    assert two.returncode != 0
    # Every rank reads the same checkpoint, says it and exits 2; torchrun adds its report. Once
    # the first rank has exited, torchrun stops the other, which may not have printed yet.
    errors = _errors(two.stderr)
    assert 1 <= len(errors) <= 2 and set(errors) == {
        f"Error: the checkpoint in {ckpt} was made with 1 process(es), this run has 2; resume "
        "it with 1 (llamalora train ... --resume, without torchrun), or drop --resume and pass "
        "--overwrite to start anew"}, two.stderr[-3000:]
    assert not _llamalora_frames(two.stderr), two.stderr[-3000:]
    assert "Loading tiny" not in two.stderr  # refused before the model
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing written, no lock left

    # The other way: the same checkpoint marked as made by 2 processes, resumed by 1.
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps({**state, "world_size": 2}))
    one = runner.invoke(app, ["train", *args])
    assert one.exit_code == 2 and "Traceback" not in one.output
    assert _errors(one.stderr) == [
        f"Error: the checkpoint in {ckpt} was made with 2 process(es), this run has 1; resume "
        "it with 2 (torchrun --nproc-per-node 2 -m llamalora train ... --resume), or drop "
        "--resume and pass --overwrite to start anew"]


def _eval_loss_by_hand(adapter_dir: Path, records) -> float:
    """Token-mean loss of `records` under the saved adapter: plain peft, one record at a time
    in one process, so neither batching nor ranks can drop or double a record."""
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"],
                                                dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    total = count = 0.0
    with torch.no_grad():
        for t in records:
            logits = model(input_ids=torch.tensor([t.input_ids])).logits[0, :-1]
            targets = torch.tensor(t.labels[1:])
            keep = targets != -100
            total += F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count


def test_uneven_batches_and_eval_over_two_processes(tmp_path):
    """12 records: 5 held out, 7 to train in micro-batches of 2 (2, 2, 2, 1), 1.25 epochs =
    5 micro-batches over 2 ranks: 3 steps, the last with rank 1 idle. Eval's 3 batches (2, 2, 1)
    split 2 + 1 over the ranks. Every eval record must count once: the 2-process eval loss
    equals the adapter's loss computed by hand in one process."""
    data = write_jsonl(tmp_path / "distinct.jsonl", DISTINCT)
    out = tmp_path / "two"
    two = subprocess.run(_torchrun([str(data), "--output-dir", str(out), "--batch-size", "2",
                                    "--gradient-accumulation-steps", "1", "--num-train-epochs",
                                    "1.25", "--eval-fraction", "0.42", "--eval-steps", "2",
                                    *COMMON]),
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    run = json.loads((out / "llamalora.json").read_text())
    plan = run["plan"]
    assert (plan["train_records"], plan["eval_records"]) == (7, 5)
    assert (plan["steps"], plan["steps_per_epoch"], plan["world_size"]) == (3, 2, 2)
    assert run["steps_run"] == 3 and _steps(out) == [1, 2, 3]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 3]  # mid-run and final

    config = TrainConfig(data_path=str(data), output_dir=str(tmp_path / "unused"), model="tiny",
                         quant="none", max_seq_length=64, eval_fraction=0.42)
    held_out = plan_training(config).eval
    assert len(held_out) == 5
    # Relative to the loss (~20 on the tiny model): the run's chunked response loss and plain
    # cross-entropy over all logits sum in another order, which moves an fp32 loss of 20 by
    # ~1e-5; a record dropped or counted twice moves the mean by orders of magnitude more.
    by_hand = _eval_loss_by_hand(out, held_out)
    assert abs(run["final_eval_loss"] - by_hand) < 2e-6 * by_hand

    # One process taking both ranks' micro-batches by accumulation: same plan, same adapter
    # (so rank 1's idle last step added nothing), same eval loss.
    one = _one_process(data, tmp_path / "one", batch_size=2, gradient_accumulation_steps=2,
                       num_train_epochs=1.25, eval_fraction=0.42, eval_steps=2)
    assert one["plan"]["steps"] == 3 and one["steps_run"] == 3
    assert _max_diff(_adapter(out), _adapter(tmp_path / "one")) < 1e-4
    assert abs(one["final_eval_loss"] - run["final_eval_loss"]) < 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_runs_two_gloo_processes_on_the_cpu(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` starts torchrun's workers (RANK,
    LOCAL_RANK, WORLD_SIZE set) even without a GPU, and llamalora trains on gloo. (`--cpu`
    cannot do this: accelerate 1.x then starts ONE process unless MPI is set up, and MPI's
    variables are not the ones llamalora reads.)"""
    pytest.importorskip("accelerate")
    data = write_jsonl(tmp_path / "distinct.jsonl", DISTINCT)
    out = tmp_path / "acc"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "llamalora", "train", str(data),
           "--output-dir", str(out), "--gradient-accumulation-steps", "2", "--max-steps", "3",
           *COMMON]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("Plan:") == 1  # only rank 0 speaks
    run = json.loads((out / "llamalora.json").read_text())
    assert run["world_size"] == 2 and run["plan"]["effective_batch"] == 8
    _one_process(data, tmp_path / "one", gradient_accumulation_steps=4, max_steps=3)
    assert _max_diff(_adapter(out), _adapter(tmp_path / "one")) < 1e-4


@needs_bnb
@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_quantized_bases_train_data_parallel_like_one_process(tmp_path, quant):
    """Every rank quantizes its own copy of the base and only LoRA's gradients travel: at 8-bit
    and 4-bit, 2 gloo processes end with the adapter of one process that takes both ranks'
    micro-batches by accumulation."""
    data = write_jsonl(tmp_path / "distinct.jsonl", DISTINCT)
    out = tmp_path / "two"
    flags = [quant if prev == "--quant" else flag for prev, flag in zip(["", *COMMON], COMMON)]
    two = subprocess.run(_torchrun([str(data), "--output-dir", str(out),
                                    "--gradient-accumulation-steps", "1", "--max-steps", "2",
                                    *flags]),
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    run = json.loads((out / "llamalora.json").read_text())
    assert (run["world_size"], run["quant"], run["steps_run"]) == (2, quant, 2)
    _one_process(data, tmp_path / "one", quant=quant, gradient_accumulation_steps=2, max_steps=2)
    assert _max_diff(_adapter(out), _adapter(tmp_path / "one")) < 1e-4


@pytest.mark.slow
def test_two_nodes_of_one_process_each_train_like_one_process(tmp_path):
    """A multi-node launch simulated on this machine: `torchrun --nnodes 2 --nproc-per-node 1`
    twice (node ranks 0 and 1) on 127.0.0.1. Each process is LOCAL_RANK 0 of its node; only
    global rank 0 writes, and the adapter is one process's that accumulates both micro-batches."""
    from conftest import MEMO

    data = write_jsonl(tmp_path / "memo.jsonl", MEMO * 2)
    out, port = tmp_path / "two-nodes", _free_port()
    args = ["-m", "llamalora", "train", str(data), "--output-dir", str(out), "--model", "tiny",
            "--quant", "none", "--max-steps", "2", "--max-seq-length", "64", "--lora-dropout",
            "0", "--learning-rate", "1e-2", "--warmup-ratio", "0", "--save-steps", "1",
            "--gradient-accumulation-steps", "1", "--no-gradient-checkpointing", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
         "1", "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port",
         str(port), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for rank in (0, 1)]
    results = [node.communicate(timeout=300) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, results):
        assert node.returncode == 0, stderr[-3000:]
    (out0, err0), (out1, err1) = results
    assert "Plan:" in err0 and "Plan:" not in err1  # only global rank 0 speaks
    run = json.loads(out0)
    assert run["world_size"] == 2 and run["plan"]["effective_batch"] == 4 and not out1.strip()
    assert [p.name for p in checkpoint_dirs(out)] == ["step-000001"]  # written once, by rank 0
    one = _one_process(data, tmp_path / "one", batch_size=2, gradient_accumulation_steps=2,
                       max_steps=2)
    assert one["plan"]["effective_batch"] == 4
    assert _max_diff(_adapter(out), _adapter(tmp_path / "one")) < 1e-4
