"""What the planner is asked (`PlanSpec`: model, hardware, cluster, workload, SLO, search settings), and the
checks that refuse input no configuration can serve, at once and naming the limit."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Literal, Sequence

from splitserve.core.model_spec import ModelSpec
from splitserve.plan import estimate as est
from splitserve.sim.cluster_spec import ClusterSpec
from splitserve.sim.hardware import Hardware, Network, hour_price
from splitserve.sim.perf import Efficiency, PerfModel
from splitserve.workload.requests import (
    Scaling,
    SyntheticSpec,
    Trace,
    Workload,
    at_rate,
    synthetic,
    trial_workload,
)
from splitserve.workload.slo import SLO

Mode = Literal["colocated", "disaggregated", "heterogeneous"]


MODES: tuple[str, ...] = ("colocated", "disaggregated", "heterogeneous")


class PlanError(ValueError):
    """Bad planner input or an SLO no configuration can meet; the message says which."""


@dataclass(frozen=True)
class WorkloadDef:
    """The traffic to plan for: a trace (its first `num_requests`, stretched to each probed rate) or a
    synthetic distribution (bench's definitions, shared)."""

    trace: Trace | None = None
    scaling: Scaling = Scaling()
    synthetic: SyntheticSpec | None = None
    num_requests: int = 400

    def __post_init__(self) -> None:
        if (self.trace is None) == (self.synthetic is None):
            raise PlanError("give a trace or a synthetic workload, not both")
        if self.num_requests < 10:
            raise PlanError(f"simulate at least 10 requests per probe, got {self.num_requests}")

    def at(self, rate: float, n: int | None = None) -> Workload:
        n = n or self.num_requests
        if self.synthetic is not None:
            return synthetic(replace(self.synthetic, rate=rate, num_requests=n, duration_s=None))
        return at_rate(self.trace, replace(self.scaling, max_requests=n, max_duration_s=None), rate)

    def trial(self, rate: float, trial: int) -> Workload:
        """Trial `trial` of a sweep at `rate`: the requests `splitserve bench --sweep` sends in that run given
        the same load flags and --num-requests (the workload layer's trial_workload, shared by both)."""
        if self.synthetic is not None:
            return trial_workload(replace(self.synthetic, num_requests=self.num_requests, duration_s=None), Scaling(),
                                  rate, trial)
        assert self.trace is not None
        return trial_workload(self.trace, replace(self.scaling, max_requests=self.num_requests, max_duration_s=None),
                              rate, trial)

    def describe(self) -> str:
        if self.synthetic is not None:
            s = self.synthetic
            text = f"synthetic: prompts {s.input.kind} {s.input.mean:g}, outputs {s.output.kind} {s.output.mean:g}"
            if s.shared_prefix_ratio:
                text += f", {s.shared_prefix_ratio:.0%} shared prefix ({s.num_prefixes} prefixes)"
            return text + f", {s.arrival} arrivals"
        extra = f", lengths x{self.scaling.length_scale:g}" if self.scaling.length_scale != 1 else ""
        return f"{self.trace.format} trace {os.path.basename(self.trace.path)} (first {self.num_requests} requests{extra})"


@dataclass(frozen=True)
class PlanSpec:
    model: ModelSpec
    hardware: Hardware
    network: Network
    workload: WorkloadDef
    slo: SLO
    gpus: int | None = None  # cluster size; with `rate`, an upper bound
    rate: float | None = None  # target req/s: find the fewest GPUs
    attainment: float = 0.9
    gpu_hour_cost: float | None = None  # None: the hardware preset's
    efficiency: Efficiency = Efficiency()
    pipelined: bool = True
    tp_options: tuple[int, ...] = (1, 2, 4, 8)
    chunk_options: tuple[int, ...] = (512, 2048)
    max_num_seqs: int = 256
    max_unit_gpus: int = 32  # with `rate` and no `gpus`: the largest disaggregated unit (P:D ratio) tried
    top_k: int = 4
    resolution: float = 0.05  # relative width of the final rate bracket
    jobs: int = 0  # processes for simulations; 0 = one per CPU core
    block_size: int | None = None  # KV block tokens; None: 16, larger for long prompts (fewer block operations)
    # A probe lasts `window_lifetimes` request lifetimes at the SLO (TTFT + output x TPOT), so that the
    # cluster fills up: its request count is rate x that, within [workload.num_requests, max_requests].
    # Attainment is judged on the requests arriving between `warmup` and `cooldown` of the probe.
    window_lifetimes: float = 2.0
    max_requests: int = 4000
    max_wait_growth: float = 0.25  # x TTFT target: a probe whose median wait grows more, first to last third, is overloaded
    warmup: float = 0.25
    cooldown: float = 0.9
    mean_output: float = 0.0  # filled in by `plan` from the workload
    # Placement: the core Router with this policy, as `splitserve serve` places (its defaults), and its
    # conditional disaggregation (prefill on the decode worker when the cost model says so).
    router: str = "kv_aware"
    conditional: bool = True
    # Issue #7: hardware per pool. `prefill_hardware`/`decode_hardware` (None: `hardware`) fix the
    # disaggregated pools' GPUs; `search_hardware` instead tries every type for each pool (and for colocated).
    # Units are then ranked by goodput per dollar (`prices`: USD per GPU-hour by preset key, over the presets').
    prefill_hardware: Hardware | None = None
    decode_hardware: Hardware | None = None
    search_hardware: tuple[Hardware, ...] = ()
    prices: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.slo.ttft_s is None or self.slo.tpot_s is None:
            raise PlanError("the planner needs both --slo-ttft and --slo-tpot")
        if not (self.slo.ttft_s > 0 and self.slo.tpot_s > 0):
            raise PlanError("SLO targets must be positive seconds")
        if self.gpus is None and self.rate is None:
            raise PlanError("give --gpus N (cluster size) or --rate R (requests per second to serve)")
        if self.gpus is not None and self.gpus < 1:
            raise PlanError(f"--gpus must be >= 1, got {self.gpus}")
        if self.rate is not None and not self.rate > 0:
            raise PlanError(f"--rate must be positive, got {self.rate}")
        if not 0 < self.attainment <= 1:
            raise PlanError(f"attainment must be in (0, 1], got {self.attainment}")

    @property
    def cost_per_gpu_hour(self) -> float:
        return self.gpu_hour_cost if self.gpu_hour_cost is not None else self.price(self.hardware)

    def price(self, hw: Hardware) -> float:
        """USD per GPU-hour of `hw` (0: unknown). `gpu_hour_cost` applies to the main `hardware` only."""
        if hw.name == self.hardware.name and self.gpu_hour_cost is not None:
            return self.gpu_hour_cost
        return hour_price(hw, dict(self.prices))

    @property
    def colocated_hardware(self) -> tuple[Hardware, ...]:
        return self.search_hardware or (self.hardware,)

    @property
    def pool_pairs(self) -> list[tuple[Hardware, Hardware]]:
        """(prefill, decode) hardware pairs to try."""
        if self.search_hardware:
            return [(p, d) for p in self.search_hardware for d in self.search_hardware]
        return [(self.prefill_hardware or self.hardware, self.decode_hardware or self.hardware)]

    @property
    def all_hardware(self) -> list[Hardware]:
        out: dict[str, Hardware] = {}
        for hw in (*self.colocated_hardware, *(h for pair in self.pool_pairs for h in pair)):
            out.setdefault(hw.name, hw)
        return list(out.values())

    def network_for(self, hw_p: Hardware, hw_d: Hardware) -> Network | None:
        """The KV link between the pools; NVLink only joins GPUs of one kind in one node (None otherwise)."""
        if not self.network.intra_node:
            return self.network
        if hw_p.name != hw_d.name:
            return None
        return replace(self.network, name=f"NVLink ({hw_p.name})", bandwidth=hw_p.link_bw)

    def unit_cost(self, unit: ClusterSpec) -> float:
        """USD per hour of one unit; its GPU count where any price is unknown (ranking by GPUs, as before)."""
        prices = [self.price(p.hardware or unit.hardware) for p in unit.pools]
        if all(v > 0 for v in prices):
            return sum(p.gpus * v for p, v in zip(unit.pools, prices))
        return float(unit.gpus)

def fitting_tps(plan: PlanSpec, longest: int, hw: Hardware | None = None) -> list[int]:
    """Tensor-parallel sizes at which the weights and the KV cache of the longest request fit on `hw`
    (memory capacity: no configuration whose KV cache does not fit is proposed)."""
    hw = hw or plan.hardware
    out = []
    for tp in plan.tp_options:
        if tp > hw.gpus_per_node or (plan.gpus is not None and tp > plan.gpus):
            continue
        if PerfModel(plan.model, hw, tp, plan.efficiency).kv_capacity_tokens() >= longest:
            out.append(tp)
    return out



def auto_block_size(mean_input: float) -> int:
    """16 tokens, doubled per doubling of the mean prompt beyond 2k (at most 128): a block's bookkeeping in
    the pure-Python scheduler dominates simulation time for long prompts, and a block of internal
    fragmentation per request is noise at those lengths."""
    bs = 16
    while bs < 128 and mean_input > bs * 128:
        bs *= 2
    return bs


def check_context(plan: PlanSpec, lengths: Sequence[int]) -> None:
    """Refuse at once a workload whose requests (prompt + output) do not fit the model's context often
    enough to miss the attainment anywhere: every server refuses them, whatever the configuration (found
    by simulating every one, this took a minute and named TTFT as the reason)."""
    limit = plan.model.max_position_embeddings
    over = [n for n in lengths if n > limit]
    if len(over) > (1 - plan.attainment) * len(lengths):
        raise PlanError(
            f"{len(over) / len(lengths):.0%} of requests need more than {plan.model.name}'s context of {limit:,} tokens "
            f"(prompt + output up to {max(over):,}): at most {1 - plan.attainment:.0%} may fail the SLO"
        )


def check_slo(plan: PlanSpec, traffic: est.Traffic, longest: int) -> None:
    """Refuse targets that no configuration can meet even serving one request at a time (on any GPU type)."""
    errors = []
    for hw in plan.all_hardware:
        try:
            _check_slo(plan, traffic, longest, hw)
            return
        except PlanError as e:
            errors.append(e)
    raise errors[0]


def _check_slo(plan: PlanSpec, traffic: est.Traffic, longest: int, hw: Hardware) -> None:
    tps = fitting_tps(plan, longest, hw)
    if not tps:
        raise PlanError(
            f"{plan.model.name} with a {longest:,}-token request does not fit on {max(plan.tp_options)} x {hw.name} "
            "(tensor parallelism stays within a node)"
        )
    perf = [PerfModel(plan.model, hw, tp, plan.efficiency) for tp in tps]
    iu = int(traffic.uncached_input)
    prefill = min(p.prefill_time(iu, int(traffic.mean_input) - iu) for p in perf)
    if prefill > plan.slo.ttft_s:
        raise PlanError(
            f"TTFT {plan.slo.ttft_s:g} s is impossible: a lone {iu:,}-token prefill of {plan.model.name} takes "
            f"{prefill:.3g} s even on TP{max(tps)} x {hw.name}"
        )
    if traffic.mean_output > 1:
        step = min(p.decode_step_time(1, traffic.mean_input + traffic.mean_output / 2) for p in perf)
        if step > plan.slo.tpot_s:
            raise PlanError(
                f"TPOT {plan.slo.tpot_s * 1e3:g} ms is impossible: a lone decode step of {plan.model.name} takes "
                f"{step * 1e3:.3g} ms even on TP{max(tps)} x {hw.name}"
            )
