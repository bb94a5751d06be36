"""Dense projections, routed on CPU through oneDNN instead of torch's default BLAS (MKL), and through our own
kernel (paged_kernel.linear) for the 1-SKINNY_MAX_ROWS rows of a small decode step.

Measured with SmolLM2-135M, float32, one thread on an AMD EPYC (Zen 5): oneDNN halves prefill time and makes a
decode step of 2-8 sequences cost about what one sequence does, where MKL's small-batch kernels took 1.5-2.5x
longer. At 1-2 rows a product only streams its weight, and oneDNN reads it at 11-13 GB/s where one core can
read ~24: the skinny kernel reads at 18-24, so a batch-1 step's linears take 25 ms instead of 45 at 1 thread
and 19 instead of 33 at 2 (batch 2: 33 vs 44 ms, 22 vs 25). From 3 rows the kernel blocks columns so that
each weight read from memory serves every row (csrc/skinny_linear.cpp): a decode step's linears at 1 thread
(`python -m benchmarks.linear_rows`: CPU time, alternated with oneDNN's, medians of 5, quiet, load 0.7) took
0.81x oneDNN's at 3 rows, 0.79x at 4, 0.93x at 6, 0.89x at 8 and 0.91x at 10, but 1.04x at 12 and 1.08x at 16,
so 11+ rows stay with oneDNN (10 is close to even: 0.87-0.99 over five runs; results/linear_rows.json). Weights are
column-major (see LlamaModel), which both kernels want for these skinny products. The oneDNN op is the one
Inductor emits for CPU linears; if a build lacks it, or off CPU float32, plain F.linear runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.model import paged_kernel

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# Benchmarks set this False to time oneDNN against the skinny kernel in one process.
SKINNY = True
SKINNY_MAX_ROWS = 10


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
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
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
