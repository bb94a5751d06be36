"""Keeps a deployment's worker processes running: one that dies is started again, with backoff, and rejoins
through registration (proving the deployment secret, like any worker that joins). Meanwhile the frontend's
heartbeat has removed it, and the deployment serves degraded instead of failing (`PoolClient.degraded`).

A thread of the `serve` process; it owns no request state: the frontend fails requests over on its own.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)

BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)  # waits before restarts that follow quick deaths
STEADY_S = 60.0  # a worker that ran this long before dying starts again after the shortest wait


class Supervisor:
    def __init__(self, procs: list[subprocess.Popen], respawn: Callable[[int], subprocess.Popen],
                 poll_s: float = 0.5) -> None:
        """`procs[i]` is slot i's process (the list is shared, and updated in place, so whoever stops the
        deployment stops the live ones); `respawn(i)` starts slot i's worker again."""
        self.procs, self.respawn, self.poll_s = procs, respawn, poll_s
        self.restarts = [0] * len(procs)
        self._quick_deaths = [0] * len(procs)
        self._started = [time.monotonic()] * len(procs)
        self._due: dict[int, float] = {}  # slot -> when it restarts
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)

    def start(self) -> Supervisor:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Restart nothing more (the deployment is shutting down)."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            now = time.monotonic()
            for i, p in enumerate(self.procs):
                if p.poll() is None:
                    continue
                if i not in self._due:
                    lived = now - self._started[i]
                    if lived >= STEADY_S:
                        self._quick_deaths[i] = 0
                    wait = BACKOFF_S[min(self._quick_deaths[i], len(BACKOFF_S) - 1)]
                    self._quick_deaths[i] += 1
                    log.warning("worker %s (pid %d) exited with code %s after %.0f s: restarting in %.0f s",
                                i, p.pid, p.returncode, lived, wait)
                    self._due[i] = now + wait
                elif now >= self._due[i]:
                    del self._due[i]
                    self.procs[i] = self.respawn(i)
                    self._started[i] = time.monotonic()
                    self.restarts[i] += 1
