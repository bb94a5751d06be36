"""Where each simulated request runs: the placement policies the simulator consults.

`RouterPolicy` is the core Router as the simulator's placement policy: the very object the runtime's frontend consults.

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

from splitserve.core.scheduler import SchedulerOutput
from splitserve.sim.cluster_spec import ClusterSpec
from splitserve.sim.state import SimRequest, Worker


class PlacementPolicy:
    """Where each request runs. The simulator calls these; a policy may read the workers' state (scheduler,
    free blocks, queued prefill tokens, outstanding requests, perf model) but must not change it.

    `prefill_locally` is conditional disaggregation: return True to prefill this request on its decode
    worker instead of the prefill pool (a short uncached suffix, a saturated prefill pool). The router's
    cost model (issue #5) will decide it from `perf.PerfModel.prefill_time` and `perf.transfer_time`."""

    def choose_colocated(self, workers: Sequence[Worker], req: SimRequest) -> Worker:
        raise NotImplementedError

    def choose_decode(self, workers: Sequence[Worker], req: SimRequest) -> Worker:
        raise NotImplementedError

    def choose_prefill(self, workers: Sequence[Worker], req: SimRequest) -> Worker:
        raise NotImplementedError

    def prefill_locally(self, req: SimRequest, decode: Worker, prefill_workers: Sequence[Worker]) -> bool:
        return False

    def place(self, req: SimRequest, decode_workers: Sequence[Worker], prefill_workers: Sequence[Worker], now: float) -> tuple[Worker, Worker | None]:
        """Disaggregated placement in one call: (decode worker, prefill worker or None to prefill locally).
        The prefill worker is only used once the decode worker has reserved the blocks; a policy whose
        decision covers both at once (the core Router) overrides this."""
        d = self.choose_decode(decode_workers, req)
        if self.prefill_locally(req, d, prefill_workers):
            return d, None
        return d, self.choose_prefill(prefill_workers, req)

    # What the simulator reports, as workers report to the runtime's router (no-ops here).

    def attach(self, spec: ClusterSpec, workers: Sequence[Worker]) -> None:
        """The workers are built; called once per run before the first arrival."""

    def kv_events(self, worker: Worker, events: list) -> None:
        """The worker's BlockPool stored or removed these prefix blocks."""

    def observe_step(self, worker: Worker, out: SchedulerOutput, seconds: float, now: float) -> None:
        """The worker finished a step of `seconds`."""

    def observe_transfer(self, nbytes: float, seconds: float) -> None:
        """`nbytes` of KV spent `seconds` on the wire."""


class LeastLoaded(PlacementPolicy):
    """Fewest outstanding requests (colocated, decode; ties: most free blocks); fewest queued prompt tokens
    (prefill). Never prefills locally."""

    def choose_colocated(self, workers, req):
        return min(workers, key=lambda w: (w.outstanding, w.queued_prefill_tokens, -w.free_blocks, w.id))

    def choose_decode(self, workers, req):
        return min(workers, key=lambda w: (w.outstanding + len(w.pending), -w.free_blocks, w.id))

    def choose_prefill(self, workers, req):
        return min(workers, key=lambda w: (w.queued_prefill_tokens, w.outstanding, w.id))


class LocalBelow(LeastLoaded):
    """Least loaded, but prompts with fewer than `tokens` uncached tokens are prefilled on the decode worker
    (a stand-in for the router's cost-model decision)."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens

    def prefill_locally(self, req, decode, prefill_workers):
        return req.spec.input_len < self.tokens


GENERATION = 1


class RouterPolicy(PlacementPolicy):
    def __init__(self, policy: Policy = "kv_aware", conditional: bool = True, **cost_kwargs: float) -> None:
        self.policy, self.conditional, self.cost_kwargs = policy, conditional, cost_kwargs
        self.router: Router | None = None
        self.local = self.remote = 0  # placements made, for reports and tests

    def attach(self, spec: ClusterSpec, workers: Sequence[Worker]) -> None:
        if not spec.disaggregated:
            raise ValueError("the router places requests on prefill and decode pools: use it with a disaggregated cluster")
        d0 = next(w for w in workers if w.role == "decode")
        costs = CostModel.from_perf(d0.perf, d0.link_bw, pipelined=spec.pipelined, link_latency_s=spec.network.latency_s,
                                    **self.cost_kwargs)
        self.router = Router(self.policy, spec.block_size, costs, conditional=self.conditional)
        for w in workers:
            self.router.register(w.id, w.role, GENERATION, w.sched.pool.num_blocks)
        self.workers = {w.id: w for w in workers}

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
