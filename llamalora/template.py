"""The training text: the one place that turns a conversation into Llama 3 chat-format text.

stats, train and chat all call `render_segments`, so what is counted, what is trained on and what
the model is prompted with at chat time cannot drift apart.

The format is Llama 3.2 Vision-Instruct's, with no default system message::

    <|begin_of_text|>[<|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>]
    <|start_header_id|>user<|end_header_id|>\\n\\n{<|image|> per image}{user text}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n          <- end of the prompt
    {answer}<|eot_id|>                                           <- the response (has loss)

Each segment is tokenized on its own and the ids concatenated. Chat tokenizes the prompt the same
way and generates after it, so the boundary tokens the model sees at training and at chat time are
identical.
"""

from __future__ import annotations

BOS = "<|begin_of_text|>"
EOT = "<|eot_id|>"
IMAGE = "<|image|>"
PAD = "<|finetune_right_pad_id|>"  # Llama 3's padding token
STOPS = ("<|end_of_text|>", "<|eom_id|>", EOT)  # where a Llama 3 reply ends
# An image's place in the text of a `messages` record (LLaMA-Factory's convention).
IMAGE_PLACEHOLDER = "<image>"


def _header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


def user_text(instruction: str, input_text: str = "", n_images: int = 0) -> str:
    """The user turn of an instruction record: images, then the instruction, then the input."""
    text = instruction + (f"\n{input_text}" if input_text else "")
    return IMAGE * n_images + text


def render_segments(
    system: str | None,
    messages: list[tuple[str, str]],
    add_generation_prompt: bool = False,
) -> list[tuple[str, bool]]:
    """Renders a conversation as (text, is_response) segments in the Llama 3 chat format.

    Args:
        system: The system message, or None/"" for none.
        messages: (role, content) pairs, roles alternating "user"/"assistant", starting with
            "user". Content already holds `<|image|>` where images go.
        add_generation_prompt: For chat: the conversation ends with a user turn, and the last
            segment ends with the assistant header so the model writes the answer next.

    Returns:
        Segments whose concatenation is the full text. Response segments (True) are an assistant
        turn's content plus `<|eot_id|>`; everything else is prompt.
    """
    segments: list[tuple[str, bool]] = []
    prompt = BOS + (_header("system") + system + EOT if system else "")
    for role, content in messages:
        if role == "user":
            prompt += _header("user") + content + EOT + _header("assistant")
        else:
            segments.append((prompt, False))
            segments.append((content + EOT, True))
            prompt = ""
    if prompt:
        if not add_generation_prompt:
            raise ValueError("a training conversation must end with an assistant turn")
        segments.append((prompt, False))
    return segments
