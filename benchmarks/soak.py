"""Soak: a steady stream of chat requests against `splitserve serve --prefill 1 --decode 1` (the bundled
SmolLM2-135M unless --model), with every process's resident memory sampled as it runs.

    python -m benchmarks.soak [--minutes 30] [--clients 4] [--max-tokens 48] [--env MALLOC_ARENA_MAX=2]

The clients send prompts of varying length (a fresh question each time, so the prefix cache cannot serve
them whole) and count failures. RSS (VmRSS from /proc) of the frontend and of each worker is read every
--sample-s seconds; the report gives each process's RSS at the start (after the first minute's warm-up:
model loads, first allocations), the middle and the end, with the growth per minute between start and end.
Writes results/soak/soak-<timestamp>.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from splitserve.runtime.process import free_port

REPO = Path(__file__).resolve().parents[1]
WARMUP_S = 60.0  # model load and first allocations: not growth
TOPICS = ("rivers", "volcanoes", "bridges", "owls", "glaciers", "compilers", "tea", "deserts", "comets", "violins")


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def processes(serve_pid: int) -> dict[str, int]:
    """The frontend and its worker children, named by role (from their command lines)."""
    named = {"frontend": serve_pid}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == serve_pid and b"--role" in cmd:
            named[cmd[cmd.index(b"--role") + 1].decode()] = int(entry.name)
    return named


class Clients:
    def __init__(self, url: str, n: int, max_tokens: int) -> None:
        self.url, self.max_tokens = url, max_tokens
        self.done = self.failed = 0
        self.errors: list[str] = []
        self._count = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(n)]

    def __enter__(self) -> "Clients":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def _loop(self) -> None:
        with httpx.Client(timeout=600) as c:
            while not self._stop.is_set():
                with self._lock:
                    self._count += 1
                    k = self._count
                # Prompts from ~20 to ~300 tokens: activations of many sizes, as real traffic has.
                words = " ".join(f"{TOPICS[(k + j) % len(TOPICS)]} {j}" for j in range(5 + (k * 37) % 120))
                body = {"messages": [{"role": "user", "content": f"Question {k}: what links {words}?"}],
                        "max_tokens": self.max_tokens, "temperature": 0.7}
                r = None
                try:
                    r = c.post(self.url + "/v1/chat/completions", json=body)
                    ok = r.status_code == 200
                    error = None if ok else f"{r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as exc:
                    ok, error = False, f"{type(exc).__name__}: {exc}"
                with self._lock:
                    if ok:
                        self.done += 1
                    else:
                        self.failed += 1
                        self.errors = (self.errors + [error])[-10:]
                if not ok and r is not None and r.status_code in (429, 503):  # as a client should: come back later
                    self._stop.wait(float(r.headers.get("retry-after", "1")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--model", default=None)
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="for the deployment's processes")
    ap.add_argument("--out", default=str(REPO / "results" / "soak"))
    args = ap.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    tmp = tempfile.TemporaryDirectory(prefix="soak-")
    secret = Path(tmp.name) / "secret"
    secret.write_text(secrets.token_hex(32))
    cmd = [sys.executable, "-m", "splitserve", "serve", "--prefill", "1", "--decode", "1", "--port", str(port),
           "--log-level", "warning", "--secret-file", str(secret)]
    if args.model:
        cmd += ["--model", args.model]
    env = {**os.environ, **dict(e.split("=", 1) for e in args.env)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)
    samples: dict[str, list[tuple[float, float]]] = {}
    try:
        end = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > end:
                raise SystemExit("the deployment did not start")
            time.sleep(0.5)
        start = time.monotonic()
        stop_at = start + args.minutes * 60
        with Clients(url, args.clients, args.max_tokens) as clients:
            while time.monotonic() < stop_at:
                t = time.monotonic() - start
                for name, pid in processes(proc.pid).items():
                    mb = rss_mb(pid)
                    if mb is not None:
                        samples.setdefault(name, []).append((round(t, 1), round(mb, 1)))
                time.sleep(min(args.sample_s, max(0.0, stop_at - time.monotonic())))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        tmp.cleanup()
    report = {
        "command": " ".join(["python -m benchmarks.soak", *sys.argv[1:]]),
        "minutes": args.minutes, "clients": args.clients, "max_tokens": args.max_tokens, "env": args.env,
        "requests_done": clients.done, "requests_failed": clients.failed, "errors": clients.errors,
        "loadavg_at_end": os.getloadavg(), "rss_mb": {name: summary(s) for name, s in samples.items()},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"soak-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "rss_mb"} | {
        "rss_mb": {n: {k: v for k, v in s.items() if k != "samples"} for n, s in report["rss_mb"].items()},
        "file": str(path)}, indent=1))


def summary(samples: list[tuple[float, float]]) -> dict:
    """RSS at start (first sample after the warm-up), middle and end; growth per minute from start to end."""
    settled = [s for s in samples if s[0] >= WARMUP_S] or samples
    first, last = settled[0], settled[-1]
    middle = settled[len(settled) // 2]
    minutes = (last[0] - first[0]) / 60
    return {
        "start": first, "middle": middle, "end": last, "peak": max(mb for _, mb in samples),
        "growth_mb_per_min": round((last[1] - first[1]) / minutes, 2) if minutes > 0 else None, "samples": samples,
    }


if __name__ == "__main__":
    main()
