"""A server process freezes what it loaded before serving (runtime/process.py: freeze_startup_heap), so no
full collection walks the model's and the imports' objects mid-step; garbage made before the freeze is
collected first, not kept forever."""

from __future__ import annotations

import gc
import weakref

from splitserve.runtime.process import freeze_startup_heap


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the collector frees it


def test_startup_objects_are_frozen_and_startup_garbage_is_freed_first():
    kept = [[i] for i in range(50_000)]  # what a server keeps: model, tokenizer, imports
    garbage = _Node()
    gone = weakref.ref(garbage)
    del garbage
    try:
        freeze_startup_heap()
        assert gone() is None, "garbage from before the freeze was frozen with the rest: it would never be freed"
        assert gc.get_freeze_count() >= len(kept)
        assert all(not any(o is kept for o in gc.get_objects(generation)) for generation in range(3))
    finally:
        gc.unfreeze()
