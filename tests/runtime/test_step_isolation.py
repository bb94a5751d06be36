"""Step isolation: an exception inside an engine step fails only the request that caused it, never the batch.

The fault is injected by the test around `Engine._run` (the model call and sampling), keyed on one request
id, after the step has really computed (KV written, tokens sampled): the worst case for running it again.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from splitserve.core.request import SamplingParams
from splitserve.model.loader import load_model
from splitserve.runtime.config import EngineConfig
from splitserve.runtime.worker.async_engine import AsyncEngine
from splitserve.runtime.worker.engine import Engine
from tests.tiny_models import make_tiny_checkpoint

STREAMS = 16
MAX_NEW = 12
POISON = "poisoned"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model(make_tiny_checkpoint(tmp_path_factory.mktemp("isolation"), layers=2, seed=5))


def prompts() -> list[list[int]]:
    return [[(7 * i + j) % 300 + 3 for j in range(10 + 3 * i)] for i in range(STREAMS)]


def poison(engine: Engine, batches: list[int]) -> None:
    """Fail every step whose batch holds the poisoned request, after computing it; note those batches' sizes."""
    run = engine._run

    def faulty(out, hooks):
        tokens = run(out, hooks)
        if any(s.request.request_id == POISON for s in out.seqs):
            batches.append(len(out.seqs))
            raise RuntimeError("injected fault")
        return tokens

    engine._run = faulty


async def serve_all(engine: AsyncEngine, ids: list[str]) -> dict[str, tuple[list[int], str | None]]:
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    gate = threading.Event()
    engine.submit(gate.wait)  # hold the engine thread so that all streams start in one batch

    async def one(rid: str, prompt: list[int]) -> tuple[list[int], str | None]:
        tokens, reason = [], None
        async for out in engine.generate(rid, prompt, params):
            tokens += out.new_token_ids
            reason = out.finish_reason
        return tokens, reason

    tasks = [asyncio.ensure_future(one(rid, p)) for rid, p in zip(ids, prompts())]
    await asyncio.sleep(0.05)
    gate.set()
    return dict(zip(ids, await asyncio.gather(*tasks)))


def test_one_poisoned_request_among_16_streams_fails_alone(loaded):
    ids = [f"r{i}" for i in range(STREAMS)]
    engine = Engine(loaded, EngineConfig(block_size=16, num_blocks=256))
    free = engine.pool.num_free_blocks
    ae = AsyncEngine(engine).start()
    try:
        clean = asyncio.run(serve_all(ae, ids))
        batches: list[int] = []
        poison(engine, batches)
        poisoned_ids = ids[:5] + [POISON] + ids[6:]
        poisoned = asyncio.run(serve_all(ae, poisoned_ids))
    finally:
        ae.shutdown()
    assert batches and max(batches) > 1, "the poisoned request never shared a step: nothing was isolated"
    assert poisoned[POISON] == ([], "error")
    for rid in poisoned_ids:
        if rid != POISON:
            assert poisoned[rid] == clean[rid], rid  # the other 15: the same tokens as without the poison
            assert poisoned[rid][1] == "length"
    assert engine.pool.num_free_blocks == free


class RecordingHooks:
    """What a prefill worker's send hooks would send: (request, layer) per layer handed on."""

    def __init__(self, rids: list[str], sent: list[tuple[str, int]]) -> None:
        self.rids, self.sent = rids, sent

    def before_layer(self, layer: int) -> None:
        pass

    def after_layer(self, layer: int) -> None:
        self.sent += [(rid, layer) for rid in self.rids]


def test_a_failed_step_never_sends_a_layer_twice(loaded):
    """Prefill side: a step that failed after sending layers fails its sending requests (the frontend
    recomputes them), and runs the others again without sending anything twice."""
    engine = Engine(loaded, EngineConfig(block_size=16, num_blocks=256))
    free = engine.pool.num_free_blocks
    sent: list[tuple[str, int]] = []

    def hooks_for(out):
        rids = [s.request.request_id for s in out.seqs if s.sample and s.request.hold_kv]
        return RecordingHooks(rids, sent) if rids else None

    batches: list[int] = []
    poison(engine, batches)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    ids = ["s0", POISON, "s1", "local0", "local1"]
    for rid, prompt in zip(ids, prompts()):
        engine.add_request(rid, prompt, params, 0.0, hold_kv=rid != "local0" and rid != "local1")
    outs = {}
    while engine.has_work():
        for o in engine.step(0.0, hooks_for):
            outs[o.request_id] = o
    assert batches == [5]
    assert len(sent) == len(set(sent)), "a layer was sent twice"
    for rid in ("s0", POISON, "s1"):
        assert outs[rid].finish_reason == "error" and "sent" in outs[rid].error
    for rid in ("local0", "local1"):
        assert outs[rid].finish_reason == "length" and len(outs[rid].new_token_ids) == 1
    for rid in ("s0", "s1"):
        engine.release_held(rid)
    assert engine.pool.num_free_blocks == free
