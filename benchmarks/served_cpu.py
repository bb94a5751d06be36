"""CPU seconds per generated token of each process of a served colocated deployment, while N streaming
requests decode together: where a served step's time goes outside the model forward.

Starts `splitserve serve --colocated 1 --threads T` (bundled SmolLM2-135M), sends N streaming completions
(greedy, ignore_eos) at once, and reads /proc utime+stime of every thread of the frontend and the worker
between the moment every request has its first token and the moment the first one ends (pure decode at
batch N), divided by the tokens the client received meanwhile. The worker's threads: the event loop
("main": the NDJSON token streams), the engine thread (the step: scheduling, the forward's own share,
sampling) and torch's other intra-op threads (forward only). CPU time, so a busy machine stretches it less
than wall time; OpenMP spin-waits count, and a loaded machine inflates them.

    python -m benchmarks.served_cpu [--requests 16] [--prompt 256] [--max-tokens 96] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path

import httpx

from tests.runtime.deployment import Deployment

TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, float]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / TICK
    return out


async def run(args: argparse.Namespace) -> dict:
    dep = Deployment(None, "--colocated", "1", "--threads", str(args.threads))
    try:
        pids = {"frontend": dep.proc.pid, "worker": dep.workers()[0]["pid"]}
        async with httpx.AsyncClient(timeout=None) as client:
            model = (await client.get(dep.url + "/v1/models")).json()["data"][0]["id"]
        words = ("the cat sat on a mat and then " * (args.prompt // 4 + args.requests)).split()
        got = [0] * args.requests
        marks: dict[str, tuple[int, dict]] = {}

        def mark(name: str) -> None:
            if name not in marks:
                marks[name] = (sum(got), {p: thread_cpu(pid) for p, pid in pids.items()})

        async with httpx.AsyncClient(timeout=None) as client:
            async def one(i: int) -> None:
                body = {"model": model, "prompt": " ".join(words[i : i + args.prompt]), "max_tokens": args.max_tokens,
                        "stream": True, "ignore_eos": True, "temperature": 0}
                async with client.stream("POST", dep.url + "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            got[i] += 1
                            if all(got):
                                mark("all_started")
                mark("first_done")

            await asyncio.gather(*(one(i) for i in range(args.requests)))
        (n0, c0), (n1, c1) = marks["all_started"], marks["first_done"]
        tokens = n1 - n0
        result: dict = {"requests": args.requests, "threads": args.threads, "tokens": tokens}
        for proc, pid in pids.items():
            per = {tid: c1[proc].get(tid, 0.0) - c0[proc].get(tid, 0.0) for tid in c1[proc]}
            result[f"{proc}_ms_per_token"] = round(1000 * sum(per.values()) / tokens, 3)
            result[f"{proc}_threads_ms_per_token"] = {
                "main" if tid == pid else str(tid): round(1000 * v / tokens, 3)
                for tid, v in sorted(per.items(), key=lambda kv: -kv[1]) if v > 0
            }
        result["loadavg_1m"] = round(os.getloadavg()[0], 2)
        return result
    finally:
        dep.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=256, help="prompt words (about as many tokens)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    print(json.dumps(asyncio.run(run(ap.parse_args()))))


if __name__ == "__main__":
    main()
