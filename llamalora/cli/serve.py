"""`llamalora serve`: an OpenAI-compatible HTTP server for trained adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llamalora.cli._console import info, quiet_libraries, spinner
from llamalora.cli._errors import handle_errors
from llamalora.cli._options import BaseModelOpt, InferenceQuantOpt, KernelsOpt
from llamalora.config import KERNEL_CHOICES, QUANT_CHOICES, check_choice
from llamalora.data import image_root_folder
from llamalora.errors import MissingExtraError

EXAMPLES = """Examples:

  llamalora serve runs/demo

  llamalora serve glossary=runs/demo legal=runs/legal --port 8000

  llamalora serve runs/demo --host 0.0.0.0 --api-key "$(openssl rand -hex 16)"

Then: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything") and
model="demo" (an adapter's name) or model="base" (the adapter switched off).
"""


@handle_errors
def serve(
    runs: Annotated[list[str], typer.Argument(
        help="Run folders or exported adapters of one base model, each as PATH or NAME=PATH "
             "(the name requests give as `model`; default: the folder's name).",
        show_default=False)],
    host: Annotated[str, typer.Option(
        "--host", help="Address to listen on; beyond loopback it needs --api-key.")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port.")] = 8000,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="LLAMALORA_API_KEY",
        help="Require `Authorization: Bearer KEY` on /v1/ (or set LLAMALORA_API_KEY).",
        show_default=False)] = None,
    model: BaseModelOpt = None,
    quant: InferenceQuantOpt = None,
    kernels: KernelsOpt = "auto",
    image_root: Annotated[Path | None, typer.Option(
        "--image-root", help="Let requests name local images inside this folder (otherwise "
                             "only data: URLs).", show_default=False)] = None,
    max_tokens: Annotated[int, typer.Option(
        "--max-tokens", min=1, help="The most max_tokens a request may ask for.")] = 2048,
    max_context: Annotated[int, typer.Option(
        "--max-context", min=16, help="The most prompt + max_tokens tokens of a request.")
                           ] = 8192,
    max_queue: Annotated[int, typer.Option(
        "--max-queue", min=0, help="Requests that may wait behind the one generating; more get "
                                   "503 with Retry-After.")] = 16,
    max_request_mb: Annotated[float, typer.Option(
        "--max-request-mb", min=0.001, help="Largest request body in MiB (images included).")
                              ] = 8.0,
) -> None:
    """Serve adapters over an OpenAI-compatible API (/v1/chat/completions, /v1/models)."""
    if quant is not None:
        check_choice("quant", quant, QUANT_CHOICES)
    check_choice("kernels", kernels, KERNEL_CHOICES)
    if image_root is not None:
        image_root = image_root_folder(image_root)
    from llamalora.serve import Limits, check_host, create_app, open_engine

    check_host(host, api_key)
    try:  # before the model loads: a missing extra fails in a second, not after a minute
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise MissingExtraError("serve needs FastAPI and uvicorn: pip install "
                                "'llamalora[serve]'") from exc
    limits = Limits(max_request_bytes=int(max_request_mb * 2**20), max_tokens=max_tokens,
                    max_context=max_context,
                    max_queue=max_queue)
    quiet_libraries()
    with spinner("Loading the model"):
        engine = open_engine(runs, model=model, quant=quant, kernels=kernels,
                             image_root=image_root)
        app = create_app(engine, api_key=api_key, limits=limits)
    s = engine.session
    info(f"Model: {s.base_model} ({s.quant}, kernels: {s.kernels}, decoding: {s.decoding}); "
         f"models: {', '.join(engine.models)}")
    shown = f"[{host}]" if ":" in host else host
    info(f"OpenAI-compatible API at http://{shown}:{port}/v1"
         + (" (API key required)" if api_key else ""))
    uvicorn.run(app, host=host, port=port, log_level="info")
