// The elementwise parts of a decoder layer, each fused into one pass over its rows (what torch runs as 3-6
// separate ops, each a pass over memory with a tensor allocated for its result):
// - silu_mul: SiLU(gate) * up from the gate_up product's [gate | up] rows;
// - rope_: rotary embedding of q and k in place, in the HF "halves" layout (x * cos + rotate_half(x) * sin);
// - add_rms_norm_: the residual add (h += delta, in place) and the RMSNorm of the sum, one read of each row.
// Loops are plain so g++ -O3 -march=native vectorizes them; SiLU's exp is fast_exp.h's, which vectorizes
// where libm's would not. Rows are split across threads (at::parallel_for), whole rows per thread.

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "fast_exp.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

// Rows per parallel_for unit, so that a row of a few hundred floats is not a task of its own.
int64_t grain(int64_t row_floats) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_floats)); }

// gate_up [T, 2I] float32 contiguous -> [T, I]: silu(gate) * up. sigmoid(x) from e = exp(-|x|), which never
// overflows: 1 / (1 + e) for x >= 0, e / (1 + e) below.
at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.scalar_type() == at::kFloat && gate_up.is_contiguous(),
              "silu_mul: gate_up must be 2-D contiguous float32");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "silu_mul: gate_up's width must be even ([gate | up])");
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  at::Tensor out = at::empty({rows, inter}, gate_up.options());
  const float* in = gate_up.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, grain(inter), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* gate = in + r * 2 * inter;
      const float* up = gate + inter;
      float* y = o + r * inter;
#pragma omp simd
      for (int64_t i = 0; i < inter; ++i) {
        const float x = gate[i];
        const float e = splitserve::exp_nonpositive(-std::fabs(x));
        const float sigmoid = (x >= 0.0f ? 1.0f : e) / (1.0f + e);
        y[i] = x * sigmoid * up[i];
      }
    }
  });
  return out;
}

// x [T, H, D] float32, any row and head strides, unit stride within a head; cos, sin [T, 1, D] (or [T, D])
// contiguous. x := x * cos + rotate_half(x) * sin, rotate_half(x) = [-x[D/2:], x[:D/2]].
void rope_(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat && x.stride(2) == 1,
              "rope_: x must be [T, heads, head_dim] float32 with unit stride in head_dim");
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2), half = dim / 2;
  TORCH_CHECK(dim % 2 == 0, "rope_: head_dim must be even");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat && cos.numel() == tokens * dim && sin.numel() == tokens * dim,
              "rope_: cos and sin must be contiguous float32 with head_dim values per token");
  float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t row_stride = x.stride(0), head_stride = x.stride(1);
  at::parallel_for(0, tokens, grain(heads * dim), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cp + t * dim;
      const float* s = sp + t * dim;
      for (int64_t h = 0; h < heads; ++h) {
        float* a = xp + t * row_stride + h * head_stride;
        float* b = a + half;
#pragma omp simd
        for (int64_t d = 0; d < half; ++d) {
          const float x1 = a[d], x2 = b[d];
          a[d] = x1 * c[d] - x2 * s[d];
          b[d] = x2 * c[half + d] + x1 * s[half + d];
        }
      }
    }
  });
}

// h [T, H] float32 contiguous, delta [T, H] float32 (rows may be strided, unit stride within), weight [H]:
// h += delta in place; returns rms_norm(h) * weight as a new [T, H] tensor, in F.rms_norm's order
// (x * rsqrt(mean(x^2) + eps), then * weight).
at::Tensor add_rms_norm_(at::Tensor h, const at::Tensor& delta, const at::Tensor& weight, double eps) {
  TORCH_CHECK(h.dim() == 2 && h.scalar_type() == at::kFloat && h.is_contiguous(),
              "add_rms_norm_: h must be 2-D contiguous float32");
  TORCH_CHECK(delta.dim() == 2 && delta.sizes() == h.sizes() && delta.scalar_type() == at::kFloat &&
                  delta.stride(1) == 1,
              "add_rms_norm_: delta must be float32 of h's shape with unit stride within rows");
  TORCH_CHECK(weight.dim() == 1 && weight.numel() == h.size(1) && weight.scalar_type() == at::kFloat &&
                  weight.is_contiguous(),
              "add_rms_norm_: weight must be contiguous float32 [hidden]");
  const int64_t rows = h.size(0), hidden = h.size(1), delta_stride = delta.stride(0);
  at::Tensor out = at::empty_like(h);
  float* hp = h.data_ptr<float>();
  const float* dp = delta.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, rows, grain(hidden), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* x = hp + r * hidden;
      const float* d = dp + r * delta_stride;
      float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
      for (int64_t i = 0; i < hidden; ++i) {
        x[i] += d[i];
        squares += x[i] * x[i];
      }
      const float inv = 1.0f / std::sqrt(squares / static_cast<float>(hidden) + e);
      float* y = op + r * hidden;
#pragma omp simd
      for (int64_t i = 0; i < hidden; ++i) y[i] = (x[i] * inv) * wp[i];
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(splitserve_layer, m) {
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("rope_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()");
  m.def("add_rms_norm_(Tensor(a!) h, Tensor delta, Tensor weight, float eps) -> Tensor");
  m.impl("silu_mul", c10::DispatchKey::CPU, TORCH_FN(silu_mul));
  m.impl("rope_", c10::DispatchKey::CPU, TORCH_FN(rope_));
  m.impl("add_rms_norm_", c10::DispatchKey::CPU, TORCH_FN(add_rms_norm_));
}
