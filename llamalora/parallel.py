"""How many processes train together, and what each one does: one process, data-parallel, FSDP2."""

from __future__ import annotations

import os


def world() -> tuple[int, int, int]:
    """(rank, local rank, world size) from the torchrun / accelerate environment."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))
