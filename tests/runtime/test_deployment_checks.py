"""Workers that cannot work together are refused when the deployment forms, with both sides' values in
the message, instead of every request failing later."""

from __future__ import annotations

import subprocess
import sys

import pytest

from splitserve.runtime.process import free_port, stop_processes, wait_healthy
from tests.runtime.deployment import REPO
from tests.tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("checks"), layers=2)


def start_worker(checkpoint, role: str, secret_file, *extra: str) -> tuple[str, subprocess.Popen]:
    port = free_port()
    cmd = [sys.executable, "-m", "splitserve", "worker", "--role", role, "--port", str(port), "--model", str(checkpoint),
           "--secret-file", str(secret_file), "--num-blocks", "64", "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, 120)
    return url, proc


def attach(checkpoint, secret_file, *urls: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "splitserve", "serve", "--attach", *urls, "--model", str(checkpoint),
           "--port", str(free_port()), "--secret-file", str(secret_file)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "prefill_extra, decode_extra, secrets, expected",
    [
        # The frontend holds the prefill worker's secret: the decode worker refuses its signed calls.
        ((), (), ("one", "two"), "holds another deployment secret"),
        (("--block-size", "16"), ("--block-size", "32"), ("same", "same"), "block_size=32"),
        ((), ("--dtype", "bfloat16"), ("same", "same"), "bfloat16"),
    ],
    ids=["secret", "block-size", "dtype"],
)
def test_mismatched_workers_are_refused_at_startup(tmp_path, checkpoint, prefill_extra, decode_extra, secrets, expected):
    files = []
    for i, s in enumerate(secrets):
        f = tmp_path / f"secret{i}"
        f.write_text(s)
        files.append(f)
    procs = []
    try:
        p_url, p = start_worker(checkpoint, "prefill", files[0], *prefill_extra)
        procs.append(p)
        d_url, d = start_worker(checkpoint, "decode", files[1], *decode_extra)
        procs.append(d)
        result = attach(checkpoint, files[0], p_url, d_url)
        assert result.returncode != 0
        assert expected in result.stderr, result.stderr[-2000:]
    finally:
        stop_processes(procs)
