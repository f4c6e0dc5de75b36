"""The training text: the one place that turns a conversation into a model's chat-format text.

stats, train and chat all call `render_segments`, so what is counted, what is trained on and what
the model is prompted with at chat time cannot drift apart.

The text is the checkpoint's own `chat_template` (the Hugging Face convention, what
`apply_chat_template`, vLLM and Ollama serve with), rendered with a fixed `date_string` so the
training text does not change with the calendar. A tokenizer without one gets Meta's Llama 3.2
Vision template (bundled with the tokenizer). For a text-only conversation that template reads::

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n
    Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n{system}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n{user text}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n          <- end of the prompt
    {answer}<|eot_id|>                                           <- the response (has loss)

With images it has no system block (and refuses a system message); `<|image|>` stands where the
image part is in the content.

Where each response lies is found by rendering prefixes of the conversation: the text up to an
assistant turn with the generation prompt, and the text with that turn. A template for which these
are not prefixes of the whole conversation is refused, so the loss mask is exact or not made at
all. Each segment is tokenized on its own and the ids concatenated; chat tokenizes the prompt the
same way and generates after it, as a server tokenizes the prompt it is sent.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from llamalora.bundled import bundled_tokenizer_dir
from llamalora.errors import DataError, ModelError

BOS = "<|begin_of_text|>"
EOT = "<|eot_id|>"
IMAGE = "<|image|>"
PAD = "<|finetune_right_pad_id|>"  # Llama 3's padding token
STOPS = ("<|end_of_text|>", "<|eom_id|>", EOT)  # where a Llama 3 reply ends
# An image's place in the text of a `messages` record (LLaMA-Factory's convention).
IMAGE_PLACEHOLDER = "<image>"
# Tool calling's two turns besides user and assistant: an assistant turn that calls tools (its
# content the JSON of the message's `content` and `tool_calls`) and a tool's result. Templates
# render the result as their tool role (Llama 3.1+: `ipython`).
TOOL_CALLS = "tool_calls"
TOOL = "tool"
_ANSWERS = ("assistant", TOOL_CALLS)  # the turns trained on
# Meta's templates put today's date in the system block unless given one; their own default,
# fixed, keeps the training text (and so the data hash and any resume) the same every day.
DATE_STRING = "26 Jul 2024"
# The attribute of a `tokenizers.Tokenizer` that carries its chat template (see template_of).
_ATTRIBUTE = "llamalora_chat_template"


@dataclass(frozen=True)
class ChatTemplate:
    """A checkpoint's jinja chat template and the special tokens it is rendered with."""

    text: str
    special_tokens: tuple[tuple[str, str], ...] = ()  # (bos_token, "<|begin_of_text|>"), ...
    source: str = ""

    @functools.cached_property
    def reads_parts(self) -> bool:
        """Whether text given as `[{"type": "text", ...}]` renders as the same text given as a
        string does. Meta's template looks for images by iterating over each message's content,
        one character at a time for a string (~7 ms for a 1,000-character answer); as one part,
        it is one step. Checked on a probe conversation, with and without a system message."""
        probe = [("user", " a\nb "), ("assistant", "c "), ("user", "d")]
        try:
            return all(self.render(chat_messages(system, probe, parts=False), True)
                       == self.render(chat_messages(system, probe, parts=True), True)
                       for system in (None, " s "))
        except TemplateRenderError:
            return False

    @functools.cached_property
    def takes_system_with_images(self) -> bool:
        """Whether the template renders a system message next to an image (Llama 3.2 Vision's
        refuses one)."""
        try:
            self.render(chat_messages("s", [("user", IMAGE + "q")]), True)
            return True
        except TemplateRenderError:
            return False

    @property
    def stops(self) -> tuple[str, ...]:
        """The tokens a reply ends at: Llama 3's and the tokenizer's eos token."""
        eos = dict(self.special_tokens).get("eos_token")
        return STOPS + ((eos,) if eos and eos not in STOPS else ())

    def render(self, messages: list[dict], add_generation_prompt: bool = False,
               tools: list[dict] | None = None) -> str:
        try:
            return _compile(self.text).render(
                messages=messages, tools=tools, documents=None,
                add_generation_prompt=add_generation_prompt, date_string=DATE_STRING,
                **dict(self.special_tokens))
        except Exception as exc:  # jinja's TemplateError, and whatever the template trips on
            raise TemplateRenderError(f"the chat template ({self.source or 'given'}) refused the "
                                      f"conversation: {str(exc) or type(exc).__name__}") from exc


