"""`llamalora eval`: scores equal ones computed by hand, a zero adapter answers as the base, the
held-out records are train's, and bad input fails before any model loads.

Fast tests use run folders made here (the tiny model with a LoRA adapter saved as train saves
it, and the llamalora.json fields eval reads); the slow ones train, or use SmolLM2.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llamalora.cli.main import app
from llamalora.data import open_source

from conftest import write_jsonl

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
# Glossary-like records in English and Korean; line 6 has a system message, line 7 a history.
RECORDS = [
    {"instruction": "Define the construction term.", "input": "rebar",
     "output": "A steel bar embedded in concrete to carry tension."},
    {"instruction": "거푸집이란?", "output": "콘크리트를 굳히는 임시 틀."},
    {"instruction": "What is slump?", "output": "A test of fresh concrete's consistency."},
    {"instruction": "양생이란?", "output": "콘크리트의 온도와 습도를 유지하는 일."},
    {"instruction": "Define formwork.", "output": "A temporary mould for concrete."},
    {"instruction": "Define grout.", "output": "A fluid mortar.", "system": "Be brief."},
    {"messages": [{"role": "user", "content": "What is a joist?"},
                  {"role": "assistant", "content": "A horizontal beam."},
                  {"role": "user", "content": "Made of what?"},
                  {"role": "assistant", "content": "Timber, steel or concrete."}]},
]


def make_run(folder: Path, data: Path, lines: list[int] | None, *, scale: float = 0.3,
             seed: int = 1, model: str = "tiny") -> Path:
    """A finished-run folder: a LoRA adapter (B drawn at `scale`; 0: the zero adapter peft
    starts from) and the llamalora.json fields eval reads, holding out `lines` of `data`."""
    from llamalora.models.loading import load_model_for_training
    from llamalora.models.lora import attach_lora
    from llamalora.models.names import resolve_model

    torch.manual_seed(0)
    base, _ = load_model_for_training(model, quant="none", device="cpu")
    peft_model = attach_lora(base, r=4, alpha=8, dropout=0.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    peft_model.save_pretrained(folder)
    held = {"data_path": str(data.resolve()), "image_root": None, "lines": lines} if lines \
        else {}
    record = {"base_model": resolve_model(model), "quant": "none",
              "data_sha256": open_source(data).fingerprint(),
              "config": {"data_path": str(data), "quant": "none", "max_seq_length": 128},
              "plan": {"held_out": held}}
    (folder / "llamalora.json").write_text(json.dumps(record))
    return folder


@pytest.fixture
def data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "glossary.jsonl", RECORDS)


def _eval(*args):
    return runner.invoke(app, ["eval", *map(str, args)])


def _predictions(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


def test_scores_equal_ones_computed_by_hand(data, tmp_path):
    from peft import PeftModel
    from rouge_score.rouge_scorer import RougeScorer
    from sacrebleu.metrics import CHRF
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llamalora.evaluate import WordTokenizer

    run = make_run(tmp_path / "run", data, [1, 2, 6, 7])
    r = _eval(run, "--max-new-tokens", 8, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    rows = _predictions(run / "eval")
    assert [row["line"] for row in rows] == [1, 2, 6, 7]
    assert rows[2]["context"] == [{"role": "system", "content": "Be brief."}]
    assert rows[3]["prompt"] == "Made of what?" and len(rows[3]["context"]) == 2
    base_path = json.loads((run / "llamalora.json").read_text())["base_model"]
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
        base_path, dtype=torch.float32),
                                      str(run)).eval()
    chrf, rouge = CHRF(), RougeScorer(["rougeL"], tokenizer=WordTokenizer())
    for row, line in zip(rows, [1, 2, 6, 7]):
        messages = json.loads(data.read_text().splitlines()[line - 1])
        messages = messages.get("messages") or (
            ([{"role": "system", "content": messages["system"]}] if "system" in messages
             else []) + [{"role": "user", "content": messages["instruction"] + (
                 "\n" + messages["input"] if "input" in messages else "")},
                {"role": "assistant", "content": messages["output"]}])
        assert row["reference"] == messages[-1]["content"]
        for name in ("base", "tuned"):
            got, ref = row["scores"][name], row["reference"]
            assert got["chrf"] == pytest.approx(chrf.sentence_score(row[name], [ref]).score)
            assert got["rouge_l"] == pytest.approx(
                100 * rouge.score(ref, row[name])["rougeL"].fmeasure)
            assert got["exact_match"] == float(row[name].strip() == ref)
        # The loss: plain transformers on apply_chat_template's text, loss on the answers.
        if line == 7:
            continue  # (two answers have loss; the single-answer records check the sum)
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True,
                                               date_string="26 Jul 2024", tokenize=True,
                                               return_dict=True).input_ids
        answer = tokenizer(messages[-1]["content"] + "<|eot_id|>",
                           add_special_tokens=False).input_ids
        ids = torch.tensor([list(prompt) + answer])
        labels = torch.tensor([[-100] * len(prompt) + answer])
        with torch.no_grad():
            loss = tuned(input_ids=ids, labels=labels).loss.item()
        assert row["loss"]["tuned"] == pytest.approx(loss, rel=1e-5)
        # Perplexity is exp(loss): compared in log space, at the loss's own tolerance (the tiny
        # model's loss is ~20, where 1e-5 of it moves exp(loss) by 2e-4 of itself).
        assert math.log(row["perplexity"]["tuned"]) == pytest.approx(loss, rel=1e-5)
        assert row["loss_tokens"] == len(answer)
    models = summary["summary"]["models"]
    for name in ("base", "tuned"):
        for key in ("chrf", "rouge_l", "exact_match"):
            assert models[name][key] == pytest.approx(
                sum(row["scores"][name][key] for row in rows) / len(rows))
        weighted = sum(row["loss"][name] * row["loss_tokens"] for row in rows)
        assert models[name]["loss"] == pytest.approx(weighted / sum(row["loss_tokens"]
                                                                    for row in rows))
    assert summary["settings"]["decoding"] == "static cache, batched"
    assert summary["summary"]["tokenization"]["rouge_l"].startswith("words")
    assert json.loads((run / "eval" / "eval.json").read_text())["summary"] == summary["summary"]


def test_a_zero_adapter_answers_as_the_base_and_a_real_one_does_not(data, tmp_path):
    lines = list(range(1, 8))
    for scale, same in ((0.0, True), (0.3, False)):
        run = make_run(tmp_path / f"run-{scale}", data, lines, scale=scale)
        r = _eval(run, "--max-new-tokens", 6)
        assert r.exit_code == 0, r.output
        rows = _predictions(run / "eval")
        if same:
            assert all(row["base"] == row["tuned"] and row["loss"]["base"] ==
                       row["loss"]["tuned"] for row in rows)
        else:
            assert sum(row["base"] != row["tuned"] for row in rows) >= len(rows) - 1
            assert all(row["loss"]["base"] != row["loss"]["tuned"] for row in rows)


def test_batched_answers_equal_generate(data, tmp_path):
    """The static-cache decoder, 4 prompts a batch, gives transformers' generate's answers
    (fp32 on the CPU), also where a batch's answers stop at different lengths."""
    run = make_run(tmp_path / "run", data, list(range(1, 8)))
    got = {}
    for decoding in ("auto", "generate"):
        r = _eval(run, "--data", data, "--max-new-tokens", 12, "--batch-size", 4, "--decoding",
                  decoding, "--out", tmp_path / decoding, "--no-base")
        assert r.exit_code == 0, r.output
        got[decoding] = [row["tuned"] for row in _predictions(tmp_path / decoding)]
        assert "base" not in _predictions(tmp_path / decoding)[0]
    assert got["auto"] == got["generate"]
    assert len(set(got["auto"])) > 1


