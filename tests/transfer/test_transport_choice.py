"""NIXL is optional: the default transports never load it, and the start-up line says what is available."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from splitserve.transfer.available import transports_line
from splitserve.transfer.nixl_agent import module_name

REPO = Path(__file__).resolve().parents[2]


def test_a_tcp_transfer_never_imports_nixl():
    code = """
import sys, time
from tests.transfer.conftest import SECRET, layout_of, make_cache
from splitserve.transfer import KVReceiver, KVSender
import splitserve.runtime.worker.app, splitserve.cli
src, dst = make_cache(seed=1), make_cache()
r = KVReceiver(dst, layout_of(dst), SECRET); r.start()
r.expect("t", [1], time.monotonic() + 10)
t = KVSender(layout_of(src), SECRET).start_ticket(r.endpoint, "t", 1)
for layer in range(3):
    t.send_layer(layer, src, [2])
t.finish()
assert t.wait(10), t.error
print(sorted(m for m in sys.modules if m.startswith("nixl")))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_the_start_up_line_names_what_is_chosen_and_available():
    line = transports_line("nixl", "cuda:0")
    assert line.startswith("KV transport: nixl (available: tcp, shm, nixl")
    assert "cuda:0, moved via VRAM" in line
    assert "cpu, moved via host memory" in transports_line("tcp")
    assert "pinned host staging" in transports_line("shm", "cuda")
    assert ("nixl 1.5.1/UCX" in line) == (module_name() == "nixl_cu12")
