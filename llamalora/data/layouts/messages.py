"""OpenAI `messages`: turns of `role`/`content` (content a string or a list of text and image
parts), `system` or a first system turn, `images` (or paths in the image parts)."""

from __future__ import annotations

from llamalora.data.layouts.turns import conversation_layout

KEY = "messages"

LAYOUT = conversation_layout("messages", KEY, lambda obj: KEY in obj)
