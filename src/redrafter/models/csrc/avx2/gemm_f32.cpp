// Products of a few float32 rows with a 4-bit or 8-bit weight, in one pass over the weight, for CPUs
// with AVX2, FMA and F16C (Zen 2/3, Haswell and later): the float32 counterpart of int4_gemm.cpp,
// built as its own module (models/kernels.py, ``avx2()``) so that it also runs where AVX-512 does not.
//
// Weight layouts (pack_weight_f32 / pack_weight8_f32), output features in tiles of 8 (one ymm):
// - 4-bit: per tile, per octet of inputs (k = 8o .. 8o+7), 32 bytes: lane j (a uint32) holds the 8
//   nibbles of feature j, nibble i = q[j][8o+i] (q in 0..15). A mask and a conversion give the 8
//   features' q of one input as float32 (Four). Scales per tile and group of 32 inputs: 8 steps then 8
//   lows (float16 where that holds the grid, else float32, or K scales: below); w = q * step + low.
// - 8-bit: per tile, per input k, 8 bytes: q[j][k] (int8) of the 8 features. Scales per tile and group
//   of G inputs (32: Q8_0, float16 d; 16: Q6_K, float32 d): 8 values of d; w = d * q.
// Per group, sum_k a_k (q_k step + low) = step * sum_k a_k q_k + low * sum_k a_k (the activation sums
// are computed once per row and group).
//
// Numerics: every row gets the same operations in the same order whatever the number of rows and
// whatever rows or tiles share a pass (per group one chain of FMAs over its inputs in order, then the
// step and low), so a tree's tokens compute exactly what single steps do and float32 greedy
// speculative decoding stays token-identical to plain decoding.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../draft.h"
#include "../tree.h"

namespace {

constexpr int kTile = 8;            // output features per tile (one ymm of float32)
constexpr int kPrefetchBytes = 8192;
// Rows per pass over a weight: every block of 8 tiles rereads all of a pass's activations, which must
// stay in cache (4,096 rows of Qwen's 8,960 inputs would be 147 MB, reread from memory per block).
constexpr int64_t kPassRows = 256;

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
// 8 bytes as float32 (exactly).
inline __m256 load8(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// Scales of type uint8_t are "K scales", a Q4_K weight's own form (int4.pack_k_scales with tiles of 8):
// per tile, per group of 32 inputs, 8 step multipliers then 8 low multipliers (bytes); after all groups,
// per block of 8 groups (256 inputs), 8 step units then 8 low units (float32). A group's step is
// multiplier x unit, exactly its d x sc in float32 (and its low dmin x m): 4.75 bits per weight
// streamed where float32 steps and lows take 6.
constexpr int kBlockGroups = 8;
constexpr int kUnitBytes = 2 * kTile * 4;  // per tile and block of 8 groups
template <typename S>
constexpr int64_t tile_scale_count(int64_t groups, int per_group) {
  if constexpr (std::is_same_v<S, uint8_t>) return groups * per_group + groups / kBlockGroups * kUnitBytes;
  return groups * per_group;
}

// 4-bit weights: one octet of inputs per 32 bytes. next(i) gives input i's q of the 8 features times
// 16^i for i < 7 (the nibble masked in place), whose activation was multiplied by 16^-i beforehand, and
// q itself for i = 7 (the top nibble shifted down): the same products exactly, one operation fewer per
// input than masking and shifting each nibble.
struct Four {
  static constexpr int kOctetBytes = 32;  // per tile
  static constexpr bool kLow = true;
  struct Octet {
    __m256i w;
    Octet() = default;
    explicit Octet(const uint8_t* p) : w(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))) {}
    inline __m256 next(int i) {
      if (i == 7) return _mm256_cvtepi32_ps(_mm256_srli_epi32(w, 28));
      return _mm256_cvtepi32_ps(_mm256_and_si256(w, _mm256_set1_epi32(15 << (4 * i))));
    }
  };
};

// 8-bit weights: 8 bytes per input.
struct Eight {
  static constexpr int kOctetBytes = 64;
  static constexpr bool kLow = false;
  struct Octet {
    const uint8_t* p;
    Octet() = default;
    explicit Octet(const uint8_t* p_) : p(p_) {}
    inline __m256 next(int i) {
      return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * i))));
    }
  };
};

