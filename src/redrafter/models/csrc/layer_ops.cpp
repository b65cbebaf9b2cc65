// Two of a decoder layer's pointwise steps, each in one call (bf16):
//
// rope_store: the rotary embedding of the q and k heads and the cache write of k and v.
// In PyTorch this is a multiply, a roll, an addcmul, two transposes and two indexed copies per layer
// (about 30 us of per-call work per layer for one new token, almost none of it arithmetic). Here one
// loop reads the q|k|v projection once, rotates q and k, writes the rotated k and the plain v into the
// cache at each token's slot, and returns the rotated q as (batch, n, heads, head_dim).
//
// Rounding is that of the tensor version, bit for bit (tests/test_cpu_kernels.py): with bf16 inputs
//   t = bf16(x * cos),  out = bf16(t + x_rolled * signed_sin)
// where x_rolled[d] = x[(d + D/2) mod D] and signed_sin = [-sin[:D/2], sin[D/2:]]. The product of two
// bf16 values is exact in float32, so whether the compiler fuses the last multiply-add changes nothing.
//
// silu_mul: F.silu(gate) * up for the MLP, gate and up the two halves of one gate|up projection. In
// PyTorch a chunk, a SiLU and a multiply (two roundings to bf16, kept here):
//   out = bf16(bf16(silu(g)) * u),  silu(g) = g / (1 + exp(-g)) in float32,
// with our exp (vec.h) where torch uses SLEEF's: the float32 SiLU can differ in its last bit, and so,
// rarely, can the bf16 it rounds to (tests/test_cpu_kernels.py bounds both).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>

#include "vec.h"

namespace {

using redrafter_vec::exp16;
using redrafter_vec::load16;
using redrafter_vec::store16;

inline float widen(at::BFloat16 v) { return static_cast<float>(v); }
inline float round_bf16(float v) { return static_cast<float>(static_cast<at::BFloat16>(v)); }

// Rotate one head of D values: out[d] = bf16(bf16(x[d] cos[d]) + x[(d + D/2) % D] signed_sin[d]).
inline void rotate(const at::BFloat16* x, const at::BFloat16* cos, const at::BFloat16* ssin, at::BFloat16* out,
                   int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t d = 0; d < dim; ++d) {
    const float t = round_bf16(widen(x[d]) * widen(cos[d]));
    const int64_t partner = d < half ? d + half : d - half;
    out[d] = static_cast<at::BFloat16>(t + widen(x[partner]) * widen(ssin[d]));
  }
}

inline float silu_scalar(float g) { return g / (1.f + std::exp(-g)); }

void silu_mul_row(const at::BFloat16* gate, const at::BFloat16* up, at::BFloat16* out, int64_t width) {
  int64_t d = 0;
  for (; d + 16 <= width; d += 16) {
    const __m512 g = load16(gate + d);
    const __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    store16(out + d, _mm512_mul_ps(redrafter_vec::round_bf16(s), load16(up + d)));  // bf16(bf16(silu(g)) u)
  }
  for (; d < width; ++d) out[d] = static_cast<at::BFloat16>(round_bf16(silu_scalar(widen(gate[d]))) * widen(up[d]));
}

}  // namespace

