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

Three kernels (docs/PERFORMANCE.md). Ours for bf16 (``kernels``, AVX-512 BF16, bf16 activations) walks
the weight once for up to 8 rows (more in chunks of 8, rereading each tile from L1): SmolLM2's 30 layers of products take about 5 ms for one row
against 15-17 ms dense (the weight stream shrinks 3.5x) and about 9 ms for 8 rows, so ``base.Linear``
uses it up to ``INT4_MAX_ROWS_AVX512`` rows (64: beyond, a prefill's rows, dense products are as fast). Ours for float32 (``kernels.avx2``, any CPU with AVX2,
FMA and F16C) does the same with float32 arithmetic, up to ``INT4_MAX_ROWS_AVX2`` rows. torch's kernel
(everywhere else) streams and unpacks the weight once per 4 rows, so 5 rows cost about twice 4; it is
used up to ``INT4_MAX_ROWS`` rows. Beyond, the dense oneDNN weight runs (prefills, batched datagen),
except for a float32 model whose every decoder weight runs ours (``NativeTarget.int4_every_row``): ours
then runs every row count, and no dense copy is made.

Numerics: ours holds each group's step and low in float16 where the rounded values keep every weight
within the grid tolerance of its dense value (a Q4_0 / Q4_1 file's own d and m are float16 values;
``float16_scales``), else in float32; its weights are
exactly ``q * step + low``; products of bf16 activations accumulate in float32 and round once to bf16.
A Q4_K weight's steps and lows are held as its file does (``k_scales``). torch's kernel holds scale
and zero in the activation dtype: in bf16 its weights differ from the dense bf16 ones by rounding; in
float32 they are exactly the dense ones (tested), but that kernel is slow, so float32 models keep
dense products by default where our float32 kernel does not run.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch

from redrafter.models import kernels
from redrafter.utils import weight_arena

GROUP_SIZE = 32  # inputs per (scale, zero) pair: the block size of GGUF's Q4_0 / Q4_1
GRID_TOLERANCE = 1e-3  # largest |w - grid value| as a fraction of the step (grid_4bit)
INT4_MAX_ROWS = 8  # rows up to which torch's int4 kernel beats dense bf16 products (docs/PERFORMANCE.md)
INT4_MAX_ROWS_AVX512 = 64  # the same for ours (kernels.int4): a forward of 17-48 rows takes 11-30 % less time
# than dense on Zen 5, level at 64 (docs/PERFORMANCE.md); every step of up to 64 rows so computes each row as alone
INT4_MAX_ROWS_AVX2 = 16  # the same for our float32 kernel (kernels.avx2)
OUR_KERNELS = ("avx512", "avx2")  # Int4Weight.kernel values that run ``matmul``
INNER_K_TILES = 8  # the CPU kernel's packing parameter (2, 4 or 8)


_GRID_CHUNK_ELEMENTS = 1 << 20  # weights per chunk of rows when recovering or checking a grid


