"""Small typed configuration dataclasses, one per concern, validated on construction."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from redrafter.errors import RedrafterError


# How often the context lookup's next copied token is right after a match of m = 1, 2, ... tokens
# (the last entry for 64 and more): 1 - 1.2 / (m + 0.5) fits what SmolLM2 wrote for 640 ShareGPT
# prompts up to m = 35 and is a little below it from there to 63; a match of 64 is a loop, right
# 99.9 % of the time (drafter/lookup.py, docs/PERFORMANCE.md "Long loops"). Matches are measured up to
# LOOKUP_MATCH_CAP tokens, the table's length.
LOOKUP_MATCH_CAP = 64
LOOKUP_CONFIDENCE = tuple(round(1 - 1.2 / (m + 0.5), 4) for m in range(1, LOOKUP_MATCH_CAP)) + (0.999,)

# The most tree tokens a step verifies, whatever ``extend_prob`` lets past the cap: our AVX-512 kernels
# take steps of up to 64 rows in one pass (docs/PERFORMANCE.md). Other kernels are fast up to 8-16
# rows, and a batch pads every row's tree to the largest, so the shipped settings enable
# ``extend_prob`` only for our int4 kernel.
MAX_TREE_TOKENS = 64


@dataclasses.dataclass(frozen=True)
class BeamConfig:
    """Shape of the draft: ``width`` beams (W) of ``length`` tokens (L), where L counts g0.

    Each beam therefore carries ``length - 1`` drafted tokens; TensorRT-LLM calls that number
    ``draft_len_per_beam`` and W ``num_beams``.

    ``min_prob`` > 0 makes the draft adaptive (beam-search drafts only): a tree node whose probability
    under the drafter (the product of q along its path) is below ``min_prob`` is not verified, and
    beam search stops going deeper once no beam reaches it. A step then verifies anything from g0
    alone (a plain decode step: unsure drafts cost no verification) to the whole tree. Drafts stay
    proposals, so the output is unchanged. With the lookup beam the floor applies to the joined tree,
    before the cap: a looked-up token scores its product of confidences (below), a drafted node its
    path probability.

    ``max_tree_tokens`` > 0 caps the verified tree (beam-search drafts only): of the distinct tree
    nodes, g0 included, only the ``max_tree_tokens`` most probable under the drafter are verified
    (the probability of a node is the product of q along its path, so a kept node's ancestors are
    kept too). Wide, deep beam searches then cost the verification of a small tree: on a CPU, a
    forward of K tokens grows with K once the matrix products stop being memory-bound. 0 = verify
    every node.

    ``extend_prob`` > 0 lets sure nodes past the cap, with the lookup beam (``lookup_tokens`` > 0) and a
    cap: every node of the joined tree whose score (as for ``min_prob``) is at least ``extend_prob``
    is verified even beyond ``max_tree_tokens``, up to ``MAX_TREE_TOKENS`` in all (without the lookup
    beam the cap stays as it is: beam search then keeps only K - 1 beams). A node that is right with
    probability P is worth a verified row when P tokens take longer to decode than the row costs; in
    practice that is a long looked-up stretch of a loop the model has fallen into, which a step then
    verifies whole.

    ``lookup_tokens`` > 0 adds one more beam (drafter/lookup.py): the ``lookup_tokens`` tokens that
    followed the last occurrence, earlier in the row's own prompt and output, of its last n tokens
    (n = ``lookup_ngram`` down to 1), the copy continued past the end as a loop would go on. Under a
    tree cap its tokens compete with the drafter's nodes: the token at depth j after a match of m tokens (the n-gram extended backwards) scores
    c_m c_(m+1) ... c_(m+j-1), c_m = ``lookup_confidence[m - 1]`` (the last entry for longer matches),
    against the drafter's path probability; drafts drawn from q (sampling) give the lookup beam its
    slots of the cap first (engine.split_budget).

    ``min_tokens_per_step`` > 0 lets a row stop speculating while speculation does not pay: the
    engine keeps, per row, a running mean of the tokens its speculative steps emitted, and while
    that mean is below ``min_tokens_per_step`` (the break-even point: a speculative step's cost in
    plain decode steps, measured per setting) the row takes plain decode steps, trying one
    speculative step every ``engine.PROBE_EVERY`` steps to update the mean. Each step is exact on
    its own and the choice depends only on the row's past, so the output is unchanged in
    distribution (greedy: token for token). 0 = always speculate.
    """

    width: int = 4
    length: int = 5
    min_prob: float = 0.0
    max_tree_tokens: int = 0
    lookup_tokens: int = 0
    lookup_ngram: int = 4
    lookup_confidence: tuple[float, ...] = LOOKUP_CONFIDENCE
    min_tokens_per_step: float = 0.0
    extend_prob: float = 0.0

    def __post_init__(self) -> None:
        if self.width < 1:
            raise RedrafterError(f"beam width must be >= 1, got {self.width}")
        if self.length < 2:
            raise RedrafterError(
                f"beam length must be >= 2 (it counts the target's own token g0, so L=1 would draft "
                f"nothing), got {self.length}"
            )
        if not 0.0 <= self.min_prob < 1.0:
            raise RedrafterError(f"minimum draft probability must be in [0, 1), got {self.min_prob}")
        if self.max_tree_tokens != 0 and self.max_tree_tokens < 2:
            raise RedrafterError(f"max tree tokens must be 0 (no cap) or >= 2 (g0 and one drafted token), "
                                 f"got {self.max_tree_tokens}")
        if self.lookup_tokens < 0:
            raise RedrafterError(f"lookup tokens (--lookup-tokens) must be >= 0 (0 = off), got {self.lookup_tokens}")
        if self.lookup_ngram < 1:
            raise RedrafterError(f"the lookup n-gram (--lookup-ngram) must be >= 1, got {self.lookup_ngram}")
        if not self.lookup_confidence or not all(0 < c <= 1 for c in self.lookup_confidence):
            raise RedrafterError(f"lookup confidences must be probabilities in (0, 1], got {self.lookup_confidence}")
        if not 0.0 <= self.extend_prob < 1.0:
            raise RedrafterError(f"extend probability must be in [0, 1) (0 = off), got {self.extend_prob}")
        if not (self.min_tokens_per_step == 0 or 1 <= self.min_tokens_per_step <= self.length + self.lookup_tokens):
            raise RedrafterError(f"min tokens per step must be 0 (always speculate) or between 1 and the most a step "
                                 f"can emit, got {self.min_tokens_per_step}")


@dataclasses.dataclass(frozen=True)
class DrafterConfig:
    """Architecture of the recurrent draft head (reference checkpoint layout, REDRAFTER.md).

    ``hidden_size`` is the target LLM's H; ``vocab_size`` the size of the drafter's vocabulary
    projection; ``exit_dim`` the width of the residual blocks (2H means no ``input_proj``).
    ``target_vocab_size`` is set only for a reduced draft vocabulary (our extension): the projection
    then covers ``vocab_size`` = V_d tokens and the checkpoint carries the map ``draft_to_target``.
    """

    hidden_size: int
    vocab_size: int
    exit_dim: int | None = None
    num_draft_layers: int = 2
    rnn: bool = True
    target_vocab_size: int | None = None

    def __post_init__(self) -> None:
        if self.exit_dim is None:
            object.__setattr__(self, "exit_dim", 2 * self.hidden_size)
        for name in ("hidden_size", "vocab_size", "exit_dim"):
            if getattr(self, name) < 1:
                raise RedrafterError(f"drafter {name} must be >= 1, got {getattr(self, name)}")
        if self.num_draft_layers < 0:
            raise RedrafterError(f"num_draft_layers must be >= 0, got {self.num_draft_layers}")
        if self.target_vocab_size is not None and self.target_vocab_size < self.vocab_size:
            raise RedrafterError(f"target_vocab_size {self.target_vocab_size} is smaller than the draft "
                                 f"vocabulary {self.vocab_size}")

    @property
    def full_vocab_size(self) -> int:
        """The target vocabulary the drafter proposes tokens from."""
        return self.vocab_size if self.target_vocab_size is None else self.target_vocab_size

    @property
    def has_input_proj(self) -> bool:
        return self.exit_dim != 2 * self.hidden_size

    def to_dict(self) -> dict[str, Any]:
        """The reference ``config.json`` (TensorRT-LLM's converter reads these keys), plus
        ``target_vocab_size`` for a reduced draft vocabulary."""
        extra = {} if self.target_vocab_size is None else {"target_vocab_size": self.target_vocab_size}
        return {
            "model_type": "recurrent_drafting_drafter",
            "architectures": ["ReDrafter"],
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "exit_dim": self.exit_dim,
            "num_draft_layers": self.num_draft_layers,
            "rnn": self.rnn,
            "num_lookback_tokens": -1,
            **extra,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DrafterConfig":
        missing = [k for k in ("hidden_size", "vocab_size") if k not in data]
        if missing:
            raise RedrafterError(f"drafter config.json lacks required field(s): {', '.join(missing)}")
        return cls(
            hidden_size=int(data["hidden_size"]),
            vocab_size=int(data["vocab_size"]),
            exit_dim=int(data["exit_dim"]) if data.get("exit_dim") is not None else None,
            num_draft_layers=int(data.get("num_draft_layers", 2)),
            rnn=bool(data.get("rnn", True)),
            target_vocab_size=int(data["target_vocab_size"]) if data.get("target_vocab_size") is not None else None,
        )


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn from the target's logits (see sampling.py). ``temperature`` 0 is greedy;
    ``top_k`` 0 and ``top_p`` 1.0 switch those truncations off; ``seed`` None draws a random seed."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        def number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        def integer(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise RedrafterError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not integer(self.top_k) or self.top_k < 0:
            raise RedrafterError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and not integer(self.seed):
            raise RedrafterError(f"seed must be an integer or None, got {self.seed!r}")
        if not number(self.top_p) or not 0 < self.top_p <= 1:
            raise RedrafterError(f"top_p must be a number in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """When to stop: ``max_new_tokens`` generated tokens, or any of ``stop_token_ids`` emitted
    (the stop token itself is part of the output, as in transformers' ``generate``); and how to
    pick tokens (``sampling``; greedy by default)."""

    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    sampling: SamplingParams = SamplingParams()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise RedrafterError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if isinstance(self.stop_token_ids, (int, str)) or not all(isinstance(t, int) for t in self.stop_token_ids):
            raise RedrafterError(f"stop_token_ids must be a sequence of token ids, got {self.stop_token_ids!r}")
