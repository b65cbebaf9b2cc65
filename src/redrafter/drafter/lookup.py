"""Context lookup: one more branch for the draft tree, copied from what the row has already seen.

Models repeat their context (names, code, lists, the question's wording) and small models repeat
themselves. Prompt lookup decoding (Saxena 2023; transformers' ``prompt_lookup_num_tokens``, vLLM's
n-gram proposer) drafts by finding the last n tokens of the row earlier in its own history and
proposing what followed them there. Here that guess joins the recurrent drafter's beams as one more
beam, so a step verifies both in one forward and keeps whichever the target agrees with further.
Drafts are proposals only: verification stays exact (greedy and sampling; a lookup token is a
deterministic guess, i.e. a point-mass proposal, verify.py).

Worked example (``max_ngram`` 3, ``num_tokens`` 3): history ``[7 3 9 4 1 3 9]`` ends with the
3-gram ``1 3 9``, which does not occur earlier; the 2-gram ``3 9`` does, at index 1, followed by
``4 1 3``: the proposal is ``[4, 1, 3]``. With several earlier occurrences the most recent wins;
with none for any n >= 1 there is no proposal.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from redrafter.tree import NO_TOKEN


def context_lookup(history: Sequence[int], *, num_tokens: int, max_ngram: int) -> list[int]:
    """The tokens that followed the most recent earlier occurrence of the history's last n tokens,
    trying n = ``max_ngram`` down to 1; at most ``num_tokens`` of them, [] when nothing matches.

    Args:
        history: the row's tokens so far (prompt and output, ending with g0).
    """
    tokens = np.asarray(history, dtype=np.int64)
    length = len(tokens)
    for n in range(min(max_ngram, length - 1), 0, -1):
        # start s of every earlier window tokens[s:s+n] (s + n < length: something follows it)
        match = tokens[: length - n] == tokens[length - n]
        for k in range(1, n):
            match &= tokens[k: length - n + k] == tokens[length - n + k]
        starts = np.flatnonzero(match)
        if len(starts):
            follow = starts[-1] + n
            return tokens[follow: follow + num_tokens].tolist()
    return []


def lookup_beams(g0: torch.Tensor, history: Sequence[Sequence[int]], *, num_tokens: int,
                 max_ngram: int) -> torch.Tensor:
    """One beam per row, ``[g0, looked-up tokens...]``, ``NO_TOKEN`` where the lookup found fewer.

    Args:
        g0:      (batch,) the target's own next token (the last token of each history).
        history: one token sequence per row, ending with g0.
    Returns:
        (batch, 1, 1 + num_tokens) long.
    """
    beams = torch.full((len(history), 1, 1 + num_tokens), NO_TOKEN, dtype=torch.long)
    beams[:, 0, 0] = g0.cpu()
    for b, tokens in enumerate(history):
        found = context_lookup(tokens, num_tokens=num_tokens, max_ngram=max_ngram)
        beams[b, 0, 1: 1 + len(found)] = torch.tensor(found, dtype=torch.long)
    return beams.to(g0.device)


def join_beams(beams: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """Beams of two proposers side by side, the shorter ones padded with ``NO_TOKEN``.

    Args:
        beams: (batch, W, L), extra: (batch, W', L') with the same g0 at position 0.
    Returns:
        (batch, W + W', max(L, L')).
    """
    length = max(beams.shape[-1], extra.shape[-1])
    return torch.cat([pad_length(beams, length, NO_TOKEN), pad_length(extra, length, NO_TOKEN)], dim=1)


def pad_length(values: torch.Tensor, length: int, fill) -> torch.Tensor:
    """Pad dimension 2 of (batch, W, L, ...) to ``length`` with ``fill``."""
    missing = length - values.shape[2]
    if missing <= 0:
        return values
    shape = list(values.shape)
    shape[2] = missing
    return torch.cat([values, values.new_full(shape, fill)], dim=2)


def point_masses(beams: torch.Tensor, vocab: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The proposal distribution of deterministic drafted tokens: one-hot rows (zero at ``NO_TOKEN``).

    Args:
        beams: (batch, W, L) with g0 first.
    Returns:
        (batch, W, L-1, vocab).
    """
    drafted = beams[:, :, 1:]
    probs = torch.zeros(*drafted.shape, vocab, dtype=dtype, device=beams.device)
    present = drafted != NO_TOKEN
    probs[present] = torch.nn.functional.one_hot(drafted[present], vocab).to(dtype)
    return probs
