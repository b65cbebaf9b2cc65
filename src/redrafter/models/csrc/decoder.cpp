// A native forward's decoder layers in one call, for a bf16 model whose linear weights all run
// int4_mm and whose attention runs cache_attention (NativeTarget.forward's fused path).
//
// Each layer makes the calls NativeTarget.forward makes from Python, in the same order and on the same
// tensors: RMSNorm, q|k|v product (+ bias), rotary and cache write, attention, o product + residual,
// RMSNorm, gate|up product, SiLU x up, down product + residual. So the result is the same, bit for bit;
// what goes is about ten Python-level calls per layer (about 1 ms of a 5 ms decoding step of
// SmolLM2's 30 layers, docs/PERFORMANCE.md).
#include <torch/extension.h>
#include <vector>

torch::Tensor int4_mm(const torch::Tensor& x, const torch::Tensor& wq, const torch::Tensor& sm);
torch::Tensor cache_attention(const torch::Tensor& q, const torch::Tensor& kv, int64_t layer, int64_t span,
                              const torch::Tensor& allowed, double scale);
torch::Tensor rope_store(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& signed_sin,
                         torch::Tensor kv, int64_t layer, const torch::Tensor& slots, int64_t heads, int64_t kv_heads);
torch::Tensor silu_mul(const torch::Tensor& gate_up);
torch::Tensor rms_norm_bf16(const torch::Tensor& x, const torch::Tensor& weight, double eps);

namespace {

constexpr int kPerLayer = 14;  // tensors per layer in `weights` (see decoder_layers)

// x (rows, in) -> (rows, out) through a packed 4-bit weight, plus its bias when it has one (an empty
// tensor: none), as Linear does: y = x W^T, then y + bias.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& wq, const torch::Tensor& sm, const torch::Tensor& bias) {
  torch::Tensor y = int4_mm(x, wq, sm);
  return bias.numel() ? y + bias : y;
}

}  // namespace

// x (B, n, H) bf16 contiguous: the embedded tokens. weights: per layer, in order, the input norm's
// weight, q|k|v (packed, scales, bias), o (packed, scales, bias), the post-attention norm's weight,
// gate|up (packed, scales, bias), down (packed, scales, bias); a bias is an empty tensor when the
// layer has none. eps per layer. cos, signed_sin, kv, slots, heads, kv_heads: as rope_store; span,
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
    torch::Tensor h = rms_norm_bf16(x, w[0], eps[i]);
    torch::Tensor qkv = linear(h.view({rows, hidden}), w[1], w[2], w[3]);
    torch::Tensor q = rope_store(qkv.view({batch, n, qkv.size(1)}), cos, signed_sin, kv, i, slots, heads, kv_heads);
    torch::Tensor attn = cache_attention(q, kv, i, span, allowed, scale);
    x = x + linear(attn.view({rows, attn.size(2) * attn.size(3)}), w[4], w[5], w[6]).view({batch, n, hidden});
    h = rms_norm_bf16(x, w[7], eps[i]);
    torch::Tensor gate_up = linear(h.view({rows, hidden}), w[8], w[9], w[10]);
    x = x + linear(silu_mul(gate_up), w[11], w[12], w[13]).view({batch, n, hidden});
  }
  return x;
}
