"""A background thread that polls the deployment under test every `interval_s` while a benchmark's load
runs in the foreground: `with Sub(...) as p: run_load()`, where Sub implements `poll(client)`."""

from __future__ import annotations

import threading
import time

import httpx

from benchmarks.netns import credentials


class Poller:
    def __init__(self, interval_s: float, timeout_s: float = 60.0) -> None:
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.started = 0.0  # monotonic time the polling began
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def poll(self, client: httpx.Client) -> None:
        raise NotImplementedError

    def __enter__(self) -> Poller:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with credentials().client(timeout=self.timeout_s) as client:
            while not self._stop.is_set():
                self.poll(client)
                self._stop.wait(self.interval_s)
