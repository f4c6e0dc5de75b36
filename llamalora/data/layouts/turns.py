"""Checking a list of turns (`messages` or `conversations`), shared by the conversation layouts:
each layout says how it reads one turn and which roles may follow which."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llamalora.data.example import Example
from llamalora.data.layouts.base import CheckOptions, Fixed, Layout
from llamalora.data.layouts.fields import (check_image_list, check_system, check_text,
                                           system_field)
from llamalora.data.problems import Problem, excerpt, type_name
from llamalora.template import IMAGE, IMAGE_PLACEHOLDER, TOOL_CALLS

# ShareGPT's speaker names -> ours.
SPEAKERS = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
            "system": "system"}
# A plain conversation alternates user and assistant, starting with the user.
PLAIN_ORDER = {None: ("user",), "user": ("assistant",), "assistant": ("user",)}


@dataclass
class TurnContext:
    """What reading one record's turns gathers: its problems, the image paths given in content
    parts, and the tool names the record declares (tool-calling layouts)."""

    key: str
    line: int
    problems: list[Problem]
    part_images: list[str] = field(default_factory=list)
    tool_names: frozenset[str] = frozenset()


# Reads one turn: (our role, or None for a speaker the layout does not know; its content, or
# None after appending why it has none).
ReadTurn = Callable[[dict, str, str, TurnContext], "tuple[str | None, str | None]"]


@dataclass(frozen=True)
class TurnRules:
    """A layout's turns: how one is read, which roles may follow which (`order`, None for the
    start), which may end the conversation, and the words its messages use."""

    read: ReadTurn
    order: dict = field(default_factory=lambda: PLAIN_ORDER)
    last: tuple[str, ...] = ("assistant",)
    roles_hint: str = "use user or assistant (human or gpt), system only as the first turn"
    order_hint: str = "turns must alternate user/assistant, starting with user"
    names: dict = field(default_factory=dict)  # role -> how messages name it


def content_text(content: object, where: str, ctx: TurnContext) -> str | None:
    """A turn's content as text: a string, or a list of OpenAI-style parts (text parts joined,
    each image part an `<image>` placeholder; an image part's own path goes to
    `ctx.part_images`)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        ctx.problems.append(Problem(ctx.line, f"{where}.content", "wrong_type",
                                    f"{where}.content must be a string or a list of parts, got "
                                    f"{type_name(content)}", excerpt(content)))
        return None
    text = ""
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            text += part["text"]
        elif kind in ("image", "image_url"):
            text += IMAGE_PLACEHOLDER
            ref = part.get("image") or part.get("path") or part.get("url") or part.get(
                "image_url")
            if isinstance(ref, dict):
                ref = ref.get("url")
            if isinstance(ref, str) and ref.strip():
                ctx.part_images.append(ref)
        else:
            ctx.problems.append(Problem(ctx.line, f"{where}.content[{k}]", "bad_messages",
                                        f"{where}.content[{k}] must be {{\"type\": \"text\", "
                                        "\"text\": ...} or {\"type\": \"image\"}", excerpt(part)))
            return None
    return text


def plain_turn(m: dict, speaker: str, where: str, ctx: TurnContext):
    """A user, assistant or system turn: `role`/`content` or ShareGPT's `from`/`value`."""
    return SPEAKERS.get(speaker), content_text(m.get("content", m.get("value")), where, ctx)


def _read_turns(msgs: list, rules: TurnRules, ctx: TurnContext, system: str | None):
    """The turns in our roles, and the system message (the first turn may give it)."""
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(msgs):
        where = f"{ctx.key}[{i}]"
        speaker = m.get("role", m.get("from")) if isinstance(m, dict) else None
        if not isinstance(speaker, str):
            ctx.problems.append(Problem(ctx.line, where, "bad_messages",
                                        f"{where} must be an object with a string `role` (or "
                                        "ShareGPT's `from`)"))
            return None, system
        role, content = rules.read(m, speaker, where, ctx)
        if content is None:  # its problem is appended; the order is still checked past it
            if role in rules.order and role != "system":
                turns.append((role, ""))
            continue
        if role == "system" and i == 0 and system is None:
            system = content
            continue
        due = rules.order.get(turns[-1][0] if turns else None, ())
        if role not in rules.order or role is None:
            ctx.problems.append(Problem(ctx.line, f"{where}.role", "bad_messages",
                                        f"{where}.role is {speaker!r}; {rules.roles_hint}"))
            continue
        if role not in due:
            shown = " or ".join(repr(rules.names.get(r, r)) for r in due)
            ctx.problems.append(Problem(ctx.line, f"{where}.role", "bad_messages",
                                        f"{where}.role is {speaker!r} where {shown} was due: "
                                        f"{rules.order_hint}"))
            continue
        if role != TOOL_CALLS and not content.strip():
            ctx.problems.append(Problem(ctx.line, f"{where}.content", "empty_field",
                                        f"{where}.content is empty"))
        turns.append((role, content))
    return turns, system


