"""An OpenAI-compatible chat server over one base model and its adapters (FastAPI, uvicorn).

    POST /v1/chat/completions   messages, temperature, top_p, max_tokens, stop, stream (SSE)
    GET  /v1/models             the adapters by name, and "base" (the adapter switched off)
    GET  /health                {"status": "ok", ...}, without the API key

One model is in memory; the request's `model` selects an adapter with peft's `set_adapter` (or
switches it off for "base"), never a reload. Generation runs one request at a time on one
thread that owns the device (CUDA graphs are captured and replayed there); up to `max_queue`
more wait, and a request beyond that gets 503 with Retry-After. Prompts are built as `chat`
builds them (`chat.prompt_ids`: the training template), so the server answers in the format
the adapter was trained on.

Every error is a 4xx/5xx JSON body in OpenAI's shape, `{"error": {"message", "type", "param",
"code"}}`; nothing the server logs or returns carries a traceback.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations as objects,
# and the Request class is imported inside create_app (FastAPI is an extra).
import asyncio
import base64
import binascii
import hmac
import json
import logging
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from llamalora.errors import DataError, LlamaLoraError, MissingExtraError, UsageError
from llamalora.template import IMAGE

log = logging.getLogger("llamalora.serve")
BASE = "base"  # the model name that answers with the adapter switched off
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class Limits:
    """What one request may ask for."""

    max_request_bytes: int = 8 * 2**20  # a photo as a data: URL fits
    max_tokens: int = 2048  # the most `max_tokens` a request may ask for
    default_max_tokens: int = 512
    max_context: int = 8192  # prompt + max_tokens
    max_queue: int = 16  # requests waiting behind the one generating
    max_stops: int = 4  # as OpenAI's API


class ApiError(Exception):
    """A request the server refuses: the status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (status, message, type,
                                                                       code, param)
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


# --- the model -------------------------------------------------------------------------------

@dataclass
class Engine:
    """The loaded model, its adapters by name (-> peft's names), and the one device thread."""

    session: object  # chat.ChatSession
    adapters: dict[str, str]
    image_root: Path | None = None
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="llamalora-generate"))
    _active: str | None = None  # the adapter set last (open_engine leaves the first one on)

    @property
    def models(self) -> list[str]:
        return [*self.adapters, BASE]

    def generate(self, name: str, ids: list[int], images: list[Path], options,
                 on_text, should_stop):
        """Runs on the device thread: `name`'s adapter (or none) for this one answer."""
        model = self.session.model
        if name == BASE:
            with model.disable_adapter():
                return self.session.complete(ids, images, options, on_text=on_text,
                                             should_stop=should_stop)
        if self._active != name:  # peft walks every module to switch: only when it changes
            model.set_adapter(self.adapters[name])
            self._active = name
        return self.session.complete(ids, images, options, on_text=on_text,
                                     should_stop=should_stop)


def adapter_names(runs: list[str]) -> list[tuple[str, str]]:
    """(name, path) for each RUN argument: NAME=PATH, or the folder's own name."""
    out = []
    for run in runs:
        name, sep, path = run.partition("=")
        if not sep:
            name, path = Path(run.rstrip("/")).name or run, run
        if not name or name == BASE or any(name == n for n, _ in out):
            raise UsageError(f"adapter name {name!r} is taken or empty ({run}); give each RUN "
                             f"a name of its own as NAME=PATH (not {BASE!r})")
        out.append((name, path))
    return out


def open_engine(runs: list[str], *, model: str | None = None, quant: str | None = None,
                kernels: str = "auto", image_root: str | Path | None = None) -> Engine:
    """Loads the base once and every run's adapter onto it.

    Raises:
        UsageError: The runs were trained on different bases (pass --model to override), or a
            name is taken.
        ModelError: An adapter does not fit the base.
    """
    from llamalora.adapters import apply_adapter, find_adapter
    from llamalora.chat import open_chat
    from llamalora.families import family_of
    from llamalora.models.names import resolve_model
    from llamalora.plan import load_model_config

    named = adapter_names(runs)
    infos = [(name, find_adapter(path)) for name, path in named]
    bases = {model or info.base_model for _, info in infos}
    if len(bases) > 1:
        raise UsageError("the runs were trained on different base models ("
                         f"{', '.join(sorted(bases))}); serve runs of one base together, or "
                         "pass --model")
    base = bases.pop()
    config, _ = load_model_config(resolve_model(base)) if base else (None, "")
    vision = family_of(config).takes_images
    first_name, first = infos[0]
    session = open_chat(first.folder, model=model, quant=quant, kernels=kernels, merge=False,
                        with_vision=vision)
    adapters = {first_name: "default"}
    for name, info in infos[1:]:
        apply_adapter(session.model, info.folder, name=name)
        adapters[name] = name
    session.model.set_adapter("default")
    root = Path(image_root).resolve() if image_root else None
    return Engine(session, adapters, root, _active=first_name)


