"""llamalora: check, train and talk to LoRA fine-tunes of Llama 3.2 (11B Vision) on an 8-bit base."""

__version__ = "0.1.0"
