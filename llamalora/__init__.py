"""llamalora: check data, train LoRA on an 8-bit Llama 3.2 (11B Vision) base, and chat."""

__version__ = "0.1.0"
