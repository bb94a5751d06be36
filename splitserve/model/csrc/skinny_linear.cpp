// y = x W^T + b for the few rows of a decode step, where oneDNN's kernels fall short: at 1-2 rows the product
// only streams W, which oneDNN reads at 11-13 GB/s where one core can read ~24; at 3-10 rows its kernels take
// 15-30% longer than the loop below (measured with SmolLM2-135M's shapes, see linear.py for the routing).
//
// W is kept column-major (see LlamaModel), so W^T [in, out] is contiguous. Each thread owns a contiguous range
// of y's columns. Two loops, by row count:
// - 1-2 rows (`streams`): y accumulates x[i] * W^T[i, :] over the rows of W^T, eight rows at a time (eight
//   sequential read streams, and y touched once per eight). Reads weights at 18-24 GB/s on one thread.
// - 3+ rows (`blocked`): the same eight-row step, but over a block of kBlockColumns columns at a time, and
//   for every row of x (in pairs) before the next eight: the eight weight runs stay in L1 while all rows use
//   them (each loaded weight feeds two rows' FMAs), and the block of y stays in L1 from W^T's first row to its
//   last. So W is read from memory once, whatever the row count. (Register-blocked tiles of 32 columns, and
//   sixteen-row steps, measured slower here: their short strided weight runs read memory at ~11 GB/s.)
// Loops are plain so -O3 -march=native vectorizes them; `omp simd` lets it (the row sums are grouped, not
// reassociated across columns).

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <optional>

namespace {

constexpr int64_t kColumns = 64;  // parallel_for's unit: a thread's range is whole multiples of it
// 3+ rows: a block of y's columns (2 KiB of each row) worked on from first row of W^T to last.
constexpr int64_t kBlockColumns = 512;

// y's rows 0..rows), columns [c, c + m): the bias, or zeros.
inline void start_rows(int64_t rows, int64_t out, const float* bias, int64_t c, int64_t m, float* y) {
  for (int64_t r = 0; r < rows; ++r) {
    float* yr = y + r * out + c;
    if (bias != nullptr) {
      std::copy(bias + c, bias + c + m, yr);
    } else {
      std::fill(yr, yr + m, 0.0f);
    }
  }
}

// Adds rows i..in) of W^T (the fewer than eight left over) into y's rows 0..rows), columns [c, c + m).
inline void remaining_rows(const float* __restrict__ x, int64_t rows, int64_t in, const float* __restrict__ wt,
                           int64_t out, int64_t i, int64_t c, int64_t m, float* __restrict__ y) {
  for (; i < in; ++i) {
    const float* wi = wt + i * out + c;
    for (int64_t r = 0; r < rows; ++r) {
      const float xi = x[r * in + i];
      float* yr = y + r * out + c;
#pragma omp simd
      for (int64_t cc = 0; cc < m; ++cc) yr[cc] += xi * wi[cc];
    }
  }
}

template <int B>
void streams(const float* __restrict__ x, int64_t in, const float* __restrict__ wt, int64_t out,
             const float* bias, int64_t c0, int64_t n, float* __restrict__ y) {
  start_rows(B, out, bias, c0, n, y);
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
  remaining_rows(x, B, in, wt, out, i, c0, n, y);
}

// Adds x[0..B) . W^T[:, c:c+m] into y's rows 0..B) (x, y offset to the first row) for the eight rows of W^T
// from i: each weight loaded feeds B rows' FMAs.
template <int B>
inline void eight(const float* __restrict__ x, int64_t in, const float* __restrict__ wt, int64_t out, int64_t i,
                  int64_t c, int64_t m, float* __restrict__ y) {
  const float* w0 = wt + i * out + c;
  const float *w1 = w0 + out, *w2 = w1 + out, *w3 = w2 + out;
  const float *w4 = w3 + out, *w5 = w4 + out, *w6 = w5 + out, *w7 = w6 + out;
  float xs[B][8];
  for (int b = 0; b < B; ++b) {
    for (int k = 0; k < 8; ++k) xs[b][k] = x[b * in + i + k];
  }
#pragma omp simd
  for (int64_t cc = 0; cc < m; ++cc) {
    const float v0 = w0[cc], v1 = w1[cc], v2 = w2[cc], v3 = w3[cc], v4 = w4[cc], v5 = w5[cc], v6 = w6[cc], v7 = w7[cc];
    for (int b = 0; b < B; ++b) {
      const float* xb = xs[b];
      y[b * out + c + cc] += ((xb[0] * v0 + xb[1] * v1) + (xb[2] * v2 + xb[3] * v3)) +
                             ((xb[4] * v4 + xb[5] * v5) + (xb[6] * v6 + xb[7] * v7));
    }
  }
}

// 3+ rows, columns [c0, c0 + n): blocks of kBlockColumns columns, and within a block W^T's rows eight at a
// time, every row of x (in pairs) against those eight before the next: the eight weight runs stay in L1
// while all rows use them, and the block of y (rows x kBlockColumns) stays in L1 from first row to last, so
// W is read from memory once whatever the row count.
void blocked(const float* x, int64_t rows, int64_t in, const float* wt, int64_t out, const float* bias, int64_t c0,
             int64_t n, float* y) {
  for (int64_t c = c0; c < c0 + n; c += kBlockColumns) {
    const int64_t m = std::min(kBlockColumns, c0 + n - c);
    start_rows(rows, out, bias, c, m, y);
    int64_t i = 0;
    for (; i + 8 <= in; i += 8) {
      int64_t r = 0;
      for (; r + 2 <= rows; r += 2) eight<2>(x + r * in, in, wt, out, i, c, m, y + r * out);
      if (r < rows) eight<1>(x + r * in, in, wt, out, i, c, m, y + r * out);
    }
    remaining_rows(x, rows, in, wt, out, i, c, m, y);
  }
}

// x [rows, in] float32 (rows >= 1); weight [out, in] float32 column-major; bias [out] or None.
at::Tensor skinny_linear(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_in.dim() == 2 && weight.dim() == 2, "skinny_linear: x and weight must be 2-D");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "skinny_linear: float32 only");
  const at::Tensor wt = weight.t();
  TORCH_CHECK(wt.is_contiguous(), "skinny_linear: weight must be column-major (its transpose contiguous)");
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), in = x.size(1), out = wt.size(1);
  TORCH_CHECK(rows >= 1, "skinny_linear: at least one row");
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
      streams<1>(xp, in, wp, out, bp, c0, n, yp);
    } else if (rows == 2) {
      streams<2>(xp, in, wp, out, bp, c0, n, yp);
    } else {
      blocked(xp, rows, in, wp, out, bp, c0, n, yp);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(splitserve_linear, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.impl("linear", c10::DispatchKey::CPU, TORCH_FN(skinny_linear));
}