# --- requests --------------------------------------------------------------------------------

@dataclass
class Request:
    """A checked chat-completion request."""

    model: str
    system: str | None
    turns: list[tuple[str, str]]
    images: list[Path]
    max_tokens: int
    temperature: float
    top_p: float
    stops: list[str]
    stream: bool
    include_usage: bool
    tmp: tempfile.TemporaryDirectory | None = None  # decoded data: images live here


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _number(body: dict, key: str, default: float, low: float, high: float,
            low_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"{key} must be a number", key)
    if value > high or value < low or (low_open and value == low):
        raise _bad(f"{key} must be in {'(' if low_open else '['}{low}, {high}], got {value}", key)
    return float(value)


def parse_request(body: dict, engine: Engine, limits: Limits) -> Request:
    """Checks an OpenAI chat-completion body; unknown fields are ignored, as OpenAI's SDKs
    send some by default.

    Raises:
        ApiError: 400 for a bad field, 404 for an unknown model.
    """
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise _bad("model is required: one of " + ", ".join(engine.models), "model")
    if name not in engine.models:
        raise ApiError(404, f"the model {name!r} does not exist; this server has "
                            f"{', '.join(engine.models)}", param="model",
                       code="model_not_found")
    if body.get("n", 1) != 1:
        raise _bad("n must be 1", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = min(limits.default_max_tokens, limits.max_tokens)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _bad("max_tokens must be a positive integer", "max_tokens")
    if max_tokens > limits.max_tokens:
        raise _bad(f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens}",
                   "max_tokens")
    stops = body.get("stop") or []
    stops = [stops] if isinstance(stops, str) else stops
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or \
            len(stops) > limits.max_stops:
        raise _bad(f"stop must be a string or a list of at most {limits.max_stops} non-empty "
                   "strings", "stop")
    options = body.get("stream_options") or {}
    request = Request(name, None, [], [], max_tokens,
                      _number(body, "temperature", 1.0, 0.0, 2.0),
                      _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True), stops,
                      bool(body.get("stream", False)),
                      bool(isinstance(options, dict) and options.get("include_usage")))
    try:
        _messages(body.get("messages"), request, engine)
    except BaseException:
        if request.tmp is not None:
            request.tmp.cleanup()
        raise
    return request


def _messages(messages, request: Request, engine: Engine) -> None:
    """The conversation as (system, turns, images): a system (or developer) message first, then
    user and assistant turns alternating, ending with the user's."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list", "messages")
    roles = {"system": "system", "developer": "system", "user": "user",
             "assistant": "assistant"}
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in roles:
            raise _bad(f"{where}: role must be one of {', '.join(roles)}", where)
        role = roles[message["role"]]
        text = _content(message.get("content"), where, request, engine, role == "user")
        if role == "system":
            if i:
                raise _bad(f"{where}: a system message must come first", where)
            request.system = text
            continue
        expected = "user" if not request.turns or request.turns[-1][0] == "assistant" \
            else "assistant"
        if role != expected:
            raise _bad(f"{where}: user and assistant turns must alternate, starting with the "
                       "user", where)
        request.turns.append((role, text))
    if not request.turns or request.turns[-1][0] != "user":
        raise _bad("the last message must be the user's", "messages")


def _content(content, where: str, request: Request, engine: Engine, images_ok: bool) -> str:
    """A message's text, with `<|image|>` where each image part stands."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"{where}: content must be a string or a list of parts", where)
    text = ""
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            text += part["text"]
        elif kind == "image_url" and images_ok:
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            request.images.append(_image(url, where, request, engine))
            text += IMAGE
        else:
            raise _bad(f"{where}: unsupported content part {kind!r} (text parts, and "
                       "image_url parts in user messages)", where)
    return text


