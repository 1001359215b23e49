"""The HTTP routes (FastAPI): decode the request, hand it to the engine's driver, encode the answer.

    GET  /health                 200 once the model is loaded, 503 before (readiness probes)
    GET  /metrics                Prometheus text (metrics.py)
    GET  /v1/models              the served model
    POST /v1/chat/completions    messages -> chat template -> ids -> choices          (stream or not)
    POST /v1/completions         prompt(s) -> ids -> choices, echo, prompt log-probs  (stream or not)

Every request gets an id (the client's `X-Request-Id` when it sends a sane one), echoed in the response
headers and written in the access log line. /v1 routes need `Authorization: Bearer KEY` when the server has a
key (compared in constant time). Streams are server-sent events as OpenAI sends them: `data: {chunk}` lines,
the role first, `finish_reason` last, a usage chunk with `stream_options.include_usage`, then `data: [DONE]`;
an error after the stream began is an `data: {"error": ...}` event, never a dropped connection. A client that
disconnects aborts its choices (streaming: Starlette cancels the response; otherwise a watcher sees the
disconnect), which frees their KV blocks before the engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.middleware.body_limit import RequestBodyLimitMiddleware

from lmforge.infer.engine import LLMEngine, RequestRefused
from lmforge.infer.engine.scoring import TokenScores
from lmforge.serve import params as P
from lmforge.serve.chat_template import ChatTemplate, MessageError
from lmforge.serve.driver import EngineDriver, EngineFailed
from lmforge.serve.errors import APIError, install_error_handlers
from lmforge.serve.generation import ChoiceSpec, Generation, fan_out
from lmforge.serve.metrics import ServerMetrics
from lmforge.serve.schemas import (
    ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, ErrorResponse, ModelCard, ModelList,
)
from lmforge.serve.tokens import CompletionLogprobs, Vocabulary, chat_logprobs

log = logging.getLogger("lmforge.serve")
MAX_BODY_BYTES = 8 << 20
_ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 429, 503)}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


@dataclass
class Served:
    """What the server serves: an engine (in eval mode), its tokenizer and chat template, a name."""

    engine: LLMEngine
    tokenizer: object
    template: ChatTemplate
    name: str
    max_model_len: int


class ServerState:
    """The app's state: loading, then the served model and its driver."""

    def __init__(self, load: Callable[[], Served], api_key: str | None):
        self.load, self.api_key = load, api_key
        self.served: Served | None = None
        self.driver: EngineDriver | None = None
        self.vocab: Vocabulary | None = None
        self.load_error: BaseException | None = None
        self.created = int(time.time())
        self.metrics = ServerMetrics(lambda: self.driver.counters if self.driver is not None else None)
        self.on_load_error: Callable[[BaseException], None] | None = None

    def _ready(self, served: Served) -> None:  # on the event loop
        self.vocab = Vocabulary(served.tokenizer)
        self.driver = EngineDriver(served.engine)
        self.driver.start()
        self.served = served
        log.info("serving %s (context %d tokens)", served.name, served.max_model_len)

    def _failed(self, error: BaseException) -> None:
        self.load_error = error
        log.error("loading the model failed: %s", error)
        if self.on_load_error is not None:
            self.on_load_error(error)

    def start_loading(self) -> None:
        loop = asyncio.get_running_loop()

        def work() -> None:
            try:
                served = self.load()
            except BaseException as e:  # noqa: BLE001 - reported through /health and the serve verb
                loop.call_soon_threadsafe(self._failed, e)
            else:
                loop.call_soon_threadsafe(self._ready, served)

        threading.Thread(target=work, name="lmforge-load", daemon=True).start()

    def close(self) -> None:
        if self.driver is not None:
            self.driver.close()


def _request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex


def _arrival(request: Request) -> float:
    """time.monotonic() when the request arrived (set by `_RequestContext`)."""
    return request.scope.get("state", {}).get("arrival") or time.monotonic()


