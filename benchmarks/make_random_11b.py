"""Writes a random-weight checkpoint of the Llama 3.2 11B Vision architecture (no download).

    python3 benchmarks/make_random_11b.py /tmp/m11b            # ~21 GB of bf16 safetensors

`MllamaConfig()` defaults are the 11B (10.6B parameters); the vision tiles are set to 560 pixels as
in the released model. The folder gets the bundled Llama 3.2 tokenizer and a 560-pixel image
processor, so llamalora treats it like the hub model. Weights are initialised on the GPU when there
is one (seconds), else on the CPU (minutes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=0,
                    help="Override the text layer count (0: the 11B's 40) for quick checks.")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer, MllamaForConditionalGeneration

    from llamalora.families.mllama import default_config as mllama_default_config
    from llamalora.tokenizer import bundled_tokenizer_dir

    t0 = time.perf_counter()
    config = mllama_default_config()
    config.text_config.pad_token_id = 128004
    if args.layers:
        config.text_config.num_hidden_layers = args.layers
        config.text_config.cross_attention_layers = [
            i for i in config.text_config.cross_attention_layers if i < args.layers]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    # Built directly in bf16: an fp32 build of 10.6B parameters would need 42 GB first.
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = MllamaForConditionalGeneration(config)
    torch.set_default_dtype(torch.float32)
    n = sum(p.numel() for p in model.parameters())
    print(f"built {n / 1e9:.2f}B parameters on {device} in {time.perf_counter() - t0:.1f} s",
          flush=True)
    model.save_pretrained(args.out, safe_serialization=True)
    AutoTokenizer.from_pretrained(bundled_tokenizer_dir()).save_pretrained(args.out)
    try:
        from transformers import MllamaImageProcessor

        MllamaImageProcessor(size={"height": 560, "width": 560}, max_image_tiles=4
                             ).save_pretrained(args.out)
    except ImportError as exc:  # the processor needs torchvision or PIL backends
        print(f"no image processor saved ({exc})", flush=True)
    print(f"saved to {args.out} in {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
