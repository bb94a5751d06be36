"""Router benchmarks. Sections (each writes its own key of results/router.json, keeping the others):

  decision  how long one routing decision takes with 100,000 (worker, block) pairs indexed across 16
            workers (8 prefill, 8 decode). The index holds realistic chains: conversations that share one
            of 64 system prompts (256-2,048 tokens) and go on for 200-3,000 tokens of their own. Timed
            requests (200-4,000 tokens, block size 16) are follow-up turns of indexed conversations, new
            conversations on a known system prompt, and unrelated prompts. A real decision hashes the
            prompt's blocks first, so `decision_p99_ms` includes hashing (`route_tokens`); the same requests
            are also timed with precomputed hashes (`route`), and the hashing alone. Loads change every 50
            requests. p50/p99 per repetition; reported: the median over repetitions and their range.

  replay    the Mooncake conversation trace (../shared/traces/) replayed on real deployments, one per policy,
            each fresh (cold caches), in cases: two model speeds (`--models`: the tests' tiny random Llama,
            ~10x faster than the bundled SmolLM2-135M, the speed that broke a fixed prior in issue 18) times
            two conversation samples (`--replay-seeds`: 5 % of the conversations each, drawn with different
            seeds, so about 95 % apart: the second is held out from any tuning on the first).
            `splitserve serve [--model tiny] --prefill 2 --decode 1
            --router-policy P --no-conditional --num-blocks 512 --transfer-deadline 300`, so every prompt is
            computed on a prefill worker and the prefill-side prefix hit rate is what the policy controls.
            Every policy gets the same request list: whole conversations (5 % of them; a conversation is the
            rows whose hash_ids share their second id, the first being one system prompt every row starts
            with), their first 100 requests (11 minutes of the trace), lengths x1/32 (so a 512-token trace
            block is exactly one 16-token KV block: shared ids are shared KV blocks), arrivals scaled to
            0.6 req/s (~165 s); bench's PromptBuilder turns hash_ids into token blocks (fixed salt). A
            contiguous stretch would not do: the trace's first 200 requests repeat under 6 % of their
            tokens, as conversations come back minutes later. KV cache: 512 blocks (8,192 tokens, 360 MiB)
            per worker: pinning each conversation to one prefill worker would lose 4 % of the oracle's hits
            to eviction (384 blocks: 21 %), and the decode worker has room to hold reservations while
            prefills queue. Hit rate = prompt tokens the computing prefill worker found cached (GET
            /debug/requests: `cached_tokens`) / prompt tokens. Oracle = the hit rate of one infinite prefix
            cache fed the same prompts one at a time (whole blocks, at least one token computed: the
            engine's own BlockPool). `hit_rate_vs_oracle` = kv_aware's / oracle's (target >= 0.9); TTFT
            p50/p90 per policy as the client measured it. Each policy's shortfall from the oracle is split
            into prefixes still being computed when the request arrived, evicted everywhere, and cached only
            on the other prefill worker (by load, recently stored, or neither), from the phase records and
            simulated caches; a probe reads the prefill workers' state as the router does (read latency, and
            the step counters behind the router's per-token costs, replayed through its CostModel).

    python -m benchmarks.router [--sections decision replay] [--quick] [--reps 5] [--requests 2000]
                                [--replay-rate 0.6] [--conversations 0.05] [--num-blocks 512]
                                [--models tiny smollm2] [--replay-seeds 0 1] [--policies ...]
    issue 18's run: --section replay --policies kv_aware round_robin --num-blocks 768 (at 512 blocks the second
    sample's eviction alone holds any policy to 0.85 of the infinite-cache oracle: one pooled LRU 0.234 of 0.275)

Writes results/router.json and results/router.png (raw data of the replay, and the decision latency samples
the plot needs, under results/router/); the last line printed is a JSON summary of every section in
results/router.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import httpx
import numpy as np

from benchmarks.netns import Service, credentials
from benchmarks.poller import Poller
from splitserve.bench.prompts import PromptBuilder
from splitserve.bench import BenchConfig, BenchResult, TraceLoad, run_bench
from splitserve.bench.vocab import Vocab, find_vocab
from splitserve.core.blocks import NO_PARENT, BlockPool, KVEvent, hash_blocks
from splitserve.core.costs import CostModel
from splitserve.core.router import POLICIES, Router
from splitserve.model.loader import BUNDLED_NAME
from splitserve.runtime.process import free_port
from splitserve.runtime.frontend.pool_client import PoolConfig
from splitserve.workload.requests import Scaling, Trace, TraceRow, Workload, at_rate, read_trace

RESULTS = Path("results")
BLOCK_SIZE = 16
VOCAB = 128_000
PREFILL, DECODE = [f"p{i}" for i in range(8)], [f"d{i}" for i in range(8)]
WORKER_BLOCKS = 50_000  # KV capacity per worker, in blocks


def cost_model() -> CostModel:
    # Llama-3.1-8B on one H100 over RDMA 400 Gbit/s, round figures (see sim/perf.py for where they come from).
    return CostModel(kv_bytes_per_token=131072, num_layers=32, link_bytes_per_s=45e9, prefill_s_per_token=26e-6,
                     decode_step_s=0.01)


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


def build_router(policy: str, cached: dict[str, list[int]]) -> Router:
    r = Router(policy, BLOCK_SIZE, cost_model())
    for w in PREFILL + DECODE:
        r.register(w, "prefill" if w in PREFILL else "decode", 1, WORKER_BLOCKS)
        events = [KVEvent(i + 1, "stored", h, NO_PARENT) for i, h in enumerate(cached[w])]
        assert r.on_events(w, 1, events)
    return r


def set_loads(r: Router, rng: random.Random, now: float) -> None:
    for w in PREFILL + DECODE:
        r.update_load(w, free_blocks=rng.randrange(WORKER_BLOCKS // 10, WORKER_BLOCKS), running=rng.randrange(64),
                      queued_prefill_tokens=rng.randrange(20_000), now=now)


def percentiles_ms(ns: list[int]) -> dict[str, float]:
    a = np.asarray(ns) / 1e6
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max())}


def across_reps(per_rep: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Median over repetitions of each statistic, with its range."""
    return {k: {"median": statistics.median(d[k] for d in per_rep), "min": min(d[k] for d in per_rep),
                "max": max(d[k] for d in per_rep)} for k in per_rep[0]}


