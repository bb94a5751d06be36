"""`splitserve bench` as a user meets it: bad input gives one clear line and exit 2; a run writes its files."""

from __future__ import annotations

import json

import pytest

from splitserve.bench.cli import main
from tests.bench.fake_server import free_port
from tests.bench.trace_files import write_azure, write_mooncake


def fails_cleanly(capsys, argv: list[str], message: str) -> None:
    assert main(["--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("splitserve bench: error: ")
    assert message in err


def test_missing_trace(capsys, tmp_path):
    fails_cleanly(capsys, ["--trace", str(tmp_path / "none.jsonl")], "trace file not found")


def test_malformed_trace(capsys, tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"timestamp": 0, "input_length": 3, "output_length": 2}\n{"timestamp": 1, "input\n')
    fails_cleanly(capsys, ["--trace", str(p)], "line 2: malformed JSON")


def test_negative_and_non_numeric_lengths_name_the_row(capsys, tmp_path):
    m = write_mooncake(tmp_path / "neg.jsonl", [(0, 5, 5, []), (1, 5, -2, [])])
    fails_cleanly(capsys, ["--trace", str(m)], "line 2: output_length is negative")
    a = write_azure(tmp_path / "nan.csv", [("2023-11-16 18:17:03.0", 5, 5), ("2023-11-16 18:17:04.0", "many", 5)])
    fails_cleanly(capsys, ["--trace", str(a)], "line 3: ContextTokens is not a number")


def test_unreachable_endpoint(capsys):
    fails_cleanly(capsys, ["--url", f"http://127.0.0.1:{free_port()}"], "cannot reach")


def test_unknown_model_lists_what_the_server_has(capsys, fake_server):
    server = fake_server(model="served-one")
    fails_cleanly(capsys, ["--url", server.url, "--model", "other"], "it serves: served-one")


def test_no_tokenizer_found(capsys, fake_server):
    server = fake_server(model="not-a-path")
    fails_cleanly(capsys, ["--url", server.url], "pass --tokenizer")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sweep", "--rate-lo", "1", "--rate-hi", "2"], "needs an SLO"),
        (["--sweep", "--slo-ttft", "1"], "--rate-lo and --rate-hi"),
        (["--rate", "-2"], "rate must be a positive number"),
        (["--sweep", "--slo-ttft", "1", "--rate-lo", "1", "--rate-hi", "2", "--attainment", "90"], "must be a fraction"),
        (["--sweep", "--slo-ttft", "1", "--rate-lo", "3", "--rate-hi", "2"], "rate-lo < rate-hi"),
        (["--arrival", "poisson", "--burstiness", "3"], "--arrival gamma"),
    ],
)
def test_bad_options(capsys, argv, message):
    fails_cleanly(capsys, argv, message)


def test_compare_with_bad_files(capsys, tmp_path):
    fails_cleanly(capsys, ["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")], "result file not found")
    (tmp_path / "a.json").write_text("{}")
    fails_cleanly(capsys, ["compare", str(tmp_path / "a.json"), str(tmp_path / "a.json")], "not a splitserve bench result")


def test_run_writes_json_and_plots_then_compare(capsys, fake_server, tiny_checkpoint, tmp_path):
    server = fake_server(fail_status={2: 503})
    common = ["--no-progress", "--url", server.url, "--tokenizer", str(tiny_checkpoint), "--num-requests", "6",
              "--isl", "40", "--osl", "4", "--slo-ttft", "1", "--slo-tpot", "0.5"]
    assert main([*common, "--rate", "50", "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--rate", "20", "--shared-prefix-ratio", "0.5", "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "TTFT" in out and "HTTP 503" in out and "SLO attainment" in out
    doc = json.loads((tmp_path / "a" / "result.json").read_text())
    assert doc["summary"]["errors"] == {"HTTP 503": 1}
    assert len(doc["runs"][0]["records"]) == 6
    assert doc["config"]["load"]["rate"] == 50
    assert (tmp_path / "a" / "latency_cdf.png").stat().st_size > 1000
    b = json.loads((tmp_path / "b" / "result.json").read_text())
    assert b["summary"]["cached_tokens"] > 0  # the fake server's prefix cache saw the shared prefixes

    assert main(["compare", str(tmp_path / "a" / "result.json"), str(tmp_path / "b" / "result.json")]) == 0
    out = capsys.readouterr().out
    assert "B / A" in out and "TTFT p99 (ms)" in out


def test_closed_loop_run(capsys, fake_server, tiny_checkpoint):
    server = fake_server(first_token_delay_s=0.05)
    argv = ["--no-progress", "--url", server.url, "--tokenizer", str(tiny_checkpoint), "--num-requests", "6",
            "--concurrency", "3", "--isl", "10", "--osl", "3"]
    assert main(argv) == 0
    assert server.behaviour.max_in_flight == 3
    capsys.readouterr()


def test_run_where_every_request_fails_exits_1(capsys, fake_server, tiny_checkpoint):
    server = fake_server(fail_status={0: 500, 1: 500})
    argv = ["--no-progress", "--url", server.url, "--tokenizer", str(tiny_checkpoint), "--num-requests", "2",
            "--rate", "50", "--isl", "10", "--osl", "3"]
    assert main(argv) == 1
    assert "no request succeeded" in capsys.readouterr().err


def test_trace_run_states_its_scaling_with_the_progress_bar_on(capsys, fake_server, tiny_checkpoint, tmp_path):
    server = fake_server()
    trace = write_mooncake(tmp_path / "t.jsonl", [(0, 1024, 64, [0, 1]), (100, 2048, 64, [0, 1, 2, 3])])
    argv = ["--url", server.url, "--tokenizer", str(tiny_checkpoint), "--trace", str(trace),
            "--time-scale", "2", "--length-scale", "0.0625"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "x2 (time_scale)" in out and "x0.0625 (length_scale)" in out and "512 -> 32 tokens" in out
    assert [len(b["prompt"]) for b in server.behaviour.received] == [64, 128]
