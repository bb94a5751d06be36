"""The planner on this machine: which `splitserve serve` deployment of one 2-core machine serves a load best.

Each deployment is simulated with this machine's calibration (`splitserve plan calibrate`: one for a worker
of one thread, one for a worker of two) through the same core Scheduler and Router the runtime runs, its
goodput found by the same sweep (workload.goodput) over the same requests (`requests_at(rate, trial)`) that
`benchmarks.interference` measures, judged by the same SLO (TTFT, mean TPOT, worst gap between tokens).

Deployments, all on the same two cores (`splitserve serve` flags in benchmarks/interference.py):
  colocated          one worker, 2 threads (chunked prefill at the engine's default 2,048-token budget)
  replicas           two colocated workers, one core and one thread each, requests spread by the router
  chunked            one worker, 2 threads, a step's tokens capped at `chunk`
  1p1d               a prefill and a decode worker, one core each, every prompt prefilled remotely
  1p1d_conditional   the same, the router prefilling a prompt on the decode worker when its costs say so

Arrivals pass the frontend's admission (core.admission, as the runtime's): a request expected to wait for
its first token longer than the budget is refused with a 429, a miss.

The calibration times an engine alone. A served one shares the two cores with the frontend's process (and,
in a 1-core deployment, with the other worker), and its steps do not run at the calibrated speed: on this
machine's four measured loads a 2-thread worker's steps took 1.02-1.27x the model, a 1-core worker's decode
steps 0.84-0.98x and its prefills 0.95-1.16x. `Machine.serving_speed` carries such a factor per
deployment, worker role and step kind; empty (what `splitserve plan` has on a new machine), the simulation
runs at the calibration's speed. benchmarks/interference.py reports both, taking the factor for one
workload from the other workloads' runs, never its own.

Not modelled: the two workers of a 1-core deployment slowing each other more while both compute than on
average (benchmarks/sim_accuracy.py models it step by step), the frontend's per-request costs, and a
ticket's deadline expiring while its prefill queues (the runtime then recomputes the request on the decode
worker). Where these matter the prediction is optimistic for the split deployments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import median
from typing import Callable, Mapping, Sequence

from splitserve.calibrate.table import Calibration, step_kind
from splitserve.core.scheduler import SchedulerOutput
from splitserve.sim.cluster import ClusterSim
from splitserve.sim.cluster_spec import ClusterSpec, PoolSpec
from splitserve.sim.hardware import Network
from splitserve.sim.placement import RouterPolicy
from splitserve.sim.state import Worker
from splitserve.workload.goodput import Bracket, Goodput, search_goodput
from splitserve.workload.requests import RequestSpec
from splitserve.workload.slo import SLO, attainment

DEPLOYMENTS = ("colocated", "replicas", "chunked", "1p1d", "1p1d_conditional")
SPLIT = ("1p1d", "1p1d_conditional")

RequestsAt = Callable[[float, int], Sequence[RequestSpec]]  # (rate, trial) -> the run's requests


@dataclass(frozen=True)
class Machine:
    """What the simulation needs to know of this machine and of the engine's settings."""

    one_thread: Calibration  # a worker on one core
    two_threads: Calibration  # a worker using both cores
    link_bw: float  # bytes/s of loopback TCP, the KV transfer's path
    kv_cache_bytes: int = 1 << 30  # per worker: `serve`'s --kv-cache-gib default
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    chunk: int = 128  # the chunked deployment's --max-num-batched-tokens
    decode_prefill_chunk: int = 32  # the runtime's DECODE_PREFILL_CHUNK (runtime/config.py; plan may not import it)
    admit_wait_s: float = 10.0  # the frontend's admission budget and waiting room (runtime PoolConfig's
    admit_waiting: int = 256  # admit_wait_s and max_waiting): a request expected to wait longer gets a 429
    # Real step seconds over the calibrated model's, keyed speed_key(deployment, role, kind); a key absent: 1.
    serving_speed: Mapping[str, float] = field(default_factory=dict)
    # Every step's seconds times this, over serving_speed: how a pick moves if the machine runs a little
    # slower or faster than calibrated (plan local's band), since a pick can turn on one request at an SLO's edge.
    step_scale: float = 1.0


def speed_key(deployment: str, role: str, kind: str) -> str:
    return f"{deployment}/{role}/{kind}"


