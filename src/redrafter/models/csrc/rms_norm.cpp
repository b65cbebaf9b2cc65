// RMSNorm of bf16 rows in one call: what transformers' Llama/Qwen2 norm computes (float32 mean of
// squares, x * rsqrt(mean + eps) rounded to bf16, then times the bf16 weight, rounded to bf16),
// without the eight tensor operations (and their per-call work) it takes in PyTorch.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>

#include "vec.h"

namespace {

using redrafter_vec::round_bf16;

inline __m512 load_bf16(const at::BFloat16* p, __mmask16 m) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}


void norm_row(const at::BFloat16* x, const at::BFloat16* w, at::BFloat16* out, int64_t dim, float eps) {
  __m512 total = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; d += 16) {
    const __mmask16 m = dim - d >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (dim - d)) - 1);
    const __m512 v = load_bf16(x + d, m);
    total = _mm512_fmadd_ps(v, v, total);
  }
  const float inv = 1.f / std::sqrt(_mm512_reduce_add_ps(total) / (float)dim + eps);
  const __m512 scale = _mm512_set1_ps(inv);
  for (int64_t d = 0; d < dim; d += 16) {
    const __mmask16 m = dim - d >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (dim - d)) - 1);
    const __m512 normed = round_bf16(_mm512_mul_ps(load_bf16(x + d, m), scale));
    const __m256bh y = _mm512_cvtneps_pbh(_mm512_mul_ps(load_bf16(w + d, m), normed));
    _mm256_mask_storeu_epi16(out + d, m, (__m256i)y);
  }
}

}  // namespace

// x (..., dim) bf16 contiguous, weight (dim) bf16 -> (..., dim) bf16.
torch::Tensor rms_norm_bf16(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "rms_norm_bf16 runs on CPU tensors");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && weight.scalar_type() == torch::kBFloat16,
              "rms_norm_bf16: x and weight must be bfloat16");
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous() && weight.dim() == 1 && weight.is_contiguous() &&
                  weight.size(0) == x.size(-1),
              "rms_norm_bf16: contiguous x (..., dim) and weight (dim)");
  const int64_t dim = x.size(-1), rows = dim == 0 ? 0 : x.numel() / dim;
  auto out = torch::empty_like(x);
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  const at::BFloat16* wp = weight.data_ptr<at::BFloat16>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  // A few rows (decoding, a tree) are cheaper on one thread than waking the others.
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) norm_row(xp + r * dim, wp, op + r * dim, dim, (float)eps);
  });
  return out;
}
