// A float32 decoder layer's RMSNorm, rotary embedding with its cache write, attention and SiLU x up for
// CPUs with AVX2 and FMA (the float32 counterparts of rms_norm.cpp, layer_ops.cpp and
// tree_attention.cpp): each one call where torch makes several operations, or a flash-attention pass
// tuned for long sequences (attention of a few new tokens).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <vector>

#include "vec_f32.h"

using namespace redrafter_vec8;

// x (..., H) float32 contiguous, weight (H,) float32 -> weight * (x * rsqrt(mean(x^2) + eps)), the two
// products rounded in that order as transformers' Llama/Qwen2 RMSNorm rounds them in float32; the mean
// is summed in 8 lanes and then hsum8's order. H a multiple of 8.
torch::Tensor rms_norm_f32(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && weight.scalar_type() == torch::kFloat32, "rms_norm_f32: float32");
  const int64_t H = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == H && H > 0 && H % 8 == 0,
              "rms_norm_f32: weight (H,), H a positive multiple of 8");
  auto xc = x.contiguous();
  auto wc = weight.contiguous();
  auto out = torch::empty_like(xc);
  const int64_t rows = xc.numel() / H;
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* a = xp + r * H;
    __m256 s = _mm256_setzero_ps();
    for (int64_t k = 0; k < H; k += 8) {
      const __m256 v = _mm256_loadu_ps(a + k);
      s = _mm256_fmadd_ps(v, v, s);
    }
    const float inv = 1.f / std::sqrt(hsum8(s) / (float)H + (float)eps);
    const __m256 scale = _mm256_set1_ps(inv);
    for (int64_t k = 0; k < H; k += 8)
      _mm256_storeu_ps(op + r * H + k,
                       _mm256_mul_ps(_mm256_loadu_ps(wp + k), _mm256_mul_ps(_mm256_loadu_ps(a + k), scale)));
  }
  return out;
}

namespace {

// The attention of the G query heads that share one key/value head, for one query position, over a run
// of m of its visible slots (see attention_f32): each key and value row is read once for all G heads
// (from memory, where the G heads each reading it would fetch it G times). Per head the operations are
// those of the head alone: each slot's score one chain of FMAs over the head's lanes then hsum8, the
// scores' maximum, exp(score - max) and its sum in 8 lanes (slots j, j + 8, ... per lane, in slot order)
// then hsum8's order, and the weighted values summed over the slots in order. Writes per head the
// maximum peak[g], the sum total[g] and the unnormalised weighted values acc (G, D). m >= 1.
// DV: D / 8 known at compile time, or 0.
template <int DV>
void attend(const float* qv, int64_t G, const float* keys, const float* values, const int32_t* list, int64_t m,
            float scale, int64_t D, std::vector<float>& scores, float* acc_out, float* peak_out, float* total_out) {
  const int64_t dv = DV ? DV : D / 8;
  const int64_t padded = (m + 7) / 8 * 8;
  scores.resize(G * padded);  // head g's scores at g * padded
  for (int64_t j = 0; j < m; ++j) {
    const float* k = keys + (int64_t)list[j] * D;
    for (int64_t g = 0; g < G; ++g) {
      const float* q = qv + g * D;
      __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(k));
      for (int64_t d = 1; d < dv; ++d) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * d), _mm256_loadu_ps(k + 8 * d), acc);
      scores[g * padded + j] = hsum8(acc) * scale;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores.data() + g * padded;
    for (int64_t j = m; j < padded; ++j) sg[j] = -INFINITY;
    __m256 vpeak = _mm256_set1_ps(-INFINITY);
    for (int64_t j = 0; j < m; j += 8) vpeak = _mm256_max_ps(vpeak, _mm256_loadu_ps(sg + j));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vpeak);
    float peak = lanes[0];
    for (int l = 1; l < 8; ++l) peak = std::max(peak, lanes[l]);
    const __m256 top = _mm256_set1_ps(peak);
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < m; j += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sg + j), top));
      _mm256_storeu_ps(sg + j, e);
      sum = _mm256_add_ps(sum, e);
    }
    peak_out[g] = peak;
    total_out[g] = hsum8(sum);
  }
  // The weighted values: blocks of 4 x 8 values of up to 3 heads at a time in registers, each summed over
  // the slots in order.
  constexpr int kBlock = 4, kHeads = 3;
  for (int64_t g0 = 0; g0 < G; g0 += kHeads) {
    const int64_t heads = std::min<int64_t>(kHeads, G - g0);
    for (int64_t d0 = 0; d0 < dv; d0 += kBlock) {
      const int64_t width = std::min<int64_t>(kBlock, dv - d0);
      __m256 acc[kHeads][kBlock];
      for (int h = 0; h < kHeads; ++h)
        for (int b = 0; b < kBlock; ++b) acc[h][b] = _mm256_setzero_ps();
      for (int64_t j = 0; j < m; ++j) {
        const float* v = values + (int64_t)list[j] * D + 8 * d0;
        for (int64_t h = 0; h < heads; ++h) {
          const __m256 p = _mm256_set1_ps(scores[(g0 + h) * padded + j]);
          for (int64_t b = 0; b < width; ++b) acc[h][b] = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 8 * b), acc[h][b]);
        }
      }
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t b = 0; b < width; ++b) _mm256_storeu_ps(acc_out + (g0 + h) * D + 8 * (d0 + b), acc[h][b]);
    }
  }
}

