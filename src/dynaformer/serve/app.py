"""The HTTP side of `dynaformer serve` (Starlette): OpenAI's /v1/completions (JSON or server-sent events),
/v1/models, /health and Prometheus /metrics. Requests are checked field by field before anything is queued: a
bad one is a 400 with OpenAI's error object naming the field, and the engine never sees it."""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import DynaformerError
from .engine import Engine, Rejected, SamplingParams, Sequence

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_STOP_CHARS = 256
MAX_N = 128  # OpenAI's limit on n (choices per prompt)


class ApiError(Exception):
    """An OpenAI-style error: status, message, type, param (the field), code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# --- request checking ----------------------------------------------------------------------------------------

def _number(body: dict, name: str, default: float | None) -> float | None:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ApiError(400, f"{name} must be a number, got {json.dumps(v)}", name, "invalid_type")
    if not math.isfinite(v):
        raise ApiError(400, f"{name} must be a finite number, got {v}", name, "invalid_value")
    return float(v)


def _integer(body: dict, name: str, default: int | None) -> int | None:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"{name} must be an integer, got {json.dumps(v)}", name, "invalid_type")
    if not -(2**63) <= v < 2**64:
        raise ApiError(400, f"{name} is out of range (a 64-bit integer), got {v}", name, "invalid_value")
    return v


def _only(body: dict, name: str, allowed: tuple, what: str) -> None:
    """A known OpenAI field this server takes at its neutral value only."""
    if name in body and body[name] not in allowed:
        raise ApiError(400, f"{name}: this server supports only {what}, got {json.dumps(body[name])}", name,
                       "unsupported_value")


# Fields OpenAI's completions endpoint defines; any other is refused (naming it), as OpenAI does.
KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream",
         "stream_options", "n", "best_of", "echo", "logprobs", "presence_penalty", "frequency_penalty",
         "logit_bias", "suffix", "user"}


class Completion(NamedTuple):
    """A checked request: prompts as token ids, sampling, n choices per prompt, stream, include_usage."""
    prompts: list[list[int]]
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool

    @property
    def decoded(self) -> int:
        return decoded_per_prompt(self.params.temperature, self.n)


def decoded_per_prompt(temperature: float, n: int) -> int:
    """Sequences decoded per prompt: n, or 1 when greedy (temperature 0), whose n choices are one text."""
    return 1 if temperature == 0 else n


def parse_completion(body: Any, engine: Engine, encode: Callable[[str], list[int]], vocab_size: int,
                     model_name: str, max_tokens_default: int) -> Completion:
    """The checked request of a body, or ApiError naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_body")
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise ApiError(400, f"unrecognized request argument: {unknown[0]}", unknown[0], "unknown_field")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, f"model must be a string, got {json.dumps(model)}", "model", "invalid_type")
    if model is not None and model != model_name:
        raise ApiError(404, f"the model '{model}' does not exist; this server serves '{model_name}'", "model",
                       "model_not_found")
    prompts = _prompts(body.get("prompt"), encode, vocab_size, engine.max_queue)
    max_tokens = _integer(body, "max_tokens", max_tokens_default)
    if max_tokens < 1:
        raise ApiError(400, f"max_tokens must be ≥ 1, got {max_tokens}", "max_tokens", "invalid_value")
    longest = max(len(p) for p in prompts)
    if longest > engine.context_len:
        raise ApiError(400, f"the prompt has {longest} tokens; this model takes at most {engine.context_len}",
                       "prompt", "context_length_exceeded")
    if longest + max_tokens > engine.context_len:
        raise ApiError(400, f"this model's context is {engine.context_len} tokens; the prompt takes {longest}, so "
                            f"max_tokens may be at most {engine.context_len - longest}, got {max_tokens}",
                       "max_tokens", "context_length_exceeded")
    temperature = _number(body, "temperature", 1.0)
    if not 0 <= temperature <= 2:
        raise ApiError(400, f"temperature must be in [0, 2], got {temperature}", "temperature", "invalid_value")
    n = _integer(body, "n", 1)
    if not 1 <= n <= MAX_N:
        raise ApiError(400, f"n must be in 1..{MAX_N}, got {n}", "n", "invalid_value")
    decoded = decoded_per_prompt(temperature, n)
    if decoded > engine.max_batch:
        raise ApiError(400, f"n = {n} sampled choices are decoded together, but this server decodes at most "
                            f"{engine.max_batch} sequences at once (--max_batch); ask for fewer", "n", "invalid_value")
    if decoded * len(prompts) > engine.max_queue:
        raise ApiError(400, f"n: {len(prompts)} prompts × n = {n} make {decoded * len(prompts)} sequences, more "
                            f"than the {engine.max_queue} this server queues (--max_queue)", "n", "invalid_value")
    need = decoded * engine.kv_bytes(longest + max_tokens)
    if need > engine.kv_budget:
        what = f"the prompt and max_tokens, × n = {n} choices," if decoded > 1 else "the prompt and max_tokens"
        raise ApiError(400, f"{what} need {need / 2**20:.1f} MiB of KV cache, more than the server's whole budget "
                            f"({engine.kv_budget / 2**20:.1f} MiB); ask for fewer tokens"
                            + (" or choices" if decoded > 1 else ""),
                       "n" if decoded > 1 else "max_tokens", "kv_budget_exceeded")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise ApiError(400, f"top_p must be in (0, 1], got {top_p}", "top_p", "invalid_value")
    top_k = _integer(body, "top_k", None)
    if top_k is not None and top_k < -1:
        raise ApiError(400, f"top_k must be ≥ 1 (or -1 or 0: off), got {top_k}", "top_k", "invalid_value")
    seed = _integer(body, "seed", None)
    stop = _stop(body.get("stop"))
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {json.dumps(stream)}", "stream", "invalid_type")
    include_usage = False
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict) or set(opts) - {"include_usage"} or not isinstance(
                opts.get("include_usage", False), bool):
            raise ApiError(400, "stream_options must be {\"include_usage\": true|false}", "stream_options",
                           "invalid_type")
        include_usage = opts.get("include_usage", False)
    _only(body, "best_of", (None, n), "best_of = n (no extra candidates to choose among)")
    _only(body, "echo", (False, None), "echo = false")
    _only(body, "logprobs", (None,), "logprobs = null")
    _only(body, "presence_penalty", (0, None), "presence_penalty = 0")
    _only(body, "frequency_penalty", (0, None), "frequency_penalty = 0")
    _only(body, "logit_bias", (None, {}), "no logit_bias")
    _only(body, "suffix", (None,), "suffix = null")
    if "user" in body and not isinstance(body["user"], str | None):
        raise ApiError(400, f"user must be a string, got {json.dumps(body['user'])}", "user", "invalid_type")
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=None if top_p == 1 else top_p,
                            top_k=top_k if top_k and top_k > 0 else None, stop=stop, seed=seed)
    return Completion(prompts, params, n, stream, include_usage)


