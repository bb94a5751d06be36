"""A worker process: one engine in one role (prefill, decode or colocated) behind an internal HTTP API.

The frontend talks to workers over HTTP (control: small JSON messages and NDJSON token streams); KV bytes
go worker to worker through `splitserve.transfer`, so control traffic never waits behind bulk bytes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from typing import AsyncIterator, Awaitable, TypeVar

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from splitserve.runtime.worker.async_engine import AsyncEngine
from splitserve.runtime.worker.decode_role import DecodeRole
from splitserve.runtime.worker.engine import Engine
from splitserve.runtime.engine_client import EngineOverloaded, EngineStatsCollector, EngineUnavailable, TokenOutput
from splitserve.runtime.worker.prefill_role import PrefillFailed, PrefillRole, WrongTicket
from splitserve.runtime.worker.kv_event_log import KVEventLog
from splitserve.runtime.worker.state_stream import include_state_stream
from splitserve.runtime.worker.utilization import UtilizationCollector, UtilizationMeter
from splitserve.core.router_feed import WorkerReport
from splitserve.runtime.auth import Guard, Rule, Verifier
from splitserve.runtime.wire import DecodeRequest, GenerateRequest, PrefillRequest, StreamEvent, WorkerInfo, encoder
from splitserve.runtime.worker.metrics import WorkerMetrics
from splitserve.transfer import HandshakeError, KVLayout, KVReceiver, KVSender
from splitserve.transfer.staging import Staging, device_for

log = logging.getLogger(__name__)

T = TypeVar("T")

ROLES = ("prefill", "decode", "colocated")


class Worker:
    def __init__(
        self,
        role: str,
        engine: Engine,
        secret: bytes,
        *,
        host: str = "127.0.0.1",
        transport: str = "tcp",
        pipelined: bool = True,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.role = role
        self.engine = engine
        self.secret = secret
        self.generation = time.time_ns()
        self.kv_log = KVEventLog(engine.pool)
        self.metrics = WorkerMetrics(role)
        self.utilization = UtilizationMeter.for_engine(engine)
        self.utilization.attach(engine)
        self.metrics.registry.register(UtilizationCollector(self.utilization))
        layout = KVLayout.from_cache(engine.kv_cache, engine.loaded.fingerprint)
        self.kv_layout = f"{layout.dtype} block_size={layout.block_size} layers={layout.num_layers} block={layout.shape_str}"
        self.handshake_errors: list[str] = []  # as a sender: receivers that refused us
        self.receiver: KVReceiver | None = None
        self.sender: KVSender | None = None
        self.prefill_role: PrefillRole | None = None
        self.decode_role: DecodeRole | None = None
        if role == "decode":
            self.receiver = KVReceiver(engine.kv_cache, layout, secret, host=host, transport=transport)
            self.async_engine = AsyncEngine(engine, before_abort=self._before_abort)
            self.decode_role = DecodeRole(self.async_engine, self.receiver, self.metrics)
        elif role == "prefill":
            device = device_for(engine.kv_cache.tensor)  # a GPU cache goes through pinned buffers over tcp/shm
            self.sender = KVSender(layout, secret, staging=Staging(device, layout.block_bytes) if device else None)
            self.async_engine = AsyncEngine(engine, hooks_for=self._hooks_for, before_abort=self._before_abort)
            self.prefill_role = PrefillRole(self.async_engine, self.sender, self.metrics, pipelined)
        else:
            self.async_engine = AsyncEngine(engine)
        self.metrics.registry.register(EngineStatsCollector(self.async_engine.stats))

    def _hooks_for(self, out):  # type: ignore[no-untyped-def]
        return self.prefill_role.hooks_for(out)  # type: ignore[union-attr]

    def _before_abort(self, request_id: str) -> None:
        role = self.decode_role or self.prefill_role
        role.before_abort(request_id)  # type: ignore[union-attr]

    def start(self, engine_thread: bool = True) -> None:
        """Start the KV receiver (decode role) and the engine on a thread of its own; with `engine_thread`
        False the caller runs the engine (`async_engine.run()`) on its own thread."""
        if self.receiver is not None:
            self.receiver.start()
        if engine_thread:
            self.async_engine.start()

    def close(self) -> None:
        self.async_engine.shutdown()
        if self.receiver is not None:
            self.receiver.close()
        if self.sender is not None:
            self.sender.close()

    def info(self) -> WorkerInfo:
        e = self.engine
        return WorkerInfo(
            role=self.role,
            model_name=e.loaded.name,
            fingerprint=e.loaded.fingerprint,
            max_model_len=e.max_model_len,
            block_size=e.config.block_size,
            num_blocks=e.pool.num_blocks,
            transfer_endpoint=self.receiver.endpoint if self.receiver else None,
            generation=self.generation,
            pid=os.getpid(),
            kv_layout=self.kv_layout,
            kv_bytes_per_token=e.loaded.config.kv_bytes_per_token(e.loaded.dtype.itemsize),
            num_layers=e.loaded.config.num_layers,
            prefill_tokens_while_decoding=e.config.prefill_tokens_while_decoding,
        )

    async def state(self, after: int, snapshot: bool) -> WorkerReport:
        def read(e: Engine) -> tuple:
            # On the engine thread, between steps: the log, the snapshot and the load agree.
            self.kv_log.collect()
            hashes = sorted(e.pool.cached_hashes()) if snapshot else None
            return self.kv_log.last_seq, hashes, e.load(), dataclasses.replace(e.counters)

        last_seq, hashes, load, counters = await self.async_engine.call(read)
        link = self.prefill_role
        return WorkerReport(
            generation=self.generation, last_seq=last_seq,
            events=None if snapshot else self.kv_log.since(after), snapshot=hashes, load=load, counters=counters,
            link_bytes=link.link_bytes if link else 0.0, link_s=link.link_s if link else 0.0,
        )

    def idle(self) -> bool:
        """No request, reservation or block in transit: the worker may exit without losing anything."""
        return self.async_engine.load().idle

    def health(self) -> tuple[bool, dict]:
        """Answered on the event loop, not the engine thread: a worker stuck inside a step still says so
        (503 "stuck", with the step's age), and the frontend's heartbeat drops it as it drops a silent one."""
        errors = list(self.receiver.last_handshake_errors) if self.receiver else []
        errors += self.handshake_errors
        e = self.async_engine
        age = e.step_age()
        status = "engine down" if not e.healthy() else "stuck" if e.stuck() else "ok"
        body = {"status": status, "role": self.role, "handshake_errors": errors[-10:]}
        if age is not None:
            body.update(step_age_s=round(age, 3), stuck_after_s=round(e.stuck_after_s(), 3))
        return status == "ok", body


def create_worker_app(worker: Worker) -> FastAPI:
    app = FastAPI(title=f"splitserve {worker.role} worker")
    # Only the deployment's frontend (which holds its secret) may use the internal API: register KV peers,
    # reserve blocks, send prompts with tickets, read state. /health and /metrics stay open (read-only load).
    app.add_middleware(Guard, rules=[Rule("/internal/", signed=True)], verifier=Verifier(worker.secret))
    engine = worker.async_engine
    include_state_stream(app, worker)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok, body = worker.health()
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/internal/info")
    async def info() -> Response:
        return Response(encoder.encode(worker.info()), media_type="application/json")

    @app.get("/internal/state")
    async def state(after: int = 0, snapshot: bool = False) -> Response:
        return Response(encoder.encode(await worker.state(after, snapshot)), media_type="application/json")

    @app.get("/internal/stats")
    async def stats() -> JSONResponse:
        return JSONResponse(dataclasses.asdict(engine.stats()))

    @app.get("/metrics")
    async def metrics() -> Response:
        if worker.decode_role is not None:
            worker.metrics.reservations_waiting.set(engine.load().reserved)
        return Response(generate_latest(worker.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/internal/abort")
    async def abort(request: Request) -> Response:
        body = await request.json()
        await engine.abort(str(body["request_id"]))
        return Response(status_code=204)

    @app.post("/internal/generate")
    async def generate(request: Request) -> StreamingResponse:
        req = msgspec.json.decode(await request.body(), type=GenerateRequest)
        params = req.params

        def admit(e: Engine) -> None:
            e.add_request(req.request_id, req.prompt, params, time.monotonic(), output_token_ids=req.output_token_ids)

        try:
            stream = engine.generate(req.request_id, req.prompt, params, admit=admit)
        except EngineOverloaded as exc:
            return JSONResponse({"error": str(exc)}, status_code=429, headers={"Retry-After": f"{exc.retry_after:.0f}"})
        except EngineUnavailable as exc:
            return JSONResponse({"error": str(exc)}, status_code=503)
        return _ndjson(_events(req.request_id, stream))

    if worker.decode_role is not None:
        decode_role = worker.decode_role

        @app.post("/internal/decode")
        async def decode(request: Request) -> StreamingResponse:
            req = msgspec.json.decode(await request.body(), type=DecodeRequest)
            return _ndjson(_count_no_room(decode_role.decode(req), worker.metrics))

    if worker.prefill_role is not None:
        prefill_role = worker.prefill_role

        @app.post("/internal/connect")
        async def connect(request: Request) -> JSONResponse:
            """Handshake with a decode worker now: a mismatch shows at deployment time, not per request."""
            endpoint = str((await request.json())["endpoint"])
            try:
                await asyncio.to_thread(worker.sender.connect, endpoint)  # type: ignore[union-attr]
            except (HandshakeError, ConnectionError, OSError) as exc:
                message = f"KV connection to {endpoint} refused: {exc}"
                worker.handshake_errors.append(message)
                log.error("%s", message)
                return JSONResponse({"error": message}, status_code=502)
            return JSONResponse({"status": "connected"})

        @app.post("/internal/prefill")
        async def prefill(request: Request) -> Response:
            req = msgspec.json.decode(await request.body(), type=PrefillRequest)
            try:
                result = await _unless_hung_up(request, prefill_role.prefill(req))
            except ClientGone:
                return Response(status_code=499)  # nobody reads it: the prefill and its transfer stopped
            except HandshakeError as exc:
                return JSONResponse({"error": f"KV handshake refused: {exc}"}, status_code=502)
            except (ConnectionError, OSError) as exc:
                return JSONResponse({"error": f"cannot reach decode worker: {exc}"}, status_code=502)
            except WrongTicket as exc:
                return JSONResponse({"error": str(exc)}, status_code=409)
            except PrefillFailed as exc:
                return JSONResponse({"error": str(exc)}, status_code=500)
            return Response(encoder.encode(result), media_type="application/json")

    @app.exception_handler(msgspec.ValidationError)
    @app.exception_handler(msgspec.DecodeError)
    async def bad_message(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": f"malformed message: {exc}"}, status_code=400)

    return app


class ClientGone(Exception):
    """The caller hung up before the answer was ready."""


async def _unless_hung_up(request: Request, work: Awaitable[T]) -> T:
    """`work`, cancelled as soon as the caller hangs up (the frontend does when its client leaves): a
    prefill nobody waits for stops at once, instead of computing and sending KV for a gone client."""
    task = asyncio.ensure_future(work)

    async def hang_up() -> None:
        # The body has been read: the next message the server sends is the disconnect.
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(hang_up())
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientGone()
    return task.result()


async def _events(request_id: str, stream: AsyncIterator[TokenOutput]) -> AsyncIterator[StreamEvent]:
    try:
        async for out in stream:
            yield StreamEvent(out)
    except EngineOverloaded as exc:
        yield StreamEvent(TokenOutput(request_id, [], True, "rejected", error=str(exc)))
    except Exception as exc:  # admission refused or the engine failed: say so on the stream
        yield StreamEvent(TokenOutput(request_id, [], True, "error", error=str(exc)))


async def _count_no_room(events: AsyncIterator[StreamEvent], metrics: WorkerMetrics) -> AsyncIterator[StreamEvent]:
    async for ev in events:
        if ev.no_room:
            metrics.no_room.inc()
        yield ev


def _ndjson(events: AsyncIterator[StreamEvent]) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        async for ev in events:
            yield encoder.encode(ev) + b"\n"

    return StreamingResponse(body(), media_type="application/x-ndjson")
