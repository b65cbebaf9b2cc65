"""Acceptance: which drafted tokens the target keeps, and what to commit.

Vocabulary (REDRAFTER.md): p is the target's next-token distribution, q the drafter's. Each beam
is ``[g0, d_1, ..., d_{L-1}]``: g0 is the target's own token (already emitted), d_k are drafted.
A drafted token is *accepted* when it is the token the target itself would emit at that point;
after the longest accepted run the target's own next token is the *bonus* token (it becomes the
next step's g0). One step thus appends ``accepted + 1`` tokens per LLM forward.

Greedy acceptance (the temperature -> 0 case): d_k is accepted iff it equals argmax p at the
preceding node and every earlier drafted token of the beam was accepted. The beam with the longest
accepted run wins (ties: the lowest beam index). This reproduces plain greedy decoding exactly,
whatever the drafter proposes. Exact sampling (SpecInfer-style recursive rejection) extends this
module; it keeps the same outputs.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Acceptance:
    """The outcome of verifying one step's beams.

    Attributes:
        beam:     (batch,) index of the chosen beam.
        accepted: (batch,) number of drafted tokens accepted on it (0 .. L-1).
        tokens:   (batch, L) the chosen beam's tokens; ``tokens[b, 1:1+accepted[b]]`` are the
                  newly accepted ones (position 0 is g0, emitted by the previous step).
        bonus:    (batch,) the target's own token after the accepted run (next g0).
    """

    beam: torch.Tensor
    accepted: torch.Tensor
    tokens: torch.Tensor
    bonus: torch.Tensor


def greedy_accept(beams: torch.Tensor, target_tokens: torch.Tensor) -> Acceptance:
    """Greedy verification of a batch of beams.

    Args:
        beams:         (batch, W, L) token ids; ``beams[:, :, 0]`` is g0.
        target_tokens: (batch, W, L) the target's argmax after every beam node (unpacked), i.e.
                       ``target_tokens[b, i, k]`` is what the target emits after ``beams[b, i, :k+1]``.
    Returns:
        Acceptance for each row.
    """
    matches = beams[:, :, 1:] == target_tokens[:, :, :-1]  # (batch, W, L-1)
    accepted_per_beam = matches.long().cumprod(dim=-1).sum(dim=-1)  # (batch, W)
    accepted, beam = accepted_per_beam.max(dim=-1)  # first maximal beam on ties
    rows = torch.arange(beams.shape[0], device=beams.device)
    bonus = target_tokens[rows, beam, accepted]
    return Acceptance(beam=beam, accepted=accepted, tokens=beams[rows, beam], bonus=bonus)
