// The drafter's whole beam search in one call, for a drafter whose linear layers all run our int4
// products (drafter/model.py ``inference_copy``): bf16 with int4_mm in the AVX-512 extension, float32
// with mm_f32 in the AVX2 one (csrc/avx2), which builds this file too. drafter/beam_search.py's loop runs about 15
// tensor operations per depth from Python; after the target's forward has streamed its weights
// through the caches, each of them starts cold (docs/PERFORMANCE.md). This is the same loop, with the
// same products and the same roundings, so its results equal the Python loop's bit for bit
// (tests/test_beam_search.py): it covers the search without log q (greedy drafting), with or without
// min_prob (the same nodes as the loop, for fewer drafter rows).
// ``draft_step`` is one depth of the same drafter, for the loop that draws sampled drafts.
#include <torch/extension.h>
#include <cstdint>
#include <limits>
#include <vector>

#include "draft.h"

#if defined(__AVX512F__) && !defined(REDRAFTER_AVX2)
torch::Tensor int4_mm(const torch::Tensor& x, const torch::Tensor& wq, const torch::Tensor& sm);
#else
torch::Tensor mm_f32(const torch::Tensor& x, const torch::Tensor& wq, const torch::Tensor& sm);
#endif

namespace {

#if defined(__AVX512F__) && !defined(REDRAFTER_AVX2)
constexpr auto kDraftType = torch::kBFloat16;  // the drafter's activations and the embedding table
constexpr const char* kDraftTypeName = "bfloat16";
torch::Tensor draft_mm(const torch::Tensor& x, const torch::Tensor& wq, const torch::Tensor& sm) { return int4_mm(x, wq, sm); }
#else
constexpr auto kDraftType = torch::kFloat;
constexpr const char* kDraftTypeName = "float32";
torch::Tensor draft_mm(const torch::Tensor& x, const torch::Tensor& wq, const torch::Tensor& sm) { return mm_f32(x, wq, sm); }
#endif

constexpr int64_t kNoToken = -1;  // tree.NO_TOKEN

struct Layer {
  torch::Tensor packed, scales, bias;  // bias undefined when the layer has none
  torch::Tensor operator()(const torch::Tensor& x) const {  // models.base.Linear's int4 path: y + bias
    auto y = draft_mm(x, packed, scales);
    return bias.defined() ? y + bias : y;
  }
};

std::vector<Layer> make_layers(const std::vector<torch::Tensor>& packed, const std::vector<torch::Tensor>& scales,
                               const std::vector<torch::Tensor>& biases, bool has_input_proj) {
  const size_t num_layers = packed.size();
  TORCH_CHECK(scales.size() == num_layers && biases.size() == num_layers && num_layers >= (has_input_proj ? 4u : 3u),
              "draft_search: one packed weight, scales and bias per layer");
  std::vector<Layer> layers(num_layers);
  for (size_t i = 0; i < num_layers; ++i)
    layers[i] = {packed[i], scales[i], biases[i].numel() ? biases[i] : torch::Tensor()};
  return layers;
}

// Drafter.logits: z = input_proj(concat[h, s]); z = z + SiLU(block(z)); the projection.
torch::Tensor drafter_logits(const std::vector<Layer>& layers, bool has_input_proj, const torch::Tensor& hs,
                             const torch::Tensor& state) {
  const size_t first_block = has_input_proj ? 3 : 2, head = layers.size() - 1;
  auto z = torch::cat({hs, state}, -1);
  if (has_input_proj) z = layers[2](z);
  for (size_t i = first_block; i < head; ++i) z = z + torch::silu(layers[i](z));
  return layers[head](z);
}

// Drafter.next_state from `state` (undefined: s_0 = 0, where rnn_u(s_0) is its bias) and the embeddings
// of `ids`: SiLU(rnn_w(E(ids)) + rnn_u(state)).
torch::Tensor next_state(const std::vector<Layer>& layers, const torch::Tensor& embedding, const torch::Tensor& ids,
                         const torch::Tensor& state) {
  const Layer& rnn_w = layers[0];
  const Layer& rnn_u = layers[1];
  auto pre = rnn_w(embedding.index_select(0, ids));
  if (!state.defined()) return torch::silu(rnn_u.bias.defined() ? pre + rnn_u.bias : pre);
  return torch::silu(pre + rnn_u(state));
}

}  // namespace

