"""One place that turns exceptions into an `Error: ...` line on stderr and an exit code."""

from __future__ import annotations

import functools
import os

import typer

from llamalora.cli._console import err
from llamalora.errors import LlamaLoraError

_state = {"debug": bool(os.environ.get("LLAMALORA_DEBUG"))}


def set_debug(on: bool) -> None:
    _state["debug"] = on or bool(os.environ.get("LLAMALORA_DEBUG"))


def report_error(exc: BaseException) -> int:
    """Prints one line for `exc` and returns the exit code to use."""
    if isinstance(exc, LlamaLoraError):
        err.print(f"Error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        err.print("Interrupted.", markup=False)
        return 130
    err.print(f"Error: unexpected {type(exc).__name__}: {exc}. Rerun with --debug for the "
              "traceback, and please report it.", markup=False, highlight=False, soft_wrap=True)
    return 1


def handle_errors(command):
    """Wraps a command so user errors end in one line and an exit code, not a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except (LlamaLoraError, KeyboardInterrupt, Exception) as exc:
            if _state["debug"]:
                raise
            raise typer.Exit(report_error(exc)) from None

    return wrapper


def debug_enabled() -> bool:
    return _state["debug"]
