// y = x W^T + b for the 1-2 rows of a decode step at batch 1-2, where the product is bound by reading W.
//
// W is kept column-major (see LlamaModel), so W^T [in, out] is contiguous: y accumulates x[i] * W^T[i, :]
// over the rows of W^T, eight rows at a time (eight sequential read streams, and y touched once per eight).
// Each thread owns a contiguous range of y's columns and streams its part of every row. With SmolLM2-135M on
// this 2-core EPYC this reads weights at 18-24 GB/s on one thread where oneDNN's and MKL's kernels read
// 11-16 (oneDNN: whole-model linears of a batch-1 step 45 -> 25 ms at 1 thread, 33 -> 19 ms at 2); at 3+ rows
// oneDNN is as fast or faster, so linear.py routes only 1-2 rows here. Loops are plain so -O3 -march=native
// vectorizes them; `omp simd` lets it (the row sums are grouped, not reassociated across c).

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <optional>

namespace {

constexpr int64_t kColumns = 64;  // parallel_for's unit: a thread's range is whole multiples of it

template <int B>
void columns(const float* __restrict__ x, int64_t in, const float* __restrict__ wt, int64_t out,
             const float* bias, int64_t c0, int64_t n, float* __restrict__ y) {
  for (int b = 0; b < B; ++b) {
    float* yb = y + b * out + c0;
    if (bias != nullptr) {
      std::copy(bias + c0, bias + c0 + n, yb);
    } else {
      std::fill(yb, yb + n, 0.0f);
    }
  }
  int64_t i = 0;
  for (; i + 8 <= in; i += 8) {
    const float* w0 = wt + i * out + c0;
    const float *w1 = w0 + out, *w2 = w1 + out, *w3 = w2 + out;
    const float *w4 = w3 + out, *w5 = w4 + out, *w6 = w5 + out, *w7 = w6 + out;
    for (int b = 0; b < B; ++b) {
      const float* xb = x + b * in + i;
      const float x0 = xb[0], x1 = xb[1], x2 = xb[2], x3 = xb[3], x4 = xb[4], x5 = xb[5], x6 = xb[6], x7 = xb[7];
      float* yb = y + b * out + c0;
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) {
        yb[c] += ((x0 * w0[c] + x1 * w1[c]) + (x2 * w2[c] + x3 * w3[c])) +
                 ((x4 * w4[c] + x5 * w5[c]) + (x6 * w6[c] + x7 * w7[c]));
      }
    }
  }
  for (; i < in; ++i) {
    const float* wi = wt + i * out + c0;
    for (int b = 0; b < B; ++b) {
      const float xi = x[b * in + i];
      float* yb = y + b * out + c0;
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) yb[c] += xi * wi[c];
    }
  }
}

// x [rows, in] float32, rows 1 or 2; weight [out, in] float32 column-major; bias [out] or None.
at::Tensor skinny_linear(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_in.dim() == 2 && weight.dim() == 2, "skinny_linear: x and weight must be 2-D");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "skinny_linear: float32 only");
  const at::Tensor wt = weight.t();
  TORCH_CHECK(wt.is_contiguous(), "skinny_linear: weight must be column-major (its transpose contiguous)");
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), in = x.size(1), out = wt.size(1);
  TORCH_CHECK(rows == 1 || rows == 2, "skinny_linear: 1 or 2 rows only");
  TORCH_CHECK(wt.size(0) == in, "skinny_linear: x and weight disagree on in_features");
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == at::kFloat && b.numel() == out, "skinny_linear: bias must be float32 [out]");
  }
  at::Tensor y = at::empty({rows, out}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = wt.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (out + kColumns - 1) / kColumns, 1, [&](int64_t begin, int64_t end) {
    const int64_t c0 = begin * kColumns, n = std::min(end * kColumns, out) - c0;
    if (rows == 1) {
      columns<1>(xp, in, wp, out, bp, c0, n, yp);
    } else {
      columns<2>(xp, in, wp, out, bp, c0, n, yp);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(splitserve_linear, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.impl("linear", c10::DispatchKey::CPU, TORCH_FN(skinny_linear));
}
