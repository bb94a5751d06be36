"""docs/grafana/splitserve.json queries only series the deployment exports (a renamed metric would leave a
panel silently empty), and is a well-formed dashboard: unique panel ids, every query on the chosen data
source, per-worker panels labelled by role."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from splitserve.runtime.engine_client import EngineStats, EngineStatsCollector
from splitserve.runtime.frontend.metrics import FrontendMetrics
from splitserve.runtime.worker.metrics import WorkerMetrics
from splitserve.runtime.worker.utilization import BANDWIDTH_METRIC, BUSY_METRIC, COMPUTE_METRIC

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "splitserve.json"


def exported_series() -> set[str]:
    """Every sample name the frontend and a worker expose on /metrics."""
    stats = EngineStats(0, 0, 1, 1, 0, 0)
    worker = WorkerMetrics("prefill")
    worker.registry.register(EngineStatsCollector(lambda: stats))
    front = FrontendMetrics(lambda: stats)
    # A labelled counter shows its samples only once it has a label set.
    worker.transfer_failures.labels("test").inc()
    front.requests.labels("stop").inc()
    texts = [generate_latest(front.registry), generate_latest(worker.registry)]
    names = {s.name for t in texts for f in text_string_to_metric_families(t.decode()) for s in f.samples}
    return names | {COMPUTE_METRIC, BANDWIDTH_METRIC, BUSY_METRIC}  # the utilisation meter's gauges


def test_every_query_names_exported_series_only():
    doc = json.loads(DASHBOARD.read_text())
    exported = exported_series()
    panels = [p for p in doc["panels"] if p["type"] != "row"]
    queried = {m for p in panels for t in p["targets"] for m in re.findall(r"splitserve_[a-z0-9_]+", t["expr"])}
    assert queried - exported == set()
    # The views are all there: latencies, per-worker KV and utilisation, transfer.
    for needed in ("splitserve_time_to_first_token_seconds_bucket", "splitserve_inter_token_latency_seconds_bucket",
                   "splitserve_kv_cache_usage_ratio", COMPUTE_METRIC, BANDWIDTH_METRIC,
                   "splitserve_num_requests_waiting", "splitserve_kv_transfer_bytes_total",
                   "splitserve_kv_transfer_exposed_seconds_bucket", "splitserve_worker_info"):
        assert needed in queried, needed


def test_dashboard_is_well_formed():
    doc = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in doc["templating"]["list"]}
    for p in doc["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}" and "datasource" in variables, p["title"]
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        for t in p["targets"]:
            # A per-worker gauge without the role join would mix in the frontend's deployment-wide one.
            if "per worker" in p["title"]:
                assert "splitserve_worker_info" in t["expr"], p["title"]
