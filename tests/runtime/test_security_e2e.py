"""The attacks seen against a live 1P1D deployment, replayed: each is refused (401/403) and changes nothing;
with the right credentials the same calls work. Credentials: the deployment secret signs control-plane
calls (frontend <-> workers), an operator token opens /admin/* and /debug/*, API keys open /v1/*."""

from __future__ import annotations

import json

import httpx
import msgspec
import pytest

from splitserve.core.request import SamplingParams
from splitserve.runtime.auth import NONCE_HEADER, SIGNATURE_HEADER, TIME_HEADER
from splitserve.runtime.wire import DecodeRequest, PrefillRequest, StreamEvent, encoder
from tests.runtime.deployment import Deployment, complete
from tests.tiny_models import make_tiny_checkpoint

COMMON = ["--block-size", "16", "--num-blocks", "128", "--max-model-len", "512", "--no-conditional"]
PARIS = list(range(20, 60))
BERLIN = list(range(100, 140))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("security"), layers=2, seed=3)


@pytest.fixture(scope="module")
def dep(checkpoint):
    with Deployment(checkpoint, "--prefill", "1", "--decode", "1", *COMMON) as d:
        yield d


def tokens(r: httpx.Response) -> list[int]:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def test_no_one_without_the_secret_can_register_drain_or_read_debug(dep):
    before = dep.workers()
    anyone = httpx.Client(timeout=10)
    # A fake worker registering (as colocated: it would have received every prompt), and a drain.
    r = anyone.post(dep.url + "/admin/workers", json={"url": "http://127.0.0.1:9"})
    assert r.status_code == 401 and "authentication required" in r.json()["error"]["message"]
    (d,) = dep.workers("decode")
    assert anyone.post(dep.url + "/admin/workers/drain", json={"url": d["url"]}).status_code == 401
    assert anyone.get(dep.url + "/debug/requests").status_code == 401
    assert anyone.get(dep.url + "/debug/workers", headers={"authorization": "Bearer guess"}).status_code == 403
    # A signature made with another secret is no better.
    from splitserve.runtime.auth import SignedCalls

    forged = httpx.Client(auth=SignedCalls(b"not this deployment's"), timeout=10)
    assert forged.post(dep.url + "/admin/workers", json={"url": "http://127.0.0.1:9"}).status_code == 401
    assert dep.workers() == before
    assert anyone.get(dep.url + "/health").status_code == 200
    assert len(tokens(complete(dep.url, PARIS, 4, return_token_ids=True))) == 4


def test_workers_internal_api_needs_the_frontends_signature(dep):
    (p,), (d,) = dep.workers("prefill"), dep.workers("decode")
    anyone = httpx.Client(timeout=10)
    params = SamplingParams(max_tokens=4, temperature=0.0)
    calls = [
        (p["url"] + "/internal/connect", json.dumps({"endpoint": "tcp://127.0.0.1:9"}).encode()),
        (d["url"] + "/internal/decode", encoder.encode(DecodeRequest("x", BERLIN, params, 10.0))),
        (p["url"] + "/internal/abort", b'{"request_id": "x"}'),
        (d["url"] + "/internal/generate", b"{}"),
    ]
    for url, body in calls:
        r = anyone.post(url, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 401, (url, r.status_code, r.text)
    for path in ("/internal/state", "/internal/stats", "/internal/info"):
        assert anyone.get(d["url"] + path).status_code == 401
    # The frontend's signature (the test holds the secret too) opens them.
    assert dep.operator.get(d["url"] + "/internal/info").status_code == 200


def test_a_captured_signed_call_cannot_be_replayed(dep):
    (p,) = dep.workers("prefill")
    sent = dep.operator.build_request("POST", p["url"] + "/internal/abort", json={"request_id": "nothing"})
    first = dep.operator.send(sent)
    assert first.status_code == 204
    headers = {k: sent.headers[k] for k in (TIME_HEADER, NONCE_HEADER, SIGNATURE_HEADER)}
    again = httpx.post(p["url"] + "/internal/abort", json={"request_id": "nothing"}, headers=headers, timeout=10)
    assert again.status_code == 401 and "replayed" in again.json()["error"]["message"]


def test_a_ticket_carries_only_the_kv_of_the_prompt_it_was_reserved_for(dep):
    """Two internal calls used to store one prompt's KV under another prompt's cache key (a later question
    about Paris was answered 'Berlin'). Even with the secret, a prefill for prompt B on prompt A's ticket is
    refused before any KV moves, and the cache stays right."""
    clean = tokens(complete(dep.url, PARIS, 6, return_token_ids=True))
    before = dep.free_blocks()
    (p,), (d,) = dep.workers("prefill"), dep.workers("decode")
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    with dep.operator.stream("POST", d["url"] + "/internal/decode", timeout=30,
                             content=encoder.encode(DecodeRequest("victim", PARIS + [7], params, 10.0))) as stream:
        first = msgspec.json.decode(next(stream.iter_lines()), type=StreamEvent)
        assert first.ticket is not None
        wrong = PrefillRequest("attack", BERLIN + [7], params, first.ticket)
        r = dep.operator.post(p["url"] + "/internal/prefill", content=encoder.encode(wrong), timeout=30)
        assert r.status_code == 409 and "another prompt" in r.json()["error"]
    # Closing the stream aborted the reservation: every block is back, and the answer about Paris unchanged.
    assert dep.wait_all_free() == before
    assert tokens(complete(dep.url, PARIS, 6, return_token_ids=True)) == clean


def test_with_the_operator_token_admin_calls_work(dep):
    assert dep.operator.get(dep.url + "/debug/requests").status_code == 200
    r = dep.operator.post(dep.url + "/admin/workers/drain", json={"url": "http://127.0.0.1:9"})
    assert r.status_code == 200  # not a member: nothing to drain


def test_api_keys_guard_the_openai_api_and_nothing_else(checkpoint):
    with Deployment(checkpoint, "--in-process", "--api-key", "k-one", "--api-key", "k-two", *COMMON[:6]) as dep:
        body = {"prompt": PARIS, "max_tokens": 2}
        r = httpx.post(dep.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert httpx.get(dep.url + "/v1/models", headers={"authorization": "Bearer k-three"}).status_code == 403
        for key in ("k-one", "k-two"):
            ok = httpx.post(dep.url + "/v1/completions", json=body, headers={"authorization": f"Bearer {key}"}, timeout=30)
            assert ok.status_code == 200, ok.text
        assert httpx.get(dep.url + "/health").status_code == 200
        assert httpx.get(dep.url + "/metrics").status_code == 200
