// A speculative step's tree bookkeeping in one call each (tree.py and verify.py hold the tensor
// versions, which define the results and run everywhere else): a tree of batch x W x L nodes takes
// about 25 small tensor operations to cap and 25 to pack, each costing more in PyTorch's dispatch
// than the work itself; here the same arithmetic is a few loops over a few hundred integers.
#include <torch/extension.h>
#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

namespace {

constexpr int64_t kNoToken = -1;  // tree.NO_TOKEN

void check_beams(const torch::Tensor& beams, const char* name) {
  TORCH_CHECK(beams.device().is_cpu() && beams.scalar_type() == torch::kLong && beams.dim() == 3,
              name, ": beams must be a (batch, W, L) int64 CPU tensor");
}

// owner[i * L + k] = the smallest beam j with beams[j, :k+1] == beams[i, :k+1] (tree.owners).
void owners(const int64_t* b, int64_t width, int64_t length, std::vector<int64_t>& owner) {
  owner.assign(width * length, 0);
  for (int64_t i = 0; i < width; ++i) {
    int64_t k_done = 0;  // positions of beam i whose owner is decided
    for (int64_t j = 0; j <= i && k_done < length; ++j) {
      // beam j matches beam i on positions 0..m-1; it owns those of them not yet decided
      int64_t m = 0;
      while (m < length && b[j * length + m] == b[i * length + m]) ++m;
      for (int64_t k = k_done; k < m; ++k) owner[i * length + k] = j;
      k_done = std::max(k_done, m);
    }
  }
}

// torch.argmax of one float32 row: the first index of the largest value, NaN counting as largest.
// The vocabulary is large (49,152 for SmolLM2) and torch's reduction is slow on CPU (about 30 us a row).
#if defined(__AVX512F__) && !defined(REDRAFTER_AVX2)
int64_t argmax_row(const float* x, int64_t size) {
  __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 nan = 0;
  int64_t i = 0;
  for (; i + 16 <= size; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    best = _mm512_max_ps(best, v);
  }
  float top = _mm512_reduce_max_ps(best);
  for (int64_t j = i; j < size; ++j) {
    if (x[j] != x[j]) nan = 1;
    top = std::max(top, x[j]);
  }
  for (int64_t j = 0; j < size; ++j) {
    if (nan ? x[j] != x[j] : x[j] == top) return j;
    if (!nan && j % 16 == 0 && j + 16 <= size &&
        !_mm512_cmp_ps_mask(_mm512_loadu_ps(x + j), _mm512_set1_ps(top), _CMP_EQ_OQ))
      j += 15;  // no maximum in these 16: skip them
  }
  return 0;  // size == 0
}
#else  // the same with AVX2 (this file is also built into the AVX2 extension, csrc/avx2)
int64_t argmax_row(const float* x, int64_t size) {
  __m256 best = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int nan = 0;
  int64_t i = 0;
  for (; i + 8 <= size; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    nan |= _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    best = _mm256_max_ps(best, v);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, best);
  float top = lanes[0];
  for (int l = 1; l < 8; ++l) top = std::max(top, lanes[l]);
  for (int64_t j = i; j < size; ++j) {
    if (x[j] != x[j]) nan = 1;
    top = std::max(top, x[j]);
  }
  for (int64_t j = 0; j < size; ++j) {
    if (nan ? x[j] != x[j] : x[j] == top) return j;
    if (!nan && j % 8 == 0 && j + 8 <= size &&
        !_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + j), _mm256_set1_ps(top), _CMP_EQ_OQ)))
      j += 7;  // no maximum in these 8: skip them
  }
  return 0;  // size == 0
}
#endif

