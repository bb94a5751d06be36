"""Child processes of a deployment: a free port for each, tied to their parent's life, stopped in order.

Torch-free on purpose: the launcher and the Ray actor (one per worker, on every node) both use these, and
an actor that only supervises a worker process must not load torch for it (seconds and 300 MB each).
"""

from __future__ import annotations

import ctypes
import gc
import signal
import socket
import subprocess
import time
from typing import Callable

import httpx

PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def freeze_startup_heap() -> None:
    """Call once a server process has loaded everything it keeps (model, tokenizer, imports), just before
    it serves. Those ~350k objects live as long as the process, yet each full collection walks them all: a
    ~170 ms pause (measured: SmolLM2 worker, one core), which lands inside a decode step or between a token
    and its client. Frozen, they are out of the collector's reach and a full collection walks only what
    serving allocated since."""
    gc.collect()
    gc.freeze()


def dies_with_parent(signum: int = signal.SIGTERM) -> Callable[[], None]:
    """A `preexec_fn`: the kernel sends the child `signum` when its parent dies (PR_SET_PDEATHSIG), so no
    worker is ever orphaned, even when the parent is killed outright."""

    def set_death_signal() -> None:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signum)

    return set_death_signal


def terminate_on_signals(procs: list[subprocess.Popen], first: Callable[[], None] = lambda: None) -> None:
    """On SIGTERM, call `first` (e.g. stop whatever restarts workers), stop `procs` (as they are then: the list
    may grow after this call) and exit."""

    def handler(signum: int, frame: object) -> None:
        first()
        stop_processes(procs)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def stop_processes(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    """SIGTERM to all, then wait for each within one shared grace period; SIGKILL whatever overruns it."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    end = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout_s: float) -> None:
    """Return once `url`/health answers 200; RuntimeError if `proc` exits first or the time runs out."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"worker {url} exited with code {proc.returncode} while starting")
        try:
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"worker {url} not healthy after {timeout_s:.0f} s")
