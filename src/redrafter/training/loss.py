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


@dataclasses.dataclass
class Teacher:
    """The target's distribution after each position, over the drafter's vocabulary, for the KL term.

    The target's logits after position u are its LM head applied to its final hidden state h_u, which
    the loss already holds: ``head_weight`` (V_d, H) are the head's rows for the draft vocabulary (the
    whole head without a reduced vocabulary), so their softmax is the target's distribution restricted
    to V_d. Only positions some step trains against are computed, once each.

    Attributes:
        head_weight, head_bias: those LM head rows (bias None for most models).
        top_k:  > 0: keep the target's k most likely draft tokens, renormalised among themselves.
        weight: α in loss = (1 - α) CE(label) + α CE(p_target, q); the soft cross-entropy is KL(p‖q)
                plus p's entropy, which does not depend on the drafter.
    """

    head_weight: torch.Tensor
    head_bias: torch.Tensor | None
    top_k: int
    weight: float

    def log_probs(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(M, H) hidden states -> (log p over the kept tokens (M, k), their draft indices (M, k) or
        None when all V_d are kept)."""
        logits = hidden.to(self.head_weight.dtype) @ self.head_weight.T
        if self.head_bias is not None:
            logits = logits + self.head_bias
        logits = logits.float()
        if 0 < self.top_k < logits.shape[-1]:
            values, indices = logits.topk(self.top_k, dim=-1)
            return torch.log_softmax(values, dim=-1), indices
        return torch.log_softmax(logits, dim=-1), None


def multi_step_loss(drafter: Drafter, embed: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                    tokens: torch.Tensor, next_tokens: torch.Tensor, label_mask: torch.Tensor, *, steps: int,
                    target_to_draft: torch.Tensor | None = None,
                    context_mask: torch.Tensor | None = None, teacher: Teacher | None = None) -> LossOutput:
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
        teacher:         the target's distributions for the optional KL term (step i at position t is
                         matched to the target's distribution after position t+i, the one its label
                         is the argmax of). ``correct`` and accuracy always refer to the labels.
    """
    batch, length, _ = hidden.shape
    device = hidden.device
    state = torch.zeros_like(hidden)
    losses, correct, valid, sums, counts = [], [], [], [], []
    embedded = embed(tokens).to(hidden.dtype)  # (batch, T, H)
    step_labels, step_ok, step_trainable = [], [], []
    for i in range(1, steps + 1):
        # label x_{t+i+1}; positions past the end are invalid
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
        step_labels.append(labels)
        step_ok.append(ok)
        step_trainable.append(trainable)
    teacher_log_p = teacher_indices = None
    if teacher is not None and teacher.weight > 0:
        # Step i at position t is scored against the target's distribution after position t + i (its
        # label is that distribution's argmax). The steps share those distributions, so each position
        # any step needs is computed once.
        needed = torch.zeros(batch, length, dtype=torch.bool, device=device)
        for i, trainable in enumerate(step_trainable, start=1):
            needed[:, i:] |= trainable[:, : length - i]
        with torch.no_grad():
            log_p, indices = teacher.log_probs(hidden[needed])  # (M, k)
        teacher_log_p = log_p.new_zeros(batch, length, log_p.shape[-1])
        teacher_log_p[needed] = log_p
        if indices is not None:
            teacher_indices = indices.new_zeros(batch, length, indices.shape[-1])
            teacher_indices[needed] = indices
    for i in range(1, steps + 1):
        # input x_{t+i} (zero-padded past the end)
        inputs = torch.zeros_like(embedded)
        inputs[:, : length - i] = embedded[:, i:]
        state = drafter.next_state(state, inputs)
        labels, ok, trainable = step_labels[i - 1], step_ok[i - 1], step_trainable[i - 1]
        logits = drafter.logits(hidden[trainable], state[trainable]).float()  # (M, V_d)
        picked = labels[trainable]
        log_q = torch.log_softmax(logits, dim=-1)
        step_sum = torch.nn.functional.nll_loss(log_q, picked, reduction="sum")  # cross-entropy
        if teacher_log_p is not None:
            # no position past length - i - 2 trains, so t + i stays inside the sequence
            rows = trainable[:, : length - i]
            log_p = teacher_log_p[:, i:][rows]  # (M, k)
            if teacher_indices is not None:
                log_q = log_q.gather(-1, teacher_indices[:, i:][rows])
            soft_sum = -(log_p.exp() * log_q).sum()
            step_sum = (1 - teacher.weight) * step_sum + teacher.weight * soft_sum
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
