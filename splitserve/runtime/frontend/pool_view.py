"""What the dashboard shows, in one JSON document (`GET /debug/dashboard`): the pools and their workers
(role, health, KV usage, compute and bandwidth utilisation, queue and in flight), the frontend's latency
percentiles, KV transfer throughput and exposed time, and the recent requests' phases.

Every figure comes from a Prometheus metric the deployment already exports (the frontend's own registry,
each worker's open `/metrics`), windowed as Grafana would window it (`metric_window.py`), so the page and the
Grafana dashboard in docs/grafana/ agree. Workers are read when the page asks, not in the background: a
deployment nobody watches pays nothing.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from splitserve.runtime.engine_client import EngineClient
from splitserve.runtime.frontend.metric_window import Samples, Window, flatten, histogram_quantile, total, value
from splitserve.runtime.frontend.metrics import FrontendMetrics
from splitserve.runtime.frontend.pool_client import PoolClient
from splitserve.runtime.frontend.timeline import exposed_transfer_s, phase_spans

QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
LATENCIES = {
    "ttft": "splitserve_time_to_first_token_seconds",
    "itl": "splitserve_inter_token_latency_seconds",
    "e2e": "splitserve_e2e_request_latency_seconds",
    "queue": "splitserve_request_queue_time_seconds",
}
IN_PROCESS = "in-process"  # the track name of an engine inside the frontend (serve --in-process)


class PoolView:
    def __init__(self, engine: EngineClient, metrics: FrontendMetrics, window_s: float = 60.0,
                 scrape_timeout_s: float = 1.0) -> None:
        self.engine = engine
        self.metrics = metrics
        self.window_s = window_s
        self.scrape_timeout_s = scrape_timeout_s
        self._windows: dict[str, Window] = {}

    def _window(self, source: str) -> Window:
        if source not in self._windows:
            self._windows[source] = Window(self.window_s)
        return self._windows[source]

    async def snapshot(self, timeline_limit: int = 60) -> dict[str, Any]:
        now = time.monotonic()
        front = self._window("frontend")
        front.add(now, flatten(self.metrics.registry.collect()))
        grown, seconds = front.increase()
        latest = front.latest()
        workers = await self._workers(now)
        live = {w["url"] for w in workers}
        self._windows = {k: v for k, v in self._windows.items() if k == "frontend" or k in live}  # left: forget
        return {
            "now": now,
            "window_s": seconds,
            "model": self.engine.model_name,
            "requests": {
                "running": value(latest, "splitserve_num_requests_running"),
                "waiting": value(latest, "splitserve_num_requests_waiting"),
                "finished": total(grown, "splitserve_requests_total"),
                "per_s": total(grown, "splitserve_requests_total") / seconds if seconds > 0 else None,
            },
            "latency": {name: _quantiles(grown, metric) for name, metric in LATENCIES.items()},
            "transfer": _transfer_totals(workers),
            "workers": workers,
            "timeline": self._timeline(now, timeline_limit),
        }

    async def _workers(self, now: float) -> list[dict[str, Any]]:
        if not isinstance(self.engine, PoolClient):
            s = self.engine.stats()
            return [{
                "url": IN_PROCESS, "role": "colocated", "pid": None, "status": "ok" if self.engine.healthy() else "down",
                "in_flight": s.num_running + s.num_waiting, "running": s.num_running, "waiting": s.num_waiting,
                "kv_usage": s.kv_usage,
            }]
        members = [w for pool in self.engine.pools.values() for w in pool]
        texts = await asyncio.gather(*(self._scrape(w.url) for w in members))
        out = []
        for w, text in zip(members, texts):
            row: dict[str, Any] = {
                "url": w.url, "role": w.info.role, "pid": w.info.pid, "in_flight": w.in_flight,
                "status": "draining" if w.draining else "ok" if text is not None else "unreachable",
            }
            if text is not None:
                win = self._window(w.url)
                win.add(now, text)
                row.update(_worker_figures(win))
            out.append(row)
        return out

    async def _scrape(self, url: str) -> Samples | None:
        """A worker's /metrics, or None when it does not answer in time (it shows as unreachable)."""
        assert isinstance(self.engine, PoolClient)
        try:
            r = await self.engine.http.get(url + "/metrics", timeout=self.scrape_timeout_s)
            r.raise_for_status()
            return flatten(text_string_to_metric_families(r.text))
        except (httpx.HTTPError, ValueError):
            return None

    def _timeline(self, now: float, limit: int) -> list[dict[str, Any]]:
        phases = getattr(self.engine, "phases", None)
        if phases is None:
            return []
        rows = []
        for rec in phases.records(limit):
            rows.append({
                "id": rec.request_id, "path": rec.path, "finish_reason": rec.finish_reason, "error": rec.error,
                "prompt_tokens": rec.prompt_tokens, "output_tokens": rec.output_tokens,
                "exposed_transfer_s": exposed_transfer_s(rec),
                "spans": [{"track": s.track, "role": s.role, "name": s.name, "start": s.start - now, "end": s.end - now}
                          for s in phase_spans(rec)],
            })
        return rows


