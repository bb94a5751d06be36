"""What a simulated cluster is: its pools (role, count, TP, hardware, batching) and the shared settings
(model, network, block size, memory). Checked at construction: a spec that cannot run raises InfeasibleConfig."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from splitserve.sim.hardware import Hardware, Network
from splitserve.core.model_spec import ModelSpec
from splitserve.sim.perf import Efficiency

Role = Literal["colocated", "prefill", "decode"]


class InfeasibleConfig(ValueError):
    """The configuration cannot run this workload (model does not fit, KV cache too small, ...)."""


@dataclass(frozen=True)
class PoolSpec:
    role: Role
    count: int
    tp: int = 1
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    chunked_prefill: bool = False
    hardware: Hardware | None = None  # None: the cluster's (different hardware per pool: issue #7)
    efficiency: Efficiency | None = None  # None: the cluster's
    prefill_tokens_while_decoding: int | None = None  # as the runtime's decode workers (SchedulerConfig)

    @property
    def gpus(self) -> int:
        return self.count * self.tp

    def describe(self) -> str:
        chunk = f", chunked {self.max_num_batched_tokens}" if self.chunked_prefill else ""
        hw = f" {self.hardware.name}" if self.hardware is not None else ""
        letter = {"colocated": "x", "prefill": "P", "decode": "D"}[self.role]
        return f"{self.count}{letter} TP{self.tp}{hw}{chunk}"


@dataclass(frozen=True)
class ClusterSpec:
    model: ModelSpec
    hardware: Hardware
    pools: tuple[PoolSpec, ...]
    network: Network | None = None  # carries KV between pools (disaggregated only)
    efficiency: Efficiency = Efficiency()
    pipelined: bool = True  # KV sent layer by layer while later layers compute
    block_size: int = 16
    mem_util: float = 0.9
    max_model_len: int | None = None  # None: the longest request of the workload (within the model's limit)
    prefix_caching: bool = True
    max_waiting: int = 1 << 30  # the simulated queue is unbounded unless asked
    kv_blocks: int | None = None  # blocks per worker; None: what the GPU memory holds after the weights
    request_overhead_s: float = 0.0  # arrival -> the request reaches a scheduler (frontend, HTTP, routing)
    # The frontend's admission (core.admission, as the runtime's PoolClient runs it): at most `admit_waiting`
    # requests waiting for their first token, and none whose expected wait exceeds `admit_wait_s`; a refused
    # one is a 429. None: every request is admitted (the planner's GPU clusters: their frontends differ).
    admit_wait_s: float | None = None
    admit_waiting: int = 256

    def __post_init__(self) -> None:
        roles = sorted(p.role for p in self.pools)
        if roles not in (["colocated"], ["decode", "prefill"]):
            raise InfeasibleConfig(f"a cluster is one colocated pool, or one prefill and one decode pool; got {roles}")
        if self.disaggregated and self.network is None:
            raise InfeasibleConfig("a disaggregated cluster needs a network")
        for p in self.pools:
            if p.count < 1 or p.tp < 1:
                raise InfeasibleConfig(f"pool {p.role}: need count >= 1 and tp >= 1")

    @property
    def disaggregated(self) -> bool:
        return any(p.role == "prefill" for p in self.pools)

    @property
    def gpus(self) -> int:
        return sum(p.gpus for p in self.pools)

    def pool(self, role: Role) -> PoolSpec:
        return next(p for p in self.pools if p.role == role)

    def describe(self) -> str:
        if not self.disaggregated:
            return f"colocated {self.pools[0].describe()}"
        how = "pipelined" if self.pipelined else "unpipelined"
        return f"disaggregated {self.pool('prefill').describe()} + {self.pool('decode').describe()}, {self.network.name} {how}"
