"""A real `splitserve serve` deployment in subprocesses, for end-to-end and fault tests."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from splitserve.runtime.auth import SignedCalls
from splitserve.runtime.process import free_port

REPO = Path(__file__).resolve().parents[2]


def loaded_bound(seconds: float) -> float:
    """A time bound that holds on a shared machine: `seconds` as measured on a quiet one, stretched by how
    oversubscribed the CPUs are now (load average per core; CI machines were seen at 7-10 on 2 cores, where
    every step of every process runs that much slower). Never tighter than `seconds`."""
    return seconds * max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))


class Deployment:
    """The test holds the deployment's secret (to call workers' internal API, as the frontend does) and an
    operator token (for /debug/* and /admin/*); `operator` is an httpx client that proves both."""

    def __init__(self, model: Path | None, *args: str, startup_timeout: float = 120.0) -> None:
        """model None: the bundled default."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._dir = tempfile.TemporaryDirectory(prefix="splitserve-deployment-")
        self.secret, self.admin_token = secrets.token_hex(32).encode(), secrets.token_hex(16)
        self.secret_file, self.admin_token_file = Path(self._dir.name) / "secret", Path(self._dir.name) / "admin-token"
        self.secret_file.write_bytes(self.secret)
        self.admin_token_file.write_text(self.admin_token)
        self.operator = httpx.Client(auth=SignedCalls(self.secret), headers={"authorization": f"Bearer {self.admin_token}"})
        self._extra = [*args, *(["--model", str(model)] if model is not None else [])]
        # A port free_port() found can be taken by another process before serve binds it (seen in a clean-clone
        # run: "address already in use", serve exited 2): a start that ends at once is tried again on new
        # ports. A start that fails for any other reason fails every time, and still raises.
        for attempt in range(3):
            self._start()
            end = time.monotonic() + startup_timeout
            while time.monotonic() < end and self.proc.poll() is None:
                try:
                    if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            if self.proc.poll() is None:
                break
            if attempt == 2:
                raise RuntimeError(f"serve exited with {self.proc.returncode}")
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
        self.close()
        raise RuntimeError("deployment not healthy in time")

    def _start(self) -> None:
        cmd = [sys.executable, "-m", "splitserve", "serve", "--port", str(self.port), "--log-level", "warning",
               "--secret-file", str(self.secret_file), "--admin-token-file", str(self.admin_token_file), *self._extra]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)

    def workers(self, role: str | None = None) -> list[dict]:
        ws = self.operator.get(self.url + "/debug/workers", timeout=5).json()
        return [w for w in ws if role is None or w["role"] == role]

    def requests(self) -> list[dict]:
        return self.operator.get(self.url + "/debug/requests?limit=1000", timeout=5).json()

    def free_blocks(self) -> dict[str, tuple[int, int]]:
        """(free, total) KV blocks of every worker that answers."""
        out = {}
        for w in self.workers():
            try:
                s = self.operator.get(w["url"] + "/internal/stats", timeout=5).json()
            except httpx.HTTPError:
                continue
            out[w["url"]] = (s["num_free_blocks"], s["num_total_blocks"])
        return out

    def wait_all_free(self, timeout: float = 10.0) -> dict[str, tuple[int, int]]:
        end = time.monotonic() + loaded_bound(timeout)
        while True:
            blocks = self.free_blocks()
            if all(free == total for free, total in blocks.values()) or time.monotonic() > end:
                return blocks
            time.sleep(0.1)

    def close(self) -> None:
        self.operator.close()
        self._dir.cleanup()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def complete(url: str, prompt: list[int], max_tokens: int, timeout: float = 60.0, **extra) -> httpx.Response:
    body = {"model": extra.pop("model", None), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, **extra}
    body = {k: v for k, v in body.items() if v is not None}
    return httpx.post(url + "/v1/completions", json=body, timeout=timeout)
