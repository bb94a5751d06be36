"""The one workload definition shared by `bench` and `plan`: traces and synthetic loads as RequestSpecs.

Pure: reads the trace file and nothing else, draws randomness only from the given seed, never a clock.
Every change made to the source (scaling, truncation, jitter, clamping) is written down in `notes`, so a
result always says exactly what was served.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Literal

import numpy as np

MOONCAKE_BLOCK_TOKENS = 512  # Mooncake's hash_ids each name 512 prompt tokens (the last block may be partial)

TraceFormat = Literal["mooncake", "azure", "auto"]
ArrivalKind = Literal["poisson", "gamma"]
LengthKind = Literal["fixed", "uniform", "lognormal"]


class WorkloadError(ValueError):
    """Bad workload input (missing or malformed trace, bad row, bad parameter); the message says where."""


@dataclass(frozen=True)
class RequestSpec:
    arrival_s: float
    input_len: int
    output_len: int
    # Ids of the blocks the prompt starts with; equal ids mean equal tokens (a shared prefix).
    prefix_blocks: tuple[int, ...] = ()
    block_tokens: int = MOONCAKE_BLOCK_TOKENS


@dataclass(frozen=True)
class TraceRow:
    """One trace row as read, before any scaling: times in seconds from the trace's first request."""

    arrival_s: float
    input_len: int
    output_len: int
    hash_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Trace:
    path: str
    format: Literal["mooncake", "azure"]
    rows: tuple[TraceRow, ...]


@dataclass(frozen=True)
class Workload:
    requests: tuple[RequestSpec, ...]
    source: str
    notes: tuple[str, ...] = ()
    # Machine-readable twin of `notes` (the parameters that shaped this workload), for result files.
    params: dict[str, object] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_s - self.requests[0].arrival_s if self.requests else 0.0

    @property
    def mean_rate(self) -> float:
        """Requests per second over the arrival span (n - 1 gaps), inf when all arrive at once."""
        n = len(self.requests)
        return (n - 1) / self.duration_s if self.duration_s > 0 else math.inf


@dataclass(frozen=True)
class Scaling:
    """How a trace is shrunk to fit the machine at hand."""

    time_scale: float = 1.0  # arrival times are multiplied by this: > 1 stretches the trace (lower rate)
    length_scale: float = 1.0  # prompt and output lengths (and the prefix block size) are multiplied by this
    max_requests: int | None = None  # keep the first N requests
    max_duration_s: float | None = None  # keep requests arriving within this many (scaled) seconds
    jitter_s: float = 0.0  # spread each arrival uniformly over [t, t + jitter_s) of trace time (undo quantisation)
    seed: int = 0
    # Outputs' own scale (None: length_scale): a trace of long prompts shrunk to fit a small machine keeps
    # answers long enough to have something to decode (issue 19).
    # Last: callers build a Scaling positionally.
    output_scale: float | None = None


@dataclass(frozen=True)
class LengthDist:
    kind: LengthKind = "fixed"
    mean: float = 128.0
    # uniform: half-width as a fraction of the mean; lognormal: sigma of log(length).
    spread: float = 0.5

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "fixed":
            x = np.full(n, self.mean)
        elif self.kind == "uniform":
            x = rng.uniform(self.mean * (1 - self.spread), self.mean * (1 + self.spread), n)
        else:
            # Choose mu so that the lognormal's mean (not its median) is `mean`.
            x = rng.lognormal(math.log(self.mean) - self.spread**2 / 2, self.spread, n)
        return np.maximum(1, np.rint(x)).astype(np.int64)


@dataclass(frozen=True)
class SyntheticSpec:
    rate: float  # requests per second
    arrival: ArrivalKind = "poisson"
    burstiness: float = 1.0  # squared coefficient of variation of inter-arrival gaps (1 = Poisson)
    input: LengthDist = LengthDist("fixed", 128)
    output: LengthDist = LengthDist("fixed", 32)
    # Fraction of each prompt taken from a pool of `num_prefixes` shared prefixes (rounded down to whole blocks).
    shared_prefix_ratio: float = 0.0
    num_prefixes: int = 4
    block_tokens: int = 16
    num_requests: int | None = None
    duration_s: float | None = None
    seed: int = 0


# ---------------------------------------------------------------------------------------------- traces


