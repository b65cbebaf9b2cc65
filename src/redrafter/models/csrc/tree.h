// The tree bookkeeping of csrc/tree.cpp, which both extensions build (AVX-512: bindings.cpp; AVX2:
// avx2/gemm_f32.cpp) and bind under the same names.
#pragma once
#include <torch/extension.h>
#include <vector>

torch::Tensor cap_tree_scored(const torch::Tensor& beams, const torch::Tensor& path_scores, int64_t max_tokens);
torch::Tensor cap_tree_joined(const torch::Tensor& beams_a, const torch::Tensor& scores_a, const torch::Tensor& beams_b,
                              const torch::Tensor& scores_b, double min_log_prob, int64_t max_tokens,
                              double sure_log_prob, int64_t most_tokens);
std::vector<torch::Tensor> pack_tree(const torch::Tensor& beams);
std::vector<torch::Tensor> greedy_accept(const torch::Tensor& beams, const torch::Tensor& unpacker,
                                         const torch::Tensor& logits);
std::vector<torch::Tensor> sampled_accept(const torch::Tensor& beams, const torch::Tensor& unpacker,
                                          const torch::Tensor& probs, const torch::Tensor& draft_probs,
                                          const torch::Tensor& draft_map, const torch::Tensor& uniforms,
                                          bool distinct);
torch::Tensor inverse_cdf(const torch::Tensor& probs, const torch::Tensor& uniforms);

// Binds them into module m.
inline void bind_tree(pybind11::module_& m) {
  m.def("cap_tree_scored", &cap_tree_scored, "tree.node_scores then tree.cap_tree in one call");
  m.def("cap_tree_joined", &cap_tree_joined, "lookup.joined_tree: two beam sets joined, floored and capped in one call");
  m.def("pack_tree", &pack_tree, "tree.pack in one call");
  m.def("greedy_accept", &greedy_accept, "verify.tree_accept's greedy walk in one call");
  m.def("sampled_accept", &sampled_accept, "verify.tree_accept's sampling walk in one call", pybind11::arg("beams"),
        pybind11::arg("unpacker"), pybind11::arg("probs"), pybind11::arg("draft_probs"), pybind11::arg("draft_map"),
        pybind11::arg("uniforms"), pybind11::arg("distinct") = false);
  m.def("inverse_cdf", &inverse_cdf, "sampling.inverse_cdf for (rows, V) float32 weights and (rows,) float64 uniforms");
}
