"""bench against a real `splitserve serve` on a tiny random checkpoint: replay, prefix caching, summary
consistency, a small goodput sweep."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from rich.console import Console

from splitserve.workload.slo import SLO
from splitserve.bench.report import compare
from splitserve.bench.results import read_json
from splitserve.bench import BenchConfig, SweepConfig, TraceLoad, run_bench
from splitserve.workload.requests import LengthDist, Scaling, SyntheticSpec
from tests.bench.conftest import AZURE, MOONCAKE, REPO
from tests.bench.fake_server import free_port
from tests.bench.independent import assert_summary_matches
from tests.bench.trace_files import write_azure, write_mooncake

pytestmark = pytest.mark.skipif(
    not (REPO / "splitserve" / "cli.py").is_file(), reason="splitserve/cli.py (`splitserve serve`) does not exist yet"
)

STARTUP_TIMEOUT_S = 120
MAX_RUNNING, MAX_WAITING = 2, 6


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """`python -m splitserve serve` (one colocated engine) on a free port; yields its base URL; killed at teardown.

    Two running and six waiting requests at most: a burst beyond that is refused with 429, which gives the
    sweep test a rate that fails for certain on any machine, however fast."""
    port = free_port()
    log = (tmp_path_factory.mktemp("serve") / "serve.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "splitserve", "serve", "--model", str(tiny_checkpoint), "--host", "127.0.0.1",
         "--port", str(port), "--in-process", "--max-num-seqs", str(MAX_RUNNING), "--max-waiting", str(MAX_WAITING)],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"splitserve serve exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"splitserve serve not healthy within {STARTUP_TIMEOUT_S} s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def bench(server: str, tiny_checkpoint: Path, load, **kw):
    return run_bench(BenchConfig(load=load, url=server, tokenizer=str(tiny_checkpoint), timeout_s=60, **kw))


def test_mooncake_replay_shares_prefixes_in_the_server_cache(server, tiny_checkpoint, tmp_path):
    # Scaled by 1/32, each 512-token hash block becomes 16 tokens: one server KV block.
    rows = [
        (0, 2048, 64, [0, 1, 2, 3]),
        (1000, 2560, 64, [0, 1, 2, 3, 4]),  # shares blocks 0-3 with the first
        (2000, 1024, 32, [0, 1]),  # entirely inside the first's prefix
        (3000, 1536, 64, [10, 11, 12]),  # shares nothing
    ]
    trace = write_mooncake(tmp_path / "t.jsonl", rows)
    result = bench(server, tiny_checkpoint, TraceLoad(str(trace), "mooncake", Scaling(time_scale=0.3, length_scale=1 / 32)))
    records = result.runs[0].records
    assert all(r.ok for r in records), [r.error for r in records]
    assert [r.prompt_tokens for r in records] == [64, 80, 32, 48]
    assert [r.completion_tokens for r in records] == [2, 2, 1, 2]
    cached = [r.cached_tokens for r in records]
    assert cached[0] == 0 and cached[3] == 0
    assert cached[1] >= 64
    assert cached[2] > 0
    assert any("16 tokens" in n for n in result.runs[0].workload.notes)


def test_azure_replay(server, tiny_checkpoint, tmp_path):
    rows = [("2023-11-16 18:17:03.9799600", 480, 10), ("2023-11-16 18:17:04.0319600", 318, 8),
            ("2023-11-16 18:17:04.4781490", 110, 27)]
    trace = write_azure(tmp_path / "t.csv", rows)
    result = bench(server, tiny_checkpoint, TraceLoad(str(trace), "azure", Scaling(length_scale=0.5)))
    records = result.runs[0].records
    assert all(r.ok for r in records), [r.error for r in records]
    assert [(r.prompt_tokens, r.completion_tokens) for r in records] == [(240, 5), (159, 4), (55, 14)]
    assert records[2].sent_s - records[0].sent_s == pytest.approx(0.498, abs=0.1)


def test_shared_traces_replay(server, tiny_checkpoint, shared_traces):
    # Its first ten requests share one 3 s arrival bucket: jitter spreads them as the trace's README advises.
    moon = bench(server, tiny_checkpoint, TraceLoad(str(MOONCAKE), "auto", Scaling(0.1, 1 / 32, 6, jitter_s=3.0)))
    azure = bench(server, tiny_checkpoint, TraceLoad(str(AZURE), "auto", Scaling(0.5, 1 / 16, max_requests=6)))
    for result in (moon, azure):
        assert result.summary.num_ok == 6, result.summary.errors
    # The first Mooncake requests all open with hash block 0: later ones find it cached.
    assert moon.summary.cached_tokens > 0


def test_summary_equals_independent_computation_from_records(server, tiny_checkpoint, tmp_path):
    load = SyntheticSpec(rate=15.0, input=LengthDist("lognormal", 60, 0.6), output=LengthDist("uniform", 8, 0.5),
                         shared_prefix_ratio=0.5, num_requests=12, seed=2)
    slo = SLO(ttft_s=0.1, tpot_s=0.01)
    result = bench(server, tiny_checkpoint, load, slo=slo, out_dir=tmp_path)
    records = result.runs[0].records
    assert result.summary.num_ok == 12
    assert_summary_matches(result.summary, records, slo.ttft_s, slo.tpot_s)
    doc = read_json(tmp_path / "result.json")
    assert doc["summary"]["ttft"]["p90"] == pytest.approx(result.summary.ttft.p90)
    assert len(doc["runs"][0]["records"]) == 12


def test_tiny_sweep_finds_goodput_within_its_bounds(server, tiny_checkpoint, tmp_path):
    # Twelve requests of 16 output tokens: a few at a time at 6 req/s; at 1000 req/s all arrive while the first
    # two still decode, and the server's queue cap refuses some. With every request required to succeed,
    # rate_lo passes and rate_hi fails: then two halvings.
    load = SyntheticSpec(rate=1.0, input=LengthDist("fixed", 30), output=LengthDist("fixed", 16), num_requests=12)
    sweep = SweepConfig(rate_lo=6.0, rate_hi=1000.0, trials=1, resolution=300.0)
    result = bench(server, tiny_checkpoint, load, slo=SLO(ttft_s=10.0), attainment=1.0, sweep=sweep, out_dir=tmp_path)
    s = result.sweep
    assert s is not None
    probes = {p.rate: p for p in s.probes}
    assert list(probes)[:3] == [6.0, 1000.0, 503.0] and len(probes) == 4  # then 254.5 or 751.5
    assert probes[6.0].passed and not probes[1000.0].passed
    assert 6.0 <= s.goodput < 1000.0 and s.goodput == s.lower and probes[s.lower].passed
    assert not probes[s.upper].passed and s.upper - s.lower <= 300.0
    busiest = next(run for run in result.runs if run.rate == 1000.0)
    assert "HTTP 429" in busiest.summary.errors  # refused, counted per status, not retried
    assert len(result.runs) == 4
    assert (tmp_path / "sweep.png").is_file()
    out = io.StringIO()
    compare(tmp_path / "result.json", tmp_path / "result.json", Console(file=out, width=200))
    assert "goodput (req/s)" in out.getvalue()


def test_cli_against_the_server(server, tiny_checkpoint, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "splitserve", "bench", "--url", server, "--tokenizer", str(tiny_checkpoint),
         "--num-requests", "3", "--rate", "10", "--isl", "30", "--osl", "3", "--no-progress", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "TTFT" in proc.stdout
    assert read_json(tmp_path / "result.json")["target"]["model"] == tiny_checkpoint.name