// R rows times T neighbouring tiles (rows_over_tiles picks T). Per row, tile and group one chain: the
// inputs in order from 0, then total += dot * step (+ low * the group's activation sum). The R * T
// chains are independent, which keeps both FMA units busy.
template <typename F, int G, typename S, int R, int T>
inline void tile_rows(const uint8_t* w, int64_t tile_bytes, const S* sm, int64_t tile_scales, const float* a,
                      int64_t K, const float* asum, int64_t groups, float* out, int64_t N) {
  constexpr int kOctets = G / 8;
  constexpr int kScales = (F::kLow ? 2 : 1) * kTile;
  __m256 total[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) total[r][t] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 acc[R][T];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
    for (int o = 0; o < kOctets; ++o) {
      const int64_t offset = (g * kOctets + o) * F::kOctetBytes;
      const float* ak = a + g * G + 8 * o;
      typename F::Octet oct[T];
      for (int t = 0; t < T; ++t) {
        const uint8_t* p = w + t * tile_bytes + offset;
        _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchBytes), _MM_HINT_T0);
        if constexpr (F::kOctetBytes > 32)
          _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchBytes + 32), _MM_HINT_T0);
        oct[t] = typename F::Octet(p);
      }
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        for (int t = 0; t < T; ++t) {
          const __m256 q = oct[t].next(i);
          for (int r = 0; r < R; ++r) acc[r][t] = _mm256_fmadd_ps(_mm256_broadcast_ss(ak + r * K + i), q, acc[r][t]);
        }
      }
    }
    for (int t = 0; t < T; ++t) {
      const S* s = sm + t * tile_scales + g * kScales;
      __m256 step = load8(s), low = _mm256_setzero_ps();
      if constexpr (F::kLow) low = load8(s + kTile);
      if constexpr (std::is_same_v<S, uint8_t>) {  // multipliers times their block's units
        const float* units =
            reinterpret_cast<const float*>(sm + t * tile_scales + groups * kScales + g / kBlockGroups * kUnitBytes);
        step = _mm256_mul_ps(step, _mm256_loadu_ps(units));
        low = _mm256_mul_ps(low, _mm256_loadu_ps(units + kTile));
      }
      for (int r = 0; r < R; ++r) {
        total[r][t] = _mm256_fmadd_ps(acc[r][t], step, total[r][t]);
        if constexpr (F::kLow) total[r][t] = _mm256_fmadd_ps(low, _mm256_set1_ps(asum[r * groups + g]), total[r][t]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) _mm256_storeu_ps(out + r * N + t * kTile, total[r][t]);
}

// R rows over tiles [begin, end): T tiles at a time (4 for 1-2 rows, 2 for 3-5, 1 beyond: more
// accumulators spill; 8-bit weights take 3 for 3 rows, measured 1.5x faster than 2 on Zen 3), then one
// at a time.
template <typename F, int G, typename S, int R>
void rows_over_tiles(int64_t begin, int64_t end, const uint8_t* w, int64_t tile_bytes, const S* sm,
                     int64_t tile_scales, const float* a, int64_t K, const float* asum, int64_t groups, float* out,
                     int64_t N) {
  constexpr int T = R >= 6 ? 1 : R >= 4 ? 2 : R == 3 ? (F::kLow ? 2 : 3) : 4;
  int64_t t = begin;
  for (; t + T <= end; t += T)
    tile_rows<F, G, S, R, T>(w + t * tile_bytes, tile_bytes, sm + t * tile_scales, tile_scales, a, K, asum, groups,
                             out + t * kTile, N);
  for (; t < end; ++t)
    tile_rows<F, G, S, R, 1>(w + t * tile_bytes, tile_bytes, sm + t * tile_scales, tile_scales, a, K, asum, groups,
                             out + t * kTile, N);
}

using RowsFn = void (*)(int64_t, int64_t, const uint8_t*, int64_t, const void*, int64_t, const float*, int64_t,
                        const float*, int64_t, float*, int64_t);
template <typename F, int G, typename S, int R>
void rows_over_tiles_any(int64_t begin, int64_t end, const uint8_t* w, int64_t tile_bytes, const void* sm,
                         int64_t tile_scales, const float* a, int64_t K, const float* asum, int64_t groups, float* out,
                         int64_t N) {
  rows_over_tiles<F, G, S, R>(begin, end, w, tile_bytes, static_cast<const S*>(sm), tile_scales, a, K, asum, groups,
                              out, N);
}
template <typename F, int G, typename S>
constexpr RowsFn kRowsFns[9] = {nullptr,
                                rows_over_tiles_any<F, G, S, 1>, rows_over_tiles_any<F, G, S, 2>,
                                rows_over_tiles_any<F, G, S, 3>, rows_over_tiles_any<F, G, S, 4>,
                                rows_over_tiles_any<F, G, S, 5>, rows_over_tiles_any<F, G, S, 6>,
                                rows_over_tiles_any<F, G, S, 7>, rows_over_tiles_any<F, G, S, 8>};

// All tiles of one weight, split between the threads; within a thread, blocks of 8 tiles, and within a
// block the rows in even chunks of at most 8 (12 rows: 6 + 6; a row computes the same whatever its chunk).
template <typename F, int G, typename S>
void run_tiles(const float* a, const float* asum, const uint8_t* w, const S* sm, float* out, int64_t M, int64_t K,
               int64_t tiles, int64_t N) {
  const int64_t groups = K / G;
  const int64_t tile_bytes = K / 8 * F::kOctetBytes;
  const int64_t tile_scales = tile_scale_count<S>(groups, (F::kLow ? 2 : 1) * kTile);
  constexpr int64_t kBlock = 8;  // tiles whose weights stay in L1/L2 while every row chunk passes over them
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b += kBlock) {
      const int64_t e = std::min(end, b + kBlock);
      const int64_t chunks = (M + 7) / 8, chunk = (M + chunks - 1) / chunks;
      for (int64_t r = 0; r < M; r += chunk) {
        const int rows = (int)std::min<int64_t>(chunk, M - r);
        kRowsFns<F, G, S>[rows](b, e, w, tile_bytes, sm, tile_scales, a + r * K, K, asum + r * groups, groups,
                                out + r * N, N);
      }
    }
  });
}

