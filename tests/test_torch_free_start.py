"""`splitserve --help`, `bench` and `plan` start without torch: they neither run the engine nor may pay
seconds to load it. Each entry point runs in a fresh interpreter in which importing torch fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# As if torch were not installed: a finder that refuses it, installed before anything of ours is imported.
NO_TORCH = """
import importlib.abc, runpy, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
sys.meta_path.insert(0, NoTorch())
"""


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH + code], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "module, argv, expected",
    [
        ("splitserve", ["--help"], "usage: splitserve"),
        ("splitserve", ["plan", "--help"], "usage: splitserve plan"),
        ("splitserve", ["bench", "--help"], "usage: splitserve bench"),
        ("splitserve.plan", ["--help"], "--slo-ttft"),
        ("splitserve.bench", ["--help"], "--slo-ttft"),
    ],
)
def test_help_starts_without_torch(module, argv, expected):
    done = run_without_torch(f"sys.argv = {[module, *argv]!r}\nrunpy.run_module({module!r}, run_name='__main__')")
    assert done.returncode == 0, done.stderr[-2000:]
    assert expected in done.stdout


def test_the_blocker_blocks():
    # Otherwise the tests above would pass whatever splitserve imports.
    done = run_without_torch("import splitserve.runtime.worker.engine")
    assert done.returncode != 0 and "blocked by the test" in done.stderr


def test_bench_and_plan_modules_import_without_torch():
    modules = ["splitserve.cli", "splitserve.bench.cli", "splitserve.bench.runner", "splitserve.bench.report",
               "splitserve.bench.plots", "splitserve.plan.cli", "splitserve.plan.search", "splitserve.plan.verdict", "splitserve.plan.report",
               "splitserve.runtime.config", "splitserve.runtime.process"]
    done = run_without_torch("import importlib\nfor m in " + repr(modules) + ":\n    importlib.import_module(m)\n"
                             "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
