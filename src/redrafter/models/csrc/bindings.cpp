// The Python module of our CPU kernels (loaded by models/kernels.py).
#include <torch/extension.h>
#include <vector>

#include "draft.h"
#include "tree.h"

torch::Tensor int4_mm(const torch::Tensor& x, const torch::Tensor& wq, const torch::Tensor& sm);
std::vector<torch::Tensor> pack_weight(const torch::Tensor& q, const torch::Tensor& step, const torch::Tensor& low);
torch::Tensor int8_mm(const torch::Tensor& x, const torch::Tensor& wq, const torch::Tensor& sm);
torch::Tensor mixed_mm(const torch::Tensor& x, const std::vector<torch::Tensor>& wqs, const std::vector<torch::Tensor>& sms);
std::vector<torch::Tensor> pack_weight8(const torch::Tensor& q, const torch::Tensor& d);
torch::Tensor tree_attention(const torch::Tensor& q, const torch::Tensor& keys, const torch::Tensor& values,
                             const torch::Tensor& allowed, double scale);
torch::Tensor cache_attention(const torch::Tensor& q, const torch::Tensor& kv, int64_t layer, int64_t span,
                              const torch::Tensor& allowed, double scale);
torch::Tensor rope_store(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& signed_sin,
                         torch::Tensor kv, int64_t layer, const torch::Tensor& slots, int64_t heads, int64_t kv_heads);
torch::Tensor silu_mul(const torch::Tensor& gate_up);
torch::Tensor bf16_mm(const torch::Tensor& x, const torch::Tensor& wp);
torch::Tensor rms_norm_bf16(const torch::Tensor& x, const torch::Tensor& weight, double eps);
torch::Tensor decoder_layers(torch::Tensor x, const std::vector<torch::Tensor>& weights, const std::vector<double>& eps,
                             const torch::Tensor& cos, const torch::Tensor& signed_sin, torch::Tensor kv,
                             const torch::Tensor& slots, int64_t heads, int64_t kv_heads, int64_t span,
                             const torch::Tensor& allowed, double scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  bind_tree(m);
  bind_draft(m);  // csrc/draft.h
  m.def("int4_mm", &int4_mm, "bf16 rows x 4-bit weight (one pass over the weight)");
  m.def("pack_weight", &pack_weight, "pack a 4-bit weight for int4_mm");
  m.def("int8_mm", &int8_mm, "bf16 rows x 8-bit (Q8_0) weight (one pass over the weight)");
  m.def("pack_weight8", &pack_weight8, "pack an 8-bit weight for int8_mm");
  m.def("mixed_mm", &mixed_mm, "bf16 rows x a weight in parts of 4- and 8-bit output features");
  m.def("tree_attention", &tree_attention, "attention of a few new tokens per row over a cache, with a mask");
  m.def("cache_attention", &cache_attention, "tree_attention over one layer of a whole cache");
  m.def("rope_store", &rope_store, "rotary embedding of q and k, and the cache write of k and v, in one call");
  m.def("silu_mul", &silu_mul, "F.silu(gate) * up of a gate|up projection in one call");
  m.def("bf16_mm", &bf16_mm, "bf16 rows x bf16 weight packed in pairs (one pass over the weight)");
  m.def("rms_norm_bf16", &rms_norm_bf16, "transformers' RMSNorm of bf16 rows in one call");
  m.def("decoder_layers", &decoder_layers, "a native forward's decoder layers (int4 products, our attention) in one call");
}
