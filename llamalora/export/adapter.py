"""The adapter alone: a PEFT folder that plain `PeftModel.from_pretrained` loads, or a bare state
dict (`torch.save`)."""

from __future__ import annotations

import json
import shutil

from llamalora.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, apply_adapter
from llamalora.errors import ModelError
from llamalora.events import Status
from llamalora.export.card import write_adapter_card
from llamalora.export.source import ExportSource
from llamalora.export.result import ExportResult
from llamalora.export.target import Target, Targets
from llamalora.export.verify import DTYPES, TOLERANCE, Check, probe_for, probe_logits, verify

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "preprocessor_config.json", "processor_config.json")


def write_adapter(source: ExportSource, targets: Targets, *, dtype: str, gguf_type: str,
                  check: bool, emit) -> ExportResult:
    """The PEFT folder: weights, config naming the base as the Hub knows it, the run's tokenizer
    files, and a model card; checked with plain peft against the run's adapter."""
    from safetensors.torch import save_file

    folder = targets.folder
    save_file(source.adapter_weights_for_peft(), str(folder.staging / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    config = json.loads((source.info.folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = source.base_name
    (folder.staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True),
                                                 encoding="utf-8")
    run_dir = source.info.run_dir
    for name in TOKENIZER_FILES:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, folder.staging / name)
    write_adapter_card(folder.staging, source)
    result = ExportResult(folder.path, "adapter")
    if check:
        emit(Status("Checking the export: plain peft vs the run's adapter"))
        got = _verify_adapter(source, folder, dtype)
        result.max_logit_diff, result.tolerance = got.max_logit_diff, got.tolerance
        result.logit_scale = got.logit_scale
    return result


def _verify_adapter(source: ExportSource, folder: Target, dtype: str) -> Check:
    from llamalora.quant import preload

    preload()  # before peft, which imports bitsandbytes
    from peft import PeftModel

    base, device = source.load_base(DTYPES[dtype], source.trained_with_vision)
    reference = apply_adapter(base, source.info.folder)
    probe = probe_for(source.tokenizer, device)
    expected = probe_logits(reference, probe)
    base = reference.unload()  # the same base weights, adapter removed
    return verify("the exported adapter", lambda: PeftModel.from_pretrained(
        base, str(folder.staging)), expected, probe, share=TOLERANCE[dtype])


def write_state_dict(source: ExportSource, targets: Targets, *, dtype: str, gguf_type: str,
                     check: bool, emit) -> ExportResult:
    """The adapter's weights as one `torch.save` file, always read back equal."""
    import torch

    target = targets.state_dict
    weights = source.adapter_weights()
    torch.save(weights, target.staging)
    loaded = torch.load(target.staging, weights_only=True)
    if loaded.keys() != weights.keys() or not all(torch.equal(loaded[k], weights[k])
                                                  for k in weights):
        raise ModelError(f"{target.path} did not read back equal to the adapter")
    return ExportResult(target.path, "state_dict", max_logit_diff=0.0, tolerance=0.0)
