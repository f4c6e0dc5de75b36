"""Finding a model's tokenizer and chat template: a local folder, the Hugging Face Hub, or the
bundled Llama 3.2 copy.

The bundled copy is Llama 3.2 Vision's tokenizer.json and tokenizer_config.json (128,257 tokens
incl. `<|image|>`, and Meta's chat template), shipped under the Llama 3.2 Community License (see
assets/llama3_2_tokenizer/NOTICE). This module uses the `tokenizers` library only, so `stats` runs
without torch or transformers. Each loaded tokenizer carries its chat template
(`template.template_of`) and is parsed when first used (`FileTokenizer`).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

from llamalora.bundled import BUNDLED_TOKENIZER_DIR, bundled_tokenizer_dir  # noqa: F401
from llamalora.config import DEFAULT_MODEL
from llamalora.errors import ModelError, UsageError, first_line
from llamalora.hub import hub_reachable, unreachable_reason
from llamalora.provenance import sha256_of
from llamalora.models.names import TINY_MODEL, resolve_model
from llamalora.template import ChatTemplate, attach_template, bundled_template, read_template

BUNDLED = "bundled"  # DEFAULT_MODEL and BUNDLED_TOKENIZER_DIR are importable from here too


@dataclass
class TokenizerSource:
    """A loaded tokenizer and where it came from. `fallback_reason` is set when the bundled copy
    stands in for the one asked for."""

    tokenizer: object  # a FileTokenizer (a tokenizers.Tokenizer parsed when first used)
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


class HubUnavailable(OSError):
    """A file that is not in the local cache, with the Hub unreachable (or HF_HUB_OFFLINE)."""


def _hub_tokenizer_file(repo_id: str, filename: str = "tokenizer.json") -> str:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, filename, local_files_only=True)
    except Exception:  # not cached: try the network below
        pass
    if not hub_reachable():
        raise HubUnavailable(unreachable_reason())
    return hf_hub_download(repo_id, filename)


def _hub_failure(name: str, exc: Exception) -> str:
    """What is wrong with a hub id that gave no tokenizer, and what to do, in one line."""
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, \
        RepositoryNotFoundError

    if isinstance(exc, HubUnavailable):
        return (f"{name} is not in the local Hugging Face cache, and {exc}; pass a local model "
                "folder (or `tiny`), or run once where the Hub is reachable so it is cached")
    if isinstance(exc, GatedRepoError):
        return (f"{name} is gated: log in with `hf auth login` and accept its terms on its Hub "
                "page, or pass a local model folder")
    if isinstance(exc, RepositoryNotFoundError):
        return (f"{name} is not on the Hugging Face Hub (or is private): check the id, log in "
                "with `hf auth login`, or pass a local model folder")
    if isinstance(exc, EntryNotFoundError):
        return (f"{name} has no tokenizer.json on the Hub (no fast tokenizer); pass a local "
                "folder holding one")
    return (f"cannot load the tokenizer of {name} ({first_line(exc)}); pass a local folder, or "
            "log in with `hf auth login` for a gated model")


def _hub_template(repo_id: str) -> ChatTemplate | None:
    # Each file is optional: a repo may keep its template in either.
    folder = None
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        try:
            folder = Path(_hub_tokenizer_file(repo_id, name)).parent
        except Exception:  # missing from the repo (or unreachable): the other may do
            pass
    return read_template(folder, f"hub:{repo_id}") if folder is not None else None


def _with_template(tokenizer, template: ChatTemplate | None, where: str):
    """Attaches the template; a Llama 3 vocabulary without one gets the bundled template."""
    if template is None:
        if tokenizer.token_to_id("<|start_header_id|>") is None:
            raise ModelError(f"{where} has no chat template (chat_template in "
                             "tokenizer_config.json, or chat_template.jinja), so the training "
                             "text can't be built; add the template the model was tuned with")
        template = bundled_template()
    attach_template(tokenizer, template)
    return tokenizer


class FileTokenizer:
    """A `tokenizers.Tokenizer` parsed from its tokenizer.json at first use.

    A run whose data is already tokenized needs only the file's digest (the token cache's key)
    and the chat template, and parsing Llama 3's 9 MB file (and serializing it again for a key)
    took most of a second run's plan (BENCHMARKS.md, "The start of a run and a second run").
    Every other attribute is the parsed Tokenizer's.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._parsed = None

    def parsed(self):
        if self._parsed is None:
            from tokenizers import Tokenizer

            try:
                self._parsed = Tokenizer.from_file(str(self.path))
            except Exception as exc:  # the Rust parser's errors are plain Exceptions
                raise ModelError(f"cannot read the tokenizer {self.path} ({exc}); restore or "
                                 "remove it (a hub download is fetched again)") from exc
        return self._parsed

    def digest(self) -> str:
        with self.path.open("rb") as f:
            return sha256_of(f)

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("path", "_parsed"):  # unpickling, half-built
            raise AttributeError(name)
        return getattr(self.parsed(), name)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_parsed": None}  # a worker process parses its own


