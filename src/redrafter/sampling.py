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
cumulative weight exceeds u times the total). The cumulative weights are float64 sums in a fixed
order (``cumulative_weights``): the vocabulary is cut into ``CDF_BLOCKS`` runs of consecutive
tokens, each summed in order from 0, and a token's cumulative weight is the sum of the runs before
its own plus its run's sum so far. The runs sum side by side, so the C++ draw (csrc/tree.cpp, which
the tree walk and ``inverse_cdf`` use on CPU) takes about 15 us for 49,152 tokens, where one chain
of as many dependent float64 additions took about 50; both compute the same values, so a seed draws
the same tokens either way. torch.multinomial takes about 1 ms per draw from 49,152 tokens on this CPU (it
draws one exponential number per token).

Per-row random streams: ``row_generators(seed, rows)`` gives each row its own ``torch.Generator``,
derived from (seed, row) by hashing, so rows are independent and a run is reproducible.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Sequence

import torch

from redrafter.config import SamplingParams
from redrafter.tree import tree_kernel

NUCLEUS_CANDIDATES = (256, 4096)  # top-p looks for its nucleus among this many tokens before sorting all
TINY_TEMPERATURE = 1e-20  # below it, logits / T can overflow float32 (|logit| / T > 3.4e38)
CDF_BLOCKS = 16  # runs of consecutive tokens whose sums make up the cumulative weights (csrc/tree.cpp: kCdfBlocks)


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(..., V) logits -> (..., V) float32 probabilities after temperature / top-k / top-p."""
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    if params.temperature >= TINY_TEMPERATURE:
        logits = logits / params.temperature
    else:  # logits / T would overflow to inf and softmax give NaN: divide the gaps to the maximum
        top = logits.amax(dim=-1, keepdim=True)
        logits = torch.where(logits == top, 0.0, (logits - top) / params.temperature)  # -inf below the top
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


def cumulative_weights(weights: torch.Tensor) -> torch.Tensor:
    """(..., V) nonnegative weights -> (..., V) float64 cumulative weights, the last one the total.

    The V tokens are cut into ``CDF_BLOCKS`` runs of ceil(V / CDF_BLOCKS) consecutive tokens (the
    last runs shorter or empty). Each run is summed in order from 0 (s_k); the run starts are the
    sums s_0, s_0 + s_1, ... taken in order (P_k); and token i of run k has cumulative weight
    P_k + (its run's sum up to i). Nondecreasing, and equal to P_{k+1} at the end of run k, so the
    last value is the total. csrc/tree.cpp sums in exactly this order."""
    vocab = weights.shape[-1]
    run = -(-vocab // CDF_BLOCKS)
    padded = torch.nn.functional.pad(weights.double(), (0, run * CDF_BLOCKS - vocab))  # + 0.0 changes no sum
    within = padded.unflatten(-1, (CDF_BLOCKS, run)).cumsum(dim=-1)  # each run from 0, in order
    ends = within[..., -1].cumsum(dim=-1)  # P_1 .. P_B
    starts = torch.nn.functional.pad(ends[..., :-1], (1, 0))  # P_0 = 0 .. P_{B-1}
    return (starts.unsqueeze(-1) + within).flatten(-2)[..., :vocab].contiguous()


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Tokens from (..., V) probabilities (any nonnegative weights; they need not sum to 1) and
    (...) uniform numbers in [0, 1): the first token whose cumulative weight (``cumulative_weights``)
    exceeds u times the total. Never a token of weight 0 (for a row whose weights are not all 0).
    On CPU float32 this runs in C++ (csrc/tree.cpp, the same values; tests/test_sampling.py)."""
    module = tree_kernel(probs, torch.float32)
    if module is not None and u.shape == probs.shape[:-1] and u.device.type == "cpu":
        flat = probs.reshape(-1, probs.shape[-1])
        return module.inverse_cdf(flat, u.reshape(-1).double()).view(u.shape)
    return inverse_cdf_tensors(probs, u)


def inverse_cdf_tensors(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``inverse_cdf`` in tensor operations (any device; the definition the C++ version is tested against)."""
    cdf = cumulative_weights(probs)
    x = u.double() * cdf[..., -1]
    index = torch.searchsorted(cdf, x.unsqueeze(-1), right=True).squeeze(-1)
    vocab = probs.shape[-1]
    # x rounds up to the total only when u is within 2^-53 of 1: take the last token of nonzero weight.
    last = torch.where(probs > 0, torch.arange(vocab, device=probs.device), -1).amax(dim=-1).clamp(min=0)
    return torch.where(index >= vocab, last, index)


def uniforms(generators: Sequence[torch.Generator | None], count: int | Sequence[int],
             device: torch.device | str = "cpu") -> torch.Tensor:
    """(rows, count) float64 uniform numbers in [0, 1), row r from ``generators[r]``. With one count
    per row, row r takes ``count[r]`` numbers and is padded with zeros to the largest."""
    counts = [count] * len(generators) if isinstance(count, int) else list(count)
    width = count if isinstance(count, int) else max(counts, default=0)
    if not generators:
        return torch.empty(0, width, dtype=torch.float64, device=device)
    out = torch.zeros(len(generators), width, dtype=torch.float64, device=device)
    for row, (generator, n) in enumerate(zip(generators, counts)):
        out[row, :n] = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
    return out


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
