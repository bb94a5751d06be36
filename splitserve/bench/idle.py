"""Before a run, wait until the target has nothing in flight.

A run cut short (stopped once its verdict was certain, or at its deadline) hangs up on its open requests,
but the server finishes the step each of them is in, and a prefill step of a few thousand tokens takes
seconds on a CPU and cannot be interrupted. A run started at once finds those steps in its way: measured
on `benchmarks.interference`'s mixed load (1P1D), a 51-token prompt's first token took 7-8 s in each run
after a stopped one, 0.2 s otherwise, and the rate failed for that.

The target's load comes from its Prometheus `/metrics`: splitserve's and vLLM's gauges of running and
waiting requests. A server that exports neither is not waited for: there is nothing to go by.
"""

from __future__ import annotations

import time
from typing import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

IN_FLIGHT_GAUGES = frozenset({
    "splitserve_num_requests_running", "splitserve_num_requests_waiting",
    "vllm:num_requests_running", "vllm:num_requests_waiting",
})
# A splitserve frontend sums its workers' loads as it last polled them (every second): two readings of
# nothing in a row, a poll interval apart, are not an old reading of a worker still finishing a step.
QUIET_READINGS = 2
POLL_S = 1.0


def in_flight_from_metrics(text: str) -> int | None:
    """Requests running or waiting, summed over the gauges above; None when the text has none of them."""
    total: float | None = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in IN_FLIGHT_GAUGES:
                total = (total or 0.0) + sample.value
    return None if total is None else round(total)


def read_in_flight(url: str, timeout_s: float = 5.0) -> int | None:
    """The target's requests in flight, or None if its /metrics cannot tell."""
    try:
        r = httpx.get(url.rstrip("/") + "/metrics", timeout=timeout_s)
    except httpx.HTTPError:
        return None
    return in_flight_from_metrics(r.text) if r.status_code == 200 else None


def wait_idle(read: Callable[[], int | None], timeout_s: float, poll_s: float = POLL_S,
              clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> bool | None:
    """Poll `read` until it says nothing is in flight QUIET_READINGS times in a row: True; False if
    `timeout_s` passes first; None if the target does not report its load."""
    end = clock() + timeout_s
    quiet = 0
    while True:
        n = read()
        if n is None:
            return None
        quiet = quiet + 1 if n == 0 else 0
        if quiet >= QUIET_READINGS:
            return True
        if clock() + poll_s > end:
            return False
        sleep(poll_s)
