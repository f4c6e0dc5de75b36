"""The training text: the tokenizer's chat template, rendered as apply_chat_template renders it,
split exactly into prompt and response."""

import json
import shutil

import pytest

from llamalora.data import Example
from llamalora.errors import ModelError
from llamalora.template import (DATE_STRING, ChatTemplate, TemplateRenderError, chat_messages,
                                render_examples, render_segments, template_of, user_text)
from llamalora.tokenizer import BUNDLED_TOKENIZER_DIR, encode_segments, load_tokenizer

from conftest import LLAMA3_TEMPLATE as LLAMA3

SYSTEM_BLOCK = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n")
# SmolLM2-Instruct's template (ChatML with a default system message), as its GGUF ships it.
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
          "Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")

RECORDS = {
    "text": (None, [("user", user_text("Define", "rebar")), ("assistant", "Steel.")]),
    "system": ("Be brief.", [("user", "거푸집?"), ("assistant", "틀")]),
    "image": (None, [("user", user_text("거푸집?", "", n_images=2)), ("assistant", "틀")]),
    "multi_turn": ("Answer in Korean.", [("user", "a"), ("assistant", "b"), ("user", "c"),
                                          ("assistant", "d\n")]),
}


def test_meta_template_text_only_opens_with_the_dated_system_block():
    segs = render_segments(None, RECORDS["text"][1])
    assert segs == [
        (SYSTEM_BLOCK + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nDefine\nrebar"
         "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("Steel.<|eot_id|>", True),
    ]
    system = render_segments(*RECORDS["system"])
    assert system[0][0].startswith(SYSTEM_BLOCK + "Be brief.<|eot_id|>")


def test_meta_template_images_have_no_system_block_and_refuse_a_system_message():
    segs = render_segments(*RECORDS["image"])
    assert segs[0][0] == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
                          "<|image|><|image|>거푸집?<|eot_id|>"
                          "<|start_header_id|>assistant<|end_header_id|>\n\n")
    record = Example(7, "Be brief.", RECORDS["image"][1], images=["a.png", "b.png"])
    with pytest.raises(TemplateRenderError, match=r"line 7: .*incompatible with system.*move the "
                                                  r"system message into the first user turn"):
        render_examples([record])


def test_image_parts_stand_where_the_images_are():
    assert chat_messages(None, [("user", "see <|image|> and<|image|>")]) == [
        {"role": "user", "content": [{"type": "text", "text": "see "}, {"type": "image"},
                                     {"type": "text", "text": " and"}, {"type": "image"}]}]


def test_multi_turn_marks_every_assistant_turn_and_chat_prompt():
    msgs = RECORDS["multi_turn"][1]
    segs = render_segments(None, msgs)
    assert [is_resp for _, is_resp in segs] == [False, True, False, True]
    assert [t for t, r in segs if r] == ["b<|eot_id|>", "d\n<|eot_id|>"]
    assert segs[2][0] == ("<|start_header_id|>user<|end_header_id|>\n\nc<|eot_id|>"
                          "<|start_header_id|>assistant<|end_header_id|>\n\n")
    chat = render_segments(None, msgs[:3], add_generation_prompt=True)
    assert "".join(t for t, _ in chat) == "".join(t for t, _ in segs[:3])
    with pytest.raises(ValueError, match="end with an assistant turn"):
        render_segments(None, msgs[:3])


