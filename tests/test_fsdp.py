"""FSDP (accelerate launch + benchmarks/fsdp2.yaml): settings, refusals, sharded gradients and
clipping against one process, and whole runs whose files match a one-process run's.

The multi-process tests run 2 CPU processes over gloo, which FSDP2 supports as NCCL's stand-in.
Run as a script (`python -m torch.distributed.run --nproc-per-node 2 tests/test_fsdp.py OUT`),
this file is the worker of `test_sharded_gradients_and_clipping_match_one_process`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamalora import fsdp

from conftest import MEMO

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "benchmarks" / "fsdp2.yaml"
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
CLIP = 0.5


# --- settings from the environment ----------------------------------------------------------

def test_no_fsdp_without_accelerate_or_with_one_process():
    assert fsdp.from_env({}, world_size=2) is None
    assert fsdp.from_env({"ACCELERATE_USE_FSDP": "false", "FSDP_VERSION": "2"}, 2) is None
    assert fsdp.from_env(FSDP_ENV, world_size=1) is None  # nothing to shard across


def test_settings_accelerate_launch_sets():
    env = {**FSDP_ENV, "FSDP_RESHARD_AFTER_FORWARD": "false",
           "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
           "FSDP_TRANSFORMER_CLS_TO_WRAP": "MllamaSelfAttentionDecoderLayer, Foo",
           "FSDP_CPU_RAM_EFFICIENT_LOADING": "true", "FSDP_OFFLOAD_PARAMS": "false",
           "FSDP_ACTIVATION_CHECKPOINTING": "false", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
           "FSDP_SYNC_MODULE_STATES": "true", "FSDP_USE_ORIG_PARAMS": "true"}
    s = fsdp.from_env(env, world_size=4)
    assert s == fsdp.FsdpSettings(world_size=4, reshard_after_forward=False,
                                  wrap_classes=("MllamaSelfAttentionDecoderLayer", "Foo"),
                                  sequential_loading=True)
    assert fsdp.from_env(FSDP_ENV, 2) == fsdp.FsdpSettings(world_size=2)
    # FSDP1-style strategy names mean the same as true / false.
    for value, expected in (("FULL_SHARD", True), ("SHARD_GRAD_OP", False), ("True", True)):
        env = {**FSDP_ENV, "FSDP_RESHARD_AFTER_FORWARD": value}
        assert fsdp.from_env(env, 2).reshard_after_forward is expected


@pytest.mark.parametrize("extra, match", [
    ({"FSDP_VERSION": "1"}, "fsdp_version: 2"),
    ({"FSDP_VERSION": ""}, "fsdp_version: 2"),
    ({"FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_offload_params"),
    ({"FSDP_ACTIVATION_CHECKPOINTING": "true"}, "--gradient-checkpointing"),
    ({"FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"}, "TRANSFORMER_BASED_WRAP"),
    ({"FSDP_RESHARD_AFTER_FORWARD": "HYBRID_SHARD"}, "reshard_after_forward"),
    ({"FSDP_CPU_RAM_EFFICIENT_LOADING": "maybe"}, "FSDP_CPU_RAM_EFFICIENT_LOADING"),
])
def test_unsupported_settings_are_refused_with_the_fix(extra, match):
    from llamalora.errors import ConfigError

    env = {k: v for k, v in {**FSDP_ENV, **extra}.items() if v}
    with pytest.raises(ConfigError, match=match):
        fsdp.from_env(env, world_size=2)


def _fake_plan(with_vision=False):
    from types import SimpleNamespace

    return SimpleNamespace(with_vision=with_vision)


def test_quantized_bases_and_images_are_refused(monkeypatch, tmp_path):
    from llamalora.config import TrainConfig
    from llamalora.errors import ConfigError

    for key, value in FSDP_ENV.items():
        monkeypatch.setenv(key, value)
    base = dict(data_path="d.jsonl", output_dir=str(tmp_path))
    for quant in ("8bit", "4bit"):
        with pytest.raises(ConfigError, match=f"--quant {quant} can't be sharded.*--quant none"):
            fsdp.settings(TrainConfig(quant=quant, **base), _fake_plan(), world_size=2)
    with pytest.raises(ConfigError, match="images"):
        fsdp.settings(TrainConfig(quant="none", **base), _fake_plan(True), world_size=2)
    assert fsdp.settings(TrainConfig(quant="none", **base), _fake_plan(), 2).world_size == 2
    # One process, or no FSDP asked for: a plain run, 8-bit allowed.
    assert fsdp.settings(TrainConfig(quant="8bit", **base), _fake_plan(True), 1) is None
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert fsdp.settings(TrainConfig(quant="8bit", **base), _fake_plan(True), 2) is None


def test_cli_refuses_8bit_under_fsdp_before_loading_a_model(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import llamalora.models.loading as models
    from llamalora.cli.main import app

    from conftest import GOOD, write_jsonl

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_model_for_training", boom)
    for key, value in {**FSDP_ENV, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    data = write_jsonl(tmp_path / "d.jsonl", GOOD)
    r = CliRunner().invoke(app, ["train", str(data), "--model", "tiny", "--output-dir",
                                 str(tmp_path / "out")])  # --quant 8bit is the default
    assert r.exit_code == 2, r.output
    assert "Error: --quant 8bit can't be sharded" in r.stderr and "--quant none" in r.stderr
    assert "Traceback" not in r.output


def test_sequential_loading_takes_turns(monkeypatch):
    """Rank r loads after r barriers and then joins the others' turns: world_size in all."""
    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: calls.append(1))
    turns = fsdp.FsdpSettings(world_size=3, sequential_loading=True)
    for rank in range(3):
        calls.clear()
        fsdp.wait_turn(turns, rank)
        assert len(calls) == rank
        fsdp.pass_turn(turns, rank)
        assert len(calls) == 3
    calls.clear()
    fsdp.wait_turn(fsdp.FsdpSettings(world_size=3), 2)
    fsdp.pass_turn(fsdp.FsdpSettings(world_size=3), 2)
    assert not calls


