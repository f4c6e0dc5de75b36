"""Time to first token and decode speed of `llamalora chat` against plain `generate`.

    python3 benchmarks/chat_speed.py RUN_DIR [--merged MERGED_DIR] [--quants 8bit none]

For each base (the run's adapter unmerged at each --quants, and the merged folder at each --quants)
the model is loaded once; llamalora's ChatSession.ask and a plain `model.generate` with the same
prompt ids and greedy decoding then run alternately, `--repeat` times each, on the same model
object. The first ask (which captures the CUDA graphs) is reported on its own. Then both decode
`--max-new-tokens` greedy tokens with no stop token and are compared (`compare_tokens` says
how), and one eager decoding step is profiled: its kernel count and GPU time. Prints a table and
one JSON line.
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


def _eos_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def _pad_id(model) -> int:
    pad = model.generation_config.pad_token_id
    return pad if pad is not None else (_eos_ids(model) or [0])[0]


def plain_generate(model, ids, max_new_tokens, tokens=None):
    import torch

    clock = _Clock()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=_pad_id(model), streamer=clock)
    torch.cuda.synchronize()
    end = time.perf_counter()
    n = out.shape[1] - ids.shape[1]
    if tokens is not None:
        tokens.extend(out[0, ids.shape[1]:].tolist())
    return clock.first - clock.start, (n - 1) / (end - clock.first), n


def compare_tokens(model, decoder, ids, max_new_tokens):
    """How ours agrees with generate over `max_new_tokens` greedy tokens (no stop token: both
    sides mask the end-of-sequence ids, as `min_new_tokens` does for generate).

    Returns same (leading tokens alike), ours_diff (the largest difference of our logits from
    one full forward over the shared prefix, teacher-forced), generate_diff (the same for
    generate's own incremental logits: bf16's noise floor) and gap (at the first difference,
    by how much the full forward prefers generate's token to ours: a near-tie is ~noise).
    """
    import torch

    with torch.inference_mode():
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=_pad_id(model), output_logits=True,
                             return_dict_in_generate=True)
    plain = gen.sequences[0, ids.shape[1]:].tolist()
    gen_logits = torch.stack([x[0].float() for x in gen.logits])
    eos = _eos_ids(model)

    def greedy(logits):
        logits = logits.clone()
        logits[..., eos] = float("-inf")
        return logits.argmax(-1)

    ours = list(decoder.generate(ids[0].tolist(), max_new_tokens=max_new_tokens, stop_ids=[],
                                 choose=greedy))
    same = next((i for i, (a, b) in enumerate(zip(ours, plain)) if a != b), len(plain))
    n = min(same + 1, len(plain))
    mine = []

    def forced(logits):  # keeps our logits, feeds generate's token
        mine.append(logits[0].clone())  # the graph's output buffer is rewritten each step
        return torch.tensor([plain[len(mine) - 1]], device=ids.device)

    seq = torch.cat([ids, torch.tensor([plain[:n]], device=ids.device)], dim=1)
    with torch.inference_mode():
        full = model(input_ids=seq).logits[0, ids.shape[1] - 1:-1].float()
        list(decoder.generate(ids[0].tolist(), max_new_tokens=n, stop_ids=[], choose=forced))
    result = {"same_tokens": f"{same}/{len(plain)}",
              "ours_logit_diff": round((torch.stack(mine) - full).abs().max().item(), 4),
              "generate_logit_diff": round((gen_logits[:n] - full).abs().max().item(), 4)}
    if same < len(plain):
        result["gap_at_first_difference"] = round(
            (full[same, plain[same]] - full[same, ours[same]]).item(), 4)
    return result


def kernel_profile(decoder, ids):
    """Kernels and their summed GPU time in one eager decoding step (what the graph replays)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    graphs = decoder.graphs
    decoder.graphs = False
    list(decoder.generate(ids[0].tolist(), max_new_tokens=2, stop_ids=[],
                          choose=lambda logits: logits.argmax(-1)))
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        decoder._decode(torch.tensor([ids[0, -1].item()], device=ids.device),
                        ids.shape[1])
        torch.cuda.synchronize()
    decoder.graphs = graphs
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_ms = sum(e.device_time for e in kernels) / 1e3
    return {"step_kernels": len(kernels), "step_kernel_ms": round(total_ms, 2)}


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
    ap.add_argument("--prompt", default=PROMPT, help="The user turn (default: a Korean "
                    "glossary question).")
    args = ap.parse_args()

    import torch

    from llamalora.adapters import apply_adapter, find_adapter
    from llamalora.chat import ChatSession, GenerationOptions, merge_for_decoding
    from llamalora.models.loading import load_model_for_inference
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
        merged = False
        if kind == "adapter":
            model = apply_adapter(model, info.folder)
            merged = merge_for_decoding(model)  # as chat does (bf16 base only)
        load_s = time.perf_counter() - t0
        from llamalora.quant import fastlinear

        kernels = fastlinear.enable(model, args.kernels)
        session = ChatSession(model=model, tokenizer=tokenizer, image_processor=None,
                              device=load["device"], base_model=path, adapter=None, quant=quant,
                              kernels=kernels, lora_merged=merged)
        ids = torch.tensor([session.prompt_ids(args.prompt)], device=load["device"])
        # min_new_tokens keeps both paths generating the same count on a random model.
        options = GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=0)
        ours = []
        for _ in range(args.repeat + 1):  # the first ask captures the graph (and autotunes)
            session.reset()
            reply = session.ask(args.prompt, options=options)
            ours.append((reply.first_token_s, reply.decode_tokens_per_s, reply.new_tokens))
        first_ours, ours = ours[0], ours[1:]
        if merged:  # the comparisons below run on the adapter as trained, unmerged
            model.unmerge_adapter()
            session.static_decoder._graphs.clear()  # the captures have no LoRA kernels
        # generate on the same kernels isolates the decoding path; generate on bitsandbytes'
        # own layers is what chat ran before (the reference). The layers are switched only
        # after llamalora's runs: the captured graph holds the kernels' buffers.
        agreement = compare_tokens(model, session.static_decoder, ids, args.max_new_tokens)
        profile_row = kernel_profile(session.static_decoder, ids)
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
               **agreement, **profile_row}
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
