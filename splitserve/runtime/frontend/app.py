"""The OpenAI-compatible HTTP frontend, over any EngineClient.

The frontend owns text: it applies the chat template, tokenizes, detokenizes and matches stop strings;
the engine only sees token ids. Every engine request it starts is either finished by the engine or
aborted, and its stream closed, whatever the client does: KV blocks must not outlive their request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import replace
from typing import Any

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from splitserve.core.request import SamplingParams
from splitserve.model.tokenizer import IncrementalDetokenizer, Tokenizer
from splitserve.runtime.engine_client import EngineClient, EngineOverloaded, EngineUnavailable, TokenLogprobs, TokenOutput
from splitserve.runtime.frontend.body_limit import DEFAULT_MAX_BODY_BYTES, BodyLimit
from splitserve.runtime.frontend.dashboard import dashboard_router
from splitserve.runtime.frontend.metrics import FrontendMetrics, RequestMetrics
from splitserve.runtime.frontend.openai_protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    CompletionRequest,
    CompletionResponse,
    ErrorDetail,
    ErrorResponse,
    GenerationRequest,
    InvalidRequest,
    ModelCard,
    ModelList,
    ResponseMeta,
    Usage,
)
from splitserve.runtime.frontend.text_output import TextOutput

log = logging.getLogger(__name__)

# Output limit when the client sets none (OpenAI's chat API has no default; its legacy completions API
# uses 16). 256 answers most prompts whole while bounding what a forgotten limit costs in KV and time.
DEFAULT_MAX_TOKENS = 256
# EngineUnavailable carries no estimate; a few seconds covers a restart or a drained replica's failover.
UNAVAILABLE_RETRY_AFTER_S = 5


class EngineFailed(Exception):
    """The engine failed a request it had accepted: HTTP 500, or an error event mid-stream."""


def create_app(
    engine: EngineClient, *, served_model_name: str | None = None, default_max_tokens: int = DEFAULT_MAX_TOKENS,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """The HTTP app serving `engine` under `served_model_name` (default: the engine's model name); request
    bodies over `max_body_bytes` are refused with 413 before they are parsed."""
    frontend = _Frontend(engine, served_model_name or engine.model_name, default_max_tokens)
    app = FastAPI(title="splitserve", summary="OpenAI-compatible LLM serving with disaggregated prefill and decode")
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    _install_error_handlers(app)
    app.include_router(dashboard_router(engine, frontend.metrics))

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_ERROR_RESPONSES)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _cancel_on_disconnect(request, lambda: frontend.serve(body))

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERROR_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await _cancel_on_disconnect(request, lambda: frontend.serve(body))

    @app.get("/v1/models")
    async def models() -> ModelList:
        return frontend.model_list()

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = frontend.healthy()
        body = {"status": "ok" if ok else "unavailable", "model": frontend.model_name}
        degraded = getattr(frontend.engine, "degraded", None)
        reason = degraded() if ok and degraded is not None else None
        if reason:
            body.update(status="degraded", reason=reason)
        # Deployment problems (e.g. workers refused for a KV layout or handshake mismatch) are shown here.
        errors = getattr(frontend.engine, "health_errors", None)
        if errors:
            body["errors"] = errors[-10:]
        return JSONResponse(body, 200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(frontend.metrics.render(), media_type=frontend.metrics.content_type)

    return app


def http_server(
    app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", graceful_timeout_s: float = 30.0,
    ssl_keyfile: str | None = None, ssl_certfile: str | None = None,
) -> uvicorn.Server:
    """The frontend's server (over TLS when given a key and certificate). Shutdown stops accepting
    connections, lets running requests finish for up to graceful_timeout_s, then cancels the rest, which
    aborts their engine requests."""
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                         timeout_graceful_shutdown=graceful_timeout_s,
                                         ssl_keyfile=ssl_keyfile, ssl_certfile=ssl_certfile))



class _Frontend:
    def __init__(self, engine: EngineClient, model_name: str, default_max_tokens: int) -> None:
        self.engine = engine
        self.model_name = model_name
        self.metrics = FrontendMetrics(engine.stats)
        self._default_max_tokens = default_max_tokens
        self._created = int(time.time())

    def healthy(self) -> bool:
        try:
            return bool(self.engine.healthy())
        except Exception:  # the health check must answer, whatever state the engine is in
            log.exception("engine.healthy() failed")
            return False

    def model_list(self) -> ModelList:
        card = ModelCard(id=self.model_name, created=self._created, max_model_len=self.engine.max_model_len)
        return ModelList(data=[card])

    async def serve(self, body: GenerationRequest) -> Response:
        arrival = time.monotonic()
        if body.model is not None and body.model != self.model_name:
            raise InvalidRequest(
                f"model: '{body.model}' is not served here; this server serves '{self.model_name}'", "model", "model_not_found"
            )
        tokenizer = self.engine.tokenizer
        # Templating and tokenizing a long prompt takes milliseconds: off the event loop, streams keep flowing.
        prompts = await run_in_threadpool(body.prompts, tokenizer, self.engine.max_model_len)
        params = [
            body.sampling_params(len(p), self.engine.max_model_len, tokenizer.vocab_size, self._default_max_tokens)
            for p in prompts
        ]
        meta = ResponseMeta(f"{body.id_prefix}{uuid.uuid4().hex}", int(time.time()), self.model_name)
        runs: list[_Run] | None = []

        def run(i: int, j: int) -> _Run:
            """Candidate j of prompt i. Seeded candidates get seeds of their own: same request, same texts."""
            p = params[i] if params[i].seed is None else replace(params[i], seed=(params[i].seed + j) % 2**64)
            k = i * body.num_candidates + j
            rid = meta.id if k == 0 else f"{meta.id}-{k}"  # the first (often only) one under the response's id
            r = _Run(self.engine, self.metrics, rid, k, prompts[i], p, body.stop_strings, arrival)
            runs.append(r)
            return r

        try:
            await _start(run, len(prompts), body.num_candidates)
            if body.stream:
                response = _EventStream(_events(body, meta, runs, tokenizer), on_close=_closer(runs))
                runs = None  # the response owns them now, and closes them after the last event or when the client leaves
                return response
            return await _complete(body, meta, runs, tokenizer)
        finally:
            if runs is not None:
                await _closer(runs)()


async def _start(run: Callable[[int, int], _Run], num_prompts: int, num_candidates: int) -> None:
    """Start every prompt's candidates. A prompt's first candidate goes alone until its first token: by then
    the prompt's KV blocks are in the prefix cache, and its other candidates share them instead of computing
    (and holding) copies. Raises the first refusal (429/503) after cancelling the other starts."""

    async def one_prompt(i: int) -> None:
        await run(i, 0).start()
        await _all(run(i, j).start() for j in range(1, num_candidates))

    await _all(one_prompt(i) for i in range(num_prompts))


async def _all(coros: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Run concurrently; the first exception cancels the others and is raised as it is (no exception group,
    so a refusal still reaches its HTTP handler). A single one runs in the caller's task, as if awaited."""
    coros = list(coros)
    if len(coros) == 1:
        await coros[0]
        return
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _closer(runs: list[_Run]) -> Callable[[], Awaitable[None]]:
    async def close() -> None:
        for r in runs:
            await r.close()

    return close


class _Run:
    """One engine request, read as text deltas. close() is its single exit: it aborts the engine request
    unless the engine finished it, closes the engine's stream, and records the request's metrics."""

    def __init__(
        self,
        engine: EngineClient,
        metrics: FrontendMetrics,
        request_id: str,
        index: int,
        prompt: list[int],
        params: SamplingParams,
        stop: list[str],
        arrival: float,
    ) -> None:
        self.index = index  # the choice's index in the answer
        self._engine = engine
        self._metrics = metrics
        self._tracker: RequestMetrics = metrics.track(arrival)
        self._request_id = request_id
        self._num_prompt_tokens = len(prompt)
        tokenizer = engine.tokenizer
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(tokenizer.eos_token_ids))
        self._text = TextOutput(IncrementalDetokenizer(tokenizer, prompt), stop, stop_ids)
        self._outputs = engine.generate(request_id, prompt, params)
        self._pending: TokenOutput | None = None
        self._logprobs: list[TokenLogprobs] | None = [] if params.logprobs is not None else None
        self._num_cached_tokens = 0
        self._engine_done = False
        self._refused = False
        self._failed = False
        self._closed = False

    async def start(self) -> None:
        """Wait for the first output, so that a refusal or a failure before the first token becomes an HTTP
        status before any response starts: a client is never told 200 and then dropped with nothing."""
        try:
            self._pending = await self._next_output()
        except (EngineOverloaded, EngineUnavailable):
            self._refused = self._engine_done = True  # never queued: nothing to abort
            raise
        out = self._pending
        if out.finished and out.finish_reason == "error" and not out.new_token_ids:
            self._failed = self._engine_done = True
            raise EngineFailed(out.error or "the engine failed this request")

    async def next_piece(self) -> Choice:
        """The next piece of this choice: new text, the tokens that came with it (and their logprobs); the
        piece with a finish_reason is the last."""
        out = self._pending or await self._next_output()
        self._pending = None
        self._tracker.on_output(out, time.monotonic())
        self._engine_done = out.finished
        self._num_cached_tokens = max(self._num_cached_tokens, out.num_cached_tokens)
        if out.finish_reason == "error":
            self._failed = True
            raise EngineFailed(out.error or "the engine failed this request")
        before = self._text.num_tokens
        if self._logprobs is not None:
            self._logprobs += out.logprobs or ()
        delta = self._text.add(out)
        new = slice(before, self._text.num_tokens)
        lps = self._logprobs[new] if self._logprobs is not None else None
        return Choice(self.index, delta.text, delta.finish_reason, self._text.token_ids[new], lps)

    @property
    def num_prompt_tokens(self) -> int:
        return self._num_prompt_tokens

    @property
    def num_cached_tokens(self) -> int:
        return self._num_cached_tokens

    @property
    def num_output_tokens(self) -> int:
        return self._text.num_tokens

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Shielded: this runs when the client's task is being cancelled, and the blocks must be freed anyway.
        with anyio.CancelScope(shield=True):
            try:
                if not self._engine_done:
                    await self._engine.abort(self._request_id)
            finally:
                # The protocol promises an AsyncIterator; a generator also needs closing to run its cleanup.
                aclose = getattr(self._outputs, "aclose", None)
                if aclose is not None:
                    await aclose()
        if self._refused:
            self._metrics.record_rejected()
        else:
            reason = "error" if self._failed else self._text.finish_reason or "abort"
            self._tracker.on_finish(reason, self._num_prompt_tokens, self._text.num_tokens, time.monotonic())

    async def _next_output(self) -> TokenOutput:
        try:
            return await anext(self._outputs)
        except (EngineOverloaded, EngineUnavailable):
            raise
        except StopAsyncIteration:
            self._failed = True
            raise EngineFailed("the engine ended the request's stream without finishing it") from None
        except Exception as exc:
            self._failed = True
            log.exception("engine failed request %s", self._request_id)
            raise EngineFailed(f"engine error: {type(exc).__name__}: {exc}") from exc