# --- sharded gradients and clipping (2 processes) --------------------------------------------

def _lora_model_and_batches():
    """The tiny model with LoRA (B not zero, so every LoRA weight gets a gradient) in float64,
    and three micro-batches of different lengths; the same on every process."""
    from conftest import tiny_lora_model

    # float64, so summing the shards in another order than one process does cannot show.
    model = tiny_lora_model(torch.float64)
    batches = []
    for length in (7, 12, 5):
        ids = torch.randint(10, 5000, (2, length))
        labels = ids.clone()
        labels[:, : length // 2] = -100
        batches.append({"input_ids": ids, "labels": labels})
    return model, batches


def _gradients(model, batches_here, n_targets, sharded):
    from torch.distributed.tensor import DTensor

    from llamalora.step import loss_sum

    if sharded:
        fsdp.run_fillers(len(batches_here), lambda b: loss_sum(model, b)[0].backward(),
                         torch.device("cpu"))
    for batch in batches_here:
        loss, _ = loss_sum(model, batch)
        (loss / n_targets).backward()

    def full(t):
        return t.full_tensor() if isinstance(t, DTensor) else t

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = {n: full(p.grad).clone() for n, p in named if p.grad is not None}
    norm = torch.nn.utils.clip_grad_norm_([p for _, p in named], CLIP)
    clipped = {n: full(p.grad).clone() for n, p in named if p.grad is not None}
    for _, p in named:
        p.grad = None
    return {"grads": grads, "norm": full(norm).item(), "clipped": clipped}


def _count(batches):
    return sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)


