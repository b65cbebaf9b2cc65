"""Beam search over the recurrent drafter (REDRAFTER.md "Beam search drafting").

All W beams start with g0. Step 1 expands only beam 0 (the others start at log-probability -inf),
so the first drafted tokens of the W beams are the top-W tokens of q. Every later step keeps the
top W of the W x V extensions by summed log q, carrying each beam's RNN state along its parent.
With ``min_prob`` > 0 (BeamConfig.min_prob) every node whose summed log q is below log(min_prob) becomes
``NO_TOKEN``, so a row may keep g0 alone, and the search stops at the first depth at which no beam of
any row reaches the floor (that depth and everything deeper would all be dropped anyway).
With ``max_tree_tokens`` > 0 only that many distinct nodes of the beams' tree stay (tree.cap_tree):
the others become ``NO_TOKEN``, so beams may end early.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from redrafter.drafter.lookup import pad_length
from redrafter.drafter.model import Drafter
from redrafter.tree import NO_TOKEN, cap_tree_scored, drop_below, tree_kernel


@dataclasses.dataclass(frozen=True)
class BeamSearchResult:
    """Attributes:
        beams:     (batch, W, L) token ids, g0 first (``NO_TOKEN`` past a beam's end when capped);
                   with ``keep_pruned`` the shallower depths' beams follow the W (W per drafted depth).
        scores:    (batch, W) summed log q of each beam's drafted tokens, best first.
        path_scores: (batch, W, L) the same sum up to each position (0 at g0; shaped like ``beams``).
        log_probs: (batch, W, L-1, V_d) the drafter's log q at each drafted position of each beam
                   (over the drafter's own vocabulary), or None when not requested.
    """

    beams: torch.Tensor
    scores: torch.Tensor
    path_scores: torch.Tensor
    log_probs: torch.Tensor | None


@torch.inference_mode()
def beam_search(drafter: Drafter, embed: Callable[[torch.Tensor], torch.Tensor], context: torch.Tensor,
                g0: torch.Tensor, *, width: int, length: int, min_prob: float = 0.0,
                max_tree_tokens: int = 0, return_log_probs: bool = False, keep_pruned: bool = False,
                table: torch.Tensor | None = None) -> BeamSearchResult:
    """Draft W beams of L tokens (g0 included), or fewer with ``min_prob``.

    Args:
        drafter: the draft head.
        embed:   the target's input embedding: (...,) token ids -> (..., H).
        context: (batch, H) the target's last hidden state h at the last accepted position.
        g0:      (batch,) the target's own next token.
        width, length: W and L.
        min_prob: drop (``NO_TOKEN``) every node whose drafter probability (the product of q along its
                  path) is below min_prob, and stop before the first depth at which that leaves no
                  node in any row; the beams then hold at least g0 (length >= 1).
        max_tree_tokens: > 0 keeps only the most probable distinct nodes (g0 included) of the tree.
        table:   the table behind ``embed`` ((V, H) tensor), when the caller has one: an inference copy
                  with a fused search (``model.FusedSearch``) then runs the whole search in one call,
                  with the same results, where it can (no log q, few enough rows). With ``min_prob`` it
                  keeps the same nodes and extends only the beams at or above the floor; it returns L
                  tokens per beam, the deeper ones ``NO_TOKEN``, where the loop returns shorter beams.
        keep_pruned: also return the beams of every shallower depth, each ending there (``NO_TOKEN``
                  after it), after the W beams: a node whose extensions all fell out of the top W
                  stays a candidate for a tree cap. With W >= K - 1 the K best nodes of the search
                  are then those of an exhaustive search (up to ties), since each depth's K - 1 best
                  paths are among its W beams. The result has W beams per drafted depth: W * (L - 1),
                  or fewer when ``min_prob`` stops the search early.
    Returns:
        BeamSearchResult.
    """
    if keep_pruned and return_log_probs:
        raise ValueError("beam_search: return_log_probs covers the W beams only; it cannot go with keep_pruned")
    batch = g0.shape[0]
    device = g0.device
    fused = getattr(drafter, "fused_search", None)
    if fused is not None and not return_log_probs and fused.runs(context, table, batch * width):
        # With min_prob it extends only the beams at or above it and drops the nodes below it: the
        # loop's nodes (the loop also stops at the first depth left empty; this pads with NO_TOKEN).
        beams, scores, path_scores = fused(context, g0, table, width=width, length=length, keep_pruned=keep_pruned,
                                           min_prob=min_prob)
        if max_tree_tokens > 0:
            beams = cap_tree_scored(beams, path_scores, max_tree_tokens)
        return BeamSearchResult(beams=beams, scores=scores, path_scores=path_scores, log_probs=None)
    h = context.to(next(drafter.parameters()).dtype).unsqueeze(1).expand(batch, width, -1)  # (batch, W, H)
    beams = g0.view(batch, 1, 1).expand(batch, width, 1)  # (batch, W, 1)
    scores = torch.full((batch, width), float("-inf"), device=device)
    scores[:, 0] = 0.0
    path_scores = torch.zeros(batch, width, 1, device=device)
    state = drafter.initial_state(h)  # (batch, W, H)
    log_probs: torch.Tensor | None = None
    rows = torch.arange(batch, device=device).view(batch, 1)
    floor = math.log(min_prob) if min_prob > 0 else None
    shallower: list[tuple[torch.Tensor, torch.Tensor]] = []  # (beams, path_scores) of earlier depths
    # Our one-pass selection (csrc/beam_select.cpp) on CPU where it is built; log q itself only when asked for.
    select = None if return_log_probs else tree_kernel(context)
    if select is not None and fused is not None:  # the fused search's extension: its selection, lane for lane
        select = fused.module
    for depth in range(1, length):
        if depth == 1:  # every beam is g0 alone: run the head on one row per batch row, shared by all W
            first = drafter.next_state(state[:, :1], embed(g0).unsqueeze(1).to(state.dtype))
            state = first.expand(batch, width, -1)
            logits = drafter.logits(h[:, :1], first)  # (batch, 1, V)
            vocab = logits.shape[-1]
            if vocab >= width:  # only beam 0 is live (score 0): its top W tokens
                row_scores = scores[:, :1]
            else:  # every beam, the others at -inf
                logits, row_scores = logits.expand(batch, width, vocab), scores
        else:
            state = drafter.next_state(state, embed(beams[:, :, -1]).to(state.dtype))
            logits, row_scores = drafter.logits(h, state), scores  # (batch, W, V)
        if select is not None and logits.dtype in (torch.float32, torch.bfloat16):
            top, parent, index = select.beam_select(logits, row_scores, width)
        else:  # the top W of R x V: each beam's top W, then the top W of those R x W
            step_log_q = torch.log_softmax(logits.float(), dim=-1)  # (batch, R, V)
            per_beam = min(width, vocab)
            beam_top, beam_index = (row_scores.unsqueeze(-1) + step_log_q).topk(per_beam, dim=-1)  # (batch, R, per_beam)
            top, pick = beam_top.view(batch, -1).topk(width, dim=-1)
            parent, index = pick // per_beam, beam_index.view(batch, -1).gather(1, pick)
        if floor is not None and bool((top[:, 0] < floor).all()):
            break  # every beam's probability fell below min_prob: this depth is not worth verifying
        scores = top
        if keep_pruned and depth > 1:
            shallower.append((beams, path_scores))
        token = drafter.to_target_ids(index)
        beams = torch.cat([beams[rows, parent], token.unsqueeze(-1)], dim=-1)
        path_scores = torch.cat([path_scores[rows, parent], top.unsqueeze(-1)], dim=-1)
        state = state[rows, parent]
        if return_log_probs:
            chosen = step_log_q.expand(batch, width, vocab)[rows, parent].unsqueeze(2)  # (batch, W, 1, V)
            log_probs = chosen if log_probs is None else torch.cat([log_probs[rows, parent], chosen], dim=2)
    if shallower:  # after the W beams, so a node on one of them is owned by it (tree.owners)
        length = beams.shape[2]
        beams = torch.cat([beams] + [pad_length(b, length, NO_TOKEN) for b, _ in reversed(shallower)], dim=1)
        path_scores = torch.cat([path_scores] + [pad_length(p, length, float("-inf")) for _, p in reversed(shallower)], dim=1)
    if floor is not None:  # a suffix of each beam: path scores never rise along it
        beams = drop_below(beams, path_scores, min_prob)
    if max_tree_tokens > 0:
        beams = cap_tree_scored(beams, path_scores, max_tree_tokens)
    return BeamSearchResult(beams=beams, scores=scores, path_scores=path_scores, log_probs=log_probs)
