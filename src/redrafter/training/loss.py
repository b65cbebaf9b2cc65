"""Teacher-forced multi-step drafter loss (REDRAFTER.md "Training").

For a sequence x with the target's hidden states h_t (final-norm output at position t), step i of
the drafter (i = 1..N) takes x_{t+i} as input token and predicts x_{t+i+1}, with its RNN state
carried from step i-1 and h_t as context, exactly as at inference where step 1's input is g0 =
x_{t+1}. Only positions whose label is a response token count.

Worked example (N = 2, sequence [p0 p1 r0 r1 r2], response r*): at t = 1 (h after p1) step 1 reads
r0 and predicts r1, step 2 reads r1 and predicts r2.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from redrafter.drafter.model import Drafter


@dataclasses.dataclass
class LossOutput:
    """Attributes:
        loss:     scalar, mean over steps of the mean cross-entropy at valid positions.
        correct:  (N, batch, T) bool, top-1 of step i right at position t (False where invalid).
        valid:    (N, batch, T) bool, where step i's label exists and is a response token.
        sums:     (N,) summed cross-entropy of each step (for losses normalised across processes).
        counts:   (N,) long, how many positions each sum covers.
    """

    loss: torch.Tensor
    correct: torch.Tensor
    valid: torch.Tensor
    sums: torch.Tensor
    counts: torch.Tensor


def multi_step_loss(drafter: Drafter, embed: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                    tokens: torch.Tensor, next_tokens: torch.Tensor, label_mask: torch.Tensor, *, steps: int,
                    target_to_draft: torch.Tensor | None = None,
                    context_mask: torch.Tensor | None = None) -> LossOutput:
    """Args:
        drafter:         the head being trained.
        embed:           the target's (frozen) input embedding.
        hidden:          (batch, T, H) target hidden states.
        tokens:          (batch, T) token ids (prompt + response, right padded).
        next_tokens:     (batch, T) the token to predict after each position: the target's own argmax
                         there (self-distillation), which equals ``tokens[:, 1:]`` on greedy
                         target-written data.
        label_mask:      (batch, T) bool, True at response tokens (padding False).
        steps:           N, tokens predicted per position.
        target_to_draft: (V,) long, the draft index of each target token or -1 (reduced vocabulary).
        context_mask:    (batch, T) bool, positions whose hidden state may serve as context (default all).
    """
    batch, length, _ = hidden.shape
    device = hidden.device
    state = torch.zeros_like(hidden)
    losses, correct, valid, sums, counts = [], [], [], [], []
    embedded = embed(tokens).to(hidden.dtype)  # (batch, T, H)
    for i in range(1, steps + 1):
        # input x_{t+i}; label x_{t+i+1}; positions past the end are invalid (zero-padded here)
        inputs = torch.zeros_like(embedded)
        inputs[:, : length - i] = embedded[:, i:]
        state = drafter.next_state(state, inputs)
        labels = torch.zeros(batch, length, dtype=torch.long, device=device)
        ok = torch.zeros(batch, length, dtype=torch.bool, device=device)
        if length - i - 1 > 0:
            labels[:, : length - i - 1] = next_tokens[:, i: length - 1]
            ok[:, : length - i - 1] = label_mask[:, i + 1:]
        if context_mask is not None:
            ok &= context_mask
        if target_to_draft is not None:
            labels = target_to_draft[labels]
            trainable = ok & (labels >= 0)
        else:
            trainable = ok
        logits = drafter.logits(hidden[trainable], state[trainable]).float()  # (M, V_d)
        picked = labels[trainable]
        step_sum = torch.nn.functional.cross_entropy(logits, picked, reduction="sum")
        sums.append(step_sum)
        counts.append(picked.numel())
        if picked.numel():
            losses.append(step_sum / picked.numel())
        hit = torch.zeros(batch, length, dtype=torch.bool, device=device)
        hit[trainable] = logits.argmax(dim=-1) == picked
        correct.append(hit)
        valid.append(ok)  # out-of-vocabulary labels count as misses
    loss = torch.stack(losses).mean() if losses else hidden.sum() * 0.0
    return LossOutput(loss=loss, correct=torch.stack(correct), valid=torch.stack(valid), sums=torch.stack(sums),
                      counts=torch.tensor(counts, device=device))


def accepted_run_stats(correct: torch.Tensor, valid: torch.Tensor) -> dict:
    """Per-step top-1 accuracy and an estimated τ for a single greedy draft (W = 1).

    At positions where all N labels exist, the accepted length is the leading run of correct steps;
    τ ≈ 1 + mean accepted length (the bonus token adds 1). Beam search with W > 1 does better.
    Args:
        correct, valid: (N, batch, T) bool.
    """
    steps = correct.shape[0]
    accuracy = [(correct[i] & valid[i]).sum().item() / max(1, valid[i].sum().item()) for i in range(steps)]
    complete = valid.all(dim=0)  # (batch, T)
    run = correct.long().cumprod(dim=0).sum(dim=0)  # (batch, T)
    count = complete.sum().item()
    tau = 1.0 + (run[complete].float().mean().item() if count else 0.0)
    return {"accuracy": accuracy, "tau_w1": tau, "positions": count}
