"""The simulator and the frontend drive the very same SplitRequest: one event sequence, driven through
`ClusterSim` and through the frontend's pool client with fake workers at the wire level, yields the same
actions (a normal request, a first token that ends the request, a request refused for room then reserved)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from splitserve.core.costs import CostModel
from splitserve.core.request import SamplingParams
from splitserve.core.router import Router
from splitserve.core.split_request import Emit, Release, Reserve, Retry, SendPrompt, SplitRequest
from splitserve.runtime.frontend.pool_client import PoolConfig, PoolClient
from splitserve.runtime.engine_client import TokenOutput
from splitserve.runtime.wire import PrefillResult, StreamEvent, Ticket
from splitserve.sim import hardware, models
from splitserve.sim.cluster import ClusterSim
from splitserve.sim.cluster_spec import ClusterSpec, PoolSpec
from splitserve.sim.state import SAMPLED_TOKEN
from splitserve.workload.requests import RequestSpec

BLOCK = 16


@pytest.fixture
def actions(monkeypatch) -> dict:
    """Every split request's actions, in order, with each worker named by its role."""
    seen: dict[int, tuple[SplitRequest, list]] = {}
    handle = SplitRequest.handle

    def recording(self: SplitRequest, event, now: float) -> list:
        acts = handle(self, event, now)
        seen.setdefault(id(self), (self, []))[1].extend(_by_role(a) for a in acts)
        return acts

    monkeypatch.setattr(SplitRequest, "handle", recording)
    return seen


def _by_role(action):
    return type(action)(**{f.name: getattr(getattr(action, f.name), "role", getattr(action, f.name))
                           for f in dataclasses.fields(action)})


def simulate(reqs: list[RequestSpec], kv_blocks: int | None = None) -> None:
    spec = ClusterSpec(models.model("llama-3.1-8b"), hardware.gpu("h100"), (PoolSpec("prefill", 1), PoolSpec("decode", 1)),
                       network=hardware.network("rdma-400"), block_size=BLOCK, kv_blocks=kv_blocks)
    res = ClusterSim(spec).run(reqs)
    assert all(r.ok for r in res.records)


class FakeWorker:
    """A worker as the pool client sees it through `WorkerClient`: scripted answers, no process."""

    def __init__(self, role: str, kv: asyncio.Event, tokens: int, no_room: int = 0) -> None:
        self.url, self.role = f"http://{role}", role
        self.info = dataclasses.make_dataclass("Info", ["role"])(role)
        self.in_flight, self.draining, self.lost = 0, False, asyncio.Event()
        self.prompt_tokens_in_flight = 0
        self.kv, self.tokens, self.no_room = kv, tokens, no_room

    async def stream(self, path: str, body):
        assert path == "/internal/decode"
        if self.no_room:
            self.no_room -= 1
            yield StreamEvent(no_room=True)
            return
        yield StreamEvent(TokenOutput(body.request_id, []), ticket=Ticket(body.request_id, "kv", [0], 0, 10.0, ""))
        await self.kv.wait()  # the prefill worker's KV and first token landed
        for i in range(1, self.tokens):
            last = i == self.tokens - 1
            out = TokenOutput(body.request_id, [SAMPLED_TOKEN], last, "length" if last else None)
            yield StreamEvent(out, kv_wait_s=0.01 if i == 1 else None)
        await asyncio.Event().wait()  # a one-token request: the client ends it, never this worker

    async def prefill(self, body, timeout: float) -> PrefillResult:
        self.kv.set()
        return PrefillResult(SAMPLED_TOKEN, 0, 0.001, 0.01)

    async def abort(self, request_id: str) -> None:
        pass


def serve(prompt_len: int, tokens: int, no_room: int = 0) -> list[list[int]]:
    """One request through the pool client's split path; the token lists it streamed."""

    class NoText:
        eos_token_ids: frozenset[int] = frozenset()

    async def go() -> list[list[int]]:
        engine = PoolClient(NoText(), "m", b"deployment secret", PoolConfig(policy="round_robin", conditional=False))
        engine.max_model_len = 4096
        costs = CostModel(kv_bytes_per_token=1, num_layers=1, link_bytes_per_s=1e9, prefill_s_per_token=1e-4, decode_step_s=0.01)
        engine.router = Router("round_robin", BLOCK, costs, conditional=False)
        kv = asyncio.Event()
        for w in (FakeWorker("decode", kv, tokens, no_room), FakeWorker("prefill", kv, tokens)):
            engine.router.register(w.url, w.role, 1, 1000)
            engine.pools[w.role].append(w)
        params = SamplingParams(max_tokens=tokens, ignore_eos=True)
        try:
            return [out.new_token_ids async for out in engine.generate("r", list(range(prompt_len)), params)]
        finally:
            await engine.close()

    return asyncio.run(go())


def one(actions: dict) -> list:
    (acts,) = [a for _, a in actions.values()]
    actions.clear()
    return acts


def test_a_normal_request_takes_the_same_actions_in_both(actions):
    simulate([RequestSpec(0.0, 256, 5)])
    sim = one(actions)
    assert serve(256, 5) == [[SAMPLED_TOKEN]] * 5
    assert one(actions) == sim
    assert sim == [Reserve("decode"), SendPrompt("prefill", "decode"), *[Emit((SAMPLED_TOKEN,))] * 4,
                   Emit((SAMPLED_TOKEN,), True, "length")]


def test_a_first_token_that_ends_the_request_takes_the_same_actions_in_both(actions):
    simulate([RequestSpec(0.0, 256, 1)])
    sim = one(actions)
    assert serve(256, 1) == [[SAMPLED_TOKEN]]
    assert one(actions) == sim
    assert sim == [Reserve("decode"), SendPrompt("prefill", "decode"), Emit((SAMPLED_TOKEN,), True, "length"),
                   Release("decode", "decode")]


def test_a_request_refused_for_room_then_reserved_takes_the_same_actions_in_both(actions):
    # 40 blocks: the first request holds 23 by its end, the second needs 26, so it waits for the first to finish.
    simulate([RequestSpec(0.0, 256, 6), RequestSpec(0.001, 400, 3)], kv_blocks=40)
    sim = [acts for split, acts in actions.values() if split.prompt_len == 400][0]
    actions.clear()
    refusals = sim.count(Retry())
    assert refusals >= 2
    assert sim[: 2 * refusals] == [Reserve("decode"), Retry()] * refusals
    assert serve(400, 3, no_room=refusals) == [[SAMPLED_TOKEN]] * 3
    assert one(actions) == sim
