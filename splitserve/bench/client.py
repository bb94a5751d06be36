"""Asynchronous streaming load generator for any OpenAI-compatible /v1/completions endpoint.

One httpx connection pool per run; open loop (send on schedule, never wait for replies) or closed loop
(N requests in flight). Every request is bounded by a timeout and the run by an optional deadline, so a
run always ends by itself. Failures are recorded as they happened, never retried.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Sequence

import httpx

from splitserve.workload.record import RequestRecord
from splitserve.workload.requests import RequestSpec

_SSE_EOL = re.compile(r"\r\n|\r|\n")

# Open loop must not queue behind a small pool, but a long trace must not open thousands of sockets either;
# beyond this many in flight the wait for a connection shows up as client-side TTFT.
MAX_OPEN_LOOP_CONNECTIONS = 1024
ERROR_TEXT_LIMIT = 500
STOP_CHECK_S = 0.25  # how often a stop_when condition is looked at: far under any latency an SLO bounds


class EndpointError(Exception):
    """The target cannot be used at all (unreachable, no such model); the message says why."""


@dataclass(frozen=True)
class Target:
    url: str  # base URL, e.g. http://127.0.0.1:8000
    model: str
    ignore_eos: bool = True

    @property
    def completions_url(self) -> str:
        return self.url.rstrip("/") + "/v1/completions"


def list_models(url: str, timeout_s: float = 10.0) -> list[str] | None:
    """Model ids from GET /v1/models; None when the server has no such listing (404/405)."""
    try:
        resp = httpx.get(url.rstrip("/") + "/v1/models", timeout=timeout_s)
    except httpx.HTTPError as e:
        raise EndpointError(f"cannot reach {url}: {_describe(e)}") from None
    if resp.status_code in (404, 405):
        return None
    if resp.status_code != 200:
        raise EndpointError(f"{url}/v1/models answered HTTP {resp.status_code}: {resp.text[:200]}")
    try:
        return [m["id"] for m in resp.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise EndpointError(f"{url}/v1/models did not return an OpenAI model list") from None


def resolve_model(url: str, model: str | None) -> str:
    """The model to load: the one asked for if the server lists it, else the server's first."""
    models = list_models(url)
    if models is None:
        if model is None:
            raise EndpointError(f"{url} does not list its models (/v1/models); pass --model")
        return model
    if not models:
        raise EndpointError(f"{url} lists no models")
    if model is None:
        return models[0]
    if model not in models:
        raise EndpointError(f"model {model!r} is not served by {url}; it serves: {', '.join(models)}")
    return model


async def run_load(
    target: Target,
    specs: Sequence[RequestSpec],
    prompt_of: Callable[[int], list[int]],
    *,
    concurrency: int | None = None,
    timeout_s: float = 300.0,
    deadline_s: float | None = None,
    retries: int = 0,
    on_done: Callable[[RequestRecord], None] | None = None,
    stop_when: Callable[[list[RequestRecord], float], bool] | None = None,
    on_start: Callable[[float], None] | None = None,
) -> list[RequestRecord]:
    """Send every request and return one record per spec, in workload order.

    prompt_of(i): the token ids of request i, asked for just before it is due (prompts are built lazily).

    concurrency None: open loop on the specs' arrival times; an int: closed loop with that many in flight.
    deadline_s: wall-clock limit for the whole run; requests still out are cancelled, unsent ones recorded.
    retries: a 429 or 503 is sent again after its Retry-After, up to this many times, as the OpenAI client
    does (it retries twice); within the request's timeout, and its latencies count from the first send.
    stop_when(records, now): looked at every STOP_CHECK_S; once true the run ends as at its deadline, and the
    requests it cut short are recorded as "stopped".
    on_start(unix): the Unix time of the run's clock zero, which every record's times count from, so they
    line up with a server's own logs (taken beside the zero: the event loop and the client take ~20 ms to
    set up, a fifth of a decode step).
    """
    records = [RequestRecord(i, s.arrival_s, s.input_len, s.output_len) for i, s in enumerate(specs)]
    pool = concurrency or min(len(specs), MAX_OPEN_LOOP_CONNECTIONS)
    limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s)) as client:
        t0 = time.perf_counter()
        if on_start is not None:
            on_start(time.time())
        clock = lambda: time.perf_counter() - t0  # noqa: E731 - the run's clock, shared by every request

        async def one(rec: RequestRecord, prompt: list[int]) -> None:
            await _request(client, target, rec, prompt, timeout_s, clock, retries)
            if on_done:
                on_done(rec)

        driver = (
            _closed_loop(records, prompt_of, one, concurrency, clock)
            if concurrency
            else _open_loop(records, prompt_of, one, clock)
        )
        stopped = False

        async def watch() -> None:
            nonlocal stopped
            while not stop_when(records, clock()):
                await asyncio.sleep(STOP_CHECK_S)
            stopped = True

        run = asyncio.ensure_future(asyncio.wait_for(driver, deadline_s))
        watcher = asyncio.ensure_future(watch()) if stop_when else None
        try:
            await asyncio.wait([run] + ([watcher] if watcher else []), return_when=asyncio.FIRST_COMPLETED)
        finally:
            await _cancel([t for t in (run, watcher) if t])  # cancelling the driver records every request still out
        if not run.cancelled() and isinstance(run.exception(), Exception) and not isinstance(run.exception(), TimeoutError):
            raise run.exception()  # TimeoutError: the run's deadline, the normal end of a run that overran it
    for rec in records:
        if stopped and (rec.sent_s is None or rec.error_kind == "deadline"):
            rec.error_kind, rec.error = "stopped", "the run was stopped once its SLO verdict was certain"
        elif rec.sent_s is None and rec.error_kind is None:
            rec.error_kind, rec.error = "unsent", "the run's deadline came before this request was sent"
        if on_done and rec.sent_s is None:
            on_done(rec)  # a request cut short in flight was never done; one never sent is, now
    return records