def tokenizer_digest(tokenizer) -> str:
    """What identifies a tokenizer's vocabulary and rules: its file's digest, or for one built
    in memory its serialization's."""
    if isinstance(tokenizer, FileTokenizer):
        return tokenizer.digest()
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def _bundled():
    # The FileTokenizer parses once, when first used; share one.
    tokenizer = FileTokenizer(bundled_tokenizer_dir() / "tokenizer.json")
    return _with_template(tokenizer, bundled_template(), "the bundled tokenizer")


def load_tokenizer(name: str | None = None) -> TokenizerSource:
    """Loads a fast tokenizer by hub id, local folder, "bundled" (or "tiny"), or another short
    name of `models.names` ("smollm2", ...: its cached folder, made on first use).

    Falls back to the bundled Llama 3.2 tokenizer when a meta-llama Llama 3.x id can't be had
    (offline, gated, not logged in); the reason is returned for the caller to show.

    Raises:
        UsageError: `name` is a path (./x, /x, a/b/c) with nothing there.
        ModelError: The tokenizer can't be loaded and no fallback applies.
    """
    name = name or DEFAULT_MODEL
    if name in (BUNDLED, TINY_MODEL):  # the tiny model's tokenizer is the bundled one
        return TokenizerSource(_bundled(), "bundled Llama 3.2 tokenizer")
    name = resolve_model(name)
    local = Path(name).expanduser()
    if local.exists():
        file = local / "tokenizer.json" if local.is_dir() else local
        if not file.is_file():
            raise ModelError(f"{local} has no tokenizer.json; pass a folder saved with "
                             "save_pretrained, or a hub id")
        tokenizer = FileTokenizer(file)
        return TokenizerSource(_with_template(tokenizer, read_template(file.parent, str(
            file.parent)), str(file.parent)), str(file))
    if _is_path(name):
        raise UsageError(f"{name}: no such folder; pass a folder holding tokenizer.json, a hub "
                         "id (ORG/NAME), or `bundled`")
    try:
        tokenizer = FileTokenizer(_hub_tokenizer_file(name))
    except Exception as exc:
        reason = first_line(exc)
        if not _is_llama3_id(name):
            raise ModelError(_hub_failure(name, exc)) from exc
        bundled = load_tokenizer(BUNDLED)
        bundled.fallback_reason = (f"could not load {name} ({reason}); using the bundled "
                                   "Llama 3.2 tokenizer, which has the same vocabulary")
        return bundled
    return TokenizerSource(_with_template(tokenizer, _hub_template(name), name), f"hub:{name}")


def load_model_tokenizer(model: str):
    """The model's fast tokenizer (tokenizers.Tokenizer) and a note if a fallback stood in."""
    source = load_tokenizer(model)
    return source.tokenizer, source.fallback_reason or ""


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
