"""Whether the Hugging Face Hub can be asked at all, decided in one quick step.

huggingface_hub retries a request that fails to connect five times with back-off (~25 s and six
"Retrying in 8s" lines); a tokenizer, config or dataset that is not cached fails at once instead,
with one line that says why.
"""

from __future__ import annotations

import socket
from urllib.parse import urlparse


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set: only the local cache is read."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connection to the Hub's endpoint opens within `timeout` (False when offline)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def unreachable_reason() -> str:
    """Why the Hub was not asked, for an error message."""
    if hub_offline():
        return "HF_HUB_OFFLINE is set, so only the local cache is read"
    return "the Hugging Face Hub is unreachable (offline?)"