// x (M, K) float32 through one packed weight into columns col0 .. col0 + N of out (M, >= col0 + N).
void product(const torch::Tensor& x, const torch::Tensor& wq, const torch::Tensor& sm, torch::Tensor& out,
             int64_t col0) {
  TORCH_CHECK(x.device().is_cpu() && wq.device().is_cpu() && sm.device().is_cpu(), "the products run on CPU tensors");
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x: contiguous 2-D float32");
  TORCH_CHECK(wq.dtype() == torch::kUInt8 && wq.dim() == 3 && (wq.size(2) == 32 || wq.size(2) == 64) &&
                  wq.is_contiguous(),
              "wq: contiguous (N/8, K/8, 32 or 64) uint8");
  const bool four = wq.size(2) == 32;
  const int64_t M = x.size(0), K = x.size(1), tiles = wq.size(0), N = tiles * kTile;
  TORCH_CHECK(K > 0 && wq.size(1) * 8 == K && sm.size(0) == tiles && sm.is_contiguous(),
              "shapes of x, wq and sm disagree");
  const int64_t per_group = (four ? 2 : 1) * kTile;
  const bool k_scales = sm.dtype() == torch::kUInt8;
  if (k_scales) {
    TORCH_CHECK(four && sm.dim() == 2 && K % 256 == 0 && sm.size(1) == tile_scale_count<uint8_t>(K / 32, per_group),
                "sm: (N/8, K/32 * 16 + K/256 * 64) uint8 K scales of a 4-bit weight");
  } else {
    TORCH_CHECK((sm.dtype() == torch::kFloat32 || sm.dtype() == torch::kFloat16) && sm.dim() == 3,
                "sm: 3-D float32 or float16, or 2-D uint8 K scales");
    TORCH_CHECK(sm.size(2) == per_group && (sm.size(1) * 32 == K || (!four && sm.size(1) * 16 == K)),
                "sm: (N/8, K/32, ", per_group, ")", four ? "" : " or (N/8, K/16, 8)");
  }
  TORCH_CHECK(out.dim() == 2 && out.size(0) == M && out.size(1) >= col0 + N && out.is_contiguous() &&
                  out.dtype() == torch::kFloat32,
              "out: contiguous float32 (M, >= ", col0 + N, ")");
  if (M == 0) return;
  if (M > kPassRows) {  // a prefill: passes of kPassRows rows (each row computes the same in any pass)
    for (int64_t r = 0; r < M; r += kPassRows) {
      torch::Tensor rows_out = out.narrow(0, r, std::min(kPassRows, M - r));
      product(x.narrow(0, r, rows_out.size(0)), wq, sm, rows_out, col0);
    }
    return;
  }
  const int G = k_scales ? 32 : (int)(K / sm.size(1));
  const int64_t groups = K / G;
  const float* a = x.data_ptr<float>();
  std::vector<float> asum(four ? M * groups : 0);
  if (four) {  // per row and group of 32 inputs, in a fixed order
    for (int64_t i = 0; i < M * groups; ++i) {
      const float* p = a + i * 32;
      const __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)),
                                     _mm256_add_ps(_mm256_loadu_ps(p + 16), _mm256_loadu_ps(p + 24)));
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, s);
      asum[i] = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    }
  }
  // The 4-bit products read each input's activation times 16^-(k % 8), and 1 for k % 8 = 7 (Four::next):
  // exact, a power of two (short of activations below 2^-100, which would turn subnormal).
  std::vector<float> scaled(four ? M * K : 0);
  if (four) {
    const __m256 factors = _mm256_setr_ps(1.f, 0x1p-4f, 0x1p-8f, 0x1p-12f, 0x1p-16f, 0x1p-20f, 0x1p-24f, 1.f);
    for (int64_t i = 0; i < M * K; i += 8) _mm256_storeu_ps(scaled.data() + i, _mm256_mul_ps(_mm256_loadu_ps(a + i), factors));
    a = scaled.data();
  }
  const uint8_t* w = wq.data_ptr<uint8_t>();
  float* o = out.data_ptr<float>() + col0;
  const int64_t stride = out.size(1);
  const bool half = sm.dtype() == torch::kFloat16;
  if (four) {
    if (half) run_tiles<Four, 32>(a, asum.data(), w, sm.data_ptr<at::Half>(), o, M, K, tiles, stride);
    else if (k_scales) run_tiles<Four, 32>(a, asum.data(), w, sm.data_ptr<uint8_t>(), o, M, K, tiles, stride);
    else run_tiles<Four, 32>(a, asum.data(), w, sm.data_ptr<float>(), o, M, K, tiles, stride);
  } else if (G == 32) {
    if (half) run_tiles<Eight, 32>(a, asum.data(), w, sm.data_ptr<at::Half>(), o, M, K, tiles, stride);
    else run_tiles<Eight, 32>(a, asum.data(), w, sm.data_ptr<float>(), o, M, K, tiles, stride);
  } else {
    if (half) run_tiles<Eight, 16>(a, asum.data(), w, sm.data_ptr<at::Half>(), o, M, K, tiles, stride);
    else run_tiles<Eight, 16>(a, asum.data(), w, sm.data_ptr<float>(), o, M, K, tiles, stride);
  }
}

