"""OpenAI tool calling: `messages` whose assistant turns carry `tool_calls` (each
`{"type": "function", "function": {"name", "arguments"}}`, arguments a JSON string or object),
followed by `tool` turns holding the results, and the record's `tools` (the functions, as JSON
schemas). The chat template renders the tools block and the results (Llama 3.1+ as `ipython`
turns); the assistant's tool calls are trained on like its answers."""

from __future__ import annotations

from llamalora.data.layouts.messages import KEY
from llamalora.data.layouts.tools import TOOL_ORDER, calls_turn, parse_tools
from llamalora.data.layouts.turns import (TurnContext, TurnRules, content_text,
                                          conversation_layout, plain_turn)
from llamalora.template import TOOL, TOOL_CALLS


def _read(m: dict, speaker: str, where: str, ctx: TurnContext):
    if speaker == "assistant" and m.get("tool_calls") is not None:  # OpenAI writes null
        text = m.get("content") or ""
        text = content_text(text, where, ctx) if text else ""
        if text is None:
            return TOOL_CALLS, None
        return calls_turn(text, m["tool_calls"], f"{where}.tool_calls", ctx)
    if speaker in ("tool", "ipython"):
        return TOOL, content_text(m.get("content"), where, ctx)
    return plain_turn(m, speaker, where, ctx)


RULES = TurnRules(
    _read, TOOL_ORDER, last=("assistant", TOOL_CALLS),
    roles_hint="use user, assistant (with `tool_calls` to call a tool) or tool, system only as "
               "the first turn",
    order_hint="turns go user, then the assistant's answer or its `tool_calls`, then each "
               "call's result as a `tool` turn, then the assistant again",
    names={TOOL_CALLS: "assistant with tool_calls"})


def detect(obj: dict) -> bool:
    msgs = obj.get(KEY)
    return KEY in obj and ("tools" in obj or isinstance(msgs, list) and any(
        isinstance(m, dict) and (m.get("tool_calls") or m.get("role") in ("tool", "ipython"))
        for m in msgs))


LAYOUT = conversation_layout("openai_tools", KEY, detect, RULES, read_tools=parse_tools)
