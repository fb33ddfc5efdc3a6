// The engine's CPU kernels, registered as torch operators (torch.ops.ragbench.*) and built
// with the package (setup.py); rag/service/engine/kernels.py loads them and falls back to
// torch where they are absent.
//
// decode_attention: one query token per decoded row over its slot's keys and values, read
// where the slot cache holds them ([slots, positions, kv_heads, head_dim]): no view, mask or
// copy per step.  Each (row, key head) is one work item: the query heads sharing that key
// head (grouped-query attention) are scored together, so each key and value is read once,
// and the scores, softmax and weighted sum are in float32 whatever the cache's dtype.
// SDPA's CPU kernel pays a blocked flash-attention setup for these few-query problems and
// reads the cache through a strided view with a mask; this loop streams it.  The AVX-512
// build has its own inner loops for the common head sizes (decode_avx512.h: 16 positions'
// scores finished together, bf16 keys multiplied as stored where the CPU has AVX512-BF16,
// the weighted sums in registers); the plain loops below serve the rest and the AVX2 build.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "fast_exp.h"
#ifdef __AVX512F__
#include "decode_avx512.h"
#endif

namespace {

constexpr int64_t kMaxHeadDim = 256;

template <typename scalar_t>
void to_float(const scalar_t* in, float* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(in[i]);
}

// A position's key (or value) row of one head is a short piece of a longer stride (the
// other heads lie between), which the hardware prefetchers follow too late: ask for the
// row a few positions ahead, every cache line of it.
constexpr int64_t kPrefetchAhead = 8;

template <typename scalar_t>
void prefetch_row(const scalar_t* row, int64_t dim) {
  for (int64_t byte = 0; byte < dim * static_cast<int64_t>(sizeof(scalar_t)); byte += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(row) + byte);
}

// The two inner loops of a work item: `Scores` fills scores[g * n + p] = scale x q_g . k_p
// for the item's query heads g < group (q_raw as stored, q as float) and its n positions;
// `Weigh` fills out[g] = sum_p weights[g * n + p] v_p.  `block`: scratch for 16 positions.
template <typename scalar_t>
using Scores = void (*)(const scalar_t* q_raw, const float* q, int64_t group, int64_t dim,
                        const scalar_t* k, int64_t stride, int64_t n, float scale,
                        float* block, float* scores);
template <typename scalar_t>
using Weigh = void (*)(const float* weights, int64_t group, int64_t dim, const scalar_t* v,
                       int64_t stride, int64_t n, float* out);

// Any head size and instruction set: one key row converted at a time, a dot product (and
// its horizontal sum) per query head and position.
template <typename scalar_t>
void score_keys(const scalar_t*, const float* q, int64_t group, int64_t dim, const scalar_t* k,
                int64_t stride, int64_t n, float scale, float* row, float* scores) {
  for (int64_t p = 0; p < n; ++p) {
    if (p + kPrefetchAhead < n) prefetch_row(k + (p + kPrefetchAhead) * stride, dim);
    to_float(k + p * stride, row, dim);
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = q + g * dim;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < dim; ++d) dot += qg[d] * row[d];
      scores[g * n + p] = dot * scale;
    }
  }
}

template <typename scalar_t>
void weigh_values(const float* weights, int64_t group, int64_t dim, const scalar_t* v,
                  int64_t stride, int64_t n, float* out) {
  std::fill(out, out + group * dim, 0.f);
  float row[kMaxHeadDim];
  for (int64_t p = 0; p < n; ++p) {
    if (p + kPrefetchAhead < n) prefetch_row(v + (p + kPrefetchAhead) * stride, dim);
    to_float(v + p * stride, row, dim);
    for (int64_t g = 0; g < group; ++g) {
      const float weight = weights[g * n + p];
      float* a = out + g * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) a[d] += weight * row[d];
    }
  }
}

#ifdef __AVX512F__
template <int kChunks, typename scalar_t>
void score_keys_avx512(const scalar_t*, const float* q, int64_t group, int64_t,
                       const scalar_t* k, int64_t stride, int64_t n, float scale, float* block,
                       float* scores) {
  decode_avx512::score_keys<kChunks>(q, group, k, stride, n, scale, block, scores);
}

template <int kChunks>
void score_keys_bf16(const c10::BFloat16* q_raw, const float*, int64_t group, int64_t,
                     const c10::BFloat16* k, int64_t stride, int64_t n, float scale, float*,
                     float* scores) {
  decode_avx512::score_keys_bf16<kChunks>(q_raw, group, k, stride, n, scale, scores);
}

template <int kChunks, typename scalar_t>
void weigh_values_avx512(const float* weights, int64_t group, int64_t, const scalar_t* v,
                         int64_t stride, int64_t n, float* out) {
  decode_avx512::weigh_values<kChunks>(weights, group, v, stride, n, out);
}

