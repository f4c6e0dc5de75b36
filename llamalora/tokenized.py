"""The training data, tokenized once and kept on disk through `datasets`.

    data -> validated Examples, streamed into an Arrow file (examples.arrow)
         -> `Dataset.map` with `num_proc` processes -> ids, labels and per-record counts
            (cached by fingerprint: a second run on the same data, tokenizer and options
            tokenizes nothing)

Both files are memory-mapped, so a run holds statistics and indices, not token lists: `Records`
hands the trainer one record at a time as a `Tokenized`; they are read with pyarrow alone, from
the list of files the build recorded (`_read_tables`). The node's local rank 0 builds the
cache; the other ranks wait for its marker file and read it. Tokenization itself is
`batching.tokenize_records`, the same code `tokenize_examples` runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from llamalora.batching import Tokenized, TruncationSummary, tokenize_records
from llamalora.data import (Example, Tally, left_out_note, open_source, require_valid,
                            scan_examples)
from llamalora.errors import DataError, LlamaLoraError
from llamalora.rundir import write_atomic
from llamalora.template import render_segments, template_of
from llamalora.tokenizer import tokenizer_digest

# Bump when what is stored (columns, their meaning) changes: older caches are then ignored.
CACHE_VERSION = 2
# Below this many records one process tokenizes (starting workers costs more than it saves).
PARALLEL_FROM = 50_000
_STARTED = time.time()  # failure markers older than this process are a previous run's


@dataclass
class TokenizedData:
    """The tokenized data set and what the plan needs to know about it."""

    table: object  # pyarrow.Table: line, input_ids, labels, images, length, targets, kept
    records: int  # valid records (before truncation leaves any out)
    with_vision: bool
    truncation: TruncationSummary
    data_fingerprint: str
    reused: bool  # tokenization was skipped: the cache had it

    def kept(self):
        """Indices (numpy) of the records that train: those truncation did not leave out."""
        import numpy as np

        return np.flatnonzero(self.column("kept"))

    def column(self, name: str):
        return self.table.column(name).to_numpy()


class Records:
    """Some rows of a tokenized table, by position, as `Tokenized`; `lengths` holds their
    token counts (what batching needs without reading a record), `image_counts` their images."""

    def __init__(self, table, indices):
        import numpy as np

        self._indices = np.asarray(indices, dtype=np.int64)
        self._lines = table.column("line").to_numpy()
        self._ids, self._labels = _lists(table.column("input_ids")), _lists(
            table.column("labels"))
        images = table.column("images")
        self._images = images if any(len(c.values) for c in images.chunks) else None
        self.image_counts: list[int] = (
            np.concatenate([np.diff(c.offsets.to_numpy()) for c in images.chunks])[
                self._indices].tolist() if self._images is not None else [0] * len(self._indices))
        self.lengths: list[int] = table.column("length").to_numpy()[self._indices].tolist()
        self.targets: list[int] = table.column("targets").to_numpy()[self._indices].tolist()

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: int) -> Tokenized:
        j = int(self._indices[i])
        images = [Path(p) for p in self._images[j].as_py()] if self._images is not None else []
        return Tokenized(int(self._lines[j]), self._ids(j), self._labels(j), images)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def _lists(column):
    """Row j of a list<int32> column as a Python list, read from the memory-mapped buffers (a
    pyarrow scalar per row costs ~10x as much; the trainer asks for rows one at a time)."""
    import numpy as np

    chunks = column.chunks
    starts = np.cumsum([0] + [len(c) for c in chunks])
    # A chunk's offsets point into its whole child array (`values`), slices included.
    parts = [(c.offsets.to_numpy(), c.values.to_numpy()) for c in chunks]

    def row(j: int) -> list[int]:
        k = int(np.searchsorted(starts, j, side="right")) - 1 if len(parts) > 1 else 0
        offsets, values = parts[k]
        local = j - starts[k]
        return values[offsets[local]:offsets[local + 1]].tolist()

    return row


def cache_root() -> Path:
    from llamalora.models.home import llamalora_home

    return llamalora_home() / "data"


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


def _template_probe(template) -> list:
    # What the template makes of a fixed conversation: a change to the training text changes
    # the cache key even when nothing else does.
    return render_segments(None, [("user", "q"), ("assistant", "a"), ("user", "q2"),
                                  ("assistant", "a2")], template=template)


def tokenize_data(data_path: str, tokenizer, *, max_seq_length: int, train_on_prompt: bool,
                  truncation: str, skip_invalid: bool = False, image_root: str | None = None,
                  split: str = "train", num_proc: int = 0, builder: bool = True,
                  on_status=None) -> TokenizedData:
    """Validates and tokenizes a data set into the cache, or reads it from there.

    Args:
        data_path, split, image_root, skip_invalid: As `data.load_examples` takes them.
        tokenizer: A `tokenizers.Tokenizer`; a `tokenizer.FileTokenizer` is not parsed when
            the cache has the data.
        max_seq_length, train_on_prompt, truncation: As `batching.tokenize_records`.
        num_proc: Tokenizing processes (0: one below PARALLEL_FROM records, else up to 8).
        builder: This process builds the cache (local rank 0); False waits for it to.
        on_status: Called with a line for the user (e.g. "tokenized data read from the cache").

    Raises:
        DataError: Invalid records (without `skip_invalid`) or none valid.
        UsageError: The data can't be read.
    """
    source = open_source(data_path, split)
    data_fp = source.fingerprint()
    root = Path(image_root).expanduser().resolve() if image_root else None
    template = template_of(tokenizer)
    # Which records are valid depends on these (the template: a system message next to images).
    system_with_images = template.takes_system_with_images
    folder = cache_root() / _digest(CACHE_VERSION, data_fp, str(root), skip_invalid,
                                    system_with_images)
    key = _digest(folder.name, tokenizer_digest(tokenizer), max_seq_length, train_on_prompt,
                  truncation, template.text, _template_probe(template))
    ready = folder / f"tokenized-{key}.json"
    failed = folder / f"failed-{key}.txt"
    built = False
    if not builder:
        summary = _wait_for(ready, failed)
    elif ready.is_file():
        summary = json.loads(ready.read_text())
    else:
        built = True
        try:
            summary = _build(source, folder, key, tokenizer, num_proc=num_proc,
                             max_seq_length=max_seq_length, train_on_prompt=train_on_prompt,
                             truncation=truncation, skip_invalid=skip_invalid, image_root=root,
                             system_with_images=system_with_images)
        except LlamaLoraError as exc:
            folder.mkdir(parents=True, exist_ok=True)
            failed.write_text(str(exc))
            raise
    table = _read_tables(folder, summary.get("files"))
    if table is None:  # a cache from before the files were recorded
        table = _tokenized(folder, key, tokenizer, summary["num_proc"], max_seq_length,
                           train_on_prompt, truncation).data.table
    truncation_summary = TruncationSummary(truncation, max_seq_length,
                                           **summary["truncation"])
    reused = not built
    if builder and on_status is not None:
        if summary.get("left_out"):
            on_status(left_out_note(Tally.from_dict(summary["left_out"]), data_path,
                                    source.unit))
        if reused:
            on_status(f"Tokenized data read from the cache ({folder})")
    return TokenizedData(table, summary["records"], summary["with_vision"], truncation_summary,
                         data_fp, reused)


def _wait_for(ready: Path, failed: Path) -> dict:
    while True:
        if ready.is_file():
            return json.loads(ready.read_text())
        if failed.is_file() and failed.stat().st_mtime >= _STARTED - 60:
            raise DataError(failed.read_text())
        time.sleep(0.5)


def _examples(source, folder: Path, *, skip_invalid: bool, image_root: Path | None,
              system_with_images: bool) -> dict:
    """Streams the valid records into folder/examples.arrow (once per data and options)."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    report_path = folder / "examples.json"
    if report_path.is_file():
        return json.loads(report_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({
        "line": datasets.Value("int64"), "system": datasets.Value("string"),
        "roles": datasets.List(datasets.Value("string")),
        "contents": datasets.List(datasets.Value("string")),
        "images": datasets.List(datasets.Value("string")),
        "tools": datasets.Value("string")})  # JSON of the record's tools, or null
    tmp = folder / f".examples.{os.getpid()}.arrow"
    with_vision = 0
    writer = ArrowWriter(features=features, path=str(tmp), writer_batch_size=10_000)

    def write(example: Example) -> None:
        nonlocal with_vision
        with_vision += bool(example.images)
        writer.write({"line": example.line, "system": example.system,
                      "roles": [r for r, _ in example.messages],
                      "contents": [c for _, c in example.messages],
                      "images": [str(p) for p in example.images],
                      "tools": json.dumps(example.tools, ensure_ascii=False)
                      if example.tools else None})

    try:
        report = scan_examples(source, write, image_root=image_root,
                               system_with_images=system_with_images)
        writer.finalize()
        require_valid(report, skip_invalid=skip_invalid)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(tmp, folder / "examples.arrow")
    summary = {"records": report.records_ok, "with_vision": with_vision > 0,
               "skipped": report.records - report.records_ok,
               "left_out": report.invalid.to_dict()}
    write_atomic(report_path, json.dumps(summary))
    return summary


def _encode_batch(batch: dict, tokenizer, max_seq_length: int, train_on_prompt: bool,
                  truncation: str, template) -> dict:
    """`Dataset.map`'s function: a batch of examples -> their ids, labels and counts."""
    examples = [Example(line, system, list(zip(roles, contents)), [Path(p) for p in images],
                        json.loads(tools) if tools else None)
                for line, system, roles, contents, images, tools in zip(
                    batch["line"], batch["system"], batch["roles"], batch["contents"],
                    batch["images"], batch["tools"])]
    out = {name: [] for name in ("input_ids", "labels", "length", "targets", "untruncated",
                                 "response_lost", "kept")}
    for enc in tokenize_records(tokenizer, examples, max_seq_length=max_seq_length,
                                train_on_prompt=train_on_prompt, truncation=truncation,
                                template=template):
        t = enc.tokenized
        out["input_ids"].append(t.input_ids if t else [])
        out["labels"].append(t.labels if t else [])
        out["length"].append(len(t) if t else 0)
        out["targets"].append(sum(x != -100 for x in t.labels[1:]) if t else 0)
        out["untruncated"].append(enc.untruncated)
        out["response_lost"].append(enc.response_lost)
        out["kept"].append(t is not None)
    return out


def _map_options(folder: Path, key: str, tokenizer, num_proc: int, max_seq_length: int,
                 train_on_prompt: bool, truncation: str) -> dict:
    import datasets

    ints = datasets.List(datasets.Value("int32"))
    return dict(
        batched=True, batch_size=1000, num_proc=num_proc if num_proc > 1 else None,
        fn_kwargs={"tokenizer": tokenizer, "max_seq_length": max_seq_length,
                   "train_on_prompt": train_on_prompt, "truncation": truncation,
                   "template": template_of(tokenizer)},
        remove_columns=["system", "roles", "contents", "tools"],
        cache_file_name=str(folder / f"tokenized-{key}.arrow"), new_fingerprint=key,
        load_from_cache_file=True,
        features=datasets.Features({
            "line": datasets.Value("int64"), "images": datasets.List(datasets.Value("string")),
            "input_ids": ints, "labels": ints, "length": datasets.Value("int32"),
            "targets": datasets.Value("int32"), "untruncated": datasets.Value("int32"),
            "response_lost": datasets.Value("int32"), "kept": datasets.Value("bool")}))


def _tokenized(folder: Path, key: str, tokenizer, num_proc: int, max_seq_length: int,
               train_on_prompt: bool, truncation: str):
    """The tokenized data set: `Dataset.map` over the examples, which finds its own cache file
    by name and fingerprint (each of `num_proc` shards) and then only reads it."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    examples = datasets.Dataset.from_file(str(folder / "examples.arrow"))
    return examples.map(_encode_batch, **_map_options(folder, key, tokenizer, num_proc,
                                                      max_seq_length, train_on_prompt,
                                                      truncation))


def _read_tables(folder: Path, files: list[str] | None):
    """The tokenized table from the Arrow files a build recorded, memory-mapped, as `datasets`
    reads its own; None if any is gone (or an older cache recorded none). A cached run then
    needs no `datasets`, whose import was most of a second run's plan (BENCHMARKS.md, "A second
    run's start, old against new")."""
    if not files or not all((folder / name).is_file() for name in files):
        return None
    import pyarrow as pa

    tables = [pa.ipc.open_stream(pa.memory_map(str(folder / name))).read_all() for name in files]
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


def _build(source, folder: Path, key: str, tokenizer, *, num_proc: int, max_seq_length: int,
           train_on_prompt: bool, truncation: str, skip_invalid: bool,
           image_root: Path | None, system_with_images: bool) -> dict:
    import numpy as np

    report = _examples(source, folder, skip_invalid=skip_invalid, image_root=image_root,
                       system_with_images=system_with_images)
    if num_proc <= 0:
        num_proc = 1 if report["records"] < PARALLEL_FROM else min(8, os.cpu_count() or 1)
    ds = _tokenized(folder, key, tokenizer, num_proc, max_seq_length, train_on_prompt,
                    truncation)
    table = ds.data
    kept = table.column("kept").to_numpy()
    lines = table.column("line").to_numpy()
    summary = {
        **report, "num_proc": num_proc,
        "files": [Path(f["filename"]).name for f in ds.cache_files],
        "truncation": {
            "records_over": int((table.column("untruncated").to_numpy() > max_seq_length).sum()),
            "response_tokens_lost": int(table.column("response_lost").to_numpy().sum()),
            "records_dropped": int((~kept).sum()),
            "dropped_lines": lines[np.flatnonzero(~kept)[:100]].tolist()}}
    # the marker the other ranks wait for
    write_atomic(folder / f"tokenized-{key}.json", json.dumps(summary))
    return summary
