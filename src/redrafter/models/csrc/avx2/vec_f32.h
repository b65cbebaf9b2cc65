// Vector helpers of the AVX2 kernels (float32, 8 lanes): a horizontal sum in a fixed order and exp.
#pragma once
#include <immintrin.h>

namespace redrafter_vec8 {

// The 8 lanes' sum, in a fixed order: ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)).
inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// exp(x) for 8 lanes: 2^t, t = x log2(e) = n + f with f in [-1/2, 1/2]; 2^f by its Taylor series to
// degree 7 (below 1e-8 relative), 2^n through the exponent bits. t is clamped to [-126, 126]: below,
// the result is 0 (exp of a score far under the maximum), so -inf gives 0; above, 2^126 (not inf:
// SiLU of a very negative input, where only the ratio matters). A NaN input gives 0 or a tiny value,
// not NaN.
inline __m256 exp8(__m256 x) {
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  const __m256 under = _mm256_cmp_ps(t, _mm256_set1_ps(-126.f), _CMP_LT_OQ);
  const __m256 tc = _mm256_min_ps(_mm256_max_ps(t, _mm256_set1_ps(-126.f)), _mm256_set1_ps(126.f));
  const __m256 n = _mm256_round_ps(tc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 y = _mm256_mul_ps(_mm256_sub_ps(tc, n), _mm256_set1_ps(0.693147180559945309f));
  __m256 p = _mm256_set1_ps(1.f / 5040.f);
  p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.f / 720.f));
  p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

}  // namespace redrafter_vec8
