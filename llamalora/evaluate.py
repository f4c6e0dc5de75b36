"""Did training help? `evaluate(run)` answers each held-out (or given) record with the tuned
model and with the base (the adapter switched off, the same model in memory), and scores both
against the record's answer.

    records -> prompts (`chat.prompt_ids`: render_segments, as training saw them) and the
    training tokenization (`batching.tokenize_records`, for the loss) -> load once ->
    per model: response-token loss (`step.loss_sum`) and greedy answers, batched through the
    static-cache decoder -> scores -> eval.json + predictions.jsonl

Scores, each per record and averaged over the records:
- exact match: the answer equals the reference after Unicode NFC and collapsing whitespace
  (case counts);
- chrF (sacrebleu's CHRF defaults: character 6-grams, whitespace removed, beta 2): fair to
  Korean and to languages written without spaces;
- ROUGE-L F1 (rouge-score) over `WordTokenizer`'s tokens: rouge-score's own tokenizer keeps only
  a-z and 0-9, so a Korean answer would score 0;
- loss and perplexity: the mean cross-entropy over the record's response tokens, as training's
  eval loss (averaged over records by token count, so the tuned loss on a run's held-out records
  is the run's final eval loss).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import unicodedata
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from llamalora import __version__
from llamalora.adapters import AdapterInfo, find_adapter
from llamalora.data import Example, load_examples, open_source
from llamalora.errors import ConfigError, OutputExistsError, UsageError
from llamalora.events import EvalProgress, OnEvent, Status
from llamalora.provenance import package_versions
from llamalora.rundir import write_atomic

EVAL_DIR = "eval"  # RUN/eval unless --out
EVAL_FILES = ("eval.json", "predictions.jsonl")
MODELS = ("tuned", "base")
_VERSIONED = ("torch", "transformers", "peft", "sacrebleu", "rouge-score")  # eval.json records
TOKENIZATION = {
    "exact_match": "the whole answer, after Unicode NFC and collapsing runs of whitespace; "
                   "case-sensitive",
    "chrf": "characters (sacrebleu CHRF: 6-grams, whitespace removed, beta 2), per record",
    "rouge_l": "words: runs of letters, marks and digits, casefolded; each Han, kana, Thai, "
               "Lao, Khmer or Myanmar character a word of its own (llamalora.evaluate."
               "WordTokenizer)",
    "loss": "the model's own tokens: the response tokens training has loss on",
}


# --- scores ----------------------------------------------------------------------------------

class WordTokenizer:
    """Words for ROUGE in any script: rouge-score's default tokenizer drops everything outside
    a-z and 0-9. Scripts written without spaces count each character as a word, as Chinese
    and Japanese ROUGE usually does."""

    _WORD = None

    def tokenize(self, text: str) -> list[str]:
        if WordTokenizer._WORD is None:
            import regex

            WordTokenizer._WORD = regex.compile(
                r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}]"
                r"|[\p{L}\p{M}\p{N}]+")
        return WordTokenizer._WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def _normal(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(_normal(prediction) == _normal(reference))


class Scorer:
    """The text scores of one answer against its reference (0-100, exact match 0 or 1)."""

    def __init__(self):
        from rouge_score.rouge_scorer import RougeScorer
        from sacrebleu.metrics import CHRF

        self._chrf = CHRF()
        self._rouge = RougeScorer(["rougeL"], tokenizer=WordTokenizer())

    @property
    def chrf_signature(self) -> str:
        return str(self._chrf.get_signature())

    def __call__(self, prediction: str, reference: str) -> dict[str, float]:
        return {"exact_match": exact_match(prediction, reference),
                "chrf": self._chrf.sentence_score(prediction, [reference]).score,
                "rouge_l": 100 * self._rouge.score(reference, prediction)["rougeL"].fmeasure}


def summarize(rows: list[dict], models: tuple[str, ...]) -> dict:
    """Averages of the per-record scores, and the token-weighted loss, for each model."""
    out = {}
    for name in models:
        scores = [r["scores"][name] for r in rows]
        losses = [(r["loss"][name], r["loss_tokens"]) for r in rows
                  if r["loss"].get(name) is not None]
        tokens = sum(n for _, n in losses)
        loss = sum(v * n for v, n in losses) / tokens if tokens else None
        out[name] = {key: sum(s[key] for s in scores) / len(scores)
                     for key in ("exact_match", "chrf", "rouge_l")}
        out[name].update(loss=loss, perplexity=math.exp(loss) if loss is not None else None,
                         answer_tokens=sum(r["answer_tokens"][name] for r in rows) / len(rows))
    return out


# --- records ---------------------------------------------------------------------------------

@dataclass
class EvalRecord:
    """One record to answer: the conversation before its last answer, and that answer."""

    line: int
    system: str | None
    turns: list[tuple[str, str]]  # ending with the user turn the answer follows
    reference: str
    images: list[Path] = field(default_factory=list)
    example: Example | None = field(default=None, repr=False)

    @classmethod
    def of(cls, example: Example) -> EvalRecord:
        return cls(example.line, example.system, list(example.messages[:-1]),
                   example.messages[-1][1], list(example.images), example)


def held_out_records(info: AdapterInfo) -> tuple[list[Example], str]:
    """The records a run held out (`--eval-fraction`), read again from its data file, and the
    file's name.

    Raises:
        UsageError: The run recorded none, or its data file is gone.
        ConfigError: The data file changed since training (its SHA-256 differs).
    """
    held = info.run.get("plan", {}).get("held_out")
    where = info.run_dir
    if not info.run:
        raise UsageError(f"{where} has no llamalora.json (an exported adapter or an "
                         "interrupted run), so its held-out records are unknown; pass --data "
                         "FILE")
    if not held or not held.get("lines"):
        raise UsageError(f"the run in {where} held no records out (trained with "
                         "--eval-fraction 0, or before llamalora recorded them); pass --data "
                         "FILE")
    config = info.run.get("config", {})
    path = held["data_path"]
    if Path(path).is_absolute() and not Path(path).exists():  # (a Hub id is not a path)
        raise UsageError(f"{path}, the run's training data, is gone; pass --data FILE")
    source = open_source(path, config.get("split", "train"))
    if source.fingerprint() != info.run.get("data_sha256"):
        raise ConfigError(f"{path} changed since the run in {where} trained on it (its SHA-256 "
                          "differs), so its held-out records can't be found by line; restore "
                          "it, or pass --data FILE")
    wanted = set(held["lines"])
    examples, _ = load_examples(path, skip_invalid=bool(config.get("skip_invalid")),
                                image_root=held.get("image_root"),
                                split=config.get("split", "train"))
    picked = [e for e in examples if e.line in wanted]
    if len(picked) != len(wanted):
        raise ConfigError(f"{path}: {len(wanted) - len(picked)} of the run's held-out "
                          f"{source.unit}s are not valid records now; pass --data FILE")
    return picked, path


def _written_by_eval(path: Path) -> bool:
    """An eval.json that llamalora's eval wrote (it records the version that wrote it)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and "llamalora_version" in data and "summary" in data


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuses a folder that holds anything but an earlier eval's files, and those without
    `overwrite`.

    Raises:
        OutputExistsError
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputExistsError(f"{out} is a file; --out takes a folder")
    existing = sorted(p.name for p in out.iterdir())
    foreign = [name for name in existing if name not in EVAL_FILES]
    if existing and not foreign and not _written_by_eval(out / "eval.json"):
        foreign = existing  # the names are eval's, the files may not be
    if foreign:
        raise OutputExistsError(f"{out} holds files eval did not write ({', '.join(foreign[:3])}"
                                "); pass another --out")
    if existing and not overwrite:
        raise OutputExistsError(f"{out} holds an earlier eval; pass --overwrite to replace it, "
                                "or another --out")