def _record_images(obj: dict, turns: list, ctx: TurnContext, options: CheckOptions
                   ) -> list[Path] | None:
    names = check_image_list(obj, ctx.line, ctx.problems)
    if names is not None and ctx.part_images:
        if names:
            ctx.problems.append(Problem(ctx.line, "images", "bad_messages",
                                        "image paths are given both in the content parts and "
                                        "in `images`; keep one"))
            return None
        names = ctx.part_images
    if names is None:
        return None
    placeholders = sum(c.count(IMAGE_PLACEHOLDER) for _, c in turns)
    if placeholders != len(names):
        ctx.problems.append(Problem(ctx.line, "images", "bad_messages",
                                    f"{placeholders} `{IMAGE_PLACEHOLDER}` placeholder(s) but "
                                    f"{len(names)} image(s)",
                                    fix="give one image per placeholder"))
        return None
    return options.images.check(names, ctx.line, ctx.problems, "images")


def check_turns(obj: dict, ctx: TurnContext, options: CheckOptions, rules: TurnRules,
                tools: list[dict] | None = None) -> Example | None:
    """A `messages` or `conversations` record as an Example, or None after appending its
    problems."""
    before = len(ctx.problems)
    msgs = obj[ctx.key]
    system = check_system(obj, ctx.line, ctx.problems)
    if not isinstance(msgs, list) or not msgs:
        ctx.problems.append(Problem(ctx.line, ctx.key, "bad_messages",
                                    f"`{ctx.key}` must be a non-empty list of {{role, content}} "
                                    "(or {from, value}) objects"))
        return None
    turns, system = _read_turns(msgs, rules, ctx, system)
    if turns is None:
        return None
    if len(ctx.problems) == before and (not turns or turns[-1][0] not in rules.last):
        ctx.problems.append(Problem(ctx.line, ctx.key, "bad_messages",
                                    "the last turn must be the assistant's (its answer is what "
                                    "is trained on)"))
    images = _record_images(obj, turns, ctx, options)
    if len(ctx.problems) > before:
        return None
    turns = [(r, c.replace(IMAGE_PLACEHOLDER, IMAGE)) for r, c in turns]
    example = Example(ctx.line, system or None, turns, images, tools)
    return example if check_text(example, obj, ctx.line, ctx.problems,
                                 options.system_with_images) else None


def _has_images(obj: dict, turns: list) -> bool:
    if obj.get("image") or obj.get("images"):
        return True
    return any(isinstance(t, dict) and isinstance(t.get("content"), list)
               and any(isinstance(p, dict) and p.get("type") in ("image", "image_url")
                       for p in t["content"]) for t in turns)


def _prepend(turn: dict, text: str) -> dict:
    key = "content" if "content" in turn else "value"
    content = turn.get(key)
    if isinstance(content, list):
        return {**turn, key: [{"type": "text", "text": text}, *content]}
    return {**turn, key: text + content}


def _speaker(turn: object) -> str | None:
    return SPEAKERS.get(turn.get("role", turn.get("from"))) if isinstance(turn, dict) else None


def _content(turn: dict) -> object:
    return turn.get("content", turn.get("value"))


def fix_conversation(obj: dict, key: str) -> Fixed:
    """--fix for a conversation: a system message next to images (a `system` field or a first
    system turn) moves to the start of the first user turn, where Llama 3.2 Vision's template
    takes it."""
    turns = obj.get(key)
    if not isinstance(turns, list) or not turns or not _has_images(obj, turns):
        return Fixed([obj])
    name = system_field(obj)
    from_turn = name is None and _speaker(turns[0]) == "system"
    if not (name or from_turn):
        return Fixed([obj])
    system = obj[name] if name else _content(turns[0])
    user = next((i for i, t in enumerate(turns) if _speaker(t) == "user"), None)
    if not (isinstance(system, str) and system.strip()) or user is None or not isinstance(
            _content(turns[user]), (str, list)):
        return Fixed([obj])
    fixed = {k: v for k, v in obj.items() if k != name}
    moved = [_prepend(t, f"{system}\n\n") if i == user else t for i, t in enumerate(turns)]
    fixed[key] = moved[1:] if from_turn else moved
    what = f"`{name}`" if name else "the system turn"
    return Fixed([fixed], [f"moved {what} into the first user turn (a system message next to "
                           "images)"])


def conversation_layout(name: str, key: str, detect: Callable[[dict], bool],
                        rules: TurnRules = TurnRules(plain_turn),
                        read_tools: Callable[[dict, int, list[Problem]], list | None] | None = None
                        ) -> Layout:
    """A layout of turns under `key`: `rules` read them; `read_tools` (tool-calling layouts)
    reads the functions the record declares, which its tool calls must name."""
    # `id` (ShareGPT and LLaVA sets carry one) is known and ignored.
    fields = {key, "images", "image", "system", "system_prompt", "id"}

    def check(obj: dict, line: int, problems: list[Problem], options: CheckOptions):
        tools: list | None = []
        if read_tools is not None:
            tools = read_tools(obj, line, problems)
            if tools is None:
                return None
        names = frozenset(t["function"]["name"] for t in tools)
        return check_turns(obj, TurnContext(key, line, problems, tool_names=names), options,
                           rules, tools or None)

    return Layout(name, frozenset(fields | ({"tools"} if read_tools else set())), detect, check,
                  lambda obj: fix_conversation(obj, key))
