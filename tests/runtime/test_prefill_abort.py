"""A prefill whose caller leaves stops at once: dropped from the queue if it has not started (never computed,
nothing sent), its ticket aborted, its blocks back; the request computing beside it is untouched."""

from __future__ import annotations

import asyncio
import threading

import pytest

from splitserve.core.request import SamplingParams
from splitserve.model.loader import load_model
from splitserve.runtime.config import EngineConfig
from splitserve.runtime.wire import PrefillRequest, Ticket, prompt_digest
from splitserve.runtime.worker.async_engine import AsyncEngine
from splitserve.runtime.worker.engine import Engine
from splitserve.runtime.worker.metrics import WorkerMetrics
from splitserve.runtime.worker.prefill_role import PrefillRole
from tests.runtime.deployment import loaded_bound
from tests.tiny_models import make_tiny_checkpoint


class FakeSend:
    """A ticket's sends as the prefill role sees them: records layers sent and whether it was aborted."""

    def __init__(self, num_layers: int) -> None:
        self.layers: list[int] = []
        self.aborted: str | None = None
        self.finished = False
        self.error = None
        self.bytes_sent = 0
        self.layer_sent_times = [0.0] * num_layers
        self.settled_at = None

    def send_layer(self, layer, kv_cache, blocks) -> None:
        self.layers.append(layer)

    def finish(self, first_token=None) -> None:
        self.finished = True

    def abort(self, reason: str) -> None:
        self.aborted = reason

    @property
    def stopped(self) -> bool:
        return self.aborted is not None

    @property
    def done(self) -> bool:
        return self.finished or self.stopped

    def wait(self, timeout: float) -> bool:
        return self.finished


class FakeSender:
    def __init__(self, num_layers: int) -> None:
        self.sends: dict[str, FakeSend] = {}
        self.num_layers = num_layers

    def start_ticket(self, endpoint: str, ticket_id: str, num_blocks: int) -> FakeSend:
        self.sends[ticket_id] = FakeSend(self.num_layers)
        return self.sends[ticket_id]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model(make_tiny_checkpoint(tmp_path_factory.mktemp("prefill-abort"), layers=2, seed=6))


def request(rid: str, prompt: list[int]) -> PrefillRequest:
    blocks = list(range(-(-len(prompt) // 16)))
    ticket = Ticket(rid, "tcp://decode", blocks, 0, 30.0, prompt_digest(prompt))
    return PrefillRequest(rid, prompt, SamplingParams(max_tokens=8, temperature=0.0), ticket)


def test_a_queued_prefill_whose_caller_left_is_never_computed(loaded):
    # One request per step, so the second waits in the queue while the first computes.
    engine = Engine(loaded, EngineConfig(block_size=16, num_blocks=64, max_num_batched_tokens=64))
    free = engine.pool.num_free_blocks
    computed: list[str] = []
    release = threading.Event()
    run = engine._run

    def gated(out, hooks):  # the test holds the running step until the waiting request's caller has left
        computed.extend(s.request.request_id for s in out.seqs)
        release.wait()
        return run(out, hooks)

    engine._run = gated
    sender = FakeSender(loaded.config.num_layers)
    role: PrefillRole | None = None
    ae = AsyncEngine(engine, hooks_for=lambda out: role.hooks_for(out), before_abort=lambda rid: role.before_abort(rid))
    role = PrefillRole(ae, sender, WorkerMetrics("prefill"))
    ae.start()

    async def scenario():
        first = asyncio.ensure_future(role.prefill(request("running", list(range(3, 63)))))
        while "running" not in computed:
            await asyncio.sleep(0.01)
        left = asyncio.ensure_future(role.prefill(request("left", list(range(5, 65)))))
        while "left" not in sender.sends:  # its ticket started: it is queued behind the held step
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        left.cancel()  # what the worker's handler does when the frontend hangs up
        await asyncio.gather(left, return_exceptions=True)
        release.set()
        result = await asyncio.wait_for(first, loaded_bound(30))
        await ae.call(lambda e: None)  # the engine thread has taken everything submitted before
        return result

    try:
        result = asyncio.run(scenario())
        assert result.first_token >= 0
        assert computed.count("left") == 0, "the abandoned prefill was computed"
        assert sender.sends["left"].aborted and sender.sends["left"].layers == []
        running = sender.sends["running"]
        assert running.finished and running.aborted is None
        assert sorted(running.layers) == list(range(loaded.config.num_layers))
    finally:
        release.set()
        ae.shutdown()
    assert ae.load().waiting == 0
    engine.release_held("running")
    assert engine.pool.num_free_blocks == free