// tree.node_scores then tree.cap_tree on one row's beams b (W x L, in place): NO_TOKEN at every node
// outside the max_tokens best distinct nodes; nodes scoring at least sure_log_prob stay too, up to
// most_tokens in all. s: the row's path scores, shaped like b.
void cap_row(int64_t* b, const float* s, int64_t width, int64_t length, int64_t max_tokens, float sure_log_prob,
             int64_t most_tokens, std::vector<int64_t>& owner, std::vector<int64_t>& order, std::vector<float>& best,
             std::vector<float>& score, std::vector<char>& kept) {
  const int64_t nodes = width * length;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  order.resize(nodes), best.resize(nodes), score.resize(nodes), kept.resize(nodes);
  owners(b, width, length, owner);
  // node_scores: each node the best score of any beam through it, then the running minimum along each beam.
  std::fill(best.begin(), best.end(), neg_inf);
  for (int64_t p = 0; p < nodes; ++p) {
    const float v = b[p] != kNoToken ? s[p] : neg_inf;
    const int64_t node = owner[p] * length + p % length;
    best[node] = std::max(best[node], v);
  }
  for (int64_t i = 0; i < width; ++i) {
    float running = std::numeric_limits<float>::infinity();
    for (int64_t k = 0; k < length; ++k) {
      const int64_t p = i * length + k;
      running = std::min(running, best[owner[p] * length + k]);
      // cap_tree ranks owned nodes by that score; every other position scores -inf
      score[p] = (owner[p] == i && b[p] != kNoToken) ? running : neg_inf;
    }
  }
  // Rank by (score desc, depth asc, position asc): the order of cap_tree's two stable sorts.
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
    if (score[x] != score[y]) return score[x] > score[y];
    return x % length < y % length;
  });
  int64_t keep = std::min(max_tokens, nodes);
  int64_t sure = 0;  // the sure nodes come first in that order: every owned node at or above sure_log_prob
  for (int64_t p = 0; p < nodes; ++p) sure += score[p] >= sure_log_prob;
  keep = std::max(keep, std::min(sure, most_tokens));
  std::fill(kept.begin(), kept.end(), 0);
  for (int64_t rank = 0; rank < keep; ++rank) {
    const int64_t p = order[rank];
    kept[p] = owner[p] == p / length && b[p] != kNoToken;
  }
  for (int64_t p = 0; p < nodes; ++p)
    if (!kept[owner[p] * length + p % length]) b[p] = kNoToken;
}

}  // namespace

// tree.node_scores then tree.cap_tree: the beams with NO_TOKEN at every node outside the
// max_tokens best distinct nodes of each row. beams (B, W, L) int64, path_scores (B, W, L) float32.
torch::Tensor cap_tree_scored(const torch::Tensor& beams_in, const torch::Tensor& scores_in, int64_t max_tokens) {
  check_beams(beams_in, "cap_tree_scored");
  TORCH_CHECK(scores_in.device().is_cpu() && scores_in.sizes() == beams_in.sizes(),
              "cap_tree_scored: path_scores must be a CPU tensor shaped like beams");
  TORCH_CHECK(max_tokens >= 1, "cap_tree_scored: max_tokens must be >= 1");
  const auto scores = scores_in.to(torch::kFloat).contiguous();
  const int64_t batch = beams_in.size(0), width = beams_in.size(1), length = beams_in.size(2), nodes = width * length;
  auto out = beams_in.contiguous().clone();
  if (nodes <= max_tokens) return out;
  std::vector<int64_t> owner, order;
  std::vector<float> best, score;
  std::vector<char> kept;
  for (int64_t r = 0; r < batch; ++r)
    cap_row(out.data_ptr<int64_t>() + r * nodes, scores.data_ptr<float>() + r * nodes, width, length, max_tokens,
            std::numeric_limits<float>::infinity(), 0, owner, order, best, score, kept);
  return out;
}