// A query's visible slots are attended in `parts` runs of near-equal length (a number that depends on
// the count alone), so that the work of a long context spreads over the threads even with fewer
// key/value heads than threads; the runs' results are then merged in run order.
constexpr int64_t kRunSlots = 512;
inline int64_t run_count(int64_t m) { return std::max<int64_t>(1, (m + kRunSlots - 1) / kRunSlots); }
inline int64_t run_start(int64_t m, int64_t parts, int64_t r) { return m * r / parts; }

}  // namespace

// Attention of n new tokens per row over one layer of the cache, float32.
// q (B, n, heads, D) (rope_store_f32's); kv (layers, 2, B, kv_heads, capacity, D) contiguous; layer; span: the
// slots read; allowed (B, 1, n, span) bool, or an empty tensor when every slot below span is visible to
// every query. Returns (B, n, heads * D).
//
// Each query attends to the list of its visible slots in slot order (the committed ones, then its tree
// ancestors and itself) with one fixed order of operations over that list, which depends on the list
// alone: in runs of near-equal length, as many as 512-slot runs it takes (the threads share a long
// context's runs), per run the scores, their maximum, exp(score - max) and its sum (8 lanes, then
// hsum8), and the weighted values, each slot after the one before; then the runs merged in order. So a tree token
// computes exactly what the same token computes after a commit, when its ancestors sit in consecutive
// slots, and speculative decoding stays token-identical to plain decoding.
torch::Tensor attention_f32(const torch::Tensor& q, const torch::Tensor& kv, int64_t layer, int64_t span,
                            const torch::Tensor& allowed, double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && kv.scalar_type() == torch::kFloat32, "attention_f32: float32");
  TORCH_CHECK(q.dim() == 4 && kv.dim() == 6 && kv.is_contiguous(), "attention_f32: q (B, n, heads, D), kv 6-D contiguous");
  const int64_t B = q.size(0), n = q.size(1), heads = q.size(2), D = q.size(3);
  const int64_t kv_heads = kv.size(3), capacity = kv.size(4);
  TORCH_CHECK(kv.size(2) == B && kv.size(5) == D && D > 0 && D % 8 == 0 && kv_heads > 0 && heads % kv_heads == 0 &&
                  span >= 0 && span <= capacity && layer >= 0 && layer < kv.size(0),
              "attention_f32: shapes of q and kv disagree");
  const bool all = allowed.numel() == 0;
  TORCH_CHECK(all || (allowed.scalar_type() == torch::kBool && allowed.dim() == 4 && allowed.size(0) == B &&
                      allowed.size(1) == 1 && allowed.size(2) == n && allowed.size(3) == span),
              "attention_f32: allowed (B, 1, n, span) bool");
  auto qc = q.contiguous();
  auto out = torch::empty({B, n, heads * D}, q.options());
  // Per row and query, its visible slots in order.
  std::vector<std::vector<int32_t>> visible(B * n);
  auto mask = all ? torch::Tensor() : allowed.contiguous();
  const bool* mp = all ? nullptr : mask.data_ptr<bool>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < n; ++i) {
      auto& list = visible[b * n + i];
      list.reserve(span);
      for (int64_t s = 0; s < span; ++s)
        if (all || mp[(b * n + i) * span + s]) list.push_back((int32_t)s);
    }
  TORCH_CHECK(D <= 256, "attention_f32: head size above 256");
  const float* qp = qc.data_ptr<float>();
  const float* kvp = kv.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t group = heads / kv_heads;  // query heads per key/value head: adjacent heads h = kv * group + g
  // Tasks: (query, run, key/value head); each writes its run's maxima, sums and weighted values at the
  // run's index (first_run[q] + r) in the part arrays.
  std::vector<int64_t> first_run(B * n + 1, 0);  // per (row, query) q: the index of its first run
  for (int64_t q = 0; q < B * n; ++q) first_run[q + 1] = first_run[q] + run_count((int64_t)visible[q].size());
  const int64_t runs_total = first_run[B * n];
  std::vector<float> part_acc(runs_total * kv_heads * group * D), part_peak(runs_total * kv_heads * group),
      part_total(runs_total * kv_heads * group);
  // In the order (row, key/value head, run, query): the queries of a tree read the same runs of keys and
  // values one after another, while they are in cache.
  int64_t most_runs = 0;
  for (int64_t q = 0; q < B * n; ++q) most_runs = std::max(most_runs, first_run[q + 1] - first_run[q]);
  struct Task { int64_t q, r, kvh; };
  std::vector<Task> tasks;
  tasks.reserve(runs_total * kv_heads);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t kvh = 0; kvh < kv_heads; ++kvh)
      for (int64_t r = 0; r < most_runs; ++r)
        for (int64_t i = 0; i < n; ++i) {
          const int64_t q = b * n + i;
          if (r < first_run[q + 1] - first_run[q]) tasks.push_back({q, r, kvh});
        }
  at::parallel_for(0, (int64_t)tasks.size(), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t t = begin; t < end; ++t) {
      const auto [q, r, kvh] = tasks[t];
      const int64_t b = q / n, i = q % n, run_index = first_run[q] + r;
      const auto& list = visible[q];
      const int64_t m = (int64_t)list.size(), parts = run_count(m);
      const int64_t lo = run_start(m, parts, r), hi = run_start(m, parts, r + 1);
      const int64_t slot = (run_index * kv_heads + kvh) * group;  // this task's heads in the part arrays
      if (hi == lo) {  // no visible slot at all (m == 0): nothing to weigh
        for (int64_t g = 0; g < group; ++g) part_peak[slot + g] = -INFINITY, part_total[slot + g] = 0.f;
        continue;
      }
      const float* keys = kvp + (((layer * 2 + 0) * B + b) * kv_heads + kvh) * capacity * D;
      const float* values = kvp + (((layer * 2 + 1) * B + b) * kv_heads + kvh) * capacity * D;
      const float* qv = qp + ((b * n + i) * heads + kvh * group) * D;
      float* acc = part_acc.data() + slot * D;
      switch (D) {
        case 64: attend<8>(qv, group, keys, values, list.data() + lo, hi - lo, (float)scale, D, scores, acc,
                           part_peak.data() + slot, part_total.data() + slot); break;
        case 128: attend<16>(qv, group, keys, values, list.data() + lo, hi - lo, (float)scale, D, scores, acc,
                             part_peak.data() + slot, part_total.data() + slot); break;
        default: attend<0>(qv, group, keys, values, list.data() + lo, hi - lo, (float)scale, D, scores, acc,
                           part_peak.data() + slot, part_total.data() + slot);
      }
    }
  });
  // Merge each (row, query, head)'s runs in order: the largest maximum M, each run rescaled by
  // exp(its maximum - M) (exactly 1 for a single run, which so computes what one pass computes).
  for (int64_t q = 0; q < B * n; ++q) {
    const int64_t parts = first_run[q + 1] - first_run[q];
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t kvh = h / group, g = h % group;
      float* o = op + q * heads * D + h * D;
      if (visible[q].empty()) {  // a fully masked softmax: NaN, as torch's scaled_dot_product_attention gives
        for (int64_t d = 0; d < D; ++d) o[d] = std::nanf("");
        continue;
      }
      float top = -INFINITY;
      for (int64_t r = 0; r < parts; ++r)
        top = std::max(top, part_peak[((first_run[q] + r) * kv_heads + kvh) * group + g]);
      float total = 0.f;
      std::vector<float> factor(parts);
      for (int64_t r = 0; r < parts; ++r) {
        const int64_t slot = ((first_run[q] + r) * kv_heads + kvh) * group + g;
        alignas(32) float e[8];
        _mm256_store_ps(e, exp8(_mm256_set1_ps(part_peak[slot] - top)));
        factor[r] = e[0];
        total += part_total[slot] * factor[r];
      }
      const __m256 inv = _mm256_set1_ps(1.f / total);
      for (int64_t d = 0; d < D; d += 8) {
        __m256 sum = _mm256_setzero_ps();
        for (int64_t r = 0; r < parts; ++r) {
          const int64_t slot = ((first_run[q] + r) * kv_heads + kvh) * group + g;
          sum = _mm256_fmadd_ps(_mm256_loadu_ps(part_acc.data() + slot * D + d), _mm256_set1_ps(factor[r]), sum);
        }
        _mm256_storeu_ps(o + d, _mm256_mul_ps(sum, inv));
      }
    }
  }
  return out;
}

