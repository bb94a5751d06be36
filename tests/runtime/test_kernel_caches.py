"""A worker's memory stays bounded over prefills of ever new lengths (issue 15: the prefill worker's RSS grew
for the whole soak). oneDNN keeps a compiled primitive per token count in two caches; build_engine caps them
(runtime/worker/kernel_caches.py). Measured in fresh processes: the caches are sized at a process's first
primitive, so this test process (whose other tests ran models) cannot show it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from splitserve.runtime.worker.kernel_caches import CAPACITY_VARS
from tests.tiny_models import make_tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]
LENGTHS = 150
# Capped, the caches hold ~64 primitives of ~0.5 MB each whatever the lengths (measured: +27 MB); uncapped
# (oneDNN's default 1024 entries) the tiny model kept ~2 MB per new length (+415 MB over 200). Memory, not
# time: the bound holds however loaded the machine is.
BOUND_MB = 100.0


def probe(checkpoint: Path, capacities: dict[str, str]) -> subprocess.Popen:
    """The probe in a fresh process, with `capacities` and none of the caller's own cache settings."""
    env = {k: v for k, v in os.environ.items() if k not in CAPACITY_VARS} | capacities
    return subprocess.Popen(
        [sys.executable, "-m", "tests.runtime.kernel_cache_probe", str(checkpoint), str(LENGTHS)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def growth_mb(proc: subprocess.Popen) -> float:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    return float(out.split()[-1])


def test_rss_bounded_over_distinct_prefill_lengths(tmp_path: Path) -> None:
    checkpoint = make_tiny_checkpoint(tmp_path / "tiny")
    # Both at once (two cores): as build_engine sets the caches up, and with the libraries' default sizes
    # as the control that shows this probe sees the growth at all.
    fixed = probe(checkpoint, {})
    control = probe(checkpoint, {name: "1024" for name in CAPACITY_VARS})
    capped, uncapped = growth_mb(fixed), growth_mb(control)
    if uncapped < 2 * BOUND_MB:
        pytest.skip(f"this torch's linears keep no per-shape kernels here (uncapped growth {uncapped:.0f} MB)")
    assert capped < BOUND_MB, f"RSS grew {capped:.0f} MB over {LENGTHS} prefill lengths (uncapped: {uncapped:.0f} MB)"
