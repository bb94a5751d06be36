"""Pools change size under load: a decode worker that joins a running deployment starts receiving
requests; one that is drained (SIGTERM) finishes its requests and leaves, with zero requests lost."""

from __future__ import annotations

import concurrent.futures
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from splitserve.runtime.process import free_port, stop_processes
from tests.runtime.deployment import REPO, Deployment
from tests.tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("scale"), layers=2, seed=2)


def one_request(url: str, i: int) -> int:
    body = {"prompt": [3 + (i * 7 + k) % 300 for k in range(40 + i % 50)], "max_tokens": 24, "temperature": 0,
            "ignore_eos": True}
    return httpx.post(url + "/v1/completions", json=body, timeout=60).status_code


def test_worker_joins_and_drains_under_load(checkpoint):
    common = ["--num-blocks", "256", "--router-policy", "least_loaded", "--no-conditional"]
    with Deployment(checkpoint, "--prefill", "1", "--decode", "1", *common) as dep:
        port = free_port()
        joiner = subprocess.Popen(
            [sys.executable, "-m", "splitserve", "worker", "--role", "decode", "--port", str(port), "--model",
             str(checkpoint), "--secret-file", str(dep.secret_file), "--num-blocks", "256", "--router", dep.url,
             "--log-level", "warning"],
            cwd=REPO,
        )
        new_url = f"http://127.0.0.1:{port}"
        try:
            _join_and_drain(dep, joiner, new_url)
        finally:
            stop_processes([joiner])  # whatever failed, no worker outlives the test


def _join_and_drain(dep: Deployment, joiner: subprocess.Popen, new_url: str) -> None:
    stop = threading.Event()
    codes: list[int] = []

    def load(k: int) -> None:
        i = k
        while not stop.is_set():  # a steady load for as long as the pools change
            codes.append(one_request(dep.url, i))
            i += 8

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        clients = [pool.submit(load, k) for k in range(8)]
        try:
            end = time.monotonic() + 90
            while new_url not in {w["url"] for w in dep.workers("decode")}:
                assert time.monotonic() < end and joiner.poll() is None, "the new worker did not join"
                time.sleep(0.1)
            # Let it take some of the load, then drain it while requests are still being sent.
            while sum(r["decode_worker"] == new_url for r in dep.requests()) < 5:
                assert time.monotonic() < end, "the new worker received no requests"
                time.sleep(0.05)
            joiner.send_signal(signal.SIGTERM)
            assert joiner.wait(timeout=60) == 0
            time.sleep(1.0)  # requests keep flowing to the remaining worker after the drain
        finally:
            stop.set()  # the load stops whatever happened, so the pool can close
        for c in clients:
            c.result()
    assert len(codes) > 20 and codes == [200] * len(codes), {c: codes.count(c) for c in set(codes)}
    assert new_url not in {w["url"] for w in dep.workers()}
    records = dep.requests()
    assert all(r["finish_reason"] == "length" for r in records)
    assert sum(r["decode_worker"] == new_url for r in records) >= 5
    assert all(free == total for free, total in dep.wait_all_free().values())
