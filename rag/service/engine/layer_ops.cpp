// The pointwise work of a layer between its matmuls, each as one pass over its rows
// (torch.ops.ragbench.*; rag/service/engine/kernels.py loads them, the forward pass keeps
// the torch code they replace where they are absent).  In torch each is three to six
// operations, each reading and writing the whole tensor (a prefill's hidden states are
// megabytes) and converting bf16 to float and back on the way.  Each kernel rounds where the
// torch code rounds (to the tensors' dtype after each operation torch runs in it) and
// accumulates in float32 where it does, so its results are torch's, give or take the last
// bit of an exp or of a sum taken in another order.  float32 and bfloat16 only: bf16 is
// read and written as its 16 bits, with integer arithmetic the compiler vectorises (c10's
// conversions, called per element, are not).
//
// add_rms_norm_: the residual add and the next RMSNorm (hidden += delta, in place; the
//   norm of the sum, in float32, cast back, times the weight), or the norm alone.
// rotary_: the rotary embedding, in place, on every query and key head of each token.
// silu_mul: the MLP's SiLU(gate) x up, read from the fused gate/up product.
// prompt_attention: every prompt of a prefill pass attending over its slot's keys, as one
//   operation (transformers' eager arithmetic: scores in the dtype, softmax in float32,
//   probabilities in the dtype, their products with the values summed in float32).  The
//   AVX-512 build has its own loops for the common head sizes (prompt_avx512.h); the rest,
//   and the AVX2 build, multiply through oneDNN (at::mm_out).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include "fast_exp.h"
#ifdef __AVX512F__
#include "prompt_avx512.h"
#endif

