"""Drives an Engine in real time on its own thread and serves it to asyncio code as an EngineClient.

Every scheduler mutation (add, abort, step) happens on the engine thread, between steps: an abort can
never free blocks that a running forward pass is still writing.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import AsyncIterator, Callable

from splitserve.core.request import SamplingParams
from splitserve.core.scheduler import QueueFull
from splitserve.runtime.engine import Engine
from splitserve.runtime.engine_client import EngineOverloaded, EngineStats, EngineUnavailable, TokenOutput

log = logging.getLogger(__name__)

Command = Callable[[], None]


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.model_name = engine.loaded.name
        self.tokenizer = engine.loaded.tokenizer
        self.max_model_len = engine.max_model_len
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[TokenOutput]]] = {}
        # Adds sent to the engine thread vs applied there: each counter has one writer, so no lock is needed.
        self._adds_sent = 0
        self._adds_applied = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    def start(self) -> "AsyncEngine":
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(lambda: None)
        self._thread.join(timeout=10)

    def healthy(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[TokenOutput]:
        if not self.healthy():
            raise EngineUnavailable("engine is not running")
        if request_id in self._streams:
            raise ValueError(f"duplicate request id {request_id}")
        waiting = self.engine.scheduler.num_waiting + self._adds_sent - self._adds_applied
        if waiting >= self.engine.config.max_waiting:
            raise EngineOverloaded(retry_after=self._retry_after(waiting))
        out_queue: asyncio.Queue[TokenOutput] = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), out_queue)
        self._adds_sent += 1
        self._inbox.put(lambda: self._add(request_id, prompt_token_ids, params))
        finished = False
        try:
            while not finished:
                out = await out_queue.get()
                finished = out.finished
                if out.error and out.finish_reason == "rejected":
                    raise EngineOverloaded(retry_after=1.0, message=out.error)
                yield out
        finally:
            if not finished:
                self._inbox.put(lambda: self._abort(request_id))
            self._streams.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        self._inbox.put(lambda: self._abort(request_id))

    def _retry_after(self, waiting: int) -> float:
        # A rough drain estimate: one running batch's worth of requests per second, at least one second.
        return max(1.0, waiting / max(1, self.engine.config.max_num_seqs))

    # --- engine thread ---

    def _add(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        self._adds_applied += 1
        try:
            self.engine.add_request(request_id, prompt, params, time.monotonic())
        except QueueFull as exc:
            self._emit(TokenOutput(request_id, [], True, "rejected", error=str(exc)))
        except ValueError as exc:
            self._emit(TokenOutput(request_id, [], True, "error", error=str(exc)))

    def _abort(self, request_id: str) -> None:
        out = self.engine.abort(request_id)
        if out is not None:
            self._emit(out)

    def _emit(self, out: TokenOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is not None:
            loop, q = stream
            loop.call_soon_threadsafe(q.put_nowait, out)

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
            for out in self.engine.step(time.monotonic()):
                self._emit(out)
