"""The frontend's EngineClient for a deployment of worker processes: prefill + decode pools, or a
colocated pool (the baseline, served through the very same frontend so comparisons are fair).

A split request: reserve blocks on a decode worker (never prefill what cannot be decoded) → the prefill
worker computes the prompt, streams KV layer by layer into those blocks and returns the first token,
which goes to the client at once → the decode worker streams the rest. Whatever fails (a dead or
stalled worker, a refused handshake, a passed deadline) ends the request within seconds: recomputed on
a decode worker (`on_transfer_failure="recompute"`) or failed with a clear error ("fail"). That lifecycle
is the core `SplitRequest` (the simulator drives the same one); here its events come from HTTP calls and
its actions become HTTP calls, and membership (a lost or suspect worker) stays with the pool client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, TypeVar

import httpx

from splitserve.core.costs import CostModel
from splitserve.core.request import SamplingParams
from splitserve.core.admission import Admission
from splitserve.core.router import NoWorker, Router
from splitserve.core.split_request import (
    Abort, Action, Deadline, Emit, Event, Fail, FirstToken, KvComplete, PeerFailed, Recompute, Refused, Release,
    Reserve, Reserved, Routed, SendPrompt, SplitRequest, State, Suspect, Tokens, TransferFailed, WorkerLost,
)
from splitserve.model.tokenizer import Tokenizer
from splitserve.runtime.engine_client import EngineOverloaded, EngineStats, EngineUnavailable, TokenLogprobs, TokenOutput
from splitserve.runtime.frontend.phases import PhaseLog, PhaseRecord
from splitserve.runtime.auth import SignedCalls
from splitserve.runtime.frontend.router_feed import RouterPoll
from splitserve.runtime.wire import (
    DecodeRequest, GenerateRequest, PrefillRequest, PrefillResult, StreamEvent, Ticket, WorkerClient, WorkerError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


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
    max_waiting: int = 256  # requests waiting for their first token; beyond it: 429
    # ... and none admitted whose wait for the requests ahead, at the measured first-token rate, exceeds this:
    # past it, a waiting request outlives the pools' own timeouts (a ticket's base deadline, reserve_timeout_s)
    # and would fail after its client was told 200. Refused at once instead, with a measured Retry-After.
    admit_wait_s: float = 10.0
    heartbeat_s: float = 1.0  # how often each worker's /health is read (it answers between engine steps too)
    liveness_s: float = 5.0  # a worker silent this long is dead: removed, its requests recomputed elsewhere


class PoolClient:
    def __init__(self, tokenizer: Tokenizer, model_name: str, secret: bytes, config: PoolConfig = PoolConfig()) -> None:
        """`secret`: the deployment's, which signs every call to a worker (workers refuse unsigned ones)."""
        if config.on_transfer_failure not in ("recompute", "fail"):
            raise ValueError("on_transfer_failure must be 'recompute' or 'fail'")
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.config = config
        self.max_model_len = 0
        self.pools: dict[str, list[WorkerClient]] = {"prefill": [], "decode": [], "colocated": []}
        self.phases = PhaseLog()
        self.http = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=2048, max_keepalive_connections=256), auth=SignedCalls(secret)
        )
        self.admission = Admission(config.max_waiting, config.admit_wait_s)
        self.router: Router | None = None  # made when the first worker tells the KV geometry
        self.feed: RouterPoll | None = None
        self._stats: dict[str, EngineStats] = {}
        self.health_errors: list[str] = []  # workers refused at registration, and why
        # Dropped for silence, yet something still listens there: a worker starved by a burst, not dead.
        # The heartbeat takes each back (through the same checks as any joining worker) once it answers.
        self._silent: dict[str, WorkerClient] = {}

    # --- membership ---

    async def add_worker(self, url: str) -> WorkerClient:
        """Admit a worker after checking it can work with the others: same model and KV layout, and a
        completed KV handshake with every peer of the other phase. Refused with a message naming both
        sides' values (also kept in `health_errors`), never discovered per request."""
        w = await WorkerClient.connect(url, self.http)
        # The same URL again is the same worker restarted (a new generation): it replaces the old entry.
        self.remove_worker(url)
        self._silent.pop(w.url, None)
        try:
            await self._check_compatible(w)
        except WorkerError as exc:
            self.health_errors.append(str(exc))
            log.error("%s", exc)
            raise
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
        if self.router is not None:
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
        w.lost.set()  # calls still waiting on it end now (a drained worker has none left)
        if self.feed is not None:
            self.feed.leave(w)
        self._stats.pop(w.url, None)

    def healthy(self) -> bool:
        """Serving, perhaps degraded: any worker can compute a request whole."""
        return any(self.pools.values())

    def degraded(self) -> str | None:
        """Why the deployment serves with less than it was built with, or None."""
        if self.pools["colocated"] or not any(self.pools.values()):
            return None
        if not self.pools["prefill"]:
            return "no prefill worker: prompts are prefilled on decode workers"
        if not self.pools["decode"]:
            return "no decode worker: requests run whole on prefill workers"
        return None

    async def heartbeat(self) -> None:
        """Liveness: each worker's /health every `heartbeat_s`; one silent for `liveness_s` is removed (its
        in-flight requests fail over and are recomputed elsewhere), so a dead or partitioned worker is
        found in seconds, not at a request's read timeout."""
        c = self.config
        last_ok: dict[str, float] = {}
        while True:
            members = [w for pool in self.pools.values() for w in pool]
            alive = await asyncio.gather(*(w.healthy(timeout_s=2 * c.heartbeat_s) for w in members))
            now = time.monotonic()
            last_ok = {url: t for url, t in last_ok.items() if any(w.url == url for w in members)}  # left: forget
            for w, ok in zip(members, alive):
                seen = max(last_ok.setdefault(w.url, now), w.last_heard)
                if ok:
                    last_ok[w.url] = now
                elif now - seen > c.liveness_s and self._find(w.url) is w:
                    log.warning("%s worker %s silent for %.1f s: removed", w.info.role, w.url, now - seen)
                    self._drop_silent(w)
                    last_ok.pop(w.url, None)
            await self._readmit()
            await asyncio.sleep(c.heartbeat_s)

    def _drop_silent(self, w: WorkerClient) -> None:
        self.remove_worker(w.url)
        if not w.refused:
            self._silent[w.url] = w

    async def _readmit(self) -> None:
        """Workers dropped for silence that answer again rejoin; ones found gone are forgotten."""
        for url, w in list(self._silent.items()):
            if self._find(url) is not None:
                del self._silent[url]  # it joined again by itself (restarted and registered)
            elif await w.healthy(timeout_s=2 * self.config.heartbeat_s):
                del self._silent[url]
                try:
                    await self.add_worker(url)
                    log.warning("%s worker %s answers again: back in its pool", w.info.role, url)
                except WorkerError:
                    pass  # refused at the checks: add_worker logged why
            elif w.refused:
                del self._silent[url]

    async def _evict_if_dead(self, w: WorkerClient) -> None:
        """After a failure: a worker that is gone (nothing listens) or silent for `liveness_s` takes no more
        requests. One slow health check is not enough: under a burst a live worker answers late."""
        if await w.healthy():
            return
        gone = w.refused or time.monotonic() - w.last_heard > self.config.liveness_s
        if gone and self._find(w.url) is w:  # many failed calls may ask at once: log once
            log.warning("removing unresponsive %s worker %s", w.info.role, w.url)
            self._drop_silent(w)

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
        await asyncio.gather(self.poll_stats(), self._feed_router(), self.heartbeat())

    async def _feed_router(self) -> None:
        while self.feed is None:  # a deployment may start empty, its workers joining later
            await asyncio.sleep(self.config.poll_interval_s)
        await self.feed.run(self.pools, self.config.poll_interval_s)

    async def close(self) -> None:
        await self.http.aclose()

    # --- requests ---

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenOutput]:
        if not self.healthy():
            raise EngineUnavailable("no workers: every worker of the deployment is gone (restarting ones rejoin)")
        retry_after = self.admission.offer(time.monotonic())
        if retry_after is not None:
            raise EngineOverloaded(retry_after=retry_after)
        return self._generate(request_id, list(prompt_token_ids), params)

    async def abort(self, request_id: str) -> None:
        """Requests end when their stream is closed (the frontend does that on disconnect)."""

    async def _generate(self, rid: str, prompt: list[int], params: SamplingParams) -> AsyncIterator[TokenOutput]:
        rec = PhaseRecord(rid, time.monotonic(), prompt_tokens=len(prompt))
        admitted = False
        stream: AsyncIterator[TokenOutput] | None = None
        try:
            if self.pools["colocated"]:
                rec.path = "colocated"
                w = self._whole(prompt)
                rec.decode_worker = w.url
                stream = self._local(w, rid, prompt, params, [], rec)
            else:
                stream = self._routed(rid, prompt, params, rec)
            async for out in stream:
                if not admitted:  # its first output (a token, or the end): it no longer waits
                    admitted = True
                    self.admission.leave(time.monotonic())
                if out.new_token_ids and rec.ttft_s is None:
                    rec.ttft_s = time.monotonic() - rec.arrival
                rec.output_tokens += len(out.new_token_ids)
                if out.finished:
                    rec.finish_reason, rec.error = out.finish_reason, out.error
                yield out
        finally:
            if stream is not None:
                # The inner stream's own teardown (releases, the split's phases into `rec`) runs before the
                # record is written: a caller that stops reading at the finished output closes only this
                # generator, and the inner one would otherwise be finalized later, after the record.
                await stream.aclose()
            now = time.monotonic()
            if not admitted:  # refused, failed or aborted before its first output: no measure of speed
                self.admission.leave(now, started=False)
            rec.e2e_s = now - rec.arrival
            if rec.ttft_s is not None:
                rec.decode_s = rec.e2e_s - rec.ttft_s
            self.phases.add(rec)

    def _whole(self, prompt: list[int]) -> WorkerClient:
        """The worker that computes a request whole (a colocated one, or a decode worker for a recompute),
        placed by the router like every other request."""
        assert self.router is not None
        try:
            decision = self.router.route_tokens(prompt, time.monotonic(), whole=True)
        except NoWorker as exc:
            raise EngineUnavailable(str(exc)) from exc
        w = self._find(decision.decode)
        if w is None:  # the router names a worker the pools lack only while it joins or leaves
            raise EngineUnavailable(f"worker {decision.decode} is joining or leaving; try again")
        return w

    def _retry_after(self) -> float:
        """For a refusal after admission (no room in time, a worker's full queue): how long the waiting
        room takes to drain at its measured rate."""
        return max(1.0, self.admission.expected_wait(time.monotonic()) or 1.0)

    def _deadline(self, prompt: list[int], queued_tokens: int = 0) -> float:
        """How long a decode worker holds a reservation for the KV: the prefill worker computes the prompts
        sent to it before this one first, so they count too. Without them, a burst queued on the prefill
        worker let tickets expire while their KV was on its way, and each expiry recomputed its whole prompt
        on the decode worker (seen at load 10: 3 of 16 requests)."""
        return self.config.deadline_base_s + self.config.deadline_per_token_s * (len(prompt) + queued_tokens)

    async def _routed(self, rid: str, prompt: list[int], params: SamplingParams, rec: PhaseRecord) -> AsyncIterator[TokenOutput]:
        """Route; then prefill remotely and stream from the decode worker (a `SplitRequest` says what to do at
        each step), or prefill on the decode worker. A decode worker without room makes the request wait and
        route again, up to reserve_timeout_s."""
        assert self.router is not None
        split = SplitRequest(params, self.tokenizer.eos_token_ids, len(prompt), self.max_model_len, self.config.on_transfer_failure)
        calls = _Calls(self, rid, prompt, params)
        try:
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
                    async for out in self._drive(split, calls, split.handle(Routed(d, p), time.monotonic()), rec):
                        yield out
                    if split.state is not State.ROUTING:
                        return
                if time.monotonic() + delay > give_up:
                    raise EngineOverloaded(retry_after=self._retry_after(), message="no decode worker has room; retry later")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.2)
        finally:
            if not split.done:  # the client left, or the request was given up
                async for _ in self._drive(split, calls, split.handle(Abort(), time.monotonic()), rec):
                    pass
            await calls.close()
            _note(rec, split)

    async def _drive(
        self, split: SplitRequest, calls: _Calls, actions: list[Action], rec: PhaseRecord
    ) -> AsyncIterator[TokenOutput]:
        """Carry out the split request's actions and feed it what the workers say, until it is done or must
        be placed again."""
        todo = deque(actions)
        while True:
            while todo:
                act = todo.popleft()
                if isinstance(act, Emit):
                    yield calls.output(split, act)
                elif isinstance(act, Reserve):
                    todo += split.handle(await calls.reserve(act.decode, split.prefill), time.monotonic())
                elif isinstance(act, SendPrompt):
                    calls.send_prompt(act.prefill, act.decode)
                elif isinstance(act, Release):
                    await calls.release(act.side)
                elif isinstance(act, Suspect):
                    if split.state is State.ROUTING:  # placed again next: not on the same dead worker
                        await self._evict_if_dead(act.worker)
                    else:
                        asyncio.ensure_future(self._evict_if_dead(act.worker))
                elif isinstance(act, WorkerLost):
                    self.remove_worker(act.worker.url)
                elif isinstance(act, Recompute):
                    async for out in self._recompute(split, calls, act, rec):
                        yield out
                elif isinstance(act, Fail):
                    if act.reason == "refused":
                        raise ValueError(act.message)
                    log.warning("request %s: %s", calls.rid, split.causes[-1])
                    yield TokenOutput(calls.rid, [], True, "error", len(calls.prompt), error=act.message)
                # Retry: the caller routes again.
            if split.done or split.state is State.ROUTING:
                return
            event = await calls.next_event()
            todo += split.handle(event, time.monotonic())

    async def _recompute(self, split: SplitRequest, calls: _Calls, act: Recompute, rec: PhaseRecord) -> AsyncIterator[TokenOutput]:
        await calls.close()
        _note(rec, split)
        log.warning("request %s: %s", calls.rid, split.causes[-1])
        rec.path = "recompute"
        d = act.decode
        if d is None:
            try:
                d = self._whole(calls.prompt)  # another decode worker, or (degraded) a prefill worker
            except EngineUnavailable as exc:
                if not act.produced and rec.output_tokens == 0:  # the client has nothing yet: a 503, not a 200
                    raise EngineUnavailable(f"{split.causes[-1]}; {exc}") from exc
                yield TokenOutput(calls.rid, [], True, "error", len(calls.prompt), error=f"{split.causes[-1]}; {exc}")
                return
        async for out in self._local(d, calls.rid, calls.prompt, calls.params, list(act.produced), rec, suffix="/recompute"):
            yield out

    async def _local(
        self, w: WorkerClient, rid: str, prompt: list[int], params: SamplingParams, produced: list[int],
        rec: PhaseRecord, suffix: str = "",
    ) -> AsyncIterator[TokenOutput]:
        """The whole request (or its remainder after `produced`) computed on one worker."""
        body = GenerateRequest(rid + suffix, prompt, params, produced)
        w.in_flight += 1
        events = w.stream("/internal/generate", body)
        try:
            while True:
                try:
                    ev = await unless_lost(w, anext(events))
                except StopAsyncIteration:
                    break
                out = ev.out
                if out is None:
                    continue
                if out.finish_reason == "rejected" and not produced and rec.output_tokens == 0:
                    raise EngineOverloaded(retry_after=self._retry_after(), message=out.error or "overloaded")
                if out.queue_time is not None and rec.queue_s is None:
                    rec.queue_s = out.queue_time
                if out.prefill_time is not None and rec.prefill_s is None:
                    rec.prefill_s = out.prefill_time
                out.request_id = rid  # the worker's id carries a suffix on a recompute
                yield out
                if out.finished:
                    return
            yield TokenOutput(rid, [], True, "error", len(prompt), error=f"worker {w.url} ended the stream early")
        except WorkerError as exc:
            if not produced and rec.output_tokens == 0:  # lost before the client had anything: a 503, not a 200
                raise EngineUnavailable(str(exc)) from exc
            yield TokenOutput(rid, [], True, "error", len(prompt), error=str(exc))
        finally:
            w.in_flight -= 1
            await events.aclose()


