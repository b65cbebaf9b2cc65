// Attention of a few new tokens per row over a KV cache, with an explicit mask (a verified tree).
//
// What torch's fused kernel does for these shapes with a lot of per-call work (about 140 us per layer
// for 8 tree tokens over 300 slots, bf16, 2 threads): here one pass per (row, key/value head, block of
// query rows). The query heads that share a key/value head read each key and value once while they
// are in registers. Products and sums are float32 (bf16 inputs are widened exactly); the softmax is
// float32 with a max subtracted; a masked slot gets weight exactly 0. The output is rounded once to
// the inputs' dtype and written as (batch, n, heads, head_dim), the layout the o projection reads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace {

using namespace redrafter_vec;

constexpr int kRowBlock = 4;  // query rows (of one key/value head) per unit of work

// v[i] = the sum of the lanes of a[i], for 16 vectors at once (about 3 instructions per vector, where
// reducing each on its own takes 8 with a longer dependency chain).
inline __m512 sum_lanes16(const __m512* a) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane L: [a2i 0+2, a2i+1 0+2, a2i 1+3, a2i+1 1+3]
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane L: the lane-L sums of a4i .. a4i+3
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // Add the four 128-bit lanes: lane k of the result gathers c[k]'s lanes.
  const __m512 e0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 e1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(e0, e1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(e0, e1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Partial sums (16 lanes) of the dot product of a query row and a key, head_dim = 16 DC.
// bf16: vdpbf16ps on the raw pairs (products exact in float32, float32 sums); float32: FMAs.
template <int DC>
inline __m512 dot_lanes(const at::BFloat16* q, const at::BFloat16* k) {
  __m512 acc = _mm512_setzero_ps();
  for (int c = 0; c + 2 <= DC; c += 2)
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q + 16 * c), (__m512bh)_mm512_loadu_si512(k + 16 * c));
  if constexpr (DC % 2) {  // the last 16 values: half a register of pairs
    const __m512i qa = _mm512_maskz_loadu_epi16(0xFFFF, q + 16 * (DC - 1));
    const __m512i ka = _mm512_maskz_loadu_epi16(0xFFFF, k + 16 * (DC - 1));
    acc = _mm512_dpbf16_ps(acc, (__m512bh)qa, (__m512bh)ka);
  }
  return acc;
}
template <int DC>
inline __m512 dot_lanes(const float* q, const float* k) {
  __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(k));
  for (int c = 1; c < DC; ++c) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + 16 * c), _mm512_loadu_ps(k + 16 * c), acc);
  return acc;
}

struct Shapes {
  int64_t batch, heads, kv_heads, n, span, group;
  int64_t q_b, q_h, q_i;      // element strides of q (the last dimension is contiguous)
  int64_t k_b, k_h, k_j;      // of keys
  int64_t v_b, v_h, v_j;      // of values
  float scale;
};

