"""`llamalora chat`: talk to a trained adapter, interactively or one prompt at a time."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from llamalora.cli._console import err, info, out, quiet_libraries, spinner
from llamalora.cli._errors import handle_errors
from llamalora.cli._options import BaseModelOpt, InferenceQuantOpt, KernelsOpt
from llamalora.config import KERNEL_CHOICES, QUANT_CHOICES, check_choice
from llamalora.data import image_root_folder, resolve_image
from llamalora.errors import UsageError

EXAMPLES = """Examples:

  llamalora chat --adapter runs/demo

  llamalora chat --adapter out/ --prompt "거푸집이란?" --temperature 0

  echo "Define rebar." | llamalora chat --adapter out/ --prompt -

  llamalora chat --adapter out/ --image photo.jpg --prompt "What is on this site?"

In the interactive chat: /image PATH, /system TEXT, /reset, /exit (or Ctrl-D).
"""

HELP = "Commands: /image PATH (attach to the next message), /system TEXT, /reset, /exit"


@handle_errors
def chat(
    adapter: Annotated[Path | None, typer.Option(
        "--adapter", help="Run folder, checkpoint, or exported adapter.",
        show_default=False)] = None,
    model: BaseModelOpt = None,
    prompt: Annotated[str | None, typer.Option(
        "--prompt", help="Answer this one prompt and exit ('-' reads it from stdin).",
        show_default=False)] = None,
    image: Annotated[Path | None, typer.Option(
        "--image", help="An image for the (first) prompt; loads the vision model.",
        show_default=False)] = None,
    system: Annotated[str | None, typer.Option(
        "--system", help="System message (none by default, as in training).",
        show_default=False)] = None,
    max_new_tokens: Annotated[int, typer.Option(
        "--max-new-tokens", min=1, help="Most tokens to generate per answer.")] = 512,
    temperature: Annotated[float, typer.Option(
        "--temperature", min=0.0,
        help="Sampling temperature; 0 is greedy and deterministic.")] = 0.7,
    top_p: Annotated[float, typer.Option(
        "--top-p", min=0.0, max=1.0, help="Nucleus sampling: keep the smallest set of tokens "
                                          "with this much probability.")] = 0.9,
    quant: InferenceQuantOpt = None,
    no_adapter: Annotated[bool, typer.Option(
        "--no-adapter", help="Answer with the base model alone, for comparison.")] = False,
    kernels: KernelsOpt = "auto",
    verbose: Annotated[bool, typer.Option(
        "--verbose", help="Show time to first token and decode speed after each answer.")] = False,
    image_root: Annotated[Path | None, typer.Option(
        "--image-root", help="Folder that relative --image and /image paths start from "
                             "(default: the current folder).", show_default=False)] = None,
) -> None:
    """Chat with a fine-tuned model (base model + LoRA adapter)."""
    if adapter is None and (model is None or not no_adapter):
        raise UsageError("pass --adapter DIR (a train --output-dir), or --model M --no-adapter")
    if quant is not None:
        check_choice("quant", quant, QUANT_CHOICES)
    check_choice("kernels", kernels, KERNEL_CHOICES)
    root = _image_root(image_root)
    if image is not None:
        image = resolve_image(image, root)
    if prompt == "-":
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise UsageError("--prompt - read nothing from stdin")
    quiet_libraries()
    from llamalora.chat import GenerationOptions, open_chat

    options = GenerationOptions(max_new_tokens, temperature, top_p)
    interactive = prompt is None
    with spinner("Loading the model"):
        session = open_chat(adapter, model=model, quant=quant, no_adapter=no_adapter,
                            with_vision=image is not None or interactive, system=system,
                            kernels=kernels)
    info(f"Model: {session.base_model} ({session.quant}, kernels: {session.kernels}, "
         f"decoding: {session.decoding})"
         + (f" + adapter {session.adapter.folder}" if session.adapter else " (no adapter)"))
    if not interactive:
        reply = session.ask(prompt, image=image, options=options,
                            on_text=lambda t: out.print(t, end="", markup=False))
        out.print(markup=False)
        _stats(reply, verbose)
        return
    _repl(session, options, image, verbose, root)


def _image_root(image_root: Path | None) -> Path:
    """Where relative --image and /image paths start: --image-root, else the current folder."""
    return Path.cwd() if image_root is None else image_root_folder(image_root)


def _stats(reply, verbose: bool) -> None:
    if verbose:
        err.print(f"[{reply.new_tokens} tokens, first after {reply.first_token_s:.2f} s, "
                  f"{reply.decode_tokens_per_s:.1f} tokens/s]", markup=False)


def _repl(session, options, image: Path | None, verbose: bool, root: Path) -> None:
    info(HELP)
    pending_image = image
    while True:
        try:
            err.print("> ", end="", markup=False)
            line = input()
        except (EOFError, KeyboardInterrupt):
            err.print(markup=False)
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            session.reset()
            info("(history cleared)")
            continue
        if text.startswith("/system"):
            session.system = text[len("/system"):].strip() or None
            info(f"(system message {'set' if session.system else 'cleared'})")
            continue
        if text.startswith("/image"):
            path = resolve_image(Path(text[len("/image"):].strip()).expanduser(), root)
            if not path.is_file():
                err.print(f"Error: image not found: {path}", markup=False)
                continue
            pending_image = path
            info(f"(image {path} goes with your next message)")
            continue
        if text.startswith("/"):
            info(f"unknown command {text.split()[0]}; {HELP}")
            continue
        try:
            reply = session.ask(text, image=pending_image, options=options,
                                on_text=lambda t: out.print(t, end="", markup=False))
        except KeyboardInterrupt:
            out.print(markup=False)
            info("(answer stopped)")
            continue
        pending_image = None
        out.print(markup=False)
        _stats(reply, verbose)