def test_report_shows_the_table_and_the_records_that_moved(data, tmp_path):
    run = make_run(tmp_path / "run", data, list(range(1, 8)))
    r = _eval(run, "--max-new-tokens", 4, "--show", 1)
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert out.startswith("7 records of ")
    for label in ("exact match", "chrF", "ROUGE-L", "loss", "perplexity", "change"):
        assert label in out
    assert ("Tuned beats base most (chrF):" in out) or ("Base beats tuned most" in out)
    assert "Wrote " in out and "tokens/s" in out
    assert "Loading" not in out and "records from" in r.stderr  # progress on stderr only


def test_bad_data_fails_before_any_model_loads(data, tmp_path, monkeypatch):
    import llamalora.chat

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(llamalora.chat, "open_chat", no_load)
    run = make_run(tmp_path / "run", data, [1, 2])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{"instruction": "oops"\n')
    r = _eval(run, "--data", bad)
    assert r.exit_code == 1 and r.stderr.startswith("Error: ") and "line 2" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = _eval(run, "--data", tmp_path / "missing.jsonl")
    assert r.exit_code == 2 and "no such file" in r.stderr
    # The run's data changed since training: its held-out lines can't be trusted.
    data.write_text(data.read_text() + json.dumps({"instruction": "new", "output": "n"}) + "\n")
    r = _eval(run)
    assert r.exit_code == 2 and "changed since the run" in r.stderr and "--data" in r.stderr
    # Nothing held out, or no record of it at all.
    empty = make_run(tmp_path / "none", write_jsonl(tmp_path / "d2.jsonl", RECORDS), None)
    r = _eval(empty)
    assert r.exit_code == 2 and "held no records out" in r.stderr
    (empty / "llamalora.json").unlink()
    r = _eval(empty)
    assert r.exit_code == 2 and "pass --data" in r.stderr
    assert not (run / "eval").exists()


def test_an_earlier_eval_is_replaced_only_with_overwrite(data, tmp_path):
    run = make_run(tmp_path / "run", data, [1, 2])
    assert _eval(run, "--max-new-tokens", 4).exit_code == 0
    first = (run / "eval" / "eval.json").read_text()
    r = _eval(run, "--max-new-tokens", 4)
    assert r.exit_code == 1 and "--overwrite" in r.stderr
    assert (run / "eval" / "eval.json").read_text() == first
    assert _eval(run, "--max-new-tokens", 5, "--overwrite").exit_code == 0
    assert json.loads((run / "eval" / "eval.json").read_text())["settings"][
        "max_new_tokens"] == 5
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    r = _eval(run, "--out", mine, "--overwrite")
    assert r.exit_code == 1 and "notes.txt" in r.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    # eval's file names are not enough: a user's own eval.json is not eval's
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "eval.json").write_text('{"accuracy": 0.9}')
    r = _eval(run, "--out", theirs, "--overwrite")
    assert r.exit_code == 1 and "holds files eval did not write (eval.json)" in r.stderr
    assert (theirs / "eval.json").read_text() == '{"accuracy": 0.9}'


