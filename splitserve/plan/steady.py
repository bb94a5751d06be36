"""The steady-state rule many planners use, reported beside the tail rule: mean TTFT and mean TPOT within
the targets (failed requests at most 1 %), and a stable queue. `SteadyWatch` follows a run's judged requests
and says when that rule is certain to fail however the run goes on, so that a probe above the steady-state
limit stops there (the answer is the full run's; only the CPU time differs)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from splitserve.workload.record import RequestRecord
from splitserve.workload.slo import SLO, tpot, ttft

MAX_FAILED = 0.01  # of the judged requests: more fail the rule
_MARGIN = 1 + 1e-9  # a bound summed in another order than the final mean may round the other way: never stop on that


def steady_state(recs: Sequence[RequestRecord], slo: SLO) -> bool:
    """Mean TTFT and mean TPOT within the targets (failed requests at most 1 %). Stricter rules put a tail
    of requests over the target long before the means get there: this one is the lenient figure beside
    the tail rule (`attainment` of requests within both)."""
    ttfts = [v for r in recs if (v := ttft(r)) is not None]
    tpots = [v for r in recs if r.ok and (v := tpot(r)) is not None]
    if not ttfts or len(ttfts) < (1 - MAX_FAILED) * len(recs):
        return False
    return float(np.mean(ttfts)) <= slo.ttft_s and (not tpots or float(np.mean(tpots)) <= slo.tpot_s)


class SteadyWatch:
    """Lower bounds, while a simulation runs, on the two means `steady_state` takes over the judged requests:
    a request without its first token has waited at least until now, one decoding has a TPOT of at least
    (now - first token) / (tokens - 1); one not yet arrived adds nothing. The denominators are the most the
    means can be taken over (refused requests leave them). Once a bound passes its target, or more than 1 %
    are refused, the rule is certain to fail (`certain`). In simulation a request fails only by being
    refused when it arrives; whatever arrives is served to its end."""

    def __init__(self, slo: SLO, output_lens: Sequence[int]) -> None:
        self.slo = slo
        self.n = len(output_lens)  # judged requests
        self.n_tpot = sum(1 for n in output_lens if n >= 2)  # of them, those with a TPOT
        self.n_refused = self.n_refused_tpot = 0
        self.ttft_sum = 0.0  # first tokens seen
        self.waiting, self.waiting_sent = 0, 0.0  # arrived, no first token: count and sum of send times
        self.tpot_sum = 0.0  # finished requests' TPOT
        self.decoding: dict[int, tuple[float, float]] = {}  # index -> (1 / (tokens - 1), first token / (tokens - 1))
        self.dec_a = self.dec_b = 0.0  # sums over `decoding`

    def arrived(self, rec: RequestRecord) -> None:
        self.waiting += 1
        self.waiting_sent += rec.sent_s

    def refused(self, rec: RequestRecord) -> None:
        self.waiting -= 1
        self.waiting_sent -= rec.sent_s
        self.n_refused += 1
        self.n_refused_tpot += rec.output_len >= 2

    def first_token(self, rec: RequestRecord) -> None:
        self.waiting -= 1
        self.waiting_sent -= rec.sent_s
        self.ttft_sum += rec.first_token_s - rec.sent_s
        if rec.output_len >= 2:
            a = 1.0 / (rec.output_len - 1)
            self.decoding[rec.index] = (a, rec.first_token_s * a)
            self.dec_a += a
            self.dec_b += rec.first_token_s * a

    def finished(self, rec: RequestRecord) -> None:
        ab = self.decoding.pop(rec.index, None)
        if ab is not None:
            self.dec_a -= ab[0]
            self.dec_b -= ab[1]
        if (v := tpot(rec)) is not None:
            self.tpot_sum += v

    def certain(self, now: float) -> bool:
        if self.n_refused > MAX_FAILED * self.n:
            return True
        ttft_low = self.ttft_sum + self.waiting * now - self.waiting_sent
        if ttft_low > self.slo.ttft_s * (self.n - self.n_refused) * _MARGIN:
            return True
        tpot_low = self.tpot_sum + now * self.dec_a - self.dec_b
        return tpot_low > self.slo.tpot_s * (self.n_tpot - self.n_refused_tpot) * _MARGIN