// One block of query rows: rows r0 .. r0 + rows - 1 of key/value head kh of batch row b, where query
// row r is head kh * group + r / n, token r % n. DC = head_dim / 16.
template <typename T, int DC>
void block(const Shapes& s, const T* q, const T* keys, const T* values, const bool* allowed, T* out,
           int64_t b, int64_t kh, int64_t r0, int rows, std::vector<float>& scores) {
  const int64_t span = s.span, padded = (span + 15) / 16 * 16;
  scores.resize(kRowBlock * padded + padded + 16);  // the rows' scores, then one row's visible weights packed
  const bool* mask_row[kRowBlock];
  int64_t head[kRowBlock], token[kRowBlock];
  const T* q_row[kRowBlock];
  for (int r = 0; r < rows; ++r) {
    head[r] = kh * s.group + (r0 + r) / s.n;
    token[r] = (r0 + r) % s.n;
    q_row[r] = q + b * s.q_b + head[r] * s.q_h + token[r] * s.q_i;
    mask_row[r] = allowed == nullptr ? nullptr : allowed + (b * s.n + token[r]) * span;
  }
  // Scores, 4 keys at a time for all the block's rows, so each key is loaded once per block. Each
  // (row, key) product is the same dot_lanes and the same lane reduction (sum_lanes16 treats its 16
  // vectors alike), so a score does not depend on how rows and keys are grouped. Rows past `rows`
  // repeat row 0 and are not stored; keys past span add zeros into the padding, set to -inf below.
  const T* kb = keys + b * s.k_b + kh * s.k_h;
  const __m512 scale = _mm512_set1_ps(s.scale);
  const T* q_any[kRowBlock];
  for (int r = 0; r < kRowBlock; ++r) q_any[r] = q_row[r < rows ? r : 0];
  static_assert(kRowBlock == 4, "the score loop packs 4 rows x 4 keys into one reduction");
  for (int64_t j0 = 0; j0 < span; j0 += 4) {
    __m512 partial[16];  // partial[r * 4 + jj]: row r, key j0 + jj
    for (int jj = 0; jj < 4; ++jj) {
      if (j0 + jj < span) {
        const T* k = kb + (j0 + jj) * s.k_j;
#pragma GCC unroll 4
        for (int r = 0; r < kRowBlock; ++r) partial[r * 4 + jj] = dot_lanes<DC>(q_any[r], k);
      } else {
        for (int r = 0; r < kRowBlock; ++r) partial[r * 4 + jj] = _mm512_setzero_ps();
      }
    }
    const __m512 sums = _mm512_mul_ps(sum_lanes16(partial), scale);  // lane r * 4 + jj
    _mm_storeu_ps(scores.data() + j0, _mm512_extractf32x4_ps(sums, 0));
    if (rows > 1) _mm_storeu_ps(scores.data() + padded + j0, _mm512_extractf32x4_ps(sums, 1));
    if (rows > 2) _mm_storeu_ps(scores.data() + 2 * padded + j0, _mm512_extractf32x4_ps(sums, 2));
    if (rows > 3) _mm_storeu_ps(scores.data() + 3 * padded + j0, _mm512_extractf32x4_ps(sums, 3));
  }
  // Softmax per row (masked slots -inf, so exactly 0 after exp); the padding past span is -inf too.
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float inv_sum[kRowBlock];
  for (int r = 0; r < rows; ++r) {
    float* sr = scores.data() + r * padded;
    if (mask_row[r] != nullptr) {
      for (int64_t j = 0; j < span; ++j) sr[j] = mask_row[r][j] ? sr[j] : neg_inf;
    }
    for (int64_t j = span; j < padded; ++j) sr[j] = neg_inf;
    __m512 m = _mm512_set1_ps(neg_inf);
    for (int64_t j = 0; j < padded; j += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(sr + j));
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    // With a mask, the sum runs over the visible slots packed together, in slot order, 16 lanes wide:
    // the order of the same slots after a commit, when a tree's accepted tokens sit one after another.
    // A branch's ancestors are not contiguous in the tree, so a slot-order sum would round differently
    // from the step that sees the committed tokens, and greedy output could differ. Without a mask
    // every slot is visible and slot order is that order (the padding adds zeros).
    __m512 total = _mm512_setzero_ps();
    float* packed = scores.data() + kRowBlock * padded;
    int64_t count = 0;
    for (int64_t j = 0; j < padded; j += 16) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sr + j), mx));
      _mm512_storeu_ps(sr + j, e);
      if (mask_row[r] == nullptr) {
        total = _mm512_add_ps(total, e);
        continue;
      }
      __mmask16 visible;
      if (j + 16 <= span) {
        visible = _mm_cmpneq_epi8_mask(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mask_row[r] + j)),
                                       _mm_setzero_si128());
      } else {
        visible = 0;
        for (int64_t jj = j; jj < span; ++jj) visible |= (__mmask16)((mask_row[r][jj] ? 1u : 0u) << (jj - j));
      }
      _mm512_storeu_ps(packed + count, _mm512_maskz_compress_ps(visible, e));
      count += __builtin_popcount((unsigned)visible);
    }
    if (mask_row[r] != nullptr) {
      for (int64_t j = count; j < (count + 15) / 16 * 16; ++j) packed[j] = 0.f;
      for (int64_t j = 0; j < count; j += 16) total = _mm512_add_ps(total, _mm512_loadu_ps(packed + j));
    }
    inv_sum[r] = 1.f / _mm512_reduce_add_ps(total);
  }
  // Weighted values: each value is widened once and added into every row of the block. For bf16 with
  // an even DC, 32 values are widened at a time by interleaving them with zeros (two instructions for
  // 32 values), which puts dimensions in the order 0-3, 8-11, 16-19, 24-27 | 4-7, 12-15, ... of each
  // 32; the output is put back in order before it is stored. Each output value is the same sum, in
  // the same order, either way.
  constexpr bool kPairs = std::is_same_v<T, at::BFloat16> && DC % 2 == 0;
  __m512 acc[kRowBlock][DC];
  for (int r = 0; r < kRowBlock; ++r)
    for (int c = 0; c < DC; ++c) acc[r][c] = _mm512_setzero_ps();
  const T* vb = values + b * s.v_b + kh * s.v_h;
  for (int64_t j = 0; j < span; ++j) {
    __m512 v[DC];
    if constexpr (kPairs) {
      const __m512i zero = _mm512_setzero_si512();
      for (int c = 0; c < DC; c += 2) {
        const __m512i raw = _mm512_loadu_si512(vb + j * s.v_j + 16 * c);
        v[c] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, raw));
        v[c + 1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, raw));
      }
    } else {
      for (int c = 0; c < DC; ++c) v[c] = load16(vb + j * s.v_j + 16 * c);
    }
    for (int r = 0; r < rows; ++r) {
      const __m512 p = _mm512_set1_ps(scores[r * padded + j]);
      for (int c = 0; c < DC; ++c) acc[r][c] = _mm512_fmadd_ps(p, v[c], acc[r][c]);
    }
  }
  const int64_t head_dim = DC * 16;
  for (int r = 0; r < rows; ++r) {
    T* o = out + ((b * s.n + token[r]) * s.heads + head[r]) * head_dim;
    const __m512 inv = _mm512_set1_ps(inv_sum[r]);
    if constexpr (kPairs) {
      const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
      const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
      for (int c = 0; c < DC; c += 2) {
        store16(o + 16 * c, _mm512_mul_ps(_mm512_permutex2var_ps(acc[r][c], first, acc[r][c + 1]), inv));
        store16(o + 16 * c + 16, _mm512_mul_ps(_mm512_permutex2var_ps(acc[r][c], second, acc[r][c + 1]), inv));
      }
    } else {
      for (int c = 0; c < DC; ++c) store16(o + 16 * c, _mm512_mul_ps(acc[r][c], inv));
    }
  }
}

