"""`splitserve scale`: ask a running deployment to resize its pools (`POST /admin/scale`)."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx


def scale(url: str, prefill: int | None, decode: int | None, timeout_s: float, admin_token_file: str) -> int:
    """Prints the pool sizes reached; 0 when the deployment reached the sizes asked for."""
    body = {role: n for role, n in (("prefill", prefill), ("decode", decode)) if n is not None}
    if not body:
        print("nothing to do: give --prefill N and/or --decode M", file=sys.stderr)
        return 2
    try:
        token = Path(admin_token_file).read_text().strip()
    except OSError as exc:
        print(f"cannot read {admin_token_file}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        r = httpx.post(url.rstrip("/") + "/admin/scale", json=body, timeout=timeout_s,
                       headers={"authorization": f"Bearer {token}"})
    except httpx.HTTPError as exc:
        print(f"cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    if r.status_code == 404:
        print(f"{url} has no /admin/scale: only a `splitserve serve --ray` deployment can be resized", file=sys.stderr)
        return 1
    try:
        reply = r.json()
    except ValueError:
        reply = {"error": f"HTTP {r.status_code}: {r.text[:300]}"}
    if r.status_code != 200:
        print(f"scale failed: {reply.get('error') or reply.get('detail')}", file=sys.stderr)
    if "prefill" in reply:
        print(f"prefill {reply['prefill']}, decode {reply['decode']}")
    return 0 if r.status_code == 200 else 1
