"""Where output goes: results to stdout, everything else (progress, warnings, errors) to stderr."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterator

from rich.console import Console

# Rich resolves sys.stdout/sys.stderr at write time, so CliRunner's captured streams work.
out = Console(highlight=False, soft_wrap=False)
err = Console(stderr=True, highlight=False)

# --debug (or LLAMALORA_DEBUG): tracebacks instead of one-line errors, and library chatter left on.
_state = {"debug": bool(os.environ.get("LLAMALORA_DEBUG"))}


def set_debug(on: bool) -> None:
    _state["debug"] = on or bool(os.environ.get("LLAMALORA_DEBUG"))


def debug_enabled() -> bool:
    return _state["debug"]


def print_json(data) -> None:
    """One JSON object to stdout, streamed: objects are indented, and each element of a list of
    objects (validate's problems) is one line from the C encoder. `json.dump(indent=2)` runs
    the pure-Python encoder (twice the time, BENCHMARKS.md, "`--json` output"); Rich's
    print_json re-parses and highlights the text (~25x the memory). A list given as an
    iterator (`ValidationReport.to_dict(lazy=True)`) is written 1,000 items at a time, never
    held whole."""
    _write_json(data, sys.stdout.write, "")
    sys.stdout.write("\n")
    sys.stdout.flush()


# One encoder for every item: json.dumps with options builds a new one per call.
_encode = json.JSONEncoder(ensure_ascii=False, default=str).encode


def _write_json(value, write, indent: str) -> None:
    inner = indent + "  "
    if isinstance(value, dict):
        if not value:
            write("{}")
            return
        write("{")
        for i, (key, item) in enumerate(value.items()):
            write(("," if i else "") + "\n" + inner + _encode(str(key)) + ": ")
            _write_json(item, write, inner)
        write("\n" + indent + "}")
    elif isinstance(value, (list, tuple)) and not any(isinstance(v, (dict, list))
                                                      for v in value):
        write(_encode(value))  # numbers, lines: on one line
    elif isinstance(value, (list, tuple)) or hasattr(value, "__next__"):
        sep, items, first = ",\n" + inner, iter(value), True
        while chunk := [_encode(item) for item in itertools.islice(items, 1000)]:
            write(("[\n" + inner if first else sep) + sep.join(chunk))
            first = False
        write("[]" if first else "\n" + indent + "]")
    else:
        write(_encode(value))


def warn(message: str) -> None:
    err.print(f"[yellow]Warning:[/] {message}", markup=True)


def info(message: str) -> None:
    err.print(message, markup=False)


@contextlib.contextmanager
def spinner(text: str) -> Iterator[Callable[[str], None]]:
    """A transient spinner on stderr while something loads; silent when stderr is no terminal.

    Yields a function that replaces the spinner's text.
    """
    if not err.is_terminal or os.environ.get("LLAMALORA_QUIET"):
        yield lambda _text: None
        return
    with err.status(text) as status:
        yield lambda new: status.update(new)


def progress_bar(label: str):
    """A Rich progress bar on stderr (done/total, elapsed, time left), off when stderr is no
    terminal or LLAMALORA_QUIET is set. Use as a context manager; `add_task` and `update` as
    Rich's."""
    from rich.progress import (BarColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn(f"[bold]{label}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"),
                    TextColumn("{task.description}"), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=err,
                    disable=not err.is_terminal or bool(os.environ.get("LLAMALORA_QUIET")))


def quiet_libraries() -> None:
    """Keeps transformers/bitsandbytes chatter (load bars, deprecation notes) off stderr, so what
    remains there is ours. `--debug` leaves them on."""
    import logging
    import warnings

    if debug_enabled():
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning,
                            module=r"(transformers|peft|torch|bitsandbytes)")
    for name in ("bitsandbytes", "transformers", "peft", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