def read_trace(path: str | Path, fmt: TraceFormat = "auto") -> Trace:
    """Parse and validate a whole trace file; any bad row raises WorkloadError naming the row."""
    p = Path(path)
    if not p.is_file():
        raise WorkloadError(f"trace file not found: {p}")
    if fmt == "auto":
        fmt = _detect_format(p)
    elif fmt not in ("mooncake", "azure"):
        raise WorkloadError(f"unknown trace format {fmt!r} (mooncake, azure or auto)")
    try:
        with p.open(newline="", encoding="utf-8") as f:
            rows = _read_mooncake(f, p) if fmt == "mooncake" else _read_azure(f, p)
    except UnicodeDecodeError as e:
        raise WorkloadError(f"{p}: not a text file ({e.reason})") from None
    if not rows:
        raise WorkloadError(f"{p}: no requests in trace")
    return Trace(str(p), fmt, tuple(sorted(rows, key=lambda r: r.arrival_s)))


def _detect_format(p: Path) -> Literal["mooncake", "azure"]:
    if p.suffix in (".jsonl", ".json"):
        return "mooncake"
    if p.suffix == ".csv":
        return "azure"
    with p.open(encoding="utf-8", errors="replace") as f:
        first = f.readline().lstrip()
    if first.startswith("{"):
        return "mooncake"
    if first.upper().startswith("TIMESTAMP"):
        return "azure"
    raise WorkloadError(f"{p}: cannot tell the trace format; pass --trace-format mooncake or azure")


