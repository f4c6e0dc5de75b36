"""Tables through `datasets`: parquet, CSV and Arrow files, dataset folders (Hub-style or
`save_to_disk`) and Hub dataset ids, whose problems name the row. `datasets` is imported only
here, when such a source is read: `validate` and `stats` on JSON must start fast."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from llamalora.data.readers import Item
from llamalora.errors import UsageError, first_line
from llamalora.hub import hub_offline, hub_reachable, unreachable_reason

# Table files read through `datasets` (its builder name, options).
TABLE_FILES = {".parquet": ("parquet", {}), ".csv": ("csv", {}),
               ".tsv": ("csv", {"delimiter": "\t"}), ".arrow": ("arrow", {})}


def _load(path: Path | None, name: str, split: str):
    import datasets

    if path is not None and path.is_file():
        builder, options = TABLE_FILES[path.suffix.lower()]
        return datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    if path is not None and ((path / "state.json").is_file()
                             or (path / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(str(path))  # a `save_to_disk` folder
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"Unknown split {split!r}; it has {list(ds)}")
            ds = ds[split]
        return ds
    if path is None and not hub_offline() and not hub_reachable():
        raise UsageError(f"cannot load the Hub dataset {name}: {unreachable_reason()}; pass a "
                         "local file or folder, or set HF_HUB_OFFLINE=1 to read the copy an "
                         "earlier run cached")
    return datasets.load_dataset(str(path or name), split=split)


def load_table(name: str, path: Path | None, split: str):
    """The rows as a `datasets.Dataset` (memory-mapped from its cache).

    Raises:
        UsageError: It can't be read, has no such split, or holds embedded images.
    """
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    datasets.disable_progress_bars()  # its bars would mix with our output on stderr
    datasets.logging.set_verbosity_error()
    what = (name if path is not None and path.is_file() else
            f"the dataset folder {name}" if path is not None else name)
    try:
        ds = _load(path, name, split)
    except UsageError:
        raise
    except ValueError as exc:
        reason = first_line(exc, with_type=False, limit=300)
        if "split" in str(exc).lower():
            raise UsageError(f"--split {split}: {name} has no such split ({reason})") from exc
        raise UsageError(f"cannot read {what}: {reason}") from exc
    except (DatasetNotFoundError, ConnectionError, FileNotFoundError) as exc:
        reason = first_line(exc, with_type=False, limit=300)
        if path is not None:
            raise UsageError(f"cannot read {what}: {reason}") from exc
        raise UsageError(f"cannot load the Hub dataset {name} ({reason}); if it "
                         "is gated, log in with `hf auth login` and accept its terms on its Hub "
                         "page; offline, pass a local file or folder (a dataset used once before "
                         "loads from the cache with HF_DATASETS_OFFLINE=1)") from exc
    except Exception as exc:  # pyarrow and the CSV reader raise many types for a bad file
        raise UsageError(f"cannot read {what}: {first_line(exc, limit=300)}") from exc
    # Embedded media (datasets' Image/Video features, alone or in a list) have no path to give.
    embedded = [n for n, f in ds.features.items() if re.search(r"\b(Image|Video)\(", repr(f))]
    if embedded:
        raise UsageError(f"{name}: column `{embedded[0]}` holds embedded images or videos "
                         "(a datasets Image/Video column); llamalora reads images from files: "
                         "save them and give their paths in `image` / `images`")
    return ds


def _drop_nulls(value):
    """A table row as the record it stands for: a null cell (a column this row lacks, or a
    struct field another row has) is no field at all."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def iter_rows(ds, batch: int = 1000) -> Iterator[Item]:
    """The rows of a `datasets.Dataset`, numbered from 1, a thousand at a time."""
    dumps = json.dumps
    for start in range(0, len(ds), batch):
        columns = ds[start:start + batch]
        names = list(columns)
        for i, values in enumerate(zip(*columns.values())):
            row = _drop_nulls(dict(zip(names, values)))
            yield start + i + 1, row, dumps(row, sort_keys=True, ensure_ascii=False,
                                            default=str), None