# --- the run ---------------------------------------------------------------------------------

@dataclass
class EvalResult:
    """What `evaluate` returns and eval.json holds (the records go to predictions.jsonl)."""

    summary: dict
    settings: dict
    timings: dict
    versions: dict
    out: str
    records: list[dict] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        data = asdict(self)
        del data["records"]
        data["llamalora_version"] = __version__
        return data


@dataclass
class EvalOptions:
    max_new_tokens: int = 128
    batch_size: int = 32
    base: bool = True  # also answer with the adapter switched off
    decoding: str = "auto"  # or "generate": transformers' generate for every record

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.decoding not in ("auto", "generate"):
            raise ConfigError(f"--decoding must be auto or generate, got {self.decoding!r}")


def evaluate(run: str | Path, *, data: str | Path | None = None, out: str | Path | None = None,
             options: EvalOptions | None = None, overwrite: bool = False,
             model: str | None = None, quant: str | None = None, kernels: str = "auto",
             split: str = "train", image_root: str | Path | None = None,
             on_event: OnEvent | None = None) -> EvalResult:
    """Scores the tuned model (and the base) on a run's held-out records or on `data`.

    Everything that can fail on the user's input (the run, the data, the output folder, the
    chat template) fails before the model loads.

    Raises:
        UsageError, ConfigError, DataError, OutputExistsError, ModelError.
    """
    emit = on_event or (lambda event: None)
    options = options or EvalOptions()
    started = time.perf_counter()
    info = find_adapter(run)
    out_dir = Path(out) if out is not None else info.run_dir / EVAL_DIR
    check_out_dir(out_dir, overwrite)
    if data is not None:
        examples, _ = load_examples(data, image_root=image_root, split=split)
        data_name = str(data)
    else:
        examples, data_name = held_out_records(info)
    records = [EvalRecord.of(e) for e in examples]
    prepared = _prepare(info, records, model)
    emit(Status(f"{len(records)} records from {data_name}; loading the model"))
    from llamalora.chat import open_chat

    session = open_chat(run, model=model, quant=quant, kernels=kernels, merge=False,
                        with_vision=any(r.images for r in records))
    loaded = time.perf_counter()
    models = MODELS if options.base else MODELS[:1]
    answers, losses, answer_s = _answer_all(session, records, prepared, options, models, emit)
    scorer = Scorer()
    rows = [_row(r, {m: answers[m][i] for m in models}, {m: losses[m][i] for m in models},
                 prepared.loss_tokens[i], scorer, session.tokenizer, set(session.stop_ids))
            for i, r in enumerate(records)]
    generated = sum(sum(r["answer_tokens"].values()) for r in rows)
    result = EvalResult(
        summary={"records": len(rows), "models": summarize(rows, models),
                 "tokenization": TOKENIZATION, "chrf_signature": scorer.chrf_signature},
        settings={"run": str(info.folder), "data": data_name, "base_model": session.base_model,
                  "quant": session.quant, "kernels": session.kernels, **asdict(options),
                  "decoding": _decoding(session, options),
                  "max_seq_length": prepared.max_seq_length},
        timings={"load_s": round(loaded - started, 2), "answers_s": round(answer_s, 2),
                 "generated_tokens": generated,
                 "tokens_per_s": round(generated / answer_s, 1) if answer_s else None},
        versions=package_versions(_VERSIONED), out=str(out_dir), records=rows)
    result.timings["wall_s"] = round(time.perf_counter() - started, 2)
    _write(out_dir, result, overwrite)
    return result