def build_app(load: Callable[[], Served] | Served, *, api_key: str | None = None,
              max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The server's app. `load` is called in a background thread at startup (so /health answers while a big
    model loads); pass a `Served` to serve one that is already built."""
    state = ServerState(load if callable(load) else (lambda: load), api_key)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start_loading()
        yield
        state.close()

    app = FastAPI(title="lmforge", version="1", lifespan=lifespan,
                  description="An OpenAI-compatible server on lmforge's LLMEngine. Streaming answers "
                              "(stream: true) are text/event-stream, one chunk per data: line.")
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=max_body_bytes)  # bodies sent without a length
    app.add_middleware(_RequestContext, metrics=state.metrics, max_body_bytes=max_body_bytes)  # outermost

    def served(request: Request) -> Served:
        """Dependency of the /v1 routes: the key, then readiness."""
        if state.api_key is not None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), state.api_key.encode()):
                raise APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key")
        if state.served is None:
            if state.load_error is not None:
                raise APIError(503, f"the model failed to load: {state.load_error}")
            raise APIError(503, "the model is still loading", headers={"Retry-After": "5"})
        return state.served

    def check_model(s: Served, model: str) -> None:
        if model != s.name:
            raise APIError(404, f"the model {model!r} does not exist here; this server serves {s.name!r}",
                           param="model", code="model_not_found")

    @app.get("/health")
    async def health() -> Response:
        if state.served is not None and state.driver.alive:
            return JSONResponse({"status": "ok"})
        status = "failed" if state.load_error is not None or state.served is not None else "loading"
        return JSONResponse({"status": status}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def models(s: Served = Depends(served)) -> ModelList:
        return ModelList(data=[ModelCard(id=s.name, created=state.created, max_model_len=s.max_model_len)])

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=_ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request, s: Served = Depends(served)):
        check_model(s, body.model)
        P.refuse_unsupported(body)
        try:
            ids = s.template.encode(body.messages)
        except MessageError as e:
            raise APIError(400, str(e), param=e.param) from None
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        which = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        budget = P.max_new_tokens(requested, len(ids), s.max_model_len, "messages", which)
        sampling, stop = P.sampling_params(body, budget), P.stop_strings(body.stop)
        gen = await _start(state, request, [ChoiceSpec(ids, p, stop) for p in fan_out(sampling, body.n)])
        reply = _ChatReply(state, s, body, request, len(ids))
        if body.stream:
            return StreamingResponse(_sse(reply.events(gen), gen), media_type="text/event-stream")
        return JSONResponse(await _until_done(request, gen, reply.collect(gen)))

    @app.post("/v1/completions", response_model=Completion, responses=_ERRORS)
    async def completions(body: CompletionRequest, request: Request, s: Served = Depends(served)):
        check_model(s, body.model)
        P.refuse_unsupported(body)
        prompts = P.completion_prompts(body.prompt, s.tokenizer, s.engine.config.vocab_size)
        many = len(prompts) > 1
        specs, budgets = [], []
        for i, ids in enumerate(prompts):
            where = f"prompt[{i}]" if many else "prompt"
            if body.max_tokens == 0:  # echo only: the prompt is scored, nothing generated
                if len(ids) > s.max_model_len:
                    raise APIError(400, f"{where} has {len(ids)} tokens, more than this model's context of "
                                   f"{s.max_model_len}", param=where, code="context_length_exceeded")
                budget = 0
            else:
                budget = P.max_new_tokens(body.max_tokens, len(ids), s.max_model_len, where)
            budgets.append(budget)
            sampling, stop = P.sampling_params(body, budget), P.stop_strings(body.stop)
            specs += [ChoiceSpec(ids, p, stop) for p in fan_out(sampling, body.n)] if budget else []
        scores = None
        if body.echo and body.logprobs is not None:  # the prompt's own log-probs, one pass over each prompt
            scorable = [ids for ids in prompts if len(ids) > 1]
            k = body.logprobs
            try:
                scores = iter(await state.driver.run(lambda e: e.score(scorable, top_k=k) if k else e.score(scorable)))
            except ValueError as e:  # checked above already; the engine's word, should it differ
                raise APIError(400, str(e), param="prompt") from None
            scores = [next(scores) if len(ids) > 1 else None for ids in prompts]
        gen = await _start(state, request, specs)
        reply = _CompletionReply(state, body, request, prompts, scores, budgets)
        if body.stream:
            return StreamingResponse(_sse(reply.events(gen), gen), media_type="text/event-stream")
        return JSONResponse(await _until_done(request, gen, reply.collect(gen)))

    return app


async def _start(state: ServerState, request: Request, specs: list[ChoiceSpec]) -> Generation:
    """Add every choice to the engine, or answer with the engine's refusal."""
    s = state.served
    # NOTE: engine ids must be unique even when clients reuse an X-Request-Id
    gen = Generation(state.driver, state.vocab, s.tokenizer.eos_id, f"{_request_id(request)}-{uuid.uuid4().hex[:8]}")
    try:
        await gen.start(specs)
    except RequestRefused as e:
        status = e.reason.http_status
        raise APIError(status, f"the server is busy: {e}", code=e.reason.value, headers={"Retry-After": "1"}) from None
    except EngineFailed as e:
        raise APIError(503, str(e), headers={"Retry-After": "5"}) from None
    except ValueError as e:  # a request the engine cannot run (checked here first, so rarely reached)
        raise APIError(400, str(e)) from None
    state.metrics.prompt_tokens.inc(sum(len(spec.prompt_ids) for spec in specs))
    return gen