async def unless_lost(w: WorkerClient, call: Awaitable[T]) -> T:
    """`call`'s result, or WorkerError as soon as the frontend drops `w` (the heartbeat found it dead,
    partitioned or stuck): with no read timeouts, this is what ends a call to a worker that went silent."""
    task = asyncio.ensure_future(call)
    lost = asyncio.ensure_future(w.lost.wait())
    try:
        await asyncio.wait((task, lost), return_when=asyncio.FIRST_COMPLETED)
    finally:
        lost.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise WorkerError(f"{w.info.role} worker {w.url} lost: removed by the heartbeat")
    return task.result()



def _note(rec: PhaseRecord, split: SplitRequest) -> None:
    """The split request's phases into the request's record."""
    if split.reserved_at is not None:
        rec.reserve_s = split.reserved_at - rec.arrival
        rec.prefill_worker, rec.decode_worker = split.prefill.url, split.decode.url
        rec.decode_cached_tokens = split.decode_cached_tokens
    if split.queue_s is not None:
        rec.queue_s, rec.prefill_s, rec.cached_tokens = split.queue_s, split.prefill_s, split.cached_tokens
    if split.kv_wait_s is not None:
        rec.kv_wait_s = split.kv_wait_s
    rec.events = list(split.causes)


def _prefill_answered(p: WorkerClient, prompt_tokens: int) -> None:
    p.in_flight -= 1
    p.prompt_tokens_in_flight -= prompt_tokens


