"""splitserve.workload.requests: trace parsing (both formats, bad rows), scaling, synthetic distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from splitserve.workload.requests import (
    LengthDist,
    Scaling,
    SyntheticSpec,
    WorkloadError,
    at_rate,
    load_trace,
    read_trace,
    synthetic,
)
from tests.bench.conftest import AZURE, MOONCAKE
from tests.bench.trace_files import write_azure, write_mooncake

MOONCAKE_ROWS = [
    (0, 1000, 10, [0, 1]),
    (0, 1500, 20, [0, 1, 2]),
    (3000, 600, 5, [3, 4]),
    (6000, 2048, 7, [0, 1, 2, 5]),
]
AZURE_ROWS = [
    ("2023-11-16 18:17:03.9799600", 4808, 10),
    ("2023-11-16 18:17:04.0319600", 3180, 8),
    ("2023-11-16 18:17:05.5000000", 110, 27),
]


@pytest.fixture
def mooncake(tmp_path):
    return write_mooncake(tmp_path / "t.jsonl", MOONCAKE_ROWS)


@pytest.fixture
def azure(tmp_path):
    return write_azure(tmp_path / "t.csv", AZURE_ROWS)


def test_mooncake_rows_parse_to_seconds_lengths_and_blocks(mooncake):
    w = load_trace(mooncake)
    assert [r.arrival_s for r in w.requests] == [0.0, 0.0, 3.0, 6.0]
    assert [(r.input_len, r.output_len) for r in w.requests] == [(i, o) for _, i, o, _ in MOONCAKE_ROWS]
    assert [r.prefix_blocks for r in w.requests] == [tuple(h) for *_, h in MOONCAKE_ROWS]
    assert all(r.block_tokens == 512 for r in w.requests)


def test_azure_rows_parse_relative_to_the_first_timestamp(azure):
    w = load_trace(azure)
    assert [r.arrival_s for r in w.requests] == [0.0, 0.052, 1.52004]
    assert [(r.input_len, r.output_len) for r in w.requests] == [(i, o) for _, i, o in AZURE_ROWS]
    assert all(r.prefix_blocks == () for r in w.requests)


def test_format_detected_from_content_when_the_suffix_says_nothing(tmp_path):
    m = write_mooncake(tmp_path / "a.trace", MOONCAKE_ROWS)
    a = write_azure(tmp_path / "b.trace", AZURE_ROWS)
    assert read_trace(m).format == "mooncake"
    assert read_trace(a).format == "azure"


def test_real_shared_traces_parse(shared_traces):
    moon = read_trace(MOONCAKE)
    assert len(moon.rows) == 12031
    first = moon.rows[0]
    assert (first.arrival_s, first.input_len, first.output_len, len(first.hash_ids)) == (0.0, 6758, 500, 14)
    assert all(len(r.hash_ids) == math.ceil(r.input_len / 512) for r in moon.rows[:200])
    assert moon.rows[-1].arrival_s == pytest.approx(3536.999)

    az = read_trace(AZURE)
    assert len(az.rows) == 8819
    assert (az.rows[0].arrival_s, az.rows[0].input_len, az.rows[0].output_len) == (0.0, 4808, 10)
    assert az.rows[1].arrival_s == pytest.approx(0.052)
    assert 2.3 < len(az.rows) / az.rows[-1].arrival_s < 2.8  # README: 2.57 req/s


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"timestamp": 0, "input_length": -5, "output_length": 3}', "line 2: input_length is negative"),
        ('{"timestamp": 0, "input_length": "x", "output_length": 3}', "line 2: input_length is not a number"),
        ('{"timestamp": 0, "input_length": 5.5, "output_length": 3}', "line 2: input_length is not a whole number"),
        ('{"timestamp": 0, "input_length": 5}', "line 2: missing field(s) output_length"),
        ('{"timestamp": 0, "input_length": 5, "output_length": 3', "line 2: malformed JSON"),
        ('{"timestamp": 0, "input_length": 5, "output_length": 3, "hash_ids": "ab"}', "line 2: hash_ids must be"),
        ("[1, 2]", "line 2: expected a JSON object"),
    ],
)
def test_bad_mooncake_row_names_its_line(tmp_path, line, message):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"timestamp": 0, "input_length": 5, "output_length": 3}\n' + line + "\n")
    with pytest.raises(WorkloadError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_trace(p)


@pytest.mark.parametrize(
    "row, message",
    [
        ("2023-11-16 18:17:04.0,-3,10", "line 3: ContextTokens is negative"),
        ("2023-11-16 18:17:04.0,12,abc", "line 3: GeneratedTokens is not a number"),
        ("yesterday,12,10", "line 3: TIMESTAMP is not a date-time"),
        ("2023-11-16 18:17:04.0,12", "line 3: expected 3 columns"),
    ],
)
def test_bad_azure_row_names_its_line(tmp_path, row, message):
    p = tmp_path / "bad.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.0,5,5\n" + row + "\n")
    with pytest.raises(WorkloadError, match=message):
        read_trace(p)


def test_missing_empty_and_headerless_files_are_clear_errors(tmp_path):
    with pytest.raises(WorkloadError, match="not found"):
        read_trace(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(WorkloadError, match="no requests"):
        read_trace(tmp_path / "empty.jsonl")
    (tmp_path / "x.csv").write_text("a,b,c\n1,2,3\n")
    with pytest.raises(WorkloadError, match="expected the header"):
        read_trace(tmp_path / "x.csv")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(WorkloadError):
        read_trace(tmp_path / "bin.jsonl")


def test_time_and_length_scaling_are_applied_and_stated(mooncake):
    w = load_trace(mooncake, scaling=Scaling(time_scale=0.5, length_scale=0.1))
    assert [r.arrival_s for r in w.requests] == [0.0, 0.0, 1.5, 3.0]
    assert [(r.input_len, r.output_len) for r in w.requests] == [(100, 1), (150, 2), (60, 1), (205, 1)]
    # Blocks shrink with lengths; a prompt keeps only the blocks its shorter length still reaches.
    assert {r.block_tokens for r in w.requests} == {51}
    assert [len(r.prefix_blocks) for r in w.requests] == [2, 3, 2, 4]
    text = "\n".join(w.notes)
    assert "x0.5 (time_scale)" in text
    assert "x0.1 (length_scale)" in text
    assert "512 -> 51 tokens" in text
    assert w.params["time_scale"] == 0.5 and w.params["block_tokens"] == 51


def test_outputs_scale_on_their_own_when_asked(mooncake):
    same = load_trace(mooncake, scaling=Scaling(length_scale=0.1))
    w = load_trace(mooncake, scaling=Scaling(length_scale=0.1, output_scale=1.0))
    assert [r.input_len for r in w.requests] == [r.input_len for r in same.requests]
    assert [r.output_len for r in w.requests] == [r.output_len for r in load_trace(mooncake).requests]
    assert "x1 instead (output_scale)" in "\n".join(w.notes) and w.params["output_scale"] == 1.0
    with pytest.raises(WorkloadError, match="output_scale"):
        load_trace(mooncake, scaling=Scaling(output_scale=0.0))


def test_lengths_never_scale_below_one_token_and_the_notes_say_so(azure):
    w = load_trace(azure, scaling=Scaling(length_scale=0.01))
    assert min(min(r.input_len, r.output_len) for r in w.requests) == 1
    assert any("raised to 1" in n for n in w.notes)


def test_request_count_and_duration_cut_the_trace(mooncake):
    assert len(load_trace(mooncake, scaling=Scaling(max_requests=2)).requests) == 2
    cut = load_trace(mooncake, scaling=Scaling(max_duration_s=3.0))
    assert [r.arrival_s for r in cut.requests] == [0.0, 0.0, 3.0]
    assert any("kept the first 3 of 4" in n for n in cut.notes)
    with pytest.raises(WorkloadError):
        load_trace(mooncake, scaling=Scaling(time_scale=-1))


def test_jitter_spreads_quantised_arrivals_reproducibly(mooncake):
    a = load_trace(mooncake, scaling=Scaling(jitter_s=3.0, seed=1))
    b = load_trace(mooncake, scaling=Scaling(jitter_s=3.0, seed=1))
    assert a.requests == b.requests
    times = [r.arrival_s for r in a.requests]
    assert times == sorted(times) and len(set(times)) == 4
    assert any("jittered" in n for n in a.notes)


def test_at_rate_sets_the_mean_rate_of_a_fixed_request_set(mooncake):
    trace = read_trace(mooncake)
    for rate in (0.5, 4.0):
        w = at_rate(trace, Scaling(max_requests=4), rate)
        assert w.mean_rate == pytest.approx(rate)
        assert len(w.requests) == 4


def test_poisson_arrivals_have_the_rate_and_unit_burstiness():
    w = synthetic(SyntheticSpec(rate=5.0, num_requests=20000, seed=3))
    gaps = np.diff([r.arrival_s for r in w.requests])
    assert gaps.mean() == pytest.approx(0.2, rel=0.03)
    assert gaps.var() / gaps.mean() ** 2 == pytest.approx(1.0, rel=0.06)


def test_gamma_burstiness_is_the_squared_cv_of_gaps():
    w = synthetic(SyntheticSpec(rate=2.0, arrival="gamma", burstiness=4.0, num_requests=40000, seed=4))
    gaps = np.diff([r.arrival_s for r in w.requests])
    assert gaps.mean() == pytest.approx(0.5, rel=0.05)
    assert gaps.var() / gaps.mean() ** 2 == pytest.approx(4.0, rel=0.15)


def test_length_distributions():
    def lengths(dist: LengthDist) -> np.ndarray:
        spec = SyntheticSpec(rate=1.0, input=dist, num_requests=20000, seed=5)
        return np.array([r.input_len for r in synthetic(spec).requests])

    assert set(lengths(LengthDist("fixed", 100))) == {100}
    u = lengths(LengthDist("uniform", 200, 0.5))
    assert u.min() >= 100 and u.max() <= 300 and u.mean() == pytest.approx(200, rel=0.02)
    ln = lengths(LengthDist("lognormal", 300, 0.8))
    assert ln.mean() == pytest.approx(300, rel=0.05)
    assert np.log(ln).std() == pytest.approx(0.8, rel=0.05)


def test_shared_prefix_ratio_draws_whole_blocks_from_a_small_pool():
    spec = SyntheticSpec(rate=1.0, input=LengthDist("fixed", 100), shared_prefix_ratio=0.5, num_prefixes=3,
                         block_tokens=16, num_requests=200)
    w = synthetic(spec)
    assert all(len(r.prefix_blocks) == 3 for r in w.requests)  # floor(50 / 16) blocks
    assert len({r.prefix_blocks for r in w.requests}) == 3


def test_duration_bounds_a_synthetic_load():
    w = synthetic(SyntheticSpec(rate=10.0, duration_s=30.0, seed=6))
    assert w.requests[-1].arrival_s <= 30.0
    assert len(w.requests) == pytest.approx(300, rel=0.2)


@pytest.mark.parametrize(
    "spec",
    [
        SyntheticSpec(rate=0, num_requests=1),
        SyntheticSpec(rate=1),
        SyntheticSpec(rate=1, burstiness=2.0, num_requests=1),
        SyntheticSpec(rate=1, shared_prefix_ratio=1.5, num_requests=1),
        SyntheticSpec(rate=1, input=LengthDist("lognormal", 10, 0), num_requests=1),
        SyntheticSpec(rate=1, output=LengthDist("fixed", 0), num_requests=1),
    ],
)
def test_bad_synthetic_parameters_are_workload_errors(spec):
    with pytest.raises(WorkloadError):
        synthetic(spec)


def test_same_seed_same_workload():
    spec = SyntheticSpec(rate=3.0, input=LengthDist("lognormal", 50, 0.5), num_requests=50, seed=9)
    assert synthetic(spec).requests == synthetic(spec).requests
