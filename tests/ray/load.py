"""Steady streaming load against a deployment, recording when each chunk of each request arrived."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Stream:
    start: float
    arrivals: list[float] = field(default_factory=list)
    status: int = 0
    finish_reason: str | None = None
    error: str | None = None

    @property
    def end(self) -> float:
        return self.arrivals[-1] if self.arrivals else self.start

    def first_after(self, t: float) -> float | None:
        return next((a for a in self.arrivals if a > t), None)


class StreamingLoad:
    """`clients` threads, each streaming one completion after another until stopped."""

    def __init__(self, url: str, clients: int, max_tokens: int) -> None:
        self.url = url
        self.max_tokens = max_tokens
        self.streams: list[Stream] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(k,), daemon=True) for k in range(clients)]

    def __enter__(self) -> "StreamingLoad":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> list[Stream]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)
        return self.streams

    def done(self) -> int:
        return sum(s.finish_reason is not None for s in self.streams)

    def _client(self, k: int) -> None:
        i = k
        while not self._stop.is_set():
            prompt = [3 + (i * 7 + j) % 300 for j in range(20 + i % 40)]
            body = {"prompt": prompt, "max_tokens": self.max_tokens, "temperature": 0, "ignore_eos": True,
                    "stream": True}
            s = Stream(time.monotonic())
            self.streams.append(s)
            try:
                with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=60) as r:
                    s.status = r.status_code
                    if r.status_code != 200:
                        s.error = r.read().decode(errors="replace")[:300]
                    for line in r.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        s.arrivals.append(time.monotonic())
                        event = json.loads(line[6:])
                        if "error" in event:  # a failure after the 200: the stream says so, then ends
                            s.error = event["error"]["message"]
                        else:
                            s.finish_reason = event["choices"][0].get("finish_reason") or s.finish_reason
            except (httpx.HTTPError, ValueError) as exc:
                s.error = f"{type(exc).__name__}: {exc}"
            i += 8