namespace {

// Rows of work per task: enough elements that the threads' start-up is paid off.
int64_t grain(int64_t row_elements) { return std::max<int64_t>(1, 16384 / row_elements); }

// How each dtype is stored: load gives a float, store rounds one back (to the nearest,
// ties to even, as c10 does), rounded gives what storing then loading would.
template <typename scalar_t>
struct Stored;

template <>
struct Stored<float> {
  using raw = float;
  static float load(float x) { return x; }
  static float store(float x) { return x; }
  static float rounded(float x) { return x; }
};

template <>
struct Stored<c10::BFloat16> {
  using raw = uint16_t;
  static float load(uint16_t x) {
    const uint32_t bits = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
  static uint32_t round_bits(float x) {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    return x != x ? 0x7FC00000u : bits + 0x7FFFu + ((bits >> 16) & 1u);
  }
  static uint16_t store(float x) { return static_cast<uint16_t>(round_bits(x) >> 16); }
  static float rounded(float x) {
    const uint32_t bits = round_bits(x) & 0xFFFF0000u;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
};

// f(scalar_t{}) for the tensors' dtype, float32 or bfloat16.
template <typename F>
void float_or_bf16(at::ScalarType dtype, const char* name, F&& f) {
  if (dtype == at::kFloat)
    f(float{});
  else if (dtype == at::kBFloat16)
    f(c10::BFloat16{});
  else
    TORCH_CHECK(false, name, ": float32 or bfloat16 only");
}

template <typename scalar_t>
using raw_t = typename Stored<scalar_t>::raw;

template <typename scalar_t>
raw_t<scalar_t>* raw(at::Tensor& t) {
  return reinterpret_cast<raw_t<scalar_t>*>(t.data_ptr<scalar_t>());
}

template <typename scalar_t>
const raw_t<scalar_t>* raw(const at::Tensor& t) {
  return reinterpret_cast<const raw_t<scalar_t>*>(t.const_data_ptr<scalar_t>());
}

template <typename scalar_t>
void add_rms_norm_kernel(at::Tensor& hidden, const at::Tensor* delta, const at::Tensor& weight,
                         float eps, at::Tensor& out) {
  using S = Stored<scalar_t>;
  const int64_t rows = hidden.size(0), width = hidden.size(1);
  raw_t<scalar_t>* h_all = raw<scalar_t>(hidden);
  const raw_t<scalar_t>* d_all = delta ? raw<scalar_t>(*delta) : nullptr;
  const raw_t<scalar_t>* w = raw<scalar_t>(weight);
  raw_t<scalar_t>* out_all = raw<scalar_t>(out);
  at::parallel_for(0, rows, grain(width), [&](int64_t begin, int64_t end) {
    std::vector<float> x(width);
    for (int64_t r = begin; r < end; ++r) {
      raw_t<scalar_t>* h = h_all + r * width;
      if (d_all) {
        const raw_t<scalar_t>* d = d_all + r * width;
#pragma omp simd
        for (int64_t i = 0; i < width; ++i) {
          x[i] = S::rounded(S::load(h[i]) + S::load(d[i]));
          h[i] = S::store(x[i]);
        }
      } else {
#pragma omp simd
        for (int64_t i = 0; i < width; ++i) x[i] = S::load(h[i]);
      }
      float squares = 0.f;
#pragma omp simd reduction(+ : squares)
      for (int64_t i = 0; i < width; ++i) squares += x[i] * x[i];
      const float inverse = 1.f / std::sqrt(squares / static_cast<float>(width) + eps);
      raw_t<scalar_t>* o = out_all + r * width;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) o[i] = S::store(S::load(w[i]) * S::rounded(x[i] * inverse));
    }
  });
}

// hidden [rows, width], contiguous; delta like it, or undefined for the norm alone; weight
// [width].  Adds delta into hidden and returns weight * norm(hidden), [rows, width].
at::Tensor add_rms_norm_(at::Tensor& hidden, const std::optional<at::Tensor>& delta,
                         const at::Tensor& weight, double eps) {
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous(), "hidden [rows, width], contiguous");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == hidden.size(1), "weight [width]");
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), "weight of hidden's dtype");
  const at::Tensor w = weight.contiguous();
  at::Tensor d;
  if (delta.has_value()) {
    TORCH_CHECK(delta->sizes() == hidden.sizes(), "delta of hidden's shape");
    TORCH_CHECK(delta->scalar_type() == hidden.scalar_type(), "delta of hidden's dtype");
    d = delta->contiguous();
  }
  at::Tensor out = at::empty_like(hidden);
  float_or_bf16(hidden.scalar_type(), "add_rms_norm_", [&](auto tag) {
    using scalar_t = decltype(tag);
    add_rms_norm_kernel<scalar_t>(hidden, d.defined() ? &d : nullptr, w, static_cast<float>(eps), out);
  });
  return out;
}

template <typename scalar_t>
void rotary_kernel(at::Tensor& qk, const at::Tensor& cos, const at::Tensor& signed_sin) {
  using S = Stored<scalar_t>;
  const int64_t tokens = qk.size(0), heads = qk.size(1), dim = qk.size(2), half = dim / 2;
  const int64_t token_stride = qk.stride(0), head_stride = qk.stride(1);
  raw_t<scalar_t>* x_all = raw<scalar_t>(qk);
  const raw_t<scalar_t>* c_all = raw<scalar_t>(cos);
  const raw_t<scalar_t>* s_all = raw<scalar_t>(signed_sin);
  at::parallel_for(0, tokens, grain(heads * dim), [&](int64_t begin, int64_t end) {
    std::vector<float> c(dim), s(dim), x(dim);
    for (int64_t t = begin; t < end; ++t) {
#pragma omp simd
      for (int64_t i = 0; i < dim; ++i) {
        c[i] = S::load(c_all[t * dim + i]);
        s[i] = S::load(s_all[t * dim + i]);
      }
      for (int64_t h = 0; h < heads; ++h) {
        raw_t<scalar_t>* head = x_all + t * token_stride + h * head_stride;
#pragma omp simd
        for (int64_t i = 0; i < dim; ++i) x[i] = S::load(head[i]);
        // x cos + swap_halves(x) signed_sin, each product rounded as torch stores it
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          head[i] = S::store(S::rounded(x[i] * c[i]) + S::rounded(x[i + half] * s[i]));
          head[i + half] =
              S::store(S::rounded(x[i + half] * c[i + half]) + S::rounded(x[i] * s[i + half]));
        }
      }
    }
  });
}

