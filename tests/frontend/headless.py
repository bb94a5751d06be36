"""Headless Chromium (Debian's `chromium` package) driven over the DevTools protocol, for the dashboard test.

A page session records every console message, uncaught exception and browser log entry (failed loads,
Content-Security-Policy refusals), so a test can assert the page ran clean.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import connect


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    def __init__(self, ws_url: str, call_timeout: float = 30.0) -> None:
        self._ws = connect(ws_url, max_size=64 * 1024 * 1024, open_timeout=call_timeout)
        self.call_timeout = call_timeout
        self._ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")

    def send(self, method: str, params: dict[str, Any] | None = None, timeout: float | None = None) -> dict[str, Any]:
        call = next(self._ids)
        self._ws.send(json.dumps({"id": call, "method": method, "params": params or {}}))
        end = time.monotonic() + (timeout or self.call_timeout)
        while True:
            message = json.loads(self._ws.recv(timeout=max(0.01, end - time.monotonic())))
            if message.get("id") == call:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float) -> Any:
        """Poll `expression` until it is truthy; its value, or TimeoutError."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"still false after {timeout:.0f} s: {expression}")

    def problems(self) -> list[str]:
        """Console errors and warnings, uncaught exceptions, and browser log errors seen so far."""
        out = []
        for ev in self.events:
            method, p = ev.get("method"), ev.get("params", {})
            if method == "Runtime.consoleAPICalled" and p["type"] in ("error", "warning", "assert"):
                out.append(f"console.{p['type']}: {[a.get('value', a.get('description')) for a in p['args']]}")
            elif method == "Runtime.exceptionThrown":
                out.append(f"exception: {p['exceptionDetails'].get('exception', {}).get('description', p['exceptionDetails'])}")
            elif method == "Log.entryAdded" and p["entry"]["level"] in ("error", "warning"):
                out.append(f"log {p['entry']['source']}: {p['entry']['text']} {p['entry'].get('url', '')}")
        return out

    def screenshot(self, path: Path, width: int = 1400) -> None:
        """The whole page: the viewport is made as tall as the content first (capturing beyond the viewport
        failed with an internal error on a loaded machine)."""
        height = int(self.send("Page.getLayoutMetrics")["cssContentSize"]["height"])
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        data = self.send("Page.captureScreenshot", {"format": "png"}, timeout=2 * self.call_timeout)["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        self._ws.close()


class Chromium:
    """A headless browser for the length of a `with` block."""

    def __init__(self, width: int = 1400, height: int = 1400, startup_timeout: float = 60.0,
                 call_timeout: float = 30.0) -> None:
        """`call_timeout`: how long one DevTools call may take (a loaded machine needs more)."""
        self.call_timeout = call_timeout
        exe = chromium_path()
        if exe is None:
            raise RuntimeError("no chromium on PATH (Debian: apt-get install chromium)")
        # Chromium's helper processes may still be writing the profile as it exits: clean up what can be.
        self._profile = tempfile.TemporaryDirectory(prefix="splitserve-chromium-", ignore_cleanup_errors=True)
        # --no-sandbox: tests run as root, where Chromium's sandbox refuses to start.
        self._proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
             f"--user-data-dir={self._profile.name}", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        port_file = Path(self._profile.name) / "DevToolsActivePort"
        end = time.monotonic() + startup_timeout
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > end or self._proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        self.port = int(port_file.read_text().split()[0])

    def page(self) -> Page:
        targets = httpx.get(f"http://127.0.0.1:{self.port}/json/list", timeout=10).json()
        return Page(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"], self.call_timeout)

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._profile.cleanup()

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
