"""Long-record training data from public instruction sets: records of about N tokens made by
concatenating their answers (the benchmarks of issue 31; the data is never committed).

    python3 benchmarks/make_long_data.py --tokens 3200 --records 64 --out .gpu/long3k.jsonl \
        /work/shared/data/alpaca_zh_demo.json /work/shared/data/koalpaca_v1_subset_2001.json

Each record asks to continue a text (`instruction`), gives the first source record's question as
`input`, and answers with source records' questions and answers one after another, in a seeded
shuffled order of every source (cycled where a record needs more than there is), cut so that the
record is `--tokens` tokens long in llamalora's training format (the bundled Llama 3.2 tokenizer
and chat template; a record can come out a few tokens short where a cut splits a character).
Sources are JSON arrays or JSONL of Alpaca records (instruction, input, output). Prints the
records' length statistics as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

INSTRUCTION = "다음 글을 이어서 써 주세요. / Continue the text."


def read_sources(paths: list[Path]) -> list[dict]:
    """Every record of the files, JSON arrays or JSONL, with a non-empty `output`."""
    records = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        rows = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
        records += [r for r in rows if isinstance(r, dict) and str(r.get("output", "")).strip()]
    if not records:
        sys.exit("no Alpaca record with an output in " + ", ".join(map(str, paths)))
    return records


def _piece(record: dict) -> str:
    question = " ".join(str(record.get(k, "")).strip() for k in ("instruction", "input"))
    return f"{question.strip()}\n\n{str(record['output']).strip()}"


def make_record(pieces, tokens: int, length_of, piece_tokens) -> dict:
    """One record of at most `tokens` tokens (`length_of(record)`), as close as a cut allows.
    Pieces are added by their own token counts (`piece_tokens`, about additive), then the answer
    is cut by bisection on the exact length: a 128k-token record takes seconds, not minutes."""
    first = next(pieces)
    record = {"instruction": INSTRUCTION, "input": first.split("\n\n", 1)[0][:300],
              "output": first}
    estimate = length_of(record)
    while True:
        while estimate < tokens:
            piece = next(pieces)
            record["output"] += "\n\n" + piece
            estimate += piece_tokens(piece) + 2
        estimate = length_of(record)
        if estimate >= tokens:
            break
    low, high = 1, len(record["output"])  # the longest cut of the answer that fits
    while low < high:
        middle = (low + high + 1) // 2
        if length_of({**record, "output": record["output"][:middle]}) <= tokens:
            low = middle
        else:
            high = middle - 1
    record["output"] = record["output"][:low]
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", nargs="+", type=Path, help="Alpaca JSON / JSONL files.")
    ap.add_argument("--tokens", type=int, required=True, help="Tokens a record.")
    ap.add_argument("--records", type=int, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from llamalora.tokenizer import load_tokenizer
    from speed import _training_length, data_stats

    tokenizer = load_tokenizer("bundled").tokenizer
    order = [_piece(r) for r in read_sources(args.sources)]
    random.Random(args.seed).shuffle(order)

    def cycle():
        while True:
            yield from order

    pieces = cycle()
    rows = [make_record(pieces, args.tokens, lambda r: _training_length(tokenizer, r),
                        lambda text: len(tokenizer.encode(text, add_special_tokens=False)))
            for _ in range(args.records)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                        encoding="utf-8")
    lengths = [_training_length(tokenizer, r) for r in rows]
    print(json.dumps({"out": str(args.out), **data_stats(lengths, args.tokens),
                      "min_tokens": min(lengths), "stdev": round(statistics.pstdev(lengths), 1)}))


if __name__ == "__main__":
    main()
