"""Garbage on a live decode worker's KV port (random bytes, truncated or oversized headers, frames
without a handshake) costs only that connection: the deployment keeps serving split requests, with the
same tokens, and every block comes back."""

from __future__ import annotations

import socket

import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from splitserve.transfer.channel import parse_endpoint
from splitserve.transfer.frames import LENGTH, MAX_HEADER_BYTES
from tests.runtime.deployment import Deployment
from tests.tiny_models import make_tiny_checkpoint

PROMPT = list(range(20, 70))


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("fuzz"), layers=2, seed=4)
    with Deployment(ckpt, "--prefill", "1", "--decode", "1", "--num-blocks", "128", "--no-conditional") as dep:
        yield dep


def complete(dep: Deployment) -> list[int]:
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    r = httpx.post(dep.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def kv_endpoint(dep: Deployment) -> tuple[str, int]:
    (d,) = dep.workers("decode")
    info = dep.operator.get(d["url"] + "/internal/info", timeout=5).json()
    _, host, port = parse_endpoint(info["transfer_endpoint"])
    return host, port


frames = st.one_of(
    st.binary(min_size=1, max_size=2048),  # noise
    st.integers(0, 2**32 - 1).map(lambda n: n.to_bytes(4, "big")),  # a length prefix and nothing after it
    st.just((MAX_HEADER_BYTES + 1).to_bytes(4, "big") + b"x" * 64),  # an oversized header
    st.binary(min_size=1, max_size=200).map(lambda b: len(b).to_bytes(4, "big") + b),  # a header that is not ours
)


def test_garbage_costs_only_its_connection(deployment):
    expected = complete(deployment)
    host, port = kv_endpoint(deployment)
    assert LENGTH.size == 4

    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(chunks=st.lists(frames, min_size=1, max_size=4))
    def throw(chunks):
        with socket.create_connection((host, port), timeout=5) as s:
            try:
                for c in chunks:
                    s.sendall(c)
                s.shutdown(socket.SHUT_WR)
                s.settimeout(5)
                while s.recv(4096):  # the worker closes it (after its challenge, maybe an error frame)
                    pass
            except OSError:  # reset, broken pipe, not connected: the worker already dropped it
                pass

    throw()
    assert complete(deployment) == expected
    (rec,) = deployment.requests()[-1:]
    assert rec["path"] == "split"
    assert all(free == total for free, total in deployment.wait_all_free().values())
    assert httpx.get(deployment.url + "/health", timeout=5).status_code == 200
