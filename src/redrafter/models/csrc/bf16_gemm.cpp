// Products of a few bf16 rows with a bf16 weight, in one pass over the weight.
//
// For the small layers a drafter runs with 1-8 rows (576 x 576 takes oneDNN about 33 us for one row,
// for 0.66 MB of weight) the per-call work, not the weight stream, is the cost. Layout (packed in
// models/base.py, ``pack_bf16``): the output features in tiles of 16; per tile, the inputs in pairs,
// 16 features x 2 inputs = 32 bf16 = one register, the operand of vdpbf16ps whose other operand is the
// activation pair broadcast. Products are exact in float32, sums float32, one rounding to bf16.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>

namespace {

constexpr int kTile = 16;

// R rows of one tile; CH independent accumulator chains per row hide vdpbf16ps's latency when R is small.
template <int R>
void tile_rows(const uint32_t* w, const uint32_t* a, int64_t pairs, int64_t a_stride32, at::BFloat16* out,
               int64_t out_stride) {
  constexpr int CH = R == 1 ? 4 : (R <= 3 ? 2 : 1);
  __m512 acc[CH][R];
  for (int c = 0; c < CH; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = _mm512_setzero_ps();
  int64_t u = 0;
  for (; u + CH <= pairs; u += CH) {
#pragma GCC unroll 4
    for (int c = 0; c < CH; ++c) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + (u + c) * kTile);
      for (int r = 0; r < R; ++r)
        acc[c][r] = _mm512_dpbf16_ps(acc[c][r], (__m512bh)_mm512_set1_epi32((int)a[r * a_stride32 + u + c]), wv);
    }
  }
  for (; u < pairs; ++u) {
    const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + u * kTile);
    for (int r = 0; r < R; ++r)
      acc[0][r] = _mm512_dpbf16_ps(acc[0][r], (__m512bh)_mm512_set1_epi32((int)a[r * a_stride32 + u]), wv);
  }
  for (int r = 0; r < R; ++r) {
    __m512 total = acc[0][r];
    for (int c = 1; c < CH; ++c) total = _mm512_add_ps(total, acc[c][r]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * out_stride), (__m256i)_mm512_cvtneps_pbh(total));
  }
}

using TileFn = void (*)(const uint32_t*, const uint32_t*, int64_t, int64_t, at::BFloat16*, int64_t);
const TileFn kTileFns[9] = {nullptr, tile_rows<1>, tile_rows<2>, tile_rows<3>, tile_rows<4>,
                            tile_rows<5>, tile_rows<6>, tile_rows<7>, tile_rows<8>};

}  // namespace

// x (M, K) bf16 contiguous, K even; wp (N/16, K/2, 32) bf16 -> (M, N) bf16.
torch::Tensor bf16_mm(const torch::Tensor& x, const torch::Tensor& wp) {
  TORCH_CHECK(x.device().is_cpu() && wp.device().is_cpu(), "bf16_mm runs on CPU tensors");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && x.dim() == 2 && x.is_contiguous() && x.size(1) % 2 == 0,
              "x: contiguous 2-D bf16 with an even number of inputs");
  TORCH_CHECK(wp.scalar_type() == torch::kBFloat16 && wp.dim() == 3 && wp.size(2) == 2 * kTile && wp.is_contiguous(),
              "wp: contiguous (N/16, K/2, 32) bf16");
  const int64_t M = x.size(0), K = x.size(1), tiles = wp.size(0), N = tiles * kTile, pairs = K / 2;
  TORCH_CHECK(wp.size(1) == pairs, "shapes of x and wp disagree");
  auto out = torch::empty({M, N}, x.options());
  if (M == 0) return out;
  const uint32_t* a = reinterpret_cast<const uint32_t*>(x.data_ptr<at::BFloat16>());
  const uint32_t* w = reinterpret_cast<const uint32_t*>(wp.data_ptr<at::BFloat16>());
  at::BFloat16* o = out.data_ptr<at::BFloat16>();
  // Small weights are not worth a second thread (the fork costs more than the work).
  const int64_t grain = tiles * pairs * M < 16384 ? tiles : 1;
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const uint32_t* wt = w + t * pairs * kTile;
      for (int64_t r0 = 0; r0 < M; r0 += 8) {
        const int rows = (int)std::min<int64_t>(8, M - r0);
        kTileFns[rows](wt, a + r0 * pairs, pairs, pairs, o + r0 * N + t * kTile, N);
      }
    }
  });
  return out;
}
