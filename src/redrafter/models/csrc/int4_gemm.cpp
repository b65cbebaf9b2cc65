// Products of a few bf16 rows with a 4-bit weight, in one pass over the weight.
//
// Weight layout (pack_weight): the output features in tiles of 16; per tile, the inputs in quads
// (k = 4u .. 4u+3) of 32 bytes, byte 2j+e = q[n0+j][4u+e] | q[n0+j][4u+e+2] << 4 (j the feature in
// the tile, e in {0, 1}); per tile and group of 32 inputs, 16 steps then 16 lows (float32, or float16
// where the rounded values still put every weight within the grid tolerance: a Q4_0 / Q4_1 file's own
// d and m, 13 MB less to stream per step for SmolLM2), with w = q * step + low. A quad's bytes widened to 32 words give, through a 32-entry table, the bf16
// values of inputs (4u, 4u+1) of the 16 features as 16 bf16 pairs (low nibbles) and of (4u+2, 4u+3)
// (high nibbles): the operands of vdpbf16ps, whose other operand is the activation pair broadcast.
// Per group, sum_k a_k (q_k step + low) = step * sum_k a_k q_k + low * sum_k a_k.
//
// Every row chunk of a tile re-reads the tile's weights from L1, so the weight stream from memory
// is one pass whatever the number of rows (torch's kernel streams it once per 4 rows).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int kTile = 16;   // output features per tile (one zmm of float32)
constexpr int kGroup = 32;  // inputs per (step, low) of a 4-bit weight, per d of a Q8_0 one
constexpr int kQuadBytes = 32;
constexpr int kPrefetchBytes = 8192;  // the weight stream runs 8 KB ahead (prefetching past the end is harmless)

// A quad of inputs (4u .. 4u+3) of a tile's 16 features as the operands of two vdpbf16ps: the bf16
// pairs of inputs (4u, 4u+1) and (4u+2, 4u+3).
struct Int4Format {
  static constexpr int kGroup = 32;  // inputs per (step, low)
  static constexpr int kQuad = kQuadBytes;
  static constexpr bool kLow = true;  // per group, 16 steps and then 16 lows; else 16 steps (d) alone
  static inline void quad(const uint8_t* p, const __m512i table, __m512bh& first, __m512bh& second) {
    __m512i x = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    first = (__m512bh)_mm512_permutexvar_epi16(x, table);
    second = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(x, 4), table);
  }
};

// 8-bit weights, w = d * q: G = 32 for a Q8_0 weight (float16 d), G = 16 for a Q6_K one (float32
// d = the block's float16 scale times the sub-block's 8-bit one).
template <int G>
struct Int8Format {
  static constexpr int kGroup = G;  // inputs per d
  static constexpr int kQuad = 2 * kQuadBytes;
  static constexpr bool kLow = false;
  static inline __m512bh pair(const uint8_t* p) {
    const __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    const __m512 b =
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
    return _mm512_cvtne2ps_pbh(b, a);  // bytes 0..15 in the low half
  }
  static inline void quad(const uint8_t* p, const __m512i, __m512bh& first, __m512bh& second) {
    first = pair(p);
    second = pair(p + kQuadBytes);
  }
};