def _worker(out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, batches = _lora_model_and_batches()
    fsdp.shard(model, torch.device("cpu"), fsdp.FsdpSettings(world_size=2), rank)
    n = _count(batches)
    # Even: ranks take micro-batches 0, 2 / 1 (rank 1 has one fewer: a filler tops it up).
    # Uneven: rank 0 takes all three, rank 1 runs three fillers.
    layouts = {"split": batches[rank::2], "uneven": batches if rank == 0 else []}
    result = {name: _gradients(model, mine, n, sharded=True) for name, mine in layouts.items()}
    if rank == 0:
        torch.save(result, out)
    # Both ranks leave together: a rank tearing gloo down while the other still works in it
    # makes the other's gloo thread throw ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_sharded_gradients_and_clipping_match_one_process(tmp_path):
    from llamalora.models.names import resolve_model

    resolve_model("tiny")  # built once here, not by both processes at the same time
    out = tmp_path / "sharded.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--standalone", __file__, str(out)], capture_output=True,
                       text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    sharded = torch.load(out, weights_only=True)
    model, batches = _lora_model_and_batches()
    one = _gradients(model, batches, _count(batches), sharded=False)
    assert one["norm"] > 2 * CLIP  # clipping is active, so a per-shard norm would show
    for layout, got in sharded.items():
        assert got["grads"].keys() == one["grads"].keys(), layout
        # Summed over ranks, not averaged: the same gradients as one process.
        for key in ("grads", "clipped"):
            torch.testing.assert_close(got[key], one[key], msg=f"{layout} {key}")
        torch.testing.assert_close(got["norm"], one["norm"], msg=layout)


# --- whole runs through accelerate launch (2 processes) --------------------------------------

# 8 records (MEMO twice), 2 held out for eval (1 eval batch: rank 1 runs a filler), 6 to train in 3
# micro-batches of 2: one epoch is 2 steps of 2 micro-batches, and the second step has one
# (rank 1 runs a filler). A checkpoint after step 1.
COMMON = ["--model", "tiny", "--quant", "none", "--max-seq-length", "64", "--lora-dropout", "0",
          "--learning-rate", "1e-2", "--warmup-ratio", "0", "--num-train-epochs", "1",
          "--eval-fraction", "0.25", "--save-steps", "1", "--gradient-checkpointing", "--json"]


def _accelerate_fsdp(data, out, *extra, launch=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
         "--num_processes", "2", "--main_process_port", "0", *launch, "-m", "llamalora",
         "train", str(data), "--output-dir", str(out), "--gradient-accumulation-steps", "1",
         *COMMON, *extra], capture_output=True, text=True, env=env, timeout=600)