// drafter/lookup.joined_tree: two proposers' beams side by side (lookup.join_beams, the shorter padded
// with NO_TOKEN and scores -inf), then NO_TOKEN at every node whose score is below min_log_prob or NaN
// (tree.drop_below; none when min_log_prob is -inf), then the cap to max_tokens nodes (none when 0), past
// which the nodes scoring at least sure_log_prob (none when +inf) stay too, up to most_tokens in all.
// beams_a (B, W, L), scores_a like it; beams_b (B, W', L'), scores_b like it. Returns (B, W + W', max(L, L')).
torch::Tensor cap_tree_joined(const torch::Tensor& beams_a, const torch::Tensor& scores_a, const torch::Tensor& beams_b,
                              const torch::Tensor& scores_b, double min_log_prob, int64_t max_tokens,
                              double sure_log_prob, int64_t most_tokens) {
  check_beams(beams_a, "cap_tree_joined");
  check_beams(beams_b, "cap_tree_joined");
  TORCH_CHECK(scores_a.device().is_cpu() && scores_a.sizes() == beams_a.sizes() && scores_b.device().is_cpu() &&
                  scores_b.sizes() == beams_b.sizes(),
              "cap_tree_joined: scores must be CPU tensors shaped like their beams");
  TORCH_CHECK(beams_a.size(0) == beams_b.size(0), "cap_tree_joined: both beam sets must have the same batch");
  TORCH_CHECK(max_tokens >= 0, "cap_tree_joined: max_tokens must be >= 0");
  const int64_t batch = beams_a.size(0), wa = beams_a.size(1), wb = beams_b.size(1);
  const int64_t la = beams_a.size(2), lb = beams_b.size(2), length = std::max(la, lb), width = wa + wb;
  const int64_t nodes = width * length;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  auto out = torch::full({batch, width, length}, kNoToken, beams_a.options());
  std::vector<float> joined(batch * nodes, neg_inf);
  int64_t* o = out.data_ptr<int64_t>();
  const bool floor = min_log_prob > -std::numeric_limits<double>::infinity();
  const float threshold = (float)min_log_prob;
  const torch::Tensor parts[2][2] = {{beams_a.contiguous(), scores_a.to(torch::kFloat).contiguous()},
                                     {beams_b.contiguous(), scores_b.to(torch::kFloat).contiguous()}};
  for (int part = 0; part < 2; ++part) {
    const int64_t w_part = part ? wb : wa, l_part = part ? lb : la, first = part ? wa : 0;
    const int64_t* b = parts[part][0].data_ptr<int64_t>();
    const float* s = parts[part][1].data_ptr<float>();
    for (int64_t r = 0; r < batch; ++r)
      for (int64_t i = 0; i < w_part; ++i)
        for (int64_t k = 0; k < l_part; ++k) {
          const int64_t from = (r * w_part + i) * l_part + k, to = r * nodes + (first + i) * length + k;
          joined[to] = s[from];
          o[to] = (floor && !(s[from] >= threshold)) ? kNoToken : b[from];
        }
  }
  if (max_tokens > 0 && nodes > max_tokens) {
    std::vector<int64_t> owner, order;
    std::vector<float> best, score;
    std::vector<char> kept;
    for (int64_t r = 0; r < batch; ++r)
      cap_row(o + r * nodes, joined.data() + r * nodes, width, length, max_tokens, (float)sure_log_prob, most_tokens,
              owner, order, best, score, kept);
  }
  return out;
}

// tree.pack: {tokens (B, n), depths (B, n), mask (B, n, n) bool, unpacker (B, W, L), lengths (B)}.
std::vector<torch::Tensor> pack_tree(const torch::Tensor& beams_in) {
  check_beams(beams_in, "pack_tree");
  const auto beams = beams_in.contiguous();
  const int64_t batch = beams.size(0), width = beams.size(1), length = beams.size(2), nodes = width * length;
  auto long_options = beams.options();
  auto unpacker = torch::empty({batch, width, length}, long_options);
  auto lengths = torch::empty({batch}, long_options);
  std::vector<int64_t> owner, slot(nodes);
  std::vector<std::vector<int64_t>> owners_of(batch);
  std::vector<std::vector<char>> owned(batch, std::vector<char>(nodes));
  int64_t n = 0;
  for (int64_t r = 0; r < batch; ++r) {
    const int64_t* b = beams.data_ptr<int64_t>() + r * nodes;
    owners(b, width, length, owners_of[r]);
    int64_t count = 0;
    for (int64_t p = 0; p < nodes; ++p) {
      owned[r][p] = owners_of[r][p] == p / length && b[p] != kNoToken;
      count += owned[r][p];
    }
    lengths.data_ptr<int64_t>()[r] = count;
    n = std::max(n, count);
  }
  auto tokens = torch::zeros({batch, n}, long_options);
  auto depths = torch::zeros({batch, n}, long_options);
  auto mask = torch::zeros({batch, n, n}, long_options.dtype(torch::kBool));
  for (int64_t r = 0; r < batch; ++r) {
    const int64_t* b = beams.data_ptr<int64_t>() + r * nodes;
    const std::vector<int64_t>& owner = owners_of[r];
    int64_t next = 0, last = -1;
    for (int64_t p = 0; p < nodes; ++p) {
      if (owned[r][p]) last = next++;
      slot[p] = last;  // the slot of the last owned node at or before p (the cumulative count - 1)
    }
    int64_t* u = unpacker.data_ptr<int64_t>() + r * nodes;
    for (int64_t p = 0; p < nodes; ++p) u[p] = slot[owner[p] * length + p % length];
    int64_t* t = tokens.data_ptr<int64_t>() + r * n;
    int64_t* d = depths.data_ptr<int64_t>() + r * n;
    bool* m = mask.data_ptr<bool>() + r * n * n;
    for (int64_t p = 0; p < nodes; ++p) {
      if (!owned[r][p]) continue;
      const int64_t s = slot[p], i = p / length, k = p % length;
      t[s] = b[p];
      d[s] = k;
      for (int64_t a = 0; a <= k; ++a) m[s * n + u[i * length + a]] = true;  // its ancestors and itself
    }
    for (int64_t s = next; s < n; ++s) m[s * n + s] = true;  // padding attends only itself
  }
  return {tokens, depths, mask, unpacker, lengths};
}