// A layer's rotary embedding and cache write, float32: qkv (B, n, (heads + 2 kv_heads) D) contiguous;
// cos, signed_sin (B, n, D) (signed_rotary's: the rotate-half sign folded into sin); kv (layers, 2, B,
// kv_heads, capacity, D) contiguous; starts: each row's first new slot. Per head vector x of q and k,
// x * cos + roll(x, D / 2) * signed_sin (one fused multiply-add after the product x * cos); k and v go
// to slots starts[b] .. starts[b] + n of the layer. Returns q (B, n, heads, D).
torch::Tensor rope_store_f32(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& signed_sin,
                             torch::Tensor kv, int64_t layer, const std::vector<int64_t>& starts, int64_t heads,
                             int64_t kv_heads) {
  TORCH_CHECK(qkv.scalar_type() == torch::kFloat32 && kv.scalar_type() == torch::kFloat32 && kv.is_contiguous() &&
                  kv.dim() == 6 && qkv.dim() == 3,
              "rope_store_f32: float32 qkv (B, n, width) and a contiguous 6-D cache");
  const int64_t B = qkv.size(0), n = qkv.size(1), D = kv.size(5), capacity = kv.size(4), half = D / 2;
  TORCH_CHECK(qkv.size(2) == (heads + 2 * kv_heads) * D && kv.size(2) == B && kv.size(3) == kv_heads && D > 0 &&
                  D % 16 == 0 && (int64_t)starts.size() == B && layer >= 0 && layer < kv.size(0),
              "rope_store_f32: shapes disagree");
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(starts[b] >= 0 && starts[b] + n <= capacity, "rope_store_f32: slots beyond the cache");
  auto x = qkv.contiguous();
  auto c = cos.to(torch::kFloat32).contiguous(), s = signed_sin.to(torch::kFloat32).contiguous();
  TORCH_CHECK(c.numel() == B * n * D && s.numel() == B * n * D, "rope_store_f32: cos, signed_sin (B, n, D)");
  auto q = torch::empty({B, n, heads, D}, qkv.options());
  const float *xp = x.data_ptr<float>(), *cp = c.data_ptr<float>(), *sp = s.data_ptr<float>();
  float *qp = q.data_ptr<float>(), *kvp = kv.data_ptr<float>();
  const int64_t width = x.size(2);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < n; ++i) {
      const float* row = xp + (b * n + i) * width;
      const float *cr = cp + (b * n + i) * D, *sr = sp + (b * n + i) * D;
      auto rotate = [&](const float* v, float* out) {
        for (int64_t d = 0; d < D; d += 8) {
          const int64_t from = d < half ? d + half : d - half;  // roll(v, half)[d] = v[d - half mod D]
          const __m256 r = _mm256_mul_ps(_mm256_loadu_ps(v + d), _mm256_loadu_ps(cr + d));
          _mm256_storeu_ps(out + d, _mm256_fmadd_ps(_mm256_loadu_ps(v + from), _mm256_loadu_ps(sr + d), r));
        }
      };
      for (int64_t h = 0; h < heads; ++h) rotate(row + h * D, qp + ((b * n + i) * heads + h) * D);
      const int64_t slot = starts[b] + i;
      for (int64_t h = 0; h < kv_heads; ++h) {
        float* key = kvp + (((layer * 2 + 0) * B + b) * kv_heads + h) * capacity * D + slot * D;
        float* value = kvp + (((layer * 2 + 1) * B + b) * kv_heads + h) * capacity * D + slot * D;
        rotate(row + (heads + h) * D, key);
        std::memcpy(value, row + (heads + kv_heads + h) * D, D * sizeof(float));
      }
    }
  return q;
}

// gate|up (R, 2I) float32 -> silu(gate) * up (R, I), silu(g) = g / (1 + exp(-g)) with exp8.
torch::Tensor silu_mul_f32(const torch::Tensor& gate_up) {
  TORCH_CHECK(gate_up.scalar_type() == torch::kFloat32 && gate_up.dim() == 2 && gate_up.size(1) % 16 == 0,
              "silu_mul_f32: float32 (R, 2I), I a multiple of 8");
  auto x = gate_up.contiguous();
  const int64_t R = x.size(0), I = x.size(1) / 2;
  auto out = torch::empty({R, I}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const __m256 one = _mm256_set1_ps(1.f);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t k = 0; k < I; k += 8) {
      const __m256 g = _mm256_loadu_ps(xp + r * 2 * I + k), u = _mm256_loadu_ps(xp + r * 2 * I + I + k);
      const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
      _mm256_storeu_ps(op + r * I + k, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), u));
    }
  return out;
}
