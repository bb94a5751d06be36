"""Drives an Engine in real time on one thread and serves it to asyncio code as an EngineClient.

The engine runs on a thread of its own (`start`) or on the calling one (`run`). A worker process runs it on
its main thread, with HTTP on a side thread: the thread that loads the model is the one that steps it, so the
process has one OpenMP team. A second team (model loaded on the main thread, stepped on another) makes
libgomp count more threads than cores; it then stops spinning between parallel regions and sleeps at each:
measured with SmolLM2-135M, 2 threads, batch 16 at 1k contexts, the engine alone: 125 ms a step with one
team against 158 ms with two; served, ~400 context switches a step against ~35.

Every scheduler mutation (add, abort, reserve, step) happens on the engine thread, between steps: an
abort can never free blocks that a running forward pass is still writing. Other threads read the
scheduler's load as the engine thread last published it (after each turn of its loop), never its queues.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from typing import AsyncIterator, Callable, TypeVar

from splitserve.core.admission import DrainRate
from splitserve.core.request import SamplingParams
from splitserve.core.scheduler import QueueFull, SchedulerLoad
from splitserve.model.kv_cache import PagedKVCache
from splitserve.runtime.worker.engine import Engine, HooksFactory, engine_stats
from splitserve.runtime.engine_client import EngineOverloaded, EngineStats, EngineUnavailable, TokenOutput

log = logging.getLogger(__name__)

T = TypeVar("T")
Admit = Callable[[Engine], "TokenOutput | None"]

# A step is stuck when it has run this many times longer than the longest of the recent steps (so a machine
# slowed by load stretches the bound with it), and never before STUCK_FLOOR_S: the first long prefill of a
# cold worker is not stuck.
STUCK_FACTOR = 10.0
STUCK_FLOOR_S = 30.0


class NoRoom(Exception):
    """An admission found no free KV blocks right now (decode-side reservation)."""


class AsyncEngine:
    def __init__(
        self, engine: Engine, hooks_for: HooksFactory | None = None, before_abort: Callable[[str], None] | None = None,
        stuck_floor_s: float = STUCK_FLOOR_S,
    ) -> None:
        """`hooks_for`: layer hooks per step (prefill role). `before_abort(request_id)`: runs on the engine
        thread before an abort frees a request's blocks (decode role: stop KV still arriving into them)."""
        self.engine = engine
        self.before_abort = before_abort
        self.model_name = engine.loaded.name
        self.tokenizer = engine.loaded.tokenizer
        self.max_model_len = engine.max_model_len
        self.hooks_for = hooks_for
        self.kv_cache: PagedKVCache = engine.kv_cache  # the roles' transfers read and write its blocks
        self.num_layers = engine.loaded.config.num_layers
        # The load as of the engine thread's last turn, with the adds it had applied by then: replaced
        # whole, so any thread reads one consistent pair.
        self._published: tuple[SchedulerLoad, int] = (engine.load(), 0)
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[TokenOutput | Exception]]] = {}
        # Adds sent to the engine thread vs applied there: each counter has one writer, so no lock is needed.
        self._adds_sent = 0
        self._adds_applied = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._running = False  # the loop is on some thread (set and cleared by that thread)
        # Written by the engine thread only, read by /health from the event loop (single assignments).
        self._step_started: float | None = None
        self._step_seconds: deque[float] = deque(maxlen=64)
        self.stuck_floor_s = stuck_floor_s
        self._drain = DrainRate()  # requests leaving the waiting queue per busy second (engine thread)
        self._drain_per_s: float | None = None

    def start(self) -> "AsyncEngine":
        """Run the engine on a thread of its own."""
        self._running = True  # before the thread exists: a request may come at once
        self._thread = threading.Thread(target=self.run, name="engine", daemon=True)
        self._thread.start()
        return self

    def run(self) -> None:
        """Run the engine on the calling thread until `stop` (or `shutdown`) is called."""
        self._running = True
        try:
            self._loop()
        finally:
            self._running = False

    def stop(self) -> None:
        """Make the engine loop return after its current step (callable from any thread)."""
        self._stop.set()
        self._inbox.put(lambda: None)

    def shutdown(self) -> None:
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def healthy(self) -> bool:
        return self._running and not self._stop.is_set()

    def step_age(self) -> float | None:
        """Seconds the engine thread has been inside its current step, None between steps (any thread)."""
        started = self._step_started
        return None if started is None else time.monotonic() - started

    def stuck_after_s(self) -> float:
        """How long a step may run before it counts as stuck: relative to the recent steps' times."""
        recent = max(self._step_seconds, default=0.0)
        return max(self.stuck_floor_s, STUCK_FACTOR * recent)

    def stuck(self) -> bool:
        age = self.step_age()
        return age is not None and age > self.stuck_after_s()

    def load(self) -> SchedulerLoad:
        """The scheduler's load as of the engine thread's last turn (callable from any thread)."""
        return self._published[0]

    def stats(self) -> EngineStats:
        return engine_stats(self.load())

    def submit(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the engine thread between steps (callable from any thread)."""
        self._inbox.put(fn)

    async def call(self, fn: Callable[[Engine], T]) -> T:
        """Run `fn(engine)` on the engine thread between steps and await its result."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()

        def run() -> None:
            try:
                result = fn(self.engine)
            except Exception as exc:
                loop.call_soon_threadsafe(_settle, fut, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, fut, result, None)

        self.submit(run)
        return await fut

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, admit: Admit | None = None
    ) -> AsyncIterator[TokenOutput]:
        """Stream a request's outputs. `admit` puts it into the engine (default: queue it for compute);
        it may raise NoRoom / QueueFull / ValueError, which surface here before any output."""
        if not self.healthy():
            raise EngineUnavailable("engine is not running")
        if request_id in self._streams:
            raise ValueError(f"duplicate request id {request_id}")
        load, applied = self._published
        waiting = load.waiting + self._adds_sent - applied
        if waiting >= self.engine.config.max_waiting:
            raise EngineOverloaded(retry_after=self._retry_after(waiting))
        admit = admit or (lambda e: e.add_request(request_id, prompt_token_ids, params, time.monotonic()))
        out_queue: asyncio.Queue[TokenOutput | Exception] = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), out_queue)
        self._adds_sent += 1
        self.submit(lambda: self._admit(request_id, admit))
        return self._stream(request_id, out_queue)

    async def _stream(self, request_id: str, out_queue: asyncio.Queue) -> AsyncIterator[TokenOutput]:
        finished = False
        try:
            while not finished:
                out = await out_queue.get()
                if isinstance(out, Exception):
                    finished = True
                    raise out
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.submit(lambda: self._abort(request_id))
            self._streams.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        self.submit(lambda: self._abort(request_id))

    def abort_from_thread(self, request_id: str, reason: str, error: str | None = None) -> None:
        """End a request from any thread with a given reason (e.g. its KV transfer failed)."""
        self.submit(lambda: self._abort(request_id, reason, error))

    def release_held(self, request_id: str) -> None:
        """Prefill side: the transfer is over; the request's held blocks may go (from any thread)."""
        self.submit(lambda: self.engine.release_held(request_id))

    def emit(self, out: TokenOutput | Exception, request_id: str | None = None) -> None:
        """Deliver an output (or an error that ends the stream) to the request's stream, from any thread."""
        stream = self._streams.get(request_id or out.request_id)
        if stream is not None:
            loop, q = stream
            loop.call_soon_threadsafe(q.put_nowait, out)

    def emit_step(self, outs: list[TokenOutput]) -> None:
        """Deliver a step's outputs with one wake-up of each event loop they go to, not one per output: each
        call_soon_threadsafe writes the loop's self-pipe and takes the GIL from the engine thread again."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, TokenOutput]]] = {}
        for out in outs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                by_loop.setdefault(stream[0], []).append((stream[1], out))
        for loop, deliveries in by_loop.items():
            loop.call_soon_threadsafe(_deliver, deliveries)

    def _retry_after(self, waiting: int) -> float:
        """How long the waiting queue takes to drain at its measured rate (requests leaving it per busy
        second); at least a second, and a second while nothing has left it yet."""
        rate = self._drain_per_s
        return 1.0 if rate is None else max(1.0, waiting / rate)

    # --- engine thread ---

    def _admit(self, request_id: str, admit: Admit) -> None:
        self._adds_applied += 1
        try:
            out = admit(self.engine)
        except QueueFull as exc:
            self.emit(EngineOverloaded(retry_after=self._retry_after(self.engine.load().waiting), message=str(exc)), request_id)
        except (NoRoom, ValueError) as exc:
            self.emit(exc, request_id)
        else:
            if out is not None:
                self.emit(out)

    def kv_arrived(self, request_id: str, first_token: int) -> None:
        """Decode side, on the engine thread: the request's KV is complete; admit it to decode (or end it,
        if its first token already does)."""
        out = self.engine.kv_arrived(request_id, first_token, time.monotonic())
        if out is not None:
            self.emit(out)

    def _abort(self, request_id: str, reason: str = "abort", error: str | None = None) -> None:
        if self.before_abort is not None:
            self.before_abort(request_id)
        out = self.engine.abort(request_id, reason, error)
        if out is not None:
            self.emit(out)

    def _loop(self) -> None:
        try:
            self._run_until_stopped()
        except Exception:
            log.exception("engine thread died")
            raise

    def _run_until_stopped(self) -> None:
        while not self._stop.is_set():
            try:
                # Block only when idle; otherwise take what has arrived and keep stepping.
                cmd = self._inbox.get(timeout=0.5) if not self.engine.has_work() else self._inbox.get_nowait()
                cmd()
                while True:
                    self._inbox.get_nowait()()
            except queue.Empty:
                pass
            waiting = self.engine.load().waiting
            started = self._step_started = time.monotonic()
            try:
                outs = self.engine.step(started, self.hooks_for)
            finally:
                self._step_started = None
            now = time.monotonic()
            if outs:  # a step that computed (an idle turn's nothing would hide the long ones)
                self._step_seconds.append(now - started)
            self.emit_step(outs)
            load = self.engine.load()
            self._drain.observe(now, waiting, max(0, waiting - load.waiting))
            self._drain_per_s = self._drain.per_s()
            self._published = (load, self._adds_applied)


def _deliver(deliveries: list[tuple[asyncio.Queue, TokenOutput]]) -> None:
    for q, out in deliveries:
        q.put_nowait(out)


def _settle(fut: asyncio.Future, result: object, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
