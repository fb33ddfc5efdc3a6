// decode_attention's two inner loops written for AVX-512 (the kernels' x86-64-v4 build;
// kernels.cpp includes this only there), for head sizes of 16 to 128; prompt_attention's
// loops (prompt_avx512.h) use its helpers too.
//
// Scores: a block of 16 positions at a time, each query head's 16 dot products left as 16
// vectors of partial sums and finished together by one transposing reduction (45
// instructions for the 16) rather than one horizontal sum each.  A bf16 cache, on a CPU with
// AVX512-BF16, is multiplied as it is stored (`vdpbf16ps`: products of bf16 pairs exact in
// float32, summed in float32); otherwise the block's keys are converted to float once, for
// all the query heads that read them.
// Values: each position's value row converted once and added into every query head's sum,
// the sums held in registers for the whole pass over the positions.

#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

namespace decode_avx512 {

// Whether a bf16 cache is scored with AVX512-BF16's dot products: where the CPU has them,
// unless RAGBENCH_BF16_DOT=0 (which converts the keys to float, as on a CPU without them: to
// test or measure that path on one with them).  Decode and prompt attention ask alike.
inline bool bf16_dot() {
  static const bool use = [] {
    const char* choice = std::getenv("RAGBENCH_BF16_DOT");
    return __builtin_cpu_supports("avx512bf16") && !(choice && std::string(choice) == "0");
  }();
  return use;
}

constexpr int kBlock = 16;  // positions scored together: one vector of scores
constexpr int64_t kValuesAhead = 8;

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Lane i of the result: the sum of v[i]'s 16 lanes.
inline __m512 sum_lanes(const __m512 v[kBlock]) {
  __m512 quads[4];  // quads[k], 128-bit lane L: positions 4k..4k+3, summed over lane L
  for (int k = 0; k < 4; ++k) {
    const __m512* x = v + 4 * k;
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(x[0], x[1]), _mm512_unpackhi_ps(x[0], x[1]));
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(x[2], x[3]), _mm512_unpackhi_ps(x[2], x[3]));
    const __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
    quads[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));
  }
  // [a's lanes 0+1, a's 2+3, b's 0+1, b's 2+3]
  const auto pair_lanes = [](__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
  };
  return pair_lanes(pair_lanes(quads[0], quads[1]), pair_lanes(quads[2], quads[3]));
}

inline __mmask16 first_lanes(int64_t count) {
  return static_cast<__mmask16>((1u << count) - 1u);
}

template <typename scalar_t>
void prefetch_block(const scalar_t* k, int64_t stride, int64_t count, int64_t dim) {
  for (int64_t p = 0; p < count; ++p)
    for (int64_t byte = 0; byte < dim * static_cast<int64_t>(sizeof(scalar_t)); byte += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(k + p * stride) + byte);
}

// scores[g * n + p] = scale x q_g . k_p for the group's query heads (q: float, [group,
// 16 kChunks]) and the n positions of k (rows `stride` apart); `block`: 16 x 16 kChunks
// floats of scratch where the keys are not float.
template <int kChunks, typename scalar_t>
void score_keys(const float* q, int64_t group, const scalar_t* k, int64_t stride, int64_t n,
                float scale, float* block, float* scores) {
  constexpr int64_t dim = 16 * kChunks;
  for (int64_t first = 0; first < n; first += kBlock) {
    const int64_t count = std::min<int64_t>(kBlock, n - first);
    const int64_t next = std::min<int64_t>(kBlock, n - first - count);
    if (next > 0) prefetch_block(k + (first + kBlock) * stride, stride, next, dim);
    const float* keys = block;
    int64_t key_stride = dim;
    if constexpr (std::is_same_v<scalar_t, float>) {
      keys = k + first * stride;
      key_stride = stride;
    } else {
      for (int64_t p = 0; p < count; ++p)
        for (int c = 0; c < kChunks; ++c)
          _mm512_storeu_ps(block + p * dim + 16 * c, load16(k + (first + p) * stride + 16 * c));
    }
    for (int64_t g = 0; g < group; ++g) {
      __m512 qg[kChunks];
      for (int c = 0; c < kChunks; ++c) qg[c] = _mm512_loadu_ps(q + g * dim + 16 * c);
      __m512 dots[kBlock];
      for (int p = 0; p < kBlock; ++p) {
        dots[p] = _mm512_setzero_ps();
        if (p < count)
          for (int c = 0; c < kChunks; ++c)
            dots[p] = _mm512_fmadd_ps(qg[c], _mm512_loadu_ps(keys + p * key_stride + 16 * c),
                                      dots[p]);
      }
      const __m512 scaled = _mm512_mul_ps(sum_lanes(dots), _mm512_set1_ps(scale));
      _mm512_mask_storeu_ps(scores + g * n + first, first_lanes(count), scaled);
    }
  }
}

