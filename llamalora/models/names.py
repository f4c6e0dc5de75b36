"""The built-in short names for `--model` and `--tokenizer`, and the folders they stand for.

Resolving a name imports none of torch, transformers or peft (each builder imports them when it
runs), so `stats --tokenizer smollm2` stays light once the folder is cached.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from llamalora.models.smollm2 import GGUF_MARKER, SMOLLM2, SMOLLM2_MODEL, smollm2_model_dir
from llamalora.models.tiny import TINY_MODEL, tiny_model_dir
from llamalora.models.tiny_qwen2_vl import TINY_QWEN2_VL_MODEL, tiny_qwen2_vl_model_dir

# Each short name's folder, built on first use in `llamalora_home()`.
SHORT_NAMES: dict[str, Callable[[], Path]] = {
    TINY_MODEL: tiny_model_dir,
    SMOLLM2_MODEL: smollm2_model_dir,
    TINY_QWEN2_VL_MODEL: tiny_qwen2_vl_model_dir,
}


def resolve_model(name_or_path: str) -> str:
    """A short name (`tiny`, `smollm2`, ...) -> its cached folder (built on first use); anything
    else unchanged."""
    build = SHORT_NAMES.get(name_or_path)
    return str(build()) if build is not None else name_or_path


def hub_id_of(name_or_path: str) -> str | None:
    """The Hugging Face Hub id a base is known by: a hub id itself, or the checkpoint a short
    name's cached folder was made from (`smollm2`: HuggingFaceTB/SmolLM2-135M-Instruct); None for
    the tiny models and other local folders."""
    if name_or_path == SMOLLM2_MODEL:
        return SMOLLM2.hub_id
    folder = Path(name_or_path).expanduser()
    if not folder.exists():
        parts = name_or_path.split("/")
        hub_like = len(parts) == 2 and all(parts) and not name_or_path.startswith((".", "~"))
        return name_or_path if hub_like else None
    try:
        marker = json.loads((folder / GGUF_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return SMOLLM2.hub_id if marker.get("name") == SMOLLM2_MODEL else None
