"""What a checked record becomes, whatever its layout: one conversation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Example:
    """A checked record as a conversation: what the training text is built from.

    `messages` are (role, content) turns: "user" and "assistant" text (with `<|image|>` where
    images go), and in tool-calling records "tool_calls" (an assistant turn that calls tools;
    its content is the JSON of `{"content", "tool_calls"}`, as `template.chat_messages` hands it
    to the chat template) and "tool" (a tool's result). `tools` are the functions the record
    declares, as JSON schemas in OpenAI's `{"type": "function", "function": {...}}` form.
    """

    line: int
    system: str | None
    messages: list[tuple[str, str]]
    images: list[Path] = field(default_factory=list)
    tools: list[dict] | None = None
