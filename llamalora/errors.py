"""Errors the core raises. The CLI maps each to one `Error: ...` line and an exit code.

Every message says what went wrong and how to fix it, naming the flag or field.
"""

from __future__ import annotations


class LlamaLoraError(Exception):
    """Base class: a problem the user can fix. `exit_code` is what the CLI returns."""

    exit_code = 1


class UsageError(LlamaLoraError):
    """Unusable input or options: a file that can't be read, a bad flag value."""

    exit_code = 2


class DataError(LlamaLoraError):
    """The data file has invalid records. `problems` holds the validator's findings."""

    def __init__(self, message: str, problems: list | None = None):
        super().__init__(message)
        self.problems = problems or []


class ConfigError(UsageError):
    """A training or generation option is out of range or contradicts another."""


class ModelError(LlamaLoraError):
    """A model, tokenizer or adapter could not be loaded or saved."""


class MissingExtraError(LlamaLoraError):
    """An optional dependency is not installed; the message names the pip command."""


class OutputExistsError(LlamaLoraError):
    """The output folder or file already holds something we would overwrite."""


def first_line(exc: BaseException, *, with_type: bool = True, limit: int | None = None) -> str:
    """What another library's exception says, for a one-line error: the first line of its
    message (a native loader's can run to many), after its type unless `with_type` is False,
    cut to `limit` characters; the type's name alone when the message is empty."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    text = lines[0][:limit] if limit else lines[0]
    return f"{type(exc).__name__}: {text}" if with_type else text
