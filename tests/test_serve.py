"""`llamalora serve`: a real uvicorn on 127.0.0.1 with the tiny model and two adapters, driven by
the official `openai` client and by raw HTTP; and the request checks on their own (fast)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llamalora.serve import (ApiError, Engine, Limits, RequestQueue, StopText, adapter_names,
                             check_host, parse_request)

KEY = "test-key-0123"
PROMPTS = ["What is rebar?", "거푸집이란?", "Define slump.", "What is grout?"]


# --- fast: the checks, without a model -------------------------------------------------------

class _Session:
    image_processor = None


def _engine() -> Engine:
    return Engine(_Session(), {"a": "default", "b": "b"})


def _body(**fields) -> dict:
    return {"model": "a", "messages": [{"role": "user", "content": "hi"}], **fields}


def _refused(body, status=400, param=None) -> ApiError:
    with pytest.raises(ApiError) as caught:
        parse_request(body, _engine(), Limits(max_tokens=64))
    assert caught.value.status == status
    if param is not None:
        assert caught.value.param == param
    assert set(caught.value.body()["error"]) == {"message", "type", "param", "code"}
    return caught.value


def test_requests_are_checked_field_by_field():
    r = parse_request(_body(temperature=0, stop="\n", max_tokens=7, stream=True,
                            stream_options={"include_usage": True}, seed=3, user="x"),
                      _engine(), Limits())
    assert (r.temperature, r.stops, r.max_tokens, r.stream, r.include_usage) == (
        0.0, ["\n"], 7, True, True)
    r = parse_request({"model": "base", "messages": [
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "a"},
        {"role": "assistant", "content": [{"type": "text", "text": "b"}]},
        {"role": "user", "content": "c"}]}, _engine(), Limits())
    assert r.system == "Be brief." and r.turns == [("user", "a"), ("assistant", "b"),
                                                  ("user", "c")]
    assert (r.temperature, r.top_p, r.max_tokens) == (1.0, 1.0, 512)  # OpenAI's defaults
    assert _refused({"model": "zz", "messages": []}, 404, "model").code == "model_not_found"
    _refused({"messages": []}, 400, "model")
    _refused(_body(max_tokens=65), 400, "max_tokens")
    _refused(_body(max_tokens=0), 400, "max_tokens")
    _refused(_body(temperature=3), 400, "temperature")
    _refused(_body(top_p=0), 400, "top_p")
    _refused(_body(stop=["a", "b", "c", "d", "e"]), 400, "stop")
    _refused(_body(n=2), 400, "n")
    _refused(_body(messages=[{"role": "assistant", "content": "x"}]), 400)
    _refused(_body(messages=[{"role": "user", "content": "x"}, {"role": "system",
                                                                 "content": "late"}]), 400)
    _refused(_body(messages=[{"role": "tool", "content": "x"}]), 400)
    # Images: refused where the model takes none, and never fetched from a URL.
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    assert "takes no images" in _refused(_body(messages=[
        {"role": "user", "content": [image]}])).message


def test_an_image_url_is_never_fetched_and_paths_stay_inside_the_root(tmp_path):
    from PIL import Image

    class Vision:
        image_processor = object()

        def check_image(self, path):
            return path

    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (8, 8), "red").save(root / "r.png")
    engine = Engine(Vision(), {"a": "default"}, image_root=root)

    def parts(url):
        return {"model": "a", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": url}}]}]}

    r = parse_request(parts("r.png"), engine, Limits())
    assert r.images == [root / "r.png"] and r.turns[0][1] == "What is this?<|image|>"
    for url, words in (("http://169.254.169.254/x.png", "fetches no URLs"),
                       ("../../etc/passwd", "outside"), ("data:text/plain;base64,AA", "data:")):
        with pytest.raises(ApiError, match=words):
            parse_request(parts(url), engine, Limits())
    import base64
    import io

    png = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    r = parse_request(parts(url), Engine(Vision(), {"a": "default"}), Limits())
    assert r.images[0].read_bytes() == png.getvalue()
    r.tmp.cleanup()
    assert not r.images[0].exists()


def test_stop_strings_cut_the_stream_and_hold_back_what_may_begin_one():
    stop = StopText(["END", "\n\n"])
    assert stop.feed("Hello E") == "Hello "  # "E" may begin "END"
    assert stop.feed("x") == "Ex"
    assert stop.feed("yz\n") == "yz"
    assert stop.feed("\nmore") == "" and stop.hit
    assert stop.text[:stop.sent] == "Hello Exyz"
    plain = StopText(["END"])
    assert plain.feed("ab EN") == "ab " and plain.rest() == "EN" and not plain.hit


def test_a_full_queue_answers_503_with_retry_after():
    queue = RequestQueue(limit=1)
    queue.take()
    queue.take()  # one generating, one waiting
    with pytest.raises(ApiError) as caught:
        queue.take()
    assert caught.value.status == 503 and caught.value.headers == {"Retry-After": "1"}


def test_names_and_hosts():
    assert adapter_names(["runs/demo", "legal=out/x/"]) == [("demo", "runs/demo"),
                                                            ("legal", "out/x/")]
    for bad in (["a", "x/a"], ["base=runs/x"], ["=runs/x"]):
        with pytest.raises(Exception, match="NAME=PATH"):
            adapter_names(bad)
    check_host("127.0.0.1", None)
    check_host("0.0.0.0", "k")
    with pytest.raises(Exception, match="--api-key"):
        check_host("0.0.0.0", None)


def test_a_public_host_without_a_key_is_refused():
    from typer.testing import CliRunner

    from llamalora.cli.main import app

    r = CliRunner().invoke(app, ["serve", "x", "--host", "0.0.0.0"])
    assert r.exit_code == 2 and r.stderr.startswith("Error: --host 0.0.0.0")
    assert "--api-key" in r.stderr


# --- slow: a real server ---------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, _session_home):
    from test_eval import RECORDS, make_run

    from conftest import write_jsonl

    os.environ["LLAMALORA_HOME"] = str(_session_home / "llamalora")
    tmp = tmp_path_factory.mktemp("serve")
    data = write_jsonl(tmp / "d.jsonl", RECORDS)
    return {name: make_run(tmp / name, data, None, seed=seed)
            for name, seed in (("a", 1), ("b", 2))}


@pytest.fixture(scope="module")
def server(adapters, _session_home):
    port = _free_port()
    env = {**os.environ, "LLAMALORA_HOME": str(_session_home / "llamalora"),
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llamalora", "serve", f"a={adapters['a']}", f"b={adapters['b']}",
         "--port", str(port), "--quant", "none", "--api-key", KEY, "--max-tokens", "1024",
         "--max-context", "2048", "--max-queue", "8", "--max-request-mb", "0.05"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited: {proc.stdout.read()}")
            try:
                status, _, body = _http(port, "GET", "/health")
                if status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not start in 180 s"
            time.sleep(0.5)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.returncode is not None


def _http(port: int, method: str, path: str, body: bytes | None = None, key: str | None = KEY,
          headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    head = {"Content-Type": "application/json", **(headers or {})}
    if key is not None:
        head["Authorization"] = f"Bearer {key}"
    conn.request(method, path, body=body, headers=head)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, dict(response.getheaders()), json.loads(data) if data else None


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def expected(adapters):
    """Each model's greedy answer to each prompt, from `chat`'s session in this process: one
    model per adapter, loaded on its own (so the server's switching is checked against it)."""
    from llamalora.chat import GenerationOptions, open_chat

    options = GenerationOptions(max_new_tokens=12, temperature=0)
    out = {}
    for name in ("a", "b", "base"):
        session = open_chat(adapters["b" if name == "b" else "a"], quant="none",
                            no_adapter=name == "base")
        for prompt in PROMPTS:
            session.reset()
            reply = session.ask(prompt, options=options)
            out[name, prompt] = (reply.text, reply.prompt_tokens, reply.new_tokens)
    return out


def _ask(client, model, prompt, **kwargs):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], temperature=0,
        max_tokens=12, **kwargs)


