"""One place that turns exceptions into an `Error: ...` line on stderr and an exit code."""

from __future__ import annotations

import functools

import typer

from llamalora.cli._console import debug_enabled, err
from llamalora.errors import LlamaLoraError

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
            if debug_enabled():
                raise
            raise typer.Exit(report_error(exc)) from None

    return wrapper