// qk [tokens, heads, head_dim] (any token and head strides, each head's values contiguous);
// cos, signed_sin [tokens, head_dim] (signed_sin: sin with its first half negated).
void rotary_(at::Tensor& qk, const at::Tensor& cos, const at::Tensor& signed_sin) {
  TORCH_CHECK(qk.dim() == 3 && qk.stride(2) == 1, "qk [tokens, heads, head_dim], rows contiguous");
  TORCH_CHECK(qk.size(2) % 2 == 0, "an even head_dim");
  const std::vector<int64_t> table{qk.size(0), qk.size(2)};
  TORCH_CHECK(cos.sizes() == table && signed_sin.sizes() == table, "cos, sin [tokens, head_dim]");
  TORCH_CHECK(cos.scalar_type() == qk.scalar_type() && signed_sin.scalar_type() == qk.scalar_type(),
              "tables of qk's dtype");
  const at::Tensor c = cos.contiguous(), s = signed_sin.contiguous();
  float_or_bf16(qk.scalar_type(), "rotary_", [&](auto tag) {
    using scalar_t = decltype(tag);
    rotary_kernel<scalar_t>(qk, c, s);
  });
}

// Query tokens per work item of prompt_attention: a block's scores cover the keys up to its
// last token, so smaller blocks skip more of the causal triangle but call the matmuls more.
constexpr int64_t kQueryBlock = 128;
// Positions the softmax takes at once: a multiple of any vector width.
constexpr int64_t kChunk = 16;

// One query row's softmax(scores x scale) in float32 over the `seen` keys it sees, rounded
// to the dtype, into probabilities[0, width) (0 past `seen`): transformers' eager arithmetic,
// the scores read as the dtype holds them (a float score, an unrounded dot product, rounded
// first).  In whole chunks of kChunk (positions past `seen` count as -inf, then 0), so that
// no loop ends in a scalar remainder: `scores` and `x` are read and written up to `seen`
// rounded up to a chunk.  `probabilities` may be `scores`.
template <typename scalar_t, typename In, typename Out>
void softmax_row(const In* scores, int64_t seen, int64_t width, float scale, float* x,
                 Out* probabilities) {
  using S = Stored<scalar_t>;
  const auto score = [](In s) {
    if constexpr (std::is_same_v<In, raw_t<scalar_t>>)
      return S::load(s);
    else
      return S::rounded(s);
  };
  const auto probability = [](float p) {
    if constexpr (std::is_same_v<Out, raw_t<scalar_t>>)
      return S::store(p);
    else
      return S::rounded(p);
  };
  const int64_t chunks = (seen + kChunk - 1) / kChunk, end = chunks * kChunk;
  float top[kChunk], sum[kChunk];
  std::fill(top, top + kChunk, -INFINITY);
  std::fill(sum, sum + kChunk, 0.f);
  for (int64_t c = 0; c < chunks; ++c)
#pragma omp simd
    for (int64_t i = 0; i < kChunk; ++i) {
      const int64_t j = c * kChunk + i;
      x[j] = S::rounded(score(scores[j]) * scale);
    }
  std::fill(x + seen, x + end, -INFINITY);
  for (int64_t c = 0; c < chunks; ++c)
#pragma omp simd
    for (int64_t i = 0; i < kChunk; ++i) top[i] = std::max(top[i], x[c * kChunk + i]);
  const float most = *std::max_element(top, top + kChunk);
  // (exp's floor leaves the unseen positions near float's smallest normal, nothing to a sum
  // of at least 1; they are set to 0 after it)
  for (int64_t c = 0; c < chunks; ++c)
#pragma omp simd
    for (int64_t i = 0; i < kChunk; ++i) {
      const int64_t j = c * kChunk + i;
      x[j] = fast_exp(x[j] - most);
      sum[i] += x[j];
    }
  std::fill(x + seen, x + end, 0.f);
  const float inverse = 1.f / std::accumulate(sum, sum + kChunk, 0.f);
  const int64_t whole = std::min(chunks * kChunk, width);
#pragma omp simd
  for (int64_t j = 0; j < whole; ++j) probabilities[j] = probability(x[j] * inverse);
  std::fill(probabilities + whole, probabilities + width, Out{});  // later tokens' keys
}

