"""Where the engine steps: on the calling thread (`AsyncEngine.run`), which in a worker process is the main
thread, the one that loaded the model (async_engine.py says why one OpenMP team matters)."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import httpx
import pytest

from splitserve.core.request import SamplingParams
from splitserve.model.loader import load_model
from splitserve.runtime.config import EngineConfig
from splitserve.runtime.worker.async_engine import AsyncEngine
from splitserve.runtime.worker.engine import Engine
from tests.runtime.deployment import Deployment, complete
from tests.tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("engine-thread"), layers=2, seed=11)


def test_run_steps_on_the_calling_thread_until_stopped(checkpoint):
    engine = Engine(load_model(checkpoint), EngineConfig(num_blocks=64, block_size=4))
    stepped_on: set[int] = set()
    engine.step_observers.append(lambda out, seconds: stepped_on.add(threading.get_ident()))
    ae = AsyncEngine(engine)
    assert not ae.healthy()  # not running yet
    results: dict[str, list[int]] = {}
    health: list[bool] = []

    async def client() -> None:
        async def one(rid: str) -> None:
            params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
            results[rid] = [t async for out in ae.generate(rid, [5, 6, 7, 8 + len(rid)], params) for t in out.new_token_ids]

        try:
            # run() may not have started yet on the main thread: a request before then is refused (as a worker's
            # HTTP server answers 503 until its engine runs). Seen in a clean-clone run on a loaded machine.
            while not ae.healthy():
                await asyncio.sleep(0.01)
            await asyncio.gather(*(one(f"r{i}") for i in range(3)))
            health.append(ae.healthy())
        finally:
            ae.stop()  # a failing client still ends run(): the test fails on its assertions, not by hanging

    side = threading.Thread(target=lambda: asyncio.run(client()), daemon=True)
    side.start()
    ae.run()  # returns once the client has stopped it
    side.join(timeout=30)
    assert stepped_on == {threading.get_ident()}
    assert {rid: len(tokens) for rid, tokens in results.items()} == {"r0": 6, "r1": 6, "r2": 6}
    assert health == [True] and not ae.healthy()
    assert engine.pool.num_free_blocks == 64


def _threads(pid: int) -> dict[int, tuple[str, int]]:
    """tid -> (name, user + system clock ticks) of a process's threads."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        out[int(tid)] = (name, int(fields[11]) + int(fields[12]))
    return out


def test_a_worker_process_steps_its_engine_on_its_main_thread(checkpoint):
    # One torch thread: with two, the OpenMP helper spins between parallel regions and may outrun any thread.
    with Deployment(checkpoint, "--colocated", "1", "--threads", "1") as dep:
        pid = int(httpx.get(dep.workers()[0]["url"] + "/internal/info", timeout=5, auth=dep.operator.auth).json()["pid"])
        before = _threads(pid)
        assert complete(dep.url, [5, 6, 7], 200).status_code == 200
        after = _threads(pid)
    used = {tid: ticks - before.get(tid, ("", 0))[1] for tid, (_, ticks) in after.items()}
    # 200 steps, each a forward driven from Python, ran on the main thread (tid == pid): no thread of the
    # process used more CPU (the HTTP thread only streamed the tokens).
    assert used[pid] >= 2 and used[pid] == max(used.values())
