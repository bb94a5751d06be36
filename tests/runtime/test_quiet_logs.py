"""Background polls are not logged at INFO (issue 15: the frontend logged every poll of every worker, 1.8 MB
of log in 10 minutes). A live split deployment at --log-level info, idle: the frontend polls each worker's
state 10 times a second, yet nothing per poll reaches the log."""

from __future__ import annotations

import time

from tests.runtime.deployment import Deployment
from tests.tiny_models import make_tiny_checkpoint

IDLE_S = 3.0  # ~30 state polls per worker, plus heartbeats and stats polls


def logged(capfd) -> str:
    """Everything the deployment wrote since the last call: uvicorn's access log goes to stdout, ours to stderr."""
    out, err = capfd.readouterr()
    return out + err


def test_idle_deployment_logs_no_polls(tmp_path, capfd) -> None:
    checkpoint = make_tiny_checkpoint(tmp_path / "tiny")
    with Deployment(checkpoint, "--prefill", "1", "--decode", "1", "--log-level", "info"):
        startup = logged(capfd)
        time.sleep(IDLE_S)
        idle = logged(capfd).splitlines()
    assert " INFO splitserve" in startup  # INFO logging is on (the KV cache's size, registrations, ...)
    polls = [line for line in idle if "HTTP Request" in line or "/internal/" in line or "HTTP/1.1\"" in line]
    assert polls == [], polls[:5]
    assert len(idle) < 10, idle[:10]  # a few one-off lines (a late registration) at most; polls would be dozens