// One work item: a block of one prompt's query tokens and one key head.
struct PromptBlock {
  int64_t prompt, start;  // the prompt's index and its first token in the packed pass
  int64_t slot, past, first, last, head;  // its slot, reused keys, query tokens [first, last)
  int64_t keys() const { return past + last; }
};

// A view of `count` rows of `width` values starting at `data`, `row_stride` apart (and its
// transpose): what the matmuls read from the packed query and the slot cache, not copied.
at::Tensor rows_view(const void* data, int64_t count, int64_t width, int64_t row_stride,
                     const at::TensorOptions& options) {
  return at::from_blob(const_cast<void*>(data), {count, width}, {row_stride, 1}, options);
}

// One key head's query heads, over a block of a prompt's tokens, against the keys they see.
// Rows are (token, query head), so a token's query heads, and its output, are contiguous.
template <typename scalar_t>
void prompt_block(const PromptBlock& b, const at::Tensor& query, const at::Tensor& keys,
                  const at::Tensor& values, float scale, at::Tensor& out, at::Tensor& q_buffer,
                  at::Tensor& score_buffer, at::Tensor& out_buffer, std::vector<float>& x) {
  using R = raw_t<scalar_t>;
  const int64_t heads = query.size(1), dim = query.size(2), group = heads / keys.size(2);
  const int64_t tokens = b.last - b.first, rows = tokens * group, seen_all = b.keys();
  const int64_t first_head = b.head * group;
  const R* q_first = raw<scalar_t>(query) + (b.start + b.first) * query.stride(0);
  R* q = raw<scalar_t>(q_buffer);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t g = 0; g < group; ++g)
      std::memcpy(q + (t * group + g) * dim,
                  q_first + t * query.stride(0) + (first_head + g) * query.stride(1),
                  dim * sizeof(R));
  const at::TensorOptions options = query.options();
  const int64_t offset = b.slot * keys.stride(0) + b.head * keys.stride(2);
  const at::Tensor k =
      rows_view(raw<scalar_t>(keys) + offset, seen_all, dim, keys.stride(1), options);
  const at::Tensor v =
      rows_view(raw<scalar_t>(values) + offset, seen_all, dim, values.stride(1), options);
  at::Tensor scores = score_buffer.view(-1).narrow(0, 0, rows * seen_all).view({rows, seen_all});
  at::mm_out(scores, q_buffer.narrow(0, 0, rows), k.t());

  R* s_all = raw<scalar_t>(scores);
  for (int64_t r = 0; r < rows; ++r) {
    R* s = s_all + r * seen_all;
    softmax_row<scalar_t>(s, b.past + b.first + r / group + 1, seen_all, scale, x.data(), s);
  }

  at::Tensor attended = out_buffer.narrow(0, 0, rows);
  at::mm_out(attended, scores, v);
  const R* a = raw<scalar_t>(attended);
  R* o_all = raw<scalar_t>(out);
  for (int64_t t = 0; t < tokens; ++t)
    std::memcpy(o_all + (b.start + b.first + t) * out.stride(0) + first_head * dim,
                a + t * group * dim, group * dim * sizeof(R));
}

