"""Acceptance: which drafted tokens the target keeps, and the token it adds after them.

Vocabulary (REDRAFTER.md): p is the target's next-token distribution (after the sampling transform
of sampling.py), q the drafter's. Each beam is ``[g0, d_1, ..., d_{L-1}]``: g0 is the target's own
token (already emitted), d_j are drafted. Beams sharing a prefix share tree nodes.

One walk serves greedy decoding and sampling (recursive multi-draft rejection sampling, as in
SpecInfer). Start at the root node (g0). At a node u with target distribution p_u, the candidates
are the next tokens x_w of the beams still on the accepted path, in beam order (duplicates
included: each beam contributed one draw). Keep a residual r = p_u and try them in turn:

- accept x_w with probability min(1, r(x_w) / q_w(x_w)), i.e. when ``U * q_w(x_w) < r(x_w)`` with
  U ~ Uniform[0, 1); then move to x_w's node and repeat one level down;
- otherwise r <- normalise(max(r - q_w, 0)) and try the next candidate.

Drafts whose siblings were drawn without replacement (``DraftProbs.distinct``, the "tree" draft
mode) test each node once: a later beam through a node already tested at this depth is not a
candidate again, and q_w is the distribution that child was drawn from (q without the siblings drawn
before it). That is recursive rejection sampling without replacement; the same argument applies, since
each candidate is drawn from the q_w it is tested with, independently of the test.

When every candidate at a node is rejected, the bonus token is drawn from the residual r; after a
fully accepted beam, from p at its last node. Here q_w is the distribution candidate w was drawn
from: the drafter's q for sampled drafts, a point mass for deterministic ones (beam search, scripted
proposers). Either way every emitted token is distributed exactly as p (the standard speculative
sampling argument applied node by node; candidates below a node are drawn independently of the
acceptance test at that node).

Greedy (temperature 0) is the fast path of the same walk: p_u is the point mass on argmax p_u, so a
candidate is accepted iff it is the argmax, the residual stays that point mass, and the bonus is the
argmax; no probabilities or random numbers are needed. This reproduces plain greedy decoding
exactly, whatever the drafter proposes.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from redrafter.config import SamplingParams
from redrafter.sampling import cumulative_weights, inverse_cdf, inverse_cdf_tensors, probabilities, uniforms
from redrafter.tree import NO_TOKEN, tree_kernel


@dataclasses.dataclass(frozen=True)
class Acceptance:
    """The outcome of verifying one step's beams.

    Attributes:
        beam:     (batch,) index of a beam holding the accepted path.
        accepted: (batch,) number of drafted tokens accepted on it (0 .. L-1).
        tokens:   (batch, L) that beam's tokens; ``tokens[b, 1:1+accepted[b]]`` are the newly
                  accepted ones (position 0 is g0, emitted by the previous step); past them the
                  beam may hold ``NO_TOKEN`` (a capped tree).
        bonus:    (batch,) the target's own token after the accepted run (next g0).
    """

    beam: torch.Tensor
    accepted: torch.Tensor
    tokens: torch.Tensor
    bonus: torch.Tensor


@dataclasses.dataclass(frozen=True)
class DraftProbs:
    """The distributions sampled drafts were drawn from, without the zeros of a dense (batch, W, L-1, V)
    tensor: ``probs`` (batch, W_q, L_q, V_q) float32 is the q that ``beams[:, w, 1 + j]`` was drawn from,
    for w < W_q and j < L_q, over the V_q tokens whose target ids ``vocab_map`` (V_q,) lists (None: V_q
    is the whole vocabulary, in order). Every other drafted token (the context-lookup beam after the
    drawn paths) is a point mass. ``dense`` gives the tensor this stands for. ``distinct``: see the
    module docstring."""

    probs: torch.Tensor
    vocab_map: torch.Tensor | None = None
    distinct: bool = False  # siblings drawn without replacement: each tree node is a candidate once

    def dense(self, beams: torch.Tensor, vocab: int) -> torch.Tensor:
        """(batch, W, L-1, V) for ``beams`` (batch, W, L): q where given, one-hot rows elsewhere."""
        from redrafter.drafter.lookup import point_masses

        full = point_masses(beams, vocab, self.probs.dtype)
        width, length = self.probs.shape[1], self.probs.shape[2]
        region = full[:, :width, :length]
        if self.vocab_map is None:
            region.copy_(self.probs)
        else:
            region.zero_().index_copy_(-1, self.vocab_map, self.probs)
        return full


def draw(logits: torch.Tensor, params: SamplingParams, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row from (batch, V) logits: the argmax when greedy, else a draw from p."""
    if params.greedy:
        return logits.argmax(dim=-1)
    return inverse_cdf(probabilities(logits, params), uniforms(generators, 1, logits.device).squeeze(-1))


