// exp(x) in a form the compiler vectorises (the C library's expf is a call per element):
// x = k ln2 + r, |r| <= ln2 / 2, exp(r) by Cephes' polynomial (within 2 ulp of expf), times
// 2^k built in the exponent bits.  Shared by the engine's softmax kernels.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

inline float fast_exp(float x) {
  // exp(-87) is float's smallest normal (below it, 0 is as good); exp(88) its largest power
  x = std::min(std::max(x, -87.0f), 88.0f);
  // k = x / ln2 rounded to the nearest integer (even on ties), by adding and taking away
  // 1.5 x 2^23, which vectorises where std::nearbyint does not
  const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = std::fma(k, -0.693359375f, x);
  r = std::fma(k, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  const float e = std::fma(p * r, r, r) + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &bits, sizeof two_k);
  return e * two_k;
}