// One depth of the drafter for R rows (engine.propose_sampled's loop body before its sampling
// transform): the next RNN state from the rows' state (empty: s_0 = 0) and the embedding of `ids` (R,),
// then the logits over the draft vocabulary. context (R, H) in the drafter's dtype. Returns {state (R, H), logits (R, V_d)},
// equal to Drafter.next_state and Drafter.logits on the same int4 copy, bit for bit.
std::vector<torch::Tensor> draft_step(const torch::Tensor& context, const torch::Tensor& state_in, const torch::Tensor& ids,
                                      const torch::Tensor& embedding, const std::vector<torch::Tensor>& packed,
                                      const std::vector<torch::Tensor>& scales, const std::vector<torch::Tensor>& biases,
                                      bool has_input_proj) {
  TORCH_CHECK(context.device().is_cpu() && context.dim() == 2 && context.scalar_type() == kDraftType,
              std::string("draft_step: context must be a (rows, H) ") + kDraftTypeName + " CPU tensor");
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) == context.size(0) && ids.scalar_type() == torch::kLong,
              "draft_step: ids must be (rows,) int64");
  TORCH_CHECK(state_in.numel() == 0 || state_in.sizes() == context.sizes(), "draft_step: state must be empty or like context");
  TORCH_CHECK(embedding.dim() == 2 && embedding.scalar_type() == kDraftType && embedding.size(1) == context.size(1),
              std::string("draft_step: embedding must be a (V, H) ") + kDraftTypeName + " table");
  const auto layers = make_layers(packed, scales, biases, has_input_proj);
  const auto state = next_state(layers, embedding, ids, state_in.numel() ? state_in.contiguous() : torch::Tensor());
  return {state, drafter_logits(layers, has_input_proj, context.contiguous(), state)};
}

