// Decode attention that reads the paged KV cache in place (no gather copy of each context).
//
// Cache layer [num_blocks, 2, kv_heads, block_size, head_dim] (see kv_cache.py): block b's K of head h is one
// contiguous [block_size, head_dim] run, its V kv_heads runs further. One task per (sequence, kv head) walks
// that sequence's block table, scoring the query heads of the group against each block together (each K/V
// row is loaded once for all of them): all scores first, then each head's softmax in fp32 over the whole row,
// then the values (per-block online-softmax rescaling cost more than the second read of the blocks' V).
// Loops are plain and fixed-stride so g++ -O3 -march=native vectorizes them; `omp simd` marks the reductions
// (float sums are not reassociated without it, and -ffast-math would change the whole process's FP mode).
// Where the compiler targets AVX-512 (or AVX2 with FMA) and head_dim is a multiple of 16, scores are computed
// 16 (8) keys at a time with one transposed reduction (score_keys) instead of a horizontal sum per key, and each query head's output
// row stays in registers while a block's values stream by (accumulate_values).

#include <ATen/Parallel.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#define SPLITSERVE_VECTOR_PATH 1
#endif
#include <torch/library.h>
#include <torch/types.h>

#include "fast_exp.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

using splitserve::exp_nonpositive;

#if defined(__AVX512F__)
constexpr int64_t kKeys = 16;  // keys per score_keys call

// s[j] = scale * q . k_j for the 16 keys k_0..k_15 (rows of HD floats): 16 vector partial sums, then summed
// across in one transposed tree (halves of 256, then 128 bits, then within 128-bit lanes), ending with key
// j's sum in lane 4 * (j % 4) + j / 4, which one permute puts back in order.
template <int HD>
inline void score_keys(const float* q, const float* k, float scale, float* s) {
  constexpr int C = HD / 16;
  __m512 qv[C];
  for (int c = 0; c < C; ++c) qv[c] = _mm512_loadu_ps(q + 16 * c);
  __m512 a[16];
  for (int j = 0; j < 16; ++j) {
    __m512 sum = _mm512_mul_ps(qv[0], _mm512_loadu_ps(k + j * HD));
    for (int c = 1; c < C; ++c) sum = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(k + j * HD + 16 * c), sum);
    a[j] = sum;
  }
  __m512 w[8];  // 128-bit lanes 0-1: key 2i's partial sums, lanes 2-3: key 2i+1's
  for (int i = 0; i < 8; ++i) {
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
  }
  __m512 x[4];  // lane L: key 4j+L's four partial sums
  for (int j = 0; j < 4; ++j) {
    x[j] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * j], w[2 * j + 1], 0x88),
                         _mm512_shuffle_f32x4(w[2 * j], w[2 * j + 1], 0xDD));
  }
  const __m512 y0 = _mm512_add_ps(_mm512_unpacklo_ps(x[0], x[1]), _mm512_unpackhi_ps(x[0], x[1]));
  const __m512 y1 = _mm512_add_ps(_mm512_unpacklo_ps(x[2], x[3]), _mm512_unpackhi_ps(x[2], x[3]));
  const __m512 z = _mm512_add_ps(_mm512_shuffle_ps(y0, y1, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(y0, y1, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  _mm512_storeu_ps(s, _mm512_mul_ps(_mm512_permutexvar_ps(order, z), _mm512_set1_ps(scale)));
}

// acc (HD floats) += sum over t < n of p[t] * v_t, acc held in registers across the n value rows.
template <int HD>
inline void accumulate_values(const float* p, const float* v, int64_t n, float* acc) {
  constexpr int C = HD / 16;
  __m512 a[C];
  for (int c = 0; c < C; ++c) a[c] = _mm512_loadu_ps(acc + 16 * c);
  for (int64_t t = 0; t < n; ++t) {
    const __m512 pt = _mm512_set1_ps(p[t]);
    for (int c = 0; c < C; ++c) a[c] = _mm512_fmadd_ps(pt, _mm512_loadu_ps(v + t * HD + 16 * c), a[c]);
  }
  for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc + 16 * c, a[c]);
}
#elif defined(SPLITSERVE_VECTOR_PATH)
constexpr int64_t kKeys = 8;

// AVX2: the same for 8 keys, with 8-float vectors; two rounds of hadd leave each 128-bit half holding
// keys 0-3's (then 4-7's) half sums, and adding the halves across finishes them in order.
template <int HD>
inline void score_keys(const float* q, const float* k, float scale, float* s) {
  constexpr int C = HD / 8;
  __m256 qv[C];
  for (int c = 0; c < C; ++c) qv[c] = _mm256_loadu_ps(q + 8 * c);
  __m256 a[8];
  for (int j = 0; j < 8; ++j) {
    __m256 sum = _mm256_mul_ps(qv[0], _mm256_loadu_ps(k + j * HD));
    for (int c = 1; c < C; ++c) sum = _mm256_fmadd_ps(qv[c], _mm256_loadu_ps(k + j * HD + 8 * c), sum);
    a[j] = sum;
  }
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  const __m256 r = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
  _mm256_storeu_ps(s, _mm256_mul_ps(r, _mm256_set1_ps(scale)));
}

template <int HD>
inline void accumulate_values(const float* p, const float* v, int64_t n, float* acc) {
  constexpr int C = HD / 8;
  __m256 a[C];
  for (int c = 0; c < C; ++c) a[c] = _mm256_loadu_ps(acc + 8 * c);
  for (int64_t t = 0; t < n; ++t) {
    const __m256 pt = _mm256_set1_ps(p[t]);
    for (int c = 0; c < C; ++c) a[c] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(v + t * HD + 8 * c), a[c]);
  }
  for (int c = 0; c < C; ++c) _mm256_storeu_ps(acc + 8 * c, a[c]);
}
#endif