def _one_process(data, out, **env):
    """The same run in one process taking both micro-batches of a step by accumulation, with
    as many threads as each FSDP process (Adam's first steps amplify summation-order noise)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        [sys.executable, "-m", "llamalora", "train", str(data), "--output-dir", str(out),
         "--gradient-accumulation-steps", "2", *COMMON], capture_output=True, text=True,
        env=env, timeout=600)


def _layout(folder: Path) -> dict:
    """Every file under `folder` (but the run's log and plot), with tensor names, shapes and
    dtypes for the weight files."""
    from safetensors.torch import load_file

    found = {}
    for f in sorted(folder.rglob("*")):
        rel = str(f.relative_to(folder))
        if f.is_dir() or rel in ("llamalora.json", "loss.png", "metrics.jsonl"):
            continue
        if f.suffix == ".safetensors":
            found[rel] = {k: (tuple(v.shape), str(v.dtype)) for k, v in load_file(f).items()}
        elif f.name == "training_state.pt":
            state = torch.load(f, weights_only=True)["optimizer"]
            found[rel] = {i: {k: tuple(v.shape) for k, v in s.items()}
                          for i, s in state["state"].items()}
        else:
            found[rel] = None
    return found


def _adapter(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fsdp_run_equals_one_process_and_writes_the_same_files(tmp_path):
    from conftest import write_jsonl

    data = write_jsonl(tmp_path / "memo.jsonl", MEMO * 2)
    two = _accelerate_fsdp(data, tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stderr.count("Plan:") == 1  # only rank 0 speaks
    run = json.loads((tmp_path / "two" / "llamalora.json").read_text())
    assert run["world_size"] == 2 and run["plan"]["steps"] == 2
    ranks = run["fsdp"]["ranks"]
    assert len(ranks) == 2 and run["fsdp"]["units"] >= 5
    # Each process holds its half of the weights (the tiny model has ~0.06 GiB in fp32).
    assert all(0.4 < r["weights_gib"] / (ranks[0]["weights_gib"] * 2) < 0.6 for r in ranks)

    one = _one_process(data, tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    ref = json.loads((tmp_path / "one" / "llamalora.json").read_text())
    assert ref["plan"]["steps"] == 2 and ref["world_size"] == 1
    assert _layout(tmp_path / "two") == _layout(tmp_path / "one")
    assert _max_diff(_adapter(tmp_path / "two"), _adapter(tmp_path / "one")) < 1e-4
    step1 = Path("checkpoints") / "step-000001"
    assert _max_diff(_adapter(tmp_path / "two" / step1), _adapter(tmp_path / "one" / step1)) < 1e-4
    opt = [torch.load(tmp_path / d / step1 / "training_state.pt", weights_only=True)
           ["optimizer"]["state"] for d in ("two", "one")]
    for i in opt[1]:
        for k in ("exp_avg", "exp_avg_sq"):
            assert (opt[0][i][k] - opt[1][i][k]).abs().max().item() < 1e-4
    assert run["final_eval_loss"] == pytest.approx(ref["final_eval_loss"], abs=1e-4)
    assert run["final_train_loss"] == pytest.approx(ref["final_train_loss"], abs=1e-4)

    # --resume from the FSDP checkpoint of step 1 ends with the same adapter (this time the
    # processes load the model one after the other).
    again = tmp_path / "again"
    shutil.copytree(tmp_path / "two", again)
    for f in again.iterdir():
        if f.is_file():
            f.unlink()
    resumed = _accelerate_fsdp(data, again, "--resume",
                               launch=("--fsdp_cpu_ram_efficient_loading", "true"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from step-000001" in resumed.stderr
    assert json.loads(resumed.stdout)["fsdp"]["sequential_loading"] is True
    assert _max_diff(_adapter(again), _adapter(tmp_path / "two")) < 1e-5


# --- 2 GPUs -----------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.multiprocess
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_fsdp_on_two_gpus_halves_the_weights_and_matches_one_gpu(tmp_path):
    """The tiny model in bf16 on 2 GPUs under FSDP vs 1 GPU with twice the accumulation."""
    from conftest import write_jsonl

    data = write_jsonl(tmp_path / "memo.jsonl", MEMO * 2)
    two = _accelerate_fsdp(data, tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    first_gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    one = _one_process(data, tmp_path / "one", CUDA_VISIBLE_DEVICES=first_gpu)
    assert one.returncode == 0, one.stderr[-3000:]
    run = json.loads((tmp_path / "two" / "llamalora.json").read_text())
    assert run["compute_dtype"] == "bfloat16" and run["device"].startswith("cuda")
    ranks = run["fsdp"]["ranks"]
    assert all(r["peak_gpu_mem_gib"] > 0 for r in ranks)
    assert abs(ranks[0]["weights_gib"] - ranks[1]["weights_gib"]) < 0.1 * ranks[0]["weights_gib"]
    assert _layout(tmp_path / "two") == _layout(tmp_path / "one")
    # bf16 matmuls summed in another order, which Adam's first (sign-like) steps amplify where a
    # gradient is near 0: compare the adapters as a whole, and the losses.
    a, b = _adapter(tmp_path / "two"), _adapter(tmp_path / "one")
    diff = torch.cat([(a[k] - b[k]).flatten().float() for k in b])
    assert diff.norm() < 0.05 * torch.cat([b[k].flatten().float() for k in b]).norm()
    ref = json.loads((tmp_path / "one" / "llamalora.json").read_text())
    assert run["final_train_loss"] == pytest.approx(ref["final_train_loss"], rel=1e-2)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _worker(sys.argv[1])
