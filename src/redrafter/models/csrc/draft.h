// The drafter's search of csrc/beam_select.cpp and csrc/draft_search.cpp, which both extensions build
// (AVX-512 with bf16 activations: bindings.cpp; AVX2 with float32 ones: avx2/gemm_f32.cpp) and bind
// under the same names.
#pragma once
#include <torch/extension.h>
#include <vector>

std::vector<torch::Tensor> beam_select(const torch::Tensor& logits, const torch::Tensor& scores, int64_t width);
std::vector<torch::Tensor> draft_search(const torch::Tensor& context, const torch::Tensor& g0,
                                        const torch::Tensor& embedding, const std::vector<torch::Tensor>& packed,
                                        const std::vector<torch::Tensor>& scales,
                                        const std::vector<torch::Tensor>& biases, const torch::Tensor& draft_to_target,
                                        bool has_input_proj, int64_t width, int64_t length, bool keep_pruned,
                                        double min_log_prob);
std::vector<torch::Tensor> draft_step(const torch::Tensor& context, const torch::Tensor& state, const torch::Tensor& ids,
                                      const torch::Tensor& embedding, const std::vector<torch::Tensor>& packed,
                                      const std::vector<torch::Tensor>& scales, const std::vector<torch::Tensor>& biases,
                                      bool has_input_proj);

// Binds them into module m.
inline void bind_draft(pybind11::module_& m) {
  m.def("beam_select", &beam_select, "one depth of the drafter's beam search after its logits");
  m.def("draft_search", &draft_search, "the drafter's beam search in one call (int4 layers; min_prob prunes and drops)");
  m.def("draft_step", &draft_step, "one depth of the drafter (next state and logits) in one call (int4 layers)");
}