def _row_chunks(out_features: int, in_features: int):
    """(start, end) of row chunks of about ``_GRID_CHUNK_ELEMENTS`` weights."""
    rows = max(1, _GRID_CHUNK_ELEMENTS // max(1, in_features))
    return [(start, min(start + rows, out_features)) for start in range(0, out_features, rows)]


class Int4GridError(ValueError):
    """A weight that does not lie on a 4-bit grid per group of inputs."""


@dataclasses.dataclass(frozen=True)
class Int4Weight:
    """A linear weight (out_features, in_features) as packed 4-bit values and per-group scale/zero.

    Attributes:
        packed:       the 4-bit values, in the layout of ``kernel``.
        scales:       per group of inputs, in the layout of ``kernel``.
        group:        inputs per group.
        out_features, in_features: the weight's shape.
        kernel:       "torch": ``aten._weight_int4pack_mm_for_cpu`` (packed from
                      ``_convert_weight_to_int4pack_for_cpu``; scales (in / group, out, 2) scale and zero
                      in the activation dtype). "avx512": ours (``kernels.int4``, bf16 activations;
                      scales are float16 or float32 steps and lows, so the weights are exactly
                      q * step + low). "avx2": ours for float32 activations (``kernels.avx2``,
                      csrc/avx2/gemm_f32.cpp; the same weights, in its own layout).
    """

    packed: torch.Tensor
    scales: torch.Tensor
    group: int
    out_features: int
    in_features: int
    kernel: str = "torch"
    matmul: object = dataclasses.field(default=None, repr=False, compare=False)  # ours: int4_mm or mm_f32

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features), in x's dtype (bf16 for "avx512"; the
        activation dtype the weight was packed for with "torch"; float32 for "avx2")."""
        rows = x.reshape(-1, self.in_features)
        if self.kernel in OUR_KERNELS:
            y = self.matmul(rows.contiguous(), self.packed, self.scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.group, self.scales)
        return y.view(*x.shape[:-1], self.out_features)

    @property
    def max_rows(self) -> int:
        """Rows up to which this kernel's products beat dense bf16 ones (docs/PERFORMANCE.md)."""
        return {"avx512": INT4_MAX_ROWS_AVX512, "avx2": INT4_MAX_ROWS_AVX2}.get(self.kernel, INT4_MAX_ROWS)

    def dequantize(self) -> torch.Tensor:
        """The dense (out_features, in_features) weight this computes with (float32), for tests."""
        dtype = {"avx512": torch.bfloat16, "avx2": torch.float32}.get(self.kernel, self.scales.dtype)
        eye = torch.eye(self.in_features, dtype=dtype, device=self.packed.device)
        return self(eye).float().T.contiguous()


def grid_4bit(weight: torch.Tensor, group: int = GROUP_SIZE, tolerance: float = GRID_TOLERANCE):
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
    groups = in_features // group
    q = torch.zeros(out_features * groups, group, dtype=torch.int32)
    step = torch.zeros(out_features * groups)
    low = torch.empty(out_features * groups)
    # In chunks of rows (temporaries of a few MB, not hundreds: Qwen2.5-1.5B's weights load in seconds
    # instead of minutes), and each level tries only the groups that no earlier level fitted.
    for start, end in _row_chunks(out_features, in_features):
        blocks = weight.detach()[start:end].float().reshape(-1, group)
        first = start * groups
        chunk_low, high = blocks.amin(-1), blocks.amax(-1)
        low[first:first + blocks.shape[0]] = chunk_low
        spread = high - chunk_low
        todo = torch.nonzero(spread > 0).squeeze(-1)  # a constant group is q = 0, step 0, low = its value
        for levels in (15, *range(1, 15)):  # Q4 quantizers map a group's min and max to 0 and 15
            if todo.numel() == 0:
                break
            candidate = spread[todo] / levels
            scaled = (blocks[todo] - chunk_low[todo].unsqueeze(-1)) / candidate.clamp_min(
                torch.finfo(torch.float32).tiny).unsqueeze(-1)
            rounded = scaled.round()
            fits = (scaled - rounded).abs().amax(-1) <= tolerance
            q[first + todo[fits]] = rounded[fits].to(torch.int32)
            step[first + todo[fits]] = candidate[fits]
            todo = todo[~fits]
        if todo.numel():
            raise Int4GridError(f"{todo.numel()} groups of {group} inputs in rows {start}-{end - 1} of {out_features} "
                                "are not on a 4-bit grid")
    return q.view(out_features, in_features), step.view(out_features, groups), low.view(out_features, groups)


