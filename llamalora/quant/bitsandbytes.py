"""bitsandbytes: `--quant 8bit` (LLM.int8) and `--quant 4bit` (NF4 with double quantization).

Everything here imports bitsandbytes (and torch) inside the functions that need them: `quant`'s
interface is read by the plan and the CLI, which must stay light.
"""

from __future__ import annotations

import contextlib
import functools

from llamalora.errors import MissingExtraError, ModelError, first_line

NAME = "bitsandbytes"
QUANTS = ("8bit", "4bit")
INSTALL_HINT = "pip install bitsandbytes (or pass --quant none)"
# Bytes per base weight of a quantized linear layer, scales included: int8 with an fp32 scale per
# row of 4,096; NF4 with its 64-weight blocks' 8-bit scales (double quantization) and their fp32
# scale per 256 blocks.
BYTES_PER_WEIGHT = {"8bit": 1.0 + 4 / 4096, "4bit": 0.5 + 0.0625 + 4 / 4096}
# Activation memory of a step through bitsandbytes' own layers (`--kernels plain`), against
# llamalora's kernels: LLM.int8 keeps int8 copies and outlier columns of each input for
# backward, measured at ~2.5x the bf16 activations of the step.
PLAIN_ACTIVATION_FACTOR = {"8bit": 2.5, "4bit": 1.0}


def is_quantized_layer(module) -> bool:
    """A bitsandbytes layer (they subclass nn.Linear; matched by module name, so that asking
    imports nothing)."""
    return type(module).__module__.startswith("bitsandbytes")


def check_packages(quant: str) -> None:
    """Imports bitsandbytes, so that a missing or broken install fails before any work.

    Raises:
        MissingExtraError: bitsandbytes is not installed.
        ModelError: It is installed but can't be imported (no backend for this machine).
    """
    try:
        import_bitsandbytes()  # transformers needs it; fail early with a clear fix
    except ImportError as exc:
        raise MissingExtraError(f"--quant {quant} needs bitsandbytes: {INSTALL_HINT}") from exc
    except Exception as exc:  # installed but broken (no usable backend for this machine)
        raise ModelError(f"bitsandbytes could not be imported ({first_line(exc)}); reinstall "
                         "it or pass --quant none") from exc


def quantization_config(quant: str, dtype, keep: list[str]):
    """transformers' `BitsAndBytesConfig` for `quant`, leaving the modules named in `keep`
    unquantized (transformers 5 matches each from the start of a module's name, or as a
    suffix)."""
    from transformers import BitsAndBytesConfig

    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
                              llm_int8_skip_modules=keep)


def loading(quant: str):
    """The context a `from_pretrained` of `quant` runs in (`_int8_where_loaded` for 8bit)."""
    return _int8_where_loaded() if quant == "8bit" else contextlib.nullcontext()


@contextlib.contextmanager
def _int8_where_loaded():
    """8-bit weights quantized on the device they were loaded to.

    transformers (5.17 to 5.24) moves each weight it loaded onto the GPU back to the CPU, because
    bitsandbytes' `Int8Params` quantizes only when moved off the CPU, which then converts it to
    fp16 there and copies it over again: 19.1 of the 21.8 s an 8-bit load of the 11B took
    (BENCHMARKS.md, "`llamalora train` at the default flags"). Here each weight gets the same
    two steps bitsandbytes takes (fp16, then `int8_vectorwise_quant`) where it already is; the
    int8 values and scales are the same (tested). A transformers without this conversion class
    loads as it always did.
    """
    try:
        import bitsandbytes as bnb
        import torch
        from transformers.integrations import bitsandbytes as hf_bnb
        from transformers.quantizers.quantizers_utils import get_module_from_name
    except ImportError:
        yield
        return
    quantize = getattr(hf_bnb, "Bnb8bitQuantize", None)
    if quantize is None or not hasattr(bnb.functional, "int8_vectorwise_quant"):
        yield
        return
    stock = quantize.convert

    def convert(self, input_dict, model=None, full_layer_name=None, **kwargs):
        result = {}
        for name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            module, _ = get_module_from_name(model, name)
            if issubclass(getattr(module, "source_cls", torch.nn.Linear), torch.nn.Linear):
                params = dict(model.get_parameter_or_buffer(name).__dict__)
                params.pop("SCB", None)
                params.pop("CB", None)
                cb, scb, _ = bnb.functional.int8_vectorwise_quant(
                    value.contiguous().to(torch.float16))
                weight = bnb.nn.Int8Params(cb, requires_grad=False, **params)
                weight.CB, weight.SCB = cb, scb
                result[name] = weight
            else:  # Conv1D, transposed first by transformers
                result.update(stock(self, {name: value}, model, full_layer_name, **kwargs))
        return result

    quantize.convert = convert
    try:
        yield
    finally:
        quantize.convert = stock


def import_bitsandbytes():
    """Imports bitsandbytes, leaving its `torch.compile` wrappers to be built at their first call.

    bitsandbytes wraps four of its CPU kernels in `torch.compile` while it imports, and building
    a wrapper imports Inductor's compiler. `torch.compile` compiles at the first call anyway, so
    deferring the wrapper changes when Inductor is imported, not what runs: a CPU run then never
    imports it (`train --dry-run` on the tiny model: 7.1 s instead of 9.2). peft imports
    bitsandbytes whenever it is installed, so peft's importers call this first (`preload`).

    Raises:
        ImportError: bitsandbytes is not installed; anything its import raises.
    """
    import sys

    if sys.modules.get("bitsandbytes") is not None:  # (None: blocked, the import raises)
        return sys.modules["bitsandbytes"]
    import torch

    stock = torch.compile

    def deferred(model=None, **options):
        if model is None:  # the decorator form, @torch.compile(dynamic=False)
            return lambda fn: deferred(fn, **options)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = stock(model, **options)
            return compiled(*args, **kwargs)

        return call

    torch.compile = deferred
    try:
        import bitsandbytes
    finally:
        torch.compile = stock
    return bitsandbytes


def preload() -> None:
    """Before importing peft: imports an installed bitsandbytes the fast way (above). A missing
    or broken one is left to whoever needs it."""
    with contextlib.suppress(Exception):
        import_bitsandbytes()
