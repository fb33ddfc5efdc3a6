// The pointwise work of a layer between its matmuls, each as one pass over its rows
// (torch.ops.ragbench.*; rag/service/engine/kernels.py loads them, the forward pass keeps
// the torch code they replace where they are absent).  In torch each is three to six
// operations, each reading and writing the whole tensor (a prefill's hidden states are
// megabytes) and converting bf16 to float and back on the way.  Each kernel rounds where the
// torch code rounds (to the tensors' dtype after each operation torch runs in it) and
// accumulates in float32 where it does, so its results are torch's, give or take the last
// bit of an exp or of a sum taken in another order.
//
// add_rms_norm_: the residual add and the next RMSNorm (hidden += delta, in place; the
//   norm of the sum, in float32, cast back, times the weight), or the norm alone.
// rotary_: the rotary embedding, in place, on every query and key head of each token.
// silu_mul: SiLU(gate) * up, the MLP's activation over its fused gate/up product.
// causal_softmax_: a prompt's attention scores (scaled, causal, softmax in float32), in place.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "fast_exp.h"

namespace {

// Rows of work per task: enough elements that the threads' start-up is paid off.
int64_t grain(int64_t row_elements) { return std::max<int64_t>(1, 16384 / row_elements); }

// A float rounded to the tensors' dtype and back, as storing an intermediate result does.
template <typename scalar_t>
inline float rounded(float x) {
  return static_cast<float>(static_cast<scalar_t>(x));
}

template <typename scalar_t>
void add_rms_norm_kernel(at::Tensor& hidden, const at::Tensor* delta, const at::Tensor& weight,
                         float eps, at::Tensor& out) {
  const int64_t rows = hidden.size(0), width = hidden.size(1);
  scalar_t* h_all = hidden.data_ptr<scalar_t>();
  const scalar_t* d_all = delta ? delta->const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* w = weight.const_data_ptr<scalar_t>();
  scalar_t* out_all = out.data_ptr<scalar_t>();
  at::parallel_for(0, rows, grain(width), [&](int64_t begin, int64_t end) {
    std::vector<float> x(width);
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* h = h_all + r * width;
      if (d_all) {
        const scalar_t* d = d_all + r * width;
#pragma omp simd
        for (int64_t i = 0; i < width; ++i) {
          const scalar_t sum = static_cast<scalar_t>(static_cast<float>(h[i]) + static_cast<float>(d[i]));
          h[i] = sum;
          x[i] = static_cast<float>(sum);
        }
      } else {
#pragma omp simd
        for (int64_t i = 0; i < width; ++i) x[i] = static_cast<float>(h[i]);
      }
      float squares = 0.f;
#pragma omp simd reduction(+ : squares)
      for (int64_t i = 0; i < width; ++i) squares += x[i] * x[i];
      const float inverse = 1.f / std::sqrt(squares / static_cast<float>(width) + eps);
      scalar_t* o = out_all + r * width;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i)
        o[i] = static_cast<scalar_t>(static_cast<float>(w[i]) * rounded<scalar_t>(x[i] * inverse));
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "add_rms_norm_",
                                  [&] {
                                    add_rms_norm_kernel<scalar_t>(hidden, d.defined() ? &d : nullptr,
                                                                  w, static_cast<float>(eps), out);
                                  });
  return out;
}

template <typename scalar_t>
void rotary_kernel(at::Tensor& qk, const at::Tensor& cos, const at::Tensor& signed_sin) {
  const int64_t tokens = qk.size(0), heads = qk.size(1), dim = qk.size(2), half = dim / 2;
  const int64_t token_stride = qk.stride(0), head_stride = qk.stride(1);
  scalar_t* x_all = qk.data_ptr<scalar_t>();
  const scalar_t* c_all = cos.const_data_ptr<scalar_t>();
  const scalar_t* s_all = signed_sin.const_data_ptr<scalar_t>();
  at::parallel_for(0, tokens, grain(heads * dim), [&](int64_t begin, int64_t end) {
    std::vector<float> x(dim);
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* c = c_all + t * dim;
      const scalar_t* s = s_all + t * dim;
      for (int64_t h = 0; h < heads; ++h) {
        scalar_t* head = x_all + t * token_stride + h * head_stride;
#pragma omp simd
        for (int64_t i = 0; i < dim; ++i) x[i] = static_cast<float>(head[i]);
        // x cos + swap_halves(x) signed_sin, each product rounded as torch stores it
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          head[i] = static_cast<scalar_t>(rounded<scalar_t>(x[i] * static_cast<float>(c[i])) +
                                          rounded<scalar_t>(x[i + half] * static_cast<float>(s[i])));
          head[i + half] = static_cast<scalar_t>(
              rounded<scalar_t>(x[i + half] * static_cast<float>(c[i + half])) +
              rounded<scalar_t>(x[i] * static_cast<float>(s[i + half])));
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qk.scalar_type(), "rotary_",
                                  [&] { rotary_kernel<scalar_t>(qk, c, s); });
}

template <typename scalar_t>
void silu_mul_kernel(const at::Tensor& gate_up, at::Tensor& out) {
  const int64_t rows = out.size(0), width = out.size(1);
  const scalar_t* in_all = gate_up.const_data_ptr<scalar_t>();
  scalar_t* out_all = out.data_ptr<scalar_t>();
  at::parallel_for(0, rows, grain(2 * width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* gate = in_all + r * 2 * width;
      const scalar_t* up = gate + width;
      scalar_t* o = out_all + r * width;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) {
        const float g = static_cast<float>(gate[i]);
        const float activated = rounded<scalar_t>(g / (1.f + fast_exp(-g)));
        o[i] = static_cast<scalar_t>(activated * static_cast<float>(up[i]));
      }
    }
  });
}

// gate_up [rows, 2 x width] (gate, then up); [rows, width].
at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "gate_up [rows, 2 x width]");
  const at::Tensor in = gate_up.contiguous();
  at::Tensor out = at::empty({in.size(0), in.size(1) / 2}, in.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "silu_mul",
                                  [&] { silu_mul_kernel<scalar_t>(in, out); });
  return out;
}