def _prompts(prompt: Any, encode: Callable[[str], list[int]], vocab_size: int, most: int) -> list[list[int]]:
    """A string, a list of strings, a list of token ids or a list of such lists → token ids per prompt."""
    if isinstance(prompt, str):
        raw = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raw = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        raw = prompt
    else:
        raise ApiError(400, "prompt must be a string, a list of strings or a list of token ids"
                       + ("" if prompt != [] else " (got an empty list)"), "prompt", "invalid_type")
    if len(raw) > most:
        raise ApiError(400, f"prompt: at most {most} prompts per request, got {len(raw)}", "prompt", "invalid_value")
    out = []
    for p in raw:
        if isinstance(p, str):
            try:
                ids = encode(p)
            except DynaformerError as e:
                raise ApiError(400, f"prompt: {e}", "prompt", "invalid_value") from None
        elif all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            ids = p
            if any(not 0 <= t < vocab_size for t in ids):
                raise ApiError(400, f"prompt: token ids must be in 0..{vocab_size - 1}", "prompt", "invalid_value")
        else:
            raise ApiError(400, "prompt: a list of prompts holds strings or lists of token ids", "prompt",
                           "invalid_type")
        if not ids:
            raise ApiError(400, "prompt: must hold at least one token (this model has no start token)", "prompt",
                           "invalid_value")
        out.append(ids)
    return out


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise ApiError(400, f"stop must be a string or a list of strings, got {json.dumps(stop)}", "stop",
                       "invalid_type")
    if len(items) > MAX_STOP or any(not s or len(s) > MAX_STOP_CHARS for s in items):
        raise ApiError(400, f"stop: at most {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} characters",
                       "stop", "invalid_value")
    return tuple(items)


# --- the app --------------------------------------------------------------------------------------------------