// (N, groups) scales -> (N/8, groups, 8) in the tile layout.
torch::Tensor tile_scales(const torch::Tensor& scales, int64_t tiles) {
  return scales.contiguous().view({tiles, kTile, scales.size(1)}).permute({0, 2, 1});
}

}  // namespace

// x (M, K) float32 through a weight packed by pack_weight_f32 or pack_weight8_f32 -> (M, N) float32.
torch::Tensor mm_f32(const torch::Tensor& x, const torch::Tensor& wq, const torch::Tensor& sm) {
  TORCH_CHECK(x.dim() == 2 && wq.dim() == 3, "x: 2-D, wq: 3-D");
  auto out = torch::empty({x.size(0), wq.size(0) * kTile}, x.options());
  product(x, wq, sm, out, 0);
  return out;
}

// x (M, K) float32 through a weight whose output features come in parts of different formats: part i
// gives the next wqs[i].size(0) * 8 columns, computed as it would be alone.
torch::Tensor mixed_mm_f32(const torch::Tensor& x, const std::vector<torch::Tensor>& wqs,
                           const std::vector<torch::Tensor>& sms) {
  TORCH_CHECK(!wqs.empty() && wqs.size() == sms.size(), "mixed_mm_f32: as many scales as weights, at least one");
  TORCH_CHECK(x.dim() == 2, "x: 2-D");
  int64_t n = 0;
  for (const auto& wq : wqs) n += wq.size(0) * kTile;
  auto out = torch::empty({x.size(0), n}, x.options());
  int64_t col0 = 0;
  for (size_t i = 0; i < wqs.size(); ++i) {
    product(x, wqs[i], sms[i], out, col0);
    col0 += wqs[i].size(0) * kTile;
  }
  return out;
}

