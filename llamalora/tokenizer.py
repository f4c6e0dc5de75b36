"""Finding the Llama 3.2 tokenizer: a local folder, the Hugging Face Hub, or the bundled copy.

The bundled copy is Llama 3.2 Vision's tokenizer.json and tokenizer_config.json (128,257 tokens incl.
`<|image|>`), shipped under the Llama 3.2 Community License (see assets/llama3_2_tokenizer/NOTICE).
This module uses the `tokenizers` library only, so `stats` runs without torch or transformers.
"""

from __future__ import annotations

import functools
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from llamalora.errors import ModelError, UsageError

DEFAULT_MODEL = "meta-llama/Llama-3.2-11B-Vision-Instruct"
BUNDLED_TOKENIZER_DIR = Path(__file__).parent / "assets" / "llama3_2_tokenizer"
BUNDLED = "bundled"


@dataclass
class TokenizerSource:
    """A loaded tokenizer and where it came from. `fallback_reason` is set when the bundled copy
    stands in for the one asked for."""

    tokenizer: object  # tokenizers.Tokenizer
    source: str
    fallback_reason: str | None = None


def _is_llama3_id(name: str) -> bool:
    # The bundled vocabulary equals every Llama 3.x tokenizer's; any other model's would differ,
    # so only these may fall back to it.
    lowered = name.lower()
    return lowered.startswith("meta-llama/") and "llama-3" in lowered


def _is_path(name: str) -> bool:
    """A name only a path can be (a hub id is NAME or ORG/NAME)."""
    return (name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1
            or name.endswith("/"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    # huggingface_hub retries a failed request for ~25 s; a quick connect tells us first.
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_tokenizer_file(repo_id: str) -> str:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, "tokenizer.json", local_files_only=True)
    except Exception:  # not cached: try the network below
        pass
    if not _hub_reachable():
        raise OSError("the Hugging Face Hub is unreachable (offline?)")
    return hf_hub_download(repo_id, "tokenizer.json")


@functools.lru_cache(maxsize=1)
def _bundled():
    # Parsing the 9 MB tokenizer.json takes ~0.3 s; the Tokenizer is immutable, so share one.
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(bundled_tokenizer_dir() / "tokenizer.json"))


def load_tokenizer(name: str | None = None) -> TokenizerSource:
    """Loads a fast tokenizer by hub id, local folder, or "bundled".

    Falls back to the bundled Llama 3.2 tokenizer when a meta-llama Llama 3.x id can't be had
    (offline, gated, not logged in); the reason is returned for the caller to show.

    Raises:
        UsageError: `name` is a path (./x, /x, a/b/c) with nothing there.
        ModelError: The tokenizer can't be loaded and no fallback applies.
    """
    from tokenizers import Tokenizer

    name = name or DEFAULT_MODEL
    if name in (BUNDLED, "tiny"):
        return TokenizerSource(_bundled(), "bundled Llama 3.2 tokenizer")
    local = Path(name).expanduser()
    if local.exists():
        file = local / "tokenizer.json" if local.is_dir() else local
        if not file.is_file():
            raise ModelError(f"{local} has no tokenizer.json; pass a folder saved with "
                             "save_pretrained, or a hub id")
        return TokenizerSource(Tokenizer.from_file(str(file)), str(file))
    if _is_path(name):
        raise UsageError(f"{name}: no such folder; pass a folder holding tokenizer.json, a hub "
                         "id (ORG/NAME), or `bundled`")
    try:
        return TokenizerSource(Tokenizer.from_file(_hub_tokenizer_file(name)), f"hub:{name}")
    except Exception as exc:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
        if not _is_llama3_id(name):
            raise ModelError(f"cannot load the tokenizer {name!r} ({reason}); pass a local "
                             "folder, or log in with `hf auth login` for a gated model") from exc
        bundled = load_tokenizer(BUNDLED)
        bundled.fallback_reason = (f"could not load {name} ({reason}); using the bundled "
                                   "Llama 3.2 tokenizer, which has the same vocabulary")
        return bundled


def load_model_tokenizer(model: str):
    """The model's fast tokenizer (tokenizers.Tokenizer) and a note if a fallback stood in."""
    source = load_tokenizer(model)
    return source.tokenizer, source.fallback_reason or ""


def bundled_tokenizer_dir() -> Path:
    """The folder holding the bundled tokenizer files (loadable with AutoTokenizer)."""
    if not (BUNDLED_TOKENIZER_DIR / "tokenizer.json").is_file():
        raise ModelError(f"the bundled tokenizer is missing from {BUNDLED_TOKENIZER_DIR}; "
                         "reinstall llamalora")
    return BUNDLED_TOKENIZER_DIR


def encode_segments(tokenizer, segment_lists: list[list[tuple[str, bool]]], *,
                    lengths_only: bool = False) -> list[list[tuple[list[int] | int, bool]]]:
    """Tokenizes each segment on its own, in one batch, and regroups them per conversation.

    This is the tokenization contract shared by stats, train and chat: special tokens in the
    template are parsed, nothing is added (the template holds `<|begin_of_text|>` itself).
    With `lengths_only`, each segment's token count stands in for its ids (what stats needs;
    it skips building 40,000 Python lists per 20,000 records).
    """
    flat = [text for segments in segment_lists for text, _ in segments]
    encodings = tokenizer.encode_batch_fast(flat, add_special_tokens=False)
    out, i = [], 0
    for segments in segment_lists:
        out.append([(len(encodings[i + k]) if lengths_only else encodings[i + k].ids, is_resp)
                    for k, (_, is_resp) in enumerate(segments)])
        i += len(segments)
    return out
