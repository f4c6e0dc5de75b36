"""The demo on the real model: SmolLM2-135M-Instruct learns the glossary.

Needs SmolLM2 in the user's llamalora cache (`make demo`, or `llamalora stats
data/glossary_en.jsonl --tokenizer smollm2`, fetches it once); tests never download, so without
it the test is skipped. About 3-7 minutes on 2 CPU cores.
"""

from __future__ import annotations

import difflib
import os
import shutil
from pathlib import Path

import pytest
import torch

from llamalora.config import TrainConfig
from llamalora.models.smollm2 import SMOLLM2, smollm2_model_dir

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "glossary_en.jsonl"
# Read at import, before conftest points LLAMALORA_HOME at a temporary folder.
_USER_HOME = Path(os.environ["LLAMALORA_HOME"]).expanduser() if os.environ.get(
    "LLAMALORA_HOME") else Path.home() / ".cache" / "llamalora"
# Measured with the Makefile's demo settings (CPU, torch 2.13, transformers 5.24): the held-out
# eval loss fell from 3.497 to 3.119, and the greedy answers' similarity to the trained ones
# (difflib ratio, 4 trained questions) rose from 0.078 to 0.229. The bounds leave room for
# another machine's arithmetic.
MIN_EVAL_DROP = 0.3
MIN_SIMILARITY_GAIN = 0.1


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    cached = _USER_HOME / SMOLLM2.dirname
    wheel = _USER_HOME / "downloads" / SMOLLM2.wheel
    if (cached / "llamalora_model.json").is_file():
        return cached
    if not wheel.is_file():
        pytest.skip(f"SmolLM2 is not in {_USER_HOME}: run `make demo` once to fetch it")
    home = tmp_path_factory.mktemp("smollm2")
    (home / "downloads").mkdir()
    shutil.copy(wheel, home / "downloads" / wheel.name)
    return smollm2_model_dir(home)


def _eval_loss(model, records) -> float:
    total = count = 0.0
    with torch.no_grad():
        for t in records:
            labels = torch.tensor([t.labels])
            out = model(input_ids=torch.tensor([t.input_ids]), labels=labels)
            n = int((labels[:, 1:] != -100).sum())
            total += out.loss.item() * n
            count += n
    return total / count


def _answers(session, examples) -> list[str]:
    from llamalora.chat import GenerationOptions

    options = GenerationOptions(max_new_tokens=48, temperature=0)
    out = []
    for example in examples:
        session.reset()
        out.append(session.ask(example.messages[0][1], options=options).text)
    return out


def _similarity(answers, examples) -> float:
    return sum(difflib.SequenceMatcher(None, a, e.messages[1][1]).ratio()
               for a, e in zip(answers, examples)) / len(examples)


@pytest.mark.slow
def test_a_demo_sized_run_learns_the_glossary(smollm2, tmp_path):
    from llamalora.adapters import apply_adapter
    from llamalora.chat import open_chat
    from llamalora.data import load_examples
    from llamalora.models.loading import load_model_for_inference
    from llamalora.plan import plan_training
    from llamalora.recipe import train

    config = TrainConfig(data_path=str(DATA), output_dir=str(tmp_path / "run"),
                         model=str(smollm2), quant="none", num_train_epochs=3,
                         learning_rate=2e-3, eval_fraction=0.15, gradient_checkpointing=False)
    plan = plan_training(config)
    base, _ = load_model_for_inference(str(smollm2), quant="none", device="cpu")
    before = _eval_loss(base, plan.eval)
    train(config, plan=plan)
    tuned = apply_adapter(base, tmp_path / "run")
    after = _eval_loss(tuned, plan.eval)
    print(f"held-out eval loss {before:.3f} -> {after:.3f}")
    assert before - after >= MIN_EVAL_DROP

    trained_lines = {t.line for t in plan.train}
    examples = [e for e in load_examples(DATA)[0] if e.line in trained_lines][:4]
    base_sim = _similarity(_answers(open_chat(tmp_path / "run", no_adapter=True), examples),
                           examples)
    tuned_sim = _similarity(_answers(open_chat(tmp_path / "run"), examples), examples)
    print(f"similarity to the trained answers {base_sim:.3f} -> {tuned_sim:.3f}")
    assert tuned_sim - base_sim >= MIN_SIMILARITY_GAIN