def test_rouge_words_in_any_script():
    from rouge_score.rouge_scorer import RougeScorer

    from llamalora.evaluate import Scorer, WordTokenizer

    assert WordTokenizer().tokenize("콘크리트를 굳히는 틀.") == ["콘크리트를", "굳히는", "틀"]
    assert WordTokenizer().tokenize("型枠は、仮設") == ["型", "枠", "は", "仮", "設"]
    assert WordTokenizer().tokenize("Rebar, STEEL bar") == ["rebar", "steel", "bar"]
    # rouge-score's own tokenizer sees no words in Korean: every Korean answer would score 0.
    plain = RougeScorer(["rougeL"]).score("콘크리트를 굳히는 틀", "콘크리트를 굳히는 틀")
    assert plain["rougeL"].fmeasure == 0.0
    scores = Scorer()("콘크리트를 굳히는 틀", "콘크리트를 굳히는 임시 틀.")
    assert scores["rouge_l"] == pytest.approx(100 * 2 * 1.0 * 0.75 / 1.75)
    assert scores["exact_match"] == 0.0 and 0 < scores["chrf"] < 100
    assert Scorer()(" A  steel\nbar ", "A steel bar")["exact_match"] == 1.0


@pytest.mark.slow
def test_eval_uses_the_records_train_held_out(tmp_path):
    """train records its held-out lines; eval answers exactly those, and its tuned loss is
    the run's final eval loss (the same loss over the same records)."""
    from llamalora.config import TrainConfig
    from llamalora.plan import plan_training
    from llamalora.recipe import train

    data = write_jsonl(tmp_path / "d.jsonl", RECORDS * 2)
    config = TrainConfig(data_path=str(data), output_dir=str(tmp_path / "run"), model="tiny",
                         quant="none", max_seq_length=128, max_steps=3, eval_fraction=0.3,
                         save_steps=0, lora_dropout=0.0, gradient_checkpointing=False)
    plan = plan_training(config)
    result = train(config, plan=plan)
    held = result.plan["held_out"]
    assert held["lines"] == [t.line for t in plan.eval] and len(held["lines"]) == 4
    assert held["data_path"] == str(data.resolve())
    cwd = os.getcwd()
    os.chdir(tmp_path.parent)  # from another folder: the recorded path is absolute
    try:
        r = _eval(tmp_path / "run", "--max-new-tokens", 6, "--json")
    finally:
        os.chdir(cwd)
    assert r.exit_code == 0, r.output
    assert [row["line"] for row in _predictions(tmp_path / "run" / "eval")] == held["lines"]
    loss = json.loads(r.stdout)["summary"]["models"]["tuned"]["loss"]
    assert loss == pytest.approx(result.final_eval_loss, rel=1e-5)
    # train --overwrite replaces the run's eval too (it is part of the run).
    train(TrainConfig(**{**config.__dict__, "max_steps": 1}), overwrite=True)
    assert not (tmp_path / "run" / "eval").exists()


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from test_quality import smollm2 as fixture

    return fixture.__wrapped__(tmp_path_factory)


