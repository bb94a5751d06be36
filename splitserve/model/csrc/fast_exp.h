// exp(x) for x <= 0, written without a libm call so the loops that use it vectorize (decode attention's
// softmax, SiLU): 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2, Cephes' expf polynomial (relative error ~1e-7).
// The loops vectorize only with -fno-trapping-math (paged_kernel.py's flags): otherwise g++ keeps the clamp's
// compare and floorf scalar ("control flow in loop" under -fopt-info-vec).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace splitserve {

inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);  // below this exp underflows; clamping keeps 2^n a normal float
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

}  // namespace splitserve