def uniforms_needed(width: int, length: int) -> int:
    """Random numbers a row's walk may use: one per candidate tested (at most W per depth) and one for
    the bonus."""
    return width * (length - 1) + 1


def row_uniforms_needed(beams: torch.Tensor) -> list[int]:
    """For each row, the numbers its walk may use, counted from its own drafted tokens (one per token
    that can be tested, ``NO_TOKEN`` padding excluded, plus one for the bonus), so that what a row
    takes from its stream does not depend on the rows batched with it.

    Args:
        beams: (batch, W, L) token ids, ``beams[:, :, 0]`` g0.
    """
    return ((beams[:, :, 1:] != NO_TOKEN).sum(dim=(1, 2)) + 1).tolist()


def tree_accept(beams: torch.Tensor, unpacker: torch.Tensor, logits: torch.Tensor, params: SamplingParams,
                draft_probs: torch.Tensor | DraftProbs | None = None,
                generators: Sequence[torch.Generator | None] | None = None) -> Acceptance:
    """Verify a batch of drafted beams against the target's logits at the packed tree nodes.

    Args:
        beams:       (batch, W, L) token ids; ``beams[:, :, 0]`` is g0; ``NO_TOKEN`` past a beam's
                     end (tree.cap_tree) is never a candidate.
        unpacker:    (batch, W, L) packed node index of each beam token (tree.pack).
        logits:      (batch, n, V) the target's logits after each packed node.
        params:      the sampling transform (greedy when temperature is 0).
        draft_probs: (batch, W, L-1, V) the distribution each drafted token ``beams[:, w, j]`` was
                     drawn from (index j-1), or the same as ``DraftProbs``, or None for
                     deterministic drafts (point masses).
        generators:  one random generator per row (sampling only); each row takes
                     ``row_uniforms_needed`` numbers (from its own tokens) from its own per step.
    Returns:
        Acceptance for each row.
    """
    batch, width, length = beams.shape
    rows = torch.arange(batch, device=beams.device)
    if params.greedy:
        module = tree_kernel(logits, torch.float32)
        if module is not None:  # the same greedy walk in C++ (csrc/tree.cpp; tests/test_tree.py)
            beam, accepted, bonus = module.greedy_accept(beams, unpacker, logits)
        else:
            beam, accepted, bonus = walk(beams, unpacker, logits.argmax(dim=-1), None, None, None)
        return Acceptance(beam=beam, accepted=accepted, tokens=beams[rows, beam], bonus=bonus)
    generators = generators if generators is not None else [None] * batch
    probs = probabilities(logits, params)  # p at every node, in one call
    draws = uniforms(generators, row_uniforms_needed(beams), logits.device)
    draws = torch.nn.functional.pad(draws, (0, uniforms_needed(width, length) - draws.shape[1]))  # the shape C++ takes
    module = tree_kernel(probs, torch.float32)
    compact = draft_probs if isinstance(draft_probs, DraftProbs) else None
    q = compact.probs if compact is not None else draft_probs
    distinct = compact is not None and compact.distinct
    if module is not None and (q is None or (q.dtype == torch.float32 and q.device.type == "cpu")):
        empty = torch.empty(0, dtype=torch.float32)
        draft_map = compact.vocab_map if compact is not None and compact.vocab_map is not None else empty.long()
        beam, accepted, bonus = module.sampled_accept(beams, unpacker, probs, empty if q is None else q, draft_map,
                                                      draws, distinct)
    else:
        dense = compact.dense(beams, probs.shape[-1]) if compact is not None else draft_probs
        beam, accepted, bonus = walk(beams, unpacker, None, probs, dense, draws, distinct=distinct)
    return Acceptance(beam=beam, accepted=accepted, tokens=beams[rows, beam], bonus=bonus)


