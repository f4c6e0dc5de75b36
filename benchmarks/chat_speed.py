"""Time to first token and decode speed of `llamalora chat` against plain `generate`.

    python3 benchmarks/chat_speed.py RUN_DIR [--merged MERGED_DIR] [--quants 8bit none]

For each base (the run's adapter unmerged at each --quants, and the merged folder at each --quants)
the model is loaded once; llamalora's ChatSession.ask and a plain `model.generate` with the same
prompt ids and greedy decoding then run alternately, `--repeat` times each, on the same model
object. The first ask (which captures the CUDA graph) is reported on its own. Then both decode
`--max-new-tokens` greedy tokens with no stop token and the tokens are compared: `same_tokens`
is how many lead the two sequences alike, and `max_logit_diff` the largest difference between
the two paths' logits over that shared prefix (teacher-forced), which says whether a later
divergence is a near-tie on a random model or a bug. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "다음 건설 용어를 설명하세요.\n거푸집"


class _Clock:
    """A streamer that only notes when the first generated token arrives."""

    def __init__(self):
        self.start = time.perf_counter()
        self.first = None
        self.seen_prompt = False

    def put(self, value):
        if not self.seen_prompt:
            self.seen_prompt = True
        elif self.first is None:
            self.first = time.perf_counter()

    def end(self):
        pass


def plain_generate(model, ids, max_new_tokens, tokens=None):
    import torch

    clock = _Clock()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=128004, streamer=clock)
    torch.cuda.synchronize()
    end = time.perf_counter()
    n = out.shape[1] - ids.shape[1]
    if tokens is not None:
        tokens.extend(out[0, ids.shape[1]:].tolist())
    return clock.first - clock.start, (n - 1) / (end - clock.first), n


def compare_tokens(model, decoder, ids, max_new_tokens):
    """(same leading tokens, largest logit difference over them) of ours against generate."""
    import torch

    plain = []
    plain_generate(model, ids, max_new_tokens, plain)
    ours = list(decoder.generate(ids[0].tolist(), max_new_tokens=max_new_tokens, stop_ids=[],
                                 choose=lambda logits: logits.argmax(-1)))
    same = next((i for i, (a, b) in enumerate(zip(ours, plain)) if a != b), len(plain))
    # Teacher-forced over the shared prefix plus one: the full sequence through the model
    # once (its logits) against ours at each step.
    seq = torch.cat([ids, torch.tensor([plain[:same + 1]], device=ids.device)], dim=1)
    mine = []

    def forced(logits):  # keeps our logits, feeds generate's token
        mine.append(logits[0].clone())  # the graph's output buffer is rewritten each step
        return torch.tensor([plain[len(mine) - 1]], device=ids.device)

    with torch.inference_mode():
        full = model(input_ids=seq).logits[0, ids.shape[1] - 1:-1].float()
        list(decoder.generate(ids[0].tolist(), max_new_tokens=min(same + 1, len(plain)),
                              stop_ids=[], choose=forced))
    diff = (torch.stack(mine) - full[:len(mine)]).abs().max().item()
    return same, diff


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--merged", type=Path)
    ap.add_argument("--quants", nargs="+", default=["8bit", "none"])
    ap.add_argument("--merged-quants", nargs="+", default=None,
                    help="Quantizations for the merged model (default: --quants).")
    ap.add_argument("--only-merged", action="store_true",
                    help="Time only the merged model (needs --merged).")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--kernels", default="auto", help="llamalora's side: auto, fast or plain")
    args = ap.parse_args()

    import torch

    from llamalora.adapters import apply_adapter, find_adapter
    from llamalora.chat import ChatSession, GenerationOptions
    from llamalora.models import load_model_for_inference
    from llamalora.tokenizer import load_model_tokenizer

    info = find_adapter(args.run)
    tokenizer, _ = load_model_tokenizer(info.base_model)
    rows = []
    setups = [] if args.only_merged else [(q, "adapter") for q in args.quants]
    if args.merged:
        setups += [(q, "merged") for q in (args.merged_quants or args.quants)]
    for quant, kind in setups:
        t0 = time.perf_counter()
        path = info.base_model if kind == "adapter" else str(args.merged)
        model, load = load_model_for_inference(path, quant=quant)
        if kind == "adapter":
            model = apply_adapter(model, info.folder)
        load_s = time.perf_counter() - t0
        from llamalora import fastlinear

        kernels = fastlinear.enable(model, args.kernels)
        session = ChatSession(model=model, tokenizer=tokenizer, image_processor=None,
                              device=load["device"], base_model=path, adapter=None, quant=quant,
                              kernels=kernels)
        ids = torch.tensor([session.prompt_ids(PROMPT)], device=load["device"])
        # min_new_tokens keeps both paths generating the same count on a random model.
        options = GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=0)
        ours = []
        for _ in range(args.repeat + 1):  # the first ask captures the graph (and autotunes)
            session.reset()
            reply = session.ask(PROMPT, options=options)
            ours.append((reply.first_token_s, reply.decode_tokens_per_s, reply.new_tokens))
        first_ours, ours = ours[0], ours[1:]
        # generate on the same kernels isolates the decoding path; generate on bitsandbytes'
        # own layers is what chat ran before (the reference). The layers are switched only
        # after llamalora's runs: the captured graph holds the kernels' buffers.
        same, logit_diff = compare_tokens(model, session.static_decoder, ids,
                                          args.max_new_tokens)
        generate_fast = [plain_generate(model, ids, args.max_new_tokens)
                         for _ in range(args.repeat)]
        fastlinear.disable(model)
        plain = [plain_generate(model, ids, args.max_new_tokens)
                 for _ in range(args.repeat + 1)][1:]
        row = {"quant": quant, "kind": kind, "kernels": kernels, "decoding": session.decoding,
               "load_s": round(load_s, 1),
               "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
               "first_ask_ttft_s": round(first_ours[0], 4),
               "first_ask_decode_tok_s": round(first_ours[1], 1),
               "same_tokens": f"{same}/{args.max_new_tokens}",
               "max_logit_diff": round(logit_diff, 4)}
        for name, runs in (("llamalora", ours), ("generate_same_kernels", generate_fast),
                           ("plain", plain)):
            row[f"{name}_ttft_s"] = round(statistics.median(r[0] for r in runs), 4)
            row[f"{name}_decode_tok_s"] = round(statistics.median(r[1] for r in runs), 1)
            row[f"{name}_tokens"] = runs[-1][2]
        rows.append(row)
        print(row, flush=True)
        del model, session
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    print(f"{'setup':<16}{'ours ttft':>10}{'ours tok/s':>12}{'plain ttft':>12}{'plain tok/s':>13}"
          f"{'ratio':>7}")
    for r in rows:
        ratio = r["llamalora_decode_tok_s"] / r["plain_decode_tok_s"]
        print(f"{r['quant'] + ' ' + r['kind']:<16}{r['llamalora_ttft_s']:>10.3f}"
              f"{r['llamalora_decode_tok_s']:>12.1f}{r['plain_ttft_s']:>12.3f}"
              f"{r['plain_decode_tok_s']:>13.1f}{ratio:>7.2f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