// Work items of up to `tokens` query tokens of a prompt and one key head, the costliest
// (the most keys) first: the threads, each taking the next item free, finish together
// whatever the prompts' lengths.
std::vector<PromptBlock> prompt_blocks(const at::Tensor& spans, int64_t kv_heads,
                                       int64_t tokens) {
  const int64_t* plan = spans.const_data_ptr<int64_t>();
  std::vector<PromptBlock> blocks;
  for (int64_t p = 0; p < spans.size(0); ++p) {
    const int64_t slot = plan[4 * p], start = plan[4 * p + 1], count = plan[4 * p + 2],
                  past = plan[4 * p + 3];
    for (int64_t first = 0; first < count; first += tokens)
      for (int64_t head = 0; head < kv_heads; ++head)
        blocks.push_back({p, start, slot, past, first, std::min(count, first + tokens), head});
  }
  std::stable_sort(blocks.begin(), blocks.end(),
                   [](const PromptBlock& a, const PromptBlock& b) { return a.keys() > b.keys(); });
  return blocks;
}

// The most keys any prompt's tokens see.
int64_t widest_prompt(const at::Tensor& spans) {
  const int64_t* plan = spans.const_data_ptr<int64_t>();
  int64_t widest = 0;
  for (int64_t p = 0; p < spans.size(0); ++p)
    widest = std::max(widest, plan[4 * p + 2] + plan[4 * p + 3]);
  return widest;
}

// Each block's two products through oneDNN (at::mm_out): any head size, the AVX2 build.
template <typename scalar_t>
void prompt_attention_matmuls(const at::Tensor& query, const at::Tensor& keys,
                              const at::Tensor& values, const at::Tensor& spans, float scale,
                              at::Tensor& out) {
  const int64_t kv_heads = keys.size(2), group = query.size(1) / kv_heads, dim = query.size(2);
  const std::vector<PromptBlock> blocks = prompt_blocks(spans, kv_heads, kQueryBlock);
  const int64_t widest = widest_prompt(spans);
  std::atomic<size_t> next{0};
  const int64_t rows = kQueryBlock * group;
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    // matmuls inside the region run on the calling thread alone
    at::Tensor q_buffer = at::empty({rows, dim}, query.options());
    // (a row's last chunk may read past the last row's end)
    at::Tensor score_buffer = at::empty({rows * widest + kChunk}, query.options());
    at::Tensor out_buffer = at::empty({rows, dim}, query.options());
    std::vector<float> x((widest + kChunk - 1) / kChunk * kChunk);
    for (size_t i; (i = next.fetch_add(1)) < blocks.size();)
      prompt_block<scalar_t>(blocks[i], query, keys, values, scale, out, q_buffer, score_buffer,
                             out_buffer, x);
  });
}

#ifdef __AVX512F__
// Query tokens per work item of the AVX-512 loops: with no per-call set-up to pay off,
// small blocks skip most of the causal triangle and keep every thread busy at one prompt.
constexpr int64_t kTokenBlock = 32;

// Storage kept from call to call on the calling thread (a layer's packed keys are megabytes,
// which a fresh allocation would fault in page by page every layer).
template <typename T>
T* reused_storage(size_t count) {
  static thread_local std::vector<T> storage;
  if (storage.size() < count) storage.resize(count);
  return storage.data();
}