def walk(beams: torch.Tensor, unpacker: torch.Tensor, best: torch.Tensor | None, probs: torch.Tensor | None,
         draft_probs: torch.Tensor | None, draws: torch.Tensor | None, *,
         distinct: bool = False) -> tuple[torch.Tensor, ...]:
    """The walk of the module docstring in tensor operations (any device; the definition the C++
    ``greedy_accept`` and ``sampled_accept`` are tested against). Greedy: ``best`` (batch, n) the
    argmax at each node. Sampling: ``probs`` (batch, n, V) p at each node and ``draws`` (batch, U)
    float64 uniform numbers, used in order: one per candidate tested, then one for the bonus.
    ``distinct``: each node is a candidate once (``DraftProbs.distinct``).

    Returns:
        (beam, accepted, bonus), each (batch,) int64.
    """
    batch, width, length = beams.shape
    device = beams.device
    tokens, nodes = beams.tolist(), unpacker.tolist()
    greedy = best is not None
    best = best.tolist() if greedy else None
    chosen_beam, accepted_count, bonus_tokens = [], [], []
    for b in range(batch):
        live, node, accepted, chosen, bonus = list(range(width)), nodes[b][0][0], 0, 0, None
        numbers = None if greedy else iter(draws[b].tolist())
        for j in range(1, length):
            if greedy:
                hit = next((w for w in live if tokens[b][w][j] == best[b][node]), None)
                if hit is None:
                    bonus = best[b][node]
            else:
                residual = probs[b, node]
                hit, tested = None, set()
                for w in live:
                    x = tokens[b][w][j]
                    if x == NO_TOKEN:  # this beam ended before depth j (a capped tree)
                        continue
                    if distinct:
                        if nodes[b][w][j] in tested:  # a sibling drawn once, shared by later beams
                            continue
                        tested.add(nodes[b][w][j])
                    q_x = 1.0 if draft_probs is None else float(draft_probs[b, w, j - 1, x])
                    if next(numbers) * q_x < float(residual[x]):
                        hit = w
                        break
                    if draft_probs is None:
                        updated = residual.clone()
                        updated[x] = 0.0
                    else:
                        updated = (residual - draft_probs[b, w, j - 1]).clamp_(min=0.0)
                    total = cumulative_weights(updated)[-1]  # summed in the C++ walk's order
                    if total > 0:  # zero only when r == q_w up to rounding: then r stays as it was
                        residual = updated / total.float()
                if hit is None:
                    bonus = int(inverse_cdf_tensors(residual, torch.tensor(next(numbers), dtype=torch.float64)))
            if hit is None:
                break
            accepted, chosen, node = j, hit, nodes[b][hit][j]
            live = [w for w in live if tokens[b][w][j] != NO_TOKEN and nodes[b][w][j] == node]
        if bonus is None:  # the whole beam was accepted: the bonus comes from p at its last node
            bonus = best[b][node] if greedy else int(inverse_cdf_tensors(probs[b, node],
                                                                   torch.tensor(next(numbers), dtype=torch.float64)))
        chosen_beam.append(chosen)
        accepted_count.append(accepted)
        bonus_tokens.append(bonus)
    as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return as_tensor(chosen_beam), as_tensor(accepted_count), as_tensor(bonus_tokens)