def _quantiles(samples: Samples, histogram: str) -> dict[str, float | None]:
    out: dict[str, float | None] = {k: histogram_quantile(q, samples, histogram) for k, q in QUANTILES}
    n, s = value(samples, histogram + "_count"), value(samples, histogram + "_sum")
    out["count"] = n
    out["mean"] = s / n if n and s is not None else None
    return out


def _worker_figures(win: Window) -> dict[str, Any]:
    latest = win.latest()
    grown, seconds = win.increase()
    sent = value(grown, "splitserve_kv_transfer_bytes_total")
    exposed_n, exposed_sum = value(grown, "splitserve_kv_transfer_exposed_seconds_count"), value(grown, "splitserve_kv_transfer_exposed_seconds_sum")
    return {
        "running": value(latest, "splitserve_num_requests_running"),
        "waiting": value(latest, "splitserve_num_requests_waiting"),
        "kv_usage": value(latest, "splitserve_kv_cache_usage_ratio"),
        "compute_util": value(latest, "splitserve_compute_utilization_ratio"),
        "bandwidth_util": value(latest, "splitserve_memory_bandwidth_utilization_ratio"),
        "busy": value(latest, "splitserve_engine_busy_ratio"),
        "reservations_waiting": value(latest, "splitserve_kv_reservations_waiting"),
        "transfer_bytes_per_s": sent / seconds if sent is not None and seconds > 0 else None,
        "transfer_bytes": value(latest, "splitserve_kv_transfer_bytes_total"),
        "transfers": exposed_n,
        "exposed_mean_s": exposed_sum / exposed_n if exposed_n and exposed_sum is not None else None,
        "exposed_p90_s": histogram_quantile(0.9, grown, "splitserve_kv_transfer_exposed_seconds"),
        "transfer_p90_s": histogram_quantile(0.9, grown, "splitserve_kv_transfer_seconds"),
        "kv_wait_p90_s": histogram_quantile(0.9, grown, "splitserve_kv_wait_seconds"),
        "transfer_failures": total(grown, "splitserve_kv_transfer_failures_total"),
    }


def _transfer_totals(workers: list[dict[str, Any]]) -> dict[str, Any]:
    """The deployment's KV traffic: what its prefill workers sent over the window."""
    senders = [w for w in workers if w.get("transfers")]
    n = sum(w["transfers"] for w in senders)
    rates = [w["transfer_bytes_per_s"] for w in workers if w.get("transfer_bytes_per_s") is not None]
    return {
        "bytes_per_s": sum(rates) if rates else None,
        "transfers": n,
        "exposed_mean_s": sum(w["exposed_mean_s"] * w["transfers"] for w in senders) / n if n else None,
        "failures": sum(w.get("transfer_failures") or 0.0 for w in workers),
    }
