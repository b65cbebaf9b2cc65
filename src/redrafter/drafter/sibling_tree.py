"""Sampled draft trees whose siblings are drawn without replacement ("tree" draft mode).

Drawing W independent paths from q (the "sample" mode) wastes slots: where q is peaked, several
paths draw the same first token, and a repeated candidate is always rejected the second time (after
its first rejection the residual is 0 there). Here each node's children are instead drawn one after
another from q with the earlier siblings removed (``without``), so they are distinct, and the tree
walk tests the k-th child against the q it was drawn from, ``q`` without the k-1 children before it,
renormalised (verify.py, ``DraftProbs.distinct``). That is recursive rejection sampling without
replacement (Jeon et al. 2024, "Recursive Speculative Decoding"); every emitted token still follows p
exactly.

The shape of the tree is fixed before anything is drawn: a set of rank paths, (0,) the first child
of the root, (0, 1) the second child of that, and so on (``sibling_template``). Only the drafter's q
decides which tokens fill it. A child that cannot be drawn because q has no mass left (a top-k or
top-p q with fewer tokens than the node has children) is left out, with everything below it; that
depends only on the siblings drawn before it, so it is a stopping rule, which keeps the walk exact.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import torch

from redrafter.config import SamplingParams
from redrafter.sampling import inverse_cdf, probabilities, uniforms
from redrafter.tree import NO_TOKEN

# P(the k-th drawn child of a reached node is the one accepted), by rank: orders the nodes of
# ``sibling_template``. A rough estimate, not fitted to any drafter; only the order of the products
# matters, and any shape keeps the output exact.
RANK_ACCEPTANCE = (0.55, 0.17, 0.08, 0.04, 0.02)


@functools.lru_cache(maxsize=64)
def sibling_template(nodes: int, depth: int,
                     rank_acceptance: Sequence[float] = RANK_ACCEPTANCE) -> tuple[tuple[int, ...], ...]:
    """The ``nodes`` rank paths of at most ``depth`` ranks with the largest products of
    ``rank_acceptance`` (an estimate of how likely the walk reaches and accepts each node), sorted.
    Every prefix of a chosen path is chosen too (a child's product is smaller than its parent's, and
    a later sibling's than an earlier one's), so the paths form a tree."""
    if nodes < 0 or depth < 1:
        raise ValueError(f"sibling_template needs nodes >= 0 and depth >= 1, got {nodes}, {depth}")
    rates = list(rank_acceptance)
    value = lambda path: math.prod(rates[min(r, len(rates) - 1)] for r in path)  # noqa: E731
    chosen: list[tuple[int, ...]] = []
    frontier = {(0,)}
    while len(chosen) < nodes and frontier:
        best = max(sorted(frontier), key=value)
        frontier.remove(best)
        chosen.append(best)
        frontier.add(best[:-1] + (best[-1] + 1,))
        if len(best) < depth:
            frontier.add(best + (0,))
    return tuple(sorted(chosen))


@dataclasses.dataclass(frozen=True)
class TreeShape:
    """A template laid out by depth. ``levels[d]`` lists the nodes of depth d + 1 in rank-path order,
    each as (index of its parent among depth d's nodes, or 0 for the root; its rank). ``leaves``
    lists, per beam, the index of its node at each depth it reaches."""

    levels: tuple[tuple[tuple[int, int], ...], ...]
    leaves: tuple[tuple[int, ...], ...]

    @staticmethod
    def of(paths: Sequence[tuple[int, ...]]) -> "TreeShape":
        paths = sorted(set(paths))
        known = set(paths) | {()}
        for path in paths:
            if path[:-1] not in known or (path[-1] > 0 and path[:-1] + (path[-1] - 1,) not in known):
                raise ValueError(f"rank paths must be closed under prefixes and earlier siblings: {path}")
        depth = max((len(p) for p in paths), default=0)
        by_depth = [[p for p in paths if len(p) == d + 1] for d in range(depth)]
        index = {p: i for level in by_depth for i, p in enumerate(level)}
        levels = tuple(tuple((index[p[:-1]] if p[:-1] else 0, p[-1]) for p in level) for level in by_depth)
        parents = {p[:-1] for p in paths}
        leaves = tuple(tuple(index[p[: d + 1]] for d in range(len(p))) for p in paths if p not in parents)
        return TreeShape(levels=levels, leaves=leaves)

    @property
    def depth(self) -> int:
        return len(self.levels)


@functools.lru_cache(maxsize=64)
def tree_shape(paths: tuple[tuple[int, ...], ...]) -> TreeShape:
    """``TreeShape.of``, kept: a step asks for the same shape every time."""
    return TreeShape.of(paths)


def without(q: torch.Tensor, drawn: torch.Tensor) -> torch.Tensor:
    """q with the ``drawn`` (bool, same shape) tokens removed, renormalised: the distribution the next
    sibling is drawn from. Rows with no mass left come back all zero."""
    rest = q.masked_fill(drawn, 0.0)
    total = rest.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, rest / total.clamp(min=torch.finfo(q.dtype).tiny), rest)


def draw_siblings(q: torch.Tensor, counts: Sequence[int], generators: Sequence[torch.Generator | None]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Children of n parents per row, drawn without replacement.

    Args:
        q: (batch, n, V) each parent's draft distribution.
        counts: n children counts (the same in every row).
    Returns:
        (tokens (batch, n, k) drafter ids or -1 where not drawn, dists (batch, n, k, V) the
        distribution each was drawn from), k = max(counts).
    """
    batch, n, vocab = q.shape
    k = max(counts, default=0)
    tokens = torch.full((batch, n, k), -1, dtype=torch.long, device=q.device)
    dists = q.new_zeros(batch, n, k, vocab)
    drawn = torch.zeros_like(q, dtype=torch.bool)
    wanted = torch.tensor(list(counts), device=q.device).view(1, n)
    for rank in range(k):
        dist = without(q, drawn)
        numbers = uniforms(generators, n, q.device)  # (batch, n): one per parent and rank, drawn or not
        live = (dist.sum(dim=-1) > 0) & (wanted > rank)
        picked = inverse_cdf(dist, numbers)
        tokens[:, :, rank] = torch.where(live, picked, -1)
        dists[:, :, rank] = dist * live.unsqueeze(-1)
        drawn.scatter_(-1, picked.clamp(min=0).unsqueeze(-1), live.unsqueeze(-1))
    return tokens, dists


Step = Callable[[torch.Tensor | None, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def draw_tree(step_for: Callable[[int], Step], g0: torch.Tensor, shape: TreeShape, params: SamplingParams,
              generators: Sequence[torch.Generator | None], to_target_ids: Callable[[torch.Tensor], torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill ``shape`` with draws from the drafter.

    Args:
        step_for: width n -> a drafter step for n nodes per row: (state (batch, n, S) or None for
            s_0, tokens (batch, n) target ids) -> (next state (batch, n, S), logits (batch, n, V_d)).
        g0: (batch,) the root's token.
        to_target_ids: drafter ids -> target ids.
    Returns:
        (beams (batch, W, 1 + depth) target ids, g0 first and ``NO_TOKEN`` past a beam's end or where
        a child was not drawn; dists (batch, W, depth, V_d) the distribution each beam token was
        drawn from, zero where there is none), W = len(shape.leaves).
    """
    batch = g0.shape[0]
    state, logits = step_for(1)(None, g0.view(batch, 1))
    parent_q = probabilities(logits, params)  # (batch, 1, V_d): the root's q
    level_tokens, level_dists = [], []
    for d, level in enumerate(shape.levels):
        counts = [sum(1 for p, _ in level if p == i) for i in range(parent_q.shape[1])]
        children, dists = draw_siblings(parent_q, counts, generators)  # (batch, n_parents, k)
        parent = torch.tensor([p for p, _ in level], device=g0.device)
        rank = torch.tensor([r for _, r in level], device=g0.device)
        ids = children[:, parent, rank]  # (batch, n) drafter ids, -1 where not drawn
        dist = dists[:, parent, rank]  # (batch, n, V_d)
        if d > 0:  # a node whose parent was not drawn is not drawn either
            ids = torch.where(level_tokens[-1][:, parent] == NO_TOKEN, -1, ids)
        tokens = torch.where(ids >= 0, to_target_ids(ids.clamp(min=0)), NO_TOKEN)
        level_tokens.append(tokens)
        level_dists.append(dist * (ids >= 0).unsqueeze(-1))
        if d + 1 < shape.depth:  # the q of this level's nodes that have children
            expand = sorted({p for p, _ in shape.levels[d + 1]})
            index = torch.tensor(expand, device=g0.device)
            inputs = torch.where(tokens[:, index] == NO_TOKEN, g0.view(batch, 1), tokens[:, index])
            expanded, logits = step_for(len(expand))(state[:, parent[index]], inputs)
            state = expanded.new_zeros(batch, len(level), expanded.shape[-1])  # indexed like the level's nodes
            state[:, index] = expanded
            q = probabilities(logits, params)
            parent_q = q.new_zeros(batch, len(level), q.shape[-1])
            parent_q[:, index] = q
    width = len(shape.leaves)
    beams = torch.full((batch, width, 1 + shape.depth), NO_TOKEN, dtype=torch.long, device=g0.device)
    beams[:, :, 0] = g0.view(batch, 1)
    out = parent_q.new_zeros(batch, width, shape.depth, parent_q.shape[-1])
    for w, path in enumerate(shape.leaves):
        for d, node in enumerate(path):
            beams[:, w, 1 + d] = level_tokens[d][:, node]
            out[:, w, d] = level_dists[d][:, node]
    return beams, out