// verify.tree_accept's greedy walk: {beam (B), accepted (B), bonus (B)} from the beams, their
// unpacker and the target's logits at every packed node, logits (B, n, V) float32; the argmax is
// taken only at the nodes the walk reaches.
std::vector<torch::Tensor> greedy_accept(const torch::Tensor& beams_in, const torch::Tensor& unpacker_in,
                                         const torch::Tensor& logits_in) {
  check_beams(beams_in, "greedy_accept");
  TORCH_CHECK(unpacker_in.sizes() == beams_in.sizes() && unpacker_in.scalar_type() == torch::kLong &&
                  unpacker_in.device().is_cpu(),
              "greedy_accept: unpacker must be an int64 CPU tensor shaped like beams");
  TORCH_CHECK(logits_in.dim() == 3 && logits_in.size(0) == beams_in.size(0) && logits_in.scalar_type() == torch::kFloat &&
                  logits_in.device().is_cpu(),
              "greedy_accept: logits must be a (batch, n, V) float32 CPU tensor");
  const auto beams = beams_in.contiguous(), unpacker = unpacker_in.contiguous(), logits = logits_in.contiguous();
  const int64_t batch = beams.size(0), width = beams.size(1), length = beams.size(2), n = logits.size(1),
                vocab = logits.size(2);
  TORCH_CHECK(width > 0 && length > 0, "greedy_accept: beams must hold at least g0");
  auto options = beams.options();
  auto beam = torch::empty({batch}, options), accepted = torch::empty({batch}, options), bonus = torch::empty({batch}, options);
  std::vector<char> live(width);
  for (int64_t r = 0; r < batch; ++r) {
    const int64_t* b = beams.data_ptr<int64_t>() + r * width * length;
    const int64_t* u = unpacker.data_ptr<int64_t>() + r * width * length;
    const float* row_logits = logits.data_ptr<float>() + r * n * vocab;
    const auto argmax = [&](int64_t node) {
      TORCH_CHECK(node >= 0 && node < n, "greedy_accept: unpacker index ", node, " outside the ", n, " packed nodes");
      return argmax_row(row_logits + node * vocab, vocab);
    };
    std::fill(live.begin(), live.end(), 1);
    int64_t node = u[0], chosen = 0, count = 0, best = argmax(node);
    for (int64_t j = 1; j < length; ++j) {
      int64_t hit = -1;
      for (int64_t w = 0; w < width && hit < 0; ++w)
        if (live[w] && b[w * length + j] == best) hit = w;
      if (hit < 0) break;
      count = j, chosen = hit, node = u[hit * length + j];
      for (int64_t w = 0; w < width; ++w)
        live[w] = live[w] && b[w * length + j] != kNoToken && u[w * length + j] == node;
      best = argmax(node);
    }
    beam.data_ptr<int64_t>()[r] = chosen;
    accepted.data_ptr<int64_t>()[r] = count;
    bonus.data_ptr<int64_t>()[r] = best;
  }
  return {beam, accepted, bonus};
}

