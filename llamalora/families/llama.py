"""Llama (`LlamaForCausalLM`: Llama 3.x, SmolLM2): text only, every fast path, and the one
architecture `export-adapter --gguf` writes (llama.cpp's `llama`)."""

from __future__ import annotations

from llamalora.families.base import Family

LLAMA = Family(name="Llama", model_types=("llama",))