// Asks for a [block_size, head_dim] run ahead of its use: a context is read as scattered 4 KB pieces
// (SmolLM2: 16 x 64 floats) that the hardware prefetcher only picks up after the first lines of each.
// Into L2 (locality 2: prefetcht1), not L1: a run is 64 lines, more than L1 has miss buffers for. Measured
// (AMD EPYC, SmolLM2 shapes, 1.1k-token contexts, 30 layers' caches so each layer comes from memory; medians
// of 7): batch 16 at 2 threads 1.26 ms a layer against 2.01 with prefetcht0, at 1 thread 2.44 against 4.36;
// batch 1 0.097 against 0.155; batch 4 0.32 against 0.57. Prefetching 2-6 blocks ahead instead of one gained
// nothing.
inline void prefetch_run(const float* p, int64_t floats) {
  for (int64_t i = 0; i < floats; i += 16) __builtin_prefetch(p + i, 0, 2);
}

// HD > 0: head_dim known at compile time (full unrolling); HD == 0: any head_dim, given at run time.
// Three passes over the context: every key's score for each query head of the group (scores [group, len]),
// then each head's softmax over its whole row (one max, so no per-block rescaling), then the values.
template <int HD>
void decode_task(const float* q, const float* cache, const int32_t* table, int64_t len, int64_t group,
                 int64_t kv_heads, int64_t kvh, int64_t bs, int64_t head_dim_rt, float scale, float* out,
                 float* scores, float* acc) {
  const int64_t D = HD > 0 ? HD : head_dim_rt;
  const int64_t run = bs * D;  // floats in one [block_size, head_dim] run
  const int64_t blocks = (len + bs - 1) / bs;
  auto block_base = [&](int64_t blk) { return (static_cast<int64_t>(table[blk]) * 2 * kv_heads + kvh) * run; };
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t n = std::min(bs, len - blk * bs);
    const float* k = cache + block_base(blk);
    if (blk + 1 < blocks) prefetch_run(cache + block_base(blk + 1), run);
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = q + g * D;
      float* s = scores + g * len + blk * bs;
      int64_t t = 0;
#if defined(SPLITSERVE_VECTOR_PATH)
      if constexpr (HD > 0 && HD % 16 == 0) {
        for (; t + kKeys <= n; t += kKeys) score_keys<HD>(qg, k + t * D, scale, s + t);
      }
#endif
      // Four keys at a time: four independent FMA chains, each q element loaded once for them.
      for (; t + 4 <= n; t += 4) {
        const float *k0 = k + t * D, *k1 = k0 + D, *k2 = k1 + D, *k3 = k2 + D;
        float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
        for (int64_t d = 0; d < D; ++d) {
          d0 += qg[d] * k0[d];
          d1 += qg[d] * k1[d];
          d2 += qg[d] * k2[d];
          d3 += qg[d] * k3[d];
        }
        s[t] = d0 * scale;
        s[t + 1] = d1 * scale;
        s[t + 2] = d2 * scale;
        s[t + 3] = d3 * scale;
      }
      for (; t < n; ++t) {
        const float* kt = k + t * D;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += qg[d] * kt[d];
        s[t] = dot * scale;
      }
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores + g * len;
    float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t t = 0; t < len; ++t) m = std::max(m, s[t]);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < len; ++t) {
      s[t] = exp_nonpositive(s[t] - m);
      sum += s[t];
    }
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) s[t] *= inv;
  }
  std::fill(acc, acc + group * D, 0.0f);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t n = std::min(bs, len - blk * bs);
    const float* v = cache + block_base(blk) + kv_heads * run;
    if (blk + 1 < blocks) prefetch_run(cache + block_base(blk + 1) + kv_heads * run, run);
