"""The core Router as the simulator's placement policy: the very object the runtime's frontend consults.

The simulator feeds it what workers feed it in the runtime: registrations, KV events from every worker's
BlockPool, load reports after every step, and measurements (prefill per-token cost, decode step time, link
speed); each arrival asks `Router.route` for a decode worker and a prefill worker, or none when the cost
model (`core.costs`, built from the roofline model with `CostModel.from_perf`) says to prefill on the
decode worker (conditional disaggregation).
"""

from __future__ import annotations

from typing import Sequence

from splitserve.core.costs import CostModel
from splitserve.core.router import Policy, Router
from splitserve.sim.cluster import ClusterSim, PlacementPolicy, SimRequest, Worker

GENERATION = 1


class RouterPolicy(PlacementPolicy):
    def __init__(self, policy: Policy = "kv_aware", conditional: bool = True, **cost_kwargs: float) -> None:
        self.policy, self.conditional, self.cost_kwargs = policy, conditional, cost_kwargs
        self.router: Router | None = None
        self.local = self.remote = 0  # placements made, for reports and tests

    def attach(self, sim: ClusterSim) -> None:
        spec = sim.spec
        if not spec.disaggregated:
            raise ValueError("the router places requests on prefill and decode pools: use it with a disaggregated cluster")
        d0 = sim.by_role["decode"][0]
        costs = CostModel.from_perf(d0.perf, d0.link_bw, pipelined=spec.pipelined, link_latency_s=spec.network.latency_s,
                                    **self.cost_kwargs)
        self.router = Router(self.policy, spec.block_size, costs, conditional=self.conditional)
        for w in sim.workers:
            self.router.register(w.id, w.role, GENERATION, w.sched.pool.num_blocks)
        self.workers = {w.id: w for w in sim.workers}

    def place(self, req: SimRequest, decode_workers: Sequence[Worker], prefill_workers: Sequence[Worker], now: float):
        decision = self.router.route(req.spec.input_len, req.hashes, now)
        d = self.workers[decision.decode]
        p = self.workers[decision.prefill] if decision.prefill is not None else None
        if p is None:
            self.local += 1
        else:
            self.remote += 1
        return d, p

    def kv_events(self, worker: Worker, events: list) -> None:
        if not self.router.on_events(worker.id, GENERATION, events):
            pool = worker.sched.pool
            seq, hashes = pool.snapshot()
            self.router.resync(worker.id, GENERATION, seq, hashes)

    def observe_step(self, worker: Worker, out, seconds: float, now: float) -> None:
        r = self.router
        prefill_tokens = sum(s.num_new_tokens for s in out.seqs if s.num_new_tokens > 1)
        total = sum(s.num_new_tokens for s in out.seqs)
        if prefill_tokens:
            r.observe_prefill(worker.id, prefill_tokens, seconds * prefill_tokens / total)
        elif worker.role == "decode":
            r.observe_decode_step(worker.id, seconds)
        r.update_load(worker.id, free_blocks=worker.free_blocks, running=worker.outstanding,
                      queued_prefill_tokens=worker.queued_prefill_tokens, now=now)

    def observe_transfer(self, nbytes: float, seconds: float) -> None:
        self.router.observe_transfer(nbytes, seconds)
