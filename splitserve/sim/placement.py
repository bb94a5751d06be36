"""Where each simulated request runs: the core Router, the very object the runtime's frontend consults.

The simulator feeds it through the same `RouterFeed` the runtime's poller uses, with the same reports: a
simulated worker's generation, KV events from its BlockPool, its scheduler's load, its step counters and
the link bytes and seconds of the transfers it sent, whenever it is between steps and about to schedule
(a runtime worker answers the poll between steps too). Each arrival asks `Router.route` for a colocated worker, or for a decode worker
and a prefill worker (none when the cost model, built from the roofline model with
`CostModel.from_perf`, says to prefill on the decode worker: conditional disaggregation).
"""

from __future__ import annotations

from typing import Sequence

from splitserve.core.blocks import KVEvent
from splitserve.core.costs import CostModel
from splitserve.core.router import Policy, Router
from splitserve.core.router_feed import RouterFeed, StepCounters, WorkerReport
from splitserve.core.scheduler import SchedulerOutput
from splitserve.sim.cluster_spec import ClusterSpec
from splitserve.sim.state import SimRequest, Worker

GENERATION = 1  # a simulated worker never restarts


class RouterPolicy:
    """The Router as the simulator's placement. Its defaults are `splitserve serve`'s."""

    def __init__(self, policy: Policy = "kv_aware", conditional: bool = True, **cost_kwargs: float) -> None:
        self.policy, self.conditional, self.cost_kwargs = policy, conditional, cost_kwargs
        self.local = self.remote = 0  # placements prefilled where they decode / on a prefill worker

    def attach(self, spec: ClusterSpec, workers: Sequence[Worker]) -> None:
        """The workers are built; called once per run before the first arrival."""
        w0 = workers[0]  # a colocated cluster has no link: its cost model only serves the placement's loads
        latency = spec.network.latency_s if spec.network else 0.0
        costs = CostModel.from_perf(w0.perf, w0.link_bw, pipelined=spec.pipelined, link_latency_s=latency, **self.cost_kwargs)
        self.router = Router(self.policy, spec.block_size, costs, conditional=self.conditional)
        self.feed = RouterFeed(self.router)
        self.workers = {w.id: w for w in workers}
        self.counters = {w.id: StepCounters() for w in workers}
        self.link = {w.id: [0.0, 0.0] for w in workers}  # bytes and wire seconds each worker has sent
        for w in workers:
            self.feed.join(w.id, w.role, GENERATION, w.sched.pool.num_blocks, w.sched.config.prefill_tokens_while_decoding)

    def place(self, req: SimRequest, now: float) -> tuple[Worker, Worker | None]:
        """(colocated or decode worker, prefill worker or None to prefill there)."""
        decision = self.router.route(req.spec.input_len, req.hashes, now)
        if decision.prefill is None:
            self.local += 1
        else:
            self.remote += 1
        p = self.workers[decision.prefill] if decision.prefill is not None else None
        return self.workers[decision.decode], p

    # What the simulator reports, as workers report to the runtime's router.

    def observe_step(self, worker: Worker, out: SchedulerOutput, seconds: float, now: float) -> None:
        """The worker finished a step of `seconds`; its next report counts it."""
        self.counters[worker.id].count(out, seconds)

    def observe_transfer(self, worker: Worker, nbytes: float, seconds: float) -> None:
        """`worker` sent `nbytes` of KV, `seconds` on the wire; its next report carries them."""
        link = self.link[worker.id]
        link[0] += nbytes
        link[1] += seconds

    def report(self, w: Worker, events: list[KVEvent], now: float) -> None:
        """The worker is between steps; `events` are its BlockPool's since its last report."""
        pool = w.sched.pool
        link_bytes, link_s = self.link[w.id]
        report = WorkerReport(GENERATION, pool.event_seq, events, None, w.sched.load(), self.counters[w.id],
                              link_bytes, link_s)
        if not self.feed.report(w.id, report, now):
            seq, hashes = pool.snapshot()
            self.feed.report(w.id, WorkerReport(GENERATION, seq, None, list(hashes), report.load, report.counters,
                                                link_bytes, link_s), now)