#if defined(SPLITSERVE_VECTOR_PATH)
    if constexpr (HD > 0 && HD % 16 == 0) {
      for (int64_t g = 0; g < group; ++g) accumulate_values<HD>(scores + g * len + blk * bs, v, n, acc + g * HD);
      continue;
    }
#endif
    for (int64_t t = 0; t < n; ++t) {
      const float* vt = v + t * D;
      for (int64_t g = 0; g < group; ++g) {
        const float p = scores[g * len + blk * bs + t];
        float* a = acc + g * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) a[d] += p * vt[d];
      }
    }
  }
  std::copy(acc, acc + group * D, out);
}

// q [B, heads, head_dim] float32; cache_layer [num_blocks, 2, kv_heads, block_size, head_dim] float32
// contiguous; block_tables [B, width] int32; context_lens [B] int32 (each >= 1). Returns [B, heads, head_dim].
at::Tensor paged_decode(const at::Tensor& q_in, const at::Tensor& cache, const at::Tensor& block_tables,
                        const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(q_in.dim() == 3 && cache.dim() == 5, "paged_decode: q must be 3-D and cache_layer 5-D");
  TORCH_CHECK(q_in.scalar_type() == at::kFloat && cache.scalar_type() == at::kFloat, "paged_decode: float32 only");
  TORCH_CHECK(cache.is_contiguous(), "paged_decode: cache_layer must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
              "paged_decode: block_tables and context_lens must be int32");
  const at::Tensor q = q_in.contiguous();
  const at::Tensor tables = block_tables.contiguous();
  const at::Tensor lens = context_lens.contiguous();
  const int64_t batch = q.size(0), heads = q.size(1), head_dim = q.size(2);
  const int64_t kv_heads = cache.size(2), bs = cache.size(3);
  TORCH_CHECK(cache.size(1) == 2 && cache.size(4) == head_dim && heads % kv_heads == 0,
              "paged_decode: cache_layer shape does not match q");
  TORCH_CHECK(tables.size(0) == batch && lens.size(0) == batch, "paged_decode: one table and length per row");
  const int64_t group = heads / kv_heads, width = tables.size(1);
  const int32_t* lens_p = lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(lens_p[b] >= 1 && lens_p[b] <= width * bs, "paged_decode: context length out of its table");
  }
  at::Tensor out = at::empty_like(q);
  const float* q_p = q.data_ptr<float>();
  const float* cache_p = cache.data_ptr<float>();
  const int32_t* tables_p = tables.data_ptr<int32_t>();
  float* out_p = out.data_ptr<float>();
  const float s = static_cast<float>(scale);
  const int64_t longest = *std::max_element(lens_p, lens_p + batch);
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(group * longest + group * head_dim);
    float* scores = scratch.data();
    float* acc = scores + group * longest;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, kvh = task % kv_heads;
      const float* qg = q_p + (b * heads + kvh * group) * head_dim;
      float* og = out_p + (b * heads + kvh * group) * head_dim;
      const int32_t* table = tables_p + b * width;
      if (head_dim == 64) {
        decode_task<64>(qg, cache_p, table, lens_p[b], group, kv_heads, kvh, bs, 64, s, og, scores, acc);
      } else if (head_dim == 128) {
        decode_task<128>(qg, cache_p, table, lens_p[b], group, kv_heads, kvh, bs, 128, s, og, scores, acc);
      } else {
        decode_task<0>(qg, cache_p, table, lens_p[b], group, kv_heads, kvh, bs, head_dim, s, og, scores, acc);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(splitserve_paged, m) {
  m.def("decode(Tensor q, Tensor cache_layer, Tensor block_tables, Tensor context_lens, float scale) -> Tensor");
  m.impl("decode", c10::DispatchKey::CPU, TORCH_FN(paged_decode));
}
