"""Router: picks each request's decode worker and prefill worker (or prefill on the decode worker); in a
colocated pool (workers that prefill and decode their own requests), the one worker.

Pure: the runtime and the simulator feed it registrations, load reports, KV events and measurements, and
ask `route`. It never returns a worker that is not registered (or is draining), and says `NoWorker` when a
pool it needs is empty.

Policies, comparable on one load (`conditional` disaggregation works with any of them); a colocated
worker is picked as a decode worker is:
  round_robin   each pool in turn
  least_loaded  decode: fewest running requests, then most free blocks; prefill: fewest queued prompt tokens
  kv_aware      decode: overlap_weight x prompt blocks it lacks + blocks in use (fewest running, then the
                least cache pressure break ties), among workers with room for the prompt; prefill: estimated
                seconds, overlap_weight x the prefill of the tokens it lacks + its queued prompt tokens.
                Alike workers (a pool's workers with the same KV capacity) share one pool-wide speed fit
                (`CostModel.set_alike`), so among them this is a cost in work units, tokens to compute plus
                queued tokens, with no per-worker speed guess to be wrong about. Workers that match as many
                blocks and cost within `cost_tolerance` of the cheapest are a tie, won by the one under the
                least cache pressure: a strict minimum would send every new conversation to the one that
                looked cheaper, filling its cache (evicting its prefixes) while the other's sits unused.
Ties rotate, so idle workers share the load.

Cache pressure: the KV blocks a worker was sent to compute or receive lately, over its capacity. It decays
by the blocks its pool took in since, relative to the pool's capacity (scale-free: a cache is turned over
after about its own size in new blocks, whatever the request rate). Placing new prefix trees by it spreads
the trees' blocks evenly, so no worker's cache is evicted while another's sits idle; counting prefixes
cached (`num_cached`) would not, as every cache is full in steady state.

A request whose prefix (k blocks) only one alike prefill worker caches goes there unless that worker's
queued prompt tokens exceed the least queued other's by more than overlap_weight x k x block_size: the
tokens it saves (tests/core/test_router_properties.py checks this bound).

Loads are the workers' last reports plus what the router itself routed since (a burst between two reports
must not all land on the one worker that looked idle); a report replaces them. Queued prompt tokens drain
at the worker's measured prefill speed between reports, or a burst would look like a queue that never
empties and push every later prompt to local prefill.

Cached counts mirror what a worker's scheduler will reuse: leading whole blocks, at least one prompt token
left to compute (`KVCacheManager.prefix_hit`). Blocks the decode worker already holds are neither reserved
nor sent again; the decision's `decode_cached_blocks` sizes the transfer (the reservation's ticket is the
authority: the index lags the worker by the events in flight).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Literal, Sequence, TypeVar

from splitserve.core.blocks import KVEvent, hash_blocks
from splitserve.core.costs import CostModel, Decision
from splitserve.core.prefix_index import Generation, PrefixIndex

WorkerId = Hashable
Role = Literal["prefill", "decode", "colocated"]
ROLES: tuple[Role, ...] = ("prefill", "decode", "colocated")
Policy = Literal["round_robin", "least_loaded", "kv_aware"]
POLICIES: tuple[Policy, ...] = ("round_robin", "least_loaded", "kv_aware")
T = TypeVar("T")


class NoWorker(RuntimeError):
    """The pool a request needs has no registered, non-draining worker (HTTP 503)."""


@dataclass
class WorkerState:
    role: Role
    total_blocks: int
    free_blocks: int
    running: int = 0  # unfinished requests there (`router_feed.running`)
    queued_prefill_tokens: float = 0.0  # prompt tokens waiting to be computed there, as of `queue_as_of`
    queue_as_of: float = 0.0
    draining: bool = False  # finishes its requests, takes no new ones


@dataclass(frozen=True)
class RouteDecision:
    decode: WorkerId
    prefill: WorkerId | None  # None: prefill on the decode worker
    num_blocks: int  # the prompt's blocks, the last one possibly partial
    decode_cached_blocks: int  # leading blocks the decode worker holds: not reserved anew, not sent
    prefill_cached_blocks: int  # leading blocks the prefill worker holds: not recomputed (0 when local)
    decision: Decision | None  # the cost model's comparison; None without conditional disaggregation


class Router:
    def __init__(
        self, policy: Policy, block_size: int, cost_model: CostModel, overlap_weight: float = 1.0,
        conditional: bool = True, cost_tolerance: float = 0.2,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; choose one of {', '.join(POLICIES)}")
        if cost_tolerance < 0:
            raise ValueError(f"cost_tolerance must be >= 0, got {cost_tolerance}")
        self.policy = policy
        self.block_size = block_size
        self.costs = cost_model
        self.overlap_weight = overlap_weight
        self.conditional = conditional
        self.cost_tolerance = cost_tolerance
        self.index = PrefixIndex()
        self.workers: dict[WorkerId, WorkerState] = {}
        self._turn = {"decode": itertools.count(), "prefill": itertools.count()}  # per pool: rotations
        self._pressure: dict[WorkerId, float] = {}  # blocks sent lately (decayed), see the module's doc

    # ------------------------------------------------------------------------------ membership

    def register(
        self, worker_id: WorkerId, role: Role, generation: Generation, total_blocks: int,
        chunk_while_decoding: int | None = None,
    ) -> None:
        """A worker joins, or re-registers (after a restart: a new generation drops its index entries and
        measurements). Its cache is unknown until its first events or a `resync`: a router that restarted
        registers every worker and resyncs each from its snapshot. A late registration of an older
        generation than the router has seen is ignored. `chunk_while_decoding`: the prompt tokens it
        computes in a step that decodes (a decode worker's cap; None: no cap)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        if not self._follow(worker_id, generation):
            return
        self.workers[worker_id] = WorkerState(role, total_blocks, total_blocks)
        self.costs.join_pool(worker_id, role, chunk_while_decoding)
        self._pressure[worker_id] = 0.0
        self._judge_alike(role)

    def deregister(self, worker_id: WorkerId) -> None:
        w = self.workers.pop(worker_id, None)
        self.index.remove(worker_id)
        self.costs.forget(worker_id)
        self._pressure.pop(worker_id, None)
        if w is not None:
            self._judge_alike(w.role)

    def _judge_alike(self, role: Role) -> None:
        """A pool's workers are alike when they hold as many KV blocks: the same model on the same
        accelerator (a different GPU or TP size changes the capacity). Alike workers share one speed fit."""
        sizes = {w.total_blocks for w in self.workers.values() if w.role == role}
        self.costs.set_alike(role, len(sizes) <= 1)

    def drain(self, worker_id: WorkerId) -> None:
        """Route nothing new to the worker; its index entries and load stay until `deregister`."""
        w = self.workers.get(worker_id)
        if w is not None:
            w.draining = True

    # ------------------------------------------------------------------------------ what workers report

    def update_load(
        self, worker_id: WorkerId, *, free_blocks: int, running: int, queued_prefill_tokens: int, now: float
    ) -> None:
        w = self.workers.get(worker_id)
        if w is not None:
            w.free_blocks, w.running = free_blocks, running
            w.queued_prefill_tokens, w.queue_as_of = queued_prefill_tokens, now

    def on_events(
        self, worker_id: WorkerId, generation: Generation, events: Iterable[KVEvent], last_seq: int | None = None
    ) -> bool:
        """False: fetch the worker's snapshot and `resync`. Events of unregistered workers are dropped; a
        newer generation (a restart the router learns of from the worker's own messages) is followed."""
        if worker_id not in self.workers:
            return True
        self._follow(worker_id, generation)
        return self.index.apply(worker_id, generation, events, last_seq)

    def resync(self, worker_id: WorkerId, generation: Generation, seq: int, hashes: Iterable[int]) -> None:
        if worker_id in self.workers:
            self._follow(worker_id, generation)
            self.index.resync(worker_id, generation, seq, hashes)

    def _follow(self, worker_id: WorkerId, generation: Generation) -> bool:
        """Track the worker's generation; a new one's measurements start afresh. False if it is older."""
        known = self.index.position(worker_id)
        if not self.index.track(worker_id, generation):
            return False
        if known is None or known[0] != generation:
            self.costs.forget(worker_id)
        return True

    def observe_prefill(
        self, worker_id: WorkerId, tokens: int, seconds: float, steps: int = 1, now: float | None = None
    ) -> None:
        self.costs.observe_prefill(worker_id, tokens, seconds, steps, now)

    def observe_decode_step(self, worker_id: WorkerId, seconds: float) -> None:
        self.costs.observe_decode_step(worker_id, seconds)

    def observe_transfer(self, nbytes: float, seconds: float) -> None:
        self.costs.observe_transfer(nbytes, seconds)

    # ------------------------------------------------------------------------------ routing

    def route_tokens(self, token_ids: Sequence[int], now: float, *, whole: bool = False) -> RouteDecision:
        return self.route(len(token_ids), hash_blocks(token_ids, self.block_size), now, whole=whole)

    def route(self, num_tokens: int, block_hashes: Sequence[int], now: float, *, whole: bool = False) -> RouteDecision:
        """Place a prompt of `num_tokens` tokens whose full blocks hash to `block_hashes`. With no prefill
        worker, conditional disaggregation prefills on the decode worker; without it, that is `NoWorker`.
        A colocated pool, when it has workers, takes every request: the decision names its worker as the
        decode worker, and no prefill worker. `whole`: the request is computed whole where it decodes (a
        recompute after a failed split), so no prefill worker is chosen. A pool left empty (its workers
        dead or draining) degrades the deployment instead of failing it: with no prefill worker the decode
        worker prefills, with no decode worker a prefill worker computes the request whole."""
        colocated = self._pool("colocated")
        decoders = colocated or self._pool("decode")
        if not decoders:
            # Degraded: no decode worker left, so a prefill worker computes the request whole.
            decoders, whole = self._pool("prefill"), True
        if not decoders:
            raise NoWorker("no colocated, decode or prefill worker registered (or all are draining)")
        # Degraded without prefill workers: the decode worker prefills, conditional placement or not.
        prefillers = [] if colocated or whole else self._pool("prefill")
        bs = self.block_size
        num_blocks = -(-num_tokens // bs)
        # A worker reuses whole blocks and always computes at least the last prompt token.
        reusable = block_hashes[: max(0, num_tokens - 1) // bs]
        cached = self.index.match(reusable, decoders + prefillers)
        queued = {i: self._queued(i, now) for i in decoders + prefillers}

        d = self._pick_decode(decoders, cached, num_blocks)
        p = self._pick_prefill(prefillers, cached, queued, num_tokens, now) if prefillers else None
        decision = None
        if self.conditional and not colocated:
            decision = self.costs.decide(
                prompt_tokens=num_tokens, decode_worker=d, decode_cached_tokens=cached[d] * bs,
                decode_queued_tokens=queued[d], decode_running=self.workers[d].running,
                prefill_worker=p, prefill_cached_tokens=cached.get(p, 0) * bs, prefill_queued_tokens=queued.get(p, 0),
                now=now,
            )
            if not decision.remote:
                p = None

        dw = self.workers[d]
        dw.running += 1
        dw.free_blocks -= num_blocks - cached[d]
        computer = d if p is None else p
        cw = self.workers[computer]
        cw.queued_prefill_tokens = queued[computer] + num_tokens - cached[computer] * bs
        cw.queue_as_of = now
        self._press(d, num_blocks - cached[d])
        if p is not None:
            self._press(p, num_blocks - cached[p])
        return RouteDecision(d, p, num_blocks, cached[d], cached.get(p, 0), decision)

    def pressure(self, worker_id: WorkerId) -> float:
        """The worker's cache pressure: blocks sent to it lately (decayed) over its capacity."""
        return self._pressure.get(worker_id, 0.0) / max(1, self.workers[worker_id].total_blocks)

    def _press(self, worker_id: WorkerId, blocks: int) -> None:
        """`worker_id` takes `blocks` new blocks into its cache: its pool's older pressure decays by them."""
        if blocks <= 0:
            return
        role = self.workers[worker_id].role
        pool = [i for i, w in self.workers.items() if w.role == role]
        keep = math.exp(-blocks / max(1, sum(self.workers[i].total_blocks for i in pool)))
        for i in pool:
            self._pressure[i] *= keep
        self._pressure[worker_id] += blocks

    def _queued(self, worker_id: WorkerId, now: float) -> float:
        w = self.workers[worker_id]
        drained = max(0.0, now - w.queue_as_of) / self.costs.per_token_s(worker_id, now)
        return max(0.0, w.queued_prefill_tokens - drained)

    def _pool(self, role: Role) -> list[WorkerId]:
        return [i for i, w in self.workers.items() if w.role == role and not w.draining]

    def _pick_decode(self, ids: list[WorkerId], cached: dict[WorkerId, int], num_blocks: int) -> WorkerId:
        ws = self.workers
        if self.policy == "round_robin":
            return ids[next(self._turn["decode"]) % len(ids)]
        if self.policy == "least_loaded":
            return self._min("decode", ids, lambda i: (ws[i].running, -ws[i].free_blocks))
        # Never prefill what cannot be decoded: prefer workers with room; if none has, the reservation waits.
        roomy = [i for i in ids if num_blocks - cached[i] <= ws[i].free_blocks] or ids
        return self._min("decode", roomy, lambda i: (
            self.overlap_weight * (num_blocks - cached[i]) + ws[i].total_blocks - ws[i].free_blocks, ws[i].running,
            self.pressure(i),
        ))

    def _pick_prefill(
        self, ids: list[WorkerId], cached: dict[WorkerId, int], queued: dict[WorkerId, float], num_tokens: int,
        now: float,
    ) -> WorkerId:
        if self.policy == "round_robin":
            return ids[next(self._turn["prefill"]) % len(ids)]
        if self.policy == "least_loaded":
            return self._min("prefill", ids, lambda i: queued[i])
        bs, c = self.block_size, self.costs
        cost = {i: self.overlap_weight * c.prefill_s(i, num_tokens - cached[i] * bs, now)
                + c.per_token_s(i, now) * queued[i] for i in ids}
        best = min(ids, key=lambda i: (cost[i], -cached[i]))
        ties = [i for i in ids if cached[i] == cached[best] and cost[i] <= cost[best] * (1 + self.cost_tolerance)]
        return self._min("prefill", ties, self.pressure)

    def _min(self, role: Role, ids: list[WorkerId], key: Callable[[WorkerId], T]) -> WorkerId:
        start = next(self._turn[role]) % len(ids)
        return min(ids[start:] + ids[:start], key=key)