template <typename T, int DC>
void run(const Shapes& s, const T* q, const T* keys, const T* values, const bool* allowed, T* out) {
  const int64_t rows = s.group * s.n, blocks = (rows + kRowBlock - 1) / kRowBlock;
  const int64_t units = s.batch * s.kv_heads * blocks;
  // Small problems (one token over a short context) are not worth waking a second thread for.
  const int64_t grain = s.span * rows * DC < 2048 ? units : 1;
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / (s.kv_heads * blocks), kh = u / blocks % s.kv_heads, r0 = u % blocks * kRowBlock;
      block<T, DC>(s, q, keys, values, allowed, out, b, kh, r0, (int)std::min<int64_t>(kRowBlock, rows - r0), scores);
    }
  });
}

template <typename T>
void dispatch(const Shapes& s, int64_t head_dim, const T* q, const T* k, const T* v, const bool* allowed, T* out) {
  switch (head_dim % 16 ? 0 : head_dim / 16) {
    case 1: return run<T, 1>(s, q, k, v, allowed, out);
    case 2: return run<T, 2>(s, q, k, v, allowed, out);
    case 4: return run<T, 4>(s, q, k, v, allowed, out);
    case 5: return run<T, 5>(s, q, k, v, allowed, out);
    case 6: return run<T, 6>(s, q, k, v, allowed, out);
    case 8: return run<T, 8>(s, q, k, v, allowed, out);
    case 12: return run<T, 12>(s, q, k, v, allowed, out);
    case 16: return run<T, 16>(s, q, k, v, allowed, out);
  }
  TORCH_CHECK(false, "tree_attention: head_dim ", head_dim, " is not 16, 32, 64, 80, 96, 128, 192 or 256");
}

}  // namespace

