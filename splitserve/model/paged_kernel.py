"""The C++ kernels, built on the machine that runs them: paged decode attention (csrc/paged_attention.cpp),
the few-row linear of small decode steps (csrc/skinny_linear.cpp; linear.py routes to it) and a layer's
elementwise parts fused (csrc/layer_ops.cpp: SiLU * up, rotary embedding, residual add + RMSNorm).

torch's extension builder compiles it once per machine into its cache (TORCH_EXTENSIONS_DIR, default
~/.cache/torch_extensions) and later loads it from there. The first build takes tens of seconds, so
`start()` runs it on a background thread: a worker serves with the gather path (attention.py) until the
kernel is ready, and start-up never waits for a compiler.

Builders are serialised by an flock, which the OS releases when its holder dies. torch's own lock is a file
that a builder killed mid-build (a worker stopped in its first 30 s) leaves behind, and every later builder
waits on it forever: seen in a clean-clone test run that hung. Whoever holds the flock removes that file,
since only a dead builder can have left it. The build directory is named by the source's hash, the build flags and
the CPU's feature flags, and builds a copy of the source placed there: checkouts at other paths share one build instead
of rebuilding in turn, and a cache shared with a machine of another CPU never loads a build for the wrong one.
No compiler, a failed build, a non-CPU device or a non-fp32 cache: the gather path, with one log line.
SPLITSERVE_PAGED_KERNEL=0 forces the gather path (comparisons, tests); it is read per step, and the linear
kernel, once loaded, stays in use (benchmarks switch that one with linear.SKINNY).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ENV = "SPLITSERVE_PAGED_KERNEL"
_CSRC = Path(__file__).with_name("csrc")
_SOURCES = [_CSRC / name for name in ("paged_attention.cpp", "skinny_linear.cpp", "layer_ops.cpp")]
_HEADERS = [_CSRC / "fast_exp.h"]
# -march=native: the build runs on the machine that runs the kernel. -fopenmp: at::parallel_for's inline
# OpenMP region (the process already has torch's libgomp loaded, which the extension then uses).
# -fno-trapping-math: the code never enables FP exceptions, and with it g++ vectorizes the loops that compute
# exp (softmax, SiLU), which it otherwise keeps scalar. Unlike -ffast-math it changes no result and sets no
# process-wide FP mode.
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-trapping-math"]
_lock = threading.Lock()
_thread: threading.Thread | None = None
_ready = threading.Event()
_ok = False


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def _cpu_features() -> bytes:
    """What -march=native compiles for: the CPU's feature flags. A cache shared between machines (a home
    directory on a network disk, a copied ~/.cache) must not hand an AVX-512 build to an AVX2-only CPU, where it
    dies with SIGILL at the first step."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):  # x86, arm64
                return line.encode()
    except OSError:
        pass
    return platform.machine().encode() + platform.processor().encode()


def build_directory() -> Path:
    """Where the kernel is built and cached: per torch and Python version (the .so links against both), per
    source content and flags, and per CPU feature set (-march=native)."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    parts = [s.name.encode() + s.read_bytes() for s in _SOURCES + _HEADERS] + [" ".join(_CFLAGS).encode(), _cpu_features()]
    digest = hashlib.sha256(b"".join(parts)).hexdigest()[:12]
    return Path(root) / f"splitserve_paged_torch{torch.__version__}_py{sys.version_info[0]}{sys.version_info[1]}_{digest}"


def _build() -> None:
    global _ok
    compiler = os.environ.get("CXX", "c++")  # what torch's builder runs
    try:
        if shutil.which(compiler) is None:
            raise RuntimeError(f"no C++ compiler: {compiler!r} not found")
        if shutil.which("ninja") is None:
            # torch's builder runs `ninja` from PATH; the PyPI package's binary sits in the venv's bin,
            # which is not on PATH when a worker is started as .venv/bin/splitserve without activating it.
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        from torch.utils import cpp_extension

        build_dir = build_directory()
        build_dir.mkdir(parents=True, exist_ok=True)
        with open(build_dir / "build.flock", "w") as held:
            fcntl.flock(held, fcntl.LOCK_EX)  # another live builder finishes first; a dead one released it
            (build_dir / "lock").unlink(missing_ok=True)  # torch's: left only by a builder that died
            for original in _SOURCES + _HEADERS:
                copy = build_dir / original.name
                if not copy.exists() or copy.read_bytes() != original.read_bytes():
                    shutil.copyfile(original, copy)
            copies = [build_dir / s.name for s in _SOURCES]
            cpp_extension.load(
                name="splitserve_paged",
                sources=[str(c) for c in copies],
                build_directory=str(build_dir),
                extra_cflags=_CFLAGS,
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                verbose=False,
            )
        _ok = True
    except Exception as e:  # noqa: BLE001 - any build/load failure means "use the fallback", reported once
        # The first line, cut short: a build error's first line goes on with the whole compiler command.
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        log.warning("paged attention kernel unavailable (%s): decode attention uses the gather path", first)
        log.debug("paged attention kernel build failure", exc_info=True)
    finally:
        _ready.set()


def start() -> None:
    """Begin building/loading the kernel in the background (idempotent; a no-op when disabled)."""
    global _thread
    if not enabled():
        return
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_build, name="paged-kernel-build", daemon=True)
            _thread.start()


def load(timeout: float | None = None) -> bool:
    """Wait for the kernel (building it if needed); True when it is usable."""
    start()
    return enabled() and _ready.wait(timeout) and _ok


def ready() -> bool:
    """Whether the kernels are built and loaded (without waiting)."""
    return _ready.is_set() and _ok


def usable(cache_layer: torch.Tensor) -> bool:
    """Whether this step's decode attention can run in the kernel: built, not disabled, fp32 CPU cache."""
    return (
        _ready.is_set()
        and _ok
        and enabled()
        and cache_layer.device.type == "cpu"
        and cache_layer.dtype == torch.float32
        and cache_layer.is_contiguous()
    )


def decode(
    q: torch.Tensor, cache_layer: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [B, heads, head_dim] -> [B, heads, head_dim]; tables [B, width] and lens [B] int32."""
    return torch.ops.splitserve_paged.decode(q, cache_layer, block_tables, context_lens, scale)


# Benchmarks set this False to time the fused elementwise ops against torch's in one process.
FUSED_LAYER_OPS = True


def fused(*tensors: torch.Tensor) -> bool:
    """Whether a layer's elementwise part can run fused (csrc/layer_ops.cpp): built, and CPU float32 tensors."""
    return FUSED_LAYER_OPS and ready() and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] contiguous ([gate | up]) -> silu(gate) * up [T, I]."""
    return torch.ops.splitserve_layer.silu_mul(gate_up)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """x [T, heads, head_dim] (unit stride in head_dim) rotated in place; cos, sin [T, 1, head_dim] contiguous."""
    torch.ops.splitserve_layer.rope_(x, cos, sin)


def add_rms_norm_(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """h [T, hidden] contiguous += delta, in place; returns RMSNorm(h) * weight."""
    return torch.ops.splitserve_layer.add_rms_norm_(h, delta, weight, eps)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [rows >= 1, in] float32 @ weight^T (+ bias) with weight [out, in] float32 column-major -> [rows, out]."""
    return torch.ops.splitserve_linear.linear(x, weight, bias)
