"""4-bit weights run as 4-bit: linear layers whose weights lie on a 4-bit grid per group of inputs.

A Q4_0 / Q4_1 GGUF (the embedded default SmolLM2 is Q4_1) stores each linear weight in blocks of 32
inputs, ``w = d * q + m`` with q in 0..15 and one (d, m) pair per block. transformers dequantizes the
file into dense weights, so the dense model streams 16 bits per weight (bf16) where the file holds
4.5. torch's CPU int4 kernel (``aten._weight_int4pack_mm_for_cpu``) multiplies by such a weight held as
4-bit values and one (scale, zero) pair per group, computing ``w = (q - 8) * scale + zero``; with
``scale = d`` and ``zero = m + 8 d`` it is the same weight.

The grid is recovered from the dense (float32) weights, not read from the GGUF: per group of 32
inputs, ``m`` is the smallest weight and ``d = (max - min) / k`` for the smallest k in 1..15 that puts
every weight on the grid (within ``tolerance`` of a step). This needs no knowledge of GGUF block
layouts or of the row permutations transformers applies to Llama's q/k weights, and it checks
itself: a weight that is not on a 4-bit grid is reported by name (``Int4GridError``), never
re-quantized.

Where it pays (docs/PERFORMANCE.md): in bfloat16 on CPU, SmolLM2's 30 layers of products take
about 5.5 ms for one row against 14.6 ms dense (the weight stream shrinks 3.5x), but the kernel's cost
grows with the rows (one row is memory-bound, eight are not), so ``base.Linear`` uses it only up to
``INT4_MAX_ROWS`` rows and the dense oneDNN weight beyond. Numerics: in bfloat16 the kernel holds
scale and zero in bf16, so its weights differ from the dense bf16 ones by rounding (both are within
bf16 precision of the file's values); in float32 the weights are exactly the dense ones (tested),
but the float32 kernel is slow, so float32 models keep dense products by default.
"""

from __future__ import annotations

import dataclasses

import torch

GROUP_SIZE = 32  # inputs per (scale, zero) pair: the block size of GGUF's Q4_0 / Q4_1
INT4_MAX_ROWS = 8  # rows up to which the int4 kernel beats dense bf16 products (docs/PERFORMANCE.md)
INNER_K_TILES = 8  # the CPU kernel's packing parameter (2, 4 or 8)


class Int4GridError(ValueError):
    """A weight that does not lie on a 4-bit grid per group of inputs."""


@dataclasses.dataclass(frozen=True)
class Int4Weight:
    """A linear weight (out_features, in_features) as packed 4-bit values and per-group scale/zero.

    Attributes:
        packed:          the kernel's packed int4 tensor (from ``_convert_weight_to_int4pack_for_cpu``).
        scales_zeros:    (in_features / group, out_features, 2) in the activation dtype: scale, zero.
        group:           inputs per group.
        out_features, in_features: the weight's shape.
    """

    packed: torch.Tensor
    scales_zeros: torch.Tensor
    group: int
    out_features: int
    in_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features), in x's dtype (which must be scales_zeros')."""
        rows = x.reshape(-1, self.in_features)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.group, self.scales_zeros)
        return y.view(*x.shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The dense (out_features, in_features) weight this computes with (float32), for tests."""
        eye = torch.eye(self.in_features, dtype=self.scales_zeros.dtype, device=self.packed.device)
        return self(eye).float().T.contiguous()


def grid_4bit(weight: torch.Tensor, group: int = GROUP_SIZE, tolerance: float = 1e-3):
    """Recover a 4-bit grid per group of inputs from a dense weight.

    Args:
        weight:    (out_features, in_features), float32 for an exact grid (bf16 rounding of a
                   dequantized weight is ~1% of a step and fails a tight tolerance).
        group:     inputs per group; in_features must be a multiple of it.
        tolerance: largest allowed |w - grid value| as a fraction of the group's step.
    Returns:
        (q, step, low): q (out, in) int32 in 0..15, step and low (out, in / group) float32, with
        ``weight ≈ q * step + low`` group by group.
    Raises:
        Int4GridError: in_features is not a multiple of ``group``, or some group is not on a grid of
        at most 16 levels.
    """
    out_features, in_features = weight.shape
    if in_features % group:
        raise Int4GridError(f"{in_features} inputs are not a multiple of the group size {group}")
    blocks = weight.detach().float().reshape(out_features, in_features // group, group)
    low, high = blocks.amin(-1), blocks.amax(-1)
    spread = high - low
    q = torch.zeros_like(blocks, dtype=torch.int32)
    step = torch.zeros_like(low)
    unresolved = spread > 0  # a constant group is q = 0, step 0, low = its value
    offsets = blocks - low.unsqueeze(-1)
    worst = torch.zeros_like(low)
    for levels in (15, *range(1, 15)):  # Q4 quantizers map a group's min and max to 0 and 15
        if not bool(unresolved.any()):
            break
        candidate = spread / levels
        scaled = offsets / candidate.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
        rounded = scaled.round()
        error = (scaled - rounded).abs().amax(-1)
        fits = unresolved & (error <= tolerance)
        q = torch.where(fits.unsqueeze(-1), rounded.to(torch.int32), q)
        step = torch.where(fits, candidate, step)
        worst = torch.where(fits, error, worst)
        unresolved &= ~fits
    if bool(unresolved.any()):
        bad = int(unresolved.sum())
        raise Int4GridError(f"{bad} of {unresolved.numel()} groups of {group} inputs are not on a 4-bit grid")
    return q.view(out_features, in_features), step, low


def pack_int4(weight: torch.Tensor, dtype: torch.dtype, group: int = GROUP_SIZE) -> Int4Weight:
    """An ``Int4Weight`` computing with ``weight`` (out, in), for activations in ``dtype`` (bf16 or
    float32 on CPU). Raises ``Int4GridError`` when the weight is not on a 4-bit grid."""
    if weight.device.type != "cpu":
        raise Int4GridError(f"int4 kernels run on CPU here, not {weight.device.type}")
    q, step, low = grid_4bit(weight, group)
    zero = low + 8 * step  # (q - 8) * step + (low + 8 step) = q * step + low
    scales_zeros = torch.stack([step.T, zero.T], dim=-1).contiguous().to(dtype)  # (in / group, out, 2)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), INNER_K_TILES)
    return Int4Weight(packed=packed, scales_zeros=scales_zeros, group=group,
                      out_features=weight.shape[0], in_features=weight.shape[1])