def _number(value: object, where: str, name: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise WorkloadError(f"{where}: {name} is not a number: {value.strip()!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise WorkloadError(f"{where}: {name} is not a number: {value!r}")
    return float(value)


def _count(value: object, where: str, name: str) -> int:
    """A token count: a whole number >= 0."""
    x = _number(value, where, name)
    if x != int(x):
        raise WorkloadError(f"{where}: {name} is not a whole number: {value!r}")
    if x < 0:
        raise WorkloadError(f"{where}: {name} is negative: {int(x)}")
    return int(x)


def _read_mooncake(lines, p: Path) -> list[TraceRow]:
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{p} line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise WorkloadError(f"{where}: malformed JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise WorkloadError(f"{where}: expected a JSON object")
        missing = [k for k in ("timestamp", "input_length", "output_length") if k not in obj]
        if missing:
            raise WorkloadError(f"{where}: missing field(s) {', '.join(missing)}")
        hash_ids = obj.get("hash_ids", [])
        if not isinstance(hash_ids, list) or not all(isinstance(h, int) and not isinstance(h, bool) for h in hash_ids):
            raise WorkloadError(f"{where}: hash_ids must be a list of integers")
        rows.append(
            TraceRow(
                arrival_s=_number(obj["timestamp"], where, "timestamp") / 1000.0,
                input_len=_count(obj["input_length"], where, "input_length"),
                output_len=_count(obj["output_length"], where, "output_length"),
                hash_ids=tuple(hash_ids),
            )
        )
    if rows:
        t0 = min(r.arrival_s for r in rows)
        rows = [replace(r, arrival_s=r.arrival_s - t0) for r in rows]
    return rows


def _read_azure(f, p: Path) -> list[TraceRow]:
    reader = csv.reader(f)
    header = next(reader, None)
    columns = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
    if header is None or [h.strip().lstrip("\ufeff") for h in header[:3]] != list(columns):
        raise WorkloadError(f"{p} line 1: expected the header {','.join(columns)}, got {header}")
    stamps, rows = [], []
    for lineno, rec in enumerate(reader, 2):
        if not rec or not "".join(rec).strip():
            continue
        where = f"{p} line {lineno}"
        if len(rec) < 3:
            raise WorkloadError(f"{where}: expected 3 columns, got {len(rec)}")
        try:
            stamps.append(datetime.fromisoformat(rec[0].strip()))
        except ValueError:
            raise WorkloadError(f"{where}: TIMESTAMP is not a date-time: {rec[0]!r}") from None
        rows.append((_count(rec[1], where, "ContextTokens"), _count(rec[2], where, "GeneratedTokens")))
    # Differences of datetimes, not epoch floats: exact to the microsecond and blind to local-time changes.
    t0 = min(stamps, default=None)
    return [TraceRow((t - t0).total_seconds(), i, o) for t, (i, o) in zip(stamps, rows)]


def from_trace(trace: Trace, scaling: Scaling = Scaling()) -> Workload:
    """Scale and cut a parsed trace into a workload; `notes` lists every change."""
    s = scaling
    _check_positive(time_scale=s.time_scale, length_scale=s.length_scale, duration=s.max_duration_s,
                    output_scale=s.output_scale)
    out_scale = s.length_scale if s.output_scale is None else s.output_scale
    if s.jitter_s < 0:
        raise WorkloadError(f"jitter must be >= 0, got {s.jitter_s}")
    if s.max_requests is not None and s.max_requests < 1:
        raise WorkloadError(f"number of requests must be >= 1, got {s.max_requests}")
    notes = [f"trace {trace.path} ({trace.format}, {len(trace.rows)} requests)"]
    rows = list(trace.rows)
    times = np.array([r.arrival_s for r in rows])
    if s.jitter_s > 0:
        times = times + np.random.default_rng(s.seed).uniform(0.0, s.jitter_s, len(rows))
        notes.append(f"arrivals jittered uniformly within {s.jitter_s:g} s of trace time (seed {s.seed})")
    order = np.argsort(times, kind="stable")
    times = (times[order] - times[order].min()) * s.time_scale
    rows = [rows[i] for i in order]
    if s.time_scale != 1:
        notes.append(f"arrival times x{s.time_scale:g} (time_scale): request rate x{1 / s.time_scale:.4g}")

    block = MOONCAKE_BLOCK_TOKENS
    if s.length_scale != 1:
        block = max(1, round(MOONCAKE_BLOCK_TOKENS * s.length_scale))
        notes.append(f"prompt and output lengths x{s.length_scale:g} (length_scale), rounded, at least 1")
        if trace.format == "mooncake":
            notes.append(f"prefix block size scaled with them: {MOONCAKE_BLOCK_TOKENS} -> {block} tokens")
    if out_scale != s.length_scale:
        notes.append(f"output lengths x{out_scale:g} instead (output_scale)")

    keep = len(rows)
    if s.max_requests is not None:
        keep = min(keep, s.max_requests)
    if s.max_duration_s is not None:
        keep = min(keep, int(np.searchsorted(times, s.max_duration_s, side="right")))
    if keep < len(rows):
        notes.append(f"kept the first {keep} of {len(rows)} requests" + _cut_reason(s))
    if keep == 0:
        raise WorkloadError("no requests left after --num-requests/--duration")

    requests, raised = [], 0
    for t, r in zip(times[:keep], rows[:keep]):
        inp, out = round(r.input_len * s.length_scale), round(r.output_len * out_scale)
        raised += inp < 1 or out < 1
        inp, out = max(1, inp), max(1, out)
        nblocks = min(len(r.hash_ids), math.ceil(inp / block))
        requests.append(RequestSpec(float(t), inp, out, r.hash_ids[:nblocks], block))
    if raised:
        notes.append(f"{raised} request(s) had a length below 1 token after scaling, raised to 1")
    params = {
        "kind": "trace",
        "path": trace.path,
        "format": trace.format,
        "time_scale": s.time_scale,
        "length_scale": s.length_scale,
        "output_scale": out_scale,
        "block_tokens": block,
        "max_requests": s.max_requests,
        "max_duration_s": s.max_duration_s,
        "jitter_s": s.jitter_s,
        "seed": s.seed,
    }
    return Workload(tuple(requests), f"{trace.format} trace {trace.path}", tuple(notes), params)


def load_trace(path: str | Path, fmt: TraceFormat = "auto", scaling: Scaling = Scaling()) -> Workload:
    return from_trace(read_trace(path, fmt), scaling)


def at_rate(trace: Trace, scaling: Scaling, rate: float) -> Workload:
    """The trace, cut as `scaling` says, with its arrivals stretched or squeezed to a mean of `rate` req/s.

    The request set does not depend on the rate (only on max_requests), so a rate sweep compares like with like.
    """
    _check_positive(rate=rate)
    if scaling.max_duration_s is not None:
        raise WorkloadError("a rate sweep over a trace is bounded by the number of requests, not a duration")
    base = from_trace(trace, replace(scaling, time_scale=1.0))
    if not math.isfinite(base.mean_rate):
        raise WorkloadError("the selected trace requests all arrive at once: no rate to scale; take more requests")
    return from_trace(trace, replace(scaling, time_scale=base.mean_rate / rate))


def trial_workload(source: SyntheticSpec | Trace, scaling: Scaling, rate: float | None, trial: int) -> Workload:
    """The requests of one run of a sweep: `source` at `rate` (None: as given), trial `trial` of that rate,
    whose seed is moved by `trial` so that each trial draws its own requests. `scaling` cuts a trace and is
    ignored for a synthetic load. `splitserve bench` sends exactly these and `splitserve plan local`
    simulates exactly these, so a prediction and a measurement of the same flags judge the same requests."""
    if isinstance(source, SyntheticSpec):
        return synthetic(source if rate is None else replace(source, rate=rate, seed=source.seed + trial))
    if rate is None:
        return from_trace(source, scaling)
    return at_rate(source, replace(scaling, seed=scaling.seed + trial), rate)


def _cut_reason(s: Scaling) -> str:
    reasons = []
    if s.max_requests is not None:
        reasons.append(f"at most {s.max_requests} requests")
    if s.max_duration_s is not None:
        reasons.append(f"arrivals within {s.max_duration_s:g} s")
    return " (" + ", ".join(reasons) + ")"


def _check_positive(**values: float | None) -> None:
    for name, v in values.items():
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise WorkloadError(f"{name} must be a positive number, got {v}")


# ---------------------------------------------------------------------------------------------- synthetic


def synthetic(spec: SyntheticSpec) -> Workload:
    """Draw a synthetic workload: gamma arrivals (Poisson when burstiness is 1) and random lengths."""
    _validate_synthetic(spec)
    rng = np.random.default_rng(spec.seed)
    # Gamma gaps with shape k have mean k*theta and CV^2 = 1/k: burstiness b gives k = 1/b, theta = b/rate.
    shape = 1.0 / spec.burstiness
    cap = spec.num_requests if spec.num_requests is not None else _enough_for(spec)
    gaps = rng.gamma(shape, 1.0 / (spec.rate * shape), cap)
    times = np.concatenate([[0.0], np.cumsum(gaps[1:])])
    if spec.duration_s is not None:
        times = times[times <= spec.duration_s]
    n = len(times)
    inputs, outputs = spec.input.sample(rng, n), spec.output.sample(rng, n)
    prefix_ids = rng.integers(0, spec.num_prefixes, n)
    requests = []
    for i in range(n):
        nblocks = int(spec.shared_prefix_ratio * inputs[i]) // spec.block_tokens
        # Prefix p's j-th block gets id (p << 32) | j, so requests on one prefix share its leading blocks.
        blocks = tuple((int(prefix_ids[i]) << 32) | j for j in range(nblocks))
        requests.append(RequestSpec(float(times[i]), int(inputs[i]), int(outputs[i]), blocks, spec.block_tokens))
    notes = [
        f"synthetic: {spec.arrival} arrivals at {spec.rate:g} req/s (burstiness {spec.burstiness:g}), seed {spec.seed}",
        f"prompt lengths {_describe(spec.input)}; output lengths {_describe(spec.output)}",
    ]
    if spec.shared_prefix_ratio > 0:
        notes.append(
            f"{spec.shared_prefix_ratio:.0%} of each prompt (whole {spec.block_tokens}-token blocks) "
            f"from one of {spec.num_prefixes} shared prefixes"
        )
    params = {"kind": "synthetic", **asdict(spec)}
    return Workload(tuple(requests), "synthetic", tuple(notes), params)


def _enough_for(spec: SyntheticSpec) -> int:
    # Only a duration bounds the run: draw comfortably more arrivals than it can hold, then cut.
    assert spec.duration_s is not None
    expected = spec.rate * spec.duration_s
    return int(expected + 10 * math.sqrt(expected * max(1.0, spec.burstiness)) + 10)


def _validate_synthetic(spec: SyntheticSpec) -> None:
    _check_positive(rate=spec.rate, burstiness=spec.burstiness, duration=spec.duration_s)
    if spec.num_requests is None and spec.duration_s is None:
        raise WorkloadError("a synthetic load needs a number of requests or a duration")
    if spec.num_requests is not None and spec.num_requests < 1:
        raise WorkloadError(f"number of requests must be >= 1, got {spec.num_requests}")
    if spec.arrival == "poisson" and spec.burstiness != 1:
        raise WorkloadError("Poisson arrivals have burstiness 1; use --arrival gamma for another burstiness")
    if spec.arrival not in ("poisson", "gamma"):
        raise WorkloadError(f"unknown arrival process {spec.arrival!r} (poisson or gamma)")
    for name, d in (("prompt", spec.input), ("output", spec.output)):
        if d.kind not in ("fixed", "uniform", "lognormal"):
            raise WorkloadError(f"unknown {name} length distribution {d.kind!r} (fixed, uniform or lognormal)")
        if not d.mean >= 1:
            raise WorkloadError(f"mean {name} length must be >= 1, got {d.mean}")
        if d.kind == "uniform" and not 0 <= d.spread <= 1:
            raise WorkloadError(f"uniform {name} length spread must be in [0, 1], got {d.spread}")
        if d.kind == "lognormal" and not d.spread > 0:
            raise WorkloadError(f"lognormal {name} length sigma must be > 0, got {d.spread}")
    if not 0 <= spec.shared_prefix_ratio <= 1:
        raise WorkloadError(f"shared-prefix ratio must be in [0, 1], got {spec.shared_prefix_ratio}")
    if spec.num_prefixes < 1 or spec.block_tokens < 1:
        raise WorkloadError("the number of shared prefixes and the block size must be >= 1")


def _describe(d: LengthDist) -> str:
    if d.kind == "fixed":
        return f"fixed {d.mean:g}"
    if d.kind == "uniform":
        return f"uniform, mean {d.mean:g} +/- {d.spread:.0%}"
    return f"lognormal, mean {d.mean:g}, sigma {d.spread:g}"
