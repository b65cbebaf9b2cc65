"""The target-model backend protocol: everything the engine needs from an LLM.

A backend runs one forward over a batch of (possibly tree-shaped) new tokens on top of a per-row
KV cache, with the attention mask and position ids given explicitly, and returns logits and the
last hidden states (the final norm's output, the LM head's input). After each forward the engine
commits, per row, which of the new tokens stay in the cache (the accepted path); the rest vanish.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Protocol

import torch


@dataclasses.dataclass(frozen=True)
class TargetInfo:
    """Static facts about a target model the engine and drafter checks need."""

    name: str
    hidden_size: int
    vocab_size: int
    max_positions: int
    stop_token_ids: tuple[int, ...]


class ForwardOutput:
    """A forward's result. The logits are projected from the hidden states when first read, so a
    prefill that needs only each row's last token (``logits_at``) skips the LM head for the others
    (for Qwen2.5-1.5B's 151,936 x 1,536 head, as many products as 4 of its decoder layers per token).

    Attributes:
        hidden: (batch, n, H) last hidden states (final-norm output) at each new token.
        logits: (batch, n, V) float32 next-token logits after each new token.
    """

    def __init__(self, hidden: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.hidden = hidden
        self._project = project

    @functools.cached_property
    def logits(self) -> torch.Tensor:
        return self._project(self.hidden)

    def logits_at(self, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(k, V) float32 logits after new tokens ``index`` of ``rows`` (both (k,) long), projecting
        only those tokens unless every token's logits were already read."""
        if "logits" in self.__dict__:
            return self.logits[rows, index]
        return self._project(self.hidden[rows, index])


def few_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   max_rows: int = 64) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, computed as ``weight @ x^T`` when x has 2..max_rows rows.

    The same products; but CPU BLAS repacks the weight for a tiny ``x @ W^T``, which costs more than
    the product, while ``W @ x^T`` streams the weight once (4 rows of SmolLM2's 49,152 x 576 LM head:
    24 ms -> 7.6 ms with MKL). The result is made row-major again: the fused CPU attention kernel
    falls back to a slow path on inputs without unit stride. ``max_rows`` 0 disables the rewrite.
    """
    rows = x.numel() // x.shape[-1]
    if 1 < rows <= max_rows:
        y = (weight @ x.reshape(rows, -1).T).T.contiguous().view(*x.shape[:-1], weight.shape[0])
        return y if bias is None else y + bias
    return torch.nn.functional.linear(x, weight, bias)


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """A oneDNN-prepacked copy of a linear weight, or None where that does not apply.

    On CPUs, MKL's GEMM for a few rows picks a different kernel for nearly every row count (the
    verify cost of SmolLM2 jumped between 4 and 8 tree tokens, and 12 tokens cost more than 16);
    oneDNN with the weight reordered once at load time is faster for every count from 1 to 64 and
    grows smoothly (docs/PERFORMANCE.md). Only CPU tensors with oneDNN support for their dtype are
    packed (fp32 everywhere; bf16 needs AVX-512 or AVX-NE-CONVERT); everything else keeps the plain path.
    """
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    try:
        with torch.no_grad():
            return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 16)
    except (RuntimeError, AttributeError, NotImplementedError):
        return None


EVERY_ROW = 1 << 62  # a Linear's int4_max_rows when its 4-/8-bit kernel runs every row count
BF16_KERNEL_MAX_ROWS = 8  # rows up to which our bf16 kernel (``few_rows``) runs a product


def pack_bf16(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` (out, in) in the layout of our bf16 kernel (``kernels``, csrc/bf16_gemm.cpp): tiles
    of 16 output features, inputs in pairs, (out / 16, in / 2, 32); None where the kernel cannot run
    (not bf16 on CPU, out not a multiple of 16, in odd, or the kernels unavailable)."""
    from redrafter.models import kernels

    out_features, in_features = weight.shape
    if (weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or out_features % 16 or in_features % 2
            or kernels.load() is None):
        return None
    return (weight.detach().reshape(out_features // 16, 16, in_features // 2, 2).permute(0, 2, 1, 3)
            .contiguous().view(out_features // 16, in_features // 2, 32))


class Linear:
    """A linear layer's weight and bias, run by the fastest kernel available for it.

    ``packed`` (see ``pack_linear_weight``) selects oneDNN's prepacked kernel; without it, the
    product is ``few_row_linear`` with ``max_rows``. ``int4`` (``models.int4.Int4Weight``, for
    weights on a 4-bit grid) runs products of up to ``int4_max_rows`` rows (default: the kernel's own
    ``max_rows``) with the int4 kernel, which streams a quarter of the bytes but grows faster with the
    rows. ``few_rows`` (``pack_bf16``, a second copy of the weight, so only for small weights such as a
    drafter's) runs products of up to ``BF16_KERNEL_MAX_ROWS`` rows with our bf16 kernel, which for
    a drafter's 576 x 576 layer takes 14 us for one row where oneDNN takes 33. The plain ``weight`` is kept for other code (a tied embedding, the transformers modules the native backend shares its tensors
    with) unless the owner releases it (``weight`` None, only with a packed copy).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, pack: bool = False,
                 max_rows: int = 64, int4=None, int4_max_rows: int | None = None, few_rows: bool = False) -> None:
        self.weight, self.bias, self.max_rows = weight, bias, max_rows
        self.packed = pack_linear_weight(weight) if pack else None
        self.bf16 = pack_bf16(weight) if few_rows else None
        if self.bf16 is not None:
            from redrafter.models import kernels

            self._bf16_mm = kernels.load().bf16_mm
        self.int4 = int4
        if int4 is None:
            int4_max_rows = 0
        elif int4_max_rows is None:
            int4_max_rows = int4.max_rows
        self.int4_max_rows = int4_max_rows

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ weight^T + bias``, plus ``residual`` when given (fused into the product's output
        where the kernel can: the same sum, one operation less)."""
        if self.int4 is not None and x.numel() <= self.int4_max_rows * x.shape[-1]:
            y = self.int4(x)
            if self.bias is not None:
                y = y + self.bias
            return y if residual is None else residual + y
        if self.bf16 is not None and x.numel() <= BF16_KERNEL_MAX_ROWS * x.shape[-1]:
            y = self._bf16_mm(x.reshape(-1, x.shape[-1]).contiguous(), self.bf16)
            y = y.view(*x.shape[:-1], y.shape[-1])
            if self.bias is not None:
                y = y + self.bias
            return y if residual is None else residual + y
        if self.packed is not None:
            if residual is not None:
                return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.packed, self.bias, "add")
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        y = few_row_linear(x, self.weight, self.bias, self.max_rows)
        return y if residual is None else residual + y


class KVCache(Protocol):
    """Per-row cache state. ``lengths`` (batch,) counts the committed tokens of each row; a row's
    next token sits at position ``lengths[row]``."""

    lengths: torch.Tensor


class TargetModel(Protocol):
    info: TargetInfo
    device: torch.device
    dtype: torch.dtype
    weights: str  # "dense" or "int4" (4-bit products for steps of a few tokens; models/int4.py)

    def new_cache(self, batch_size: int, *, plain_decoding: bool = False) -> KVCache:
        """An empty cache for ``batch_size`` rows. ``plain_decoding``: every step after the prefill will
        bring one token per row (no trees), so the backend may lay the cache out for that."""

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The input embedding E: (...,) token ids -> (..., H)."""

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                cache: KVCache) -> ForwardOutput:
        """Run the new tokens on top of the committed cache.

        Args:
            tokens:    (batch, n) new token ids.
            positions: (batch, n) their position ids (row length + depth for tree tokens).
            mask:      (batch, n, n) bool, True where new token q may attend new token k. Every new
                       token also sees all committed tokens of its row.
            cache:     the rows' cache; the n new tokens are held pending until ``commit``.
        """

    def commit(self, cache: KVCache, keep: torch.Tensor, counts: torch.Tensor) -> None:
        """Keep, per row, the first ``counts[b]`` of the new tokens listed in ``keep[b]`` (indices
        into the last forward's n tokens, in sequence order), appended after the committed ones;
        drop every other pending token. keep: (batch, A) long; counts: (batch,) long, <= A."""

    def select_rows(self, cache: KVCache, rows: torch.Tensor) -> None:
        """Keep only these rows of the cache, in this order (rows that finished leave the batch).
        rows: (new_batch,) long indices into the current batch; no forward may be pending."""