// qkv (B, n, (H + 2 KV) D) bf16, last dimension contiguous: q heads, then k heads, then v heads.
// cos, signed_sin (B, n, D) bf16, last dimension contiguous. kv (layers, 2, B, KV, capacity, D) bf16,
// last dimension contiguous: layer `layer`'s keys (index 0) and values (1) are written at
// slots (B, n) int64 (each in [0, capacity)). Returns the rotated q, (B, n, H, D) contiguous.
torch::Tensor rope_store(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& signed_sin,
                         torch::Tensor kv, int64_t layer, const torch::Tensor& slots, int64_t heads, int64_t kv_heads) {
  TORCH_CHECK(qkv.device().is_cpu() && cos.device().is_cpu() && signed_sin.device().is_cpu() && kv.device().is_cpu() &&
                  slots.device().is_cpu(),
              "rope_store runs on CPU tensors");
  TORCH_CHECK(qkv.scalar_type() == torch::kBFloat16 && cos.scalar_type() == torch::kBFloat16 &&
                  signed_sin.scalar_type() == torch::kBFloat16 && kv.scalar_type() == torch::kBFloat16,
              "rope_store: qkv, cos, signed_sin and kv must be bfloat16");
  TORCH_CHECK(slots.scalar_type() == torch::kLong, "rope_store: slots must be int64");
  TORCH_CHECK(qkv.dim() == 3 && cos.dim() == 3 && signed_sin.dim() == 3 && kv.dim() == 6 && slots.dim() == 2,
              "rope_store: qkv, cos, signed_sin (B, n, .), kv (layers, 2, B, KV, capacity, D), slots (B, n)");
  const int64_t batch = qkv.size(0), n = qkv.size(1), dim = kv.size(5), capacity = kv.size(4);
  TORCH_CHECK(heads > 0 && kv_heads > 0 && dim % 2 == 0, "rope_store: positive head counts and an even head size");
  TORCH_CHECK(qkv.size(2) == (heads + 2 * kv_heads) * dim, "rope_store: qkv's last dimension must be (heads + 2 kv_heads) D");
  TORCH_CHECK(cos.size(0) == batch && cos.size(1) == n && cos.size(2) == dim && signed_sin.sizes() == cos.sizes(),
              "rope_store: cos and signed_sin must be (B, n, D)");
  TORCH_CHECK(0 <= layer && layer < kv.size(0) && kv.size(1) == 2 && kv.size(2) == batch && kv.size(3) == kv_heads,
              "rope_store: kv must be (layers, 2, B, KV, capacity, D) with this layer");
  TORCH_CHECK(slots.size(0) == batch && slots.size(1) == n, "rope_store: slots must be (B, n)");
  TORCH_CHECK(qkv.stride(2) == 1 && cos.stride(2) == 1 && signed_sin.stride(2) == 1 && kv.stride(5) == 1,
              "rope_store: the last dimensions must be contiguous");
  const auto slot = slots.contiguous();
  const int64_t* sp = slot.data_ptr<int64_t>();
  for (int64_t i = 0; i < batch * n; ++i)
    TORCH_CHECK(0 <= sp[i] && sp[i] < capacity, "rope_store: slot ", sp[i], " outside the cache's ", capacity);

  auto q = torch::empty({batch, n, heads, dim}, qkv.options());
  const at::BFloat16* x = qkv.data_ptr<at::BFloat16>();
  const at::BFloat16* c = cos.data_ptr<at::BFloat16>();
  const at::BFloat16* s = signed_sin.data_ptr<at::BFloat16>();
  at::BFloat16* qp = q.data_ptr<at::BFloat16>();
  at::BFloat16* cache = kv.data_ptr<at::BFloat16>() + layer * kv.stride(0);
  const int64_t kv_half = kv.stride(1), kv_b = kv.stride(2), kv_h = kv.stride(3), kv_j = kv.stride(4);
  // A decoding step or a tree is a few tokens: one thread; a prefill spreads its tokens over all.
  at::parallel_for(0, batch * n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / n, i = t % n;
      const at::BFloat16* row = x + b * qkv.stride(0) + i * qkv.stride(1);
      const at::BFloat16* cr = c + b * cos.stride(0) + i * cos.stride(1);
      const at::BFloat16* sr = s + b * signed_sin.stride(0) + i * signed_sin.stride(1);
      for (int64_t h = 0; h < heads; ++h) rotate(row + h * dim, cr, sr, qp + ((b * n + i) * heads + h) * dim, dim);
      at::BFloat16* slot_k = cache + b * kv_b + sp[t] * kv_j;
      for (int64_t h = 0; h < kv_heads; ++h) {
        rotate(row + (heads + h) * dim, cr, sr, slot_k + h * kv_h, dim);
        const at::BFloat16* v = row + (heads + kv_heads + h) * dim;
        at::BFloat16* out = slot_k + kv_half + h * kv_h;
        for (int64_t d = 0; d < dim; ++d) out[d] = v[d];
      }
    }
  });
  return q;
}

// gate_up (..., 2 I) bf16 contiguous -> (..., I) bf16: bf16(bf16(silu(gate)) * up) (see the top).
torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  TORCH_CHECK(gate_up.device().is_cpu(), "silu_mul runs on CPU tensors");
  TORCH_CHECK(gate_up.scalar_type() == torch::kBFloat16, "silu_mul: gate_up must be bfloat16");
  TORCH_CHECK(gate_up.dim() >= 1 && gate_up.is_contiguous() && gate_up.size(-1) % 2 == 0,
              "silu_mul: contiguous (..., 2 I) gate|up");
  const int64_t width = gate_up.size(-1) / 2, rows = width == 0 ? 0 : gate_up.numel() / (2 * width);
  auto sizes = gate_up.sizes().vec();
  sizes.back() = width;
  auto out = torch::empty(sizes, gate_up.options());
  const at::BFloat16* x = gate_up.data_ptr<at::BFloat16>();
  at::BFloat16* o = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) silu_mul_row(x + r * 2 * width, x + r * 2 * width + width, o + r * width, width);
  });
  return out;
}
