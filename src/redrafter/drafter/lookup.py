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
with none for any n >= 1 there is no proposal. The copy may run into the tokens it proposes, as an
LZ77 copy does: in a loop ``... A B C A B`` the match ``A B`` one period back proposes ``C A B C ...``
for as many tokens as asked, the loop continued.

How sure a copied token is grows with the length m of the match behind it: the found n-gram
extended backwards while the tokens before both windows agree (up to ``MATCH_CAP``). After the
first copied token proves right the match is one longer, so the j-th copied token is scored by the
confidence for a match of m + j - 1 tokens: depth j scores the sum of log c over m .. m + j - 1.
On 640 answers SmolLM2 wrote to ShareGPT prompts, the first copied token was right 22 % of the time
after a 1-token match, 74 % after 4, 88 % after 10, 94 % after 20, 96 % after 30, 98-99 % after 40-63
and 99.9 % after 64 or more (a loop); every later token was right as often as a first token after a
match of m + j - 1 (``copy_accuracy``; docs/PERFORMANCE.md, "Long loops"); ``config.LOOKUP_CONFIDENCE``
follows them.

Under a tree cap (``BeamConfig.max_tree_tokens``) the looked-up tokens compete with the drafter's
nodes for the K verified slots. A drafter node is ranked by its path probability under q, a
looked-up token by that product of confidences; ``BeamConfig.extend_prob`` lets the nodes at or
above it past the cap, so in a loop a step verifies a long stretch of it.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch

from redrafter.config import LOOKUP_MATCH_CAP, MAX_TREE_TOKENS
from redrafter.tree import NO_TOKEN, cap_tree, drop_below, node_scores, tree_kernel


def context_lookup(history: Sequence[int], *, num_tokens: int, max_ngram: int) -> list[int]:
    """The tokens that followed the most recent earlier occurrence of the history's last n tokens,
    trying n = ``max_ngram`` down to 1: ``num_tokens`` of them, continued past the history's end by
    copying the copy (a loop goes on), [] when nothing matches.

    Args:
        history: the row's tokens so far (prompt and output, ending with g0).
    """
    return matched_lookup(history, num_tokens=num_tokens, max_ngram=max_ngram)[1]


MATCH_CAP = LOOKUP_MATCH_CAP  # how far back a match is measured: longer ones get the table's last confidence


def matched_lookup(history: Sequence[int], *, num_tokens: int, max_ngram: int) -> tuple[int, list[int]]:
    """``context_lookup`` and the length m of its match (``match_length``; 0 when nothing matched). A
    ``History`` answers from its index; any other sequence is scanned."""
    if isinstance(history, History):
        return history.lookup(num_tokens=num_tokens, max_ngram=max_ngram)
    tokens = np.asarray(history, dtype=np.int64)
    length = len(tokens)
    for n in range(min(max_ngram, length - 1), 0, -1):
        # start s of every earlier window tokens[s:s+n] (s + n < length: something follows it)
        match = tokens[: length - n] == tokens[length - n]
        for k in range(1, n):
            match &= tokens[k: length - n + k] == tokens[length - n + k]
        starts = np.flatnonzero(match)
        if len(starts):
            start = int(starts[-1])
            return match_length(history, start, n), copy_after(history, start + n, num_tokens)
    return 0, []


def match_length(tokens: Sequence[int], start: int, n: int) -> int:
    """How many tokens the window ``tokens[start:start+n]`` and the last n tokens agree on, counting
    backwards from their ends past the n they share (at most ``max(n, MATCH_CAP)``)."""
    m, i, j = n, start - 1, len(tokens) - n - 1
    while m < MATCH_CAP and i >= 0 and tokens[i] == tokens[j]:
        m, i, j = m + 1, i - 1, j - 1
    return m


def copy_after(tokens: Sequence[int], source: int, num_tokens: int) -> list[int]:
    """``num_tokens`` tokens copied from ``tokens[source:]`` (source < len(tokens)) onwards, running
    on into the copy itself past the end, as an LZ77 copy does: the loop continued."""
    length = len(tokens)
    out = [int(t) for t in tokens[source: source + num_tokens]]
    while len(out) < num_tokens:  # position source + k >= length is copy position source + k - length
        out.append(out[source + len(out) - length])
    return out