// q (N, K) integer 0..15, step/low (N, K/32) both float32 or both float16 -> (wq, sm), 4-bit layout.
std::vector<torch::Tensor> pack_weight_f32(const torch::Tensor& q, const torch::Tensor& step, const torch::Tensor& low) {
  TORCH_CHECK(q.dim() == 2 && q.size(0) % kTile == 0 && q.size(1) % 32 == 0, "q: (N, K), N a multiple of 8, K of 32");
  TORCH_CHECK(q.numel() == 0 || (q.min().item<int64_t>() >= 0 && q.max().item<int64_t>() <= 15), "q: values in 0..15");
  TORCH_CHECK((step.scalar_type() == torch::kFloat32 || step.scalar_type() == torch::kFloat16) &&
                  low.scalar_type() == step.scalar_type(),
              "step and low: both float32 or both float16");
  const int64_t N = q.size(0), K = q.size(1), tiles = N / kTile;
  TORCH_CHECK(step.dim() == 2 && step.size(0) == N && step.size(1) * 32 == K && low.sizes() == step.sizes(),
              "step, low: (N, K/32)");
  // (tiles, j, octet o, i): byte b of lane j's word = q[2b] | q[2b+1] << 4 (little-endian: nibble i = q[i])
  auto t = q.to(torch::kUInt8).contiguous().view({tiles, kTile, K / 8, 8});
  auto even = t.index({"...", torch::indexing::Slice(0, 8, 2)});
  auto odd = t.index({"...", torch::indexing::Slice(1, 8, 2)});
  auto wq = even.bitwise_or(odd.bitwise_left_shift(4)).permute({0, 2, 1, 3}).contiguous().view({tiles, K / 8, 32});
  auto sm = torch::cat({tile_scales(step, tiles), tile_scales(low, tiles)}, 2).contiguous();
  return {wq, sm};
}

// q (N, K) int8, d (N, K/32) or (N, K/16) float32 or float16 -> (wq, sm), 8-bit layout.
std::vector<torch::Tensor> pack_weight8_f32(const torch::Tensor& q, const torch::Tensor& d) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kInt8 && q.size(0) % kTile == 0 && q.size(1) % 16 == 0,
              "q: int8 (N, K), N a multiple of 8, K of 16");
  TORCH_CHECK(d.scalar_type() == torch::kFloat32 || d.scalar_type() == torch::kFloat16, "d: float32 or float16");
  const int64_t N = q.size(0), K = q.size(1), tiles = N / kTile;
  TORCH_CHECK(d.dim() == 2 && d.size(0) == N && (d.size(1) * 32 == K || d.size(1) * 16 == K), "d: (N, K/32) or (N, K/16)");
  // (tiles, j, k) -> (tiles, k, j)
  auto wq = q.contiguous().view(torch::kUInt8).view({tiles, kTile, K}).permute({0, 2, 1}).contiguous()
                .view({tiles, K / 8, 64});
  return {wq, tile_scales(d, tiles).contiguous()};
}

torch::Tensor rms_norm_f32(const torch::Tensor& x, const torch::Tensor& weight, double eps);
torch::Tensor attention_f32(const torch::Tensor& q, const torch::Tensor& kv, int64_t layer, int64_t span,
                            const torch::Tensor& allowed, double scale);
torch::Tensor rope_store_f32(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& signed_sin,
                             torch::Tensor kv, int64_t layer, const std::vector<int64_t>& starts, int64_t heads,
                             int64_t kv_heads);
torch::Tensor silu_mul_f32(const torch::Tensor& gate_up);

namespace {

constexpr int kParts = 3;                   // packed parts of a linear weight, at most (mixed_mm_f32)
constexpr int kPerLinear = 2 * kParts + 1;  // (packed, scales) per part, then the bias
constexpr int kPerLayer = 2 + 4 * kPerLinear;

// x (rows, in) -> (rows, out) through a linear weight's packed parts and bias (as decoder.cpp's linear).
torch::Tensor linear_f32(const torch::Tensor& x, const torch::Tensor* w) {
  torch::Tensor y;
  if (!w[2].numel()) {
    y = mm_f32(x, w[0], w[1]);
  } else {
    std::vector<torch::Tensor> wqs, sms;
    for (int p = 0; p < kParts && w[2 * p].numel(); ++p) {
      wqs.push_back(w[2 * p]);
      sms.push_back(w[2 * p + 1]);
    }
    y = mixed_mm_f32(x, wqs, sms);
  }
  const torch::Tensor& bias = w[2 * kParts];
  return bias.numel() ? y + bias : y;
}

}  // namespace