def hash_blocks_bytes_once(token_ids: list[int], block_size: int) -> list[int]:
    """What `blocks.hash_blocks` would cost converting the prompt to bytes once rather than per block
    (same hashes: checked below). Measured here as a suggestion for blocks.py, which this file does not own."""
    raw = np.asarray(token_ids, dtype=np.int64).tobytes()
    step = 8 * block_size
    hashes, parent = [], NO_PARENT
    for begin in range(0, len(token_ids) // block_size * step, step):
        digest = hashlib.blake2b(parent.to_bytes(8, "little") + raw[begin : begin + step], digest_size=8).digest()
        parent = int.from_bytes(digest, "little") or 1
        hashes.append(parent)
    return hashes


def decision(args: argparse.Namespace) -> dict:
    rng = random.Random(0)
    systems = [tokens(rng, rng.randrange(256, 2049)) for _ in range(64)]
    # Conversations indexed on workers: each worker holds chains until the index reaches ~100,000 pairs.
    conversations: list[list[int]] = []
    cached: dict[str, list[int]] = {w: [] for w in PREFILL + DECODE}
    held: dict[str, set[int]] = {w: set() for w in cached}
    per_worker = args.index_blocks // len(cached)
    for w in cached:
        while len(cached[w]) < per_worker:
            if conversations and rng.random() < 0.3:  # the same conversation cached on a second worker
                conv = rng.choice(conversations)
            else:
                conv = rng.choice(systems) + tokens(rng, rng.randrange(200, 3001))
                conversations.append(conv)
            new = [h for h in hash_blocks(conv, BLOCK_SIZE) if h not in held[w]]
            new = new[: per_worker - len(cached[w])]
            cached[w] += new
            held[w].update(new)
    # Timed requests: 50% a follow-up turn, 30% a new conversation on a known system prompt, 20% unrelated.
    requests = []
    for _ in range(args.requests):
        u = rng.random()
        if u < 0.5:
            base = rng.choice(conversations)
            prompt = base + tokens(rng, rng.randrange(20, 400))
        elif u < 0.8:
            prompt = rng.choice(systems) + tokens(rng, rng.randrange(200, 2000))
        else:
            prompt = tokens(rng, rng.randrange(200, 4001))
        requests.append(prompt[: max(200, min(len(prompt), 4000))])
    hashes = [hash_blocks(p, BLOCK_SIZE) for p in requests]
    assert all(hash_blocks_bytes_once(p, BLOCK_SIZE) == h for p, h in zip(requests[:50], hashes))

    def timed(route: Callable[[int], object], policy: str, clock: Callable[[], int] = time.perf_counter_ns) -> list[int]:
        r = build_router(policy, cached)
        load_rng = random.Random(1)
        out = []
        for i in range(len(requests)):
            if i % 50 == 0:
                set_loads(r, load_rng, now=i * 0.01)
            t0 = clock()
            route(r, i)
            out.append(clock() - t0)
        return out

    def hashing(fn: Callable[[list[int], int], list[int]]) -> list[int]:
        out = []
        for p in requests:
            t0 = time.perf_counter_ns()
            fn(p, BLOCK_SIZE)
            out.append(time.perf_counter_ns() - t0)
        return out

    load_before = os.getloadavg()[:1]
    index_size = len(build_router("kv_aware", cached).index)
    reps: dict[str, list[dict]] = {}
    samples: dict[str, list[int]] = {}
    for _ in range(args.reps):
        runs = {
            "kv_aware_with_hashing": timed(lambda r, i: r.route_tokens(requests[i], now=i * 0.01), "kv_aware"),
            # The thread's own CPU time: what a decision costs, without the time other processes held the
            # core (on a shared 2-core machine at load 20-35 the wall-clock p99 is the OS scheduler's).
            "kv_aware_with_hashing_cpu": timed(lambda r, i: r.route_tokens(requests[i], now=i * 0.01), "kv_aware",
                                               time.thread_time_ns),
            **{f"{p}_without_hashing": timed(lambda r, i: r.route(len(requests[i]), hashes[i], now=i * 0.01), p)
               for p in POLICIES},
            "hashing_only": hashing(hash_blocks),
            "hashing_bytes_once": hashing(hash_blocks_bytes_once),
        }
        for name, ns in runs.items():
            reps.setdefault(name, []).append(percentiles_ms(ns))
            samples[name] = ns  # the last repetition, for the plot

    r = build_router("kv_aware", cached)
    set_loads(r, random.Random(1), now=0.0)
    decisions = [r.route(len(p), h, now=0.0) for p, h in zip(requests, hashes)]
    lengths = [len(p) for p in requests]
    result = {
        "workers": {"prefill": len(PREFILL), "decode": len(DECODE)},
        "indexed_pairs": index_size,
        "block_size": BLOCK_SIZE,
        "requests": args.requests,
        "prompt_tokens": {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)},
        "reps": args.reps,
        "cpus": os.cpu_count(),
        "kv_aware_share_with_cached_prefix": sum(
            max(d.decode_cached_blocks, d.prefill_cached_blocks) > 0 for d in decisions) / len(decisions),
        "kv_aware_share_prefilled_remote": sum(d.prefill is not None for d in decisions) / len(decisions),
        "latency": {name: across_reps(v) for name, v in reps.items()},
    }
    save_decision_samples(samples, lengths)
    lat = result["latency"]
    result["summary"] = {
        "decision_p99_ms": lat["kv_aware_with_hashing"]["p99_ms"]["median"],
        "decision_p50_ms": lat["kv_aware_with_hashing"]["p50_ms"]["median"],
        "decision_p99_ms_without_hashing": lat["kv_aware_without_hashing"]["p99_ms"]["median"],
        "decision_p99_cpu_ms": lat["kv_aware_with_hashing_cpu"]["p99_ms"]["median"],
        "load_average": [round(v, 2) for v in load_before + os.getloadavg()[:1]],
        "hashing_p99_ms": lat["hashing_only"]["p99_ms"]["median"],
        "hashing_bytes_once_p99_ms": lat["hashing_bytes_once"]["p99_ms"]["median"],
        "target_p99_ms": 1.0,
    }
    return result


