from llamalora.template import render_segments, user_text


def test_single_turn_prompt_and_response_exactly():
    segs = render_segments(None, [("user", user_text("Define", "rebar")), ("assistant", "Steel.")])
    assert segs == [
        ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nDefine\nrebar<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("Steel.<|eot_id|>", True),
    ]


def test_system_images_and_no_input():
    segs = render_segments("Be brief.", [("user", user_text("거푸집?", "", n_images=2)),
                                         ("assistant", "틀")])
    assert segs[0][0] == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                          "Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
                          "<|image|><|image|>거푸집?<|eot_id|>"
                          "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_multi_turn_marks_every_assistant_turn_and_chat_prompt():
    msgs = [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")]
    segs = render_segments(None, msgs)
    assert [is_resp for _, is_resp in segs] == [False, True, False, True]
    assert segs[2][0] == ("<|start_header_id|>user<|end_header_id|>\n\nc<|eot_id|>"
                          "<|start_header_id|>assistant<|end_header_id|>\n\n")
    chat = render_segments(None, msgs[:3], add_generation_prompt=True)
    assert "".join(t for t, _ in chat) == "".join(t for t, _ in segs[:3])
