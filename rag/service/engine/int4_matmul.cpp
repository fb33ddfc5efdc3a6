// int4_linear: rows of bf16 activations times a 4-bit weight matrix (GGUF's groups of 32
// with a scale and a minimum each), built into the kernels' AVX-512 library only (setup.py) and
// called where the CPU has AVX512-BF16 (rag/service/engine/kernels.py says where).
//
// torch's CPU 4-bit kernel unpacks each weight group again for every row it multiplies, so
// its time grows with the rows and a dense bf16 matmul overtakes it at about 4 rows.  Here a
// group is unpacked once into registers and multiplied with up to 8 rows at a time by
// `vdpbf16ps` (products of bf16 pairs exact in float32, summed in float32), so a decode step
// of 5-10 rows, as one of 1-4, reads a quarter of the dense weights' bytes and beats them.
//
// A 4-bit code q (0..15) becomes the bf16 number 128 + q by setting the bits 0x4300 above it
// (128 is 2^7 and a bf16 mantissa has 7 bits, so 128 + q is exact).  For a group of 32
// inputs with w = d q + m (GGUF's Q4_1; Q8_0's halves alike), D = sum x (128 + q) and
// S = sum x:  sum x w = d D + (m - 128 d) S.
//
// Layout (int4.py packs it): codes [out, in / 2] bytes in blocks of 16 output rows, each
// block's in / 4 steps of 32 bytes; byte 2j + e of step i holds output j's codes for inputs
// 4i + e (low nibble) and 4i + 2 + e (high nibble), so one step widened to 16-bit lanes is
// two vectors of 16 outputs x 2 inputs, the pairs `vdpbf16ps` multiplies.  scales_mins
// [in / 32, out, 2] float16: each group's (d, m) per output, as GGUF stores them (exact in
// float16, and half the bytes of float32: at one row a step's time is the bytes it reads).

#ifndef __AVX512F__
#error "int4_matmul.cpp is built for AVX-512 only"
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kGroup = 32;      // inputs per scale and minimum
constexpr int64_t kBlock = 16;      // output rows per packed block: one float32 vector
constexpr int64_t kMostRows = 8;    // rows multiplied together: their sums fill the registers
constexpr int64_t kStepBytes = 32;  // one step: 16 outputs x 4 inputs x 4 bits

struct Operands {
  const uint16_t* x;             // [rows, in] bf16 bits
  const float* sums;             // [rows, groups]: S per row and group
  const uint8_t* codes;          // [out, in / 2]
  const at::Half* scales_mins;   // [groups, out, 2]
  uint16_t* y;                   // [rows, out] bf16 bits
  int64_t in, out, groups;
};

// dot + w . (pair, pair, ...): the pair of bf16 at `pair` as `vdpbf16ps`'s broadcast operand
// (GCC loads it into a register with a broadcast of its own, an extra vector operation).
inline __m512 dot_broadcast(__m512 dot, __m512bh w, const uint16_t* pair) {
  asm("vdpbf16ps %2%{1to16%}, %1, %0"
      : "+v"(dot)
      : "v"(w), "m"(*reinterpret_cast<const uint32_t*>(pair)));
  return dot;
}

