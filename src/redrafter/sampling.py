"""Sampling: the one place where logits become the distributions tokens are drawn from.

``probabilities(logits, params)`` is applied to the target's logits by plain sampling and by the
speculative path alike (and to the drafter's logits when it samples drafts), so both emit tokens
from exactly the same p: temperature scaling, then top-k, then top-p (nucleus) truncation, then
softmax. Temperature 0 means greedy: p is the point mass on the argmax.

Truncations keep ties: top-k keeps every token whose logit is at least the k-th largest, and top-p
every token whose probability is at least that of the last token of the smallest most-probable-first
prefix whose mass reaches top_p. So p does not depend on how a sort orders equal values (bf16
logits tie often).

Draws: ``inverse_cdf(probs, u)`` turns one uniform number into a token (the first token whose
cumulative mass, summed in float64, exceeds u times the total). torch.multinomial takes about 1 ms
per draw from 49,152 tokens on this CPU (it draws one exponential number per token); this takes
about 50 us. The C++ tree walk (csrc/tree.cpp) draws the same way from the same numbers.

Per-row random streams: ``row_generators(seed, rows)`` gives each row its own ``torch.Generator``,
derived from (seed, row) by hashing, so rows are independent and a run is reproducible.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Sequence

import torch

from redrafter.config import SamplingParams

NUCLEUS_CANDIDATES = (256, 4096)  # top-p looks for its nucleus among this many tokens before sorting all


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
    probs = logits.softmax(dim=-1)
    if params.top_p < 1.0:
        probs = logits.masked_fill(probs < nucleus_threshold(probs, params.top_p), float("-inf")).softmax(dim=-1)
    return probs


def nucleus_threshold(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """(..., 1) the probability of the last token of each row's nucleus: the smallest most-probable-
    first prefix whose mass reaches ``top_p``. The prefix is looked for among the few hundred most
    probable tokens (a partial top-k), and among all of them (a full sort, about 3.6 ms for 49,152
    tokens on this CPU) only when those do not hold it."""
    vocab = probs.shape[-1]
    for k in (*[k for k in NUCLEUS_CANDIDATES if k < vocab], vocab):
        top = probs.topk(k, dim=-1).values  # most probable first
        reached = top.cumsum(dim=-1) >= top_p
        if k == vocab or bool(reached[..., -1].all()):
            # The first position whose mass reaches top_p; where none does (the total falls short of
            # top_p by rounding) the last, which keeps every token.
            last = torch.where(reached[..., -1:], reached.int().argmax(dim=-1, keepdim=True), k - 1)
            return top.gather(-1, last)
    raise AssertionError("unreachable")


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Tokens from (..., V) probabilities (any nonnegative weights; they need not sum to 1) and
    (...) uniform numbers in [0, 1): the first token whose cumulative weight, summed in float64,
    exceeds u times the total. Never a token of weight 0 (for a row whose weights are not all 0)."""
    cdf = probs.double().cumsum(dim=-1)
    x = u.double() * cdf[..., -1]
    index = torch.searchsorted(cdf, x.unsqueeze(-1), right=True).squeeze(-1)
    vocab = probs.shape[-1]
    # x rounds up to the total only when u is within 2^-53 of 1: take the last token of nonzero weight.
    last = torch.where(probs > 0, torch.arange(vocab, device=probs.device), -1).amax(dim=-1).clamp(min=0)
    return torch.where(index >= vocab, last, index)


def uniforms(generators: Sequence[torch.Generator | None], count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(rows, count) float64 uniform numbers in [0, 1), row r from ``generators[r]``."""
    if not generators:
        return torch.empty(0, count, dtype=torch.float64, device=device)
    return torch.stack([torch.rand(count, generator=g, dtype=torch.float64, device=device) for g in generators])


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
    """One token from a (V,) distribution, by ``inverse_cdf`` with one number from ``generator``."""
    u = torch.rand((), generator=generator, dtype=torch.float64, device=probs.device)
    return int(inverse_cdf(probs, u))