# ---------------------------------------------------------------------------------------------- replay

TRACE = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "mooncake_conversation_trace.jsonl"
REPLAY_DIR = RESULTS / "router"
DECISION_SAMPLES = REPLAY_DIR / "decision_samples.npz"
REPLAY_TRACE_NAME = "replay_trace.jsonl"  # per case: the sampled conversations, in the trace's own format
TINY_CONTEXT = 8192  # the tiny checkpoint's context, raised so the trace's longest scaled prompts (3.9k) fit
KV_BLOCK = 16  # the deployments' KV block size (splitserve's default)
LENGTH_SCALE = 1 / 32  # a 512-token trace block becomes exactly one KV block: shared ids are shared KV blocks
PROMPT_SALT = 1  # fixed, so every policy's deployment and the oracle see the very same prompt tokens
PHASE_LOG = 512  # the frontend keeps this many phase records: a replay must not be longer


class Prompt(NamedTuple):
    num_tokens: int
    hashes: list[int]  # chained hashes of its full KV blocks


def prompt_of(tokens: Sequence[int], block_size: int = KV_BLOCK) -> Prompt:
    return Prompt(len(tokens), hash_blocks(tokens, block_size))


def conversation(index: int, row: TraceRow) -> int | tuple[str, int]:
    """The conversation a trace row belongs to. Every row starts with block 0 (one system prompt shared by
    all); below it the trace's prefix trees are disjoint, so the second block id names a conversation. A
    one-block row is a conversation of its own."""
    return row.hash_ids[1] if len(row.hash_ids) > 1 else ("row", index)


def sample_conversations(trace: Trace, fraction: float, seed: int) -> Trace:
    """Whole conversations, each kept with probability `fraction`. A time window of a few hundred
    requests holds few repeats (the first 200 requests: under 6 % of tokens); thinning whole conversations
    over the hour keeps every prefix chain intact, so the reuse survives at a rate this machine can serve."""
    if not 0 < fraction <= 1:
        raise ValueError(f"the fraction of conversations must be in (0, 1], got {fraction}")

    def kept(key: object) -> bool:
        digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") < fraction * 2**64

    return replace(trace, rows=tuple(r for i, r in enumerate(trace.rows) if kept(conversation(i, r))))


