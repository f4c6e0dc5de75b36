"""`llamalora eval` and `llamalora serve` timed: eval's whole command against the same through
transformers' `generate`, and serve's first token and decode speed over HTTP against `chat`'s in
the same process.

    python3 benchmarks/eval_serve_speed.py make-run RUN --model /tmp/m11b --records 100
    python3 benchmarks/eval_serve_speed.py eval RUN --max-new-tokens 128
    python3 benchmarks/eval_serve_speed.py serve RUN --max-new-tokens 128 --repeat 5

`make-run` writes a run folder with a random LoRA adapter (r 8 on q/k/v/o, B drawn so that the
tuned answers differ from the base's) for MODEL's text model, without loading its weights: a
finished run's files as train writes them, the data it "held out" included. `eval` runs the
command (a subprocess, its wall time from start to exit, the load included) with the default
decoding and with `--decoding generate`; `serve` starts `llamalora serve RUN` on a free port,
streams each prompt `--repeat` times over HTTP, stops it, then times `ChatSession.ask` on the
same prompts in this process. Each prints a table and one JSON line; `--out DIR` keeps them.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PROMPTS = ["다음 건설 용어를 설명하세요.\n거푸집", "Define the construction term.\nrebar",
           "양생이란 무엇인가요?", "Explain step by step how a slump test is done."]


# --- the run ---------------------------------------------------------------------------------

def make_run(out: Path, model: str, records: int, rank: int = 8, seed: int = 0) -> None:
    """A finished run on `records` generated records (every one of them held out), with a random
    adapter for `model`'s text layers (shapes from its config on the meta device)."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, MllamaForCausalLM

    from llamalora.data import open_source
    from llamalora.families import family_of
    from llamalora.models.lora import lora_target_pattern
    from llamalora.models.names import resolve_model

    path = resolve_model(model)
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        base = (MllamaForCausalLM(config.text_config) if config.model_type == "mllama"
                else AutoModelForCausalLM.from_config(config))
    # train's pattern: the language model's projections, never the vision tower's
    lora = LoraConfig(r=rank, lora_alpha=32, lora_dropout=0.0, target_modules=lora_target_pattern(
        ["q_proj", "k_proj", "v_proj", "o_proj"], family_of(config).vision_parts))
    shapes = {k: v.shape for k, v in get_peft_model_state_dict(get_peft_model(base, lora)).items()}
    g = torch.Generator().manual_seed(seed)
    state = {k: (torch.randn(s, generator=g) * (0.02 if "lora_A" in k else 0.01)).to(
        torch.bfloat16).contiguous() for k, s in shapes.items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "adapter_model.safetensors"))
    lora.base_model_name_or_path = path
    lora.save_pretrained(str(out))
    data = out / "data.jsonl"
    speed = _speed_module()
    speed.make_data(data, records=records)
    lines = list(range(1, records + 1))
    record = {"base_model": path, "quant": "8bit", "data_sha256": open_source(data).fingerprint(),
              "config": {"data_path": str(data), "quant": "8bit", "max_seq_length": 512},
              "plan": {"held_out": {"data_path": str(data.resolve()), "image_root": None,
                                    "lines": lines}}}
    (out / "llamalora.json").write_text(json.dumps(record))
    print(f"wrote {out}: {len(state)} LoRA tensors, {records} records", flush=True)


def _speed_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("speed_benchmark",
                                                  ROOT / "benchmarks" / "speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- eval --------------------------------------------------------------------------------------

def time_eval(run: Path, args) -> list[dict]:
    rows = []
    for decoding in ("auto", "generate"):
        out = Path(args.out or "/tmp") / f"eval-{decoding}"
        command = [sys.executable, "-m", "llamalora", "eval", str(run), "--json", "--overwrite",
                   "--out", str(out), "--max-new-tokens", str(args.max_new_tokens),
                   "--batch-size", str(args.batch_size), "--decoding", decoding]
        if args.quant:
            command += ["--quant", args.quant]
        t0 = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if done.returncode:
            raise SystemExit(f"eval failed ({decoding}):\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout)
        t = result["timings"]
        rows.append({"decoding": result["settings"]["decoding"], "wall_s": round(wall, 1),
                     "load_s": t["load_s"], "answers_s": t["answers_s"],
                     "generated_tokens": t["generated_tokens"], "tokens_per_s": t["tokens_per_s"],
                     "records": result["summary"]["records"],
                     "tuned_chrf": round(result["summary"]["models"]["tuned"]["chrf"], 2),
                     "base_chrf": round(result["summary"]["models"]["base"]["chrf"], 2)})
        print(json.dumps(rows[-1]), flush=True)
    same = _predictions(Path(args.out or "/tmp") / "eval-auto") == _predictions(
        Path(args.out or "/tmp") / "eval-generate")
    print(f"\n| decoding | records | wall (whole command) | load | answers | tokens | tokens/s |"
          f"\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['decoding']} | {r['records']} | {r['wall_s']} s | {r['load_s']} s | "
              f"{r['answers_s']} s | {r['generated_tokens']} | {r['tokens_per_s']} |")
    print(f"\nthe two decodings' answers {'are identical' if same else 'differ'} "
          "(bf16 batches may round differently from one-at-a-time generate)")
    return rows


def _predictions(folder: Path) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    return [(r["tuned"], r["base"]) for r in rows]


# --- serve -------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stream(port: int, prompt: str, max_tokens: int) -> dict:
    """One streamed request: first token (from sending) and decode speed, client-side."""
    body = json.dumps({"model": "run", "stream": True, "temperature": 0,
                       "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": prompt}]})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    first = last = None
    tokens = 0
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
            last = time.perf_counter()
            first = first or last
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    conn.close()
    return {"first_token_s": first - t0, "tokens": tokens,
            "tokens_per_s": (tokens - 1) / (last - first) if last > first else 0.0}