async def _until_done(request: Request, gen: Generation, work) -> dict:
    """Await a non-streaming answer, aborting it if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task not in done:
        task.cancel()
        gen.abort()
        raise APIError(499, "the client closed the connection", code="client_closed_request")
    try:
        return task.result()
    except EngineFailed as e:
        raise APIError(500, str(e), type="server_error") from None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _sse(events: AsyncIterator[dict], gen: Generation) -> AsyncIterator[str]:
    try:
        async for payload in events:
            yield _event(payload)
    except EngineFailed as e:
        yield _event(APIError(500, str(e), type="server_error").body())
    except Exception:  # noqa: BLE001 - a bug of ours: the client still gets an error event, not a cut stream
        log.exception("error while streaming")
        yield _event(APIError(500, "internal server error", type="server_error").body())
    finally:
        gen.abort()  # the client went away (Starlette cancels this generator) or an error: free the blocks
    yield "data: [DONE]\n\n"


def _record(metrics: ServerMetrics, gen: Generation, arrival: float) -> int:
    """Observe a finished request's timings; its number of generated tokens."""
    for d, t in zip(gen.decoders, gen.timings):
        metrics.observe_choice(arrival, t.first, t.last, d.num_tokens)
    metrics.latency.observe(time.monotonic() - arrival)
    return sum(d.num_tokens for d in gen.decoders)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class _ChatReply:
    """Chat's response shapes for one request's choices."""

    def __init__(self, state: ServerState, s: Served, body: ChatCompletionRequest, request: Request,
                 prompt_tokens: int):
        self.state, self.body, self.prompt_tokens = state, body, prompt_tokens
        self.head = {"id": f"chatcmpl-{_request_id(request)}", "created": int(time.time()), "model": s.name}
        self.n_top = body.top_logprobs or 0
        self.arrival = _arrival(request)

    def _logprobs(self, tokens) -> dict | None:
        return {"content": chat_logprobs(self.state.vocab, tokens, self.n_top)} if self.body.logprobs else None

    def _finish(self, gen: Generation) -> dict:
        return _usage(self.prompt_tokens, _record(self.state.metrics, gen, self.arrival))

    async def collect(self, gen: Generation) -> dict:
        n = len(gen.ids)
        texts, tokens, reasons = [""] * n, [[] for _ in range(n)], [None] * n
        async for i, up in gen.updates():
            texts[i] += up.text
            tokens[i] += up.tokens
            reasons[i] = up.finish_reason or reasons[i]
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i], "refusal": None},
                    "logprobs": self._logprobs(tokens[i]), "finish_reason": reasons[i]} for i in range(n)]
        return {**self.head, "object": "chat.completion", "choices": choices, "usage": self._finish(gen),
                "system_fingerprint": None}

    async def events(self, gen: Generation) -> AsyncIterator[dict]:
        usage = self.body.stream_options is not None and self.body.stream_options.include_usage
        extra = {"usage": None} if usage else {}

        def chunk(i: int, delta: dict, logprobs=None, finish=None) -> dict:
            return {**self.head, "object": "chat.completion.chunk", "system_fingerprint": None, **extra,
                    "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

        for i in range(len(gen.ids)):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for i, up in gen.updates():
            if up.text or (up.tokens and self.body.logprobs):
                yield chunk(i, {"content": up.text}, self._logprobs(up.tokens))
            if up.finish_reason:
                yield chunk(i, {}, None, up.finish_reason)
        totals = self._finish(gen)
        if usage:
            yield {**self.head, "object": "chat.completion.chunk", "system_fingerprint": None, "choices": [],
                   "usage": totals}


class _CompletionReply:
    """Completions' response shapes: choice index = prompt index * n + j; echo puts the prompt first."""

    def __init__(self, state: ServerState, body: CompletionRequest, request: Request, prompts: list[list[int]],
                 scores, budgets: list[int]):
        self.state, self.body, self.prompts, self.scores = state, body, prompts, scores
        self.head = {"id": f"cmpl-{_request_id(request)}", "created": int(time.time()), "model": state.served.name}
        self.n = body.n
        # the choices that generate (a prompt with max_tokens 0 only echoes), in Generation's order
        self.generating = [p * body.n + j for p, b in enumerate(budgets) if b for j in range(body.n)]
        self.arrival = _arrival(request)

    def _prompt_part(self, p: int) -> tuple[str, CompletionLogprobs | None]:
        """The echoed prompt text and, with logprobs, its tokens' entries."""
        vocab, ids = self.state.vocab, self.prompts[p]
        text = vocab.decode(ids) if self.body.echo else ""
        if self.body.logprobs is None:
            return text, None
        lp = CompletionLogprobs(vocab, self.body.logprobs)
        if self.body.echo:
            s = self.scores[p]
            for t, token in enumerate(ids):
                if t == 0 or s is None:
                    lp.add(token, None, None)
                elif isinstance(s, TokenScores):
                    top = list(zip(s.top_ids[t - 1].tolist(), s.top_logprobs[t - 1].tolist()))
                    lp.add(token, float(s.logprobs[t - 1]), top)
                else:
                    lp.add(token, float(s[t - 1]), None)
            lp.offset = len(text)
        return text, lp

    def _finish(self, gen: Generation) -> dict:
        return _usage(sum(len(p) for p in self.prompts), _record(self.state.metrics, gen, self.arrival))

    async def collect(self, gen: Generation) -> dict:
        total = len(self.prompts) * self.n
        parts = [self._prompt_part(c // self.n) for c in range(total)]
        texts, lps = [t for t, _ in parts], [lp for _, lp in parts]
        reasons = [None if c in self.generating else "length" for c in range(total)]  # "length": echo only
        async for k, up in gen.updates():
            c = self.generating[k]
            texts[c] += up.text
            if lps[c] is not None:
                for t in up.tokens:
                    lps[c].add(t.id, t.logprob, t.top)
            reasons[c] = up.finish_reason or reasons[c]
        choices = [{"index": c, "text": texts[c], "logprobs": lps[c].take() if lps[c] is not None else None,
                    "finish_reason": reasons[c]} for c in range(total)]
        return {**self.head, "object": "text_completion", "choices": choices, "usage": self._finish(gen),
                "system_fingerprint": None}

    async def events(self, gen: Generation) -> AsyncIterator[dict]:
        usage = self.body.stream_options is not None and self.body.stream_options.include_usage
        extra = {"usage": None} if usage else {}

        def chunk(c: int, text: str, lp: CompletionLogprobs | None, finish=None) -> dict:
            return {**self.head, "object": "text_completion", "system_fingerprint": None, **extra,
                    "choices": [{"index": c, "text": text, "logprobs": lp.take() if lp is not None else None,
                                 "finish_reason": finish}]}

        total = len(self.prompts) * self.n
        lps = []
        for c in range(total):
            text, lp = self._prompt_part(c // self.n)
            lps.append(lp)
            generates = c in self.generating
            if text or not generates:
                yield chunk(c, text, lp, None if generates else "length")
        async for k, up in gen.updates():
            c = self.generating[k]
            if lps[c] is not None:
                for t in up.tokens:
                    lps[c].add(t.id, t.logprob, t.top)
            if up.text or up.tokens or up.finish_reason:
                yield chunk(c, up.text, lps[c], up.finish_reason)
        totals = self._finish(gen)
        if usage:
            yield {**self.head, "object": "text_completion", "system_fingerprint": None, "choices": [],
                   "usage": totals}


class _RequestContext:
    """ASGI middleware: the request id (X-Request-Id in and out), the access log line, answers by status, and
    a 413 in OpenAI's shape for a declared Content-Length over the limit (Starlette's body limit, inside it,
    counts the bytes of bodies sent without one: its error goes through our handlers)."""

    def __init__(self, app, metrics: ServerMetrics, max_body_bytes: int):
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        status, t0 = 500, time.monotonic()
        scope.setdefault("state", {}).update(request_id=rid, arrival=t0)

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.max_body_bytes:
                await APIError(413, f"the request body has {int(length)} bytes; this server accepts at most "
                               f"{self.max_body_bytes}")(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "other")
            self.metrics.requests.labels(path, str(status)).inc()
            log.info('"%s %s" %d %.1fms request_id=%s', scope["method"], scope["path"], status,
                     1e3 * (time.monotonic() - t0), rid)


__all__ = ["MAX_BODY_BYTES", "Served", "ServerState", "build_app"]