def write_mooncake(trace: Trace, path: Path) -> Path:
    """The rows in the trace's own format (original timestamps), so that bench replays exactly them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"timestamp": round(r.arrival_s * 1000), "input_length": r.input_len,
                                        "output_length": r.output_len, "hash_ids": list(r.hash_ids)}) + "\n"
                            for r in trace.rows))
    return path


class PrefixCache:
    """One worker's prefix cache under the engine's own rules (core BlockPool: LRU over free blocks; a
    request reuses whole leading blocks and computes at least one token), fed whole prompts one at a time.
    num_blocks None: it never evicts (the oracle)."""

    def __init__(self, block_size: int, num_blocks: int | None) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, block_size) if num_blocks is not None else None
        self.seen: set[int] = set()

    def hit(self, p: Prompt) -> int:
        """Prompt tokens `p` would find cached here now."""
        reusable = p.hashes[: (p.num_tokens - 1) // self.block_size]
        if self.pool is not None:
            return len(self.pool.cached_prefix(reusable)) * self.block_size
        n = next((i for i, h in enumerate(reusable) if h not in self.seen), len(reusable))
        return n * self.block_size

    def insert(self, p: Prompt) -> None:
        """`p` was computed here: its full blocks are cached, and most recently used."""
        if self.pool is None:
            self.seen.update(p.hashes)
            return
        pool = self.pool
        hit = pool.cached_prefix(p.hashes[: (p.num_tokens - 1) // self.block_size])
        pool.take(hit)
        fresh = pool.allocate(-(-p.num_tokens // self.block_size) - len(hit))
        if fresh is None:
            raise ValueError(f"a {p.num_tokens}-token prompt does not fit in {pool.num_blocks} blocks")
        ids = hit + fresh
        for i in range(len(hit), len(p.hashes)):
            pool.cache(ids[i], p.hashes[i], p.hashes[i - 1] if i else NO_PARENT)
        pool.release(reversed(ids))


def hit_rate(prompts: Sequence[Prompt], num_blocks: int | None = None, block_size: int = KV_BLOCK) -> float:
    """Prompt tokens found cached / all prompt tokens, for one cache fed the prompts in order. num_blocks
    None: the infinite-cache oracle (achievable in principle: whole blocks, one token always computed)."""
    cache = PrefixCache(block_size, num_blocks)
    hits = 0
    for p in prompts:
        hits += cache.hit(p)
        cache.insert(p)
    return hits / sum(p.num_tokens for p in prompts)


def affinity_hit_rate(workload: Workload, prompts: Sequence[Prompt], num_blocks: int, workers: int = 2,
                      block_size: int = KV_BLOCK) -> float:
    """The hit rate of a router that pins each conversation to one of `workers` caches of `num_blocks`, load
    ignored: what eviction alone leaves of the oracle with caches this size."""
    caches = [PrefixCache(block_size, num_blocks) for _ in range(workers)]
    hits = 0
    for i, (spec, p) in enumerate(zip(workload.requests, prompts)):
        cache = caches[(spec.prefix_blocks[1] if len(spec.prefix_blocks) > 1 else i) % workers]
        hits += cache.hit(p)
        cache.insert(p)
    return hits / sum(p.num_tokens for p in prompts)


def first_turns(workload: Workload) -> set[int]:
    """Indexes of the requests that open a conversation: only the shared system prompt can be cached
    for them, on every worker alike, so where a policy sends them is its load balancing alone."""
    seen: set[int] = set()
    out = set()
    for i, spec in enumerate(workload.requests):
        key = spec.prefix_blocks[1] if len(spec.prefix_blocks) > 1 else None
        if key is None or key not in seen:
            out.add(i)
        if key is not None:
            seen.add(key)
    return out


def match_records(phases: Sequence[dict], lengths: Sequence[int]) -> list[int | None]:
    """The workload index of each phase record (same order): the earliest unmatched request of the same
    prompt length. The client sends in workload order, so arrival order at the frontend is that order but
    for near-simultaneous sends, which only equal lengths could confuse. None: no request of that length."""
    waiting: dict[int, deque[int]] = {}
    for i, n in enumerate(lengths):
        waiting.setdefault(n, deque()).append(i)
    out: list[int | None] = [None] * len(phases)
    for k in sorted(range(len(phases)), key=lambda k: phases[k]["arrival"]):
        queue = waiting.get(phases[k]["prompt_tokens"])
        out[k] = queue.popleft() if queue else None
    return out


@dataclass(frozen=True)
class Served:
    """One replayed request as the deployment served it (frontend clock)."""

    arrival_s: float
    done_s: float  # its prefill finished: arrival + TTFT (the first token leaves the prefill worker at once)
    prefill_s: float  # the prefill's compute time
    worker: str  # the prefill worker that computed it
    cached_tokens: int  # what that worker reported reusing
    prompt: Prompt


def backlog(served: Sequence[Served], worker: str, at: Served) -> float:
    """Prompt tokens `worker` still had to compute when `at` arrived: requests routed there before it and
    not yet done, the one in progress counted by its remaining time."""
    t = at.arrival_s
    return sum((s.prompt.num_tokens - s.cached_tokens) * min(1.0, (s.done_s - t) / max(s.prefill_s, 1e-9))
               for s in served if s.worker == worker and s.arrival_s < t < s.done_s and s is not at)


RECENT_S = 2.0  # a router poll waits for the worker's current step: seconds, for a long prompt on a busy core


def explain_misses(served: Sequence[Served], num_blocks: int, block_size: int = KV_BLOCK) -> list[dict]:
    """Where each request's hit falls short of the oracle's, in tokens. The run is replayed against simulated
    caches, one per prefill worker (num_blocks each), fed the prompts each computed as they finished; then,
    per request in arrival order:
      in_flight  the oracle's prefix was still being computed when it arrived: no cache could hold it yet
      evicted    computed, but evicted from every worker's cache
      elsewhere  cached, but only on a prefill worker the request was not sent to; `why`: "load" when the
                 holder's backlog exceeded the other's by at least the tokens the hit would save (a router
                 minimising the time to compute it sends it away, per-token costs equal); else "recent" when
                 the prefix was stored under RECENT_S before (the router may not have polled it yet); else
                 "estimates" (the router's per-worker costs or load differed from the truth)
      other      what the chosen worker should have held but did not report (negative: it held more,
                 e.g. the prefix finished between routing and the prefill's start)
    oracle (in frontend arrival order) - hit = the four summed."""
    arrived, finished = PrefixCache(block_size, None), PrefixCache(block_size, None)
    caches = {s.worker: PrefixCache(block_size, num_blocks) for s in served}
    stored_at: dict[tuple[str, int], float] = {}  # (worker, block hash) -> when a prefill there last stored it
    completions = sorted(served, key=lambda s: s.done_s)
    rows, j = [], 0
    for s in sorted(served, key=lambda s: s.arrival_s):
        while j < len(completions) and completions[j].done_s <= s.arrival_s:
            c = completions[j]
            finished.insert(c.prompt)
            caches[c.worker].insert(c.prompt)
            stored_at.update(((c.worker, h), c.done_s) for h in c.prompt.hashes)
            j += 1
        oracle, done = arrived.hit(s.prompt), finished.hit(s.prompt)
        holder = max(caches, key=lambda w: caches[w].hit(s.prompt))
        best, mine = caches[holder].hit(s.prompt), caches[s.worker].hit(s.prompt)
        row = {"tokens": s.prompt.num_tokens, "hit": s.cached_tokens, "oracle": oracle, "in_flight": oracle - done,
               "evicted": done - best, "elsewhere": best - mine, "other": mine - s.cached_tokens}
        if best > mine:
            row["holder_backlog"] = backlog(served, holder, s)
            row["chosen_backlog"] = backlog(served, s.worker, s)
            row["prefix_age_s"] = s.arrival_s - stored_at[holder, s.prompt.hashes[best // block_size - 1]]
            by_load = row["holder_backlog"] - row["chosen_backlog"] >= best - mine
            row["why"] = "load" if by_load else "recent" if row["prefix_age_s"] < RECENT_S else "estimates"
        rows.append(row)
        arrived.insert(s.prompt)
    return rows


def shortfall(rows: Sequence[dict]) -> dict[str, float]:
    """The misses summed, as fractions of all prompt tokens (the hit rate's unit)."""
    total = sum(r["tokens"] for r in rows)
    out = {k: sum(r[k] for r in rows) / total for k in ("in_flight", "evicted", "elsewhere", "other")}
    for why in ("load", "recent", "estimates"):
        out[f"elsewhere_{why}"] = sum(r["elsewhere"] for r in rows if r.get("why") == why) / total
    away = [r["prefix_age_s"] for r in rows if r["elsewhere"] > 0]
    out["elsewhere_requests"] = len(away)
    out["elsewhere_prefix_age_s_median"] = float(np.median(away)) if away else None
    return out


class WorkerProbe(Poller):
    """Reads each prefill worker's state the way the router's feed does, every `interval_s` while a replay
    runs: how long a read waits (it is answered between engine steps, so the router's index and loads are
    at least that stale) and the step counters the router turns into its per-token prefill cost."""

    def __init__(self, urls: Sequence[str], interval_s: float = 0.5) -> None:
        super().__init__(interval_s)
        self.samples: dict[str, list[tuple[float, float, int, float, int]]] = {u: [] for u in urls}

    def poll(self, client: httpx.Client) -> None:
        for url, out in self.samples.items():
            t0 = time.monotonic()
            try:  # no events wanted: `after` beyond any sequence number
                state = client.get(url + "/internal/state", params={"after": 2**62}).json()
            except (httpx.HTTPError, ValueError):
                continue
            c = state["counters"]
            out.append((t0, time.monotonic() - t0, c["prefill_tokens"], c["prefill_s"], c["prefill_steps"]))


def router_view(samples: dict[str, list[tuple[float, float, int, float, int]]], names: dict[str, str],
                prior_s_per_token: float, ref_tokens: int) -> dict:
    """The probe's readings, turned into what the router saw: read latency per worker, and each worker's
    prefill cost (fixed per step + marginal per token) as the router's own CostModel fits it from the
    counters' deltas; the ratio compares the two workers' estimates for a `ref_tokens`-token prefill."""
    costs = CostModel(kv_bytes_per_token=1, num_layers=1, link_bytes_per_s=1.0, prefill_s_per_token=prior_s_per_token,
                      decode_step_s=1.0)
    deltas = sorted((b[0], names.get(url, url), b[2] - a[2], b[3] - a[3], b[4] - a[4])
                    for url, s in samples.items() for a, b in zip(s, s[1:]))
    workers = sorted({names.get(url, url) for url in samples})
    ratios = []
    for _, worker, tokens, seconds, steps in deltas:
        costs.observe_prefill(worker, tokens, seconds, steps)
        if len(workers) == 2 and tokens > 0:
            ratios.append(costs.prefill_s(workers[1], ref_tokens) / costs.prefill_s(workers[0], ref_tokens))
    latency = {names.get(url, url): [b[1] for b in s] for url, s in samples.items()}
    return {
        "read_latency_s": {w: {"p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)),
                               "max": float(max(v))} for w, v in latency.items() if v},
        "per_token_ms_at_end": {w: 1000 * costs.per_token_s(w) for w in workers},
        "fixed_ms_at_end": {w: 1000 * costs.prefill_fit(w)[0] for w in workers},
        # Over the run, after each measurement: how much dearer the second worker looked than the first.
        "cost_ratio_p1_p0": {q: float(np.percentile(ratios, int(q[1:]))) for q in ("p10", "p50", "p90")}
        if ratios else None,
    }


TRANSFER_DEADLINE_S = 300.0
STARTUP_TIMEOUT_S = 1200.0  # three workers importing torch took over 300 s at load average 35 on 2 cores


def serve_argv(policy: str, port: int, num_blocks: int, model: str | None = None) -> list[str]:
    # The default 10 s transfer deadline assumes cores of one's own: on this shared machine a prefill can
    # wait longer, and an expired reservation recomputes the prompt on the decode worker (out of the
    # policy's hands, and more load on a busy machine): the deadline is raised rather than measured.
    return ["serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--prefill", "2",
            "--decode", "1", "--router-policy", policy, "--no-conditional", "--num-blocks", str(num_blocks),
            "--transfer-deadline", str(TRANSFER_DEADLINE_S), "--startup-timeout", str(STARTUP_TIMEOUT_S),
            *(["--model", model] if model else [])]


def tiny_checkpoint(path: Path) -> Path:
    """The tests' tiny random Llama (tests/tiny_models.py), made once: the fast model speed (~10k prompt
    tokens/s here, against SmolLM2-135M's ~1k), the case of issue 18."""
    if not (path / "config.json").exists():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.tiny_models import make_tiny_checkpoint

        make_tiny_checkpoint(path)
        config = json.loads((path / "config.json").read_text())
        config["max_position_embeddings"] = TINY_CONTEXT
        (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def outcome(phases: Sequence[dict], prompts: Sequence[Prompt], openers: set[int], num_blocks: int) -> dict:
    """The policy's prefix hit rate and where its prefill work went (`openers`: the requests that open a
    conversation), from the frontend's phase records."""
    prefilled = [r for r in phases if r["prefill_worker"] is not None and r["prefill_s"] is not None]
    names = {url: f"p{i}" for i, url in enumerate(sorted({r["prefill_worker"] for r in prefilled}))}
    index = match_records(prefilled, [p.num_tokens for p in prompts])
    served = [Served(r["arrival"], r["arrival"] + r["ttft_s"], r["prefill_s"], names[r["prefill_worker"]],
                     r["cached_tokens"], prompts[i])
              for r, i in zip(prefilled, index) if i is not None and r["ttft_s"] is not None]
    misses = explain_misses(served, num_blocks)
    tokens = sum(r["prompt_tokens"] for r in prefilled)
    per_worker = {n: {"requests": sum(names[r["prefill_worker"]] == n for r in prefilled),
                      "computed_tokens": sum(r["prompt_tokens"] - r["cached_tokens"] for r in prefilled
                                             if names[r["prefill_worker"]] == n),
                      "conversations_opened": sum(names[r["prefill_worker"]] == n and i in openers
                                                  for r, i in zip(prefilled, index))}
                  for n in names.values()}
    return {
        "hit_rate": sum(r["cached_tokens"] for r in prefilled) / tokens if tokens else None,
        "prefilled_requests": len(prefilled),
        "phase_records": len(phases),
        "paths": dict(Counter(r["path"] for r in phases)),
        "per_prefill_worker": per_worker,
        # What the decode worker already held (KV not sent): not prefill work saved, so not in the hit rate.
        "decode_cached_share": sum(r["decode_cached_tokens"] for r in prefilled) / tokens if tokens else None,
        "shortfall": shortfall(misses) if misses else None,
        "shortfall_requests_matched": len(served),
        "misses": misses,  # per request; written to its own file, not router.json
    }


REPLAY_RETRIES = 20


def replay_policy(
    policy: str, scaling: Scaling, args: argparse.Namespace, drain_s: float
) -> tuple[BenchResult, list[dict], dict[str, list]]:
    """A fresh deployment under `policy`, the replay, the frontend's phase records of it and the probe's
    readings of the prefill workers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = Service(f"serve-{policy}", serve_argv(policy, port, args.num_blocks, args.model_path), None,
                     args.case_dir / "logs")
    try:
        server.wait_healthy(url, timeout_s=STARTUP_TIMEOUT_S)
        with credentials().client(timeout=30.0) as operator:
            workers = operator.get(url + "/debug/workers").json()
        # No warm-up request: the phase log must hold exactly the replay, and every policy starts equally cold.
        with WorkerProbe([w["url"] for w in workers if w["role"] == "prefill"]) as probe:
            result = run_bench(BenchConfig(
                load=TraceLoad(str(args.case_dir / REPLAY_TRACE_NAME), "mooncake", scaling), url=url,
                salt=PROMPT_SALT, timeout_s=args.replay_timeout, deadline_s=drain_s, out_dir=args.case_dir / policy,
                # A refused request comes back after its Retry-After, as an OpenAI client's would: the hit rate
                # is of every prompt, not of those the frontend's admission let in at once.
                retries=REPLAY_RETRIES,
                tokenizer=args.model_path))
        with credentials().client(timeout=30.0) as operator:
            r = operator.get(url + "/debug/requests", params={"limit": PHASE_LOG})
        r.raise_for_status()
        phases = r.json()
    finally:
        server.stop()
    (args.case_dir / policy / "phases.json").write_text(json.dumps(phases))
    (args.case_dir / policy / "probe.json").write_text(json.dumps(probe.samples))
    return result, phases, probe.samples


def replay_workload(args: argparse.Namespace) -> tuple[Scaling, Workload, Trace]:
    """The request list every policy gets: sampled conversations, lengths x1/32, arrivals at the asked rate."""
    trace = sample_conversations(read_trace(args.trace, "mooncake"), args.conversations, args.replay_seed)
    trace = read_trace(write_mooncake(trace, args.case_dir / REPLAY_TRACE_NAME), "mooncake")  # what bench reads
    base = Scaling(length_scale=LENGTH_SCALE, max_requests=args.replay_requests)
    workload = at_rate(trace, base, args.replay_rate)
    scaling = replace(base, time_scale=float(workload.params["time_scale"]))
    if len(workload.requests) > PHASE_LOG:
        raise ValueError(f"{len(workload.requests)} requests: the frontend keeps only {PHASE_LOG} phase records")
    return scaling, workload, trace


def run_policy(policy: str, scaling: Scaling, workload: Workload, prompts: Sequence[Prompt], vocab: Vocab,
               args: argparse.Namespace) -> dict:
    started, load_before = time.monotonic(), os.getloadavg()[0]
    result, phases, probed = replay_policy(policy, scaling, args, workload.duration_s + args.replay_drain)
    if result.vocab != vocab or result.salt != PROMPT_SALT or result.runs[0].workload.requests != workload.requests:
        raise RuntimeError("bench replayed other prompts than the oracle was computed on")
    found = outcome(phases, prompts, first_turns(workload), args.num_blocks)
    names = {url: f"p{i}" for i, url in enumerate(sorted(probed))}  # as in `outcome`: sorted URLs
    mean_prompt = round(sum(p.num_tokens for p in prompts) / len(prompts))
    found["router_view"] = router_view(probed, names, 1.0 / PoolConfig().prefill_tokens_per_s, mean_prompt)
    (args.case_dir / policy / "misses.json").write_text(json.dumps(found.pop("misses")))
    s = result.summary
    return {
        **found,
        "ttft_s": {"p50": s.ttft.p50, "p90": s.ttft.p90, "p99": s.ttft.p99, "mean": s.ttft.mean},
        "requests_ok": s.num_ok,
        "errors": s.errors,
        # The OpenAI usage field: the frontend reports the larger of the prefill and the decode worker's count.
        "usage_cached_share": s.cache_hit_rate,
        "wall_s": time.monotonic() - started,
        # The machine is shared: other work running beside the replay shows here (2 cores).
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


MODELS = ("tiny", "smollm2")


def replay(args: argparse.Namespace) -> dict:
    """Every case: each model speed on each conversation sample (two disjoint slices of the trace)."""
    cases: dict[str, dict] = {}
    for model in args.models:
        for seed in args.replay_seeds:
            name = f"{model}/sample{seed}"
            case_args = argparse.Namespace(**vars(args))
            case_args.case_dir = REPLAY_DIR / model / f"sample{seed}"
            case_args.replay_seed = seed
            case_args.model_path = str(tiny_checkpoint(REPLAY_DIR / "tiny-llama")) if model == "tiny" else None
            print(f"== replay case {name}", file=sys.stderr)
            cases[name] = replay_case(case_args)
    return merge_cases({}, cases)


def merge_cases(previous: dict[str, dict], cases: dict[str, dict]) -> dict:
    """The replay section: `previous` cases (from router.json) with `cases` run now replacing theirs."""
    cases = {**previous, **cases}
    ratios = {n: c["summary"]["hit_rate_vs_oracle"] for n, c in cases.items()}
    return {
        "cases": cases,
        "summary": {
            "hit_rate_vs_oracle_by_case": ratios,
            "hit_rate_vs_oracle_min": min((r for r in ratios.values() if r is not None), default=None),
            "hit_rate_vs_oracle_target": 0.9,
            "kv_aware_not_below_round_robin": all(
                (c["summary"]["hit_rate"].get("kv_aware") or 0) >= (c["summary"]["hit_rate"].get("round_robin") or 0)
                for c in cases.values()),
            "prefill_requests_by_case": {n: {p: {w: v["requests"] for w, v in pol["per_prefill_worker"].items()}
                                             for p, pol in c["policies"].items()} for n, c in cases.items()},
        },
    }


def replay_case(args: argparse.Namespace) -> dict:
    scaling, workload, trace = replay_workload(args)
    vocab = find_vocab(args.model_path or BUNDLED_NAME, None)
    builder = PromptBuilder(vocab, PROMPT_SALT)  # bench's own prompts: run_bench's first run uses salt + 0
    prompts = [prompt_of(builder.build(i, spec)) for i, spec in enumerate(workload.requests)]
    oracle = hit_rate(prompts)
    pooled = hit_rate(prompts, 2 * args.num_blocks)
    affinity = affinity_hit_rate(workload, prompts, args.num_blocks)
    lengths = [p.num_tokens for p in prompts]
    print(f"replay: {len(prompts)} requests over {workload.duration_s:.0f} s ({workload.mean_rate:.2f} req/s), "
          f"prompt tokens mean {np.mean(lengths):.0f} max {max(lengths)}; oracle hit rate {oracle:.3f}; "
          f"{args.num_blocks} KV blocks per worker: conversation affinity {affinity:.3f}, one pooled LRU "
          f"{pooled:.3f}", file=sys.stderr)
    for note in workload.notes:
        print(f"  workload: {note}", file=sys.stderr)

    policies = {}
    for policy in args.policies:
        policies[policy] = run_policy(policy, scaling, workload, prompts, vocab, args)
        p, t = policies[policy], policies[policy]["ttft_s"]
        print(f"[{policy}] hit rate {_f(p['hit_rate'])} over {p['prefilled_requests']}/{len(prompts)} prefilled "
              f"(oracle {oracle:.3f}), TTFT p50 {_f(t['p50'])} s p90 {_f(t['p90'])} s, errors {p['errors']}, "
              f"load average {p['load_average']}, shortfall {p['shortfall']}", file=sys.stderr)
        print(f"[{policy}] requests per prefill worker: "
              f"{ {w: v['requests'] for w, v in p['per_prefill_worker'].items()} }", file=sys.stderr)

    kv = policies.get("kv_aware", {}).get("hit_rate")
    # Over the prompts prefilled only: with some failed, the rest's hit rate is not the oracle's (over every
    # prompt) to compare with (a run whose longest prompts failed once gave 1.49 "of the oracle").
    complete = policies.get("kv_aware", {}).get("prefilled_requests") == len(prompts)
    summary = {
        "hit_rate_vs_oracle": kv / oracle if kv is not None and oracle > 0 and complete else None,
        "kv_aware_complete": complete,
        "hit_rate_vs_oracle_target": 0.9,
        "oracle_hit_rate": oracle,
        "hit_rate": {p: v["hit_rate"] for p, v in policies.items()},
        "ttft_p50_s": {p: v["ttft_s"]["p50"] for p, v in policies.items()},
        "ttft_p90_s": {p: v["ttft_s"]["p90"] for p, v in policies.items()},
    }
    return {
        "deployment": {
            "serve_argv": serve_argv("<policy>", 0, args.num_blocks, args.model_path),  # port 0: a free one
            "model": args.model_path or BUNDLED_NAME,
            "kv_blocks_per_worker": args.num_blocks,
            "kv_block_tokens": KV_BLOCK,
            "cpus": os.cpu_count(),
        },
        "workload": {
            "trace": str(args.trace),
            "conversations_kept": {"fraction": args.conversations, "seed": args.replay_seed, "rows": len(trace.rows)},
            "replayed_trace": str(args.case_dir / REPLAY_TRACE_NAME),
            "notes": list(workload.notes),
            "params": workload.params,
            "requests": len(prompts),
            "duration_s": workload.duration_s,
            "mean_rate_req_s": workload.mean_rate,
            "prompt_tokens": {"total": sum(lengths), "mean": float(np.mean(lengths)), "max": max(lengths)},
            "distinct_kv_blocks": len({h for p in prompts for h in p.hashes}),
            "prompt_salt": PROMPT_SALT,
        },
        "oracle_hit_rate": oracle,
        # One LRU cache with both prefill workers' blocks, requests one at a time: what this much memory allows.
        "pooled_lru_hit_rate": pooled,
        "conversation_affinity_hit_rate": affinity,
        "policies": policies,
        "summary": summary,
    }


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


# ---------------------------------------------------------------------------------------------- plot


def save_decision_samples(samples: dict[str, list[int]], lengths: list[int]) -> None:
    """Kept for the plot, which a later run of another section redraws."""
    DECISION_SAMPLES.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(DECISION_SAMPLES, lengths=np.asarray(lengths), **{k: np.asarray(v) for k, v in samples.items()})


def plot(results: dict, path: Path) -> None:
    """Decision latency (from the saved samples) and the replay (from its results), whichever exist."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    if DECISION_SAMPLES.exists():
        with np.load(DECISION_SAMPLES) as z:
            plot_decision({k: z[k] for k in z.files if k != "lengths"}, z["lengths"], axes[0])
    else:
        for ax in axes[0]:
            ax.set_axis_off()
    cases = results.get("replay", {}).get("cases", {})
    if cases:  # the first case (the tiny model, first sample): the others are in router.json
        plot_replay(next(iter(cases.values())), axes[1])
    else:
        for ax in axes[1]:
            ax.set_axis_off()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_decision(samples: dict[str, np.ndarray], lengths: np.ndarray, axes: Sequence) -> None:
    cdf, scatter = axes
    for name in ("kv_aware_with_hashing", "kv_aware_without_hashing", "hashing_only", "least_loaded_without_hashing"):
        ms = np.sort(np.asarray(samples[name]) / 1e6)
        cdf.plot(ms, np.arange(1, len(ms) + 1) / len(ms), label=name.replace("_", " "))
    cdf.axvline(1.0, color="grey", linestyle=":", label="target p99 (1 ms)")
    cdf.set(xscale="log", xlabel="ms per request", ylabel="fraction of requests", title="Routing decision latency")
    cdf.legend(fontsize=8)
    for name, marker in (("kv_aware_with_hashing", "."), ("hashing_only", "x")):
        scatter.scatter(lengths, np.asarray(samples[name]) / 1e6, s=6, marker=marker, alpha=0.5,
                        label=name.replace("_", " "))
    scatter.set(xlabel="prompt tokens", ylabel="ms", title="Latency against prompt length")
    scatter.legend(fontsize=8)


def plot_replay(doc: dict, axes: Sequence) -> None:
    hits, ttft = axes
    names = list(doc["policies"])
    oracle = doc["oracle_hit_rate"]
    values = [doc["policies"][p]["hit_rate"] or 0.0 for p in names]
    hits.bar(names, values, color="tab:blue")
    for x, v in enumerate(values):
        hits.text(x, v, f"{v:.3f}\n({v / oracle:.2f} of oracle)" if oracle else f"{v:.3f}", ha="center", va="bottom",
                  fontsize=8)
    hits.axhline(oracle, color="black", linestyle="--", label=f"infinite-cache oracle {oracle:.3f}")
    hits.axhline(0.9 * oracle, color="grey", linestyle=":", label="0.9 x oracle (kv_aware target)")
    hits.axhline(doc["conversation_affinity_hit_rate"], color="tab:orange", linestyle="-.",
                 label=f"conversations pinned to a worker (eviction only) {doc['conversation_affinity_hit_rate']:.3f}")
    w = doc["workload"]
    hits.set(ylabel="prefill prefix hit rate (tokens)", ylim=(0, max([oracle, *values]) * 1.35),
             title=f"Mooncake replay: {w['requests']} requests, {w['mean_rate_req_s']:.2f} req/s, 2P1D")
    hits.legend(fontsize=8, loc="upper left")
    x = np.arange(len(names))
    for offset, q in ((-0.2, "p50"), (0.2, "p90")):
        ttft.bar(x + offset, [doc["policies"][p]["ttft_s"][q] or 0.0 for p in names], width=0.4, label=f"TTFT {q}")
    # The machine is shared: what else ran during each replay (load average before -> after, 2 cores).
    labels = [f"{p}\nload {doc['policies'][p]['load_average'][0]:.1f} -> {doc['policies'][p]['load_average'][1]:.1f}"
              for p in names]
    ttft.set(xticks=x, xticklabels=labels, ylabel="seconds", title="Time to first token (client side)")
    ttft.legend(fontsize=8)

SECTIONS: dict[str, Callable[[argparse.Namespace], dict]] = {"decision": decision, "replay": replay}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sections", "--section", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    ap.add_argument("--quick", action="store_true", help="a smoke test: fewer repetitions and requests")
    g = ap.add_argument_group("decision")
    g.add_argument("--reps", type=int, default=5)
    g.add_argument("--requests", type=int, default=2000)
    g.add_argument("--index-blocks", type=int, default=100_000)
    g = ap.add_argument_group("replay")
    g.add_argument("--trace", type=Path, default=TRACE)
    g.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    g.add_argument("--conversations", type=float, default=0.05, help="fraction of the trace's conversations kept")
    g.add_argument("--replay-seeds", type=int, nargs="+", default=[0, 1],
                   help="which conversations are kept: one disjoint-ish sample per seed, a case each")
    g.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                   help="tiny: the tests' tiny random Llama (fast); smollm2: the bundled SmolLM2-135M")
    g.add_argument("--replay-requests", type=int, default=100, help="keep the first N sampled requests")
    g.add_argument("--replay-rate", type=float, default=0.6, help="mean req/s the arrivals are scaled to")
    g.add_argument("--num-blocks", type=int, default=512, help="KV blocks per worker (16 tokens each)")
    g.add_argument("--replay-timeout", type=float, default=120.0, help="seconds per request")
    g.add_argument("--replay-drain", type=float, default=120.0, help="seconds a replay may run past its last arrival")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.requests = 1, 500
        args.replay_requests = min(args.replay_requests, 40)

    path = RESULTS / "router.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for name in args.sections:
        previous = results.get(name, {})
        results[name] = SECTIONS[name](args)
        if name == "replay":  # cases run separately (one model at a time on a busy machine) add up
            results[name] = merge_cases(previous.get("cases", {}), results[name]["cases"])
        for what, stats in results[name].get("latency", {}).items():
            print(f"{name:>10} {what:<32} p50 {stats['p50_ms']['median']:.3f} ms  "
                  f"p99 {stats['p99_ms']['median']:.3f} ms (reps {stats['p99_ms']['min']:.3f}-{stats['p99_ms']['max']:.3f})")
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, RESULTS / "router.png")
    # Every section's summary, run now or before: the decision latency and the replay side by side.
    summary = {}
    for name in SECTIONS:
        summary.update(results.get(name, {}).get("summary", {}))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