// prompt_avx512.h's loops: each (prompt, key head)'s keys packed once (as float; or, where
// `Packed` is uint32_t, as bf16 pairs for AVX512-BF16, and its values too), then tiles of
// kTileRows query rows (token, query head), each scored against the keys its last token
// sees, its rows' softmax as the matmul path's, and the weighted values summed in
// registers (two positions a product with AVX512-BF16, else decode_avx512.h's
// weigh_values).
template <typename scalar_t, int kChunks, typename Packed>
void prompt_attention_avx512(const at::Tensor& query, const at::Tensor& keys,
                             const at::Tensor& values, const at::Tensor& spans, float scale,
                             at::Tensor& out) {
  using S = Stored<scalar_t>;
  using prompt_avx512::kKeys;
  using prompt_avx512::kTileRows;
  constexpr bool kPairs = std::is_same_v<Packed, uint32_t>;
  constexpr int64_t dim = 16 * kChunks, packed_dim = kPairs ? dim / 2 : dim;
  const int64_t kv_heads = keys.size(2), group = query.size(1) / kv_heads;
  const int64_t prompts = spans.size(0);
  const int64_t* plan = spans.const_data_ptr<int64_t>();
  const auto key_blocks = [](int64_t n) { return (n + kKeys - 1) / kKeys; };

  // (prompt, head)'s keys packed at offsets[prompt x kv_heads + head], its values (bf16
  // pairs only) at value_offsets[...], in one buffer
  std::vector<int64_t> offsets(prompts * kv_heads + 1, 0), value_offsets(prompts * kv_heads);
  for (int64_t i = 0; i < prompts * kv_heads; ++i) {
    const int64_t p = i / kv_heads, seen = plan[4 * p + 2] + plan[4 * p + 3];
    value_offsets[i] = offsets[i] + key_blocks(seen) * kKeys * packed_dim;
    offsets[i + 1] = value_offsets[i] + (kPairs ? (seen + 1) / 2 * dim : 0);
  }
  Packed* packed = reused_storage<Packed>(offsets.back());
  const scalar_t* k_all = keys.const_data_ptr<scalar_t>();
  const scalar_t* v_all = values.const_data_ptr<scalar_t>();
  at::parallel_for(0, prompts * kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t p = i / kv_heads, head = i % kv_heads, slot = plan[4 * p];
      const int64_t seen = plan[4 * p + 2] + plan[4 * p + 3];
      const scalar_t* k = k_all + slot * keys.stride(0) + head * keys.stride(2);
      if constexpr (kPairs) {
        prompt_avx512::pack_key_pairs(k, keys.stride(1), seen, dim, packed + offsets[i]);
        const scalar_t* v = v_all + slot * values.stride(0) + head * values.stride(2);
        prompt_avx512::pack_value_pairs(v, values.stride(1), seen, dim,
                                        packed + value_offsets[i]);
      } else {
        prompt_avx512::pack_keys(k, keys.stride(1), seen, dim, packed + offsets[i]);
      }
    }
  });

  const std::vector<PromptBlock> blocks = prompt_blocks(spans, kv_heads, kTokenBlock);
  const int64_t width = key_blocks(widest_prompt(spans)) * kKeys;
  const scalar_t* q_all = query.const_data_ptr<scalar_t>();
  raw_t<scalar_t>* out_all = raw<scalar_t>(out);
  std::atomic<size_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    std::vector<Packed> q(kTileRows * packed_dim);
    // each row's weights: bf16 pairs (unused rows 0) or float
    using Weight = std::conditional_t<kPairs, uint16_t, float>;
    std::vector<Weight> weights(kTileRows * (width + 1));
    std::vector<float> scores(kTileRows * width), x(width), sums(kTileRows * dim);
    for (size_t i; (i = next.fetch_add(1)) < blocks.size();) {
      const PromptBlock& b = blocks[i];
      const Packed* head_keys = packed + offsets[b.prompt * kv_heads + b.head];
      const Packed* head_values = packed + value_offsets[b.prompt * kv_heads + b.head];
      const scalar_t* v = v_all + b.slot * values.stride(0) + b.head * values.stride(2);
      const int64_t rows = (b.last - b.first) * group;
      const auto row_of = [&](int64_t r) {  // (query token, query head) of the block's row r
        return std::pair{b.start + b.first + r / group, b.head * group + r % group};
      };
      for (int64_t first = 0; first < rows; first += kTileRows) {
        const int64_t tile = std::min<int64_t>(kTileRows, rows - first);
        for (int64_t r = 0; r < kTileRows; ++r) {
          Packed* to = q.data() + r * packed_dim;
          if (r >= tile) {
            std::fill(to, to + packed_dim, Packed{});
            continue;
          }
          const auto [token, head] = row_of(first + r);
          const scalar_t* from = q_all + token * query.stride(0) + head * query.stride(1);
          if constexpr (kPairs)
            std::memcpy(to, from, dim * sizeof(scalar_t));
          else
            for (int64_t d = 0; d < dim; ++d) to[d] = static_cast<float>(from[d]);
        }
        const auto seen = [&](int64_t r) { return b.past + b.first + (first + r) / group + 1; };
        const int64_t n = seen(tile - 1);  // the keys the tile's last token sees
        const int64_t blocks_seen = key_blocks(n), stride = blocks_seen * kKeys;
        if constexpr (kPairs) {
          prompt_avx512::score_tile_bf16<kChunks>(q.data(), head_keys, blocks_seen,
                                                  scores.data(), stride);
          const int64_t pairs = (n + 1) / 2, row = 2 * pairs;  // the weights' row, in pairs
          std::fill(weights.begin() + tile * row, weights.begin() + kTileRows * row, 0);
          for (int64_t r = 0; r < tile; ++r)
            softmax_row<scalar_t>(scores.data() + r * stride, seen(r), row, scale, x.data(),
                                  weights.data() + r * row);
          prompt_avx512::weigh_tile_bf16<kChunks>(weights.data(), row, head_values, pairs,
                                                  sums.data());
        } else {
          prompt_avx512::score_tile<kChunks>(q.data(), head_keys, blocks_seen, scores.data(),
                                             stride);
          for (int64_t r = 0; r < tile; ++r)
            softmax_row<scalar_t>(scores.data() + r * stride, seen(r), n, scale, x.data(),
                                  weights.data() + r * n);
          decode_avx512::weigh_values<kChunks>(weights.data(), tile, v, values.stride(1), n,
                                               sums.data());
        }
        for (int64_t r = 0; r < tile; ++r) {
          const auto [token, head] = row_of(first + r);
          raw_t<scalar_t>* o = out_all + token * out.stride(0) + head * dim;
          const float* sum = sums.data() + r * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) o[d] = S::store(sum[d]);
        }
      }
    }
  });
}