// verify.tree_accept's sampling walk (recursive multi-draft rejection sampling), with the same
// arithmetic as verify.walk: probs (batch, n, V) float32 is the target's p at every packed node;
// draft_probs the q each drafted token was drawn from, as verify.DraftProbs holds it: (batch, Wq, Lq, Vq)
// float32 for beams w < Wq at drafted positions j - 1 < Lq, over the Vq tokens listed in draft_map (Vq,)
// int64 (empty: Vq = V, in order); every other drafted token is a point mass (an empty draft_probs: all
// of them). uniforms (batch, U) float64 are the row's numbers, used in order: one per candidate tested,
// then one for the bonus (U >= W * (L-1) + 1 is always enough).
namespace {

// Cumulative weights in sampling.cumulative_weights' order: kCdfBlocks runs of ceil(V / kCdfBlocks)
// consecutive tokens, each summed in order from 0 (side by side here: independent chains instead of
// one chain of V dependent additions), then the runs' sums in order.
constexpr int64_t kCdfBlocks = 16;  // sampling.CDF_BLOCKS

// The runs' sums s_k (padding past the end adds 0.0, which changes no sum).
void run_sums(const float* p, int64_t size, double* sums) {
  const int64_t run = (size + kCdfBlocks - 1) / kCdfBlocks;
  double acc[kCdfBlocks] = {};  // in registers: kCdfBlocks independent chains
  for (int64_t i = 0; i < run; ++i)
#pragma GCC unroll 16
    for (int64_t k = 0; k < kCdfBlocks; ++k) {
      const int64_t at = k * run + i;
      acc[k] += at < size ? (double)p[at] : 0.0;
    }
  std::copy(acc, acc + kCdfBlocks, sums);
}

// The total weight: the last cumulative weight.
double total_weight(const float* p, int64_t size) {
  double sums[kCdfBlocks];
  run_sums(p, size, sums);
  double total = 0.0;
  for (int64_t k = 0; k < kCdfBlocks; ++k) total += sums[k];
  return total;
}

// The first index whose cumulative weight exceeds u times the total (sampling.inverse_cdf); the last
// index of nonzero weight when none does (u within 2^-53 of 1).
int64_t inverse_cdf_row(const float* p, int64_t size, double u) {
  double sums[kCdfBlocks];
  run_sums(p, size, sums);
  double total = 0.0;
  for (int64_t k = 0; k < kCdfBlocks; ++k) total += sums[k];
  const double x = u * total;
  const int64_t run = (size + kCdfBlocks - 1) / kCdfBlocks;
  double start = 0.0;
  for (int64_t k = 0; k < kCdfBlocks; ++k) {
    const double end = start + sums[k];
    if (end > x) {  // the run's last cumulative weight is end: the index is in this run
      double within = 0.0;
      for (int64_t i = k * run; i < std::min((k + 1) * run, size); ++i) {
        within += p[i];
        if (start + within > x) return i;
      }
    }
    start = end;
  }
  for (int64_t i = size - 1; i >= 0; --i)
    if (p[i] > 0) return i;
  return 0;
}

}  // namespace

