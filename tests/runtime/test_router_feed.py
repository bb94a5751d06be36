"""RouterPoll.run: every worker polled on its own loop, so a slow one holds back nobody, and a poll that
crashes on a bug is logged and started again."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

from splitserve.runtime.frontend.router_feed import RouterPoll


class ScriptedFeed(RouterPoll):
    def __init__(self) -> None:
        super().__init__(router=None, http=None)
        self.calls: dict[str, int] = {"fast": 0, "slow": 0, "buggy": 0}

    async def refresh(self, w, snapshot: bool = False) -> None:
        self.calls[w.url] += 1
        if w.url == "slow":
            await asyncio.sleep(10)  # a worker in a long prefill: its state read waits for the step
        if w.url == "buggy" and self.calls["buggy"] == 1:
            raise KeyError("a bug, not an unreachable worker")


def test_each_worker_polls_on_its_own_and_a_crashed_poll_restarts(caplog):
    feed = ScriptedFeed()
    pools = {"prefill": [SimpleNamespace(url="slow"), SimpleNamespace(url="buggy")], "decode": [SimpleNamespace(url="fast")]}

    async def main() -> None:
        task = asyncio.create_task(feed.run(pools, interval_s=0.01))
        await asyncio.sleep(0.3)
        task.cancel()

    with caplog.at_level(logging.ERROR, logger="splitserve.runtime.frontend.router_feed"):
        asyncio.run(main())
    assert feed.calls["slow"] == 1
    assert feed.calls["fast"] >= 5
    assert feed.calls["buggy"] >= 3
    assert "polling buggy failed" in caplog.text