// 16 steps or lows, widened to float32 (exactly).
inline __m512 load_scales(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_scales(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
// 16 bytes as float32 (exactly).
inline __m512 load_bytes(const uint8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// Scales of type uint8_t are "K scales", a Q4_K weight's own form (pack_k_scales in models/int4.py):
// per tile, per group of 32 inputs, 16 step multipliers then 16 low multipliers (bytes); after all
// groups, per block of 8 groups (256 inputs), 16 step units then 16 low units (float32). A group's
// step is multiplier x unit, exactly its d x sc in float32 (and its low dmin x m): 4.75 bits per
// weight streamed where float32 steps and lows take 6.
constexpr int kBlockGroups = 8;
constexpr int kUnitBytes = 2 * kTile * 4;  // per tile and block of 8 groups
template <typename S>
constexpr int64_t tile_scale_count(int64_t groups, int per_group) {
  if constexpr (std::is_same_v<S, uint8_t>) return groups * per_group + groups / kBlockGroups * kUnitBytes;
  return groups * per_group;
}

// R rows of one tile, up to 8: two accumulator chains per row (vdpbf16ps's latency exceeds its issue
// interval). Every row gets the same operations in the same order whatever R is, so a row's result
// does not depend on the rows beside it: a tree's tokens compute what single steps do, which keeps
// bf16 greedy speculative decoding token-identical to plain decoding. (One chain per row would fit
// 12 rows in the registers and save a second pass of the tile, but sums in another order.)
template <typename F, typename S, int R>
inline void tile_rows(const uint8_t* wq, const S* sm, const uint32_t* a, int64_t a_stride32,
                      const float* asum, int64_t groups, at::BFloat16* out, int64_t out_stride,
                      const __m512i table) {
  constexpr int kGroupBytes = F::kGroup / 4 * F::kQuad;  // one group of a tile's weights
  constexpr int kScales = (F::kLow ? 2 : 1) * kTile;  // per tile and group
  constexpr int kAhead = kPrefetchBytes / kGroupBytes;  // groups
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 tmp[R], tmp2[R];
    for (int r = 0; r < R; ++r) tmp[r] = tmp2[r] = _mm512_setzero_ps();
    const uint8_t* wg = wq + g * kGroupBytes;
    // The weight stream runs kPrefetchBytes ahead of the products (into the next tiles, which
    // follow in memory): without it, fetching and multiplying hardly overlap (PERFORMANCE.md).
    for (int l = 0; l < kGroupBytes / 64; ++l)
      _mm_prefetch(reinterpret_cast<const char*>(wg + kPrefetchBytes + 64 * l), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(sm + (g + kAhead) * kScales), _MM_HINT_T0);
    if constexpr (sizeof(S) * kScales > 64)
      _mm_prefetch(reinterpret_cast<const char*>(sm + (g + kAhead) * kScales) + 64, _MM_HINT_T0);
    const float* units = nullptr;  // K scales: this group's block's units
    if constexpr (std::is_same_v<S, uint8_t>) {
      const uint8_t* unit_base = sm + groups * kScales;
      units = reinterpret_cast<const float*>(unit_base + g / kBlockGroups * kUnitBytes);
      _mm_prefetch(reinterpret_cast<const char*>(unit_base + (g + kAhead) / kBlockGroups * kUnitBytes), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(unit_base + (g + kAhead) / kBlockGroups * kUnitBytes) + 64, _MM_HINT_T0);
    }
    const uint32_t* ag = a + g * (F::kGroup / 2);
#pragma GCC unroll 8
    for (int u = 0; u < F::kGroup / 4; ++u) {
      __m512bh first, second;
      F::quad(wg + u * F::kQuad, table, first, second);
      for (int r = 0; r < R; ++r) {
        const uint32_t* ar = ag + r * a_stride32;
        tmp[r] = _mm512_dpbf16_ps(tmp[r], (__m512bh)_mm512_set1_epi32((int)ar[2 * u]), first);
        tmp2[r] = _mm512_dpbf16_ps(tmp2[r], (__m512bh)_mm512_set1_epi32((int)ar[2 * u + 1]), second);
      }
    }
    __m512 step, low = _mm512_setzero_ps();
    if constexpr (std::is_same_v<S, uint8_t>) {
      step = _mm512_mul_ps(load_bytes(sm + g * kScales), _mm512_loadu_ps(units));
      low = _mm512_mul_ps(load_bytes(sm + g * kScales + kTile), _mm512_loadu_ps(units + kTile));
    } else {
      step = load_scales(sm + g * kScales);
      if constexpr (F::kLow) low = load_scales(sm + g * kScales + kTile);
    }
    for (int r = 0; r < R; ++r) {
      const __m512 dot = _mm512_add_ps(tmp[r], tmp2[r]);
      acc[r] = _mm512_fmadd_ps(dot, step, acc[r]);
      if constexpr (F::kLow) acc[r] = _mm512_fmadd_ps(low, _mm512_set1_ps(asum[r * groups + g]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    __m256bh v = _mm512_cvtneps_pbh(acc[r]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * out_stride), (__m256i)v);
  }
}

template <typename S>
using TileFn = void (*)(const uint8_t*, const S*, const uint32_t*, int64_t, const float*, int64_t,
                        at::BFloat16*, int64_t, const __m512i);
constexpr int kMaxChunk = 8;
template <typename F, typename S>
constexpr TileFn<S> kTileFns[kMaxChunk + 1] = {nullptr,
                                               tile_rows<F, S, 1>, tile_rows<F, S, 2>, tile_rows<F, S, 3>,
                                               tile_rows<F, S, 4>, tile_rows<F, S, 5>, tile_rows<F, S, 6>,
                                               tile_rows<F, S, 7>, tile_rows<F, S, 8>};

// All tiles of the product (see int4_mm), for weights of format F with scales of type S.
// Row r of the output starts at o + r * N (N: the output's row stride, which may exceed tiles * 16 when
// this weight fills only some of its columns).
template <typename F, typename S>
void run_tiles(const uint32_t* a, const float* s, const uint8_t* w, const S* scales, at::BFloat16* o, int64_t M,
               int64_t K, int64_t tiles, int64_t groups, int64_t N) {
  const int64_t a_stride32 = K / 2;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    alignas(64) uint16_t tbl[32];
    for (int i = 0; i < 32; ++i) {
      float f = (float)(i & 15);
      uint32_t bits;
      std::memcpy(&bits, &f, 4);
      tbl[i] = (uint16_t)(bits >> 16);  // exact: small integers are bf16 values
    }
    const __m512i table = _mm512_load_si512(tbl);
    for (int64_t t = begin; t < end; ++t) {
      const uint8_t* wt = w + t * (K / 4) * F::kQuad;
      const S* st = scales + t * tile_scale_count<S>(groups, (F::kLow ? 2 : 1) * kTile);
      // Even chunks of at most 8 rows (12 rows: 6 + 6, not 8 + 4).
      const int64_t chunks = (M + kMaxChunk - 1) / kMaxChunk, chunk = (M + chunks - 1) / chunks;
      for (int64_t r0 = 0; r0 < M; r0 += chunk) {
        const int rows = (int)std::min<int64_t>(chunk, M - r0);
        kTileFns<F, S>[rows](wt, st, a + r0 * a_stride32, a_stride32, F::kLow ? s + r0 * groups : nullptr, groups,
                          o + r0 * N + t * kTile, N, table);
      }
    }
  });
}

}  // namespace

namespace {

// x (M, K) bf16 contiguous, wq (N/16, K/4, quad bytes) uint8, sm (N/16, K/G, scales) float32 or float16
// -> columns col0 .. col0 + N of out (M, >= col0 + N) bf16 contiguous.
template <typename F>
void quantized_mm(const torch::Tensor& x, const torch::Tensor& wq, const torch::Tensor& sm, torch::Tensor& out,
                  int64_t col0) {
  constexpr int kScales = (F::kLow ? 2 : 1) * kTile;
  TORCH_CHECK(x.device().is_cpu() && wq.device().is_cpu() && sm.device().is_cpu(), "the products run on CPU tensors");
  TORCH_CHECK(x.dtype() == torch::kBFloat16 && x.dim() == 2 && x.is_contiguous(), "x: contiguous 2-D bf16");
  TORCH_CHECK(wq.dtype() == torch::kUInt8 && wq.dim() == 3 && wq.size(2) == F::kQuad && wq.is_contiguous(),
              "wq: contiguous (N/16, K/4, ", F::kQuad, ") uint8");
  const int64_t M = x.size(0), K = x.size(1), tiles = wq.size(0), N = tiles * kTile;
  const int64_t groups = K / F::kGroup;
  if (F::kLow && sm.dtype() == torch::kUInt8) {  // K scales
    TORCH_CHECK(sm.dim() == 2 && sm.is_contiguous() && groups % kBlockGroups == 0 &&
                    sm.size(1) == tile_scale_count<uint8_t>(groups, kScales),
                "sm: contiguous (N/16, K/32 * 32 + K/256 * 128) uint8 K scales");
  } else {
    TORCH_CHECK((sm.dtype() == torch::kFloat32 || sm.dtype() == torch::kFloat16) && sm.dim() == 3 &&
                    sm.size(2) == kScales && sm.is_contiguous() && sm.size(1) * F::kGroup == K,
                "sm: contiguous (N/16, K/", F::kGroup, ", ", kScales, ") float32 or float16");
  }
  TORCH_CHECK(wq.size(1) * 4 == K && K % F::kGroup == 0 && sm.size(0) == tiles, "shapes of x, wq and sm disagree");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == M && out.size(1) >= col0 + N && out.is_contiguous(),
              "out: contiguous (M, >= ", col0 + N, ")");
  if (M == 0) return;
  // Per row and group: the sum of the (bf16) activations, for the lows (a dot product with ones).
  std::vector<float> asum(F::kLow ? M * groups : 0);
  const uint32_t* a = reinterpret_cast<const uint32_t*>(x.data_ptr<at::BFloat16>());
  if constexpr (F::kLow) {
    const __m512bh ones = (__m512bh)_mm512_set1_epi16((short)0x3F80);  // bf16 1.0
    for (int64_t i = 0; i < M * groups; ++i) {
      static_assert(F::kGroup == 32, "the lows' sums read groups of 32 inputs");
      const __m512i pairs = _mm512_loadu_si512(a + i * (F::kGroup / 2));
      asum[i] = _mm512_reduce_add_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)pairs, ones));  // 32 inputs
    }
  }
  const uint8_t* w = wq.data_ptr<uint8_t>();
  at::BFloat16* o = out.data_ptr<at::BFloat16>() + col0;
  if (sm.dtype() == torch::kFloat16) {
    run_tiles<F>(a, asum.data(), w, sm.data_ptr<at::Half>(), o, M, K, tiles, groups, out.size(1));
  } else if (sm.dtype() == torch::kUInt8) {
    if constexpr (F::kLow) run_tiles<F>(a, asum.data(), w, sm.data_ptr<uint8_t>(), o, M, K, tiles, groups, out.size(1));
  } else {
    run_tiles<F>(a, asum.data(), w, sm.data_ptr<float>(), o, M, K, tiles, groups, out.size(1));
  }
}