std::vector<torch::Tensor> sampled_accept(const torch::Tensor& beams_in, const torch::Tensor& unpacker_in,
                                          const torch::Tensor& probs_in, const torch::Tensor& draft_in,
                                          const torch::Tensor& draft_map_in, const torch::Tensor& uniforms_in,
                                          bool distinct) {
  check_beams(beams_in, "sampled_accept");
  TORCH_CHECK(unpacker_in.sizes() == beams_in.sizes() && unpacker_in.scalar_type() == torch::kLong &&
                  unpacker_in.device().is_cpu(),
              "sampled_accept: unpacker must be an int64 CPU tensor shaped like beams");
  const int64_t batch = beams_in.size(0), width = beams_in.size(1), length = beams_in.size(2);
  TORCH_CHECK(width > 0 && length > 0, "sampled_accept: beams must hold at least g0");
  TORCH_CHECK(probs_in.dim() == 3 && probs_in.size(0) == batch && probs_in.scalar_type() == torch::kFloat &&
                  probs_in.device().is_cpu(),
              "sampled_accept: probs must be a (batch, n, V) float32 CPU tensor");
  const int64_t n = probs_in.size(1), vocab = probs_in.size(2);
  const bool point_masses = draft_in.numel() == 0, mapped = draft_map_in.numel() > 0;
  TORCH_CHECK(point_masses || (draft_in.dim() == 4 && draft_in.size(0) == batch && draft_in.size(1) <= width &&
                               draft_in.size(2) <= length - 1 && draft_in.size(3) == (mapped ? draft_map_in.size(0) : vocab) &&
                               draft_in.scalar_type() == torch::kFloat && draft_in.device().is_cpu()),
              "sampled_accept: draft_probs must be empty or a (batch, <= W, <= L-1, Vq) float32 CPU tensor, Vq the "
              "length of draft_map (V without one)");
  TORCH_CHECK(!mapped || (draft_map_in.dim() == 1 && draft_map_in.scalar_type() == torch::kLong && draft_map_in.device().is_cpu()),
              "sampled_accept: draft_map must be empty or a (Vq,) int64 CPU tensor");
  const int64_t q_width = point_masses ? 0 : draft_in.size(1), q_length = point_masses ? 0 : draft_in.size(2);
  const int64_t q_vocab = point_masses ? 0 : draft_in.size(3);
  const auto draft_map = mapped ? draft_map_in.contiguous() : draft_map_in;
  std::vector<int64_t> inverse;  // target id -> index into q (-1: q is 0 there)
  if (mapped) {
    inverse.assign(vocab, -1);
    const int64_t* m = draft_map.data_ptr<int64_t>();
    for (int64_t k = 0; k < q_vocab; ++k) {
      TORCH_CHECK(m[k] >= 0 && m[k] < vocab && inverse[m[k]] < 0, "sampled_accept: draft_map must list distinct token ids");
      inverse[m[k]] = k;
    }
  }
  TORCH_CHECK(uniforms_in.dim() == 2 && uniforms_in.size(0) == batch && uniforms_in.size(1) >= width * (length - 1) + 1 &&
                  uniforms_in.scalar_type() == torch::kDouble && uniforms_in.device().is_cpu(),
              "sampled_accept: uniforms must be a (batch, >= W * (L-1) + 1) float64 CPU tensor");
  const auto beams = beams_in.contiguous(), unpacker = unpacker_in.contiguous(), probs = probs_in.contiguous(),
             uniforms = uniforms_in.contiguous();
  const auto draft = point_masses ? draft_in : draft_in.contiguous();
  const int64_t per_row = uniforms.size(1);
  auto options = beams.options();
  auto beam = torch::empty({batch}, options), accepted = torch::empty({batch}, options), bonus = torch::empty({batch}, options);
  std::vector<char> live(width);
  std::vector<int64_t> tested;  // with distinct: the nodes tested at this depth
  std::vector<float> residual(vocab), updated(vocab);
  for (int64_t r = 0; r < batch; ++r) {
    const int64_t* b = beams.data_ptr<int64_t>() + r * width * length;
    const int64_t* u = unpacker.data_ptr<int64_t>() + r * width * length;
    const double* draws = uniforms.data_ptr<double>() + r * per_row;
    const auto p_at = [&](int64_t node) {
      TORCH_CHECK(node >= 0 && node < n, "sampled_accept: unpacker index ", node, " outside the ", n, " packed nodes");
      return probs.data_ptr<float>() + (r * n + node) * vocab;
    };
    const auto q_of = [&](int64_t w, int64_t j) {  // the distribution beams[r, w, j] was drawn from, or null
      if (w >= q_width || j - 1 >= q_length) return (const float*)nullptr;  // a point mass
      return (const float*)draft.data_ptr<float>() + ((r * q_width + w) * q_length + j - 1) * q_vocab;
    };
    std::fill(live.begin(), live.end(), 1);
    int64_t node = u[0], chosen = 0, count = 0, used = 0, drawn = -1;
    for (int64_t j = 1; j < length; ++j) {
      const float* p = p_at(node);
      std::copy(p, p + vocab, residual.begin());
      int64_t hit = -1;
      tested.clear();
      for (int64_t w = 0; w < width && hit < 0; ++w) {
        const int64_t x = b[w * length + j];
        if (!live[w] || x == kNoToken) continue;
        if (distinct) {  // a sibling drawn once, shared by later beams, is a candidate once
          const int64_t at_node = u[w * length + j];
          if (std::find(tested.begin(), tested.end(), at_node) != tested.end()) continue;
          tested.push_back(at_node);
        }
        TORCH_CHECK(x >= 0 && x < vocab, "sampled_accept: token ", x, " outside the vocabulary");
        const float* q = q_of(w, j);
        const int64_t at = q == nullptr ? -1 : mapped ? inverse[x] : x;
        const double q_x = q == nullptr ? 1.0 : at < 0 ? 0.0 : (double)q[at];
        if (draws[used++] * q_x < (double)residual[x]) {
          hit = w;
          break;
        }
        if (q == nullptr) {
          std::copy(residual.begin(), residual.end(), updated.begin());
          updated[x] = 0.0f;
        } else if (mapped) {  // max(r - q, 0) where q lives, r (>= 0) elsewhere: the dense update's values
          std::copy(residual.begin(), residual.end(), updated.begin());
          const int64_t* m = draft_map.data_ptr<int64_t>();
          for (int64_t k = 0; k < q_vocab; ++k) updated[m[k]] = std::max(residual[m[k]] - q[k], 0.0f);
        } else {
          for (int64_t i = 0; i < vocab; ++i) updated[i] = std::max(residual[i] - q[i], 0.0f);
        }
        const double total = total_weight(updated.data(), vocab);
        // Zero only when r == q_w in exact arithmetic (rejection then has probability 0); in float32 it
        // can happen after a rejection when r and q_w differ by rounding: r stays as it was (verify.walk).
        if (total > 0) {
          const float t = (float)total;
          for (int64_t i = 0; i < vocab; ++i) residual[i] = updated[i] / t;
        }
      }
      if (hit < 0) {
        drawn = inverse_cdf_row(residual.data(), vocab, draws[used++]);
        break;
      }
      count = j, chosen = hit, node = u[hit * length + j];
      for (int64_t w = 0; w < width; ++w)
        live[w] = live[w] && b[w * length + j] != kNoToken && u[w * length + j] == node;
    }
    if (drawn < 0) drawn = inverse_cdf_row(p_at(node), vocab, draws[used++]);
    beam.data_ptr<int64_t>()[r] = chosen;
    accepted.data_ptr<int64_t>()[r] = count;
    bonus.data_ptr<int64_t>()[r] = drawn;
  }
  return {beam, accepted, bonus};
}

torch::Tensor inverse_cdf(const torch::Tensor& probs_in, const torch::Tensor& uniforms_in) {
  TORCH_CHECK(probs_in.dim() == 2 && probs_in.scalar_type() == torch::kFloat && probs_in.device().is_cpu(),
              "inverse_cdf: probs must be a (rows, V) float32 CPU tensor");
  TORCH_CHECK(uniforms_in.dim() == 1 && uniforms_in.size(0) == probs_in.size(0) &&
                  uniforms_in.scalar_type() == torch::kDouble && uniforms_in.device().is_cpu(),
              "inverse_cdf: uniforms must be a (rows,) float64 CPU tensor");
  TORCH_CHECK(probs_in.size(1) > 0, "inverse_cdf: probs must hold at least one token");
  const auto probs = probs_in.contiguous(), uniforms = uniforms_in.contiguous();
  const int64_t rows = probs.size(0), vocab = probs.size(1);
  auto tokens = torch::empty({rows}, torch::dtype(torch::kLong));
  for (int64_t r = 0; r < rows; ++r)
    tokens.data_ptr<int64_t>()[r] =
        inverse_cdf_row(probs.data_ptr<float>() + r * vocab, vocab, uniforms.data_ptr<double>()[r]);
  return tokens;
}
