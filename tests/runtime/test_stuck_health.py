"""A worker stuck inside a step still answers /health truthfully: 503 "stuck" with the step's age once the
step has run far longer than the recent ones (the frontend's heartbeat then drops it), and "ok" again
once the step ends."""

from __future__ import annotations

import threading
import time

from fastapi.testclient import TestClient

from splitserve.core.request import SamplingParams
from splitserve.model.loader import load_model
from splitserve.runtime.config import EngineConfig
from splitserve.runtime.worker.app import Worker, create_worker_app
from splitserve.runtime.worker.engine import Engine
from tests.runtime.deployment import loaded_bound
from tests.tiny_models import make_tiny_checkpoint

FLOOR_S = 0.5  # the stuck bound's floor, shrunk for the test (a step of the tiny model takes milliseconds)


def test_a_stuck_step_shows_in_health_and_clears(tmp_path):
    loaded = load_model(make_tiny_checkpoint(tmp_path, layers=2, seed=4))
    engine = Engine(loaded, EngineConfig(block_size=16, num_blocks=64))
    release, entered = threading.Event(), threading.Event()
    run = engine._run

    def hangs(out, hooks):  # the test's fault: a step that does not return until released
        entered.set()
        release.wait()
        return run(out, hooks)

    worker = Worker("colocated", engine, b"secret")
    worker.async_engine.stuck_floor_s = FLOOR_S
    worker.start()
    try:
        with TestClient(create_worker_app(worker)) as client:
            assert client.get("/health").json()["status"] == "ok"
            engine._run = hangs
            worker.async_engine.submit(lambda: engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=1), 0.0))
            assert entered.wait(loaded_bound(10))
            end = time.monotonic() + loaded_bound(10)
            while (r := client.get("/health")).status_code == 200:
                assert time.monotonic() < end, r.json()
                time.sleep(0.05)
            body = r.json()
            assert r.status_code == 503 and body["status"] == "stuck"
            assert body["step_age_s"] > body["stuck_after_s"] >= FLOOR_S
            release.set()
            end = time.monotonic() + loaded_bound(10)
            while (r := client.get("/health")).status_code != 200:
                assert time.monotonic() < end, r.json()
                time.sleep(0.05)
            assert r.json()["status"] == "ok"
    finally:
        release.set()
        worker.close()