class TemplateRenderError(DataError):
    """The chat template refused a conversation (e.g. Llama 3.2 Vision: images with a system
    message), or it can't be split into prompt and response."""


@functools.lru_cache(maxsize=8)
def _compile(text: str):
    # The environment apply_chat_template builds (transformers.utils.chat_template_utils),
    # rebuilt on jinja2 alone: importing transformers costs stats and validate over a second.
    # tests/test_template.py checks both give the same text.
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(Extension):
        # `{% generation %}` marks assistant text for transformers' assistant mask; the spans
        # are found here by rendering prefixes instead, so the block just renders its body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body
                                          ).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(format):
        from datetime import datetime

        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(text)


def template_from_config(config: dict, jinja_file_text: str | None = None, source: str = ""
                         ) -> ChatTemplate | None:
    """The chat template of a tokenizer folder: `chat_template.jinja` (transformers 5 saves it
    there) or tokenizer_config.json's `chat_template` (a string, or named templates whose
    "default" is used). None when it has none."""
    text = jinja_file_text
    if text is None:
        value = config.get("chat_template")
        if isinstance(value, list):
            value = next((t.get("template") for t in value if t.get("name") == "default"), None)
        text = value if isinstance(value, str) and value else None
    if text is None:
        return None
    special = []
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            special.append((key, value))
    return ChatTemplate(text, tuple(special), source)


def read_template(folder: Path, source: str) -> ChatTemplate | None:
    """A tokenizer folder's chat template: chat_template.jinja, tokenizer_config.json, or a
    processor's chat_template.json, in the order transformers prefers them."""
    config_file, jinja_file = folder / "tokenizer_config.json", folder / "chat_template.jinja"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() \
            else {}
        jinja = jinja_file.read_text(encoding="utf-8") if jinja_file.is_file() else None
        if jinja is None and not config.get("chat_template") and (
                folder / "chat_template.json").is_file():
            jinja = json.loads((folder / "chat_template.json").read_text(encoding="utf-8")
                               ).get("chat_template")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelError(f"cannot read the chat template in {folder} ({exc}); fix or remove "
                         "tokenizer_config.json / chat_template.jinja") from exc
    return template_from_config(config, jinja, source)


@functools.lru_cache(maxsize=1)
def bundled_template() -> ChatTemplate:
    """Meta's Llama 3.2 Vision chat template, from the bundled tokenizer_config.json."""
    folder = bundled_tokenizer_dir()
    template = read_template(folder, "bundled Llama 3.2 Vision")
    if template is None:
        raise ModelError(f"the bundled tokenizer in {folder} has no chat template; "
                         "reinstall llamalora")
    return template


def template_of(tokenizer) -> ChatTemplate:
    """The chat template a tokenizer was loaded with (`tokenizer.load_tokenizer` attaches it),
    else the bundled Llama 3.2 Vision one."""
    found = getattr(tokenizer, _ATTRIBUTE, None)
    return found if found is not None else bundled_template()


def pad_token_id(tokenizer, template: ChatTemplate | None = None) -> int:
    """The id padding is written with: the tokenizer's declared pad token, else Llama 3's
    padding token, else the first stop token it has (the eos token among them), else 0. One rule for
    training's padded batches, eval and generation; what stands in padding is never attended to
    or trained on, so any id serves.

    Args:
        tokenizer: Anything with `token_to_id` (a `tokenizers.Tokenizer`, a transformers
            tokenizer's `backend_tokenizer`).
        template: Whose special tokens declare the pad and eos tokens; default: the one
            attached to `tokenizer`.
    """
    template = template or template_of(tokenizer)
    for token in (dict(template.special_tokens).get("pad_token"), PAD, *template.stops):
        found = tokenizer.token_to_id(token) if token else None
        if found is not None:
            return found
    return 0


def attach_template(tokenizer, template: ChatTemplate) -> None:
    setattr(tokenizer, _ATTRIBUTE, template)


def user_text(instruction: str, input_text: str = "", n_images: int = 0) -> str:
    """The user turn of an instruction record: images, then the instruction, then the input."""
    text = instruction + (f"\n{input_text}" if input_text else "")
    return IMAGE * n_images + text


