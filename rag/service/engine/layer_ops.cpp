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
// causal_softmax_: a prompt's attention scores (scaled, causal, softmax in float32), in place.
// silu_mul: the MLP's SiLU(gate) x up, read from the fused gate/up product.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "fast_exp.h"

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

template <typename scalar_t>
void causal_softmax_kernel(at::Tensor& scores, float scale, int64_t past) {
  using S = Stored<scalar_t>;
  const int64_t count = scores.size(-2), total = scores.size(-1);
  const int64_t rows = scores.numel() / total;
  raw_t<scalar_t>* all = raw<scalar_t>(scores);
  at::parallel_for(0, rows, grain(total), [&](int64_t begin, int64_t end) {
    std::vector<float> x(total);
    for (int64_t r = begin; r < end; ++r) {
      raw_t<scalar_t>* s = all + r * total;
      const int64_t seen = past + r % count + 1;  // the reused keys and the prompt so far
      float top = -INFINITY;
#pragma omp simd reduction(max : top)
      for (int64_t j = 0; j < seen; ++j) {
        x[j] = S::rounded(S::load(s[j]) * scale);
        top = std::max(top, x[j]);
      }
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < seen; ++j) {
        x[j] = fast_exp(x[j] - top);
        sum += x[j];
      }
      const float inverse = 1.f / sum;
#pragma omp simd
      for (int64_t j = 0; j < seen; ++j) s[j] = S::store(x[j] * inverse);
      std::fill(s + seen, s + total, S::store(0.f));
    }
  });
}

// scores [..., count, past + count], contiguous: a prompt's query tokens against its slot's
// keys; each row becomes the softmax of its scaled scores over the keys it sees.
void causal_softmax_(at::Tensor& scores, double scale, int64_t past) {
  TORCH_CHECK(scores.dim() >= 2 && scores.is_contiguous(), "scores [..., count, keys], contiguous");
  TORCH_CHECK(past >= 0 && scores.size(-1) == past + scores.size(-2), "keys = past + count");
  float_or_bf16(scores.scalar_type(), "causal_softmax_", [&](auto tag) {
    using scalar_t = decltype(tag);
    causal_softmax_kernel<scalar_t>(scores, static_cast<float>(scale), past);
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
  m.def("causal_softmax_(Tensor(a!) scores, float scale, int past) -> ()");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(ragbench, CPU, m) {
  m.impl("add_rms_norm_", add_rms_norm_);
  m.impl("rotary_", rotary_);
  m.impl("causal_softmax_", causal_softmax_);
  m.impl("silu_mul", silu_mul);
}
