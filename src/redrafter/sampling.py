"""Sampling: the one place where logits become the distributions tokens are drawn from.

``probabilities(logits, params)`` is applied to the target's logits by plain sampling and by the
speculative path alike (and to the drafter's logits when it samples drafts), so both emit tokens
from exactly the same p: temperature scaling, then top-k, then top-p (nucleus) truncation, then
softmax. Temperature 0 means greedy: p is the point mass on the argmax.

Per-row random streams: ``row_generators(seed, rows)`` gives each row its own ``torch.Generator``,
derived from (seed, row) by hashing, so rows are independent and a run is reproducible.
"""

from __future__ import annotations

import hashlib
import secrets

import torch

from redrafter.config import SamplingParams


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(..., V) logits -> (..., V) float32 probabilities after temperature / top-k / top-p."""
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it already does.
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = before >= params.top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)


def row_seed(seed: int, row: int) -> int:
    digest = hashlib.sha256(f"redrafter|{seed}|{row}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def row_generators(seed: int | None, rows: int, device: torch.device | str = "cpu",
                   offset: int = 0) -> list[torch.Generator]:
    """Independent generators for rows ``offset .. offset + rows - 1`` of a run seeded with ``seed``
    (a random seed when None)."""
    base = secrets.randbits(62) if seed is None else seed
    return [torch.Generator(device=device).manual_seed(row_seed(base, offset + r)) for r in range(rows)]


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from a (V,) distribution (the argmax of a point mass needs no randomness)."""
    return int(torch.multinomial(probs, 1, generator=generator))