// q (B, H, n, D), keys and values (B, KV, span, D), all bf16 or all float32 with a contiguous last
// dimension; allowed (B, n, span) bool contiguous, or an empty tensor for "every slot"; H a multiple
// of KV. Returns softmax(scale q k^T + mask) v as (B, n, H, D) contiguous, in q's dtype.
torch::Tensor tree_attention(const torch::Tensor& q, const torch::Tensor& keys, const torch::Tensor& values,
                             const torch::Tensor& allowed, double scale) {
  TORCH_CHECK(q.device().is_cpu() && keys.device().is_cpu() && values.device().is_cpu() && allowed.device().is_cpu(),
              "tree_attention runs on CPU tensors");
  TORCH_CHECK(q.dim() == 4 && keys.dim() == 4 && values.dim() == 4, "q, keys and values are 4-D");
  TORCH_CHECK(q.scalar_type() == keys.scalar_type() && q.scalar_type() == values.scalar_type() &&
                  (q.scalar_type() == torch::kBFloat16 || q.scalar_type() == torch::kFloat32),
              "q, keys and values: all bfloat16 or all float32");
  TORCH_CHECK(q.stride(3) == 1 && keys.stride(3) == 1 && values.stride(3) == 1, "the last dimension must be contiguous");
  Shapes s;
  s.batch = q.size(0); s.heads = q.size(1); s.n = q.size(2); s.kv_heads = keys.size(1); s.span = keys.size(2);
  const int64_t head_dim = q.size(3);
  TORCH_CHECK(keys.size(0) == s.batch && values.sizes() == keys.sizes() && keys.size(3) == head_dim,
              "keys and values must be (batch, kv_heads, span, head_dim) like q");
  TORCH_CHECK(s.kv_heads > 0 && s.heads % s.kv_heads == 0, "heads must be a multiple of kv_heads");
  TORCH_CHECK(s.span > 0, "tree_attention needs at least one slot");
  const bool masked = allowed.numel() > 0;
  if (masked) {
    TORCH_CHECK(allowed.scalar_type() == torch::kBool && allowed.is_contiguous() && allowed.dim() == 3 &&
                    allowed.size(0) == s.batch && allowed.size(1) == s.n && allowed.size(2) == s.span,
                "allowed: contiguous (batch, n, span) bool");
  }
  s.group = s.heads / s.kv_heads;
  s.q_b = q.stride(0); s.q_h = q.stride(1); s.q_i = q.stride(2);
  s.k_b = keys.stride(0); s.k_h = keys.stride(1); s.k_j = keys.stride(2);
  s.v_b = values.stride(0); s.v_h = values.stride(1); s.v_j = values.stride(2);
  s.scale = (float)scale;
  auto out = torch::empty({s.batch, s.n, s.heads, head_dim}, q.options());
  const bool* mask = masked ? allowed.data_ptr<bool>() : nullptr;
  if (q.scalar_type() == torch::kBFloat16) {
    dispatch(s, head_dim, q.data_ptr<at::BFloat16>(), keys.data_ptr<at::BFloat16>(), values.data_ptr<at::BFloat16>(),
             mask, out.data_ptr<at::BFloat16>());
  } else {
    dispatch(s, head_dim, q.data_ptr<float>(), keys.data_ptr<float>(), values.data_ptr<float>(), mask,
             out.data_ptr<float>());
  }
  return out;
}

// tree_attention over layer `layer` of a whole cache kv (layers, 2, B, KV, capacity, D), reading its
// first `span` slots, for q as (B, n, H, D) (what rope_store returns): the views are taken here, which
// saves a layer the per-call work of six tensor operations in Python.
torch::Tensor cache_attention(const torch::Tensor& q, const torch::Tensor& kv, int64_t layer, int64_t span,
                              const torch::Tensor& allowed, double scale) {
  TORCH_CHECK(q.dim() == 4 && kv.dim() == 6 && kv.size(1) == 2, "cache_attention: q (B, n, H, D), kv (layers, 2, B, KV, capacity, D)");
  TORCH_CHECK(0 <= layer && layer < kv.size(0), "cache_attention: layer ", layer, " outside the cache's ", kv.size(0));
  TORCH_CHECK(0 < span && span <= kv.size(4), "cache_attention: span ", span, " outside 1 ..", kv.size(4));
  const auto cache = kv.select(0, layer).narrow(3, 0, span);  // (2, B, KV, span, D)
  return tree_attention(q.transpose(1, 2), cache.select(0, 0), cache.select(0, 1), allowed, scale);
}