class Served:
    """What the handlers share: the engine, the tokenizer's functions, the model's name, the request counts."""

    def __init__(self, engine: Engine, encode: Callable[[str], list[int]], vocab_size: int, model_name: str,
                 api_key: str | None, max_tokens_default: int) -> None:
        self.engine, self.encode, self.vocab_size = engine, encode, vocab_size
        self.model_name, self.api_key, self.max_tokens_default = model_name, api_key, max_tokens_default
        self.requests: Counter[tuple[str, int]] = Counter()
        self.created = int(time.time())

    def authorized(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        got = request.headers.get("authorization", "").encode()
        return hmac.compare_digest(got, f"Bearer {self.api_key}".encode())  # constant time


def _unauthorized() -> JSONResponse:
    return ApiError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'", None, "invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"}).response()


class CountRequests:
    """ASGI middleware: counts answered requests by endpoint and status for /metrics."""

    def __init__(self, app: Any, served: Served, paths: set[str]) -> None:
        self.app, self.served, self.paths = app, served, paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.paths else "other"

        async def counting(message) -> None:
            if message["type"] == "http.response.start":
                self.served.requests[(path, message["status"])] += 1
            await send(message)

        await self.app(scope, receive, counting)


def create_app(served: Served, lifespan: Any = None) -> CountRequests:
    """The ASGI app (the request counter around Starlette); `lifespan` starts and stops the engine."""
    engine = served.engine

    async def completions(request: Request) -> Response:
        if not served.authorized(request):
            return _unauthorized()
        try:
            try:
                body = json.loads(await request.body())
            except (ValueError, UnicodeDecodeError) as e:
                raise ApiError(400, f"the body is not valid JSON ({e})", None, "invalid_json") from None
            req = parse_completion(body, engine, served.encode, served.vocab_size, served.model_name,
                                   served.max_tokens_default)
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()

            def sink_for(indices: list[int]):
                def sink(event) -> None:
                    try:
                        for i in indices:
                            loop.call_soon_threadsafe(queue.put_nowait, (i, event))
                    except RuntimeError:  # the loop is gone (shutting down): nobody is listening
                        pass
                return sink

            # OpenAI's order: prompt i's choice j is choice i * n + j. Sampled choices are sequences of their own;
            # greedy ones are one sequence whose events go to all n choices.
            n, per = req.n, req.decoded
            sinks = [sink_for([i * n + j] if per == n else list(range(i * n, i * n + n)))
                     for i in range(len(req.prompts)) for j in range(per)]
            try:
                seqs = engine.submit(req.prompts, req.params, sinks, per)
            except Rejected as e:
                kind = "rate_limit_exceeded" if e.status == 429 else "server_shutting_down"
                raise ApiError(e.status, str(e), None, kind, kind="server_error" if e.status == 503 else "requests",
                               headers={"Retry-After": str(e.retry_after)}) from None
        except ApiError as e:
            return e.response()
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": served.model_name}
        usage_of = _usage(req.prompts, seqs, req.n // req.decoded)
        choices = len(req.prompts) * req.n
        if req.stream:
            return StreamingResponse(_events(engine, seqs, choices, queue, head, req.include_usage, usage_of),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _complete(request, engine, seqs, choices, queue, head, usage_of)

    async def models(request: Request) -> Response:
        if not served.authorized(request):
            return _unauthorized()
        return JSONResponse({"object": "list", "data": [{"id": served.model_name, "object": "model",
                                                         "created": served.created, "owned_by": "dynaformer"}]})

    async def health(request: Request) -> Response:
        if engine.draining:
            return JSONResponse({"status": "draining"}, status_code=503, headers={"Retry-After": "5"})
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request) -> Response:
        if not served.authorized(request):
            return _unauthorized()
        return PlainTextResponse(prometheus_text(served), media_type="text/plain; version=0.0.4")

    routes = [Route("/v1/completions", completions, methods=["POST"]), Route("/v1/models", models),
              Route("/health", health), Route("/metrics", metrics)]
    app = Starlette(routes=routes, lifespan=lifespan)
    return CountRequests(app, served, {r.path for r in routes})


def _usage(prompts: list[list[int]], seqs: list[Sequence], copies: int) -> Callable[[], dict]:
    """OpenAI's usage: each prompt counted once, every choice's tokens (a greedy sequence sent as `copies`
    choices counts `copies` times)."""
    def usage() -> dict:
        p, c = sum(len(x) for x in prompts), copies * sum(len(s.tokens) for s in seqs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
    return usage


def _choice(i: int, text: str, finish: str | None) -> dict:
    return {"text": text, "index": i, "logprobs": None, "finish_reason": finish}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _events(engine: Engine, seqs: list[Sequence], choices: int, queue: asyncio.Queue, head: dict,
                  include_usage: bool, usage: Callable[[], dict]) -> AsyncIterator[str]:
    """Server-sent events: a chunk per text delta of a choice (naming its index), one with each choice's
    finish_reason, then [DONE]. A client that goes away closes this generator: its sequences are cancelled and
    leave at the engine's next step."""
    try:
        done = 0
        while done < choices:
            i, (kind, value) = await queue.get()
            if kind == "text":
                yield _sse({**head, "choices": [_choice(i, value, None)]})
                continue
            done += 1
            if kind == "error" or value == "cancelled":
                why = value if kind == "error" else "the request was cancelled (the server is shutting down)"
                yield _sse({"error": {"message": why, "type": "server_error", "param": None, "code": None}})
                continue
            yield _sse({**head, "choices": [_choice(i, "", value)]})
        if include_usage:
            yield _sse({**head, "choices": [], "usage": usage()})
        yield "data: [DONE]\n\n"
    finally:
        engine.cancel(seqs)


async def _complete(request: Request, engine: Engine, seqs: list[Sequence], choices: int, queue: asyncio.Queue,
                    head: dict, usage: Callable[[], dict]) -> Response:
    """The whole completion as one JSON object; a client that disconnects while waiting cancels its sequences."""
    texts = [""] * choices
    finish: list[str | None] = [None] * choices
    errors = []
    done = 0
    try:
        while done < choices:
            try:
                i, (kind, value) = await asyncio.wait_for(queue.get(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    engine.cancel(seqs)
                    return Response(status_code=499)  # nobody reads it; counted in /metrics
                continue
            if kind == "text":
                texts[i] += value
                continue
            done += 1
            if kind == "error":
                errors.append(value)
            finish[i] = value if kind == "done" else "error"
    finally:
        engine.cancel(seqs)  # no-op for finished sequences
    if errors:
        return ApiError(500, errors[0], None, "generation_failed", kind="server_error").response()
    if "cancelled" in finish:
        return ApiError(503, "the request was cancelled: the server is shutting down", None, "server_shutting_down",
                        kind="server_error", headers={"Retry-After": "5"}).response()
    choices = [_choice(i, t, f) for i, (t, f) in enumerate(zip(texts, finish, strict=True))]
    return JSONResponse({**head, "choices": choices, "usage": usage()})


def prometheus_text(served: Served) -> str:
    """/metrics in Prometheus' text format."""
    engine = served.engine
    snap = engine.snapshot()
    lines = ["# HELP dynaformer_requests_total HTTP requests answered, by endpoint and status.",
             "# TYPE dynaformer_requests_total counter"]
    for (path, status), n in sorted(served.requests.items()):
        lines.append(f'dynaformer_requests_total{{endpoint="{path}",status="{status}"}} {n}')
    gauges = [
        ("queue_length", "gauge", "Sequences waiting for admission.", snap["queue_length"]),
        ("active_sequences", "gauge", "Sequences being decoded.", snap["active_sequences"]),
        ("tokens_generated_total", "counter", "Tokens generated since the start.", snap["tokens_total"]),
        ("tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.", snap["tokens_per_second"]),
        ("kv_bytes_in_use", "gauge", "KV-cache bytes held by active sequences.", snap["kv_bytes_in_use"]),
        ("kv_budget_bytes", "gauge", "The KV-cache budget (--kv_budget_mb).", engine.kv_budget),
        ("kv_bytes_per_context_sequence", "gauge", "KV-cache bytes of one sequence of the full context.",
         engine.kv_bytes(engine.context_len)),
        ("kv_max_sessions", "gauge", "Sequences of the full context the budget admits at once.",
         engine.max_sessions()),
        ("kv_element_bytes", "gauge", "Bytes per cached key or value element (--cache_dtype).",
         engine.kv_dtype.itemsize),
        ("draining", "gauge", "1 after SIGTERM: new requests get 503.", int(engine.draining)),
    ]
    for name, kind, doc, value in gauges:
        lines += [f"# HELP dynaformer_{name} {doc}", f"# TYPE dynaformer_{name} {kind}",
                  f"dynaformer_{name} {value:.6g}" if isinstance(value, float) else f"dynaformer_{name} {value}"]
    return "\n".join(lines) + "\n"
