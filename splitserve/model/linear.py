"""Dense projections, routed on CPU through oneDNN with packed weights instead of torch's default BLAS (MKL),
and through our own kernel (paged_kernel.linear) for the 1-SKINNY_MAX_ROWS rows of a small decode step.

oneDNN is handed each weight in its own blocked layout, made once (PackedWeight): given a plain matrix it
re-lays the weight out on every call, which on this round's AVX2-only EPYC made it slower than MKL (2 threads,
SmolLM2's layers at 1,024 rows: plain oneDNN 1.84 s, MKL 1.34, packed oneDNN 1.41; at 16 rows 63, 74 and 51 ms;
the LM head at 16 rows 20-23, 31-38 and 9-10 ms). On the AVX-512 EPYC of earlier rounds plain oneDNN already
halved MKL's prefill time. At 1-2 rows a product only streams its weight, which the skinny kernel reads at
memory speed; from 3 rows it blocks columns so that each weight read from memory serves every row
(csrc/skinny_linear.cpp). Against packed oneDNN (`python -m benchmarks.linear_rows`: a decode step's linears,
CPU time, alternated, medians of 5, quiet, AVX2 EPYC) the kernel took 0.65x at 1 row, 0.87x at 4, 0.98-0.99x
at 8-10 and 1.07-1.09x at 12-16 rows on 1 thread; on 2 threads 0.71x at 1 row, 0.88x at 4-5, 0.99-1.00x at
6-8, 1.15x at 10 and 1.19x at 16 (results/linear_rows.json, linear_rows_2threads.json): 9+ rows go to oneDNN.
Weights are column-major (see LlamaModel), which the kernel wants for these skinny products. The oneDNN op is
the one Inductor emits for CPU linears; if a build lacks it, or off CPU float32, plain F.linear runs.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.model import paged_kernel

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# Benchmarks set this False to time oneDNN against the skinny kernel in one process.
SKINNY = True
SKINNY_MAX_ROWS = 8
PACK_ENV = "SPLITSERVE_PACKED_WEIGHTS"
# The row count oneDNN is told to expect when packing. The layout it picks served 16 and 1,024 rows alike
# (packed for 16 or for 1,024: within 3 % at either, 2 threads).
_PACK_ROWS = 16


class PackedWeight:
    """oneDNN's own blocked copy of one weight, made once and used for every product of more rows than the
    skinny kernel takes. Handed a plain matrix, oneDNN re-lays it out on every call: measured on an AVX2-only
    EPYC (2 threads, SmolLM2's 30 layers' linears, medians of 5) the plain path took 63 ms at 16 rows and
    1.84 s at 1,024 against 51 ms and 1.41 s packed, and the LM head at 16 rows 20-23 ms against 9-10.
    The copy is remade if the weight changes (its storage or version counter), so editing or reloading
    weights in place never leaves a stale copy. It costs a second copy of the weights in memory:
    SPLITSERVE_PACKED_WEIGHTS=0 keeps only the plain one (read when the copy is first wanted)."""

    def __init__(self) -> None:
        self._made_from: tuple[int, int] | None = None
        self._packed: torch.Tensor | None = None

    def of(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The packed copy of `weight`, or None where it does not apply (not CPU float32, no oneDNN, disabled)."""
        if not (_ONEDNN and weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2):
            return None
        if os.environ.get(PACK_ENV, "1") == "0":
            return None
        # An inference tensor has no version counter, and outside inference mode it cannot be written in place.
        key = (weight.data_ptr(), 0 if weight.is_inference() else weight._version)
        if key != self._made_from:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_ROWS)
            self._made_from = key
        return self._packed


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, packed: PackedWeight | None = None
) -> torch.Tensor:
    if x.device.type == "cpu" and x.dtype == torch.float32:
        if (
            SKINNY
            and x.dim() == 2
            and 0 < x.shape[0] <= SKINNY_MAX_ROWS  # 0 rows: a chunk step that samples nothing, for oneDNN
            and weight.dtype == torch.float32
            and weight.stride(0) == 1
            and paged_kernel.ready()
        ):
            return paged_kernel.linear(x, weight, bias)
        if _ONEDNN:
            blocked = packed.of(weight) if packed is not None else None
            return torch.ops.mkldnn._linear_pointwise(x, weight if blocked is None else blocked, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.packed = PackedWeight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed)
