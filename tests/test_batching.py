"""Labels, truncation and batch order: no model needed."""

from __future__ import annotations

from tokenizers import Tokenizer

from llamalora.batching import IGNORE_INDEX, batch_order, split_eval, tokenize_examples
from llamalora.data import load_examples
from llamalora.packing import collate
from llamalora.tokenizer import BUNDLED_TOKENIZER_DIR

from conftest import write_jsonl

TOK = Tokenizer.from_file(str(BUNDLED_TOKENIZER_DIR / "tokenizer.json"))
EOT = 128009


def _labelled_text(t) -> list[str]:
    """Decodes each run of labelled tokens."""
    runs, cur = [], []
    for tok, lab in zip(t.input_ids, t.labels):
        if lab == IGNORE_INDEX:
            if cur:
                runs.append(cur)
                cur = []
        else:
            assert lab == tok
            cur.append(tok)
    if cur:
        runs.append(cur)
    return [TOK.decode(r, skip_special_tokens=False) for r in runs]


def test_loss_only_on_responses(tmp_path):
    recs = [
        {"instruction": "거푸집을 설명하세요.", "input": "", "output": "콘크리트를 굳히는 틀."},
        {"instruction": "Define", "input": "rebar", "output": "A steel bar."},
        {"instruction": "양생?", "output": "습도 유지.", "system": "짧게 답하세요."},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A1"},
                      {"role": "user", "content": "More"},
                      {"role": "assistant", "content": "두 번째"}]},
    ]
    examples, _ = load_examples(write_jsonl(tmp_path / "d.jsonl", recs))
    items, summary = tokenize_examples(TOK, examples, max_seq_length=512)
    assert [_labelled_text(t) for t in items] == [
        ["콘크리트를 굳히는 틀.<|eot_id|>"], ["A steel bar.<|eot_id|>"],
        ["습도 유지.<|eot_id|>"], ["A1<|eot_id|>", "두 번째<|eot_id|>"]]
    assert summary.records_over == 0
    # The prompt holds the system message and the input, and none of it has loss.
    first_prompt = TOK.decode(items[2].input_ids[:items[2].labels.index(
        next(x for x in items[2].labels if x != IGNORE_INDEX))], skip_special_tokens=False)
    assert first_prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "짧게 답하세요." in first_prompt


def test_train_on_prompt_and_image_token_never_labelled(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    recs = [{"instruction": "what?", "output": "black", "image": "a.png"}]
    examples, _ = load_examples(write_jsonl(tmp_path / "d.jsonl", recs))
    items, _ = tokenize_examples(TOK, examples, max_seq_length=512, train_on_prompt=True)
    t = items[0]
    assert 128256 in t.input_ids
    assert t.labels[t.input_ids.index(128256)] == IGNORE_INDEX
    assert sum(lab != IGNORE_INDEX for lab in t.labels) == len(t.input_ids) - 1


def test_truncation_modes(tmp_path):
    recs = [{"instruction": "a", "output": "word " * 100},
            {"instruction": "b " * 100, "output": "short"},
            {"instruction": "c", "output": "ok"}]
    examples, _ = load_examples(write_jsonl(tmp_path / "d.jsonl", recs))
    items, s = tokenize_examples(TOK, examples, max_seq_length=48)
    assert [t.line for t in items] == [1, 3] and max(len(t) for t in items) == 48
    assert s.records_over == 2 and s.records_dropped == 1 and s.dropped_lines == [2]
    items, s = tokenize_examples(TOK, examples, max_seq_length=48, truncation="drop")
    assert [t.line for t in items] == [3] and s.records_dropped == 2


def test_batch_order_is_seeded_grouped_and_complete():
    lengths = [(i * 37) % 101 for i in range(200)]
    a = batch_order(lengths, 4, seed=1, epoch=0)
    assert a == batch_order(lengths, 4, seed=1, epoch=0)
    assert a != batch_order(lengths, 4, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(200))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a) / len(a)
    assert spread < 10  # grouped: records in a batch have similar lengths


def test_collate_pads_to_longest():
    from llamalora.batching import Tokenized

    batch = collate([Tokenized(1, [1, 2, 3], [-100, 2, 3]), Tokenized(2, [4], [4])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_split_eval():
    train, ev = split_eval(10, 0.2, seed=0)
    assert len(ev) == 2 and sorted(train + ev) == list(range(10))
    assert split_eval(10, 0.0, seed=0) == (list(range(10)), [])