// One packed weight's product into columns col0 .. of out: 4-bit (pack_weight, 32 bytes per quad of
// inputs) or 8-bit (pack_weight8, 64 bytes; 32 or 16 inputs per d, from sm's shape).
void any_mm(const torch::Tensor& x, const torch::Tensor& wq, const torch::Tensor& sm, torch::Tensor& out, int64_t col0) {
  TORCH_CHECK(x.dim() == 2 && wq.dim() == 3 && sm.dim() >= 2, "x: 2-D, wq: 3-D, sm: 2-D (K scales) or 3-D");
  if (wq.size(2) == kQuadBytes) return quantized_mm<Int4Format>(x, wq, sm, out, col0);
  if (sm.size(1) * 16 == x.size(1)) return quantized_mm<Int8Format<16>>(x, wq, sm, out, col0);
  quantized_mm<Int8Format<32>>(x, wq, sm, out, col0);
}

torch::Tensor new_output(const torch::Tensor& x, int64_t n) {
  TORCH_CHECK(x.dim() == 2, "x: 2-D");
  return torch::empty({x.size(0), n}, x.options());
}

// (N, K/32) scales -> (N/16, K/32, 16) in the tile layout.
torch::Tensor tile_scales(const torch::Tensor& scales, int64_t tiles, int64_t groups) {
  return scales.view({tiles, kTile, groups}).permute({0, 2, 1});
}

}  // namespace

