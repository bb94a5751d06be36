"""CostModel: where a prompt should be prefilled — on a prefill worker P (remote) or on its decode worker D
(local) — from estimated seconds. The router asks it per request; the simulator and the planner build it
from the roofline model (`from_perf`) and feed it the same observations the runtime does.

Both paths end with the prompt's KV on D and D decoding it. What differs (all in seconds):

remote (P computes, the KV crosses the link)
    queue_s      P's queued prefill tokens x P's marginal per-token prefill cost: the work ahead of it
    prefill_s    P's fixed per-prefill time + tokens P does not cache x P's marginal cost
    overhead_s   the remote path's fixed extra: reservation round trip, ticket, connection (configured)
    transfer_s   the *exposed* KV transfer, after P's prefill ends, of the tokens D does not cache:
                 unpipelined all of bytes / link; pipelined (layer i sent while layer i+1 is computed)
                 max(x, L x - (L-1) c), x = one layer's bytes on the wire, c = one layer's compute
    TTFT = queue + prefill + overhead (P returns the first token at once); ready = TTFT + transfer

local (D computes)
    queue_s      half of D's decode step (the step in flight finishes first) + D's queued prefill tokens
    prefill_s    D's fixed per-prefill time + tokens D does not cache x D's marginal cost; a D that caps the
                 prompt tokens of a step that decodes (`join_pool`'s `chunk_while_decoding`) spreads them over
                 ceil(tokens / cap) steps while it decodes, each also one of its decode steps
    interference_s  while D prefills, each of its `running` requests waits: running x prefill_s
                 request-seconds stolen from others' inter-token latency, times `interference_weight`
    TTFT = ready = queue + prefill

cost = ready + interference; the cheaper path wins (ties go local: no bytes on the wire).

A worker's prefill time is `fixed + marginal x tokens`: an exponentially weighted least-squares line
through what it measured (`observe_prefill`, per step). Workers belong to pools (`join_pool`); the router
says which pools' workers are alike (same role, same KV capacity: `set_alike`), and alike workers share one
pool-wide fit fed by all of them. Two identical workers then cost exactly the same per token: separate fits
differ by measurement noise (10-20 %), enough to send a request away from the worker holding its prefix, and
a worker that looked slower once would never be picked, so never measured again. A worker of an unlike pool
keeps its own fit, but its weight halves every `half_life_s` without a new measurement, the pool-wide fit
taking its place: an idle worker's estimate decays to its pool's, so it is tried again (re-probed) rather
than left out for good on a stale reading. Before a pool has measured anything its estimate is another
measured pool's (same model, most likely the same GPUs), and only then the configured per-token prior: a
prior can be 30x off (300 tokens/s configured, 10k measured), and a worker judged on it is never used. The fixed part matters for routing: a worker that mostly serves follow-up turns
(short uncached suffixes) spends most of each step on per-step overhead, and a ratio through the origin
would call it several times slower per token than an identical worker serving new prompts. The router
would then pile every new conversation on the "fast" one and evict its cache. The link's speed and each
worker's decode step are EWMAs of measurements.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Protocol

from splitserve.core.transfer_time import transfer

WorkerId = Hashable


class _Model(Protocol):
    def kv_bytes_per_token(self) -> int: ...


class StepTimes(Protocol):
    """What `from_perf` reads: `splitserve.sim.perf.PerfModel` has it (core does not import sim)."""

    layers: int
    model: _Model

    def prefill_time(self, tokens: int, cached: int = 0) -> float: ...

    def decode_step_time(self, batch: int, ctx: float) -> float: ...


@dataclass(frozen=True)
class PathCost:
    ttft_s: float  # arrival at the router -> first token
    ready_s: float  # arrival -> the KV is complete on the decode worker (decoding goes on)
    cost_s: float  # what the decision minimises: ready_s plus weighted harm to other requests
    terms: dict[str, float]


@dataclass(frozen=True)
class Decision:
    remote: bool
    local_path: PathCost
    remote_path: PathCost | None  # None: no prefill worker to compare with

    @property
    def chosen(self) -> PathCost:
        return self.remote_path if self.remote and self.remote_path is not None else self.local_path

    @property
    def terms(self) -> dict[str, float]:
        """Every term of both paths, prefixed `remote.` / `local.`: the reasons, for logs and tests."""
        out = {f"local.{k}": v for k, v in self.local_path.terms.items()}
        if self.remote_path is not None:
            out.update({f"remote.{k}": v for k, v in self.remote_path.terms.items()})
        return out


class _Ewma:
    """Ratio of exponentially decayed sums: big samples weigh more than small ones (a small transfer's
    latency must not swamp the bandwidth a large one measured)."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.num = 0.0
        self.den = 0.0

    def add(self, num: float, den: float) -> None:
        self.num += self.alpha * (num - self.num)
        self.den += self.alpha * (den - self.den)

    def value(self, prior: float) -> float:
        return self.num / self.den if self.den > 0 else prior