def _streamed(client, model, prompt, **kwargs):
    text, chunks = "", []
    for chunk in _ask(client, model, prompt, stream=True, **kwargs):
        chunks.append(chunk)
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    return text, chunks


@pytest.mark.slow
def test_models_and_answers_of_two_adapters_and_the_base(client, expected):
    assert [m.id for m in client.models.list()] == ["a", "b", "base"]
    for model in ("a", "b", "base", "a"):  # back to a: switching, not a reload
        for prompt in PROMPTS[:2]:
            text, prompt_tokens, new_tokens = expected[model, prompt]
            reply = _ask(client, model, prompt)
            assert reply.choices[0].message.content == text
            assert reply.model == model and reply.choices[0].message.role == "assistant"
            assert reply.usage.prompt_tokens == prompt_tokens
            assert reply.usage.completion_tokens == new_tokens
            assert reply.usage.total_tokens == prompt_tokens + new_tokens
            assert reply.choices[0].finish_reason == ("length" if new_tokens == 12 else "stop")
    answers = {expected[m, PROMPTS[0]][0] for m in ("a", "b", "base")}
    assert len(answers) == 3  # three different models answered


@pytest.mark.slow
def test_streaming_gives_the_same_answer_and_the_usage(client, expected):
    text, chunks = _streamed(client, "b", PROMPTS[1])
    assert text == expected["b", PROMPTS[1]][0]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert chunks[-1].usage.completion_tokens == expected["b", PROMPTS[1]][2]
    text, chunks = _streamed(client, "a", PROMPTS[0], stream_options={"include_usage": True})
    assert text == expected["a", PROMPTS[0]][0]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens > 0