@dataclass
class _Prepared:
    prompts: list[list[int]]
    tokenized: list  # batching.Tokenized per record, or None where truncation dropped it
    loss_tokens: list[int]
    max_seq_length: int
    pad_id: int


def _prepare(info: AdapterInfo, records: list[EvalRecord], model: str | None) -> _Prepared:
    """Prompts and training tokenization with the base's tokenizer, before the model loads: a
    template that refuses a record fails here."""
    from llamalora.batching import IGNORE_INDEX, tokenize_records
    from llamalora.chat import prompt_ids
    from llamalora.config import TrainConfig
    from llamalora.models.names import resolve_model
    from llamalora.template import pad_token_id, render_examples, template_of
    from llamalora.tokenizer import load_model_tokenizer

    base = model or info.base_model
    if not base:
        raise UsageError(f"{info.folder} names no base model; pass --model")
    tokenizer, _ = load_model_tokenizer(resolve_model(base))
    # The run's tokenization settings; TrainConfig's defaults for a bare adapter folder.
    config = {**{f.name: f.default for f in fields(TrainConfig)}, **info.run.get("config", {})}
    render_examples([r.example for r in records], template_of(tokenizer))  # names the line
    prompts = [prompt_ids(tokenizer, r.system, r.turns) for r in records]
    tokenized = [enc.tokenized for enc in tokenize_records(
        tokenizer, [r.example for r in records], max_seq_length=config["max_seq_length"],
        train_on_prompt=config["train_on_prompt"], truncation=config["truncation"])]
    counts = [sum(x != IGNORE_INDEX for x in t.labels[1:]) if t else 0 for t in tokenized]
    return _Prepared(prompts, tokenized, counts, config["max_seq_length"],
                     pad_token_id(tokenizer))


def _decoding(session, options: EvalOptions) -> str:
    if options.decoding == "generate":
        return "transformers generate (--decoding generate)"
    return session.decoding + (", batched" if session.static_decoder is not None else "")