// score_keys for a bf16 cache on a CPU with AVX512-BF16: q (the group's bf16 query heads)
// and the keys multiplied as stored.
template <int kChunks>
__attribute__((target("avx512bf16"))) void score_keys_bf16(const c10::BFloat16* q,
                                                          int64_t group,
                                                          const c10::BFloat16* k,
                                                          int64_t stride, int64_t n,
                                                          float scale, float* scores) {
  static_assert(kChunks % 2 == 0, "32 bf16 values a vector");
  constexpr int64_t dim = 16 * kChunks;
  constexpr int kPairs = kChunks / 2;
  for (int64_t first = 0; first < n; first += kBlock) {
    const int64_t count = std::min<int64_t>(kBlock, n - first);
    const int64_t next = std::min<int64_t>(kBlock, n - first - count);
    if (next > 0) prefetch_block(k + (first + kBlock) * stride, stride, next, dim);
    const c10::BFloat16* keys = k + first * stride;
    for (int64_t g = 0; g < group; ++g) {
      __m512bh qg[kPairs];
      for (int c = 0; c < kPairs; ++c) qg[c] = (__m512bh)_mm512_loadu_si512(q + g * dim + 32 * c);
      __m512 dots[kBlock];
      for (int p = 0; p < kBlock; ++p) {
        dots[p] = _mm512_setzero_ps();
        if (p < count)
          for (int c = 0; c < kPairs; ++c)
            dots[p] = _mm512_dpbf16_ps(
                dots[p], (__m512bh)_mm512_loadu_si512(keys + p * stride + 32 * c), qg[c]);
      }
      const __m512 scaled = _mm512_mul_ps(sum_lanes(dots), _mm512_set1_ps(scale));
      _mm512_mask_storeu_ps(scores + g * n + first, first_lanes(count), scaled);
    }
  }
}

// out[h] = sum_p weights[h * n + p] v_p for kHeads query heads, their sums in registers.
template <int kChunks, int kHeads, typename scalar_t>
void weigh_heads(const float* weights, int64_t n, const scalar_t* v, int64_t stride,
                 float* out) {
  __m512 acc[kHeads][kChunks];
  for (int h = 0; h < kHeads; ++h)
    for (int c = 0; c < kChunks; ++c) acc[h][c] = _mm512_setzero_ps();
  for (int64_t p = 0; p < n; ++p) {
    if (p + kValuesAhead < n) prefetch_block(v + (p + kValuesAhead) * stride, stride, 1, 16 * kChunks);
    __m512 row[kChunks];
    for (int c = 0; c < kChunks; ++c) row[c] = load16(v + p * stride + 16 * c);
    for (int h = 0; h < kHeads; ++h) {
      const __m512 weight = _mm512_set1_ps(weights[h * n + p]);
      for (int c = 0; c < kChunks; ++c) acc[h][c] = _mm512_fmadd_ps(weight, row[c], acc[h][c]);
    }
  }
  for (int h = 0; h < kHeads; ++h)
    for (int c = 0; c < kChunks; ++c) _mm512_storeu_ps(out + (h * kChunks + c) * 16, acc[h][c]);
}

// weigh_heads for the last `heads` (fewer than a tile) of a group.
template <int kChunks, int kHeads, typename scalar_t>
void weigh_rest(int64_t heads, const float* weights, int64_t n, const scalar_t* v,
                int64_t stride, float* out) {
  if constexpr (kHeads > 0) {
    if (heads == kHeads) return weigh_heads<kChunks, kHeads>(weights, n, v, stride, out);
    weigh_rest<kChunks, kHeads - 1>(heads, weights, n, v, stride, out);
  }
}

// out[g] = sum_p weights[g * n + p] v_p for the group's query heads ([group, 16 kChunks]),
// as many heads a pass over the values as their sums fit in half the registers.
template <int kChunks, typename scalar_t>
void weigh_values(const float* weights, int64_t group, const scalar_t* v, int64_t stride,
                  int64_t n, float* out) {
  constexpr int kTile = std::max(1, std::min(8, 16 / kChunks));
  int64_t g = 0;
  for (; g + kTile <= group; g += kTile)
    weigh_heads<kChunks, kTile>(weights + g * n, n, v, stride, out + g * 16 * kChunks);
  weigh_rest<kChunks, kTile - 1>(group - g, weights + g * n, n, v, stride,
                                 out + g * 16 * kChunks);
}

}  // namespace decode_avx512