// x (M, K) bf16, wq and sm from pack_weight -> (M, N) bf16.
torch::Tensor int4_mm(const torch::Tensor& x, const torch::Tensor& wq, const torch::Tensor& sm) {
  auto out = new_output(x, wq.size(0) * kTile);
  quantized_mm<Int4Format>(x, wq, sm, out, 0);
  return out;
}

// x (M, K) bf16, wq and sm from pack_weight8 -> (M, N) bf16; the groups (32 or 16 inputs per d) follow
// from sm's shape.
torch::Tensor int8_mm(const torch::Tensor& x, const torch::Tensor& wq, const torch::Tensor& sm) {
  auto out = new_output(x, wq.size(0) * kTile);
  TORCH_CHECK(wq.size(2) == 2 * kQuadBytes, "wq: an 8-bit weight (pack_weight8)");
  any_mm(x, wq, sm, out, 0);
  return out;
}

// x (M, K) bf16 through a weight whose output features come in parts of different formats (a fused
// q|k|v whose v is Q6_K and q, k Q4_K): part i (wqs[i], sms[i], from pack_weight or pack_weight8) gives
// the next wqs[i].size(0) * 16 columns of the (M, N) bf16 result. Each part computes as it would alone.
torch::Tensor mixed_mm(const torch::Tensor& x, const std::vector<torch::Tensor>& wqs, const std::vector<torch::Tensor>& sms) {
  TORCH_CHECK(!wqs.empty() && wqs.size() == sms.size(), "mixed_mm: as many scales as weights, at least one");
  int64_t n = 0;
  for (const auto& wq : wqs) n += wq.size(0) * kTile;
  auto out = new_output(x, n);
  int64_t col0 = 0;
  for (size_t i = 0; i < wqs.size(); ++i) {
    any_mm(x, wqs[i], sms[i], out, col0);
    col0 += wqs[i].size(0) * kTile;
  }
  return out;
}

