"""Network namespaces joined by a shaped veth pair, and the service processes benchmarks run in them.

`Link(rate)` makes two namespaces, A and B, joined by one veth pair (A_ADDR <-> B_ADDR, a private /30 that
exists only inside them) with a `tc tbf` qdisc at `rate` bit/s on both ends, so bytes between them cross a
link of known speed. The root namespace is never touched: no address, no route, no qdisc there, so runs
beside other engineers' cannot collide. Namespaces are named `<PREFIX>-<pid>-...`: every exit path that
runs Python deletes them (context manager, atexit, SIGTERM/SIGINT/SIGHUP), and a later run deletes those
of any run that died without that chance (SIGKILL).

`entered(ns)` moves the calling thread (only it: network namespaces are per thread) into a namespace, so
the harness's own sockets reach the services there; `Service` runs one command in a namespace (or the
root one), dying with its parent, and stops it with SIGTERM then SIGKILL.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator


import httpx

from splitserve.runtime.auth import SignedCalls
from splitserve.runtime.process import dies_with_parent, stop_processes, wait_healthy

PREFIX = "ssbench"
A_ADDR, B_ADDR = "10.200.0.1", "10.200.0.2"
DEV = "kv0"
CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/var/run/netns")
REPO = Path(__file__).resolve().parents[1]


def sh(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")


def tbf_args(rate_bps: float) -> list[str]:
    """A token bucket for `rate_bps`: the bucket holds 2 ms of line rate but never less than two 64 KiB GSO
    segments (smaller would make tbf split every segment and cost CPU), and the queue 20 ms."""
    burst = max(128 << 10, int(rate_bps / 8 * 0.002))
    return ["tbf", "rate", f"{int(rate_bps)}bit", "burst", str(burst), "latency", "20ms"]


class Link:
    """Namespaces A and B joined by a veth pair shaped to `rate_bps` both ways (None: unshaped)."""

    def __init__(self, rate_bps: float | None, tag: str = "link") -> None:
        self.rate_bps = rate_bps
        self.a, self.b = f"{PREFIX}-{os.getpid()}-{tag}-a", f"{PREFIX}-{os.getpid()}-{tag}-b"
        self._made: list[str] = []
        _LIVE.add(self)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        for ns in (self.a, self.b):
            sh("ip", "netns", "add", ns)
            self._made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        # Made straight inside A and B, so the name is never seen in the root namespace.
        sh("ip", "link", "add", DEV, "netns", self.a, "type", "veth", "peer", "name", DEV, "netns", self.b)
        for ns, addr in ((self.a, A_ADDR), (self.b, B_ADDR)):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", DEV)
            sh("ip", "-n", ns, "link", "set", DEV, "up")
            if self.rate_bps is not None:
                sh("tc", "-n", ns, "qdisc", "add", "dev", DEV, "root", *tbf_args(self.rate_bps))

    def close(self) -> None:
        """Deleting a namespace deletes its veth end, the pair and the qdiscs with it."""
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made.clear()
        _LIVE.discard(self)

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_LIVE: set[Link] = set()


def _close_all() -> None:
    for link in list(_LIVE):
        link.close()


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally, then atexit runs


def install_cleanup() -> None:
    """Call once from the main thread before making links: delete leftovers of dead runs, and make SIGTERM,
    SIGINT and SIGHUP unwind (running finally blocks and atexit) instead of killing outright."""
    atexit.register(_close_all)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    for name in stale_namespaces(os.listdir(NETNS_DIR) if NETNS_DIR.is_dir() else [], _pid_alive):
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def stale_namespaces(names: list[str], alive: Callable[[int], bool]) -> list[str]:
    """Our namespaces whose creating process is gone."""
    out = []
    for name in names:
        parts = name.split("-")
        if len(parts) >= 3 and parts[0] == PREFIX and parts[1].isdigit() and not alive(int(parts[1])):
            out.append(name)
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        pass
    return True


_libc = ctypes.CDLL("libc.so.6", use_errno=True)


@contextlib.contextmanager
def entered(ns: str | None) -> Iterator[None]:
    """Run the block with the calling thread in namespace `ns` (None: stay). Sockets made inside keep that
    namespace after the block; so do child processes forked inside it."""
    if ns is None:
        yield
        return
    with open("/proc/thread-self/ns/net") as home, open(NETNS_DIR / ns) as target:
        _setns(target.fileno())
        try:
            yield
        finally:
            _setns(home.fileno())


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def tcp_throughput(src_ns: str, dst_ns: str, dst_host: str, nbytes: int = 64 << 20) -> float:
    """Bytes/s of one plain TCP stream from `src_ns` to `dst_host` in `dst_ns`: what the link really gives."""
    with entered(dst_ns):
        server = socket.create_server((dst_host, 0))
    received = [0]

    def sink() -> None:
        conn, _ = server.accept()
        with conn:
            while chunk := conn.recv(1 << 20):
                received[0] += len(chunk)
            conn.sendall(b"!")  # after the last byte arrived: the clock stops on delivery, not on buffering

    th = threading.Thread(target=sink, daemon=True)
    th.start()
    payload = bytes(4 << 20)
    with entered(src_ns):
        client = socket.create_connection(server.getsockname()[:2], timeout=120)
    with client, server:
        start = time.perf_counter()
        for _ in range(nbytes // len(payload)):
            client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        client.recv(1)
        elapsed = time.perf_counter() - start
    th.join(10)
    return received[0] / elapsed


class Credentials:
    """One deployment secret and one operator token for every service a benchmark starts (files in a private
    temporary folder), and an httpx client proving both: for /debug/* and /admin/* on a frontend, and the
    workers' /internal/* API."""

    def __init__(self) -> None:
        folder = Path(tempfile.mkdtemp(prefix="splitserve-bench-credentials-"))  # mode 0700
        atexit.register(shutil.rmtree, folder, True)
        self.secret = secrets.token_hex(32).encode()
        self.admin_token = secrets.token_hex(16)
        self.secret_file, self.admin_token_file = folder / "secret", folder / "admin-token"
        self.secret_file.write_bytes(self.secret)
        self.admin_token_file.write_text(self.admin_token)

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(auth=SignedCalls(self.secret), headers={"authorization": f"Bearer {self.admin_token}"},
                            **kwargs)  # type: ignore[arg-type]

    def argv(self, argv: list[str]) -> list[str]:
        """`argv` of a `serve` or `worker` command, with this benchmark's secret and operator token."""
        extra: list[str] = []
        if argv[:1] in (["serve"], ["worker"]) and "--secret-file" not in argv:
            extra += ["--secret-file", str(self.secret_file)]
        if argv[:1] == ["serve"] and "--admin-token-file" not in argv:
            extra += ["--admin-token-file", str(self.admin_token_file)]
        return [*argv, *extra]


@functools.cache
def credentials() -> Credentials:
    return Credentials()


class Service:
    """One long-running command (`python -m splitserve ...`) in a namespace, logging to a file. A `serve` or
    `worker` runs with the benchmark's `credentials()`."""

    def __init__(self, name: str, argv: list[str], ns: str | None, log_dir: Path) -> None:
        self.name = name
        self.ns = ns
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        cmd = [sys.executable, "-m", "splitserve", *credentials().argv(argv)]
        if ns is not None:
            cmd = ["ip", "netns", "exec", ns, *cmd]  # ip execs the command: our child is the service itself
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         preexec_fn=dies_with_parent())

    def wait_healthy(self, url: str, timeout_s: float = 300.0) -> None:
        with entered(self.ns):
            try:
                wait_healthy(url, self.proc, timeout_s)
            except RuntimeError as exc:
                raise RuntimeError(f"{self.name}: {exc}: {self.tail()}") from exc

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        stop_processes([self.proc])
