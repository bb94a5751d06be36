"""Bounds on oneDNN's per-shape kernel caches, which otherwise hold a worker's memory growing for hours.

The model's projections run through oneDNN (model/linear.py). oneDNN builds one primitive (JIT-compiled
kernels, about half a MB) per distinct (tokens in the step, in, out) shape and keeps it in two caches, each
of 1024 entries by default: oneDNN's own primitive cache and ideep's LRU cache (the layer PyTorch calls it
through). A primitive is freed only once both have evicted it. A prefill worker sees a new token count at
almost every step (prompt lengths and batches of them vary), so it compiled and kept ~4-5 primitives per new
length. Measured with SmolLM2-135M, one thread, an Engine prefilling new lengths one by one: +481 MB over
180 lengths (2.7 MB each); over 60 lengths, malloc_trim(0) after every step +145 MB and a fixed 128 KiB mmap
threshold +97 MB (the memory is live, not freed-but-kept by malloc), either cache capped at 16 alone +59 and
+95 MB, both capped at 16: +0. The 20-minute soak's prefill worker had grown 2239 -> 2739 MB.

Capacity 64 keeps a decode worker's batch shapes hot (consecutive decode steps repeat a handful of batch
sizes; ~5 linear shapes each), and costs a prefill nothing it did not already pay: a prompt length seen for
the first time misses any cache (creating a primitive: ~1-2 ms against a prefill of tens to hundreds of ms).
Both capped at 64: +8 MB over 100 new lengths (the caches full, then flat), where 1024 entries hold ~0.5 GB.
"""

from __future__ import annotations

import os

CAPACITY = 64
# oneDNN's primitive cache, and ideep's (read by PyTorch's bundled ideep, the same name since MKL-DNN days).
CAPACITY_VARS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound_kernel_caches(capacity: int = CAPACITY) -> None:
    """Cap both caches at `capacity` entries, unless the operator set them. Both libraries read their variable
    once, when the first primitive is made: call this before the process runs any model (build_engine does),
    as a process that already ran one keeps its caches' sizes."""
    for name in CAPACITY_VARS:
        os.environ.setdefault(name, str(capacity))
