"""A sweep's run ended once its verdict is certain, and a bench cut short resumed from the runs it kept."""

from __future__ import annotations

import json
import time

import pytest

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.bench.cli import main
from splitserve.workload.record import RequestRecord
from splitserve.workload.slo import SLO, certain_miss, meets_slo, misses_allowed
from tests.bench.test_client import run, specs

SLOS = st.builds(SLO, st.one_of(st.none(), st.floats(0.05, 2)), st.one_of(st.none(), st.floats(0.01, 0.5)),
                 st.one_of(st.none(), st.floats(0.05, 1)))


@settings(max_examples=300, deadline=None)
@given(slo=SLOS, sent=st.floats(0, 5), first=st.floats(0.001, 3), gaps=st.lists(st.floats(0.001, 1.2), max_size=12),
       asked=st.integers(1, 14), cuts=st.lists(st.floats(0, 20), max_size=6))
def test_a_certain_miss_is_never_taken_back(slo, sent, first, gaps, asked, cuts):
    """Whatever happens after `now`, a request called a certain miss at `now` misses the SLO when it ends;
    and once ended, it is a certain miss exactly when it misses."""
    gaps = gaps[: asked - 1]
    times = list(sent + first + np.concatenate([[0.0], np.cumsum(gaps)]))
    final = RequestRecord(0, 0.0, 10, asked, sent_s=sent, first_token_s=times[0], token_times_s=times, end_s=times[-1],
                          completion_tokens=len(times), status=200)
    missed = not meets_slo(final, slo)
    assert certain_miss(final, slo, times[-1] + 1) == missed
    for cut in cuts:
        now = sent + cut
        seen = [t for t in times if t <= now]
        if now >= times[-1]:
            continue
        partial = RequestRecord(0, 0.0, 10, asked, sent_s=sent, first_token_s=seen[0] if seen else None,
                                token_times_s=seen, status=200 if seen else 0)
        if certain_miss(partial, slo, now):
            assert missed, (partial, now, final)


def test_misses_allowed_is_the_last_count_that_still_passes():
    assert misses_allowed(20, 0.9) == 2 and misses_allowed(10, 0.9) == 1 and misses_allowed(3, 1.0) == 0
    assert misses_allowed(7, 0.5) == 3  # 4 of 7 is the last passing share (0.571); 3 of 7 fails


def test_a_run_stops_once_its_verdict_is_certain(fake_server):
    server = fake_server(token_delay_s=0.2)  # 20 tokens: 4 s a request, each token 4x the TPOT target
    slo = SLO(tpot_s=0.05)
    seen: list[int] = []

    def stop(records, now):
        seen.append(sum(certain_miss(r, slo, now) for r in records))
        return seen[-1] > misses_allowed(len(records), 0.9)

    records = run(server, specs(10, gap_s=0.3, output_len=20), stop_when=stop)
    allowed = misses_allowed(10, 0.9)
    assert seen[-1] > allowed and max(seen[:-1]) <= allowed  # stopped at the first look past the allowance
    # Cut short: each ended before its last token could have come (19 more tokens 0.2 s apart after its first;
    # a loaded machine only makes the server slower, so this holds at any load, unlike a wall-clock bound).
    assert all(r.first_token_s is None or r.end_s < r.first_token_s + 19 * 0.2 for r in records)
    assert {r.error_kind for r in records} == {"stopped"}
    assert any(r.sent_s is None for r in records) and any(r.first_token_s is not None for r in records)


def sweep_argv(server, tiny_checkpoint, out, *extra):
    return ["--no-progress", "--url", server.url, "--tokenizer", str(tiny_checkpoint), "--num-requests", "6",
            "--isl", "20", "--osl", "12", "--slo-tpot", "0.1", "--slo-gap", "0.3",
            "--sweep", "--rate-lo", "1", "--rate-hi", "40",
            "--arrival", "gamma", "--burstiness", "0.01",  # near-even gaps: no chance pile-up at the lowest rate
            "--trials", "1", "--resolution", "20", "--stop-certain", "--out", str(out), *extra]