// One block of 16 outputs for rows [first, first + R).
template <int R>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void block_rows(const Operands& a,
                                                                        int64_t block,
                                                                        int64_t first) {
  const __m512i low_nibble = _mm512_set1_epi16(0x0F), as_128_plus = _mm512_set1_epi16(0x4300);
  const __m512i scales_of = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                              28, 30);
  const __m512i mins_of = _mm512_add_epi32(scales_of, _mm512_set1_epi32(1));
  const __m512 minus_128 = _mm512_set1_ps(-128.f);
  const uint8_t* codes = a.codes + block * kBlock * (a.in / 2);
  const uint16_t* x = a.x + first * a.in;
  __m512 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm512_setzero_ps();
  // A few rows' dot products would wait on each other (each vdpbf16ps waits for the one
  // before it on the same sum): there the near and far pairs add into sums of their own.
  constexpr int kChains = R <= 4 ? 2 : 1;
  for (int64_t g = 0; g < a.groups; ++g) {
    __m512 dot[kChains][R];
    for (int c = 0; c < kChains; ++c) {
      for (int r = 0; r < R; ++r) dot[c][r] = _mm512_setzero_ps();
    }
    for (int64_t step = 0; step < kGroup / 4; ++step, codes += kStepBytes) {
      const __m512i wide =
          _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes)));
      const __m512bh near = (__m512bh)_mm512_or_si512(_mm512_and_si512(wide, low_nibble),
                                                      as_128_plus);
      const __m512bh far = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(wide, 4), as_128_plus);
      const int64_t k = g * kGroup + 4 * step;
      for (int r = 0; r < R; ++r) {
        dot[0][r] = dot_broadcast(dot[0][r], near, x + r * a.in + k);
        dot[kChains - 1][r] = dot_broadcast(dot[kChains - 1][r], far, x + r * a.in + k + 2);
      }
    }
    const __m512i pairs = _mm512_loadu_si512(a.scales_mins + (g * a.out + block * kBlock) * 2);
    const __m512 lo = _mm512_cvtph_ps(_mm512_castsi512_si256(pairs));
    const __m512 hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(pairs, 1));
    const __m512 scale = _mm512_permutex2var_ps(lo, scales_of, hi);
    const __m512 offset = _mm512_fmadd_ps(scale, minus_128, _mm512_permutex2var_ps(lo, mins_of, hi));
    for (int r = 0; r < R; ++r) {
      const __m512 sums = kChains == 2 ? _mm512_add_ps(dot[0][r], dot[1][r]) : dot[0][r];
      total[r] = _mm512_fmadd_ps(sums, scale, total[r]);
      const __m512 sum = _mm512_set1_ps(a.sums[(first + r) * a.groups + g]);
      total[r] = _mm512_fmadd_ps(sum, offset, total[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m256bh out = _mm512_cvtneps_pbh(total[r]);
    std::memcpy(a.y + (first + r) * a.out + block * kBlock, &out, sizeof(out));
  }
}

using BlockRows = void (*)(const Operands&, int64_t, int64_t);
constexpr BlockRows kBlockRows[kMostRows] = {block_rows<1>, block_rows<2>, block_rows<3>,
                                             block_rows<4>, block_rows<5>, block_rows<6>,
                                             block_rows<7>, block_rows<8>};

// x [rows, in] bf16; codes [out, in / 2] uint8 and scales_mins [in / 32, out, 2] float16,
// packed as above; [rows, out] bf16.
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& codes,
                       const at::Tensor& scales_mins) {
  TORCH_CHECK(__builtin_cpu_supports("avx512bf16"), "int4_linear needs AVX512-BF16");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "x: [rows, in] bf16");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous(),
              "codes: [out, in / 2] uint8, contiguous");
  const int64_t rows = x.size(0), in = x.size(1), out = codes.size(0), groups = in / kGroup;
  TORCH_CHECK(in % kGroup == 0 && codes.size(1) * 2 == in, "in: a multiple of 32, codes' in");
  TORCH_CHECK(out % kBlock == 0, "out: a multiple of 16");
  TORCH_CHECK(scales_mins.scalar_type() == at::kHalf && scales_mins.is_contiguous() &&
                  scales_mins.sizes() == at::IntArrayRef({groups, out, 2}),
              "scales_mins: [in / 32, out, 2] float16, contiguous");
  const at::Tensor xs = x.contiguous();
  const c10::BFloat16* x_all = xs.const_data_ptr<c10::BFloat16>();
  std::vector<float> sums(rows * groups);  // a loop: a torch operation costs microseconds
  for (int64_t i = 0; i < rows * groups; ++i) {
    float sum = 0.f;
    for (int64_t k = 0; k < kGroup; ++k) sum += static_cast<float>(x_all[i * kGroup + k]);
    sums[i] = sum;
  }
  at::Tensor y = at::empty({rows, out}, x.options());
  const Operands operands{reinterpret_cast<const uint16_t*>(x_all),
                          sums.data(),
                          codes.const_data_ptr<uint8_t>(),
                          scales_mins.const_data_ptr<at::Half>(),
                          reinterpret_cast<uint16_t*>(y.data_ptr()),
                          in,
                          out,
                          groups};
  at::parallel_for(0, out / kBlock, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      for (int64_t first = 0; first < rows; first += kMostRows) {
        kBlockRows[std::min(rows - first, kMostRows) - 1](operands, block, first);
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ragbench, m) {
  m.def("int4_linear(Tensor x, Tensor codes, Tensor scales_mins) -> Tensor");
}

TORCH_LIBRARY_IMPL(ragbench, CPU, m) { m.impl("int4_linear", int4_linear); }
