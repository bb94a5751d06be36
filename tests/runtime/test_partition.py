"""A partitioned decode worker (SIGSTOP: its sockets stay open, nothing answers) under a streaming request:
worker streams have no read timeout, so it is the heartbeat that finds it silent (5 s), drops it and ends
the stream waiting on it; the request continues on the other decode worker after the tokens its client
has, with no error. Once the worker runs again it answers, and rejoins its pool."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.runtime.deployment import Deployment, loaded_bound
from tests.runtime.test_faults import COMMON, stream_signalling_a_busy_decode_worker
from tests.tiny_models import make_tiny_checkpoint

LIVENESS_S = 5.0  # the frontend's PoolConfig.liveness_s
N = 600


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("partition"), layers=3, seed=11)


def test_a_partitioned_decode_worker_is_found_by_the_heartbeat(checkpoint):
    with Deployment(checkpoint, "--prefill", "1", "--decode", "2", *COMMON) as dep:
        victim, gap, _ = stream_signalling_a_busy_decode_worker(dep, N, signal.SIGSTOP)
        try:
            # Silence for liveness_s (plus a heartbeat period and a health call's 2 s timeout), then the
            # recompute on the other worker: far from the 120 s read timeout this replaced.
            assert gap < loaded_bound(LIVENESS_S + 4.0), gap
            (rec,) = dep.requests()
            assert rec["path"] == "recompute" and rec["finish_reason"] == "length" and rec["output_tokens"] == N, rec
            assert any("heartbeat" in e for e in rec["events"]), rec["events"]
        finally:
            os.kill(victim["pid"], signal.SIGCONT)
        end = time.monotonic() + loaded_bound(10)
        while victim["url"] not in [w["url"] for w in dep.workers("decode")]:
            assert time.monotonic() < end, dep.workers()
            time.sleep(0.2)