class _Calls:
    """The HTTP calls of one split request: the decode worker's stream, the prefill call, and the events they
    turn into."""

    def __init__(self, pool: PoolClient, rid: str, prompt: list[int], params: SamplingParams) -> None:
        self.pool, self.rid, self.prompt, self.params = pool, rid, prompt, params
        self.d: WorkerClient | None = None
        self.p: WorkerClient | None = None
        self.counted: list[WorkerClient] = []  # decode workers whose in_flight counts this request
        self.d_events: AsyncIterator[StreamEvent] | None = None
        self.d_next: asyncio.Future | None = None
        self.p_task: asyncio.Future | None = None
        self.ticket: Ticket | None = None
        self.first_token_by = 0.0
        self.queued: deque[Event] = deque()  # a stream line can carry two events
        self.emitted = False
        # Logprobs of the tokens the split request will emit, in order: the prefill worker's first token's,
        # then the decode worker's (the core state machine carries token ids only).
        self.first_logprobs: TokenLogprobs | None = None
        self.decode_logprobs: deque[TokenLogprobs] = deque()
        self.lost: dict[str, asyncio.Future] = {}  # per side: done when the frontend drops that worker

    async def reserve(self, d: WorkerClient, p: WorkerClient | None) -> Event:
        queued = p.prompt_tokens_in_flight if p is not None else 0
        body = DecodeRequest(self.rid, self.prompt, self.params, self.pool._deadline(self.prompt, queued))
        events = d.stream("/internal/decode", body)
        try:
            ev = await unless_lost(d, anext(events))
        except (WorkerError, StopAsyncIteration) as exc:
            await events.aclose()
            return PeerFailed("decode", f"decode worker {d.url} failed to reserve: {exc}")
        if ev.ticket is None or ev.out is None:
            await events.aclose()
            return Refused(ev.out.error if ev.out is not None else None)
        self.d, self.d_events, self.ticket = d, events, ev.ticket
        return Reserved(ev.out.num_cached_tokens)

    def send_prompt(self, p: WorkerClient, d: WorkerClient) -> None:
        assert self.ticket is not None and self.d_events is not None
        d.in_flight += 1
        self.counted.append(d)
        p.in_flight += 1
        p.prompt_tokens_in_flight += len(self.prompt)
        # The decode side enforces the deadline and says why it gave up; the extra second lets its verdict
        # arrive before ours, and httpx's own timeout comes later still.
        self.first_token_by = time.monotonic() + self.ticket.deadline_s + 1.0
        body = PrefillRequest(self.rid, self.prompt, self.params, self.ticket)
        self.p_task = asyncio.ensure_future(p.prefill(body, timeout=self.ticket.deadline_s + 2.0))
        self.p_task.add_done_callback(lambda _: _prefill_answered(p, len(self.prompt)))
        self.p = p
        self.d_next = asyncio.ensure_future(anext(self.d_events))
        self.lost = {"prefill": asyncio.ensure_future(p.lost.wait()), "decode": asyncio.ensure_future(d.lost.wait())}

    async def next_event(self) -> Event:
        """What the workers say next. The prefill worker's answer first when both have spoken: the decode
        side may legitimately speak first (KV and first token landed there before the reply reached us)."""
        while not self.queued:
            waiting = {f for f in (self.p_task, self.d_next) if f is not None}
            # While a side's call is open: its worker dropped by the heartbeat ends the wait too.
            waiting |= {self.lost[side] for side, f in (("prefill", self.p_task), ("decode", self.d_next)) if f is not None}
            timeout = max(0.0, self.first_token_by - time.monotonic()) if self.p_task is not None else None
            await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if self.d_next is not None and not self.d_next.done() and self.lost["decode"].done():
                assert self.d is not None
                return PeerFailed("decode", f"decode worker {self.d.url} lost: removed by the heartbeat")
            if self.p_task is not None and self.lost["prefill"].done() and not self.p_task.done():
                assert self.p is not None
                return PeerFailed("prefill", f"prefill worker {self.p.url} lost: removed by the heartbeat")
            if self.p_task is not None and self.p_task.done():
                task, self.p_task = self.p_task, None
                if task.exception() is not None:
                    return PeerFailed("prefill", str(task.exception()))
                res: PrefillResult = task.result()
                self.first_logprobs = res.logprobs
                return FirstToken(res.first_token, res.num_cached_tokens, res.queue_s, res.prefill_s)
            if self.p_task is not None and time.monotonic() >= self.first_token_by:
                return Deadline()
            if self.d_next is not None and self.d_next.done():
                self._decode_said(self.d_next)
        return self.queued.popleft()

    def _decode_said(self, d_next: asyncio.Future) -> None:
        assert self.d is not None and self.d_events is not None
        self.d_next = None
        if d_next.exception() is not None:
            self.queued.append(PeerFailed("decode", f"decode worker {self.d.url} lost: {d_next.exception()}"))
            return
        ev: StreamEvent = d_next.result()
        if ev.kv_wait_s is not None:
            self.queued.append(KvComplete(ev.kv_wait_s))
        out = ev.out
        if out is None:
            self.queued.append(PeerFailed("decode", f"decode worker {self.d.url} sent no output after its ticket"))
            return
        if out.finish_reason == "transfer_failed":
            self.queued.append(TransferFailed(out.error or "transfer failed"))
            return
        self.decode_logprobs.extend(out.logprobs or ())
        self.queued.append(Tokens(tuple(out.new_token_ids), out.finish_reason if out.finished else None, out.error))
        if not out.finished:
            self.d_next = asyncio.ensure_future(anext(self.d_events))

    def output(self, split: SplitRequest, act: Emit) -> TokenOutput:
        # The client's cached_tokens is what the computing (prefill) worker found cached; the decode worker's
        # own count only sizes the transfer. The queue time is the prefill worker's, on the first output.
        first, self.emitted = not self.emitted, True
        return TokenOutput(
            self.rid, list(act.tokens), act.finished, act.finish_reason, len(self.prompt), split.cached_tokens,
            queue_time=split.queue_s if first else None, error=act.error, logprobs=self._logprobs(first, len(act.tokens)),
        )

    def _logprobs(self, first: bool, num_tokens: int) -> list[TokenLogprobs] | None:
        if self.params.logprobs is None:
            return None
        lps = [self.first_logprobs] if first and self.first_logprobs is not None else []
        while len(lps) < num_tokens and self.decode_logprobs:
            lps.append(self.decode_logprobs.popleft())
        return lps

    async def release(self, side: str) -> None:
        if side == "prefill":
            assert self.p_task is not None and self.p is not None
            self.p_task.cancel()
            asyncio.ensure_future(self.p.abort(self.rid))
        else:
            assert self.d_events is not None
            if self.d_next is not None:
                self.d_next.cancel()
                await asyncio.gather(self.d_next, return_exceptions=True)  # the stream stops running first
                self.d_next = None
            await self.d_events.aclose()  # the decode worker takes the closed stream as an abort

    async def close(self) -> None:
        """Let go of whatever is still open (after the request ended, or before it is recomputed)."""
        # Counters first, before any await: a cancellation arriving during the awaits below (a client gone
        # while the request is torn down) must not leave the worker counting this request for good.
        for d in self.counted:
            d.in_flight -= 1
        self.counted.clear()
        pending = [f for f in (self.p_task, self.d_next, *self.lost.values()) if f is not None]
        self.lost = {}
        for f in pending:
            f.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self.p_task = self.d_next = None
        if self.d_events is not None:
            await self.d_events.aclose()
            self.d_events = None
