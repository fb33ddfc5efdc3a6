// prompt_attention's scores written for AVX-512 (the kernels' x86-64-v4 build; layer_ops.cpp
// includes this only there), for head sizes of 16 to 128: a tile of kTileRows query rows
// against 16 keys at a time, the 16 keys' scores of a row in one vector, so no dot product
// needs a horizontal sum and every key vector loaded serves the tile's rows.  For that a
// head's keys are packed once per call, 16 keys a block, transposed: element d of the 16
// keys side by side (as float), or, for AVX512-BF16's dot products, the bf16 pair (2d,
// 2d+1) of each key as one 32-bit lane.  A query row's element (or pair) is broadcast
// against them.  These replace two oneDNN matmul calls per block of queries, whose per-call
// set-up cost as much as the products at a prompt's sizes.

#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "decode_avx512.h"

namespace prompt_avx512 {

constexpr int kKeys = 16;     // keys a block: one vector of scores
constexpr int kTileRows = 8;  // query rows scored together: 8 vectors of sums in registers

// Packs n keys (rows `stride` apart, `dim` each) into blocks of 16, the keys past n zero.
// Float: block b holds element d of its keys at [(b dim + d) 16 + i].  bf16 pairs (the keys'
// 16-bit values read as 32-bit pairs): pair d at [(b dim / 2 + d) 16 + i].
template <typename scalar_t>
void pack_keys(const scalar_t* k, int64_t stride, int64_t n, int64_t dim, float* packed) {
  const int64_t blocks = (n + kKeys - 1) / kKeys;
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t i = 0; i < kKeys; ++i) {
      const int64_t key = b * kKeys + i;
      float* to = packed + b * dim * kKeys + i;
      for (int64_t d = 0; d < dim; ++d)
        to[d * kKeys] = key < n ? static_cast<float>(k[key * stride + d]) : 0.f;
    }
}

inline void pack_key_pairs(const c10::BFloat16* k, int64_t stride, int64_t n, int64_t dim,
                           uint32_t* packed) {
  const int64_t blocks = (n + kKeys - 1) / kKeys, pairs = dim / 2;
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t i = 0; i < kKeys; ++i) {
      const int64_t key = b * kKeys + i;
      uint32_t* to = packed + b * pairs * kKeys + i;
      uint32_t row[64];  // a head of up to 128 values
      if (key < n)
        std::memcpy(row, k + key * stride, pairs * sizeof(uint32_t));
      else
        std::fill(row, row + pairs, 0u);
      for (int64_t d = 0; d < pairs; ++d) to[d * kKeys] = row[d];
    }
}

// scores[r * stride + p] = q_r . k_p for the tile's rows (q: float, [kTileRows, 16
// kChunks]) and the keys of `blocks` packed blocks.
template <int kChunks>
void score_tile(const float* q, const float* packed, int64_t blocks, float* scores,
                int64_t stride) {
  constexpr int dim = 16 * kChunks;
  for (int64_t b = 0; b < blocks; ++b) {
    const float* keys = packed + b * dim * kKeys;
    __m512 sums[kTileRows];
    for (int r = 0; r < kTileRows; ++r) sums[r] = _mm512_setzero_ps();
    for (int d = 0; d < dim; ++d) {
      const __m512 k = _mm512_loadu_ps(keys + d * kKeys);
      for (int r = 0; r < kTileRows; ++r)
        sums[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r * dim + d]), k, sums[r]);
    }
    for (int r = 0; r < kTileRows; ++r) _mm512_storeu_ps(scores + r * stride + b * kKeys, sums[r]);
  }
}

// score_tile for bf16 queries and keys on a CPU with AVX512-BF16 (q: each row's bf16 pairs,
// [kTileRows, 8 kChunks]): products exact in float32, summed in float32.
template <int kChunks>
__attribute__((target("avx512bf16"))) void score_tile_bf16(const uint32_t* q,
                                                          const uint32_t* packed,
                                                          int64_t blocks, float* scores,
                                                          int64_t stride) {
  constexpr int pairs = 8 * kChunks;
  for (int64_t b = 0; b < blocks; ++b) {
    const uint32_t* keys = packed + b * pairs * kKeys;
    __m512 sums[kTileRows];
    for (int r = 0; r < kTileRows; ++r) sums[r] = _mm512_setzero_ps();
    for (int d = 0; d < pairs; ++d) {
      const __m512bh k = (__m512bh)_mm512_loadu_si512(keys + d * kKeys);
      for (int r = 0; r < kTileRows; ++r) {
        const __m512bh pair = (__m512bh)_mm512_set1_epi32(static_cast<int>(q[r * pairs + d]));
        sums[r] = _mm512_dpbf16_ps(sums[r], pair, k);
      }
    }
    for (int r = 0; r < kTileRows; ++r) _mm512_storeu_ps(scores + r * stride + b * kKeys, sums[r]);
  }
}

// Packs n positions' values (rows `stride` apart) in pairs of positions: element d of
// positions 2p (low half) and 2p + 1 as one 32-bit lane at [p dim + d], a last odd position
// paired with 0.
inline void pack_value_pairs(const c10::BFloat16* v, int64_t stride, int64_t n, int64_t dim,
                             uint32_t* packed) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(v);
  for (int64_t p = 0; p < (n + 1) / 2; ++p) {
    const uint16_t* even = bits + 2 * p * stride;
    const uint16_t* odd = 2 * p + 1 < n ? even + stride : nullptr;
    uint32_t* to = packed + p * dim;
    for (int64_t d = 0; d < dim; ++d)
      to[d] = even[d] | (odd ? static_cast<uint32_t>(odd[d]) << 16 : 0u);
  }
}

// sums[r * 16 kChunks + d] = sum_p weights[r][p] v_p[d] for kRows rows of bf16 weights (rows
// `stride` apart, zero-padded to whole pairs) and `pairs` packed pairs of positions' values:
// AVX512-BF16's dot products, two positions a product, the sums in registers.
template <int kChunks, int kRows>
__attribute__((target("avx512bf16"))) void weigh_pairs_bf16(const uint16_t* weights,
                                                           int64_t stride,
                                                           const uint32_t* packed,
                                                           int64_t pairs, float* sums) {
  constexpr int dim = 16 * kChunks;
  __m512 acc[kRows][kChunks];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kChunks; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh v[kChunks];
    for (int c = 0; c < kChunks; ++c)
      v[c] = (__m512bh)_mm512_loadu_si512(packed + p * dim + 16 * c);
    for (int r = 0; r < kRows; ++r) {
      uint32_t pair;
      std::memcpy(&pair, weights + r * stride + 2 * p, sizeof pair);
      const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      for (int c = 0; c < kChunks; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], w, v[c]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kChunks; ++c) _mm512_storeu_ps(sums + r * dim + 16 * c, acc[r][c]);
}

// weigh_pairs_bf16 over a whole tile of kTileRows rows, as many rows a pass over the values
// as their sums fit in half the registers.
template <int kChunks>
void weigh_tile_bf16(const uint16_t* weights, int64_t stride, const uint32_t* packed,
                     int64_t pairs, float* sums) {
  constexpr int kRows = std::max(1, std::min(kTileRows, 16 / kChunks));
  static_assert(kTileRows % kRows == 0, "whole passes");
  for (int r = 0; r < kTileRows; r += kRows)
    weigh_pairs_bf16<kChunks, kRows>(weights + r * stride, stride, packed, pairs,
                                     sums + r * 16 * kChunks);
}

}  // namespace prompt_avx512
