"""The one check every export passes: what was written, loaded back the way a user loads it (plain
peft, plain transformers, transformers' GGUF loader), gives the logits of the model it came from
on a probe prompt, within its format's tolerance; otherwise the export fails and nothing is left.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llamalora.errors import ModelError
from llamalora.template import render_segments, template_of
from llamalora.tokenizer import encode_segments

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Max |logit difference| allowed, relative to the largest |logit| (at least 1). bf16 keeps 8 bits
# of mantissa: one rounding step near a logit of 24 is 0.125, and a merge reorders the sums.
TOLERANCE = {"bf16": 2e-2, "fp16": 5e-3, "fp32": 1e-4}
# The probe is a chat prompt built like training's, so the check exercises the real format.
PROBE_QUESTION = "다음 건설 용어를 설명하세요.\n거푸집"


@dataclass
class Probe:
    """The probe prompt's token ids, and the device the models run on."""

    ids: list[int]
    device: str


@dataclass
class Check:
    """How far a reloaded export's logits are from the reference's, and what was allowed."""

    max_logit_diff: float
    tolerance: float
    logit_scale: float  # the largest |logit| of the reference (at least 1)
    logits: object  # the reloaded export's, for further comparisons


@dataclass
class Drift:
    """How far merging LoRA into the weights moved the logits from the unmerged model, and what
    is normal for the dtype: the merged model's own rounding noise (its logits through another
    attention kernel, the same function summed in another order)."""

    max_logit_diff: float
    logit_scale: float
    noise: float
    same_top: int  # prompt positions whose most likely next token did not change
    positions: int


def probe_for(tokenizer, device: str) -> Probe:
    """The probe question as the run's chat template renders a prompt."""
    segments = render_segments(None, [("user", PROBE_QUESTION)], add_generation_prompt=True,
                               template=template_of(tokenizer))
    ids = [t for seg, _ in encode_segments(tokenizer, [segments])[0] for t in seg]
    return Probe(ids, device)


def probe_logits(model, probe: Probe, math_attention: bool = False):
    """The model's logits on the probe prompt; `math_attention`: through SDPA's plain math
    kernel (the same function summed in another order, to measure the model's rounding noise)."""
    import contextlib

    import torch

    ids = torch.tensor([probe.ids], device=probe.device)
    if math_attention:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernel = sdpa_kernel(SDPBackend.MATH)
    else:
        kernel = contextlib.nullcontext()
    with torch.inference_mode(), kernel:
        return model(input_ids=ids).logits.float().cpu()


def logit_diff(a, b) -> tuple[float, float]:
    """(max |a - b|, the largest |a| but at least 1)."""
    scale = max(1.0, a.abs().max().item())
    return (a - b).abs().max().item(), scale


def drift(unmerged, merged, noise: float) -> Drift:
    diff, scale = logit_diff(unmerged, merged)
    same = (unmerged.argmax(-1) == merged.argmax(-1))
    return Drift(diff, scale, noise, int(same.sum()), same.numel())


def verify(what: str, reload: Callable[[], object], expected, probe: Probe, *, share: float,
           floor: float = 0.0) -> Check:
    """Loads the export with `reload()` and compares its probe logits with `expected`.

    The tolerance is `share` of the largest expected logit, or `floor` where that is more.

    Raises:
        ModelError: The export's logits differ by more (naming `what`).
    """
    model = reload()
    got = probe_logits(model, probe)
    del model
    diff, scale = logit_diff(expected, got)
    tolerance = max(share * scale, floor)
    if diff > tolerance:
        raise ModelError(f"{what} gives different logits (max diff {diff:.3g} > "
                         f"{tolerance:.3g}); nothing was written")
    return Check(diff, tolerance, scale, got)
