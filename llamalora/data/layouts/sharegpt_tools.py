"""ShareGPT tool calling, as LLaMA-Factory's glaive_toolcall sets write it: `conversations` with
`function_call` turns (the call as JSON, `{"name", "arguments"}`, or a list of them) and
`observation` turns (the result), and `tools` (a JSON string, or a list, of the functions).
Rendered as the OpenAI layout is: the chat template's tools block and tool turns, the calls
trained on like answers."""

from __future__ import annotations

import json

from llamalora.data.layouts.sharegpt import KEY
from llamalora.data.layouts.tools import TOOL_ORDER, calls_turn, parse_tools
from llamalora.data.layouts.turns import (TurnContext, TurnRules, content_text,
                                          conversation_layout, plain_turn)
from llamalora.data.problems import Problem, excerpt
from llamalora.template import TOOL, TOOL_CALLS

_CALL, _RESULT = "function_call", "observation"


def _read(m: dict, speaker: str, where: str, ctx: TurnContext):
    value = m.get("value", m.get("content"))
    if speaker == _CALL:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                ctx.problems.append(Problem(ctx.line, f"{where}.value", "bad_tool_call",
                                            f"{where}.value is not a valid JSON tool call "
                                            f"({exc})", excerpt(value)))
                return TOOL_CALLS, None
        return calls_turn("", value if isinstance(value, list) else [value], f"{where}.value",
                          ctx)
    if speaker == _RESULT:
        return TOOL, content_text(value, where, ctx)
    return plain_turn(m, speaker, where, ctx)


RULES = TurnRules(
    _read, TOOL_ORDER, last=("assistant", TOOL_CALLS),
    roles_hint="use human, gpt, function_call or observation, system only as the first turn",
    order_hint="turns go human, then gpt or function_call, then each call's result as an "
               "observation, then gpt or function_call again",
    names={"user": "human", "assistant": "gpt", TOOL_CALLS: _CALL, TOOL: _RESULT})


def detect(obj: dict) -> bool:
    turns = obj.get(KEY)
    return KEY in obj and ("tools" in obj or isinstance(turns, list) and any(
        isinstance(t, dict) and t.get("from") in (_CALL, _RESULT) for t in turns))


LAYOUT = conversation_layout("sharegpt_tools", KEY, detect, RULES, read_tools=parse_tools)
