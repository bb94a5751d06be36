"""The C++ paged decode kernel against the gather path and a dense reference, and the fallback to the gather path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.model import attention, paged_kernel
from splitserve.model.attention import AttentionPlan, paged_attention
from splitserve.model.batch import SeqInput, build_forward_batch
from tests.greedy import assert_greedy_match, greedy, ref_greedy


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


@pytest.fixture(scope="module")
def kernel() -> None:
    if _compiler() is None:
        pytest.skip("no C++ compiler on this machine: the kernel cannot be built (the gather path serves)")
    # A compiler is here: a failed build is a bug, not a skip.
    assert paged_kernel.load(), "the paged kernel failed to build or load (see the log line above)"
    assert paged_kernel.enabled()


def _decode_case(lens, kv_heads, group, block_size, head_dim, seed):
    """A cache with shuffled blocks, one decode token per sequence; returns (batch, q, k, v, cache_layer)."""
    g = torch.Generator().manual_seed(seed)
    tables, start = [], 0
    widths = [-(-n // block_size) for n in lens]
    perm = torch.randperm(sum(widths) + 2, generator=g).tolist()  # scattered, and two blocks never used
    for w in widths:
        tables.append(perm[start : start + w])
        start += w
    cache_layer = torch.randn(len(perm), 2, kv_heads, block_size, head_dim, generator=g)
    seqs = [SeqInput([1], n - 1, t, True) for n, t in zip(lens, tables)]
    batch = build_forward_batch(seqs, block_size, "cpu")
    heads = kv_heads * group
    q = torch.randn(len(lens), heads, head_dim, generator=g)
    k = torch.randn(len(lens), kv_heads, head_dim, generator=g)
    v = torch.randn(len(lens), kv_heads, head_dim, generator=g)
    return batch, q, k, v, cache_layer


def _dense(batch, q, k, v, cache_layer) -> torch.Tensor:
    """Plain float64 attention per sequence over its context read token by token (after writing k/v)."""
    _, _, kv_heads, bs, head_dim = cache_layer.shape
    heads = q.shape[1]
    out = []
    for i, (n, table) in enumerate(zip(batch.context_lens, batch.block_tables)):
        keys = torch.stack([cache_layer[table[p // bs], 0, :, p % bs] for p in range(n - 1)] + [k[i]], 1)
        vals = torch.stack([cache_layer[table[p // bs], 1, :, p % bs] for p in range(n - 1)] + [v[i]], 1)
        keys = keys.double().repeat_interleave(heads // kv_heads, 0)
        vals = vals.double().repeat_interleave(heads // kv_heads, 0)
        out.append(F.scaled_dot_product_attention(q[i].double()[:, None], keys, vals)[:, 0].flatten())
    return torch.stack(out).float()


def _run(batch, q, k, v, cache_layer, use_kernel: bool) -> torch.Tensor:
    _, _, kv_heads, bs, _ = cache_layer.shape
    plan = AttentionPlan.build(batch, bs, kv_heads, decode_kernel=use_kernel)
    assert isinstance(plan.decodes, attention._KernelDecodes) == use_kernel
    return paged_attention(q, k, v, cache_layer.clone(), plan)


@settings(max_examples=40, deadline=None)
@given(
    block_size=st.sampled_from([1, 4, 16]),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 3, 4]),
    head_dim=st.sampled_from([8, 24, 64, 128]),  # 64 and 128 are compiled specially, the others generic
    lens=st.lists(st.integers(1, 70), min_size=1, max_size=6),
    edges=st.lists(st.sampled_from([1, 0, -1]), max_size=3),  # contexts at a block boundary, and beside one
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_gather_path_and_dense_reference(kernel, block_size, kv_heads, group, head_dim, lens, edges, seed):
    lens = lens + [max(1, 2 * block_size + e) for e in edges]
    case = _decode_case(lens, kv_heads, group, block_size, head_dim, seed)
    got = _run(*case, use_kernel=True)
    torch.testing.assert_close(got, _run(*case, use_kernel=False), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got, _dense(*case), atol=2e-5, rtol=1e-5)


def test_kernel_reads_only_each_sequence_s_blocks(kernel):
    """NaN in every block no sequence owns (padding, free blocks) must not reach any output."""
    batch, q, k, v, cache_layer = _decode_case([1, 17, 33, 5], 2, 3, 16, 64, seed=3)
    owned = {b for t, n in zip(batch.block_tables, batch.context_lens) for b in t[: -(-n // 16)]}
    for b in set(range(cache_layer.shape[0])) - owned:
        cache_layer[b] = float("nan")
    got = _run(batch, q, k, v, cache_layer, use_kernel=True)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, _dense(batch, q, k, v, cache_layer), atol=2e-5, rtol=1e-5)


def test_mixed_batch_puts_decodes_at_their_rows(kernel):
    """Decodes between prefill chunks (non-contiguous decode rows) land where the gather path puts them."""
    g = torch.Generator().manual_seed(0)
    kv_heads, heads, d, bs = 2, 4, 16, 4
    seqs = [
        SeqInput([1] * 5, 0, [0, 1], True),
        SeqInput([2], 6, [2, 3], True),
        SeqInput([3] * 3, 4, [4, 5], True),
        SeqInput([4], 1, [6], True),
    ]
    batch = build_forward_batch(seqs, bs, "cpu")
    t = int(batch.input_ids.numel())
    cache_layer = torch.randn(7, 2, kv_heads, bs, d, generator=g)
    q, k, v = (torch.randn(t, n, d, generator=g) for n in (heads, kv_heads, kv_heads))
    torch.testing.assert_close(
        _run(batch, q, k, v, cache_layer, True), _run(batch, q, k, v, cache_layer, False), atol=2e-5, rtol=1e-5
    )


def test_greedy_with_the_kernel_matches_generate(kernel, monkeypatch, tmp_path):
    """Greedy decoding through the kernel (counted, so this cannot pass on the gather path) matches transformers."""
    from transformers import AutoModelForCausalLM

    from splitserve.model.loader import load_model
    from tests.tiny_models import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path, hidden=96, heads=6, kv_heads=2)
    ours, ref = load_model(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    calls = []
    real = paged_kernel.decode
    monkeypatch.setattr(paged_kernel, "decode", lambda *a: calls.append(1) or real(*a))
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7], list(range(1, 40))]
    for prompt, got in zip(prompts, greedy(ours, prompts, 20)):
        expected, logits = ref_greedy(ref, prompt, 20)
        assert_greedy_match(got, expected, logits)
    assert calls, "decode steps did not run in the kernel"


def test_env_forces_the_gather_path(kernel, monkeypatch):
    cache_layer = torch.zeros(2, 2, 1, 4, 8)
    assert paged_kernel.usable(cache_layer)
    assert not paged_kernel.usable(cache_layer.bfloat16())  # fp32 only
    monkeypatch.setenv(paged_kernel.ENV, "0")
    assert not paged_kernel.usable(cache_layer)


_FALLBACK = """
import logging, torch
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
from splitserve.model import paged_kernel
from splitserve.model.loader import load_model
from splitserve.model.kv_cache import PagedKVCache
from tests.greedy import greedy
assert not paged_kernel.load()
loaded = load_model({path!r})
assert not paged_kernel.usable(PagedKVCache(loaded.config, 2, 4, torch.float32, "cpu").tensor)
print("TOKENS", greedy(loaded, [[1, 2, 3, 4, 5]], 6))
"""


def test_a_builder_that_died_mid_build_does_not_block_the_next(kernel):
    """torch's build lock left behind (a worker killed while it built): the next process loads the kernel
    at once instead of waiting on that file forever (a clean-clone test run hung so)."""
    lock = paged_kernel.build_directory() / "lock"
    lock.touch()
    probe = "import sys\nfrom splitserve.model import paged_kernel\nsys.exit(0 if paged_kernel.load(timeout=240) else 1)"
    r = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "PYTHONPATH": os.getcwd()},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not lock.exists()


def test_a_failed_build_falls_back_to_the_gather_path_with_one_log_line(tmp_path, monkeypatch):
    """A compiler that fails (CXX=false), an extension cache holding torch's lock left by a builder that died:
    one warning for the build, no error, and the model decodes the same tokens as with the kernel disabled."""
    from tests.tiny_models import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path / "model")
    script = _FALLBACK.format(path=str(path))
    base = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "PYTHONPATH": os.getcwd()}
    # A lock left by a builder that died: torch's builder would wait on it forever (then the run times out).
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    lock = paged_kernel.build_directory() / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    broken = subprocess.run(
        [sys.executable, "-c", script], env={**base, "CXX": shutil.which("false") or "/bin/false"},
        capture_output=True, text=True, timeout=300,
    )
    assert broken.returncode == 0, broken.stderr
    assert not lock.exists()
    lines = [ln for ln in broken.stderr.splitlines() if "paged attention kernel unavailable" in ln]
    assert len(lines) == 1 and lines[0].startswith("WARNING"), broken.stderr
    assert "Traceback" not in broken.stderr
    disabled = subprocess.run(
        [sys.executable, "-c", script.replace("assert not paged_kernel.load()\n", "")],
        env={**base, paged_kernel.ENV: "0"}, capture_output=True, text=True, timeout=300,
    )
    assert disabled.returncode == 0, disabled.stderr
    assert "paged attention kernel unavailable" not in disabled.stderr
    tokens = [ln for ln in broken.stdout.splitlines() if ln.startswith("TOKENS")]
    assert tokens and tokens == [ln for ln in disabled.stdout.splitlines() if ln.startswith("TOKENS")]


_AVX2_CHECK = r'''
import random, shutil, subprocess, sys
from pathlib import Path
import torch
from torch.utils import cpp_extension
from splitserve.model import paged_kernel
build, sources = Path(sys.argv[1]), [Path(s) for s in sys.argv[2:]]
build.mkdir(parents=True, exist_ok=True)
copies = [build / source.name for source in sources]
for source, copy in zip(sources, copies):
    if not copy.exists() or copy.read_bytes() != source.read_bytes():
        shutil.copyfile(source, copy)
cpp_extension.load(name="splitserve_paged_avx2", sources=[str(c) for c in copies if c.suffix == ".cpp"], build_directory=str(build),
                   extra_cflags=paged_kernel._CFLAGS + ["-mno-avx512f"], extra_ldflags=["-fopenmp"],
                   is_python_module=False, verbose=False)
if shutil.which("objdump"):  # the build really is the AVX2 one: no 512-bit register anywhere in it
    so = next(build.glob("splitserve_paged_avx2*.so"))
    assert "zmm" not in subprocess.run(["objdump", "-d", str(so)], capture_output=True, text=True).stdout
paged_kernel._ok = True  # this process's splitserve_paged ops are the AVX2 build's
paged_kernel._ready.set()
from tests.model.test_paged_kernel import _decode_case, _dense, _run
rng = random.Random(0)
for _ in range(60):
    bs, kv, group, dim = rng.choice([1, 4, 16]), rng.randint(1, 3), rng.choice([1, 2, 3, 4]), rng.choice([8, 24, 64, 128])
    lens = [rng.randint(1, 70) for _ in range(rng.randint(1, 6))] + [2 * bs, 2 * bs + 1, max(1, 2 * bs - 1)]
    case = _decode_case(lens, kv, group, bs, dim, rng.randrange(2**16))
    torch.testing.assert_close(_run(*case, use_kernel=True), _dense(*case), atol=2e-5, rtol=1e-5)
g = torch.Generator().manual_seed(0)
for _ in range(60):  # the linear's loops: 1-2 rows and 3+ (pairs and an odd one), blocks and their remainders
    rows, inp, out = rng.randint(1, 17), rng.randint(1, 70), rng.randint(1, 1200)
    x, w = torch.randn(rows, inp, generator=g), torch.randn(out, inp, generator=g).t().contiguous().t()
    b = torch.randn(out, generator=g) if rng.random() < 0.5 else None
    expected = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    torch.testing.assert_close(paged_kernel.linear(x, w, b).double(), expected, rtol=1e-5, atol=1e-5 * inp**0.5)
print("AVX2 path ok")
'''


def test_the_avx2_path_matches_the_dense_reference_on_an_avx512_machine_too():
    """The kernels have an AVX-512 and an AVX2+FMA path, and -march=native compiles only the one the machine
    has: on an AVX-512 machine the AVX2 path (what an AVX2-only machine runs) is built here with AVX-512 off,
    in a process of its own (both builds register the same ops), and checked against the dense reference
    (decode attention) and float64 torch (the few-row linear)."""
    if _compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx512f" not in flags or " avx2" not in flags or " fma" not in flags:
        pytest.skip("not an AVX-512 machine: the normal build is the AVX2 (or scalar) one, which the tests above check")
    build = paged_kernel.build_directory().with_name(paged_kernel.build_directory().name + "_avx2")
    done = subprocess.run([sys.executable, "-c", _AVX2_CHECK, str(build), *map(str, paged_kernel._SOURCES + paged_kernel._HEADERS)], capture_output=True, text=True,
                          timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "AVX2 path ok" in done.stdout


def test_a_cpu_with_other_features_gets_a_build_directory_of_its_own(monkeypatch):
    """-march=native: an AVX-512 build loaded on an AVX2-only CPU dies with SIGILL, so a cache shared between
    machines (network home, copied ~/.cache) keys builds by the CPU's feature flags as well as the source."""
    here = paged_kernel.build_directory()
    assert paged_kernel.build_directory() == here
    monkeypatch.setattr(paged_kernel, "_cpu_features", lambda: b"flags : fpu sse2 avx2 fma avx512f")
    avx512 = paged_kernel.build_directory()
    monkeypatch.setattr(paged_kernel, "_cpu_features", lambda: b"flags : fpu sse2 avx2 fma")
    avx2 = paged_kernel.build_directory()
    assert len({here, avx512, avx2}) == 3 and avx512.parent == avx2.parent == here.parent
