"""The operator's live view: the `/dashboard` page, its data (`/debug/dashboard`) and the phase records as a
Chrome/Perfetto trace (`/debug/trace`).

The page and its scripts are static files with no data in them, so they are served to anyone; everything
they show comes from `/debug/*`, which takes the operator token (runtime/auth.py). The page asks for that
token, keeps it in the tab's sessionStorage (gone when the tab closes, never sent to another origin) and
sends it as `Authorization: Bearer`. A strict Content-Security-Policy allows scripts from this origin only,
and the page writes what it receives as text, never as HTML: a request id or a URL cannot run script there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, JSONResponse, Response

from splitserve.runtime.engine_client import EngineClient
from splitserve.runtime.frontend.metrics import FrontendMetrics
from splitserve.runtime.frontend.pool_view import PoolView
from splitserve.runtime.frontend.timeline import chrome_trace

STATIC = Path(__file__).parent / "static"
# The files the page is made of, and nothing else: a name outside this map is a 404, never a path lookup.
ASSETS = {
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
    "vendor/uPlot.iife.min.js": "text/javascript",
    "vendor/uPlot.min.css": "text/css",
}
_HEADERS = {
    # uPlot sizes its elements through inline styles, hence 'unsafe-inline' for styles only.
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


def dashboard_router(engine: EngineClient, metrics: FrontendMetrics) -> APIRouter:
    """The routes; not in /openapi.json, which describes the API clients call (these are in the README)."""
    view = PoolView(engine, metrics)
    router = APIRouter(include_in_schema=False)

    @router.get("/dashboard")
    async def page() -> Response:
        return FileResponse(STATIC / "dashboard.html", media_type="text/html", headers=_HEADERS)

    @router.get("/dashboard/{name:path}")
    async def asset(name: str) -> Response:
        if name not in ASSETS:
            return JSONResponse({"error": {"message": f"no dashboard file {name!r}", "type": "not_found"}}, 404)
        return FileResponse(STATIC / name, media_type=ASSETS[name], headers=_HEADERS)

    @router.get("/debug/dashboard")
    async def data(timeline: int = Query(60, ge=1, le=512)) -> dict[str, Any]:
        """Pools, workers, latency percentiles, KV transfer and the last `timeline` requests' phases."""
        return await view.snapshot(timeline)

    @router.get("/debug/trace")
    async def trace(limit: int = Query(512, ge=1, le=512)) -> JSONResponse:
        """The last `limit` requests' phases as trace-event JSON: open in ui.perfetto.dev or chrome://tracing."""
        phases = getattr(engine, "phases", None)
        records = phases.records(limit) if phases is not None else []
        return JSONResponse(chrome_trace(records), headers={"Content-Disposition": 'inline; filename="splitserve-trace.json"'})

    return router
