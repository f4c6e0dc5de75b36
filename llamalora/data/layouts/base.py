"""What a layout is: how to recognize a record of it, check it into an `Example`, and fix it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from llamalora.data.example import Example
from llamalora.data.images import ImageRoot
from llamalora.data.problems import Problem


@dataclass(frozen=True)
class CheckOptions:
    """How records are checked. `system_with_images`: the chat template takes a system message
    next to images (Llama 3.2 Vision's refuses one, as vLLM and Ollama do)."""

    images: ImageRoot
    system_with_images: bool = False


@dataclass(frozen=True)
class Fixed:
    """What a layout's fix rules made of a record: the record(s), and what they changed."""

    records: list[dict]
    changes: list[str] = field(default_factory=list)


def map_images(obj: dict, rename: Callable[[str], str]) -> dict:
    """The record with each image path renamed: `image` / `images`, and the paths in content
    parts of `messages` / `conversations` turns."""
    out = dict(obj)
    for key in ("image", "images"):
        value = out.get(key)
        if isinstance(value, str):
            out[key] = rename(value)
        elif isinstance(value, list):
            out[key] = [rename(v) if isinstance(v, str) else v for v in value]
    for key in ("messages", "conversations"):
        turns = out.get(key)
        if isinstance(turns, list):
            out[key] = [_turn_images(t, rename) for t in turns]
    return out


def _turn_images(turn: object, rename: Callable[[str], str]) -> object:
    content = turn.get("content") if isinstance(turn, dict) else None
    if not isinstance(content, list):
        return turn
    parts = []
    for part in content:
        if isinstance(part, dict) and part.get("type") in ("image", "image_url"):
            part = dict(part)
            for key in ("image", "path", "url"):
                if isinstance(part.get(key), str):
                    part[key] = rename(part[key])
            url = part.get("image_url")
            if isinstance(url, str):
                part["image_url"] = rename(url)
            elif isinstance(url, dict) and isinstance(url.get("url"), str):
                part["image_url"] = {**url, "url": rename(url["url"])}
        parts.append(part)
    return {**turn, "content": parts}


@dataclass(frozen=True)
class Layout:
    """One record layout. `detect` picks it (the registry asks each in turn), `check` appends
    what is wrong to `problems` and returns the Example when nothing is, `fix` applies the
    --fix rules to a record that failed the check. `fields` are the keys it knows: others get
    an `unknown_field` warning."""

    name: str
    fields: frozenset[str]
    detect: Callable[[dict], bool]
    check: Callable[[dict, int, list[Problem], CheckOptions], Example | None]
    fix: Callable[[dict], Fixed]
    rename_images: Callable[[dict, Callable[[str], str]], dict] = map_images
