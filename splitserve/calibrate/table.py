"""A calibration: this machine's hardware, the model profiled, the fitted efficiencies and the timed points.

What `splitserve plan --calibration FILE`, the simulator and `benchmarks/sim_accuracy.py` read: loading one
needs neither torch nor the engine (`profile.py` makes one).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from splitserve.core.model_spec import ModelSpec
from splitserve.sim.hardware import Hardware, PresetError
from splitserve.sim.perf import Efficiency, PerfModel

Batch = list[tuple[int, int, bool]]  # (new tokens, cached tokens, samples) per sequence


def step_kind(new_tokens: Iterable[int]) -> str:
    """"prefill" for a step that computes prompt tokens (with or without decodes beside them), else "decode"."""
    return "prefill" if any(n > 1 for n in new_tokens) else "decode"


@dataclass
class Point:
    kind: str  # "prefill" or "decode"
    batch: Batch
    seconds: float  # median over repeats
    predicted: float = 0.0


@dataclass
class Calibration:
    hardware: Hardware
    model: ModelSpec
    efficiency: Efficiency
    points: list[Point]
    median_rel_err: float
    p90_rel_err: float
    machine: dict = field(default_factory=dict)

    def perf(self, tp: int = 1) -> PerfModel:
        return PerfModel(self.model, self.hardware, tp, self.efficiency)

    def to_json(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        p = Path(path)
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
            return cls(
                hardware=Hardware(**d["hardware"]),
                model=ModelSpec(**d["model"]),
                # Fields a newer version dropped (a run-queue `slowdown`, always 1 in a calibration) are ignored.
                efficiency=Efficiency(**{k: v for k, v in d["efficiency"].items() if k in Efficiency.__dataclass_fields__}),
                points=[Point(x["kind"], [tuple(s) for s in x["batch"]], x["seconds"], x.get("predicted", 0.0)) for x in d["points"]],
                median_rel_err=d["median_rel_err"],
                p90_rel_err=d["p90_rel_err"],
                machine=d.get("machine", {}),
            )
        except FileNotFoundError:
            raise PresetError(f"calibration file not found: {p}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise PresetError(f"{p}: not a calibration file from `splitserve plan calibrate` ({e})") from None


def cpu_hardware(flops: float, bandwidth: float, mem_bytes: float, threads: int) -> Hardware:
    """The hardware of a calibration on this CPU: its measured peaks, one device, no link."""
    return Hardware(f"cpu ({threads} thread{'s' if threads > 1 else ''})", flops, bandwidth, mem_bytes, 1e30, 0.0,
                    gpus_per_node=1, source="measured by splitserve plan calibrate")
