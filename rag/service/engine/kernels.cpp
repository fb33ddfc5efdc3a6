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
// reads the cache through a strided view with a mask; this loop streams it.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "fast_exp.h"

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
  scalar_t* out_all = out.data_ptr<scalar_t>();

  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(group * dim), acc(group * dim), sums(group), scores;
    float row[kMaxHeadDim];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / kv_heads, h = item % kv_heads, n = visible[r];
      const int64_t first_head = r * heads + h * group;
      to_float(q_all + first_head * dim, q.data(), group * dim);
      for (float& x : q) x *= scale;
      const scalar_t* k = k_all + r * slot_stride + h * dim;
      const scalar_t* v = v_all + r * slot_stride + h * dim;

      // scores[g][p] = q_g . k_p, for every query head g of this key head
      scores.resize(group * n);
      for (int64_t p = 0; p < n; ++p) {
        if (p + kPrefetchAhead < n) prefetch_row(k + (p + kPrefetchAhead) * position_stride, dim);
        to_float(k + p * position_stride, row, dim);
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = q.data() + g * dim;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < dim; ++d) dot += qg[d] * row[d];
          scores[g * n + p] = dot;
        }
      }
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
      // acc[g] = sum_p scores[g][p] v_p
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t p = 0; p < n; ++p) {
        if (p + kPrefetchAhead < n) prefetch_row(v + (p + kPrefetchAhead) * position_stride, dim);
        to_float(v + p * position_stride, row, dim);
        for (int64_t g = 0; g < group; ++g) {
          const float weight = scores[g * n + p];
          float* a = acc.data() + g * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) a[d] += weight * row[d];
        }
      }
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
