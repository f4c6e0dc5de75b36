"""The `llamalora` Typer app: registers one command per file and maps errors in `main()`."""

from __future__ import annotations

from typing import Annotated

import typer

from llamalora import __version__
from llamalora.cli import chat as chat_cmd
from llamalora.cli import eval as eval_cmd
from llamalora.cli import export_adapter as export_cmd
from llamalora.cli import serve as serve_cmd
from llamalora.cli import stats as stats_cmd
from llamalora.cli import train as train_cmd
from llamalora.cli import validate as validate_cmd
from llamalora.cli._console import set_debug
from llamalora.cli._errors import report_error

app = typer.Typer(
    name="llamalora",
    help="Check data, train LoRA adapters on an 8-bit Llama 3.2 (11B Vision) base, evaluate "
         "them, chat and serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain Click help: the old script's underscore aliases make option names too wide for
    # Rich's boxed tables.
    rich_markup_mode=None,
)
app.command(epilog=validate_cmd.EXAMPLES)(validate_cmd.validate)
app.command(epilog=stats_cmd.EXAMPLES)(stats_cmd.stats)
app.command(epilog=train_cmd.EXAMPLES)(train_cmd.train)
app.command("export-adapter", epilog=export_cmd.EXAMPLES)(export_cmd.export_adapter)
app.command(epilog=chat_cmd.EXAMPLES)(chat_cmd.chat)
app.command("eval", epilog=eval_cmd.EXAMPLES)(eval_cmd.eval_command)
app.command(epilog=serve_cmd.EXAMPLES)(serve_cmd.serve)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llamalora {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    set_debug(debug)


def main() -> None:
    """Console-script entry point; errors that escape a command still end in one line."""
    try:
        app()
    except Exception as exc:  # commands map their own; this catches import-time failures
        raise SystemExit(report_error(exc)) from None
