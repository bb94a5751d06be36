"""splitserve.bench.client against a fake OpenAI SSE server: what it sends, what it records, how it fails."""

from __future__ import annotations

import asyncio
import time

import pytest

from splitserve.bench.client import EndpointError, Target, resolve_model, run_load
from splitserve.workload.slo import summarize
from splitserve.workload.requests import RequestSpec


def specs(n: int, gap_s: float = 0.0, input_len: int = 20, output_len: int = 5) -> list[RequestSpec]:
    return [RequestSpec(i * gap_s, input_len, output_len, (), 16) for i in range(n)]


def prompt_of(i: int) -> list[int]:
    return [10 + i] * 20


def run(server, reqs, **kw):
    target = Target(server.url, server.behaviour.model, kw.pop("ignore_eos", True))
    return asyncio.run(run_load(target, reqs, kw.pop("prompt_of", prompt_of), **kw))


def test_streams_are_recorded_token_by_token_with_usage(fake_server):
    server = fake_server(token_delay_s=0.01)
    records = run(server, specs(3, output_len=6))
    for r in records:
        assert r.ok and r.status == 200
        assert r.completion_tokens == 6 and len(r.token_times_s) == 6
        assert r.sent_s < r.first_token_s == r.token_times_s[0] <= r.token_times_s[-1] <= r.end_s
        assert r.prompt_tokens == 20
        assert r.cached_tokens == 0  # prompts share nothing
    body = server.behaviour.received[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["max_tokens"] == 6 and len(body["prompt"]) == 20


@pytest.mark.parametrize("text", ["\u2028", "\x85", "\x1c", "\x0b"])
def test_a_token_whose_text_splits_lines_in_python_does_not_break_the_event(fake_server, text):
    """SSE ends a line at CR or LF only; str.splitlines (and httpx's aiter_lines) also at these, which a
    JSON string may hold raw: a model's text broke an event in two ('malformed event', issue 19's smoke run)."""
    server = fake_server(text=text)
    (r,) = run(server, specs(1, output_len=4))
    assert r.ok and len(r.token_times_s) == 4, r.error


def test_no_ignore_eos_leaves_the_field_out(fake_server):
    server = fake_server()
    run(server, specs(1), ignore_eos=False)
    assert "ignore_eos" not in server.behaviour.received[0]


def test_shared_prefix_reports_cached_tokens(fake_server):
    server = fake_server()
    same = [1] * 40
    records = run(server, specs(2, gap_s=0.2, input_len=40), prompt_of=lambda i: same)
    assert [r.cached_tokens for r in records] == [0, 32]


def test_without_usage_tokens_are_counted_from_chunks(fake_server):
    server = fake_server(report_usage=False)
    (r,) = run(server, specs(1, output_len=4))
    assert r.ok and r.completion_tokens == 4 and r.cached_tokens is None and r.prompt_tokens is None


def test_outputs_cut_short_are_counted(fake_server):
    server = fake_server(max_output=3)
    records = run(server, specs(2, output_len=5))
    assert all(r.ok and r.completion_tokens == 3 for r in records)
    assert summarize(records).short_outputs == 2


def test_http_errors_are_counted_per_status_and_never_retried(fake_server):
    server = fake_server(fail_status={1: 429, 2: 500, 4: 429})
    records = run(server, specs(6, gap_s=0.01))
    assert summarize(records).errors == {"HTTP 429": 2, "HTTP 500": 1}
    assert len(server.behaviour.received) == 6
    failed = [r for r in records if not r.ok]
    assert all("injected" in r.error for r in failed)


def test_refusals_are_retried_after_their_retry_after_when_asked(fake_server):
    server = fake_server(fail_status={0: 429, 1: 503, 3: 429, 4: 429, 5: 429}, retry_after="0.3")
    first, second = run(server, specs(2, gap_s=1.0), retries=2)
    assert first.ok and first.retries == 2
    # Latency counts from the first send: the two waits are in its TTFT.
    assert first.first_token_s - first.sent_s >= 0.6
    assert not second.ok and second.status == 429 and second.retries == 2  # three refusals: out of retries
    assert len(server.behaviour.received) == 6


def test_a_broken_stream_is_a_stream_error(fake_server):
    server = fake_server(break_stream={0})
    (r,) = run(server, specs(1))
    assert r.error_kind == "stream" and r.status == 200 and not r.ok


def test_request_timeout(fake_server):
    server = fake_server(token_delay_s=0.5)
    t = time.monotonic()
    (r,) = run(server, specs(1, output_len=10), timeout_s=0.3)
    assert r.error_kind == "timeout" and time.monotonic() - t < 3


def test_deadline_ends_the_run_and_records_unsent_requests(fake_server):
    server = fake_server(token_delay_s=0.2)
    t = time.monotonic()
    records = run(server, specs(5, gap_s=2.0, output_len=10), deadline_s=0.5)
    assert time.monotonic() - t < 3
    assert records[0].error_kind == "deadline"
    assert all(r.error_kind == "unsent" and r.sent_s is None for r in records[1:])


def test_open_loop_sends_on_schedule_without_waiting_for_replies(fake_server):
    server = fake_server(first_token_delay_s=1.0)
    records = run(server, specs(4, gap_s=0.1))
    # Never early, and late by far less than a reply takes (a loaded CI machine delays a send by tens of ms;
    # a client that waited for replies would be a second late).
    for r in records:
        assert r.scheduled_s - 0.01 <= r.sent_s < r.scheduled_s + 0.5
    assert records[3].sent_s < records[0].first_token_s  # sent while the first was still waiting
    assert server.behaviour.max_in_flight == 4


def test_closed_loop_keeps_exactly_n_in_flight(fake_server):
    server = fake_server(first_token_delay_s=0.05)
    records = run(server, specs(8, gap_s=100.0), concurrency=2)  # arrival times are ignored
    assert all(r.ok for r in records)
    assert server.behaviour.max_in_flight == 2


def test_the_run_reports_its_clock_zero_in_unix_time_for_lining_up_with_server_logs(fake_server):
    server = fake_server()
    before = time.time()
    zero: list[float] = []
    records = run(server, specs(3, gap_s=0.2), on_start=zero.append)
    assert len(zero) == 1 and before <= zero[0]
    # Sent (by the run's clock, from its zero) no later than the server saw it: a zero taken before the
    # client was set up would put every send early by that setup's time.
    for rec, seen in zip(records, server.behaviour.received_unix):
        assert zero[0] + rec.sent_s <= seen + 0.002  # time.time() and perf_counter tick apart by microseconds


def test_connection_refused_is_recorded_not_raised(fake_server):
    from tests.bench.fake_server import free_port

    target = Target(f"http://127.0.0.1:{free_port()}", "m")
    (r,) = asyncio.run(run_load(target, specs(1), prompt_of))
    assert r.error_kind == "connect" and r.status == 0


def test_model_resolution(fake_server):
    server = fake_server(model="m1")
    assert resolve_model(server.url, None) == "m1"
    assert resolve_model(server.url, "m1") == "m1"
    with pytest.raises(EndpointError, match="it serves: m1"):
        resolve_model(server.url, "other")