class _LineEwma:
    """`y = fixed + slope x`, fitted by exponentially weighted least squares. Where the samples' x barely
    vary, the intercept cannot be told from the slope: the fit goes through the origin (the ratio of
    sums, exact at the sizes measured). So does a fit with a negative part, which noise can produce."""

    MIN_RELATIVE_SPREAD = 0.1  # x's weighted standard deviation over its mean, below which no intercept

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.w = self.x = self.y = self.xx = self.xy = 0.0

    def add(self, x: float, y: float, weight: float = 1.0) -> None:
        keep = 1.0 - self.alpha
        self.w = keep * self.w + weight
        self.x = keep * self.x + weight * x
        self.y = keep * self.y + weight * y
        self.xx = keep * self.xx + weight * x * x
        self.xy = keep * self.xy + weight * x * y

    def fit(self) -> tuple[float, float]:
        """(fixed, slope)."""
        mx, my = self.x / self.w, self.y / self.w
        var = self.xx / self.w - mx * mx
        if var > (self.MIN_RELATIVE_SPREAD * mx) ** 2:
            slope = (self.xy / self.w - mx * my) / var
            fixed = my - slope * mx
            if slope > 0 and fixed >= 0:
                return fixed, slope
        return 0.0, self.y / self.x


@dataclass
class CostModel:
    kv_bytes_per_token: float  # all layers, K and V, as sent over the link
    num_layers: int
    link_bytes_per_s: float  # prior until `observe_transfer` measures it
    prefill_s_per_token: float  # prior until a worker's `observe_prefill`
    decode_step_s: float  # prior until a worker's `observe_decode_step`
    pipelined: bool = True  # KV sent layer by layer during the prefill
    link_latency_s: float = 0.0  # per message (per layer when pipelined)
    remote_overhead_s: float = 0.0
    interference_weight: float = 1.0  # request-seconds of others' stall worth one second of this request
    alpha: float = 0.2  # EWMA weight of each new measurement
    half_life_s: float = 30.0  # an unlike worker's own fit loses half its weight to its pool's per idle span
    _prefill: dict[WorkerId, _LineEwma] = field(default_factory=dict, init=False, repr=False)
    _measured_at: dict[WorkerId, float] = field(default_factory=dict, init=False, repr=False)
    _pool_of: dict[WorkerId, Hashable] = field(default_factory=dict, init=False, repr=False)
    _chunk: dict[WorkerId, int] = field(default_factory=dict, init=False, repr=False)
    _pools: dict[Hashable, _LineEwma] = field(default_factory=dict, init=False, repr=False)
    _alike: set[Hashable] = field(default_factory=set, init=False, repr=False)
    _decode: dict[WorkerId, _Ewma] = field(default_factory=dict, init=False, repr=False)
    _link: _Ewma = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.link_bytes_per_s <= 0 or self.prefill_s_per_token <= 0:
            raise ValueError("need num_layers >= 1 and positive link speed and per-token prefill cost")
        self._link = _Ewma(self.alpha)

    @classmethod
    def from_perf(
        cls, perf: StepTimes, link_bytes_per_s: float, *, ref_tokens: int = 2048, ref_batch: int = 32,
        ref_ctx: int = 1024, **kwargs: float | bool,
    ) -> CostModel:
        """Priors from the roofline model: per-token prefill cost at a `ref_tokens` prompt, a decode step
        of `ref_batch` sequences of `ref_ctx` context. `link_bytes_per_s`: e.g.
        `network.instance_bandwidth(tp)`; kwargs set the other fields."""
        return cls(
            kv_bytes_per_token=perf.model.kv_bytes_per_token(), num_layers=perf.layers,
            link_bytes_per_s=link_bytes_per_s, prefill_s_per_token=perf.prefill_time(ref_tokens) / ref_tokens,
            decode_step_s=perf.decode_step_time(ref_batch, ref_ctx), **kwargs,
        )

    # ------------------------------------------------------------------------------ measurements

    def join_pool(self, worker: WorkerId, pool: Hashable, chunk_while_decoding: int | None = None) -> None:
        """`worker`'s measurements also feed `pool`'s fit (the router's pools: its role). It computes at most
        `chunk_while_decoding` prompt tokens in a step that also decodes (None: a whole prompt at once)."""
        self._pool_of[worker] = pool
        if chunk_while_decoding is None:
            self._chunk.pop(worker, None)
        else:
            self._chunk[worker] = chunk_while_decoding

    def set_alike(self, pool: Hashable, alike: bool) -> None:
        """Whether `pool`'s workers are alike, so share its fit (the router re-decides on every join)."""
        if alike:
            self._alike.add(pool)
        else:
            self._alike.discard(pool)

    def observe_prefill(
        self, worker: WorkerId, tokens: int, seconds: float, steps: int = 1, now: float | None = None
    ) -> None:
        """`steps` prefill steps computing `tokens` uncached tokens in all took `seconds` of compute on
        `worker` (not its queueing), measured at `now` (None: a measurement that never ages)."""
        if tokens > 0 and seconds > 0 and steps > 0:
            self._prefill.setdefault(worker, _LineEwma(self.alpha)).add(tokens / steps, seconds / steps, steps)
            pool = self._pool_of.get(worker)
            if pool is not None:
                self._pools.setdefault(pool, _LineEwma(self.alpha)).add(tokens / steps, seconds / steps, steps)
            if now is not None:
                self._measured_at[worker] = now

    def observe_decode_step(self, worker: WorkerId, seconds: float) -> None:
        """One decode step (or the mean of several) took `seconds` on `worker`."""
        if seconds > 0:
            self._decode.setdefault(worker, _Ewma(self.alpha)).add(seconds, 1.0)

    def observe_transfer(self, nbytes: float, seconds: float) -> None:
        """`nbytes` took `seconds` on the wire (the sender's busy time, not the span of a pipelined prefill)."""
        if nbytes > 0 and seconds > 0:
            self._link.add(seconds, nbytes)

    def forget(self, worker: WorkerId) -> None:
        """A restarted or removed worker's measurements no longer describe it."""
        self._prefill.pop(worker, None)
        self._decode.pop(worker, None)
        self._measured_at.pop(worker, None)

    def pool_fit(self, pool: Hashable) -> tuple[float, float]:
        """(fixed, marginal) of `pool` from all its workers' measurements; unmeasured: the mean of the
        measured pools' fits, or the prior."""
        e = self._pools.get(pool)
        if e is not None:
            return e.fit()
        fits = [f.fit() for f in self._pools.values()]
        if not fits:
            return 0.0, self.prefill_s_per_token
        return sum(f[0] for f in fits) / len(fits), sum(f[1] for f in fits) / len(fits)

    def prefill_fit(self, worker: WorkerId, now: float | None = None) -> tuple[float, float]:
        """(fixed seconds per prefill, marginal seconds per uncached token) of `worker` at `now` (None:
        its own fit as last measured, for an unlike worker)."""
        pool = self._pool_of.get(worker)
        if pool in self._alike:
            return self.pool_fit(pool)
        own = self._prefill.get(worker)
        if own is None:
            return self.pool_fit(pool)
        fit = own.fit()
        at = self._measured_at.get(worker)
        if now is None or at is None:
            return fit
        weight = 0.5 ** (max(0.0, now - at) / self.half_life_s)
        shared = self.pool_fit(pool)
        return tuple(weight * a + (1 - weight) * b for a, b in zip(fit, shared))  # type: ignore[return-value]

    def per_token_s(self, worker: WorkerId, now: float | None = None) -> float:
        return self.prefill_fit(worker, now)[1]

    def prefill_s(self, worker: WorkerId, tokens: float, now: float | None = None) -> float:
        """Compute time of a prefill of `tokens` uncached tokens on `worker` (0 when nothing to compute)."""
        fixed, per_tok = self.prefill_fit(worker, now)
        return fixed + per_tok * tokens if tokens > 0 else 0.0

    def step_s(self, worker: WorkerId) -> float:
        e = self._decode.get(worker)
        return e.value(self.decode_step_s) if e else self.decode_step_s

    def link_s_per_byte(self) -> float:
        return self._link.value(1.0 / self.link_bytes_per_s)

    # ------------------------------------------------------------------------------ estimates

    def transfer_s(self, tokens: int, prefill_s: float) -> float:
        """Exposed transfer time of `tokens` tokens' KV after a prefill of `prefill_s` seconds."""
        nbytes = tokens * self.kv_bytes_per_token
        bandwidth = 1.0 / self.link_s_per_byte()
        L = self.num_layers
        return transfer(nbytes, bandwidth, self.link_latency_s, self.pipelined, L, prefill_s / L).exposed_s

    def remote(
        self, prefill_worker: WorkerId, new_tokens: int, queued_tokens: float, transfer_tokens: int,
        now: float | None = None,
    ) -> PathCost:
        """Prefill `new_tokens` on `prefill_worker` behind `queued_tokens`, then send `transfer_tokens`."""
        queue = queued_tokens * self.per_token_s(prefill_worker, now)
        prefill = self.prefill_s(prefill_worker, new_tokens, now)
        transfer = self.transfer_s(transfer_tokens, prefill)
        ttft = queue + prefill + self.remote_overhead_s
        terms = {"queue_s": queue, "prefill_s": prefill, "overhead_s": self.remote_overhead_s, "transfer_s": transfer}
        return PathCost(ttft, ttft + transfer, ttft + transfer, terms)

    def local(
        self, decode_worker: WorkerId, new_tokens: int, queued_tokens: float, running: int, now: float | None = None
    ) -> PathCost:
        """Prefill `new_tokens` on `decode_worker`, behind `queued_tokens`, while it decodes `running`."""
        per_token = self.per_token_s(decode_worker, now)
        queue = (0.5 * self.step_s(decode_worker) if running > 0 else 0.0) + queued_tokens * per_token
        prefill = self.prefill_s(decode_worker, new_tokens, now)
        chunk = self._chunk.get(decode_worker)
        if running > 0 and chunk is not None:
            prefill += (-(-new_tokens // chunk) - 1) * self.step_s(decode_worker)
        interference = self.interference_weight * running * prefill
        ready = queue + prefill
        terms = {"queue_s": queue, "prefill_s": prefill, "interference_s": interference}
        return PathCost(ready, ready, ready + interference, terms)

    def decide(
        self, *, prompt_tokens: int, decode_worker: WorkerId, decode_cached_tokens: int,
        decode_queued_tokens: float, decode_running: int, prefill_worker: WorkerId | None = None,
        prefill_cached_tokens: int = 0, prefill_queued_tokens: float = 0.0, now: float | None = None,
    ) -> Decision:
        """Remote prefill on `prefill_worker` or local prefill on `decode_worker` for one prompt.
        Cached token counts are what each worker will really reuse (whole blocks, at least one token left)."""
        local = self.local(
            decode_worker, prompt_tokens - decode_cached_tokens, decode_queued_tokens, decode_running, now
        )
        if prefill_worker is None:
            return Decision(False, local, None)
        remote = self.remote(
            prefill_worker, prompt_tokens - prefill_cached_tokens, prefill_queued_tokens,
            prompt_tokens - decode_cached_tokens, now,
        )
        return Decision(remote.cost_s < local.cost_s, local, remote)
