// A native forward's decoder layers in one call, for a bf16 model whose linear weights all run
// int4_mm or int8_mm and whose attention runs cache_attention (NativeTarget.forward's fused path).
//
// Each layer makes the calls NativeTarget.forward makes from Python, in the same order and on the same
// tensors: RMSNorm, q|k|v product (+ bias), rotary and cache write, attention, o product + residual,
// RMSNorm, gate|up product, SiLU x up, down product + residual. So the result is the same, bit for bit;
// what goes is about ten Python-level calls per layer (about 1 ms of a 5 ms decoding step of
// SmolLM2's 30 layers, docs/PERFORMANCE.md).
#include <torch/extension.h>
#include <vector>

torch::Tensor int4_mm(const torch::Tensor& x, const torch::Tensor& wq, const torch::Tensor& sm);
torch::Tensor int8_mm(const torch::Tensor& x, const torch::Tensor& wq, const torch::Tensor& sm);
torch::Tensor mixed_mm(const torch::Tensor& x, const std::vector<torch::Tensor>& wqs, const std::vector<torch::Tensor>& sms);
torch::Tensor cache_attention(const torch::Tensor& q, const torch::Tensor& kv, int64_t layer, int64_t span,
                              const torch::Tensor& allowed, double scale);
torch::Tensor rope_store(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& signed_sin,
                         torch::Tensor kv, int64_t layer, const torch::Tensor& slots, int64_t heads, int64_t kv_heads);
torch::Tensor silu_mul(const torch::Tensor& gate_up);
torch::Tensor rms_norm_bf16(const torch::Tensor& x, const torch::Tensor& weight, double eps);

namespace {

constexpr int kParts = 3;                        // packed parts of a linear weight, at most (mixed_mm)
constexpr int kPerLinear = 2 * kParts + 1;       // (packed, scales) per part, then the bias
constexpr int kPerLayer = 2 + 4 * kPerLinear;   // tensors per layer in `weights` (see decoder_layers)

// x (rows, in) -> (rows, out) through a linear weight's packed parts (w[0..2 kParts), (packed, scales)
// pairs, an empty packed tensor for an unused part): one part, 4-bit (pack_weight: 32 bytes per quad of
// inputs) or 8-bit (pack_weight8: 64 bytes), or several whose output features follow each other
// (mixed_mm); plus the bias when it has one (w[2 kParts], an empty tensor: none), as Linear does:
// y = x W^T, then y + bias.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor* w) {
  torch::Tensor y;
  if (!w[2].numel()) {  // one part
    y = w[0].size(2) == 64 ? int8_mm(x, w[0], w[1]) : int4_mm(x, w[0], w[1]);
  } else {
    std::vector<torch::Tensor> wqs, sms;
    for (int p = 0; p < kParts && w[2 * p].numel(); ++p) {
      wqs.push_back(w[2 * p]);
      sms.push_back(w[2 * p + 1]);
    }
    y = mixed_mm(x, wqs, sms);
  }
  const torch::Tensor& bias = w[2 * kParts];
  return bias.numel() ? y + bias : y;
}

}  // namespace

// x (B, n, H) bf16 contiguous: the embedded tokens. weights: per layer, in order, the input norm's
// weight, the post-attention norm's weight, then q|k|v, o, gate|up and down, each as kPerLinear
// tensors (see linear: up to kParts (packed, scales) pairs, then the bias; an empty tensor for a part
// or bias the weight does not have). eps per layer. cos, signed_sin, kv, slots, heads, kv_heads: as rope_store; span,
// allowed, scale: as cache_attention. Returns x after the last layer (B, n, H), before the final norm.
torch::Tensor decoder_layers(torch::Tensor x, const std::vector<torch::Tensor>& weights, const std::vector<double>& eps,
                             const torch::Tensor& cos, const torch::Tensor& signed_sin, torch::Tensor kv,
                             const torch::Tensor& slots, int64_t heads, int64_t kv_heads, int64_t span,
                             const torch::Tensor& allowed, double scale) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && x.scalar_type() == torch::kBFloat16,
              "decoder_layers: x must be contiguous (B, n, H) bf16");
  const int64_t layers = (int64_t)eps.size();
  TORCH_CHECK((int64_t)weights.size() == kPerLayer * layers, "decoder_layers: ", kPerLayer, " tensors per layer, got ",
              weights.size(), " for ", layers, " layers");
  TORCH_CHECK(kv.dim() == 6 && kv.size(0) == layers, "decoder_layers: the cache holds ", kv.size(0), " layers, not ", layers);
  const int64_t batch = x.size(0), n = x.size(1), hidden = x.size(2), rows = batch * n;
  for (int64_t i = 0; i < layers; ++i) {
    const torch::Tensor* w = weights.data() + kPerLayer * i;
    const torch::Tensor *qkv_w = w + 2, *o_w = qkv_w + kPerLinear, *gate_up_w = o_w + kPerLinear,
                        *down_w = gate_up_w + kPerLinear;
    torch::Tensor h = rms_norm_bf16(x, w[0], eps[i]);
    torch::Tensor qkv = linear(h.view({rows, hidden}), qkv_w);
    torch::Tensor q = rope_store(qkv.view({batch, n, qkv.size(1)}), cos, signed_sin, kv, i, slots, heads, kv_heads);
    torch::Tensor attn = cache_attention(q, kv, i, span, allowed, scale);
    x = x + linear(attn.view({rows, attn.size(2) * attn.size(3)}), o_w).view({batch, n, hidden});
    h = rms_norm_bf16(x, w[1], eps[i]);
    torch::Tensor gate_up = linear(h.view({rows, hidden}), gate_up_w);
    x = x + linear(silu_mul(gate_up), down_w).view({batch, n, hidden});
  }
  return x;
}
