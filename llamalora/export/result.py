"""What an export wrote and how well it matched (the `--json` output of export-adapter)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ExportResult:
    """What was written and how well it matched on the probe prompt."""

    out: Path
    kind: str  # adapter | merged | state_dict | llama (--merge --text-only of an Mllama run)
    files: list[str] = field(default_factory=list)
    max_logit_diff: float | None = None
    tolerance: float | None = None  # absolute: the dtype's relative tolerance x logit_scale
    logit_scale: float | None = None  # the largest |logit| on the probe prompt (at least 1)
    merge_diff: float | None = None  # merged vs unmerged model, before saving (--merge only)
    bytes_written: int = 0
    details: dict | None = None  # --text-only: layers kept and dropped, vocabulary rows, timings
    gguf: dict | None = None  # --gguf: path, type, bytes, its max_logit_diff and tolerance
    # --merge: what merging into --dtype moved (see verify.Drift): the largest logit of the
    # unmerged model, the merged model's rounding noise, and the positions whose top token stayed
    merge_drift: dict | None = None

    def note_drift(self, drift) -> None:
        """Records a `verify.Drift`: what merging into --dtype moved."""
        self.merge_diff = drift.max_logit_diff
        self.merge_drift = {"logit_scale": drift.logit_scale, "noise": drift.noise,
                            "same_top": drift.same_top, "positions": drift.positions}

    def finish(self, targets) -> ExportResult:
        """Fills in what was written, once `targets` (target.Targets) are in place."""
        if targets.state_dict is not None:
            self.files = [targets.state_dict.path.name]
            self.bytes_written = targets.state_dict.path.stat().st_size
            return self
        self.files = targets.folder.files
        self.bytes_written = sum(p.stat().st_size for p in targets.folder.path.rglob("*")
                                 if p.is_file())
        return self

    def to_dict(self) -> dict:
        out = {"out": str(self.out), "kind": self.kind, "files": self.files,
               "max_logit_diff": self.max_logit_diff, "tolerance": self.tolerance,
               "logit_scale": self.logit_scale, "merge_diff": self.merge_diff,
               "bytes_written": self.bytes_written}
        for key in ("merge_drift", "details", "gguf"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out
