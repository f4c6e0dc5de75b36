"""What the tool-calling layouts share: the record's `tools`, and each tool call checked
against them (valid JSON, a name `tools` declares)."""

from __future__ import annotations

import json

from llamalora.data.layouts.turns import TurnContext
from llamalora.data.problems import Problem, excerpt, type_name
from llamalora.template import TOOL, TOOL_CALLS

# Which roles may follow which: the user, then the assistant's answer or its tool calls; each
# call's results as tool turns, then the assistant again.
TOOL_ORDER = {None: ("user",), "user": ("assistant", TOOL_CALLS), "assistant": ("user",),
              TOOL_CALLS: (TOOL,), TOOL: (TOOL, "assistant", TOOL_CALLS)}
_FUNCTION = ('{"name": ..., "description": ..., "parameters": {...}} (or OpenAI\'s '
             '{"type": "function", "function": {...}})')


def parse_tools(obj: dict, line: int, problems: list[Problem]) -> list[dict] | None:
    """The functions the record declares, each in OpenAI's `{"type": "function", "function":
    {...}}` form (what chat templates and `apply_chat_template(tools=...)` take); `tools` may
    be a JSON string of the list, as LLaMA-Factory's ShareGPT sets write it. [] when it has
    none; None after appending why they can't be read."""
    value = obj.get("tools")
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            problems.append(Problem(line, "tools", "bad_tools",
                                    f"`tools` is a string but not valid JSON ({exc})",
                                    excerpt(value)))
            return None
    if not isinstance(value, list):
        problems.append(Problem(line, "tools", "bad_tools",
                                f"`tools` must be a list of functions, got {type_name(value)}",
                                excerpt(value)))
        return None
    tools = []
    for k, tool in enumerate(value):
        wrapped = isinstance(tool, dict) and tool.get("type") == "function"
        function = tool.get("function") if wrapped else tool
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)
                and function["name"]):
            problems.append(Problem(line, f"tools[{k}]", "bad_tools",
                                    f"tools[{k}] must be a function: {_FUNCTION}",
                                    excerpt(tool)))
            return None
        tools.append(tool if wrapped else {"type": "function", "function": function})
    return tools


def _bad(ctx: TurnContext, where: str, message: str, value: object = "", fix: str = "") -> None:
    ctx.problems.append(Problem(ctx.line, where, "bad_tool_call", message,
                                excerpt(value) if value != "" else "", fix=fix))


def check_call(call: object, where: str, ctx: TurnContext) -> dict | None:
    """One tool call (OpenAI's `{"type": "function", "function": {"name", "arguments"}}` or
    ShareGPT's `{"name", "arguments"}`) as the chat template takes it: arguments as an object.
    None after appending what is wrong."""
    function = call.get("function") if isinstance(call, dict) and "function" in call else call
    if not isinstance(function, dict):
        _bad(ctx, where, f"{where} must be an object with `name` and `arguments`", call)
        return None
    name = function.get("name")
    if not isinstance(name, str) or not name:
        _bad(ctx, where, f"{where} has no function `name`", call)
        return None
    if name not in ctx.tool_names:
        declared = ", ".join(f"`{n}`" for n in sorted(ctx.tool_names)[:5]) or "none"
        _bad(ctx, where, f"{where} calls `{name}`, which the record's `tools` does not declare "
                         f"(it declares {declared})", fix="declare it in `tools`, or fix the name")
        return None
    arguments = function.get("arguments", function.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError as exc:
            _bad(ctx, f"{where}.arguments", f"{where}.arguments is not valid JSON ({exc})",
                 arguments)
            return None
    if not isinstance(arguments, dict):
        _bad(ctx, f"{where}.arguments",
             f"{where}.arguments must be a JSON object, got {type_name(arguments)}", arguments)
        return None
    out = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if isinstance(call, dict) and isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def calls_turn(text: str, calls: list, where: str, ctx: TurnContext):
    """The (role, content) of an assistant turn that calls tools: content is the JSON of the
    message's own fields (see `template.chat_messages`); None when a call is bad."""
    if not isinstance(calls, list) or not calls:
        _bad(ctx, where, f"{where} must hold one tool call or a non-empty list of them", calls)
        return TOOL_CALLS, None
    checked = [check_call(c, f"{where}[{k}]", ctx) for k, c in enumerate(calls)]
    if None in checked:
        return TOOL_CALLS, None
    return TOOL_CALLS, json.dumps({"content": text, "tool_calls": checked}, ensure_ascii=False)