def test_a_sweep_stops_its_failing_runs_but_not_its_lowest_rate_and_resumes(capsys, fake_server, tiny_checkpoint, tmp_path):
    # A request alone gets a token every 10 ms, far within the targets even on a loaded machine; six at once
    # (rate 40: all six arrive within ~0.2 s) get one every 0.5 s, over both.
    server = fake_server(token_delay_s=0.01, token_delay_per_in_flight_s=0.1)
    assert main(sweep_argv(server, tiny_checkpoint, tmp_path)) == 0
    doc = json.loads((tmp_path / "result.json").read_text())
    runs = {r["rate"]: [rec["error_kind"] for rec in r["records"]] for r in doc["runs"]}
    assert runs[1.0] == [None] * 6  # the lowest rate ran whole
    assert "stopped" in runs[40.0]  # the overloaded top of the bracket was cut short
    first = doc["sweep"]
    sent = len(server.behaviour.received)
    kept = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(kept) == len(doc["runs"])

    # Resumed: every run is read back, nothing is sent, and the sweep comes out the same.
    assert main(sweep_argv(server, tiny_checkpoint, tmp_path, "--resume")) == 0
    assert len(server.behaviour.received) == sent
    again = json.loads((tmp_path / "result.json").read_text())
    assert again["sweep"] == first
    assert [r["started_unix"] for r in again["runs"]] == [r["started_unix"] for r in doc["runs"]]  # kept, not retaken

    # One run lost: only that run is measured again. A different load keeps nothing.
    (tmp_path / "runs" / kept[0]).unlink()
    assert main(sweep_argv(server, tiny_checkpoint, tmp_path, "--resume")) == 0
    assert 0 < len(server.behaviour.received) - sent <= 6
    sent = len(server.behaviour.received)
    assert main([*sweep_argv(server, tiny_checkpoint, tmp_path, "--resume"), "--seed", "7"]) == 0
    assert len(server.behaviour.received) - sent >= 6  # the lowest rate's run, whole, at least
    assert all(json.loads(f.read_text())["key"]["load"]["seed"] == 7 for f in (tmp_path / "runs").iterdir())


# How long a stopped run's requests linger on the server. Waiting for them costs the client up to that much a
# run, so 2 s where it waits. Where it does not, the next run must start within it: a client on a loaded
# machine took more than 2 s to (a niced test beside a busy benchmark), so 10 s there, which costs nothing.
@pytest.mark.parametrize("idle_timeout, waits, linger_s", [("120", True, 2.0), ("0", False, 10.0)])
def test_each_run_waits_for_the_server_to_finish_what_a_stopped_run_left(fake_server, tiny_checkpoint, tmp_path,
                                                                          idle_timeout, waits, linger_s):
    """A stopped run's requests stay on the server for a while (their steps finish): the next run starts only
    once its /metrics show nothing in flight, so no request of it arrives while they do; with
    --idle-timeout 0 the next run starts at once and some do."""
    server = fake_server(token_delay_s=0.01, token_delay_per_in_flight_s=0.1, metrics=True, linger_s=linger_s)
    assert main(sweep_argv(server, tiny_checkpoint, tmp_path, "--idle-timeout", idle_timeout)) == 0
    doc = json.loads((tmp_path / "result.json").read_text())
    assert any("stopped" in [rec["error_kind"] for rec in r["records"]] for r in doc["runs"][:-1])
    assert (max(server.behaviour.lingering_at_receipt) == 0) is waits


def test_a_runs_unix_zero_is_its_clock_zero_however_slow_the_client_is_to_set_up(monkeypatch, fake_server,
                                                                                tiny_checkpoint, tmp_path):
    """Its records' times plus started_unix give Unix times that line up with the server's: a client that
    takes seconds to set up (an SSL context, a cold import) does not shift them by those seconds."""
    import httpx

    made = httpx.AsyncClient.__init__

    def slow(self, *args, **kwargs):
        time.sleep(3.0)  # far over a loopback request's latency even at load 10
        made(self, *args, **kwargs)

    monkeypatch.setattr(httpx.AsyncClient, "__init__", slow)
    server = fake_server()
    argv = ["--no-progress", "--url", server.url, "--tokenizer", str(tiny_checkpoint), "--num-requests", "2",
            "--isl", "8", "--osl", "4", "--out", str(tmp_path)]
    assert main(argv) == 0
    (run_doc,) = json.loads((tmp_path / "result.json").read_text())["runs"]
    for rec, seen in zip(run_doc["records"], server.behaviour.received_unix):
        # Sent no later than seen (the clocks tick apart by microseconds), and not a setup's seconds before.
        assert -1.5 < seen - (run_doc["started_unix"] + rec["sent_s"]) < 1.5


def test_resume_without_an_output_folder_is_refused(capsys, fake_server, tiny_checkpoint):
    server = fake_server()
    assert main(["--no-progress", "--url", server.url, "--tokenizer", str(tiny_checkpoint), "--resume"]) != 0
    assert "resume needs an output folder" in capsys.readouterr().err
