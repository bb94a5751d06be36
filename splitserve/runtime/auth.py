"""Who may call what: proof of the deployment secret on every control-plane call between the frontend and
its workers, a bearer token for operators, optional API keys for the OpenAI API.

Control plane (frontend <-> worker: register, drain, the workers' `/internal/*` API, state polls, the KV
`connect`): each request carries a timestamp, a fresh nonce and an HMAC-SHA256 over method, path with query,
the SHA-256 of the body, the timestamp and the nonce, keyed by the deployment secret (the one that already
authenticates KV connections, `--secret-file`). A receiver accepts a signature only within `window_s` of its
own clock and only once (nonces are remembered for the window): a captured call cannot be replayed, and a
changed body, path or method breaks the signature. The secret itself never crosses the wire.

Operators (`/admin/*`, `/debug/*`): `Authorization: Bearer <admin token>`. Clients (`/v1/*`), when the server
has API keys: `Authorization: Bearer <key>`. Tokens are compared in constant time.

`Verifier` is pure (the caller passes `now`); `SignedCalls` signs httpx requests; `Guard` is the ASGI
middleware that applies the rules to path prefixes before any route runs.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import httpx
from starlette.types import ASGIApp, Receive, Scope, Send

from splitserve.runtime.asgi import read_body, send_error

TIME_HEADER = "x-splitserve-time"
NONCE_HEADER = "x-splitserve-nonce"
SIGNATURE_HEADER = "x-splitserve-signature"
DEFAULT_WINDOW_S = 60.0  # clock skew and delivery delay tolerated between the frontend and a worker
MAX_SIGNED_BODY = 8 * 1024 * 1024  # a control-plane body is a prompt's ids and settings: a 128k prompt is ~1 MB


def signature(secret: bytes, method: str, target: str, body: bytes, timestamp: str, nonce: str) -> str:
    """HMAC-SHA256 of one call. `target` is the path with its query string, as sent."""
    message = "\n".join((method.upper(), target, hashlib.sha256(body).hexdigest(), timestamp, nonce)).encode()
    return hmac.new(secret, b"splitserve-call/" + message, hashlib.sha256).hexdigest()


class SignedCalls(httpx.Auth):
    """httpx auth that signs every request with the deployment secret."""

    requires_request_body = True

    def __init__(self, secret: bytes, clock: Callable[[], float] = time.time) -> None:
        if not secret:
            raise ValueError("signing control-plane calls needs the deployment secret")
        self._secret = secret
        self._clock = clock

    def auth_flow(self, request: httpx.Request):  # type: ignore[override]
        timestamp = f"{self._clock():.3f}"
        nonce = secrets.token_hex(16)
        target = request.url.raw_path.decode("ascii")
        request.headers[TIME_HEADER] = timestamp
        request.headers[NONCE_HEADER] = nonce
        request.headers[SIGNATURE_HEADER] = signature(self._secret, request.method, target, request.content, timestamp, nonce)
        yield request


class Verifier:
    """Checks signed calls: right secret, within the window of `now`, nonce not seen before."""

    def __init__(self, secret: bytes, window_s: float = DEFAULT_WINDOW_S) -> None:
        if not secret:
            raise ValueError("verifying control-plane calls needs the deployment secret")
        self._secret = secret
        self.window_s = window_s
        self._seen: dict[str, float] = {}  # nonce -> when it may be forgotten

    def check(self, method: str, target: str, body: bytes, headers: Mapping[str, str], now: float) -> str | None:
        """None if the call is authentic; otherwise why not (for the 401 body and the log)."""
        timestamp, nonce, sig = headers.get(TIME_HEADER), headers.get(NONCE_HEADER), headers.get(SIGNATURE_HEADER)
        if not (timestamp and nonce and sig):
            return "this call needs the deployment's signature (control plane)"
        try:
            sent = float(timestamp)
        except ValueError:
            return "malformed signature timestamp"
        if abs(now - sent) > self.window_s:
            return f"signature timestamp {timestamp} is more than {self.window_s:.0f} s from this worker's clock"
        expected = signature(self._secret, method, target, body, timestamp, nonce)
        if not hmac.compare_digest(expected, sig):
            return "bad signature: not made with this deployment's secret, or the call was changed"
        self._forget_old(now)
        if nonce in self._seen:
            return "replayed call: this signature's nonce was used before"
        self._seen[nonce] = now + 2 * self.window_s
        return None

    def _forget_old(self, now: float) -> None:
        if len(self._seen) > 1024:
            self._seen = {n: t for n, t in self._seen.items() if t > now}


def bearer_ok(headers: Mapping[str, str], tokens: Iterable[str]) -> bool:
    """True if `Authorization: Bearer X` names one of `tokens` (compared in constant time)."""
    value = headers.get("authorization", "")
    scheme, _, given = value.partition(" ")
    if scheme.lower() != "bearer" or not given:
        return False
    ok = False
    for t in tokens:
        ok |= hmac.compare_digest(given.strip().encode(), t.encode())
    return ok


@dataclass(frozen=True)
class Rule:
    """Requests whose path starts with `prefix` need one of the listed proofs; a rule that lists none
    closes the prefix to everyone (an operator endpoint on a server started without an operator token)."""

    prefix: str
    signed: bool = False  # the deployment's signature
    tokens: tuple[str, ...] = ()  # or a bearer token among these
    realm: str = "splitserve"


class Guard:
    """ASGI middleware: the first rule whose prefix matches the path decides; no match, no check. A refused
    call gets 401 (or 403 for a bearer token that is not one of ours) in OpenAI's error shape, before any
    route runs, so nothing it asked for is done."""

    def __init__(self, app: ASGIApp, rules: Iterable[Rule], verifier: Verifier | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.app = app
        self.rules = tuple(rules)
        if any(r.signed for r in self.rules) and verifier is None:
            raise ValueError("a rule needs signed calls: give the Verifier holding the deployment secret")
        self.verifier = verifier
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        rule = next((r for r in self.rules if path.startswith(r.prefix)), None)
        if rule is None:
            await self.app(scope, receive, send)
            return
        if not (rule.signed or rule.tokens):
            await _unauthorized(send, f"{rule.prefix}* is closed on this server (it was started without an operator token)", rule.realm)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if rule.tokens and bearer_ok(headers, rule.tokens):
            await self.app(scope, receive, send)
            return
        if rule.signed and SIGNATURE_HEADER in headers:
            body, _, receive = await read_body(receive, MAX_SIGNED_BODY)
            if body is None:
                await send_error(send, 413, "request body too large for a control-plane call", "invalid_request_error")
                return
            target = scope.get("raw_path", path.encode()).decode("latin-1")
            if scope.get("query_string"):
                target += "?" + scope["query_string"].decode("latin-1")
            assert self.verifier is not None
            why = self.verifier.check(scope["method"], target, body, headers, self.clock())
            if why is None:
                await self.app(scope, receive, send)
                return
            await _unauthorized(send, why, rule.realm)
            return
        if "authorization" in headers:
            await send_error(send, 403, "this token does not grant access here", "permission_error")
            return
        need = "the deployment's signature" if rule.signed and not rule.tokens else "a bearer token"
        if rule.signed and rule.tokens:
            need = "a bearer token or the deployment's signature"
        await _unauthorized(send, f"authentication required: {need}", rule.realm)


async def _unauthorized(send: Send, message: str, realm: str) -> None:
    await send_error(send, 401, message, "authentication_error", headers=[(b"www-authenticate", f'Bearer realm="{realm}"'.encode())])