def _dropping_index(name: str):
    """``list.<name>`` for ``History``, dropping its n-gram index first (the change is not an append)."""
    def method(self, *args, **kwargs):
        self._forget()
        return getattr(list, name)(self, *args, **kwargs)

    method.__name__ = name
    return method


class History(list):
    """A row's tokens (prompt, then output) that keeps an index of its n-grams as it grows.

    The index maps every n-gram (n <= the ``max_ngram`` asked for) that something follows to its
    latest start. New tokens are indexed at the next ``lookup`` (about ``max_ngram`` dictionary
    writes per token), so a step's lookup is a few dictionary reads, where scanning the history
    takes time in its length. The engine keeps each row's tokens in one. Appending (``append``,
    ``extend``, ``+=``) keeps the index; every other change to the list drops it, and the next
    lookup rebuilds it.
    """

    __slots__ = ("_starts", "_indexed", "_max_ngram")

    def __init__(self, tokens: Sequence[int] = ()) -> None:
        super().__init__(tokens)
        self._forget()

    def _forget(self) -> None:
        self._starts: dict[tuple[int, ...], int] = {}
        self._indexed = 0  # every window ending (exclusive) before this position is indexed
        self._max_ngram = 0

    __setitem__ = _dropping_index("__setitem__")
    __delitem__ = _dropping_index("__delitem__")
    __imul__ = _dropping_index("__imul__")
    insert, pop, remove = _dropping_index("insert"), _dropping_index("pop"), _dropping_index("remove")
    clear, sort, reverse = _dropping_index("clear"), _dropping_index("sort"), _dropping_index("reverse")

    def lookup(self, *, num_tokens: int, max_ngram: int) -> tuple[int, list[int]]:
        """``matched_lookup`` of these tokens."""
        length = len(self)
        if max_ngram > self._max_ngram:  # longer n-grams than indexed: start again
            self._forget()
            self._max_ngram = max_ngram
        starts, widest = self._starts, self._max_ngram
        # A window tokens[s:e] is followed by something once e < length: index ends up to length - 1.
        for end in range(max(self._indexed, 1), length):
            for n in range(1, min(widest, end) + 1):
                starts[tuple(self[end - n: end])] = end - n  # later windows overwrite: the latest start
        self._indexed = max(self._indexed, length)
        for n in range(min(max_ngram, length - 1), 0, -1):
            start = starts.get(tuple(self[length - n:]))
            if start is not None:
                return match_length(self, start, n), copy_after(self, start + n, num_tokens)
        return 0, []


def copy_accuracy(answers: Iterable[tuple[Sequence[int], Sequence[int]]], *, num_tokens: int = 16,
                  max_ngram: int = 4) -> dict[int, tuple[int, int]]:
    """How often a looked-up token is right, by the match length behind it: the data behind
    ``config.LOOKUP_CONFIDENCE``.

    At every position of each answer, the lookup runs on the prompt and the answer so far (ending
    with the answer's token there, as g0) and its copy is compared with what the answer says next.
    The j-th copied token (j = 0, 1, ...) counts under match length min(m + j, MATCH_CAP), m the
    match found, as long as the tokens before it were right (later ones are never verified).

    Args:
        answers: (prompt ids, answer ids) pairs, e.g. datagen's ``prompt_ids`` and ``response_ids``.
    Returns:
        {match length: (copied tokens tried, right)}.
    """
    counts: dict[int, list[int]] = {}
    for prompt, answer in answers:
        history = History(prompt)
        for i, token in enumerate(answer[:-1]):
            history.append(token)
            m, copied = history.lookup(num_tokens=num_tokens, max_ngram=max_ngram)
            for j, (guess, truth) in enumerate(zip(copied, answer[i + 1:])):
                tally = counts.setdefault(min(m + j, MATCH_CAP), [0, 0])
                tally[0] += 1
                tally[1] += guess == truth
                if guess != truth:
                    break
    return {m: (tries, right) for m, (tries, right) in sorted(counts.items())}