// A float32 native forward's decoder layers in one call, for a model whose linear weights all run mm_f32
// (NativeTarget.forward's loop with our float32 RMSNorm and attention). Each layer makes the calls the
// Python loop makes, in the same order, so the result is the same bit for bit, without about twenty
// Python-level calls per layer.
// x (B, n, H) float32; weights, eps: as decoder_layers (decoder.cpp); cos, signed_sin (B, n, head_dim);
// kv (layers, 2, B, kv_heads, capacity, head_dim); starts (B,) long: each row's first new slot;
// allowed: (B, 1, n, span) bool, or an empty tensor for every slot; scale: the attention's. Returns x
// after the last layer.
torch::Tensor decoder_layers_f32(torch::Tensor x, const std::vector<torch::Tensor>& weights,
                                 const std::vector<double>& eps, const torch::Tensor& cos,
                                 const torch::Tensor& signed_sin, torch::Tensor kv, const std::vector<int64_t>& starts,
                                 int64_t heads, int64_t kv_heads, int64_t span, const torch::Tensor& allowed,
                                 double scale) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == torch::kFloat32, "decoder_layers_f32: x must be (B, n, H) float32");
  const int64_t layers = (int64_t)eps.size();
  TORCH_CHECK((int64_t)weights.size() == kPerLayer * layers, "decoder_layers_f32: ", kPerLayer,
              " tensors per layer, got ", weights.size(), " for ", layers, " layers");
  TORCH_CHECK(kv.dim() == 6 && kv.size(0) == layers && kv.scalar_type() == torch::kFloat32,
              "decoder_layers_f32: a float32 cache of ", layers, " layers");
  const int64_t batch = x.size(0), n = x.size(1), hidden = x.size(2), rows = batch * n;
  TORCH_CHECK((int64_t)starts.size() == batch, "decoder_layers_f32: one start per row");
  const int64_t q_size = heads * kv.size(5);
  for (int64_t i = 0; i < layers; ++i) {
    const torch::Tensor* w = weights.data() + kPerLayer * i;
    const torch::Tensor *qkv_w = w + 2, *o_w = qkv_w + kPerLinear, *gate_up_w = o_w + kPerLinear,
                        *down_w = gate_up_w + kPerLinear;
    torch::Tensor h = rms_norm_f32(x, w[0], eps[i]);
    torch::Tensor qkv = linear_f32(h.reshape({rows, hidden}), qkv_w).view({batch, n, -1});
    torch::Tensor q = rope_store_f32(qkv, cos, signed_sin, kv, i, starts, heads, kv_heads);
    torch::Tensor attn = attention_f32(q, kv, i, span, allowed, scale);  // (B, n, heads * head_dim)
    x = x + linear_f32(attn.reshape({rows, q_size}), o_w).view({batch, n, hidden});
    h = rms_norm_f32(x, w[1], eps[i]);
    x = x + linear_f32(silu_mul_f32(linear_f32(h.reshape({rows, hidden}), gate_up_w)), down_w).view({batch, n, hidden});
  }
  return x;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  bind_tree(m);  // csrc/tree.cpp, built into this extension too
  bind_draft(m);  // csrc/beam_select.cpp and csrc/draft_search.cpp, float32 here
  m.def("mm_f32", &mm_f32, "float32 rows through a 4- or 8-bit weight (AVX2)");
  m.def("mixed_mm_f32", &mixed_mm_f32, "float32 rows through a weight in parts of different formats (AVX2)");
  m.def("pack_weight_f32", &pack_weight_f32, "a 4-bit weight in mm_f32's layout");
  m.def("pack_weight8_f32", &pack_weight8_f32, "an 8-bit weight in mm_f32's layout");
  m.def("decoder_layers_f32", &decoder_layers_f32, "a float32 forward's decoder layers in one call");
  m.def("rms_norm_f32", &rms_norm_f32, "transformers' RMSNorm of float32 rows in one call (AVX2)");
  m.def("attention_f32", &attention_f32, "attention of a few float32 tokens per row over a cache layer (AVX2)");
  m.def("rope_store_f32", &rope_store_f32, "a float32 layer's rotary embedding and cache write (AVX2)");
  m.def("silu_mul_f32", &silu_mul_f32, "silu(gate) * up of float32 rows (AVX2)");
}