def _answer_all(session, records, prepared: _Prepared, options: EvalOptions, models, emit):
    """Each model's answers (token ids) and per-record losses, the records in batches of
    similar prompt length; the base is the same model with the adapter switched off."""
    order = sorted(range(len(records)), key=lambda i: len(prepared.prompts[i]))
    text = [i for i in order if not records[i].images]
    batches = [text[k:k + options.batch_size] for k in range(0, len(text), options.batch_size)]
    batches += [[i] for i in order if records[i].images]  # generate, one at a time
    decoder = session.static_decoder if options.decoding == "auto" else None
    if decoder is not None and text:
        longest = max(len(prepared.prompts[i]) for i in text)
        decoder.reserve(min(options.batch_size, len(text)), longest + options.max_new_tokens)
    answers = {m: [None] * len(records) for m in models}
    losses = {m: [None] * len(records) for m in models}
    done, total = 0, len(records) * len(models)
    emit(EvalProgress(0, total, models[0]))
    start = time.perf_counter()
    for name in models:
        switch = session.model.disable_adapter() if name == "base" else contextlib.nullcontext()
        with switch:
            for batch in batches:
                for i in batch:
                    losses[name][i] = _loss(session, prepared.tokenized[i], records[i],
                                            prepared.pad_id)
                prompts = [prepared.prompts[i] for i in batch]
                if decoder is not None and not records[batch[0]].images:
                    new = decoder.generate_batch(prompts, max_new_tokens=options.max_new_tokens,
                                                 stop_ids=session.stop_ids,
                                                 rows=min(options.batch_size, len(text)))
                else:
                    new = _generate(session, prompts, records[batch[0]].images, options)
                for i, ids in zip(batch, new):
                    answers[name][i] = ids
                done += len(batch)
                emit(EvalProgress(done, total, name))
    return answers, losses, time.perf_counter() - start


def _loss(session, tokenized, record: EvalRecord, pad_id: int) -> float | None:
    """The record's mean response-token loss, as training computes it (`step.loss_sum`)."""
    if tokenized is None:
        return None
    import torch

    from llamalora.step import loss_sum, to_device

    batch = session.batches.padded([tokenized], pad_id)
    dtype = next(p.dtype for p in session.model.parameters() if p.is_floating_point())
    with torch.inference_mode():
        total, count = loss_sum(session.model, to_device(batch, session.device, dtype))
    return (total / count.clamp(min=1)).item() if int(count) else None


def _generate(session, prompts: list[list[int]], images: list[Path], options: EvalOptions):
    """Greedy answers through transformers' `generate`: the prompts left-padded in one batch
    (a record with images alone, its pixels beside it)."""
    import torch

    from llamalora.step import to_device

    batch = session.batches.prompt(prompts, session.pad_id, images)
    longest = batch["input_ids"].shape[1]  # with a family's image tokens, where it has them
    dtype = next(p.dtype for p in session.model.parameters() if p.is_floating_point())
    with torch.inference_mode():
        out = session.model.generate(
            **to_device(batch, session.device, dtype), do_sample=False, temperature=None,
            top_p=None, top_k=None, max_new_tokens=options.max_new_tokens,
            eos_token_id=session.stop_ids, pad_token_id=session.pad_id)
    answers = []
    for row in out[:, longest:].tolist():
        cut = next((k + 1 for k, t in enumerate(row) if t in session.stop_ids), len(row))
        answers.append(row[:cut])
    return answers


def _row(record: EvalRecord, answers: dict, losses: dict, loss_tokens: int, scorer,
         tokenizer, stops: set[int]) -> dict:
    """A predictions.jsonl line: the prompt, the reference, each model's answer and scores."""
    texts = {m: tokenizer.decode([t for t in ids if t not in stops], skip_special_tokens=True)
             for m, ids in answers.items()}
    row = {"line": record.line, "prompt": record.turns[-1][1]}
    if record.system or len(record.turns) > 1:
        row["context"] = ([{"role": "system", "content": record.system}] if record.system
                          else []) + [{"role": r, "content": c} for r, c in record.turns[:-1]]
    if record.images:
        row["images"] = [str(p) for p in record.images]
    row.update(reference=record.reference, **texts,
               scores={m: scorer(texts[m], record.reference) for m in answers},
               loss={m: losses[m] for m in answers},
               perplexity={m: math.exp(v) if v is not None else None for m, v in losses.items()},
               loss_tokens=loss_tokens,
               answer_tokens={m: sum(t not in stops for t in ids) for m, ids in answers.items()})
    return row


def _write(out_dir: Path, result: EvalResult, overwrite: bool) -> None:
    """eval.json and predictions.jsonl, each written whole to a temporary name and then renamed
    (an interrupted eval leaves no half file)."""
    check_out_dir(out_dir, overwrite)  # again: the folder may have changed while it ran
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"predictions.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                          for r in result.records),
             "eval.json": json.dumps(result.to_dict(), ensure_ascii=False, indent=2) + "\n"}
    for name, text in files.items():
        write_atomic(out_dir / name, text)