def _image(url, where: str, request: Request, engine: Engine) -> Path:
    """An image part as a file the model reads: a data: URL (decoded into a temporary folder)
    or a path inside the server's --image-root. The server fetches no URLs: a request could
    otherwise make it reach any address its host can."""
    if engine.session.image_processor is None:
        raise _bad(f"{where}: this model takes no images (text only)", where)
    if not isinstance(url, str) or not url:
        raise _bad(f"{where}: image_url.url must be a string", where)
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if ";base64" not in header or not header[5:].startswith("image/"):
            raise _bad(f"{where}: a data: URL must be data:image/...;base64,...", where)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise _bad(f"{where}: the image's base64 does not decode", where) from None
        if request.tmp is None:
            request.tmp = tempfile.TemporaryDirectory(prefix="llamalora-serve-")
        path = Path(request.tmp.name) / f"{len(request.images)}.img"
        path.write_bytes(raw)
    elif url.startswith(("http://", "https://")):
        raise _bad(f"{where}: the server fetches no URLs; send the image as a data: URL", where)
    else:
        if engine.image_root is None:
            raise _bad(f"{where}: local image paths need the server started with --image-root; "
                       "send the image as a data: URL", where)
        path = (engine.image_root / url.removeprefix("file://")).resolve()
        if not path.is_relative_to(engine.image_root):
            raise _bad(f"{where}: {url} is outside the server's --image-root", where)
    try:
        return engine.session.check_image(path)
    except UsageError as exc:
        raise _bad(f"{where}: {exc}", where) from None


class StopText:
    """Cuts a streamed answer at the first of `stops`: text that could still begin a stop
    string is held back until it can't."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.text = ""  # everything generated
        self.sent = 0  # characters of `text` released
        self.hit = False

    def feed(self, chunk: str) -> str:
        """The part of the text so far that is safe to send."""
        if self.hit:
            return ""
        self.text += chunk
        found = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit = True
            end = min(found)
        else:
            hold = max((k for s in self.stops for k in range(1, len(s))
                        if self.text.endswith(s[:k])), default=0)
            end = len(self.text) - hold
        out, self.sent = self.text[self.sent:max(end, self.sent)], max(end, self.sent)
        return out

    def rest(self) -> str:
        """What was held back, once the answer is over without a stop string."""
        if self.hit:
            return ""
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


# --- the app ---------------------------------------------------------------------------------

class RequestQueue:
    """Requests on the device thread's queue (the one generating included), counted on the
    event loop's thread."""

    def __init__(self, limit: int):
        self.limit, self.pending = limit, 0

    def take(self) -> None:
        if self.pending > self.limit:
            raise ApiError(503, f"the server is busy ({self.pending} requests queued); retry "
                                "shortly", type="server_error", code="server_busy",
                           headers={"Retry-After": "1"})
        self.pending += 1


