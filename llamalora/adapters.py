"""Reading run folders and putting their LoRA adapters onto a base model.

Where a family's text-only and vision classes name the same decoder layers differently (Mllama:
`model.layers.*` and `model.language_model.layers.*`), `apply_adapter` renames the adapter's
keys to whichever class it is put on (`Family.adapter_keys`), and it refuses to go on if any LoRA
weight stays unloaded (plain peft would only warn and leave the adapter at zero).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llamalora.errors import ModelError, UsageError
from llamalora.families import family_of_model
from llamalora.quant import preload
from llamalora.rundir import CHECKPOINTS, RUN_MARKER, STATE, last_checkpoint

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# Written last into every folder export-adapter makes: what it wrote, and the base as llamalora
# loads it (adapter_config.json names the base as the Hub knows it, which may not be here).
EXPORT_MARKER = "llamalora_export.json"


@dataclass
class AdapterInfo:
    """Where an adapter lives and what it was trained on."""

    folder: Path  # the folder holding adapter_model.safetensors
    run_dir: Path  # the run it belongs to (itself for a finished run or an export)
    base_model: str
    quant: str | None  # None when the run's record is gone (a bare adapter folder)
    run: dict  # llamalora.json, or {} for a bare adapter


def find_adapter(path: str | Path) -> AdapterInfo:
    """Accepts a finished run, a checkpoint inside one, an exported adapter, or a run with only
    checkpoints (the newest is used).

    Raises:
        UsageError: No adapter there.
    """
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"{path} is not a folder; pass a run folder (train --output-dir) or an "
                         "exported adapter")
    if (path / RUN_MARKER).is_file() or (
            (path / ADAPTER_WEIGHTS).is_file() and not (path / CHECKPOINTS).is_dir()):
        folder = path  # a finished run, an export, or one checkpoint
    else:
        # A run without its finished-run marker was interrupted, maybe mid-save: only its
        # complete checkpoints are trusted.
        folder = last_checkpoint(path)
        if folder is None:
            raise UsageError(f"{path} holds no finished run, adapter, or complete checkpoint; "
                             "pass a train --output-dir or an exported adapter")
    run_dir = folder.parent.parent if folder.parent.name == "checkpoints" else folder
    run = {}
    if (run_dir / RUN_MARKER).is_file():
        run = json.loads((run_dir / RUN_MARKER).read_text(encoding="utf-8"))
    elif folder != run_dir and (folder / STATE).is_file():
        run = json.loads((folder / STATE).read_text(encoding="utf-8"))
    cfg = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    base = cfg.get("base_model_name_or_path") or ""
    if (folder / EXPORT_MARKER).is_file():  # the copy it was trained on, where it is here
        local = json.loads((folder / EXPORT_MARKER).read_text(encoding="utf-8")).get(
            "base_model_local")
        base = local if local and Path(local).exists() else base
    quant = run.get("quant") or run.get("config", {}).get("quant")
    return AdapterInfo(folder, run_dir, base, quant, run)


def apply_adapter(model, folder: Path, name: str = "default"):
    """Wraps `model` with the adapter in `folder` (LoRA weights loaded, inference mode); a
    model that is a PeftModel already gets it as one more adapter, `name`, beside its others
    (peft's `set_adapter` switches between them).

    Raises:
        ModelError: The adapter does not fit this model.
    """
    preload()  # before peft, which imports bitsandbytes
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = LoraConfig.from_pretrained(str(folder))
    config.inference_mode = True
    if isinstance(model, PeftModel):
        peft_model = model
        peft_model.add_adapter(name, config)
    else:
        peft_model = get_peft_model(model, config, adapter_name=name)
    family = family_of_model(model)
    state = family.adapter_keys(load_file(str(folder / ADAPTER_WEIGHTS)),
                                to_vision=family.loaded_with_vision(peft_model))
    result = set_peft_model_state_dict(peft_model, state, adapter_name=name)
    expected = {n for n, _ in peft_model.named_parameters() if "lora_" in n and f".{name}." in n}
    missing = [k for k in result.missing_keys if k in expected]
    if result.unexpected_keys or missing:
        bad = (result.unexpected_keys or missing)[:2]
        raise ModelError(f"the adapter in {folder} does not fit this base model (e.g. {bad}); "
                         "pass the --model it was trained on")
    peft_model.eval()
    return peft_model