// q (N, K) integer 0..15, step/low (N, K/32) float32 or float16 -> (wq, sm) in the layout above, sm in the
// dtype of step (which low must share).
std::vector<torch::Tensor> pack_weight(const torch::Tensor& q, const torch::Tensor& step, const torch::Tensor& low) {
  TORCH_CHECK(q.dim() == 2 && q.size(0) % kTile == 0 && q.size(1) % kGroup == 0,
              "q: (N, K) with N a multiple of 16 and K of 32");
  const int64_t N = q.size(0), K = q.size(1), tiles = N / kTile, groups = K / kGroup;
  auto qi = q.to(torch::kUInt8).contiguous();
  // (tiles, 16, K/4, 4): feature j, quad u, input e within the quad
  auto t = qi.view({tiles, kTile, K / 4, 4});
  auto lo = t.index({"...", torch::indexing::Slice(0, 2)});  // inputs 4u, 4u+1
  auto hi = t.index({"...", torch::indexing::Slice(2, 4)});  // inputs 4u+2, 4u+3
  auto bytes = lo.bitwise_or(hi.bitwise_left_shift(4));      // (tiles, 16, K/4, 2)
  auto wq = bytes.permute({0, 2, 1, 3}).contiguous().view({tiles, K / 4, kQuadBytes});
  TORCH_CHECK((step.scalar_type() == torch::kFloat32 || step.scalar_type() == torch::kFloat16) &&
                  low.scalar_type() == step.scalar_type(),
              "step and low: both float32 or both float16");
  auto sm = torch::cat({tile_scales(step, tiles, groups), tile_scales(low, tiles, groups)}, 2).contiguous();
  return {wq, sm};
}

// q (N, K) int8 in -127..127, d (N, K/32) or (N, K/16) float32 or float16 -> (wq, sm) in the 8-bit
// layout above.
std::vector<torch::Tensor> pack_weight8(const torch::Tensor& q, const torch::Tensor& d) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kInt8 && q.size(0) % kTile == 0 && q.size(1) % kGroup == 0,
              "q: int8 (N, K) with N a multiple of 16 and K of 32");
  TORCH_CHECK(d.scalar_type() == torch::kFloat32 || d.scalar_type() == torch::kFloat16, "d: float32 or float16");
  const int64_t N = q.size(0), K = q.size(1), tiles = N / kTile;
  TORCH_CHECK(d.dim() == 2 && d.size(0) == N && (d.size(1) * 32 == K || d.size(1) * 16 == K),
              "d: (N, K/32) or (N, K/16)");
  const int64_t groups = d.size(1);
  // (tiles, feature j, quad u, pair h, input e) -> (tiles, u, h, j, e): byte 2j+e of pair h of quad u
  auto t = q.contiguous().view(torch::kUInt8).view({tiles, kTile, K / 4, 2, 2});
  auto wq = t.permute({0, 2, 3, 1, 4}).contiguous().view({tiles, K / 4, 2 * kQuadBytes});
  return {wq, tile_scales(d.contiguous(), tiles, groups).contiguous()};
}
