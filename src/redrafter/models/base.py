"""The target-model backend protocol: everything the engine needs from an LLM.

A backend runs one forward over a batch of (possibly tree-shaped) new tokens on top of a per-row
KV cache, with the attention mask and position ids given explicitly, and returns logits and the
last hidden states (the final norm's output, the LM head's input). After each forward the engine
commits, per row, which of the new tokens stay in the cache (the accepted path); the rest vanish.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch


@dataclasses.dataclass(frozen=True)
class TargetInfo:
    """Static facts about a target model the engine and drafter checks need."""

    name: str
    hidden_size: int
    vocab_size: int
    max_positions: int
    stop_token_ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ForwardOutput:
    """Attributes:
        logits: (batch, n, V) float32 next-token logits after each new token.
        hidden: (batch, n, H) last hidden states (final-norm output) at each new token.
    """

    logits: torch.Tensor
    hidden: torch.Tensor


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


class KVCache(Protocol):
    """Per-row cache state. ``lengths`` (batch,) counts the committed tokens of each row; a row's
    next token sits at position ``lengths[row]``."""

    lengths: torch.Tensor


class TargetModel(Protocol):
    info: TargetInfo
    device: torch.device
    dtype: torch.dtype

    def new_cache(self, batch_size: int) -> KVCache:
        """An empty cache for ``batch_size`` rows."""

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