template <typename scalar_t>
void causal_softmax_kernel(at::Tensor& scores, float scale, int64_t past) {
  const int64_t count = scores.size(-2), total = scores.size(-1);
  const int64_t rows = scores.numel() / total;
  scalar_t* all = scores.data_ptr<scalar_t>();
  at::parallel_for(0, rows, grain(total), [&](int64_t begin, int64_t end) {
    std::vector<float> x(total);
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* s = all + r * total;
      const int64_t seen = past + r % count + 1;  // the reused keys and the prompt so far
      float top = -INFINITY;
      for (int64_t j = 0; j < seen; ++j) {
        x[j] = rounded<scalar_t>(static_cast<float>(s[j]) * scale);
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
      for (int64_t j = 0; j < seen; ++j) s[j] = static_cast<scalar_t>(x[j] * inverse);
      std::fill(s + seen, s + total, static_cast<scalar_t>(0.f));
    }
  });
}

// scores [..., count, past + count], contiguous: a prompt's query tokens against its slot's
// keys; each row becomes the softmax of its scaled scores over the keys it sees.
void causal_softmax_(at::Tensor& scores, double scale, int64_t past) {
  TORCH_CHECK(scores.dim() >= 2 && scores.is_contiguous(), "scores [..., count, keys], contiguous");
  TORCH_CHECK(past >= 0 && scores.size(-1) == past + scores.size(-2), "keys = past + count");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, scores.scalar_type(), "causal_softmax_",
                                  [&] {
                                    causal_softmax_kernel<scalar_t>(scores, static_cast<float>(scale),
                                                                    past);
                                  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ragbench, m) {
  m.def("add_rms_norm_(Tensor(a!) hidden, Tensor? delta, Tensor weight, float eps) -> Tensor");
  m.def("rotary_(Tensor(a!) qk, Tensor cos, Tensor signed_sin) -> ()");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("causal_softmax_(Tensor(a!) scores, float scale, int past) -> ()");
}

TORCH_LIBRARY_IMPL(ragbench, CPU, m) {
  m.impl("add_rms_norm_", add_rms_norm_);
  m.impl("rotary_", rotary_);
  m.impl("silu_mul", silu_mul);
  m.impl("causal_softmax_", causal_softmax_);
}