// The AVX-512 loops for a head of 16 kChunks values, with AVX512-BF16's dot products for a
// bf16 cache where the CPU has them.
template <typename scalar_t, int kChunks>
void prompt_attention_avx512(const at::Tensor& query, const at::Tensor& keys,
                             const at::Tensor& values, const at::Tensor& spans, float scale,
                             at::Tensor& out) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && kChunks % 2 == 0) {
    if (decode_avx512::bf16_dot())
      return prompt_attention_avx512<scalar_t, kChunks, uint32_t>(query, keys, values, spans,
                                                                  scale, out);
  }
  prompt_attention_avx512<scalar_t, kChunks, float>(query, keys, values, spans, scale, out);
}
#endif

// The AVX-512 loops where the build has them for the head size, else the matmuls.
template <typename scalar_t>
void prompt_attention_kernel(const at::Tensor& query, const at::Tensor& keys,
                             const at::Tensor& values, const at::Tensor& spans, float scale,
                             at::Tensor& out) {
#ifdef __AVX512F__
  switch (query.size(2)) {
    case 16: return prompt_attention_avx512<scalar_t, 1>(query, keys, values, spans, scale, out);
    case 32: return prompt_attention_avx512<scalar_t, 2>(query, keys, values, spans, scale, out);
    case 64: return prompt_attention_avx512<scalar_t, 4>(query, keys, values, spans, scale, out);
    case 128: return prompt_attention_avx512<scalar_t, 8>(query, keys, values, spans, scale, out);
  }
#endif
  prompt_attention_matmuls<scalar_t>(query, keys, values, spans, scale, out);
}