template <int kChunks, typename scalar_t>
std::pair<Scores<scalar_t>, Weigh<scalar_t>> avx512_loops() {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && kChunks % 2 == 0) {
    if (decode_avx512::bf16_dot()) return {score_keys_bf16<kChunks>, weigh_values_avx512<kChunks, scalar_t>};
  }
  return {score_keys_avx512<kChunks, scalar_t>, weigh_values_avx512<kChunks, scalar_t>};
}
#endif

// The widest loops this build has for the head size (float64 keeps the plain ones).
template <typename scalar_t>
std::pair<Scores<scalar_t>, Weigh<scalar_t>> inner_loops(int64_t dim) {
#ifdef __AVX512F__
  if constexpr (!std::is_same_v<scalar_t, double>) {
    switch (dim) {
      case 16: return avx512_loops<1, scalar_t>();
      case 32: return avx512_loops<2, scalar_t>();
      case 64: return avx512_loops<4, scalar_t>();
      case 128: return avx512_loops<8, scalar_t>();
    }
  }
#endif
  return {score_keys<scalar_t>, weigh_values<scalar_t>};
}

template <typename scalar_t>
void decode_attention_kernel(const at::Tensor& query, const at::Tensor& keys,
                             const at::Tensor& values, const at::Tensor& lengths, float scale,
                             at::Tensor& out) {
  const int64_t rows = query.size(0), heads = query.size(1), dim = query.size(2);
  const int64_t kv_heads = keys.size(2), group = heads / kv_heads;
  const int64_t slot_stride = keys.stride(0), position_stride = keys.stride(1);
  const scalar_t* q_all = query.const_data_ptr<scalar_t>();
  const scalar_t* k_all = keys.const_data_ptr<scalar_t>();
  const scalar_t* v_all = values.const_data_ptr<scalar_t>();
  const int64_t* visible = lengths.const_data_ptr<int64_t>();
  const int64_t longest = rows ? *std::max_element(visible, visible + rows) : 0;
  scalar_t* out_all = out.data_ptr<scalar_t>();
  const auto [score, weigh] = inner_loops<scalar_t>(dim);

  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(group * dim), acc(group * dim), sums(group), block(16 * dim),
        scores(group * longest);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / kv_heads, h = item % kv_heads, n = visible[r];
      const int64_t first_head = r * heads + h * group;
      to_float(q_all + first_head * dim, q.data(), group * dim);
      const int64_t offset = r * slot_stride + h * dim;
      score(q_all + first_head * dim, q.data(), group, dim, k_all + offset, position_stride, n,
            scale, block.data(), scores.data());
      // softmax over the positions, left unnormalised until the end
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * n;
        const float top = *std::max_element(s, s + n);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t p = 0; p < n; ++p) {
          s[p] = fast_exp(s[p] - top);
          sum += s[p];
        }
        sums[g] = sum;
      }
      weigh(scores.data(), group, dim, v_all + offset, position_stride, n, acc.data());
      for (int64_t g = 0; g < group; ++g) {
        const float inverse = 1.f / sums[g];
        scalar_t* o = out_all + (first_head + g) * dim;
        for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<scalar_t>(acc[g * dim + d] * inverse);
      }
    }
  });
}

// query [rows, heads, head_dim]; keys, values [slots, positions, kv_heads, head_dim] (one
// layer of the slot cache, rows <= slots); lengths [rows]: the positions row r sees.
at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& keys,
                            const at::Tensor& values, const at::Tensor& lengths, double scale) {
  TORCH_CHECK(query.dim() == 3 && keys.dim() == 4, "query [rows, heads, dim], keys 4-d");
  TORCH_CHECK(keys.sizes() == values.sizes() && keys.strides() == values.strides(),
              "keys and values of one layout");
  TORCH_CHECK(keys.stride(3) == 1 && keys.stride(2) == keys.size(3),
              "each position's heads contiguous");
  TORCH_CHECK(query.size(2) == keys.size(3) && query.size(2) <= kMaxHeadDim, "head_dim");
  TORCH_CHECK(query.size(1) % keys.size(2) == 0, "query heads a multiple of key heads");
  TORCH_CHECK(query.size(0) <= keys.size(0), "a row per slot");
  TORCH_CHECK(query.scalar_type() == keys.scalar_type(), "query and cache of one dtype");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.numel() == query.size(0),
              "one int64 length per row");
  const at::Tensor q = query.contiguous();
  const at::Tensor n = lengths.contiguous();
  for (int64_t r = 0; r < n.numel(); ++r) {
    const int64_t length = n.const_data_ptr<int64_t>()[r];
    TORCH_CHECK(length > 0 && length <= keys.size(1), "lengths within the slot");
  }
  at::Tensor out = at::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention",
                                  [&] {
                                    decode_attention_kernel<scalar_t>(
                                        q, keys, values, n, static_cast<float>(scale), out);
                                  });
  return out;
}

}  // namespace

TORCH_LIBRARY(ragbench, m) {
  m.def(
      "decode_attention(Tensor query, Tensor keys, Tensor values, Tensor lengths, float scale)"
      " -> Tensor");
}

TORCH_LIBRARY_IMPL(ragbench, CPU, m) { m.impl("decode_attention", decode_attention); }
