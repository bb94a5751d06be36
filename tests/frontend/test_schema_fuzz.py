"""Schemathesis against the served `/openapi.json`, over the real engine (tiny random model): whatever the
schema admits, the server answers without a 5xx, and afterwards the engine is idle with every KV block
free. Bounded (a fixed number of generated cases per operation), so it runs in `make test`."""

from __future__ import annotations

import tempfile

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from splitserve.model.loader import load_model
from splitserve.runtime.frontend.app import create_app
from splitserve.runtime.worker.async_engine import AsyncEngine
from splitserve.runtime.worker.engine import Engine, EngineConfig
from tests.frontend.test_real_engine import wait_until_idle
from tests.tiny_models import make_tiny_checkpoint

_CHECKPOINT = make_tiny_checkpoint(tempfile.mkdtemp(prefix="splitserve-schema-"), layers=2, seed=4)
ENGINE = AsyncEngine(Engine(load_model(_CHECKPOINT), EngineConfig(num_blocks=128, max_model_len=256))).start()
APP = create_app(ENGINE, served_model_name="tiny")
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(scope="module", autouse=True)
def engine_idle_after():
    yield
    try:
        wait_until_idle(ENGINE, timeout=30.0)
    finally:
        ENGINE.shutdown()


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@pytest.mark.timeout(300)
def test_no_input_the_schema_admits_makes_a_5xx(case):
    response = case.call()
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])
