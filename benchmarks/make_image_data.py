"""Writes a small image + text data set (images drawn here, no download) for vision runs.

    python3 benchmarks/make_image_data.py /tmp/imgdata --records 16

Each record asks about the colour and shape of a generated picture; sizes vary so the processor
makes 1 to 4 tiles. `--mixed`: every third record has no image and every third two (a two-turn
conversation, one picture a turn), for packing's mixed batches.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

COLORS = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 170, 60),
          "yellow": (230, 200, 40)}
SIZES = [(560, 560), (1120, 560), (560, 1120), (800, 600), (300, 300)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--records", type=int, default=16)
    ap.add_argument("--mixed", action="store_true")
    args = ap.parse_args()

    from PIL import Image, ImageDraw

    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    question = "이 그림에 무엇이 있나요? 색과 모양을 말하세요."

    def picture(name: str) -> str:
        color = rng.choice(list(COLORS))
        w, h = rng.choice(SIZES)
        im = Image.new("RGB", (w, h), (245, 245, 245))
        ImageDraw.Draw(im).ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=COLORS[color])
        im.save(args.out / name)
        return f"{color} 원이 {w}x{h} 크기의 흰 바탕 가운데에 있습니다."

    with (args.out / "data.jsonl").open("w", encoding="utf-8") as f:
        for i in range(args.records):
            kind = i % 3 if args.mixed else 1
            if kind == 0:
                record = {"instruction": "거푸집이란 무엇인가요?",
                          "output": "콘크리트를 부어 원하는 모양으로 굳히기 위한 임시 틀입니다."}
            elif kind == 1:
                name = f"img{i:03d}.png"
                record = {"instruction": question, "output": picture(name), "image": name}
            else:
                names = [f"img{i:03d}a.png", f"img{i:03d}b.png"]
                answers = [picture(n) for n in names]
                record = {"messages": [
                    {"role": "user", "content": "<image>" + question},
                    {"role": "assistant", "content": answers[0]},
                    {"role": "user", "content": "<image>이 그림은요?"},
                    {"role": "assistant", "content": answers[1]}], "images": names}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