// context (B, H) in the drafter's dtype: the target's hidden state h; g0 (B,) int64; embedding (V, H) the same: the target's
// table E. packed / scales / biases: the drafter's int4 layers in the order rnn_w, rnn_u, input_proj (when
// has_input_proj), the residual blocks, the vocabulary projection (biases: an empty tensor for none).
// draft_to_target (V_d,) int64, or empty when the draft vocabulary is the target's.
// min_log_prob (-inf for none): the floor of beam_search's min_prob. A beam whose summed log q is below
// it has no child above it (scores never rise along a path), so with keep_pruned each depth runs the
// drafter only on the beams at or above the floor (the others are not extended). As in the loop, the
// search stops before the first depth whose best new node of every row is below the floor, and every
// node below the floor comes back NO_TOKEN: the nodes the loop keeps, for fewer drafter rows.
// Returns {beams (B, W', L) int64, scores (B, W) float32, path_scores (B, W', L) float32} as beam_search
// returns them: W' = W, or W * (L - 1) with keep_pruned (every shallower depth's beams after the W);
// positions past an early stop are NO_TOKEN with path score -inf.
std::vector<torch::Tensor> draft_search(const torch::Tensor& context, const torch::Tensor& g0,
                                        const torch::Tensor& embedding, const std::vector<torch::Tensor>& packed,
                                        const std::vector<torch::Tensor>& scales,
                                        const std::vector<torch::Tensor>& biases, const torch::Tensor& draft_to_target,
                                        bool has_input_proj, int64_t width, int64_t length, bool keep_pruned,
                                        double min_log_prob) {
  TORCH_CHECK(context.device().is_cpu() && context.dim() == 2 && context.scalar_type() == kDraftType,
              std::string("draft_search: context must be a (batch, H) ") + kDraftTypeName + " CPU tensor");
  TORCH_CHECK(g0.dim() == 1 && g0.size(0) == context.size(0) && g0.scalar_type() == torch::kLong,
              "draft_search: g0 must be (batch,) int64");
  TORCH_CHECK(embedding.dim() == 2 && embedding.scalar_type() == kDraftType &&
                  embedding.size(1) == context.size(1),
              std::string("draft_search: embedding must be a (V, H) ") + kDraftTypeName + " table");
  TORCH_CHECK(width >= 1 && length >= 1, "draft_search: width and length must be positive");
  const auto layers = make_layers(packed, scales, biases, has_input_proj);
  const bool mapped = draft_to_target.numel() > 0;
  const int64_t* to_target = mapped ? draft_to_target.data_ptr<int64_t>() : nullptr;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const bool floored = min_log_prob > -std::numeric_limits<double>::infinity();
  const float floor = (float)min_log_prob;
  // Extend only the beams at or above the floor where every depth's beams are returned (keep_pruned):
  // without them, a kept node can be the prefix of a beam below the floor that the loop extends, and
  // it stays only as long as that beam does.
  const bool prune = floored && keep_pruned;

  const int64_t batch = context.size(0);
  const auto h = context.contiguous();
  const auto ids = g0.contiguous();

  // Beams and their path scores per (row, beam, position); beams grow one position per depth.
  std::vector<int64_t> beams(batch * width), next_beams;
  std::vector<float> paths(batch * width, 0.f), next_paths;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t w = 0; w < width; ++w) beams[b * width + w] = ids.data_ptr<int64_t>()[b];
  std::vector<std::vector<int64_t>> shallow_beams;  // keep_pruned: each depth's beams before the last
  std::vector<std::vector<float>> shallow_paths;
  auto scores = torch::empty({batch, width}, torch::kFloat);
  torch::Tensor state;  // (batch * width, H): each beam's RNN state, after depth 1
  std::vector<int64_t> source;  // the beams the drafter runs on at this depth, `rows` per batch row
  int64_t len = 1;
  for (int64_t depth = 1; depth < length; ++depth) {
    torch::Tensor logits, row_scores, sub_state;
    int64_t rows_per_batch;
    if (depth == 1) {  // every beam is g0 alone: one row per batch row, from s_0
      rows_per_batch = 1;
      source.resize(batch);
      for (int64_t b = 0; b < batch; ++b) source[b] = b * width;
      sub_state = next_state(layers, embedding, ids, torch::Tensor());  // (batch, H)
      logits = drafter_logits(layers, has_input_proj, h, sub_state).view({batch, 1, -1});
      TORCH_CHECK(logits.size(2) >= width, "draft_search: the draft vocabulary must hold at least W tokens");
      row_scores = torch::zeros({batch, 1}, torch::kFloat);
    } else {
      // The beams at or above the floor (all of them without one), padded per batch row to the
      // largest count with a beam that is not extended (score -inf).
      const float* s = scores.data_ptr<float>();
      std::vector<int64_t> count(batch, 0);
      rows_per_batch = 0;
      for (int64_t b = 0; b < batch; ++b) {
        for (int64_t w = 0; w < width; ++w) count[b] += !prune || s[b * width + w] >= floor;
        rows_per_batch = std::max(rows_per_batch, count[b]);
      }
      if (rows_per_batch == 0) break;  // no beam of any row reaches the floor: nothing deeper is kept
      source.assign(batch * rows_per_batch, 0);
      row_scores = torch::full({batch, rows_per_batch}, neg_inf, torch::kFloat);
      float* rs = row_scores.data_ptr<float>();
      auto last = torch::empty({batch * rows_per_batch}, torch::kLong);
      auto state_rows = torch::empty({batch * rows_per_batch}, torch::kLong);
      for (int64_t b = 0; b < batch; ++b) {
        int64_t j = 0;
        for (int64_t w = 0; w < width; ++w)
          if (!prune || s[b * width + w] >= floor) source[b * rows_per_batch + j++] = b * width + w;
        for (; j < rows_per_batch; ++j) source[b * rows_per_batch + j] = b * width;  // padding, score -inf
        for (j = 0; j < rows_per_batch; ++j) {
          const int64_t r = source[b * rows_per_batch + j];
          if (j < count[b]) rs[b * rows_per_batch + j] = s[r];
          last.data_ptr<int64_t>()[b * rows_per_batch + j] = beams[r * len + len - 1];
          state_rows.data_ptr<int64_t>()[b * rows_per_batch + j] = r;
        }
      }
      bool every_beam = true;  // then the rows are the beams in order, and the states are already in place
      for (int64_t b = 0; b < batch; ++b) every_beam = every_beam && count[b] == width;
      sub_state = next_state(layers, embedding, last, every_beam ? state : state.index_select(0, state_rows));
      logits = drafter_logits(layers, has_input_proj, h.repeat_interleave(rows_per_batch, 0), sub_state)
                   .view({batch, rows_per_batch, -1});
    }
    auto picked = beam_select(logits, row_scores, width);
    const float* top = picked[0].data_ptr<float>();
    const int64_t* parent = picked[1].data_ptr<int64_t>();
    const int64_t* index = picked[2].data_ptr<int64_t>();
    if (floored) {  // the loop's stop: no row's best new node reaches the floor, so this depth is not kept
      bool any = false;
      for (int64_t b = 0; b < batch && !any; ++b) any = top[b * width] >= floor;
      if (!any) break;
    }
    if (keep_pruned && depth > 1) shallow_beams.push_back(beams), shallow_paths.push_back(paths);
    next_beams.assign(batch * width * (len + 1), 0);
    next_paths.assign(batch * width * (len + 1), 0.f);
    auto rows = torch::empty({batch * width}, torch::kLong);  // each new beam's row of sub_state
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t w = 0; w < width; ++w) {
        const int64_t r = b * width + w, sub = b * rows_per_batch + parent[r], p = source[sub];
        for (int64_t k = 0; k < len; ++k)
          next_beams[r * (len + 1) + k] = beams[p * len + k], next_paths[r * (len + 1) + k] = paths[p * len + k];
        next_beams[r * (len + 1) + len] = mapped ? to_target[index[r]] : index[r];
        next_paths[r * (len + 1) + len] = top[r];
        rows.data_ptr<int64_t>()[r] = sub;
      }
    beams.swap(next_beams), paths.swap(next_paths);
    ++len;
    scores = picked[0];
    state = sub_state.index_select(0, rows);
  }

  // The W beams, then each shallower depth's (deepest first), padded with NO_TOKEN and -inf to L positions.
  const int64_t groups = 1 + (int64_t)shallow_beams.size(), rows_out = groups * width;
  auto out_beams = torch::full({batch, rows_out, length}, kNoToken, torch::kLong);
  auto out_paths = torch::full({batch, rows_out, length}, neg_inf, torch::kFloat);
  int64_t* ob = out_beams.data_ptr<int64_t>();
  float* op = out_paths.data_ptr<float>();
  for (int64_t g = 0; g < groups; ++g) {
    const std::vector<int64_t>& gb = g == 0 ? beams : shallow_beams[shallow_beams.size() - g];
    const std::vector<float>& gp = g == 0 ? paths : shallow_paths[shallow_paths.size() - g];
    const int64_t glen = (int64_t)gb.size() / (batch * width);
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t w = 0; w < width; ++w)
        for (int64_t k = 0; k < glen; ++k) {
          const int64_t o = (b * rows_out + g * width + w) * length + k;
          const float v = gp[(b * width + w) * glen + k];
          op[o] = v;
          ob[o] = floored && !(v >= floor) ? kNoToken : gb[(b * width + w) * glen + k];  // tree.drop_below
        }
  }
  if (len == 1) {  // nothing drafted: scores are 0 for beam 0 and -inf for the rest, as beam_search's
    scores.fill_(neg_inf);
    scores.select(1, 0).fill_(0.f);
  }
  return {out_beams, scores, out_paths};
}
