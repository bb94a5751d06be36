"""benchmarks.vs_vllm_steps' reading of a batch: only the steps after every prompt's first token count."""

from __future__ import annotations

import pytest

from benchmarks.vs_vllm_steps import decode_gaps
from splitserve.workload.record import RequestRecord


def record(i: int, times: list[float]) -> RequestRecord:
    return RequestRecord(i, 0.0, 1024, len(times), sent_s=0.0, first_token_s=times[0], token_times_s=times,
                         end_s=times[-1], completion_tokens=len(times), status=200)


def test_gaps_before_the_last_prefill_are_left_out():
    # Request 0 decodes alone (0.05 s steps) until request 1's prompt is in (its first token at 1.0 s), then
    # both decode at 0.08 s a step; the 0.4 s gap is request 1's prefill inside request 0's stream.
    a = record(0, [0.5, 0.55, 0.6, 1.0, 1.08, 1.16])
    b = record(1, [1.0, 1.08, 1.16])
    assert decode_gaps([a, b]) == pytest.approx([0.08, 0.08, 0.08, 0.08])


def test_a_failed_request_is_no_clean_batch():
    bad = RequestRecord(1, 0.0, 1024, 3, status=429, error_kind="http", error="busy")
    with pytest.raises(RuntimeError, match="HTTP 429"):
        decode_gaps([record(0, [0.5, 0.6]), bad])