async def _read_json(request, limits: Limits):
    """The body as JSON, read no further than the size limit."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_request_bytes:
        raise _too_large(limits)
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limits.max_request_bytes:
            raise _too_large(limits)
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(f"the body is not valid JSON ({exc})") from None


def _too_large(limits: Limits) -> ApiError:
    return ApiError(413, f"the request is over {limits.max_request_bytes} bytes, this server's "
                         "limit", code="request_too_large")


class _Job:
    """One answer on the device thread; its text goes to the event loop as it comes."""

    def __init__(self, engine: Engine, request: Request, ids: list[int], loop, stream: bool):
        self.engine, self.request, self.ids, self.loop = engine, request, ids, loop
        self.cancel = threading.Event()
        self.stop = StopText(request.stops)
        self.events: asyncio.Queue | None = asyncio.Queue() if stream else None

    def __call__(self):
        from llamalora.chat import GenerationOptions

        if self.cancel.is_set():  # the client left while it waited
            return None
        r = self.request
        options = GenerationOptions(r.max_tokens, r.temperature, r.top_p)
        reply = self.engine.generate(r.model, self.ids, r.images, options, self._text,
                                     lambda: self.cancel.is_set() or self.stop.hit)
        self._send(self.stop.rest())
        return reply

    def _text(self, chunk: str) -> None:
        self._send(self.stop.feed(chunk))

    def _send(self, text: str) -> None:
        if text and self.events is not None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, ("text", text))

    def finish_reason(self, reply) -> str:
        return "stop" if self.stop.hit else reply.finish_reason

    def content(self) -> str:
        return self.stop.text[:self.stop.sent]


def _usage(reply) -> dict:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.new_tokens,
            "total_tokens": reply.prompt_tokens + reply.new_tokens}


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(engine: Engine, *, api_key: str | None = None, limits: Limits | None = None):
    """The FastAPI app over `engine`; with `api_key`, /v1/ asks for `Authorization: Bearer`.

    Raises:
        MissingExtraError: FastAPI is not installed.
    """
    try:
        from fastapi import Depends, FastAPI
        from fastapi import Request as HttpRequest
        from fastapi.responses import StreamingResponse
    except ImportError as exc:
        raise MissingExtraError("serve needs FastAPI and uvicorn: pip install "
                                "'llamalora[serve]'") from exc
    limits = limits or Limits()
    queue = RequestQueue(limits.max_queue)
    created = int(time.time())
    app = FastAPI(title="llamalora", docs_url=None, redoc_url=None, openapi_url=None)
    _errors_as_openai(app)

    async def authorized(request: HttpRequest) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not tell how much of a guess was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY",
                           code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": engine.models, "queued": queue.pending}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "llamalora"} for name in engine.models]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(request: HttpRequest):
        r = parse_request(await _read_json(request, limits), engine, limits)
        job, future = _submit(engine, r, limits, queue)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": r.model}
        if r.stream:
            return StreamingResponse(_stream(job, head), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            reply = await _reply_unless_gone(future, request, job)
        except LlamaLoraError as exc:
            raise _bad(str(exc)) from None
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "finish_reason": job.finish_reason(reply),
                             "message": {"role": "assistant", "content": job.content()}}],
                "usage": _usage(reply)}

    return app


async def _reply_unless_gone(future, request, job):
    """The reply; a client that leaves before it frees its slot, as a stream's does: the device
    thread stops at its next token (the reply, cut, goes nowhere)."""
    waiting = asyncio.wrap_future(future)
    try:
        while not waiting.done():
            await asyncio.wait({waiting}, timeout=0.25)
            if not waiting.done() and await request.is_disconnected():
                job.cancel.set()
                break
        return await waiting
    finally:
        if not waiting.done():  # cancelled itself (the server stops)
            job.cancel.set()


def _errors_as_openai(app) -> None:
    """Every refusal and failure as OpenAI's error body, never a traceback."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def respond(exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return respond(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc):  # unknown paths and methods
        return respond(ApiError(exc.status_code, str(exc.detail), code=None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        return respond(_bad(f"invalid request: {exc.errors()[:1]}"))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):
        log.error("unexpected %s: %s", type(exc).__name__, exc)
        return respond(ApiError(500, f"internal error ({type(exc).__name__})",
                                type="server_error"))


def _submit(engine: Engine, r: Request, limits: Limits, queue: RequestQueue):
    """Queues the answer on the device thread: (its job, its future). The queue's count and
    the request's temporary images are released when the device thread is through with it."""
    try:
        ids = _prompt(engine, r, limits)
        queue.take()
    except BaseException:
        if r.tmp is not None:
            r.tmp.cleanup()
        raise
    loop = asyncio.get_running_loop()
    job = _Job(engine, r, ids, loop, r.stream)

    def done(f) -> None:  # on the event loop
        queue.pending -= 1
        if r.tmp is not None:
            r.tmp.cleanup()
        if job.events is not None:
            job.events.put_nowait(("done", f))

    future = engine.executor.submit(job)
    future.add_done_callback(lambda f: loop.call_soon_threadsafe(done, f))
    return job, future


def _prompt(engine: Engine, r: Request, limits: Limits) -> list[int]:
    """The prompt's ids (the training template), refused when it leaves no room."""
    from llamalora.chat import prompt_ids

    try:
        ids = prompt_ids(engine.session.tokenizer, r.system, r.turns)
    except DataError as exc:  # the chat template refused the conversation
        raise _bad(str(exc), "messages") from None
    if len(ids) + r.max_tokens > limits.max_context:
        raise _bad(f"the prompt is {len(ids)} tokens and max_tokens {r.max_tokens}: over this "
                   f"server's {limits.max_context}", "messages", "context_length_exceeded")
    return ids


async def _stream(job: _Job, head: dict):
    """The answer as server-sent events, OpenAI's chunks; a client that leaves stops it."""
    def chunk(delta: dict, finish: str | None = None) -> dict:
        return {**head, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    try:
        yield _sse(chunk({"role": "assistant", "content": ""}))
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                yield _sse(chunk({"content": value}))
                continue
            try:
                reply = value.result()
            except Exception as exc:  # the generation failed: said in the stream
                log.error("generation failed: %s: %s", type(exc).__name__, exc)
                yield _sse(ApiError(500, f"generation failed ({type(exc).__name__})",
                                    type="server_error").body())
            else:
                final = chunk({}, job.finish_reason(reply))
                if job.request.include_usage:
                    yield _sse(final)
                    final = {**head, "object": "chat.completion.chunk", "choices": []}
                final["usage"] = _usage(reply)
                yield _sse(final)
            yield "data: [DONE]\n\n"
            return
    finally:
        job.cancel.set()  # a client gone mid-stream: the device thread stops at its next token


def check_host(host: str, api_key: str | None) -> None:
    """Refuses to listen beyond this machine without an API key.

    Raises:
        UsageError
    """
    if host not in LOOPBACK and not api_key:
        raise UsageError(f"--host {host} listens beyond this machine; pass --api-key KEY (or "
                         "set LLAMALORA_API_KEY) so that not anyone who reaches it can use it")