@pytest.mark.slow
def test_eval_on_smollm2(smollm2, tmp_path, monkeypatch):
    """A real small Llama: the batched decoder's answers equal generate's, a zero adapter's
    columns are the base's, and a random one's are not."""
    monkeypatch.setenv("LLAMALORA_HOME", str(smollm2.parent))
    data = write_jsonl(tmp_path / "g.jsonl", [json.loads(line) for line in (
        ROOT / "data" / "glossary_en.jsonl").read_text().splitlines()[:5]])
    got = {}
    for scale in (0.0, 0.02):
        run = make_run(tmp_path / f"run-{scale}", data, [1, 2, 3, 4, 5], scale=scale,
                       model=str(smollm2))
        for decoding in ("auto", "generate") if scale else ("auto",):
            out = tmp_path / f"out-{scale}-{decoding}"
            r = _eval(run, "--max-new-tokens", 20, "--batch-size", 4, "--decoding", decoding,
                      "--out", out)
            assert r.exit_code == 0, r.output
            got[scale, decoding] = _predictions(out)
    for key in ("base", "tuned"):
        assert [row[key] for row in got[0.02, "auto"]] == [row[key] for row in
                                                           got[0.02, "generate"]]
    assert all(row["base"] == row["tuned"] for row in got[0.0, "auto"])
    assert any(row["base"] != row["tuned"] for row in got[0.02, "auto"])
    assert [row["base"] for row in got[0.0, "auto"]] == [row["base"] for row in
                                                         got[0.02, "auto"]]
