"""A worker's own Prometheus metrics: KV transfer and reservations (engine gauges are read at scrape time)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

_TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class WorkerMetrics:
    def __init__(self, role: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.transfer_bytes = Counter("splitserve_kv_transfer_bytes", "KV bytes sent to decode workers", registry=r)
        self.transfer_duration = Histogram(
            "splitserve_kv_transfer_seconds", "Prefill start to last KV byte sent", buckets=_TRANSFER_BUCKETS, registry=r
        )
        self.exposed_transfer = Histogram(
            "splitserve_kv_transfer_exposed_seconds",
            "Transfer time not hidden behind compute: last layer computed to last byte sent",
            buckets=_TRANSFER_BUCKETS, registry=r,
        )
        self.kv_wait = Histogram(
            "splitserve_kv_wait_seconds", "Decode side: reservation to complete KV", buckets=_TRANSFER_BUCKETS, registry=r
        )
        self.transfer_failures = Counter(
            "splitserve_kv_transfer_failures", "Failed KV transfers by cause", ["cause"], registry=r
        )
        self.reservations_waiting = Gauge(
            "splitserve_kv_reservations_waiting", "Requests holding reserved blocks, waiting for their KV", registry=r
        )
        self.no_room = Counter("splitserve_kv_reservations_refused", "Reservations refused: no free blocks", registry=r)
        self.role = role
        # The worker's role as a label: Grafana joins per-instance series with it (docs/grafana/).
        Info("splitserve_worker", "This worker's role", registry=r).info({"role": role})
