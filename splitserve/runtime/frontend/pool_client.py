"""The frontend's EngineClient for a deployment of worker processes: prefill + decode pools, or a
colocated pool (the baseline, served through the very same frontend so comparisons are fair).

A split request: reserve blocks on a decode worker (never prefill what cannot be decoded) → the prefill
worker computes the prompt, streams KV layer by layer into those blocks and returns the first token,
which goes to the client at once → the decode worker streams the rest. Whatever fails (a dead or
stalled worker, a refused handshake, a passed deadline) ends the request within seconds: recomputed on
a decode worker (`on_transfer_failure="recompute"`) or failed with a clear error ("fail").
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator

import httpx

from splitserve.core.costs import CostModel
from splitserve.core.request import SamplingParams, stop_reason
from splitserve.core.router import AdmissionQueue, NoWorker, Router
from splitserve.model.tokenizer import Tokenizer
from splitserve.runtime.engine_client import EngineOverloaded, EngineStats, EngineUnavailable, TokenOutput
from splitserve.runtime.frontend.phases import PhaseLog, PhaseRecord
from splitserve.runtime.wire import DecodeRequest, GenerateRequest, Params, PrefillRequest, StreamEvent
from splitserve.runtime.frontend.router_feed import RouterPoll
from splitserve.runtime.wire import WorkerClient, WorkerError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolConfig:
    policy: str = "kv_aware"  # round_robin | least_loaded | kv_aware
    conditional: bool = True  # prefill on the decode worker when the cost model says it is cheaper
    overlap_weight: float = 1.0
    link_gbps: float = 10.0  # prior for the KV link until transfers measure it
    prefill_tokens_per_s: float = 300.0  # prior for per-token prefill cost until workers measure it
    decode_step_s: float = 0.05  # prior for a decode step until workers measure it
    poll_interval_s: float = 0.1  # how often the router reads each worker's load and KV events
    on_transfer_failure: str = "recompute"  # or "fail"
    reserve_timeout_s: float = 10.0  # how long a request may wait for decode-side blocks before a 429
    deadline_base_s: float = 10.0  # a ticket's deadline: base + per prompt token
    deadline_per_token_s: float = 0.01
    max_waiting: int = 256  # requests waiting for a reservation; beyond it: 429
    stream_read_timeout_s: float = 120.0


class PoolEngine:
    def __init__(self, tokenizer: Tokenizer, model_name: str, config: PoolConfig = PoolConfig()) -> None:
        if config.on_transfer_failure not in ("recompute", "fail"):
            raise ValueError("on_transfer_failure must be 'recompute' or 'fail'")
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.config = config
        self.max_model_len = 0
        self.pools: dict[str, list[WorkerClient]] = {"prefill": [], "decode": [], "colocated": []}
        self.phases = PhaseLog()
        self.http = httpx.AsyncClient(limits=httpx.Limits(max_connections=2048, max_keepalive_connections=256))
        self.admission = AdmissionQueue(config.max_waiting)
        self.router: Router | None = None  # made when the first worker tells the KV geometry
        self.feed: RouterPoll | None = None
        self._rr = itertools.count()
        self._stats: dict[str, EngineStats] = {}
        self.health_errors: list[str] = []  # workers refused at registration, and why

    # --- membership ---

    async def add_worker(self, url: str) -> WorkerClient:
        """Admit a worker after checking it can work with the others: same model and KV layout, and a
        completed KV handshake with every peer of the other phase. Refused with a message naming both
        sides' values (also kept in `health_errors`), never discovered per request."""
        w = await WorkerClient.connect(url, self.http)
        try:
            await self._check_compatible(w)
        except WorkerError as exc:
            self.health_errors.append(str(exc))
            log.error("%s", exc)
            raise
        if w.info.role != "colocated":
            await self._router_for(w).join(w)
        self.pools[w.info.role].append(w)
        lens = [p.info.max_model_len for pool in self.pools.values() for p in pool]
        self.max_model_len = min(lens)
        return w

    def _router_for(self, w: WorkerClient) -> RouterPoll:
        if self.feed is None:
            c = self.config
            costs = CostModel(
                kv_bytes_per_token=w.info.kv_bytes_per_token, num_layers=w.info.num_layers,
                link_bytes_per_s=c.link_gbps * 1e9 / 8, prefill_s_per_token=1.0 / c.prefill_tokens_per_s,
                decode_step_s=c.decode_step_s,
            )
            self.router = Router(c.policy, w.info.block_size, costs, c.overlap_weight, c.conditional)
            self.feed = RouterPoll(self.router, self.http)
        return self.feed

    async def drain_worker(self, url: str, timeout_s: float = 600.0) -> bool:
        """Route nothing new to the worker, wait until its requests are done, then remove it. True if it
        left with nothing in flight."""
        w = self._find(url)
        if w is None:
            return True
        if self.router is not None and w.info.role != "colocated":
            self.router.drain(w.url)
        w.draining = True
        end = time.monotonic() + timeout_s
        while w.in_flight and time.monotonic() < end:
            await asyncio.sleep(0.05)
        self.remove_worker(url)
        return w.in_flight == 0

    def _find(self, url: str) -> WorkerClient | None:
        return next((w for pool in self.pools.values() for w in pool if w.url == url.rstrip("/")), None)

    async def _check_compatible(self, w: WorkerClient) -> None:
        peers = [p for pool in self.pools.values() for p in pool]
        if peers:
            ref = peers[0].info
            # The layout first: it names dtype and block size, which also change the weights' fingerprint.
            checks = (
                ("KV layout", w.info.kv_layout, ref.kv_layout),
                ("model", f"{w.info.model_name} {w.info.fingerprint[:16]}", f"{ref.model_name} {ref.fingerprint[:16]}"),
            )
            for field, ours, theirs in checks:
                if ours != theirs:
                    raise WorkerError(f"worker {w.url} differs in {field}: {ours!r}, the deployment has {theirs!r} ({peers[0].url})")
        if w.info.role == "prefill":
            pairs = [(w, d) for d in self.pools["decode"]]
        elif w.info.role == "decode":
            pairs = [(p, w) for p in self.pools["prefill"]]
        else:
            pairs = []
        for p, d in pairs:
            assert d.info.transfer_endpoint is not None
            await p.connect_to(d.info.transfer_endpoint)

    def remove_worker(self, url: str) -> None:
        w = self._find(url)
        if w is None:
            return
        self.pools[w.info.role].remove(w)
        if self.feed is not None and w.info.role != "colocated":
            self.feed.leave(w)
        self._stats.pop(w.url, None)

    def healthy(self) -> bool:
        return bool(self.pools["colocated"]) or bool(self.pools["prefill"] and self.pools["decode"])

    async def _evict_if_dead(self, w: WorkerClient) -> None:
        """After a failure: a worker that does not answer its health check takes no more requests."""
        if not await w.healthy():
            log.warning("removing unresponsive %s worker %s", w.info.role, w.url)
            self.remove_worker(w.url)

    async def poll_stats(self, interval_s: float = 1.0) -> None:
        """Keep the pools' engine stats fresh for /metrics (a scrape must not wait on every worker)."""
        while True:
            for pool in self.pools.values():
                for w in list(pool):
                    try:
                        r = await self.http.get(w.url + "/internal/stats", timeout=2.0)
                        self._stats[w.url] = EngineStats(**r.json())
                    except (httpx.HTTPError, ValueError, TypeError):
                        self._stats.pop(w.url, None)
            await asyncio.sleep(interval_s)

    def stats(self) -> EngineStats:
        s = list(self._stats.values())
        return EngineStats(
            num_running=sum(x.num_running for x in s),
            num_waiting=sum(x.num_waiting for x in s) + len(self.admission),
            num_free_blocks=sum(x.num_free_blocks for x in s),
            num_total_blocks=sum(x.num_total_blocks for x in s),
            prefix_cache_queries=sum(x.prefix_cache_queries for x in s),
            prefix_cache_hits=sum(x.prefix_cache_hits for x in s),
        )

    async def run_background(self) -> None:
        """The polls that keep routing and metrics current; runs for the app's lifetime."""
        await asyncio.gather(self.poll_stats(), self._feed_router())

    async def _feed_router(self) -> None:
        while self.feed is None:  # a deployment may start empty, its workers joining later
            await asyncio.sleep(self.config.poll_interval_s)
        await self.feed.run(self.pools, self.config.poll_interval_s)

    async def close(self) -> None:
        await self.http.aclose()

    # --- requests ---

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenOutput]:
        if not self.healthy():
            raise EngineUnavailable("no workers: the deployment needs a colocated worker, or a prefill and a decode worker")
        if not self.admission.offer():
            raise EngineOverloaded(retry_after=self.admission.retry_after(time.monotonic()))
        return self._generate(request_id, list(prompt_token_ids), params)

    async def abort(self, request_id: str) -> None:
        """Requests end when their stream is closed (the frontend does that on disconnect)."""

    async def _generate(self, rid: str, prompt: list[int], params: SamplingParams) -> AsyncIterator[TokenOutput]:
        rec = PhaseRecord(rid, time.monotonic(), prompt_tokens=len(prompt))
        admitted = False
        try:
            if self.pools["colocated"]:
                rec.path = "colocated"
                w = self._pick("colocated")
                rec.decode_worker = w.url
                stream = self._local(w, rid, prompt, params, [], rec)
            else:
                stream = self._routed(rid, prompt, params, rec)
            async for out in stream:
                if not admitted:  # the request has a place (a reservation, or a worker's queue)
                    admitted = True
                    self.admission.leave(time.monotonic())
                if out.new_token_ids and rec.ttft_s is None:
                    rec.ttft_s = time.monotonic() - rec.arrival
                rec.output_tokens += len(out.new_token_ids)
                if out.finished:
                    rec.finish_reason, rec.error = out.finish_reason, out.error
                yield out
        finally:
            now = time.monotonic()
            if not admitted:
                self.admission.leave(now)
            rec.e2e_s = now - rec.arrival
            if rec.ttft_s is not None:
                rec.decode_s = rec.e2e_s - rec.ttft_s
            self.phases.add(rec)

    def _pick(self, role: str) -> WorkerClient:
        pool = [w for w in self.pools[role] if not w.draining]
        if not pool:
            raise EngineUnavailable(f"no {role} worker")
        # Fewest requests in flight; ties broken round-robin so idle workers share the load.
        start = next(self._rr) % len(pool)
        rotated = pool[start:] + pool[:start]
        return min(rotated, key=lambda w: w.in_flight)

    def _deadline(self, prompt: list[int]) -> float:
        return self.config.deadline_base_s + self.config.deadline_per_token_s * len(prompt)

    async def _routed(self, rid: str, prompt: list[int], params: SamplingParams, rec: PhaseRecord) -> AsyncIterator[TokenOutput]:
        """Route; then prefill remotely and stream from the decode worker, or prefill on the decode worker.
        A decode worker without room makes the request wait and route again, up to reserve_timeout_s."""
        assert self.router is not None
        give_up = time.monotonic() + self.config.reserve_timeout_s
        delay = 0.01
        while True:
            try:
                decision = self.router.route_tokens(prompt, time.monotonic())
            except NoWorker as exc:
                raise EngineUnavailable(str(exc)) from exc
            d = self._find(decision.decode)
            p = self._find(decision.prefill) if decision.prefill is not None else None
            rec.route = decision.decision.terms if decision.decision is not None else {}
            if d is not None and decision.prefill is None:
                rec.path = "local"
                rec.decode_worker = d.url
                async for out in self._local(d, rid, prompt, params, [], rec):
                    yield out
                return
            # A worker the router names but the pools lack is joining or leaving: route again, as on no room.
            if d is not None and p is not None:
                reserved = await self._reserve(d, rid, prompt, params, rec)
                if reserved is not None:
                    break
            if time.monotonic() + delay > give_up:
                raise EngineOverloaded(retry_after=max(1.0, self.config.reserve_timeout_s / 2))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)
        async for out in self._split(rid, prompt, params, rec, d, p, *reserved):
            yield out

    async def _reserve(
        self, d: WorkerClient, rid: str, prompt: list[int], params: SamplingParams, rec: PhaseRecord
    ) -> tuple[StreamEvent, AsyncIterator[StreamEvent]] | None:
        """Blocks for the prompt on `d`: its ticket and token stream, or None if it has no room now."""
        body = DecodeRequest(rid, prompt, Params.of(params), self._deadline(prompt))
        events = d.stream("/internal/decode", body, self.config.stream_read_timeout_s)
        try:
            ev = await anext(events)
        except (WorkerError, StopAsyncIteration) as exc:
            rec.events.append(f"decode worker {d.url} failed to reserve: {exc}")
            await self._evict_if_dead(d)
            return None
        if ev.ticket is not None:
            rec.reserve_s = time.monotonic() - rec.arrival
            return ev, events
        await events.aclose()
        if ev.error:
            raise ValueError(ev.error)
        return None

    async def _split(
        self, rid: str, prompt: list[int], params: SamplingParams, rec: PhaseRecord, d: WorkerClient,
        p: WorkerClient, reserved: StreamEvent, d_events: AsyncIterator[StreamEvent],
    ) -> AsyncIterator[TokenOutput]:
        rec.prefill_worker, rec.decode_worker = p.url, d.url
        rec.decode_cached_tokens = reserved.num_cached_tokens
        ticket = reserved.ticket
        assert ticket is not None
        body = PrefillRequest(rid, prompt, Params.of(params), ticket)
        d.in_flight += 1
        p.in_flight += 1
        # The decode side enforces the deadline and says why it gave up; the extra second lets its verdict
        # arrive before this call's own timeout.
        p_task = asyncio.ensure_future(p.prefill(body, timeout=ticket.deadline_s + 1.0))
        p_task.add_done_callback(lambda _: setattr(p, "in_flight", p.in_flight - 1))
        d_next = asyncio.ensure_future(anext(d_events))
        # On failure: (tokens the client already has, cause, whether the decode worker is still usable).
        fallback: tuple[list[int], str, bool] | None = None
        try:
            await asyncio.wait({p_task, d_next}, return_when=asyncio.FIRST_COMPLETED)
            if not p_task.done() and _decode_side_failed(d_next):
                fallback = ([], *_decode_side_cause(d_next))
            else:
                # The decode side may legitimately speak first (KV and first token landed there before the
                # prefill worker's reply reached us): the reply is still what we wait for.
                await asyncio.wait({p_task})
            if fallback is None and p_task.exception() is not None:
                fallback = ([], str(p_task.exception()), True)
                asyncio.ensure_future(self._evict_if_dead(p))
            if fallback is None:
                res = p_task.result()
                rec.queue_s, rec.prefill_s, rec.cached_tokens = res.queue_s, res.prefill_s, res.num_cached_tokens
                first = res.first_token
                stop = stop_reason([first], params, self.tokenizer.eos_token_ids, len(prompt) + 1, self.max_model_len)
                yield TokenOutput(
                    rid, [first], stop is not None, stop.value if stop else None, len(prompt), res.num_cached_tokens,
                    queue_time=res.queue_s,
                )
                if stop is not None:
                    return
                sent = [first]  # what the client has: a recompute continues after these
                while True:
                    try:
                        ev = await d_next
                    except (WorkerError, StopAsyncIteration) as exc:
                        fallback = (sent, f"decode worker {d.url} lost: {exc}", False)
                        break
                    if ev.kv_wait_s is not None:
                        rec.kv_wait_s = ev.kv_wait_s
                    if ev.finish_reason == "transfer_failed":
                        fallback = (sent, ev.error or "transfer failed", True)
                        break
                    sent += ev.tokens
                    out = ev.output(rid)
                    # The client's cached_tokens is what the computing (prefill) worker found cached; the
                    # decode worker's own count only sizes the transfer (rec.decode_cached_tokens).
                    out.num_cached_tokens = res.num_cached_tokens
                    yield out
                    if ev.finished:
                        return
                    d_next = asyncio.ensure_future(anext(d_events))
        finally:
            d.in_flight -= 1
            if not p_task.done():
                p_task.cancel()
                asyncio.ensure_future(p.abort(rid))
            d_next.cancel()
            await asyncio.gather(p_task, d_next, return_exceptions=True)
            await d_events.aclose()
        produced, cause, decode_usable = fallback
        rec.events.append(cause)
        log.warning("request %s: %s", rid, cause)
        if self.config.on_transfer_failure == "fail":
            yield TokenOutput(rid, [], True, "error", len(prompt), error=f"KV transfer failed: {cause}")
            return
        rec.path = "recompute"
        if not decode_usable:
            self.remove_worker(d.url)
            if not self.pools["decode"]:
                yield TokenOutput(rid, [], True, "error", len(prompt), error=f"{cause}; no decode worker left")
                return
            d = self._pick("decode")
        async for out in self._local(d, rid, prompt, params, produced, rec, suffix="/recompute"):
            yield out

    async def _local(
        self, w: WorkerClient, rid: str, prompt: list[int], params: SamplingParams, produced: list[int],
        rec: PhaseRecord, suffix: str = "",
    ) -> AsyncIterator[TokenOutput]:
        """The whole request (or its remainder after `produced`) computed on one worker."""
        body = GenerateRequest(rid + suffix, prompt, Params.of(params), produced)
        w.in_flight += 1
        try:
            async for ev in w.stream("/internal/generate", body, self.config.stream_read_timeout_s):
                if ev.finish_reason == "rejected" and not produced and rec.output_tokens == 0:
                    raise EngineOverloaded(retry_after=1.0, message=ev.error or "overloaded")
                if ev.queue_time is not None and rec.queue_s is None:
                    rec.queue_s = ev.queue_time
                yield ev.output(rid)
                if ev.finished:
                    return
            yield TokenOutput(rid, [], True, "error", len(prompt), error=f"worker {w.url} ended the stream early")
        except WorkerError as exc:
            yield TokenOutput(rid, [], True, "error", len(prompt), error=str(exc))
        finally:
            w.in_flight -= 1


def _decode_side_failed(d_next: asyncio.Future) -> bool:
    if not d_next.done():
        return False
    if d_next.exception() is not None:
        return True
    ev: StreamEvent = d_next.result()
    # "stop"/"length" with no token: the prefill worker's first token already ended the request, not a failure.
    ended_early = ev.finished and not ev.tokens and ev.finish_reason not in ("stop", "length")
    return ev.finish_reason in ("transfer_failed", "error") or ended_early


def _decode_side_cause(d_next: asyncio.Future) -> tuple[str, bool]:
    """Why the decode side ended a request before the first token came back, and whether it still serves."""
    exc = d_next.exception()
    if exc is not None:
        return f"decode worker lost: {exc}", False
    ev: StreamEvent = d_next.result()
    return ev.error or f"decode worker ended the request ({ev.finish_reason})", True

