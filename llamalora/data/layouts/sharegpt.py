"""ShareGPT / LLaVA `conversations`: turns of `from`/`value` (human/gpt; `role`/`content` read
too), `system` / `system_prompt` or a first system turn, `image` or `images` placed at `<image>`
placeholders."""

from __future__ import annotations

from llamalora.data.layouts.turns import conversation_layout

KEY = "conversations"

LAYOUT = conversation_layout("sharegpt", KEY, lambda obj: KEY in obj)