@pytest.fixture(scope="module")
def hf_tokenizer():
    """The bundled tokenizer in transformers, with ChatML's two special tokens added (so one
    tokenizer serves all three templates)."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_str(load_tokenizer("bundled").tokenizer.to_str())
    raw.add_special_tokens([AddedToken("<|im_start|>", special=True),
                            AddedToken("<|im_end|>", special=True)])
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>")
    return raw, fast


@pytest.mark.parametrize("name", ["meta", "chatml", "llama3"])
@pytest.mark.parametrize("record", list(RECORDS))
def test_equal_to_apply_chat_template_with_an_exact_response_mask(hf_tokenizer, name, record):
    raw, fast = hf_tokenizer
    text = {"meta": template_of(None).text, "chatml": CHATML, "llama3": LLAMA3}[name]
    if name != "meta" and record == "image":
        pytest.skip("only Meta's template reads image parts")
    eos = "<|im_end|>" if name == "chatml" else "<|end_of_text|>"
    template = ChatTemplate(text, (("bos_token", "<|begin_of_text|>"), ("eos_token", eos)))
    system, messages = RECORDS[record]
    segs = render_segments(system, messages, template=template)
    chat = chat_messages(system, messages)
    expected_text = fast.apply_chat_template(chat, chat_template=text, tokenize=False,
                                             date_string=DATE_STRING, eos_token=eos)
    assert "".join(t for t, _ in segs) == expected_text
    encoded = encode_segments(raw, [segs])[0]
    ids = [t for seg, _ in encoded for t in seg]
    assert ids == fast.apply_chat_template(chat, chat_template=text, tokenize=True,
                                           return_dict=False, date_string=DATE_STRING,
                                           eos_token=eos)
    # The response tokens are each answer and its stop token, nothing more or less.
    stop = "<|im_end|>" if name == "chatml" else "<|eot_id|>"
    answers = [content for role, content in messages if role == "assistant"]
    if name == "llama3":  # this template trims each turn
        answers = [a.strip() for a in answers]
    responses = [raw.decode(seg, skip_special_tokens=False) for seg, r in encoded if r]
    assert responses == [a + stop for a in answers]


def test_chat_prompt_ends_with_the_generation_prompt():
    template = ChatTemplate(CHATML, (("eos_token", "<|im_end|>"),))
    segs = render_segments(None, [("user", "hi")], add_generation_prompt=True, template=template)
    assert segs == [("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                     "Hugging Face<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                     "<|im_start|>assistant\n", False)]
    assert "<|im_end|>" in template.stops


# ChatML with tools, as Qwen2.5's template writes them: the tools in the system block inside
# <tools></tools>, each call as <tool_call> JSON, the results in a user turn as
# <tool_response> (consecutive results share one turn).
CHATML_TOOLS = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query."
    "\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": "
    "<function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\\\"name\\\": \\\"' }}{{- tool_call.name }}"
    "{{- '\\\", \\\"arguments\\\": ' }}{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}"
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}"
    "{%- endif %}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
WEATHER = {"name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}
# LLaMA-Factory's glaive_toolcall layout: two calls and their results, then the answer.
GLAIVE = {"conversations": [
    {"from": "human", "value": "Weather in Seoul and Busan?"},
    {"from": "function_call", "value": json.dumps({"name": "get_weather",
                                                   "arguments": {"city": "Seoul"}})},
    {"from": "observation", "value": json.dumps({"temperature": 21})},
    {"from": "function_call", "value": json.dumps({"name": "get_weather",
                                                   "arguments": {"city": "Busan"}})},
    {"from": "observation", "value": json.dumps({"temperature": 24})},
    {"from": "gpt", "value": "Seoul 21, Busan 24 degrees."}], "tools": json.dumps([WEATHER])}
# The same conversation in OpenAI's layout, with a system message.
OPENAI = {"messages": [
    {"role": "system", "content": "Use the tools."},
    {"role": "user", "content": "Weather in Seoul and Busan?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Seoul"}'}}]},
    {"role": "tool", "tool_call_id": "1", "content": '{"temperature": 21}'},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "2", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Busan"}'}}]},
    {"role": "tool", "tool_call_id": "2", "content": '{"temperature": 24}'},
    {"role": "assistant", "content": "Seoul 21, Busan 24 degrees."}],
    "tools": [{"type": "function", "function": WEATHER}]}
TOOL_RESPONSES = {
    "meta": ['{"name": "get_weather", "parameters": {"city": "Seoul"}}<|eot_id|>',
             '{"name": "get_weather", "parameters": {"city": "Busan"}}<|eot_id|>',
             "Seoul 21, Busan 24 degrees.<|eot_id|>"],
    "chatml_tools": [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Seoul"}}\n</tool_call>'
        "<|im_end|>",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Busan"}}\n</tool_call>'
        "<|im_end|>",
        "Seoul 21, Busan 24 degrees.<|im_end|>"]}


@pytest.mark.parametrize("name", ["meta", "chatml_tools"])
@pytest.mark.parametrize("record", [GLAIVE, OPENAI], ids=["glaive", "openai"])
def test_tool_calling_equal_to_apply_chat_template_with_an_exact_response_mask(
        hf_tokenizer, tmp_path, name, record):
    """A tool-calling record renders as `apply_chat_template(..., tools=...)` does under the
    template (Meta's: tools in the first user turn, results as `ipython`; Qwen2.5-style ChatML:
    <tools>, <tool_call>, <tool_response>), and the loss falls on each tool call and the answer,
    exactly."""
    from llamalora.batching import tokenize_records
    from llamalora.data import load_examples

    raw, fast = hf_tokenizer
    text = template_of(None).text if name == "meta" else CHATML_TOOLS
    eos = "<|end_of_text|>" if name == "meta" else "<|im_end|>"
    template = ChatTemplate(text, (("bos_token", "<|begin_of_text|>"), ("eos_token", eos)))
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(record) + "\n")
    (example,), _ = load_examples(path)
    segs = render_segments(example.system, example.messages, template=template,
                           tools=example.tools)
    chat = chat_messages(example.system, example.messages)
    expected = fast.apply_chat_template(chat, tools=example.tools, chat_template=text,
                                        tokenize=False, date_string=DATE_STRING, eos_token=eos)
    assert "".join(t for t, _ in segs) == expected
    assert ("<|start_header_id|>ipython<|end_header_id|>" in expected) == (name == "meta")
    assert [t for t, r in segs if r] == TOOL_RESPONSES[name]
    ids = fast.apply_chat_template(chat, tools=example.tools, chat_template=text,
                                   tokenize=True, return_dict=False, date_string=DATE_STRING,
                                   eos_token=eos)
    (enc,) = tokenize_records(raw, [example], max_seq_length=4096, template=template)
    assert enc.tokenized.input_ids == ids
    labels = enc.tokenized.labels
    trained = [t for t, label in zip(ids, labels) if label != -100]
    assert raw.decode(trained, skip_special_tokens=False) == "".join(TOOL_RESPONSES[name])
    # Each response is one unbroken run of labels, as many as the template's text for it.
    runs = "".join("1" if label != -100 else "0" for label in labels).split("0")
    assert [len(r) for r in runs if r] == [len(raw.encode(t, add_special_tokens=False).ids)
                                           for t in TOOL_RESPONSES[name]]


def test_a_template_whose_turns_are_not_prefixes_is_refused():
    # Writes the number of turns up front: a prefix renders differently from the whole.
    odd = ChatTemplate("{{ messages | length }}{% for m in messages %}{{ m['content'] }}"
                       "{% endfor %}", source="odd")
    with pytest.raises(TemplateRenderError, match="odd.*prefix"):
        render_segments(None, [("user", "a"), ("assistant", "b")], template=odd)


def test_the_bundled_tokenizer_carries_meta_s_template():
    tokenizer = load_tokenizer("bundled").tokenizer
    assert "Cutting Knowledge Date" in template_of(tokenizer).text
    config = json.loads((BUNDLED_TOKENIZER_DIR / "tokenizer_config.json").read_text("utf-8"))
    assert config["chat_template"] == template_of(tokenizer).text


def test_a_folder_s_own_template_is_used(tmp_path):
    shutil.copy(BUNDLED_TOKENIZER_DIR / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot_id|>"}))
    # No template, Llama 3 vocabulary: Meta's template.
    assert "Cutting Knowledge" in template_of(load_tokenizer(str(tmp_path)).tokenizer).text
    (tmp_path / "chat_template.jinja").write_text(LLAMA3)
    template = template_of(load_tokenizer(str(tmp_path)).tokenizer)
    assert template.text == LLAMA3 and dict(template.special_tokens)["eos_token"] == "<|eot_id|>"


def test_a_non_llama_tokenizer_without_a_template_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(
        str(tmp_path / "tokenizer.json"))
    with pytest.raises(ModelError, match="no chat template"):
        load_tokenizer(str(tmp_path))
