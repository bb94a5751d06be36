"""A ticket's deadline counts the prompts the frontend has already sent to the chosen prefill worker: that
worker computes them first, so a burst queued there no longer expires reservations whose KV is on its way
(each expiry recomputed a whole prompt on the decode worker)."""

from __future__ import annotations

import asyncio
import dataclasses

from splitserve.core.costs import CostModel
from splitserve.core.request import SamplingParams
from splitserve.core.router import Router
from splitserve.runtime.engine_client import TokenOutput
from splitserve.runtime.frontend.pool_client import PoolClient, PoolConfig
from splitserve.runtime.wire import PrefillResult, StreamEvent, Ticket
from splitserve.sim.state import SAMPLED_TOKEN

BLOCK = 16


class Worker:
    """A worker as the pool client sees it: the decode side records each reservation's deadline and streams
    one more token once that request's KV landed; the prefill side answers when `release` is set."""

    def __init__(self, role: str, landed: dict[str, asyncio.Event], release: asyncio.Event) -> None:
        self.url, self.role = f"http://{role}", role
        self.info = dataclasses.make_dataclass("Info", ["role"])(role)
        self.in_flight, self.prompt_tokens_in_flight, self.draining, self.lost = 0, 0, False, asyncio.Event()
        self.landed, self.release, self.deadlines = landed, release, {}
        self.prefill_calls = 0

    async def stream(self, path: str, body):
        rid = body.request_id
        self.deadlines[rid] = body.deadline_s
        yield StreamEvent(TokenOutput(rid, []), ticket=Ticket(rid, "kv", [0], 0, body.deadline_s, ""))
        await self.landed.setdefault(rid, asyncio.Event()).wait()
        yield StreamEvent(TokenOutput(rid, [SAMPLED_TOKEN], True, "length"))

    async def prefill(self, body, timeout: float) -> PrefillResult:
        self.prefill_calls += 1
        await self.release.wait()
        self.landed.setdefault(body.request_id, asyncio.Event()).set()
        return PrefillResult(SAMPLED_TOKEN, 0, 0.001, 0.01)

    async def abort(self, request_id: str) -> None:
        pass


def test_the_deadline_counts_prompts_queued_on_the_prefill_worker():
    config = PoolConfig(policy="round_robin", conditional=False, deadline_base_s=10.0, deadline_per_token_s=0.01)

    class NoText:
        eos_token_ids: frozenset[int] = frozenset()

    async def go() -> tuple[Worker, Worker]:
        engine = PoolClient(NoText(), "m", b"deployment secret", config)
        engine.max_model_len = 4096
        costs = CostModel(kv_bytes_per_token=1, num_layers=1, link_bytes_per_s=1e9, prefill_s_per_token=1e-4, decode_step_s=0.01)
        engine.router = Router("round_robin", BLOCK, costs, conditional=False)
        landed, release = {}, asyncio.Event()
        d, p = Worker("decode", landed, release), Worker("prefill", landed, release)
        for w in (d, p):
            engine.router.register(w.url, w.role, 1, 1000)
            engine.pools[w.role].append(w)
        params = SamplingParams(max_tokens=2, ignore_eos=True)

        async def run(rid: str, n: int) -> list:
            return [o async for o in engine.generate(rid, list(range(n)), params)]

        try:
            first = asyncio.ensure_future(run("a", 300))
            while p.prefill_calls < 1:  # a's prompt is with the prefill worker, unanswered
                await asyncio.sleep(0.001)
            second = asyncio.ensure_future(run("b", 100))
            while p.prefill_calls < 2:
                await asyncio.sleep(0.001)
            assert p.prompt_tokens_in_flight == 400
            release.set()
            assert len(await first) == 2 and len(await second) == 2
        finally:
            await engine.close()
        return d, p

    d, p = asyncio.run(go())
    assert d.deadlines["a"] == 10.0 + 0.01 * 300  # nothing ahead of it
    assert d.deadlines["b"] == 10.0 + 0.01 * (100 + 300)  # a's 300 tokens are computed first
    assert p.prompt_tokens_in_flight == 0 and p.in_flight == 0
