"""Shared fixtures, records and markers.

- An isolated home for caches (the tiny model is built once per session).
- Records the tests write as data files: GOOD (valid, every field) and MEMO (what the tiny model
  memorizes), with `write_jsonl`.
- `needs_bnb` / `needs_triton`: tag a test (`@needs_bnb`, or `pytest.param(..., marks=needs_bnb)`)
  and skip it where bitsandbytes / triton is not installed; `-m "not needs_bnb"` deselects them.
- A test that starts a process group or launches several processes (torchrun, accelerate launch)
  must be marked `multiprocess`; an unmarked one fails, so the default run never starts one.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# --- optional packages ------------------------------------------------------------------------

needs_bnb = pytest.mark.needs_bnb
needs_triton = pytest.mark.needs_triton
_OPTIONAL = {"needs_bnb": ("bitsandbytes", "pip install bitsandbytes"),
             "needs_triton": ("triton", "pip install triton, or CUDA torch's own")}


@functools.cache
def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def pytest_runtest_setup(item):
    for marker, (module, fix) in _OPTIONAL.items():
        if item.get_closest_marker(marker) and not installed(module):
            pytest.skip(f"{module} is not installed ({fix})")


# --- no process group outside `multiprocess` tests --------------------------------------------

_LAUNCHERS = ("torch.distributed.run", "torchrun", "accelerate.commands.launch",
              "accelerate launch")


def _refuse(what: str):
    raise AssertionError(f"{what} in a test not marked multiprocess: add "
                         "@pytest.mark.multiprocess (the default run starts no process group)")


class _GuardedPopen(subprocess.Popen):
    def __init__(self, args, *rest, **kwargs):
        words = [args] if isinstance(args, (str, bytes, os.PathLike)) else args
        command = " ".join(os.fsdecode(w) if isinstance(w, (bytes, os.PathLike)) else str(w)
                           for w in words)
        launcher = next((name for name in _LAUNCHERS if name in command), None)
        if launcher:
            _refuse(f"{launcher} launched")
        super().__init__(args, *rest, **kwargs)


@pytest.fixture(autouse=True)
def _process_groups_only_when_marked(request, monkeypatch):
    if request.node.get_closest_marker("multiprocess"):
        return
    monkeypatch.setattr(subprocess, "Popen", _GuardedPopen)
    if "torch.distributed" in sys.modules:  # imported by the test module already, if at all
        monkeypatch.setattr(sys.modules["torch.distributed"], "init_process_group",
                            lambda *a, **k: _refuse("init_process_group called"))


# --- isolated caches ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _session_home(tmp_path_factory) -> Path:
    # One cache per test session: the tiny model is built once and shared.
    return tmp_path_factory.mktemp("home")


@pytest.fixture(autouse=True)
def _isolated_home(_session_home, monkeypatch):
    # Never touch the real cache or the hub from tests.
    home = _session_home
    monkeypatch.setenv("LLAMALORA_HOME", str(home / "llamalora"))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads HF_HUB_OFFLINE once, when it is imported: a suite started without
    # it set would otherwise ask the Hub (and what a test sees would depend on the network).
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture
def hub_unreachable(monkeypatch):
    """HF_HUB_OFFLINE unset, and no connection opens: what a machine offline sees."""
    import socket

    from huggingface_hub import constants

    def refuse(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", refuse)


def write_jsonl(path: Path, records: list, *, raw_lines: list[str] | None = None) -> Path:
    """Writes records as JSONL (or raw lines verbatim when given)."""
    lines = raw_lines if raw_lines is not None else [
        json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- records -----------------------------------------------------------------------------------

GOOD = [
    {"instruction": "다음 건설 용어를 설명하세요.", "input": "거푸집",
     "output": "콘크리트를 부어 원하는 모양으로 굳히기 위한 임시 틀입니다."},
    {"instruction": "Define the construction term.", "input": "rebar",
     "output": "A steel bar embedded in concrete to carry tension."},
    {"instruction": "양생이란 무엇인가요?", "output": "타설한 콘크리트가 충분한 강도를 내도록 "
     "온도와 습도를 유지하는 과정입니다.", "system": "건설 용어 도우미입니다."},
]
# Short Korean and English construction terms the tiny model memorizes; between them they use
# every field (input, system).
MEMO = [
    {"instruction": "거푸집이란?", "output": "콘크리트를 굳히는 틀."},
    {"instruction": "What is rebar?", "output": "A steel bar in concrete."},
    {"instruction": "양생이란?", "input": "콘크리트", "output": "습도와 온도를 유지하는 일."},
    {"instruction": "Define slump.", "output": "A test of fresh concrete.", "system": "Be brief."},
]
# Llama 3 8B-Instruct's chat template: no dated system block, unlike the bundled (Llama 3.2
# Vision) one, so a folder that has it shows its own template is used.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
# The first three as bare questions (instruction and output only), so that `chat --prompt` with
# the instruction alone is the prompt the model was trained on.
MEMO_QUESTIONS = [{"instruction": r["instruction"], "output": r["output"]} for r in MEMO[:3]]


@pytest.fixture
def good_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "good.jsonl", GOOD)


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def make_records(lengths: list[int], seed: int = 0, prompt_share: float = 0.5) -> list:
    """Random tokenized records (ids 10-4999) of these lengths; the first `prompt_share` of each
    has no label."""
    import torch

    from llamalora.batching import Tokenized

    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(10, 5000, (n,), generator=g).tolist()
        prompt = int(n * prompt_share)
        out.append(Tokenized(line=i + 1, input_ids=ids, labels=[-100] * prompt + ids[prompt:]))
    return out


def tiny_adapter(tmp_path, run: dict | None = None, cross_b: float = 0.0) -> Path:
    """An adapter folder for the tiny model (`run`: its llamalora.json, as a finished run has);
    its cross-attention layer's LoRA B is `cross_b`. Building it loads no model."""
    import torch
    from safetensors.torch import save_file

    from llamalora.models.tiny import tiny_model_dir

    folder = tmp_path / "adapter"
    folder.mkdir()
    prefix = "base_model.model.model.layers"
    save_file({f"{prefix}.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 64),
               f"{prefix}.0.self_attn.q_proj.lora_B.weight": torch.randn(64, 4),
               f"{prefix}.1.cross_attn.q_proj.lora_A.weight": torch.randn(4, 64),
               f"{prefix}.1.cross_attn.q_proj.lora_B.weight": torch.full((64, 4), cross_b)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": str(tiny_model_dir()), "peft_type": "LORA", "r": 4,
         "lora_alpha": 8, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}))
    if run is not None:
        (folder / "llamalora.json").write_text(json.dumps(run))
    return folder


def tiny_lora_model(dtype=None):
    """The tiny model on the CPU with LoRA r 4 (no dropout) whose B is not zero, so every LoRA
    weight gets a gradient; `dtype` (e.g. torch.float64) converts it."""
    import torch

    from llamalora.models.lora import attach_lora

    from llamalora.models.loading import load_model_for_training

    torch.manual_seed(0)
    model, _ = load_model_for_training("tiny", quant="none", device="cpu")
    model = attach_lora(model, r=4, alpha=8, dropout=0.0)
    if dtype is not None:
        model.to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model
