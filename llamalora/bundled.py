"""The files shipped inside the package: Llama 3.2's tokenizer folder (its vocabulary, Meta's
chat template and the license notice that travels with them).

A module of its own, below the tokenizer, the templates and the tiny model, which all read it.
"""

from __future__ import annotations

from pathlib import Path

from llamalora.errors import ModelError

BUNDLED_TOKENIZER_DIR = Path(__file__).parent / "assets" / "llama3_2_tokenizer"


def bundled_tokenizer_dir() -> Path:
    """The folder holding the bundled tokenizer files (loadable with AutoTokenizer)."""
    if not (BUNDLED_TOKENIZER_DIR / "tokenizer.json").is_file():
        raise ModelError(f"the bundled tokenizer is missing from {BUNDLED_TOKENIZER_DIR}; "
                         "reinstall llamalora")
    return BUNDLED_TOKENIZER_DIR