def chat_messages(system: str | None, messages: list[tuple[str, str]], parts: bool = False
                  ) -> list[dict]:
    """Our (role, content) turns as the messages `apply_chat_template` takes.

    A user or assistant turn with `<|image|>` (or every one, with `parts`) becomes a list of
    parts, `{"type": "image"}` where each image stands and `{"type": "text", ...}` around them
    (the processor's convention, which Meta's template reads); other turns keep a plain string,
    which every template reads. A tool-calls turn becomes an assistant message with its
    `tool_calls`, a tool turn a `tool` message. The system message is always a string (Meta's
    template trims it).
    """
    out = [{"role": "system", "content": system}] if system else []
    for role, content in messages:
        if role == TOOL_CALLS:
            out.append({"role": "assistant", **json.loads(content)})
        elif role != TOOL and (parts or IMAGE in content):
            pieces: list[dict] = []
            for k, text in enumerate(content.split(IMAGE)):
                if k:
                    pieces.append({"type": "image"})
                if text:
                    pieces.append({"type": "text", "text": text})
            out.append({"role": role, "content": pieces})
        else:
            out.append({"role": role, "content": content})
    return out


def render_segments(
    system: str | None,
    messages: list[tuple[str, str]],
    add_generation_prompt: bool = False,
    *,
    template: ChatTemplate | None = None,
    tools: list[dict] | None = None,
) -> list[tuple[str, bool]]:
    """Renders a conversation as (text, is_response) segments with a chat template.

    Args:
        system: The system message, or None/"" for none.
        messages: (role, content) pairs, roles alternating "user"/"assistant", starting with
            "user" (with tools, "tool_calls" and "tool" turns too: see `data.Example`).
            Content already holds `<|image|>` where images go.
        add_generation_prompt: For chat: the conversation ends with a user turn, and the text
            ends with the template's generation prompt so the model writes the answer next.
        template: The tokenizer's template (`template_of(tokenizer)`); default: Meta's Llama 3.2
            Vision template.
        tools: The functions the conversation may call (JSON schemas), for the template's
            tools block.

    Returns:
        Segments whose concatenation is the template's text for the whole conversation. Response
        segments (True) are an assistant turn's content (or its tool calls, as the template
        writes them) and the template's text after it up to and including the stop token
        (`<|eot_id|>`, `<|im_end|>`); everything else is prompt.

    Raises:
        TemplateRenderError: The template refuses the conversation, or renders a turn in a way
            that is not a prefix of the whole conversation (no exact loss mask is possible).
    """
    template = template or template_of(None)
    # Parts are a speed-up only; Meta's template reads the first user message as a string when
    # it writes the tools block before it.
    chat = chat_messages(system, messages, parts=template.reads_parts and not tools)
    offset = len(chat) - len(messages)  # 1 with a system message
    ends_with_answer = bool(messages) and messages[-1][0] in _ANSWERS
    if ends_with_answer == add_generation_prompt:
        raise ValueError("a chat prompt must end with a user turn" if add_generation_prompt
                         else "a training conversation must end with an assistant turn")
    full = template.render(chat, add_generation_prompt, tools)
    segments: list[tuple[str, bool]] = []
    done = 0  # characters of `full` already in segments
    for i, (role, _) in enumerate(messages):
        if role not in _ANSWERS:
            continue
        prompt = template.render(chat[:offset + i], True, tools)
        with_turn = full if i == len(messages) - 1 else template.render(chat[:offset + i + 1],
                                                                        False, tools)
        if not (with_turn.startswith(prompt) and full.startswith(with_turn)
                and len(prompt) >= done):
            raise TemplateRenderError(
                f"the chat template ({template.source or 'given'}) does not render turn {i + 1} "
                "as a prefix of the whole conversation, so its response can't be located; use a "
                "model whose template renders conversations turn by turn")
        response = with_turn[len(prompt):]
        # What the template writes after the stop token (ChatML's "\n") is never generated:
        # it belongs to the next prompt.
        end = max((response.rfind(s) + len(s) for s in template.stops if s in response),
                  default=len(response))
        if len(prompt) > done:
            segments.append((full[done:len(prompt)], False))
        segments.append((response[:end], True))
        done = len(prompt) + end
    if done < len(full):
        segments.append((full[done:], False))
    return segments


def render_examples(examples, template: ChatTemplate | None = None) -> list[list[tuple[str, bool]]]:
    """`render_segments` for each checked record (`data.Example`); an error names the line."""
    out = []
    for example in examples:
        try:
            out.append(render_segments(example.system, example.messages, template=template,
                                       tools=example.tools))
        except TemplateRenderError as exc:
            # Meta's template refuses a system message next to images, as vLLM and Ollama do.
            hint = ("; move the system message into the first user turn (`llamalora validate "
                    "--fix` does this)" if example.system and example.images else "")
            raise TemplateRenderError(f"line {example.line}: {exc}{hint}") from exc
    return out