async def _open_loop(records: list[RequestRecord], prompt_of, one, clock) -> None:
    tasks = []
    try:
        for rec in records:
            prompt = prompt_of(rec.index)  # built while waiting for its send time, not after
            delay = rec.scheduled_s - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(rec, prompt)))
        await asyncio.gather(*tasks)
    finally:
        await _cancel(tasks)


async def _closed_loop(records: list[RequestRecord], prompt_of, one, concurrency: int, clock) -> None:
    queue = iter(records)

    async def slot() -> None:
        for rec in queue:  # a shared iterator: each slot takes the next request when its last one ends
            prompt = prompt_of(rec.index)
            rec.scheduled_s = clock()
            await one(rec, prompt)

    tasks = [asyncio.create_task(slot()) for _ in range(concurrency)]
    try:
        await asyncio.gather(*tasks)
    finally:
        await _cancel(tasks)


async def _cancel(tasks: list[asyncio.Task]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _request(
    client: httpx.AsyncClient, target: Target, rec: RequestRecord, prompt: list[int], timeout_s: float, clock,
    retries: int = 0,
) -> None:
    body = {
        "model": target.model,
        "prompt": prompt,
        "max_tokens": rec.output_len,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.ignore_eos:
        body["ignore_eos"] = True
    rec.sent_s = clock()
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                async with client.stream("POST", target.completions_url, json=body) as resp:
                    rec.status = resp.status_code
                    if resp.status_code == 200:
                        return await _read_stream(resp, rec, clock)
                    text = (await resp.aread()).decode("utf-8", "replace")
                    wait = _retry_after(resp) if resp.status_code in (429, 503) and rec.retries < retries else None
                    if wait is None:
                        _fail(rec, "http", text, clock)
                        return
                rec.retries += 1
                await asyncio.sleep(wait)
    except asyncio.CancelledError:
        _fail(rec, "deadline", "cancelled: the run's deadline was reached", clock)
        raise
    except TimeoutError:
        _fail(rec, "timeout", f"no complete response within {timeout_s:g} s", clock)
    except (httpx.ConnectError, httpx.ConnectTimeout) as e:
        _fail(rec, "connect", _describe(e), clock)
    except httpx.TimeoutException as e:
        _fail(rec, "timeout", _describe(e), clock)
    except httpx.HTTPError as e:
        _fail(rec, "stream", _describe(e), clock)


async def _sse_lines(resp: httpx.Response) -> AsyncIterator[str]:
    """The stream's lines as SSE ends them: at CR, LF or CRLF only. httpx's aiter_lines also ends one at
    U+2028, U+0085 and other characters str.splitlines knows, which a JSON string may hold raw: a model's
    text then broke an event in two. (A CRLF split across reads yields one extra blank line: harmless.)"""
    pending = ""
    async for text in resp.aiter_text():
        *lines, pending = _SSE_EOL.split(pending + text)
        for line in lines:
            yield line
    if pending:
        yield pending


async def _read_stream(resp: httpx.Response, rec: RequestRecord, clock) -> None:
    chunks, usage, done = 0, None, False
    async for line in _sse_lines(resp):
        if not line.startswith("data:"):
            continue  # blank separators, comments, "event:" lines
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        now = clock()
        try:
            event = json.loads(data)
        except json.JSONDecodeError:
            return _fail(rec, "stream", f"malformed event: {data[:200]}", clock)
        if "error" in event or event.get("object") == "error":
            return _fail(rec, "stream", json.dumps(event.get("error", event)), clock)
        usage = event.get("usage") or usage
        choices = event.get("choices") or []
        # Any chunk with a choice is output arriving, even with empty text: servers hold back a partial UTF-8
        # character, and a one-token reply may be an empty text with its finish_reason.
        if choices:
            chunks += 1
            rec.token_times_s.append(now)
            if rec.first_token_s is None:
                rec.first_token_s = now
    rec.end_s = clock()
    rec.completion_tokens = int(usage.get("completion_tokens") or chunks) if usage else chunks
    if usage:
        rec.prompt_tokens = usage.get("prompt_tokens")
        rec.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    if not done:
        _fail(rec, "stream", "the stream ended without [DONE]", clock)
    elif chunks == 0:
        _fail(rec, "stream", "the response carried no output token", clock)


def _retry_after(resp: httpx.Response) -> float:
    """The refusal's Retry-After in seconds (a number; one second when absent or an HTTP date)."""
    try:
        return max(0.0, float(resp.headers.get("retry-after", "1")))
    except ValueError:
        return 1.0


def _fail(rec: RequestRecord, kind, text: str, clock) -> None:
    rec.error_kind, rec.error = kind, text[:ERROR_TEXT_LIMIT]
    if rec.end_s is None:
        rec.end_s = clock()


def _describe(e: Exception) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
