"""Exporting a run (`llamalora export-adapter`): a clean PEFT adapter folder, a merged standalone
model, or a bare state dict; for a Llama-architecture model also a GGUF file, and for a
text-trained Llama 3.2 Vision run its language model as a plain Llama.

One module per part: `exporter` (the command's core), `source` (what is read, and the model
family facts), `target` (where it may write), `adapter`, `merge`, `llama` (the Mllama -> Llama
conversion), `gguf_file`, `card`, and `verify`, the one check every export passes.
"""

from llamalora.export.exporter import export_adapter
from llamalora.export.result import ExportResult

__all__ = ["ExportResult", "export_adapter"]
