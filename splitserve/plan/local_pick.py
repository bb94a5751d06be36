"""Which deployment of this machine to run for a load, and how sure the pick is (`splitserve plan local`).

Each deployment's goodput is simulated (local_deployments) at the calibration's speed, and again with every
step `band` slower and `band` faster. On this project's measurements a served engine ran its steps within
about ±10-25 % of the calibration (local_deployments' docstring), and a pick often turns on one request at an
SLO's edge: a winner that holds at both ends of the band is one to trust; one that does not is named with
the deployments it trades places with, so the user knows to measure those (`splitserve bench --sweep`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from splitserve.plan.local_deployments import Machine, Probe, RequestsAt, predict_goodput
from splitserve.workload.goodput import Bracket, Goodput
from splitserve.workload.slo import SLO


@dataclass(frozen=True)
class DeploymentGoodput:
    deployment: str
    nominal: Goodput[Probe]  # at the calibration's speed (and the machine's serving_speed, where given)
    slower: float  # goodput (the highest rate that passed; 0: none) with every step 1 + band times as long
    faster: float  # ... 1 - band times as long

    @property
    def goodput(self) -> float:
        return self.nominal.lower


@dataclass(frozen=True)
class LocalPick:
    band: float
    deployments: tuple[DeploymentGoodput, ...]

    def _best(self, attr: str) -> tuple[str, ...]:
        """The deployments with the highest goodput by `attr` (none when none passed the lowest rate)."""
        rates = {d.deployment: getattr(d, attr) for d in self.deployments}
        top = max(rates.values(), default=0.0)
        return tuple(name for name, rate in rates.items() if rate == top) if top > 0 else ()

    def _winner_at(self, attr: str) -> str | None:
        # A tie with the nominal winner keeps it: two deployments that both pass the bracket's top trade no places.
        best = self._best(attr)
        return self.winner if self.winner in best else best[0] if best else None

    @property
    def winner(self) -> str | None:
        """The deployment with the highest simulated goodput, the first named on a tie (None: none passed
        the bracket's lowest rate)."""
        best = self._best("goodput")
        return best[0] if best else None

    @property
    def winner_slower(self) -> str | None:
        return self._winner_at("slower")

    @property
    def winner_faster(self) -> str | None:
        return self._winner_at("faster")

    @property
    def robust(self) -> bool:
        """Whether the same deployment wins at the calibration's speed and at both ends of the band."""
        return self.winner == self.winner_slower == self.winner_faster

    def contenders(self) -> tuple[str, ...]:
        """Every deployment that wins somewhere in the band: the ones worth measuring before choosing."""
        found = (self.winner, self.winner_slower, self.winner_faster)
        return tuple(dict.fromkeys(name for name in found if name is not None))


def pick_deployment(machine: Machine, deployments: Sequence[str], requests_at: RequestsAt, slo: SLO,
                    bracket: Bracket, trials: int, target: float, band: float) -> LocalPick:
    """Each deployment's simulated goodput over the same requests and sweep, at the machine's speed and with
    every step `band` slower and faster (0 <= band < 1; at 0 all three are the nominal run)."""
    if not 0 <= band < 1:
        raise ValueError(f"the step-time band must be in [0, 1), got {band}")
    found = []
    for name in deployments:
        nominal = predict_goodput(machine, name, requests_at, slo, bracket, trials, target)
        if band:
            ends = [predict_goodput(replace(machine, step_scale=machine.step_scale * f), name, requests_at, slo,
                                    bracket, trials, target).lower for f in (1 + band, 1 - band)]
        else:
            ends = [nominal.lower, nominal.lower]
        found.append(DeploymentGoodput(name, nominal, *ends))
    return LocalPick(band, tuple(found))
