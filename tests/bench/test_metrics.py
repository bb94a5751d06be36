"""splitserve.workload.slo against an independent computation over varied synthetic records."""

from __future__ import annotations

import random

import pytest

from splitserve.workload.slo import SLO, meets_slo, summarize
from splitserve.workload.record import RequestRecord
from tests.bench.independent import assert_summary_matches


def make_records(seed: int, n: int = 200) -> list[RequestRecord]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        sent = rng.uniform(0, 10)
        r = RequestRecord(i, sent, rng.randint(1, 500), rng.randint(1, 50), sent_s=sent)
        kind = rng.random()
        if kind < 0.1:
            r.status, r.error_kind, r.error, r.end_s = rng.choice([429, 500, 503]), "http", "x", sent + 0.01
        elif kind < 0.13:
            r.error_kind, r.end_s = "timeout", sent + 5
        else:
            r.status = 200
            t = sent + rng.expovariate(5)
            r.first_token_s = t
            k = rng.choice([1, 1, 2, rng.randint(3, 40)])
            r.token_times_s = [t]
            for _ in range(k - 1):
                t += rng.expovariate(50)
                r.token_times_s.append(t)
            r.end_s = t + 0.001
            r.completion_tokens = k
            r.prompt_tokens = r.input_len
            r.cached_tokens = rng.choice([None, 0, 16])
        records.append(r)
    return records


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_summary_equals_independent_computation(seed):
    records = make_records(seed)
    slo = SLO(ttft_s=0.3, tpot_s=0.025)
    assert_summary_matches(summarize(records, slo), records, 0.3, 0.025)


def test_attainment_with_one_slo_only():
    records = make_records(5)
    assert_summary_matches(summarize(records, SLO(ttft_s=0.2)), records, 0.2, None)
    assert_summary_matches(summarize(records, SLO(tpot_s=0.02)), records, None, 0.02)
    assert summarize(records).attainment is None


def test_meets_slo_cases():
    ok = RequestRecord(0, 0.0, 10, 3, sent_s=0.0, first_token_s=0.1, token_times_s=[0.1, 0.2, 0.3], end_s=0.3,
                       completion_tokens=3, status=200)
    assert meets_slo(ok, SLO(0.1, 0.1))  # equal to the target meets it
    assert not meets_slo(ok, SLO(0.099, None))
    assert not meets_slo(ok, SLO(None, 0.099))
    one = RequestRecord(1, 0.0, 10, 1, sent_s=0.0, first_token_s=0.1, token_times_s=[0.1], end_s=0.1,
                        completion_tokens=1, status=200)
    assert meets_slo(one, SLO(0.2, 0.0001))  # no TPOT to miss
    failed = RequestRecord(2, 0.0, 10, 1, sent_s=0.0, end_s=0.1, status=500, error_kind="http")
    assert not meets_slo(failed, SLO(10, 10))


def test_errors_are_counted_per_status_and_kind():
    records = make_records(3)
    s = summarize(records)
    assert sum(s.errors.values()) == s.num_requests - s.num_ok
    assert set(s.errors) <= {"HTTP 429", "HTTP 500", "HTTP 503", "timeout"}


def test_empty_and_all_failed_runs_summarise_without_error():
    assert summarize([]).num_requests == 0
    failed = [RequestRecord(0, 0.0, 1, 1, sent_s=0.0, end_s=1.0, status=503, error_kind="http")]
    s = summarize(failed, SLO(1.0))
    assert s.ttft.count == 0 and s.ttft.p50 is None and s.attainment == 0.0 and s.errors == {"HTTP 503": 1}


def test_the_worst_gap_target_fails_a_request_stalled_once_whatever_its_mean():
    r = RequestRecord(0, 0.0, 10, 5, sent_s=0.0, first_token_s=0.5, token_times_s=[0.5, 0.6, 0.7, 1.9, 2.0],
                      end_s=2.0, completion_tokens=5, status=200)
    assert meets_slo(r, SLO(ttft_s=1.0, tpot_s=0.5))  # mean TPOT 0.375 s hides the 1.2 s stall
    assert not meets_slo(r, SLO(ttft_s=1.0, tpot_s=0.5, max_gap_s=1.0))
    assert meets_slo(r, SLO(max_gap_s=1.25))
    one = RequestRecord(1, 0.0, 10, 1, sent_s=0.0, first_token_s=0.5, token_times_s=[0.5], end_s=0.5,
                        completion_tokens=1, status=200)
    assert meets_slo(one, SLO(max_gap_s=0.01)) and SLO(max_gap_s=1.0).set