def float16_scales(weight: torch.Tensor, q: torch.Tensor, step: torch.Tensor, low: torch.Tensor,
                   tolerance: float = GRID_TOLERANCE) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``grid_4bit``'s steps and lows rounded to float16 when the rounded values still put every weight
    on its grid point (within ``tolerance`` of a step, as ``grid_4bit`` requires), else None.

    A Q4_0 / Q4_1 file stores d and m in float16, so its steps and lows pass and our kernel streams
    half the scale bytes (about 13 MB less per SmolLM2 step). Grids whose steps are products of two
    scales (Q4_K: d times a 6-bit sub-block scale) need float32 and fail here.
    """
    step16, low16 = step.half(), low.half()
    if not bool(torch.isfinite(step16).all() and torch.isfinite(low16).all()):
        return None
    out_features, groups = step.shape
    for start, end in _row_chunks(out_features, weight.shape[1]):
        blocks = weight.detach()[start:end].float().reshape(end - start, groups, -1)
        rebuilt = (q[start:end].view(end - start, groups, -1).float() * step16[start:end].float().unsqueeze(-1)
                   + low16[start:end].float().unsqueeze(-1))
        if not bool(((rebuilt - blocks).abs().amax(-1) <= tolerance * step[start:end]).all()):
            return None
    return step16, low16


K_BLOCK = 8  # groups of 32 per block of a Q4_K weight (256 inputs), each with its own units
_K_TOLERANCE = 1e-4  # largest distance of a multiplier from an integer, in units


def k_scales(weight: torch.Tensor, q: torch.Tensor, step: torch.Tensor, low: torch.Tensor,
             tolerance: float = GRID_TOLERANCE):
    """``grid_4bit``'s steps and lows as a Q4_K weight holds them, where they allow it: per block of 8
    groups (256 inputs) a step unit d and a low unit -dmin (float32), per group integer multipliers sc
    and m in 0..255, step = sc * d and low = m * (-dmin).

    ``grid_4bit`` takes a group's smallest weight as its low. Where the group's smallest q is above 0
    that is the file's low plus a few steps, so the low is moved back by j steps (and q up by j) for
    the smallest j that makes it a multiple of the unit. Returns (q, multipliers (out, in / 32, 2)
    uint8, units (out, in / 256, 2) float32) when every weight is then within ``tolerance`` of a step
    of its dense value, else None (the weight keeps float32 steps and lows)."""
    out_features, groups = step.shape
    if groups % K_BLOCK:
        return None
    blocks = groups // K_BLOCK
    steps, lows = step.view(out_features, blocks, K_BLOCK), low.view(out_features, blocks, K_BLOCK)
    d = steps.amax(-1, keepdim=True) / 63  # a Q4_K quantizer maps a block's largest scale to 63
    sc = steps / d.clamp_min(torch.finfo(torch.float32).tiny)
    whole = ((sc - sc.round()).abs() <= _K_TOLERANCE).all(-1)
    failed = torch.nonzero(~whole.flatten()).squeeze(-1)
    if failed.numel():  # rare: some group's step is not a multiple of the largest / 63; try step / n
        sub_steps = steps.view(-1, K_BLOCK)[failed]
        sub_d = d.view(-1, 1)[failed]
        solved = torch.zeros(failed.numel(), dtype=torch.bool)
        for g in range(K_BLOCK):
            for n in range(1, 256):
                candidate = (sub_steps[:, g] / n).unsqueeze(-1)
                ratio = sub_steps / candidate.clamp_min(torch.finfo(torch.float32).tiny)
                fits = ~solved & (candidate.squeeze(-1) > 0) & ((ratio - ratio.round()).abs() <= _K_TOLERANCE).all(-1) \
                    & (ratio.round() <= 255).all(-1)
                sub_d = torch.where(fits.unsqueeze(-1), candidate, sub_d)
                solved |= fits
            if bool(solved.all()):
                break
        if not bool(solved.all()):
            return None
        d.view(-1, 1)[failed] = sub_d
        sc = steps / d.clamp_min(torch.finfo(torch.float32).tiny)
    sc = sc.round()
    qb = q.view(out_features, groups, -1)
    room = (15 - qb.amax(-1)).view(out_features, blocks, K_BLOCK)  # how far q can move up
    # -dmin: the most negative low maps to 63. A block whose most negative low was moved up (its group's
    # smallest q is above 0) fails with that unit and tries each group's low moved back by 0..15 steps.
    unit = lows.amin(-1, keepdim=True) / 63
    unit = torch.where(unit == 0, torch.full_like(unit, -1.0), unit)  # no low below 0: every m is 0
    m, shift = _low_multipliers(lows, steps, room, unit)
    failed = torch.nonzero((m < 0).any(-1).flatten()).squeeze(-1)
    if failed.numel():
        flat = (lows.view(-1, K_BLOCK), steps.view(-1, K_BLOCK), room.view(-1, K_BLOCK))
        sub_lows, sub_steps, sub_room = (t[failed] for t in flat)
        sub_m, sub_shift = m.view(-1, K_BLOCK)[failed], shift.view(-1, K_BLOCK)[failed]
        sub_unit = unit.view(-1, 1)[failed]
        for g in range(K_BLOCK):
            for j in range(16):
                todo = (sub_m < 0).any(-1)
                if not bool(todo.any()):
                    break
                candidate = ((sub_lows[:, g] - j * sub_steps[:, g]) / 63).unsqueeze(-1)
                candidate = torch.where(candidate == 0, torch.full_like(candidate, -1.0), candidate)
                cand_m, cand_shift = _low_multipliers(sub_lows, sub_steps, sub_room, candidate)
                better = todo & (j <= sub_room[:, g]) & (cand_m >= 0).all(-1)
                sub_m = torch.where(better.unsqueeze(-1), cand_m, sub_m)
                sub_shift = torch.where(better.unsqueeze(-1), cand_shift, sub_shift)
                sub_unit = torch.where(better.unsqueeze(-1), candidate, sub_unit)
        m.view(-1, K_BLOCK)[failed], shift.view(-1, K_BLOCK)[failed] = sub_m, sub_shift
        unit.view(-1, 1)[failed] = sub_unit
    if bool((m < 0).any()) or float(sc.max()) > 255:
        return None
    q_new = (qb + shift.view(out_features, groups, 1)).view_as(q)
    for start, end in _row_chunks(out_features, q.shape[1]):
        rebuilt = (q_new[start:end].view(end - start, blocks, K_BLOCK, -1).float() * (sc * d)[start:end].unsqueeze(-1)
                   + (m * unit)[start:end].unsqueeze(-1)).view(end - start, -1)
        error = (rebuilt - weight.detach()[start:end].float()).abs().view(end - start, groups, -1).amax(-1)
        if not bool((error <= tolerance * step[start:end].clamp_min(torch.finfo(torch.float32).tiny)).all()):
            return None
    multipliers = torch.stack([sc.view(out_features, groups), m.view(out_features, groups)], -1).to(torch.uint8)
    units = torch.stack([d.squeeze(-1), unit.squeeze(-1)], -1)
    return q_new, multipliers, units


def _low_multipliers(lows: torch.Tensor, steps: torch.Tensor, room: torch.Tensor, unit: torch.Tensor):
    """Per group, the smallest j in 0..room such that (low - j * step) / unit is an integer m in 0..255:
    (m, j), with m = -1 where no j fits."""
    m = torch.full_like(lows, -1.0)
    shift = torch.zeros_like(room)
    for j in range(16):
        moved = (lows - j * steps) / unit
        rounded = moved.round()
        fits = (m < 0) & (j <= room) & ((moved - rounded).abs() <= _K_TOLERANCE) & (rounded >= 0) & (rounded <= 255)
        m = torch.where(fits, rounded, m)
        shift = torch.where(fits, torch.full_like(shift, j), shift)
    return m, shift


def pack_k_scales(multipliers: torch.Tensor, units: torch.Tensor, tile: int = 16) -> torch.Tensor:
    """``k_scales``' multipliers (out, groups, 2) and units (out, blocks, 2) in our kernels' K-scale layout
    (csrc/int4_gemm.cpp with tiles of 16 features, csrc/avx2/gemm_f32.cpp with tiles of 8): per tile, per
    group ``tile`` step then ``tile`` low multipliers (bytes), then per block ``tile`` step then ``tile``
    low units (float32 bytes). Returns (out / tile, bytes per tile) uint8."""
    out_features, groups, _ = multipliers.shape
    tiles, blocks = out_features // tile, units.shape[1]
    per_group = multipliers.view(tiles, tile, groups, 2).permute(0, 2, 3, 1).reshape(tiles, groups * 2 * tile)
    per_block = units.float().contiguous().view(tiles, tile, blocks, 2).permute(0, 2, 3, 1).contiguous()
    return torch.cat([per_group, per_block.view(torch.uint8).reshape(tiles, blocks * 8 * tile)], 1).contiguous()


def round_4bit(weight: torch.Tensor, group: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round a weight that is not on a 4-bit grid to one, as a Q4_1 quantizer does: per group of
    ``group`` inputs, low = the smallest weight and step = (largest - smallest) / 15, both rounded to
    float16, and q = round((w - low) / step) in 0..15. Returns (q, step, low) as ``grid_4bit`` does, with
    step and low float16 (a constant group gets step 0)."""
    out_features, in_features = weight.shape
    if in_features % group:
        raise Int4GridError(f"{in_features} inputs are not a multiple of the group size {group}")
    blocks = weight.detach().float().reshape(out_features, in_features // group, group)
    low = blocks.amin(-1).half()
    step = ((blocks.amax(-1) - low.float()) / 15).half()
    scaled = (blocks - low.float().unsqueeze(-1)) / step.float().clamp_min(torch.finfo(torch.float16).tiny).unsqueeze(-1)
    if not bool(torch.isfinite(step).all() and torch.isfinite(low).all()):
        raise Int4GridError("weights beyond float16's range cannot be rounded to 4 bits with float16 scales")
    q = scaled.round().clamp(0, 15).to(torch.int32)
    return q.view(out_features, in_features), step, low


def pack_int4(weight: torch.Tensor, dtype: torch.dtype, group: int = GROUP_SIZE, kernel: str = "auto", *,
              rounding: bool = False) -> Int4Weight:
    """An ``Int4Weight`` computing with ``weight`` (out, in), for activations in ``dtype`` (bf16 or
    float32 on CPU). ``kernel``: "auto" takes ours where it loads and the shape suits it (out a multiple
    of 16, groups of 32): "avx512" for bf16, "avx2" for float32; else torch's. Raises ``Int4GridError`` when the
    weight is not on a 4-bit grid, unless ``rounding``: then the weight is rounded to one first
    (``round_4bit``), and the products compute with that rounded weight, not ``weight`` (for a drafter,
    whose products only choose what to propose)."""
    if weight.device.type != "cpu":
        raise Int4GridError(f"int4 kernels run on CPU here, not {weight.device.type}")
    if kernel not in ("auto", "torch", *OUR_KERNELS):
        raise ValueError(f"unknown int4 kernel {kernel!r}")
    out_features, in_features = weight.shape
    if out_features % 16:
        raise Int4GridError(f"{out_features} output features are not a multiple of 16 (our kernels' tiles are 16 and 8)")
    if kernel == "avx512" and (dtype != torch.bfloat16 or group != 32):
        raise ValueError("the AVX-512 int4 kernel takes bfloat16 activations and groups of 32 inputs")
    if kernel == "avx2" and (dtype != torch.float32 or group != 32):
        raise ValueError("the AVX2 int4 kernel takes float32 activations and groups of 32 inputs")
    if rounding:
        q, step16, low16 = round_4bit(weight, group)
        step, low = step16.float(), low16.float()
    else:
        q, step, low = grid_4bit(weight, group)
    if kernel == "auto":
        if group == 32 and dtype == torch.bfloat16 and kernels.int4() is not None:
            kernel = "avx512"
        elif group == 32 and dtype == torch.float32 and kernels.avx2() is not None:
            kernel = "avx2"
        else:
            kernel = "torch"
    if kernel in OUR_KERNELS:
        _, module = our_module(torch.bfloat16 if kernel == "avx512" else torch.float32)
        pack, matmul, tile = ((module.pack_weight, module.int4_mm, 16) if kernel == "avx512"
                              else (module.pack_weight_f32, module.mm_f32, 8))
        scales16 = (step16, low16) if rounding else float16_scales(weight, q, step, low)
        k_form = None if scales16 is not None else k_scales(weight, q, step, low)
        if k_form is not None:  # a Q4_K weight: its steps and lows as byte multipliers of float32 units
            q, multipliers, units = k_form
            packed, _ = pack(q, step, low)
            scales = pack_k_scales(multipliers, units, tile=tile)
        else:
            packed, scales = pack(q, *(scales16 or (step, low)))
        return Int4Weight(packed=packed, scales=scales, group=group, out_features=out_features,
                          in_features=in_features, kernel=kernel, matmul=matmul)
    zero = low + 8 * step  # (q - 8) * step + (low + 8 step) = q * step + low
    scales_zeros = torch.stack([step.T, zero.T], dim=-1).contiguous().to(dtype)  # (in / group, out, 2)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), INNER_K_TILES)
    return Int4Weight(packed=packed, scales=scales_zeros, group=group, out_features=out_features,
                      in_features=in_features)


_GRID_CHUNK_ROWS = 1024


def grid_8bit(weight: torch.Tensor, group: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Recover a Q8_0 grid from a dense (float32) weight: per group of ``group`` inputs, w = d * q with
    d a float16 value and q an integer in -127..127, d = max |w| / 127 (a Q8_0 quantizer maps the
    largest |w| of a group to 127). Returns (q (out, in) int8, d (out, in / group) float16).
    Raises ``Int4GridError`` when some group is not on such a grid."""
    out_features, in_features = weight.shape
    if in_features % group:
        raise Int4GridError(f"{in_features} inputs are not a multiple of the group size {group}")
    qs, ds = [], []
    # In chunks of rows, so that a weight off the grid fails at its first chunk and a large head (Qwen's
    # 151,936 x 1,536) needs temporaries of a few MB, not several GB.
    for start in range(0, out_features, _GRID_CHUNK_ROWS):
        rows = weight.detach()[start:start + _GRID_CHUNK_ROWS]
        blocks = rows.float().reshape(rows.shape[0], in_features // group, group)
        d = (blocks.abs().amax(-1) / 127).half()
        q = (blocks / d.float().clamp_min(torch.finfo(torch.float16).tiny).unsqueeze(-1)).round()
        exact = (q * d.float().unsqueeze(-1) == blocks) & (q.abs() <= 127)
        if not bool(torch.isfinite(d).all() and exact.all()):
            bad = int((~exact.all(-1)).sum())
            raise Int4GridError(f"{bad} groups of {group} inputs in rows {start}-{start + rows.shape[0] - 1} of "
                                f"{out_features} are not on an 8-bit (Q8_0) grid")
        qs.append(q.to(torch.int8).view(rows.shape[0], in_features))
        ds.append(d)
    return torch.cat(qs), torch.cat(ds)


def grid_8bit_16(weight: torch.Tensor, tolerance: float = GRID_TOLERANCE) -> tuple[torch.Tensor, torch.Tensor]:
    """Recover a symmetric 8-bit grid per group of 16 inputs from a dense (float32) weight: w = d * q
    with q an integer in -127..127 and one d per group, as a Q6_K weight holds (q in -32..31, d the
    block's float16 scale times the group's 8-bit one). Per group, d = max |w| / k for the first k in
    32, 31, 1..127 that puts every weight within ``tolerance`` of a step from its grid point.
    Returns (q (out, in) int8, d (out, in / 16) float16 where the rounded values keep that, else
    float32). Raises ``Int4GridError`` when some group is not on such a grid."""
    group = 16
    out_features, in_features = weight.shape
    if in_features % group:
        raise Int4GridError(f"{in_features} inputs are not a multiple of the group size {group}")
    qs, ds = [], []
    for start in range(0, out_features, _GRID_CHUNK_ROWS):  # chunks of rows, as in grid_8bit
        rows = weight.detach()[start:start + _GRID_CHUNK_ROWS]
        blocks = rows.float().reshape(-1, group)
        peak = blocks.abs().amax(-1)
        q = torch.zeros_like(blocks, dtype=torch.int8)
        d = torch.zeros_like(peak)
        todo = torch.nonzero(peak > 0).squeeze(-1)  # an all-zero group is q = 0, d = 0
        for levels in (32, 31, *range(1, 128)):
            if todo.numel() == 0:
                break
            step = peak[todo] / levels
            scaled = blocks[todo] / step.unsqueeze(-1)
            rounded = scaled.round()
            fits = (scaled - rounded).abs().amax(-1) <= tolerance
            q[todo[fits]] = rounded[fits].to(torch.int8)
            d[todo[fits]] = step[fits]
            todo = todo[~fits]
        if todo.numel():
            raise Int4GridError(f"{todo.numel()} groups of {group} inputs in rows {start}-{start + rows.shape[0] - 1} "
                                f"of {out_features} are not on an 8-bit grid of 16 inputs (Q6_K)")
        qs.append(q.view(rows.shape[0], in_features))
        ds.append(d.view(rows.shape[0], in_features // group))
    q, d = torch.cat(qs), torch.cat(ds)
    d16 = d.half()
    blocks = weight.detach().float().reshape(out_features, -1, group)
    if bool(torch.isfinite(d16).all()):
        error = (q.view_as(blocks).float() * d16.float().unsqueeze(-1) - blocks).abs().amax(-1)
        if bool((error <= tolerance * d).all()):
            return q, d16
    return q, d


@dataclasses.dataclass(frozen=True)
class Int8Weight:
    """An 8-bit weight, w = d * q with q in -127..127 and one d per group of inputs, run by our
    kernel's 8-bit products (``int8_mm``) with exactly the file's weights: a Q8_0 weight (groups of 32,
    float16 d; 8.5 bits per weight streamed instead of bf16's 16, e.g. the LM head tied to the embedded
    SmolLM2's Q8_0 embedding) or a Q6_K one (groups of 16, float32 d; 10 bits, e.g. Qwen2.5-Coder's LM
    head and half its MLP down weights)."""

    packed: torch.Tensor  # (out / 16, in / 4, 64) uint8, ``pack_weight8``'s layout (avx2: (out / 8, in / 8, 64))
    scales: torch.Tensor  # (out / 16, in / group, 16) float16 or float32 d (avx2: (out / 8, in / group, 8))
    out_features: int
    in_features: int
    matmul: object = dataclasses.field(repr=False, compare=False)  # kernels' int8_mm (avx2: mm_f32)
    kernel: str = "avx512"  # ours (as ``Int4Weight.kernel``): "avx512" (bf16) or "avx2" (float32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) bf16 ("avx512") or float32 ("avx2") -> (..., out_features), the same dtype."""
        y = self.matmul(x.reshape(-1, self.in_features).contiguous(), self.packed, self.scales)
        return y.view(*x.shape[:-1], self.out_features)

    @property
    def group(self) -> int:
        return self.in_features // self.scales.shape[1]

    @property
    def max_rows(self) -> int:
        return INT4_MAX_ROWS_AVX2 if self.kernel == "avx2" else INT4_MAX_ROWS_AVX512



def our_module(dtype: torch.dtype):
    """Our kernels' extension for activations in ``dtype`` and its kernel name: ("avx512", ``kernels.int4()``)
    for bf16, ("avx2", ``kernels.avx2()``) for float32. Raises ``Int4GridError`` when it is not available."""
    if dtype == torch.float32:
        module, name, reason = kernels.avx2(), "avx2", kernels.avx2_unavailable_reason
    elif dtype == torch.bfloat16:
        module, name, reason = kernels.int4(), "avx512", kernels.int4_unavailable_reason
    else:
        raise Int4GridError(f"our 4- and 8-bit kernels take bfloat16 or float32 activations, not {dtype}")
    if module is None:
        label = {"avx512": "AVX-512", "avx2": "AVX2"}[name]
        raise Int4GridError(f"the {label} int4 kernel is not available: {reason() or 'its build failed'}")
    return name, module


def pack_int8(weight: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> Int8Weight:
    """An ``Int8Weight`` computing with ``weight`` (out, in), for activations in ``dtype`` (bf16 or float32)
    with our kernel. The weight must lie on a Q8_0 grid (``grid_8bit``, tried first) or a symmetric 8-bit
    grid per 16 inputs (``grid_8bit_16``). Raises ``Int4GridError`` when the weight is off both, the shape
    does not suit the kernel, or the kernel is not available."""
    out_features, in_features = weight.shape
    if out_features % 16:
        raise Int4GridError("8-bit products need a multiple of 16 output features")
    name, module = our_module(dtype)
    try:
        q, d = grid_8bit(weight, 32)
    except Int4GridError:
        q, d = grid_8bit_16(weight)
    if name == "avx2":
        packed, scales = module.pack_weight8_f32(q, d)
        return Int8Weight(packed=packed, scales=scales, out_features=out_features, in_features=in_features,
                          matmul=module.mm_f32, kernel="avx2")
    packed, scales = module.pack_weight8(q, d)
    return Int8Weight(packed=packed, scales=scales, out_features=out_features, in_features=in_features,
                      matmul=module.int8_mm)


@dataclasses.dataclass(frozen=True)
class MixedWeight:
    """A fused weight whose output features come in parts of different grids, run by our kernel's
    ``mixed_mm``: each part (an ``Int4Weight`` for our kernel or an ``Int8Weight``) gives the next
    ``out_features`` columns, as it would alone. For a q|k|v whose q and k are Q4_K and v Q6_K (half of
    Qwen2.5-Coder's layers in its Q4_K_M GGUF)."""

    parts: tuple
    matmul: object = dataclasses.field(repr=False, compare=False)  # kernels' mixed_mm (avx2: mixed_mm_f32)
    kernel: str = "avx512"  # or "avx2" (float32)

    @property
    def out_features(self) -> int:
        return sum(part.out_features for part in self.parts)

    @property
    def in_features(self) -> int:
        return self.parts[0].in_features

    @property
    def max_rows(self) -> int:
        return min(part.max_rows for part in self.parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features), bf16 ("avx512") or float32 ("avx2")."""
        rows = x.reshape(-1, self.in_features).contiguous()
        y = self.matmul(rows, [part.packed for part in self.parts], [part.scales for part in self.parts])
        return y.view(*x.shape[:-1], self.out_features)


def pack_parts(weight: torch.Tensor, sizes: list[int], dtype: torch.dtype = torch.bfloat16) -> MixedWeight:
    """A ``MixedWeight`` for a model in ``dtype`` (bf16 or float32) computing with ``weight`` (out, in), whose rows are the
    concatenation of weights of ``sizes`` rows each (q, k, v), each on a 4-bit grid or an 8-bit one
    (``pack_int8``); neighbours on the same kind of grid are packed together. Raises ``Int4GridError``
    when some part is on neither grid, a part's rows are not a multiple of 16, or the kernel is not
    available."""
    if sum(sizes) != weight.shape[0]:
        raise Int4GridError(f"parts of {sizes} rows do not make up {weight.shape[0]}")
    name, module = our_module(dtype)

    def pack(rows: torch.Tensor):
        try:
            return pack_int4(rows, dtype, kernel=name)
        except Int4GridError:
            return pack_int8(rows, dtype)  # raises when on neither grid

    bounds = [0, *itertools.accumulate(sizes)]
    alone = [pack(weight[bounds[i]:bounds[i + 1]]) for i in range(len(sizes))]
    parts = []
    for _, run in itertools.groupby(range(len(sizes)), key=lambda i: type(alone[i])):
        run = list(run)  # neighbours on the same kind of grid are packed together
        parts.append(alone[run[0]] if len(run) == 1 else pack(weight[bounds[run[0]]:bounds[run[-1] + 1]]))
    if name == "avx2":
        return MixedWeight(parts=tuple(parts), matmul=module.mixed_mm_f32, kernel="avx2")
    return MixedWeight(parts=tuple(parts), matmul=module.mixed_mm)


def packed_parts(weight) -> list:
    """The parts of a weight for our kernel: a ``MixedWeight``'s, else the weight alone."""
    return list(weight.parts) if isinstance(weight, MixedWeight) else [weight]


def in_one_block(linears: list) -> None:
    """Move the packed weights and scales of ``linears`` (``base.Linear`` with an ``Int4Weight``,
    ``Int8Weight`` or ``MixedWeight``) into one block, in the order given, on huge pages where Linux allows
    (``utils.weight_arena``): the same values, streamed faster by a forward or a draft search that
    reads them in that order (docs/PERFORMANCE.md)."""
    views = iter(weight_arena([tensor for linear in linears for part in packed_parts(linear.int4)
                               for tensor in (part.packed, part.scales)]))
    for linear in linears:
        parts = [dataclasses.replace(part, packed=next(views), scales=next(views)) for part in packed_parts(linear.int4)]
        linear.int4 = (dataclasses.replace(linear.int4, parts=tuple(parts)) if isinstance(linear.int4, MixedWeight)
                       else parts[0])
