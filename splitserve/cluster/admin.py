"""Wires ActorPools into the frontend app: the initial pools start with the server, `POST /admin/scale`
resizes them, and shutdown stops every worker and its actor."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import AsyncIterator, Callable

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from splitserve.cluster.actor_pool import ActorPools, ScaleError

log = logging.getLogger(__name__)


# At shutdown the frontend has already let its requests finish; workers only have stragglers left.
CLOSE_GRACE_S = 30.0


class ScaleBody(BaseModel):
    prefill: int | None = Field(default=None, ge=1)
    decode: int | None = Field(default=None, ge=1)


def attach_actor_pools(
    app: FastAPI, pools: ActorPools, initial: dict[str, int], on_startup_failed: Callable[[str], None]
) -> None:
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator[object]:
        async with inner(a) as state:
            # The workers register over HTTP, so the server must already be serving: start them beside it.
            starting = asyncio.get_running_loop().create_task(start())
            try:
                yield state
            finally:
                starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
        await pools.close(CLOSE_GRACE_S)

    async def start() -> None:
        try:
            sizes = await pools.scale(initial)
        except ScaleError as exc:
            on_startup_failed(str(exc))
            signal.raise_signal(signal.SIGTERM)  # the server's own graceful shutdown
            return
        log.info("Ray pools up: %d prefill, %d decode", sizes["prefill"], sizes["decode"])

    app.router.lifespan_context = lifespan

    @app.post("/admin/scale")
    async def scale(body: ScaleBody) -> JSONResponse:
        """Resize the pools: new workers join through the router; surplus ones drain before they go."""
        target = {role: n for role, n in body.model_dump().items() if n is not None}
        try:
            sizes = await pools.scale(target)
        except ScaleError as exc:
            return JSONResponse({"error": str(exc), **pools.sizes()}, status_code=503)
        return JSONResponse(sizes)