// query [tokens, heads, head_dim] (each head's values contiguous); keys, values [slots,
// positions, kv_heads, head_dim] (one layer of the slot cache, holding each prompt's keys);
// spans [prompts, 4] int64: slot, first token in the pass, count, keys already in the slot.
// Writes each prompt's attention into its rows of out [tokens, heads x head_dim].
void prompt_attention(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                      const at::Tensor& spans, double scale, at::Tensor& out) {
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1,
              "query [tokens, heads, dim], rows contiguous");
  TORCH_CHECK(keys.dim() == 4 && keys.sizes() == values.sizes() &&
                  keys.strides() == values.strides() && keys.stride(3) == 1,
              "keys and values [slots, positions, kv_heads, dim], one layout");
  TORCH_CHECK(query.size(2) == keys.size(3) && query.size(1) % keys.size(2) == 0,
              "query heads a multiple of key heads, one head_dim");
  TORCH_CHECK(query.scalar_type() == keys.scalar_type() &&
                  out.scalar_type() == keys.scalar_type(),
              "query, cache and out of one dtype");
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.size(0) == query.size(0) &&
                  out.size(1) == query.size(1) * query.size(2),
              "out [tokens, heads x dim], contiguous");
  TORCH_CHECK(spans.scalar_type() == at::kLong && spans.dim() == 2 && spans.size(1) == 4
              && spans.is_contiguous(), "spans [prompts, 4] int64");
  const int64_t* plan = spans.const_data_ptr<int64_t>();
  for (int64_t p = 0; p < spans.size(0); ++p) {
    const int64_t slot = plan[4 * p], start = plan[4 * p + 1], count = plan[4 * p + 2],
                  past = plan[4 * p + 3];
    TORCH_CHECK(slot >= 0 && slot < keys.size(0) && count > 0 && past >= 0 &&
                    past + count <= keys.size(1) && start >= 0 && start + count <= query.size(0),
                "each span within its slot and the pass");
  }
  float_or_bf16(query.scalar_type(), "prompt_attention", [&](auto tag) {
    using scalar_t = decltype(tag);
    prompt_attention_kernel<scalar_t>(query, keys, values, spans, static_cast<float>(scale),
                                      out);
  });
}

template <typename scalar_t>
void silu_mul_kernel(const at::Tensor& gate_up, at::Tensor& out) {
  using S = Stored<scalar_t>;
  const int64_t rows = out.size(0), width = out.size(1);
  const raw_t<scalar_t>* in_all = raw<scalar_t>(gate_up);
  raw_t<scalar_t>* out_all = raw<scalar_t>(out);
  at::parallel_for(0, rows, grain(width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const raw_t<scalar_t>* gate = in_all + r * 2 * width;
      const raw_t<scalar_t>* up = gate + width;
      raw_t<scalar_t>* o = out_all + r * width;
      // torch's silu, x / (1 + exp(-x)), rounded to the dtype, then the product rounded
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) {
        const float g = S::load(gate[i]);
        o[i] = S::store(S::rounded(g / (1.f + fast_exp(-g))) * S::load(up[i]));
      }
    }
  });
}

// gate_up [rows, 2 width], contiguous (gate then up in each row): SiLU(gate) x up, [rows, width].
at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0,
              "gate_up [rows, 2 width], contiguous");
  at::Tensor out = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  float_or_bf16(gate_up.scalar_type(), "silu_mul", [&](auto tag) {
    using scalar_t = decltype(tag);
    silu_mul_kernel<scalar_t>(gate_up, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ragbench, m) {
  m.def("add_rms_norm_(Tensor(a!) hidden, Tensor? delta, Tensor weight, float eps) -> Tensor");
  m.def("rotary_(Tensor(a!) qk, Tensor cos, Tensor signed_sin) -> ()");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("prompt_attention(Tensor query, Tensor keys, Tensor values, Tensor spans, float scale,"
        " Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(ragbench, CPU, m) {
  m.impl("add_rms_norm_", add_rms_norm_);
  m.impl("rotary_", rotary_);
  m.impl("silu_mul", silu_mul);
  m.impl("prompt_attention", prompt_attention);
}
