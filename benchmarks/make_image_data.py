"""Writes a small image + text data set (images drawn here, no download) for vision runs.

    python3 benchmarks/make_image_data.py /tmp/imgdata --records 16

Each record asks about the colour and shape of a generated picture; sizes vary so the processor
makes 1 to 4 tiles.
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
    args = ap.parse_args()

    from PIL import Image, ImageDraw

    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    with (args.out / "data.jsonl").open("w", encoding="utf-8") as f:
        for i in range(args.records):
            color = rng.choice(list(COLORS))
            w, h = rng.choice(SIZES)
            im = Image.new("RGB", (w, h), (245, 245, 245))
            ImageDraw.Draw(im).ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4],
                                       fill=COLORS[color])
            name = f"img{i:03d}.png"
            im.save(args.out / name)
            f.write(json.dumps({"instruction": "이 그림에 무엇이 있나요? 색과 모양을 말하세요.",
                                "output": f"{color} 원이 {w}x{h} 크기의 흰 바탕 가운데에 있습니다.",
                                "image": name}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
