"""The Ray actors behind a deployment's pools: grow and shrink them, and notice when Ray loses one.

New workers join through the router's own registration (`/admin/workers`, with its compatibility and
KV handshake checks); surplus ones drain through it (SIGTERM) before their actor is killed. A worker
whose actor Ray reports dead, or whose process exits, leaves the router at once; its in-flight requests
take PoolClient's failure path (recompute or a clear error). A lost worker is not replaced: `scale`
with the same sizes brings the pool back, on whatever nodes Ray then finds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import ray
from ray.actor import ActorHandle
from ray.exceptions import ActorUnavailableError, RayActorError

from splitserve.runtime.frontend.pool_client import PoolClient
from splitserve.runtime.wire import WorkerClient

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode")
CALL_SLACK_S = 5.0  # beyond a worker's own grace: how long a stop call may take to come back


class ScaleError(Exception):
    """Workers could not be added (not placed, exited, or refused by the router) in time."""


@dataclass(eq=False)
class Member:
    role: str
    actor: ActorHandle
    url: str | None = None  # known once Ray has placed the actor and it has started its worker
    leaving: bool = False  # being stopped on purpose: its end is not a failure
    watch: asyncio.Task | None = None  # from then on: ends, with the cause, when the worker or its actor ends


class ActorPools:
    def __init__(
        self, engine: PoolClient, make_actor: Callable[[str], ActorHandle], join_timeout_s: float, drain_grace_s: float
    ) -> None:
        self.engine = engine
        self.make_actor = make_actor  # role -> a new WorkerActor, with that pool's resources
        self.join_timeout_s = join_timeout_s
        self.drain_grace_s = drain_grace_s  # how long a surplus worker may take to finish its requests
        self.members: list[Member] = []
        self._lock = asyncio.Lock()  # one resize at a time

    def sizes(self) -> dict[str, int]:
        return {role: sum(m.role == role and not m.leaving for m in self.members) for role in ROLES}

    async def scale(self, target: dict[str, int]) -> dict[str, int]:
        """Add or drain workers until each pool in `target` has that many; returns the sizes reached."""
        async with self._lock:
            jobs = []
            for role, want in target.items():
                have = [m for m in self.members if m.role == role and not m.leaving]
                jobs += [self._add(role) for _ in range(want - len(have))]
                jobs += [self._remove(m, self.drain_grace_s) for m in self._surplus(have, len(have) - want)]
            errors = [r for r in await asyncio.gather(*jobs, return_exceptions=True) if isinstance(r, BaseException)]
            if errors:
                raise ScaleError("; ".join(str(e) for e in errors))
            return self.sizes()

    async def close(self, grace_s: float) -> None:
        """Stop every worker (each finishes what it has, within grace_s) and its actor."""
        await asyncio.gather(*(self._remove(m, grace_s) for m in list(self.members) if not m.leaving))

    def _surplus(self, members: list[Member], n: int) -> list[Member]:
        """Workers not yet serving first, then the least busy: the fastest to drain."""
        if n <= 0:
            return []
        in_flight = {w.url: w.in_flight for pool in self.engine.pools.values() for w in pool}
        return sorted(members, key=lambda m: in_flight.get(m.url or "", -1))[:n]

    async def _add(self, role: str) -> None:
        end = time.monotonic() + self.join_timeout_s
        m = await self._place(role, end)
        try:
            while not self._registered(m.url):
                assert m.watch is not None
                if m.watch.done():
                    raise ScaleError(f"{role} worker {m.url} ended before joining: {m.watch.result()}")
                if time.monotonic() > end:
                    raise ScaleError(f"{role} worker {m.url} did not join the router in {self.join_timeout_s:.0f} s")
                await asyncio.sleep(0.1)
        except ScaleError as exc:
            await self._remove(m, 0.0)
            errors = [e for e in self.engine.health_errors if m.url and m.url in e]
            raise ScaleError(f"{exc}{': ' + errors[-1] if errors else ''}") from None
        log.info("%s worker %s joined", role, m.url)

    async def _place(self, role: str, end: float) -> Member:
        """A new member whose worker process has started on the node Ray chose."""
        while True:
            m = Member(role, self.make_actor(role))
            self.members.append(m)
            try:
                m.url = await asyncio.wait_for(_awaited(m.actor.url.remote()), max(0.0, end - time.monotonic()))
                m.watch = asyncio.create_task(self._watch(m))
                return m
            except asyncio.TimeoutError:
                await self._remove(m, 0.0)
                raise ScaleError(
                    f"no node took a {role} worker in {self.join_timeout_s:.0f} s: does any node have the "
                    f"resources --{role}-resources asks for?"
                ) from None
            except RayActorError as exc:
                # Placed on a node that died before the actor started (Ray may not know it yet): again.
                await self._remove(m, 0.0)
                log.warning("%s worker lost before it started (%s): placing it again", role, _first_line(exc))

    async def _remove(self, m: Member, grace_s: float) -> None:
        m.leaving = True
        if m.url is not None and self._registered(m.url):
            try:
                # The worker drains through the router, then exits.
                await asyncio.wait_for(_awaited(m.actor.stop.remote(grace_s)), grace_s + CALL_SLACK_S)
            except (RayActorError, asyncio.TimeoutError):
                pass  # gone or out of reach: killing its actor takes the worker down with it
            self.engine.remove_worker(m.url)
        ray.kill(m.actor, no_restart=True)
        if m in self.members:
            self.members.remove(m)
        if m.watch is not None:
            m.watch.cancel()  # its end is no news now, and an unreachable actor would never send it
            await asyncio.gather(m.watch, return_exceptions=True)

    async def _watch(self, m: Member) -> str:
        """Wait for the worker process or its actor to end; if nobody asked it to, take it out at once."""
        assert m.url is not None  # watched from the moment its worker has started
        while True:
            try:
                cause = f"its process exited with code {await _awaited(m.actor.run.remote())}"
            except ActorUnavailableError:
                # Ray has lost touch with the actor: on a lost node it says so within seconds, but calls
                # the actor dead only when the node misses its health checks (15 s by default). The
                # worker itself tells sooner.
                if await self._answers(m.url):
                    await asyncio.sleep(0.5)
                    continue
                cause = "Ray lost touch with its actor and the worker does not answer"
            except RayActorError as exc:
                cause = f"Ray reports its actor dead: {_first_line(exc)}"
            break
        if not m.leaving:
            log.warning("%s worker %s lost (%s): removed from the router", m.role, m.url, cause)
            self.engine.remove_worker(m.url)
            if m in self.members:
                self.members.remove(m)
            ray.kill(m.actor, no_restart=True)  # the actor may outlive its worker process: free its resources
        return cause

    def _client(self, url: str | None) -> WorkerClient | None:
        return next((w for pool in self.engine.pools.values() for w in pool if w.url == url), None)

    def _registered(self, url: str | None) -> bool:
        return self._client(url) is not None

    async def _answers(self, url: str | None) -> bool:
        w = self._client(url)
        return w is not None and await w.healthy()


async def _awaited(ref: "ray.ObjectRef") -> Any:
    return await ref


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0]