def lookup_beams(g0: torch.Tensor, history: Sequence[Sequence[int]], *, num_tokens: int, max_ngram: int,
                 confidence: Sequence[float] = (1.0,)) -> tuple[torch.Tensor, torch.Tensor]:
    """One beam per row, ``[g0, looked-up tokens...]``, ``NO_TOKEN`` where the lookup found fewer.

    Args:
        g0:         (batch,) the target's own next token (the last token of each history).
        history:    one token sequence per row, ending with g0 (a ``History`` is looked up in its index).
        confidence: c_m for a match of m tokens, m = 1, 2, ... (the last one for longer matches).
    Returns:
        beams (batch, 1, 1 + num_tokens) long, and their path scores (batch, 1, 1 + num_tokens):
        at depth j the sum of log c over m .. m + j - 1 (0 at g0, -inf past the looked-up tokens),
        comparable with the drafter's summed log q.
    """
    length = 1 + num_tokens
    logs = [math.log(c) for c in confidence]
    beams, scores = [], []
    for first, tokens in zip(g0.tolist(), history):
        m, found = matched_lookup(tokens, num_tokens=num_tokens, max_ngram=max_ngram)
        path = [0.0]
        for j in range(len(found)):
            path.append(path[-1] + logs[min(m + j, len(logs)) - 1])
        missing = length - 1 - len(found)
        beams.append([first, *found] + [NO_TOKEN] * missing)
        scores.append(path + [float("-inf")] * missing)
    batch = len(beams)
    return (torch.tensor(beams, dtype=torch.long).view(batch, 1, length).to(g0.device),
            torch.tensor(scores, dtype=torch.float32).view(batch, 1, length).to(g0.device))


def join_beams(beams: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """Beams of two proposers side by side, the shorter ones padded with ``NO_TOKEN``.

    Args:
        beams: (batch, W, L), extra: (batch, W', L') with the same g0 at position 0.
    Returns:
        (batch, W + W', max(L, L')).
    """
    return join(beams, extra, NO_TOKEN)


def join(values: torch.Tensor, extra: torch.Tensor, fill) -> torch.Tensor:
    """(batch, W, L, ...) and (batch, W', L', ...) -> (batch, W + W', max(L, L'), ...), padded with ``fill``."""
    length = max(values.shape[2], extra.shape[2])
    return torch.cat([pad_length(values, length, fill), pad_length(extra, length, fill)], dim=1)


def joined_tree(beams: torch.Tensor, scores: torch.Tensor, extra: torch.Tensor, extra_scores: torch.Tensor, *,
                min_prob: float = 0.0, max_tokens: int = 0, extend_prob: float = 0.0) -> torch.Tensor:
    """Two proposers' beams as one tree: ``join_beams``, then ``drop_below`` with ``min_prob`` > 0, then
    the cap to ``max_tokens`` nodes (``cap_tree``) when > 0, on the joined path scores (-inf where a
    beam was padded), letting past the cap the nodes scoring at least ``extend_prob`` (> 0) up to
    ``config.MAX_TREE_TOKENS`` in all. Both proposers' scores fall along a path, so what stays is a tree.

    Args:
        beams, scores: (batch, W, L) the first proposer's beams and path scores (log).
        extra, extra_scores: (batch, W', L') the second's, with the same g0.
    Returns:
        (batch, W + W', max(L, L')). On CPU one call of our tree kernel, with the same result.
    """
    floor = math.log(min_prob) if min_prob > 0 else float("-inf")
    sure = math.log(extend_prob) if extend_prob > 0 else math.inf
    module = tree_kernel(beams, torch.long)
    if module is not None:
        return module.cap_tree_joined(beams, scores, extra, extra_scores, floor, max_tokens, sure, MAX_TREE_TOKENS)
    joined = join_beams(beams, extra)
    joined_scores = join(scores, extra_scores, float("-inf"))
    if min_prob > 0:
        joined = drop_below(joined, joined_scores, min_prob)
    if max_tokens > 0:
        joined = cap_tree(joined, node_scores(joined, joined_scores), max_tokens, sure_log_prob=sure,
                          most_tokens=MAX_TREE_TOKENS)
    return joined


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