def _in_process(run: Path, args) -> list[list[dict]]:
    from llamalora.chat import GenerationOptions, open_chat

    from llamalora.adapters import find_adapter
    from llamalora.plan import load_model_config

    # As serve loads it: with the vision tower where the base has one.
    config, _ = load_model_config(find_adapter(run).base_model)
    session = open_chat(run, quant=args.quant, merge=False,
                        with_vision=getattr(config, "model_type", None) == "mllama")
    options = GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=0)
    out = []
    for prompt in PROMPTS:
        rows = []
        for _ in range(args.repeat + 1):
            session.reset()
            seen: list[float] = []
            t0 = time.perf_counter()
            reply = session.ask(prompt, options=options,
                                on_text=lambda t: seen.append(time.perf_counter()))
            end = time.perf_counter()
            rows.append({"first_token_s": seen[0] - t0, "tokens": reply.new_tokens,
                         "tokens_per_s": (reply.new_tokens - 1) / (end - seen[0])})
        out.append(rows)
    return out


def time_serve(run: Path, args) -> dict:
    port = _free_port()
    command = [sys.executable, "-m", "llamalora", "serve", f"run={run}", "--port", str(port)]
    if args.quant:
        command += ["--quant", args.quant]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    try:
        t0 = time.perf_counter()
        while True:
            if server.poll() is not None:
                raise SystemExit(f"serve exited:\n{server.stderr.read()[-3000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        started = time.perf_counter() - t0
        http_rows = [[_stream(port, p, args.max_new_tokens) for _ in range(args.repeat + 1)]
                     for p in PROMPTS]
    finally:
        server.terminate()
        server.wait(timeout=60)
    chat_rows = _in_process(run, args)
    return _serve_table(http_rows, chat_rows, started)


def _serve_table(http_rows, chat_rows, started: float) -> dict:
    def summary(rows):
        first_call = [r[0] for r in rows]  # each prompt's first: a new prefill bucket's capture
        warm = [x for r in rows for x in r[1:]]
        return {"first_token_s": statistics.median(x["first_token_s"] for x in warm),
                "tokens_per_s": statistics.median(x["tokens_per_s"] for x in warm),
                "first_call_first_token_s": max(x["first_token_s"] for x in first_call),
                "tokens": statistics.median(x["tokens"] for x in warm)}

    h, c = summary(http_rows), summary(chat_rows)
    result = {"serve_start_s": round(started, 1), "http": h, "chat": c,
              "first_token_ratio": h["first_token_s"] / c["first_token_s"],
              "tokens_per_s_ratio": h["tokens_per_s"] / c["tokens_per_s"]}
    print("\n| | first token (median) | decode tokens/s (median) | slowest first call | "
          "tokens |\n|---|---|---|---|---|")
    for name, s in (("serve over HTTP (stream)", h), ("chat in process", c)):
        print(f"| {name} | {1000 * s['first_token_s']:.1f} ms | {s['tokens_per_s']:.1f} | "
              f"{1000 * s['first_call_first_token_s']:.0f} ms | {s['tokens']:.0f} |")
    print(f"\nHTTP / in-process: first token x{result['first_token_ratio']:.3f}, tokens/s "
          f"x{result['tokens_per_s_ratio']:.3f} (target: within 10%); serve ready after "
          f"{started:.1f} s")
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["make-run", "eval", "serve"])
    ap.add_argument("run", type=Path)
    ap.add_argument("--model", default="tiny", help="make-run: the base model")
    ap.add_argument("--records", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quant", default=None, help="eval/serve: override the run's (8bit)")
    ap.add_argument("--out", default=None, help="a folder for the eval outputs and JSON lines")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.what == "make-run":
        make_run(args.run, args.model, args.records)
        return
    result = time_eval(args.run, args) if args.what == "eval" else time_serve(args.run, args)
    line = json.dumps({"what": args.what, "result": result})
    print(line)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"{args.what}.json").write_text(line + "\n")


if __name__ == "__main__":
    main()
