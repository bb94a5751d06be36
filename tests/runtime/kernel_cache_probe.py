"""A fresh process's resident-memory growth over prefills of many distinct lengths, on an engine built the
way a worker builds it (build_engine). Run by test_kernel_caches.py in its own process, because oneDNN's
caches are sized once per process, at its first primitive.

    python -m tests.runtime.kernel_cache_probe CHECKPOINT LENGTHS  ->  prints the growth in MB
"""

from __future__ import annotations

import argparse
import random
import sys

from splitserve.core.request import SamplingParams
from splitserve.runtime.config import add_engine_args
from splitserve.runtime.launch import build_engine


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / (1 << 20)


def main(checkpoint: str, lengths: int) -> float:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    engine = build_engine(parser.parse_args(["--model", checkpoint, "--threads", "1", "--num-blocks", "512"]), "prefill")
    rng = random.Random(0)

    def prefill(i: int, n: int) -> None:
        engine.add_request(f"r{i}", [rng.randrange(5, 300) for _ in range(n)], SamplingParams(max_tokens=1), 0.0)
        while engine.has_work():
            engine.step(0.0)

    for i in range(8):  # warm-up: the first steps' allocations (the activations' pool) are not growth
        prefill(i, 4 + i)
    start = rss_mb()
    for i in range(lengths):
        prefill(100 + i, 20 + i)  # a token count never seen before at every step, as a prefill worker sees
    return rss_mb() - start


if __name__ == "__main__":
    print(f"{main(sys.argv[1], int(sys.argv[2])):.1f}")