def serving_step_time(machine: Machine, deployment: str) -> Callable[[Worker, float, SchedulerOutput, float], float] | None:
    """The simulator's step-time hook that runs each step at the deployment's serving speed, times the
    machine's step_scale (None: neither known, the calibration's speed)."""
    speed = {k: v for k, v in machine.serving_speed.items() if k.startswith(deployment + "/")}
    scale = machine.step_scale
    if not speed and scale == 1.0:
        return None

    def step_time(worker: Worker, now: float, out: SchedulerOutput, seconds: float) -> float:
        kind = step_kind([s.num_new_tokens for s in out.seqs])
        return seconds * scale * speed.get(speed_key(deployment, worker.role, kind), 1.0)

    return step_time


def cluster(machine: Machine, deployment: str) -> tuple[ClusterSpec, RouterPolicy | None]:
    """The deployment as the simulator sees it, and the placement the frontend's router gives it."""
    cal = machine.two_threads if deployment in ("colocated", "chunked") else machine.one_thread
    blocks = machine.kv_cache_bytes // (16 * cal.model.kv_bytes_per_token())
    pool = dict(max_num_seqs=machine.max_num_seqs, max_num_batched_tokens=machine.max_num_batched_tokens,
                chunked_prefill=True)
    net = None
    if deployment == "colocated":
        pools, policy = (PoolSpec("colocated", 1, 1, **pool),), None
    elif deployment == "chunked":
        pools, policy = (PoolSpec("colocated", 1, 1, **{**pool, "max_num_batched_tokens": machine.chunk}),), None
    elif deployment == "replicas":
        pools, policy = (PoolSpec("colocated", 2, 1, **pool),), RouterPolicy("kv_aware", conditional=False)
    elif deployment in SPLIT:
        pools = (PoolSpec("prefill", 1, 1, **pool),
                 PoolSpec("decode", 1, 1, prefill_tokens_while_decoding=machine.decode_prefill_chunk, **pool))
        policy = RouterPolicy("kv_aware", conditional=deployment == "1p1d_conditional")
        net = Network(f"loopback TCP ({machine.link_bw / 1e9:.1f} GB/s)", machine.link_bw, True, 100e-6, 1.0)
    else:
        raise ValueError(f"unknown deployment {deployment!r}: one of {', '.join(DEPLOYMENTS)}")
    spec = ClusterSpec(cal.model, cal.hardware, pools, network=net, efficiency=cal.efficiency, pipelined=True,
                       block_size=16, max_model_len=8192, kv_blocks=blocks, admit_wait_s=machine.admit_wait_s,
                       admit_waiting=machine.admit_waiting)
    return spec, policy


def simulated_attainment(machine: Machine, deployment: str, requests: Sequence[RequestSpec], slo: SLO) -> float:
    """The fraction of `requests` the simulated deployment serves within `slo` (every token timed, so the
    worst-gap target is judged as on the real run)."""
    spec, policy = cluster(machine, deployment)
    result = ClusterSim(spec, policy, serving_step_time(machine, deployment)).run(list(requests), token_times=True)
    return attainment(result.records, slo)


@dataclass(frozen=True)
class Probe:
    rate: float
    attainments: tuple[float, ...]
    median: float
    passed: bool


def predict_goodput(machine: Machine, deployment: str, requests_at: RequestsAt, slo: SLO, bracket: Bracket,
                    trials: int, target: float) -> Goodput[Probe]:
    """The simulated deployment's goodput: the sweep bench runs (a rate passes when the median of its trials'
    attainments reaches `target`), over the same requests."""

    def probe(rate: float) -> Probe:
        got = tuple(simulated_attainment(machine, deployment, requests_at(rate, t), slo) for t in range(trials))
        m = median(got)
        return Probe(rate, got, m, m >= target)

    return search_goodput(probe, lambda p: p.passed, bracket)


def winner(goodputs: dict[str, float]) -> str:
    """The deployment with the highest goodput (the first named, on a tie)."""
    return max(goodputs, key=lambda name: goodputs[name])


def within_spread(measured: dict[str, tuple[float, float | None]], pick: str) -> bool:
    """Whether `pick` is the measured winner or indistinguishable from it: each deployment's measured goodput
    is a bracket (highest rate passed, lowest failed; None: none failed), and `pick`'s reaches the winner's."""
    best = winner({name: lo for name, (lo, _) in measured.items()})
    upper = measured[pick][1]
    return pick == best or upper is None or upper > measured[best][0]
