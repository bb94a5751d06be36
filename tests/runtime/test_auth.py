"""The control plane's proofs: signed calls (right secret, fresh, once, unchanged), bearer tokens, and the
Guard that applies them to path prefixes before any route runs."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI, Request
from hypothesis import given
from hypothesis import strategies as st

from splitserve.runtime.auth import (
    NONCE_HEADER, SIGNATURE_HEADER, TIME_HEADER, Guard, Rule, SignedCalls, Verifier, bearer_ok, signature,
)

SECRET = b"s3cret-of-this-deployment"
NOW = 1_800_000_000.0


def signed_headers(method="POST", target="/internal/abort", body=b"{}", secret=SECRET, ts=NOW, nonce="n1"):
    t = f"{ts:.3f}"
    return {TIME_HEADER: t, NONCE_HEADER: nonce, SIGNATURE_HEADER: signature(secret, method, target, body, t, nonce)}


def test_a_correct_signature_passes_once():
    v = Verifier(SECRET)
    h = signed_headers()
    assert v.check("POST", "/internal/abort", b"{}", h, NOW + 1) is None
    assert "replayed" in v.check("POST", "/internal/abort", b"{}", h, NOW + 2)


@pytest.mark.parametrize("change", ["method", "target", "body", "secret", "stale", "future", "missing"])
def test_anything_changed_or_missing_is_refused(change):
    v = Verifier(SECRET, window_s=60)
    method, target, body = "POST", "/internal/decode?x=1", b'{"prompt": [1, 2]}'
    h = signed_headers(method, target, body)
    if change == "method":
        method = "GET"
    elif change == "target":
        target = "/internal/decode?x=2"
    elif change == "body":
        body = b'{"prompt": [1, 3]}'
    elif change == "secret":
        h = signed_headers(method, target, body, secret=b"another deployment")
    elif change == "stale":
        h = signed_headers(method, target, body, ts=NOW - 61)
    elif change == "future":
        h = signed_headers(method, target, body, ts=NOW + 61)
    else:
        h.pop(SIGNATURE_HEADER)
    assert v.check(method, target, body, h, NOW) is not None


@given(st.binary(max_size=200), st.text(min_size=1, max_size=30))
def test_a_signature_only_fits_its_own_body(body, nonce):
    h = signed_headers(body=body, nonce=nonce)
    v = Verifier(SECRET)
    assert v.check("POST", "/internal/abort", body + b"x", h, NOW) is not None
    assert v.check("POST", "/internal/abort", body, h, NOW) is None


def test_bearer_tokens():
    assert bearer_ok({"authorization": "Bearer k1"}, ["k0", "k1"])
    assert not bearer_ok({"authorization": "Bearer k2"}, ["k0", "k1"])
    assert not bearer_ok({"authorization": "Basic k1"}, ["k1"])
    assert not bearer_ok({}, ["k1"])


def make_app(clock=lambda: NOW) -> FastAPI:
    app = FastAPI()
    seen: list[str] = []

    @app.post("/internal/{what}")
    async def internal(what: str, request: Request):
        seen.append(what + ":" + (await request.body()).decode())
        return {"ok": True}

    @app.get("/admin/workers")
    async def admin():
        seen.append("admin")
        return {"ok": True}

    @app.get("/v1/models")
    async def models():
        return {"data": []}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    app.add_middleware(Guard, rules=[Rule("/internal/", signed=True), Rule("/admin/", signed=True, tokens=("adm",)),
                                     Rule("/v1/", tokens=("key",))], verifier=Verifier(SECRET), clock=clock)
    app.state.seen = seen
    return app


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_the_guard_refuses_before_any_route_runs_and_lets_proof_through():
    app = make_app()
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://w") as anyone:
        r = await anyone.post("/internal/connect", json={"endpoint": "tcp://evil:1"})
        assert r.status_code == 401 and "signature" in r.json()["error"]["message"]
        assert (await anyone.get("/admin/workers")).status_code == 401
        assert (await anyone.get("/admin/workers", headers={"authorization": "Bearer nope"})).status_code == 403
        assert (await anyone.get("/v1/models")).status_code == 401
        assert (await anyone.get("/health")).status_code == 200
        assert app.state.seen == []
        assert (await anyone.get("/admin/workers", headers={"authorization": "Bearer adm"})).status_code == 200
        assert (await anyone.get("/v1/models", headers={"authorization": "Bearer key"})).status_code == 200
    async with httpx.AsyncClient(transport=transport, base_url="http://w", auth=SignedCalls(SECRET, clock=lambda: NOW)) as frontend:
        r = await frontend.post("/internal/abort?soon=1", json={"request_id": "r1"})
        assert r.status_code == 200
        assert (await frontend.get("/admin/workers")).status_code == 200  # a worker registering or draining itself
    async with httpx.AsyncClient(transport=transport, base_url="http://w", auth=SignedCalls(b"other", clock=lambda: NOW)) as impostor:
        assert (await impostor.post("/internal/abort", json={"request_id": "r1"})).status_code == 401
    assert app.state.seen == ["admin", 'abort:{"request_id":"r1"}', "admin"]


@pytest.mark.anyio
async def test_a_rule_with_no_proof_closes_its_prefix():
    app = FastAPI()

    @app.get("/debug/requests")
    async def debug():
        return []

    app.add_middleware(Guard, rules=[Rule("/debug/")])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://f") as c:
        r = await c.get("/debug/requests", headers={"authorization": "Bearer anything"})
        assert r.status_code == 401 and "closed" in r.json()["error"]["message"]
