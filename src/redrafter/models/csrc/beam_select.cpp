// One depth of the drafter's beam search after its logits (drafter/beam_search.py): log-softmax over
// the draft vocabulary, each beam's score added, and the best W of all beams' extensions, in one pass
// per beam row. The tensor version takes a log_softmax, two topk and about ten index operations.
// Built into both extensions: with 16 lanes (AVX-512) and with 8 (AVX2, csrc/avx2).
#include <torch/extension.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX512F__) && !defined(REDRAFTER_AVX2)
#include "vec.h"
#else
#include "avx2/vec_f32.h"
#endif

namespace {

#if defined(__AVX512F__) && !defined(REDRAFTER_AVX2)
using namespace redrafter_vec;
struct Lanes {  // 16 float32 lanes
  using V = __m512;
  static constexpr int kWidth = 16;
  template <typename T> static V load(const T* p) { return load16(p); }
  static V set1(float v) { return _mm512_set1_ps(v); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V exp(V a) { return exp16(a); }
  static float reduce_max(V a) { return _mm512_reduce_max_ps(a); }
  static float reduce_add(V a) { return _mm512_reduce_add_ps(a); }
  static uint32_t greater(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static void store(float* p, V a) { _mm512_storeu_ps(p, a); }
};
#else
using namespace redrafter_vec8;
struct Lanes {  // 8 float32 lanes
  using V = __m256;
  static constexpr int kWidth = 8;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const at::BFloat16* p) {  // a bf16 is the high half of its float32
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static V set1(float v) { return _mm256_set1_ps(v); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V exp(V a) { return exp8(a); }
  static float reduce_max(V a) {
    const __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 n = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(n, _mm_movehdup_ps(n)));
  }
  static float reduce_add(V a) { return hsum8(a); }
  static uint32_t greater(V a, V b) { return (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_GT_OQ)); }
  static void store(float* p, V a) { _mm256_storeu_ps(p, a); }
};
#endif

// The best `width` candidates so far, best first; ties keep the smaller flat index first.
struct Best {
  std::vector<float> value;
  std::vector<int64_t> index;
  explicit Best(int64_t width) : value(width, -std::numeric_limits<float>::infinity()), index(width, -1) {}
  float worst() const { return value.back(); }
  void offer(float v, int64_t i) {  // candidates arrive in increasing flat index
    if (!(v > value.back()) && index.back() >= 0) return;
    int64_t k = (int64_t)value.size() - 1;
    while (k > 0 && (v > value[k - 1] || index[k - 1] < 0)) {
      value[k] = value[k - 1], index[k] = index[k - 1];
      --k;
    }
    value[k] = v, index[k] = i;
  }
};

template <typename T>
void select_row(const T* logits, const float* scores, int64_t beams, int64_t vocab, Best& best) {
  constexpr int L = Lanes::kWidth;
  for (int64_t r = 0; r < beams; ++r) {
    const T* x = logits + r * vocab;
    const float score = scores[r];
    if (score == -std::numeric_limits<float>::infinity() && best.index.back() >= 0) continue;  // adds nothing
    // log q = (x - max) - log(sum exp(x - max)), as torch.log_softmax
    float top = -std::numeric_limits<float>::infinity();
    int64_t v = 0;
    auto vmax = Lanes::set1(top);
    for (; v + L <= vocab; v += L) vmax = Lanes::max(vmax, Lanes::load(x + v));
    top = Lanes::reduce_max(vmax);
    for (; v < vocab; ++v) top = std::max(top, (float)x[v]);
    const auto vtop = Lanes::set1(top);
    auto vsum = Lanes::set1(0.f);
    for (v = 0; v + L <= vocab; v += L) vsum = Lanes::add(vsum, Lanes::exp(Lanes::sub(Lanes::load(x + v), vtop)));
    float sum = Lanes::reduce_add(vsum);
    for (; v < vocab; ++v) sum += std::exp((float)x[v] - top);
    const float shift = std::log(sum);
    // candidate = score + ((x - max) - shift); only those above the current W-th best are inserted
    const auto vshift = Lanes::set1(shift), vscore = Lanes::set1(score);
    for (v = 0; v + L <= vocab; v += L) {
      const auto c = Lanes::add(vscore, Lanes::sub(Lanes::sub(Lanes::load(x + v), vtop), vshift));
      uint32_t m = best.index.back() < 0 ? (1u << L) - 1 : Lanes::greater(c, Lanes::set1(best.worst()));
      if (!m) continue;
      alignas(64) float lanes[L];
      Lanes::store(lanes, c);
      for (; m; m &= m - 1) {
        const int lane = __builtin_ctz(m);
        best.offer(lanes[lane], r * vocab + v + lane);
      }
    }
    for (; v < vocab; ++v) best.offer(score + (((float)x[v] - top) - shift), r * vocab + v);
  }
}

}  // namespace

// logits (B, R, V) float32 or bf16: the drafter's logits for R beams; scores (B, R) float32: each beam's
// summed log q (-inf for a beam that must not be extended). Returns {top (B, W) float32, best first,
// parent (B, W) int64 in [0, R), token (B, W) int64 in [0, V)}: the W best of the R x V values
// scores[r] + log_softmax(logits[r])[v]; ties go to the smaller r * V + v.
std::vector<torch::Tensor> beam_select(const torch::Tensor& logits_in, const torch::Tensor& scores_in, int64_t width) {
  TORCH_CHECK(logits_in.device().is_cpu() && logits_in.dim() == 3 &&
                  (logits_in.scalar_type() == torch::kFloat || logits_in.scalar_type() == torch::kBFloat16),
              "beam_select: logits must be a (batch, beams, vocab) float32 or bfloat16 CPU tensor");
  TORCH_CHECK(scores_in.device().is_cpu() && scores_in.dim() == 2 && scores_in.size(0) == logits_in.size(0) &&
                  scores_in.size(1) == logits_in.size(1),
              "beam_select: scores must be a (batch, beams) CPU tensor");
  const int64_t batch = logits_in.size(0), beams = logits_in.size(1), vocab = logits_in.size(2);
  TORCH_CHECK(width >= 1 && width <= beams * vocab, "beam_select: width must be in [1, beams * vocab]");
  const auto logits = logits_in.contiguous();
  const auto scores = scores_in.to(torch::kFloat).contiguous();
  auto top = torch::empty({batch, width}, scores.options());
  auto parent = torch::empty({batch, width}, scores.options().dtype(torch::kLong));
  auto token = torch::empty({batch, width}, parent.options());
  for (int64_t b = 0; b < batch; ++b) {
    Best best(width);
    if (logits.scalar_type() == torch::kFloat)
      select_row(logits.data_ptr<float>() + b * beams * vocab, scores.data_ptr<float>() + b * beams, beams, vocab, best);
    else
      select_row(logits.data_ptr<at::BFloat16>() + b * beams * vocab, scores.data_ptr<float>() + b * beams, beams,
                 vocab, best);
    for (int64_t k = 0; k < width; ++k) {  // all filled: beams are skipped only once W candidates are in
      const int64_t flat = best.index[k];
      top.data_ptr<float>()[b * width + k] = best.value[k];
      parent.data_ptr<int64_t>()[b * width + k] = flat / vocab;
      token.data_ptr<int64_t>()[b * width + k] = flat % vocab;
    }
  }
  return {top, parent, token};
}