async def _complete(body: GenerationRequest, meta: ResponseMeta, runs: list[_Run], tokenizer: Tokenizer) -> Response:
    choices: list[Choice] = []

    async def collect(run: _Run) -> None:
        pieces = [await run.next_piece()]
        while pieces[-1].finish_reason is None:
            pieces.append(await run.next_piece())
        lps = None if pieces[0].logprobs is None else [lp for p in pieces for lp in p.logprobs or ()]
        choices.append(Choice(run.index, "".join(p.text for p in pieces), pieces[-1].finish_reason,
                              [t for p in pieces for t in p.token_ids], lps))

    await _all(collect(r) for r in runs)
    return _json(body.response(meta, _best(body, choices), _usage(runs, body.num_candidates), _token_text(tokenizer)))


def _best(body: GenerationRequest, candidates: list[Choice]) -> list[Choice]:
    """Each prompt's n choices, indexed as OpenAI does (prompt i's choices at i*n ... i*n+n-1): with best_of,
    its n candidates of highest total logprob. Logprobs only where the client asked for them."""
    k, n = body.num_candidates, body.n
    out = []
    for i in range(len(candidates) // k):
        group = sorted((c for c in candidates if c.index // k == i), key=lambda c: c.index)
        if k > n:
            group = sorted(group, key=lambda c: -sum(lp.logprob for lp in c.logprobs or ()))[:n]
        for j, c in enumerate(group):
            out.append(replace(c, index=i * n + j, logprobs=c.logprobs if body.num_logprobs is not None else None))
    return out


def _usage(runs: list[_Run], num_candidates: int) -> Usage:
    """A prompt counts once, however many choices it has; every generated token counts (as OpenAI bills
    best_of). Cached tokens: what the prompts' first candidates found (the others reuse those)."""
    firsts = [r for r in runs if r.index % num_candidates == 0]
    return Usage.of(
        sum(r.num_prompt_tokens for r in firsts), sum(r.num_output_tokens for r in runs), sum(r.num_cached_tokens for r in firsts)
    )


def _token_text(tokenizer: Tokenizer) -> Callable[[int], str]:
    """A token's text for logprobs. A token holding part of a character decodes to U+FFFD, as do its
    siblings: its vocabulary entry is shown instead, so top-logprob keys stay distinct."""

    def text(token_id: int) -> str:
        decoded = tokenizer.decode([token_id], skip_special_tokens=False)
        return tokenizer.backend.id_to_token(token_id) if "\ufffd" in decoded else decoded

    return text


async def _pieces(runs: list[_Run]) -> AsyncIterator[Choice]:
    """Every run's pieces as they come. One run is read directly; several are read by a task each."""
    if len(runs) == 1:
        while True:
            piece = await runs[0].next_piece()
            yield piece
            if piece.finish_reason is not None:
                return
    queue: asyncio.Queue[Choice | Exception] = asyncio.Queue()

    async def pump(run: _Run) -> None:
        try:
            while True:
                piece = await run.next_piece()
                queue.put_nowait(piece)
                if piece.finish_reason is not None:
                    return
        except Exception as exc:
            queue.put_nowait(exc)

    tasks = [asyncio.ensure_future(pump(r)) for r in runs]
    try:
        for _ in range(len(runs)):
            while True:
                piece = await queue.get()
                if isinstance(piece, Exception):
                    raise piece
                yield piece
                if piece.finish_reason is not None:
                    break
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _events(body: GenerationRequest, meta: ResponseMeta, runs: list[_Run], tokenizer: Tokenizer) -> AsyncIterator[str]:
    """Server-sent events: `data: {chunk}` per piece of text, a usage chunk if asked for, then `data: [DONE]`."""
    for r in runs:
        opening = body.opening_chunk(meta, r.index)
        if opening is not None:
            yield _sse(opening)
    token_text = _token_text(tokenizer)
    try:
        pieces = _pieces(runs)
        try:
            async for piece in pieces:
                # Every step's token gets its chunk, even when its text is held back (half a character, a
                # possible stop-string start): as vLLM streams, so a client times each token, and a held-back
                # token does not look like a stalled stream.
                if piece.text or piece.finish_reason is not None or piece.token_ids:
                    yield _sse(body.chunk(meta, piece, token_text))
        finally:
            await pieces.aclose()
    except EngineFailed as exc:
        # Headers are gone (200): OpenAI clients raise on an event carrying an error object.
        yield _sse(_error_body(str(exc), "server_error", code="engine_error"))
    else:
        if body.include_usage:
            yield _sse(body.usage_chunk(meta, _usage(runs, body.num_candidates)))
    yield "data: [DONE]\n\n"


class _EventStream(StreamingResponse):
    """A server-sent-event response that runs `on_close` however streaming ends: done, failed, or client gone."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


async def _cancel_on_disconnect(request: Request, handler: Callable[[], Awaitable[Response]]) -> Response:
    """Run `handler`, cancelling it if the client disconnects first. Without this a queued or
    non-streaming request would hold its place and KV blocks for a client that is gone."""
    response: Response = Response(status_code=499)  # what a vanished client "gets": nobody reads it
    failure: Exception | None = None
    async with anyio.create_task_group() as group:
        group.start_soon(_cancel_when_disconnected, request, group.cancel_scope)
        try:
            response = await handler()
        except Exception as exc:  # re-raised outside the group, so FastAPI's handlers see it unwrapped
            failure = exc
        group.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return response


async def _cancel_when_disconnected(request: Request, scope: anyio.CancelScope) -> None:
    # The body has been read: the next message the server sends is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


# --- errors -----------------------------------------------------------------------------------------

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": what}
    for status, what in (
        (400, "invalid request"),
        (429, "overloaded: retry after Retry-After seconds"),
        (500, "engine error"),
        (503, "engine unavailable"),
    )
}


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> Response:
        message, param, code = _describe_validation_error(exc.errors())
        return _error(400, message, "invalid_request_error", param, code)

    @app.exception_handler(InvalidRequest)
    async def invalid_request(request: Request, exc: InvalidRequest) -> Response:
        return _error(400, exc.message, "invalid_request_error", exc.param, exc.code)

    @app.exception_handler(EngineOverloaded)
    async def overloaded(request: Request, exc: EngineOverloaded) -> Response:
        return _error(429, str(exc), "overloaded_error", code="server_overloaded", retry_after=exc.retry_after)

    @app.exception_handler(EngineUnavailable)
    async def unavailable(request: Request, exc: EngineUnavailable) -> Response:
        message = str(exc) or "engine unavailable"
        return _error(503, message, "service_unavailable_error", code="engine_unavailable", retry_after=UNAVAILABLE_RETRY_AFTER_S)

    @app.exception_handler(EngineFailed)
    async def engine_failed(request: Request, exc: EngineFailed) -> Response:
        return _error(500, str(exc), "server_error", code="engine_error")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return _error(exc.status_code, str(exc.detail), kind, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        # Starlette still re-raises it to the server, which logs the traceback; the server keeps serving.
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error", code="internal_error")


def _describe_validation_error(errors: Any) -> tuple[str, str | None, str]:
    """(message naming the field, top-level field, code) for the first of pydantic's errors."""
    err = errors[0]
    if err["type"] == "json_invalid":
        return f"invalid JSON: {err.get('ctx', {}).get('error', err['msg'])}", None, "json_invalid"
    # loc starts with "body"; union members appear in it as type names ("str", "list[int]"): drop both.
    path = [str(p) for p in err["loc"][1:] if not _is_type_tag(p)]
    detail = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]
    if not path and err["type"] == "model_attributes_type":
        # Typically `curl -d` without a JSON content type: the body was never parsed as JSON.
        detail = "must be a JSON object, sent with Content-Type: application/json"
    return f"{'.'.join(path) or 'body'}: {detail}", path[0] if path else None, err["type"]


def _is_type_tag(part: str | int) -> bool:
    return isinstance(part, str) and (not part.isidentifier() or part in ("str", "int", "float", "bool"))


def _error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> ErrorResponse:
    return ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=code))


def _error(
    status: int,
    message: str,
    kind: str,
    param: str | None = None,
    code: str | None = None,
    *,
    retry_after: float | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    headers = dict(headers or {})
    if retry_after is not None:
        # Retry-After takes whole seconds; 0 would invite an immediate retry storm.
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return _json(_error_body(message, kind, param, code), status, headers)


def _json(model: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(model.model_dump_json(), status_code=status, media_type="application/json", headers=headers)


def _sse(model: BaseModel) -> str:
    return f"data: {model.model_dump_json()}\n\n"
