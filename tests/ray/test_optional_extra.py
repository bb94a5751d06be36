"""Ray is an optional extra: the CLI and the single-machine path never import it, and `serve --ray`
without it installed says how to get it. These run whether or not ray is installed."""

from __future__ import annotations

import subprocess
import sys

from tests.runtime.deployment import REPO

NO_RAY = """
import contextlib, io, sys
import splitserve.cli
for argv in (["serve", "--help"], ["scale", "--help"], ["worker", "--help"]):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            splitserve.cli.main(argv)
        except SystemExit:
            pass
import splitserve.runtime.launch, splitserve.runtime.frontend.app, splitserve.runtime.frontend.pool_client
print(sorted(m for m in sys.modules if m == "ray" or m.startswith("ray.")))
"""

# As if ray were not installed: a finder that refuses it.
RAY_MISSING = """
import importlib.abc, sys
class NoRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoRay())
import splitserve.cli
splitserve.cli.main(["serve", "--ray", "--model", "unused"])
"""


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_and_single_machine_path_do_not_import_ray():
    done = run(NO_RAY)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_serve_ray_without_ray_says_how_to_install_it():
    done = run(RAY_MISSING)
    assert done.returncode == 1
    assert "pip install 'splitserve[ray]'" in done.stderr
