"""A real 1P1D deployment of the bundled SmolLM2 shows the phase picture in its workers' `/metrics`: the
prefill worker compute-heavy, the decode worker (at batch 1) bandwidth-heavy (issue #7). Measured figures
over a range of loads: `python -m benchmarks.utilization`."""

from __future__ import annotations

import httpx

from benchmarks.utilization import read_gauges
from tests.runtime.deployment import Deployment, complete


def test_prefill_worker_is_compute_heavy_and_decode_worker_bandwidth_heavy():
    with Deployment(None, "--prefill", "1", "--decode", "1", "--no-conditional", startup_timeout=300) as dep:
        for seed in range(2):  # one at a time: the decode worker steps at batch 1
            prompt = [(seed * 7919 + 31 * i) % 40000 + 1000 for i in range(384)]
            complete(dep.url, prompt, max_tokens=48, ignore_eos=True, timeout=120).raise_for_status()
        assert [r["path"] for r in dep.requests()] == ["split", "split"]
        (p,), (d,) = dep.workers("prefill"), dep.workers("decode")
        with httpx.Client() as client:
            pre, dec = read_gauges(client, p["url"]), read_gauges(client, d["url"])
        # Measured here: prefill compute ~0.9 against decode ~0.07 (12x), and decode bandwidth ~0.3 (4x its
        # compute). The bounds leave room for a loaded CI machine; both ratios are far from 1 by physics
        # (~190 FLOP per fp32 weight byte in a 384-token prefill, ~0.5 in a batch-1 decode step).
        assert pre["compute"] > 3 * dec["compute"], (pre, dec)
        assert dec["bandwidth"] > 2 * dec["compute"], dec
        assert pre["compute"] > pre["bandwidth"], pre
        assert all(free == total for free, total in dep.wait_all_free().values())