@pytest.mark.slow
def test_stop_strings(client, expected):
    full = expected["a", PROMPTS[2]][0]
    stop = full[4:7]
    cut = full[:full.index(stop)]
    reply = _ask(client, "a", PROMPTS[2], stop=[stop, "never-said"])
    assert reply.choices[0].message.content == cut
    assert reply.choices[0].finish_reason == "stop"
    text, chunks = _streamed(client, "a", PROMPTS[2], stop=stop)
    assert text == cut and chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_eight_concurrent_clients_each_get_their_own_answer(client, expected):
    jobs = [(("a", "b", "base")[k % 3], PROMPTS[k % 4], k % 2 == 0) for k in range(8)]
    results: dict[int, str] = {}

    def run(k, model, prompt, stream):
        results[k] = _streamed(client, model, prompt)[0] if stream else \
            _ask(client, model, prompt).choices[0].message.content

    threads = [threading.Thread(target=run, args=(k, *job)) for k, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert {k: results.get(k) for k in range(8)} == {
        k: expected[model, prompt][0] for k, (model, prompt, _) in enumerate(jobs)}


@pytest.mark.slow
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, client, expected):
    port = server
    status, _, body = _http(port, "POST", "/v1/chat/completions", b'{"model": "a", ')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    ok = json.dumps({"model": "a", "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, _, body = _http(port, "POST", "/v1/chat/completions",
                            ok.replace(b'"a"', b'"nope"'))
    assert status == 404 and body["error"]["code"] == "model_not_found"
    huge = json.dumps({"model": "a", "messages": [{"role": "user",
                                                   "content": "x" * 60_000}]}).encode()
    status, _, body = _http(port, "POST", "/v1/chat/completions", huge)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    long = json.dumps({"model": "a", "max_tokens": 1024, "messages": [
        {"role": "user", "content": "word " * 5000}]}).encode()
    status, _, body = _http(port, "POST", "/v1/chat/completions", long)
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    status, _, body = _http(port, "POST", "/v1/chat/completions",
                            ok.replace(b"}]}", b'}], "max_tokens": 5000}'))
    assert status == 400 and body["error"]["param"] == "max_tokens"
    for key in (None, "wrong-key"):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
            status, _, body = _http(port, method, path, ok if method == "POST" else None,
                                    key=key)
            assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, _, body = _http(port, "GET", "/health", key=None)  # open: it tells nothing
    assert status == 200 and body["status"] == "ok"
    status, _, body = _http(port, "GET", "/v1/nothing")
    assert status == 404 and "error" in body
    reply = _ask(client, "a", PROMPTS[0])  # still serving
    assert reply.choices[0].message.content == expected["a", PROMPTS[0]][0]


@pytest.mark.slow
def test_a_client_that_leaves_before_a_whole_reply_frees_its_slot(server, client):
    """Not streamed: the connection closes while the answer is made; the generation stops at
    its next token, long before its 1,000 tokens."""
    port = server
    body = json.dumps({"model": "a", "max_tokens": 1000, "temperature": 0,
                       "messages": [{"role": "user", "content": "Tell me everything."}]})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    started = time.monotonic()
    while _http(port, "GET", "/health")[2]["queued"] == 0:  # it has been taken
        assert time.monotonic() - started < 60
        time.sleep(0.05)
    conn.close()
    left = time.monotonic()
    while _http(port, "GET", "/health")[2]["queued"] != 0:
        assert time.monotonic() - left < 60
        time.sleep(0.1)
    freed = time.monotonic() - left
    t0 = time.monotonic()
    _ask(client, "a", PROMPTS[0])
    per_token = (time.monotonic() - t0) / 12
    assert freed < 1000 * per_token / 4, (freed, per_token)


@pytest.mark.slow
def test_clients_that_leave_free_their_slots_and_a_full_queue_gets_503(server, client,
                                                                      expected):
    """Long streams are cut after their first chunks; the ones past the queue get 503 with
    Retry-After. The cut generations stop at their next token: the queue empties long before
    their 1,000 tokens could have been generated."""
    port = server
    body = json.dumps({"model": "a", "stream": True, "max_tokens": 1000, "temperature": 0,
                       "messages": [{"role": "user", "content": "Tell me everything."}]})
    conns, statuses = [], []
    for _ in range(11):  # 1 generating + 8 waiting fit; the last 2 do not
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Authorization": f"Bearer {KEY}",
                              "Content-Type": "application/json"})
        conns.append(conn)
    responses = [c.getresponse() for c in conns]
    statuses = [r.status for r in responses]
    assert statuses.count(503) == 2 and statuses.count(200) == 9, statuses
    busy = next(r for r in responses if r.status == 503)
    assert busy.getheader("Retry-After") == "1"
    assert json.loads(busy.read())["error"]["code"] == "server_busy"
    first = responses[0]
    assert first.readline().startswith(b"data: ")  # the stream has begun
    started = time.monotonic()
    for c in conns:
        c.close()  # every client leaves
    while True:
        status, _, health = _http(port, "GET", "/health")
        if health["queued"] == 0:
            break
        assert time.monotonic() - started < 60, health
        time.sleep(0.2)
    freed = time.monotonic() - started
    # What 1,000 tokens take here, from a 12-token answer's time (a lower bound of it).
    t0 = time.monotonic()
    _ask(client, "a", PROMPTS[0])
    per_token = (time.monotonic() - t0) / 12
    assert freed < 1000 * per_token / 4, (freed, per_token)
    reply = _ask(client, "b", PROMPTS[1])
    assert reply.choices[0].message.content == expected["b", PROMPTS[1]][0]
