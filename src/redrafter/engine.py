"""The generation loop: ReDrafter speculative decoding (and plain decoding) as a stream of events.

One speculative step, for every row of the batch at once:

1. Draft: the proposer turns (h, g0) into beams (batch, W, L), g0 first.
2. Pack: deduplicate shared prefixes into a tree (tree.pack).
3. Verify: one target forward over the packed tokens, positions = row length + depth.
4. Accept: the longest run of drafted tokens the target agrees with, over all beams.
5. Commit: keep g0 and the accepted tokens of the chosen beam in the KV cache.
6. Carry: the next h is the target's hidden state at the last kept token, the next g0 the
   target's own token after it (the bonus token).
7. Emit: the accepted tokens and the bonus token, cut at a stop token or the token budget.

Plain autoregressive decoding is the same loop with beams of width 1 and length 1 (just g0): the
forward is a single-token decode step and nothing is drafted. Every row keeps its own length,
positions, counters and stop state, so rows of different lengths share a batch; rows that finished
leave it (``select_rows`` on the cache) once they are a quarter of it, so a long answer does not keep
the short ones' rows computing.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Iterator, Protocol, Sequence, Union

import torch

from redrafter.config import MAX_TREE_TOKENS, BeamConfig, GenerationConfig, SamplingParams
from redrafter.drafter.beam_search import beam_search
from redrafter.drafter.lookup import History, join_beams, joined_tree, lookup_beams
from redrafter.drafter.model import Drafter, inference_copy
from redrafter.drafter.sibling_tree import draw_tree, sibling_template, tree_shape
from redrafter.errors import RedrafterError
from redrafter.models.base import TargetModel
from redrafter.tree import NO_TOKEN, pack
from redrafter.sampling import inverse_cdf, probabilities, row_generators, uniforms
from redrafter.verify import DraftProbs, draw, tree_accept


class Proposer(Protocol):
    """Makes the draft for one step."""

    beam_length: int

    def propose(self, context: torch.Tensor, g0: torch.Tensor, num_generated: torch.Tensor, *,
                rows: torch.Tensor, history: Sequence[Sequence[int]]) -> torch.Tensor:
        """Args:
            context:       (batch, H) the target's hidden state at the last committed token.
            g0:            (batch,) the target's own next token (already emitted).
            num_generated: (batch,) how many tokens each row has emitted, g0 included.
            rows:          (batch,) long, each row's prompt index in the ``generate`` call (finished
                           rows leave the batch, so batch row b need not be prompt b).
            history:       each row's prompt and emitted tokens, ending with g0.
        Returns:
            (batch, W, L) beams with ``beams[:, :, 0] == g0``.
        """


class SamplingProposer(Proposer, Protocol):
    """A proposer that can also draw its drafts at random (and say from which distributions).

    ``draft_mode`` "sample" or "tree" makes the engine call ``propose_sampled`` when sampling; "beam"
    keeps the deterministic ``propose`` (verified as point masses). All keep sampling exact."""

    draft_mode: str

    def propose_sampled(self, context: torch.Tensor, g0: torch.Tensor, num_generated: torch.Tensor,
                        params: SamplingParams, generators: Sequence[torch.Generator], *,
                        rows: torch.Tensor, history: Sequence[Sequence[int]]) -> tuple[torch.Tensor, DraftProbs | torch.Tensor | None]:
        """Returns (beams (batch, W, L), draft_probs): W paths drawn independently from the drafter,
        and the target-vocabulary distribution each drafted token was drawn from, as a dense
        (batch, W, L-1, V) tensor or a ``DraftProbs`` (None: every drafted token is a point mass)."""


class AutoregressiveProposer:
    """No draft: a single beam holding only g0, which makes each step one plain decode step."""

    beam_length = 1

    def propose(self, context: torch.Tensor, g0: torch.Tensor, num_generated: torch.Tensor, *,
                rows: torch.Tensor, history: Sequence[Sequence[int]]) -> torch.Tensor:
        return g0.view(-1, 1, 1)


class LookupProposer:
    """Context lookup alone (prompt lookup decoding, drafter/lookup.py): one beam per row copied from
    the row's own history, no drafter; the baseline that shows what the recurrent drafter adds."""

    def __init__(self, num_tokens: int, max_ngram: int = BeamConfig.lookup_ngram) -> None:
        BeamConfig(width=1, length=2, lookup_tokens=num_tokens, lookup_ngram=max_ngram)  # validates
        if num_tokens < 1:
            raise RedrafterError(f"context lookup needs at least 1 token, got {num_tokens}")
        self.num_tokens, self.max_ngram = num_tokens, max_ngram
        self.beam_length = 1 + num_tokens

    def propose(self, context: torch.Tensor, g0: torch.Tensor, num_generated: torch.Tensor, *,
                rows: torch.Tensor, history: Sequence[Sequence[int]]) -> torch.Tensor:
        return lookup_beams(g0, history, num_tokens=self.num_tokens, max_ngram=self.max_ngram)[0]


DRAFT_MODES = ("beam", "sample", "tree")
SAMPLED_DRAFT_MODES = ("sample", "tree")  # drafts drawn from q (``propose_sampled``); "beam" is beam search


class ReDrafterProposer:
    """Beam search over the recurrent drafter, embedding tokens with the target's table E.

    Drafts with a frozen snapshot of the drafter (``inference_copy``: packed or 4-bit linear layers)."""

    def __init__(self, drafter: Drafter, target: TargetModel, beam: BeamConfig, *, draft_mode: str = "sample",
                 drafter_weights: str = "auto") -> None:
        """``draft_mode`` (sampling only; greedy always uses beam search): "beam" drafts by beam search
        and the tree walk tests each child as a point mass, so a node accepts with probability
        p(its children) (the p-mass the drafter's top beams cover); "sample" draws W paths from q and
        accepts with the multi-draft rejection rule; "tree" draws a tree whose siblings are drawn
        from q without replacement (drafter/sibling_tree.py). Either way the output follows p exactly
        (verify.py). "sample" (default) got as many or more tokens per step with SmolLM2's drafter at
        T = 0.7 and 1.0 (docs/BENCHMARKS.md): beam search's W beams mostly share their first tokens,
        while W draws from q spread over more of p. ``drafter_weights``: see ``inference_copy`` (4-bit
        drafting products where they run, by default; ignored for a drafter that already is a copy)."""
        if draft_mode not in DRAFT_MODES:
            raise RedrafterError(f"unknown draft mode '{draft_mode}' (expected one of {', '.join(DRAFT_MODES)})")
        check_compatible(drafter, target)
        self.drafter = inference_copy(drafter, weights=drafter_weights)
        self.embed = target.embed
        # the table behind embed where the backend has one (native): lets the drafter search in one call
        table = getattr(target, "embedding", None)
        self.table = table if isinstance(table, torch.Tensor) else None
        self.beam = beam
        self.beam_length = max(beam.length, 1 + beam.lookup_tokens)
        self.draft_mode = draft_mode

    def propose(self, context: torch.Tensor, g0: torch.Tensor, num_generated: torch.Tensor, *,
                rows: torch.Tensor, history: Sequence[Sequence[int]]) -> torch.Tensor:
        """The drafter's beam search; with ``beam.lookup_tokens`` the context-lookup beam after them.
        A tree cap then keeps the K best nodes of both (drafter/lookup.py: q against the lookup's
        confidences), and past them those at or above ``beam.extend_prob``.

        Under a cap K the search runs min(W, K - 1) beams and keeps the nodes of every depth
        (``keep_pruned``): the K - 1 best drafted nodes lie among each depth's K - 1 best paths, so
        the cap then picks from all of them, as from an exhaustive search (up to ties in q), and
        the drafter runs K - 1 rows per depth instead of W."""
        beam, lookup = self.beam, self.beam.lookup_tokens > 0
        width, keep_pruned = search_shape(beam)
        result = beam_search(self.drafter, self.embed, context, g0, width=width, length=beam.length,
                             min_prob=beam.min_prob, max_tree_tokens=0 if lookup else beam.max_tree_tokens,
                             keep_pruned=keep_pruned, table=self.table)
        if not lookup:
            return result.beams
        looked_up, lookup_scores = self._lookup(g0, history)
        # The drafted nodes below the floor are dropped already; the looked-up ones are dropped here.
        return joined_tree(result.beams, result.path_scores, looked_up, lookup_scores, min_prob=beam.min_prob,
                           max_tokens=beam.max_tree_tokens, extend_prob=beam.extend_prob)

    def _lookup(self, g0: torch.Tensor, history: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return lookup_beams(g0, history, num_tokens=self.beam.lookup_tokens, max_ngram=self.beam.lookup_ngram,
                            confidence=self.beam.lookup_confidence)

    def propose_sampled(self, context: torch.Tensor, g0: torch.Tensor, num_generated: torch.Tensor,
                        params: SamplingParams, generators: Sequence[torch.Generator], *,
                        rows: torch.Tensor, history: Sequence[Sequence[int]]) -> tuple[torch.Tensor, DraftProbs | None]:
        """W independent draws of L-1 tokens from the recurrent drafter, each token drawn from q after
        the same sampling transform as the target's p (any q keeps the output exact; a q close to p
        gets more tokens accepted). Always L-1 tokens: ``beam.min_prob`` does not apply, because
        cutting paths by the probability of what was drawn would bias which children a node gets.
        For the same reason ``beam.max_tree_tokens`` does not choose among the draws; it caps their
        number instead (``sampled_draws``), fixed before anything is drawn. The context-lookup beam
        (``beam.lookup_tokens``) comes last, its tokens proposed as point masses; under a cap it is
        given its slots first, from the history alone (``split_budget``), and the paths the rest.

        With "sample", each row's paths and the random numbers it takes depend on that row alone, so a
        row samples what it would sample without the rows beside it; "tree" shares one sibling tree's
        shape across the batch."""
        drafter, tree = self.drafter, self.draft_mode == "tree"
        most = sampled_draws(self.beam, nodes=tree)
        batch = g0.shape[0]
        paths = torch.full((batch,), most, dtype=torch.long, device=g0.device)  # (batch,) draws per row
        looked_up = None
        if self.beam.lookup_tokens:
            looked_up, scores = self._lookup(g0, history)
            if self.beam.max_tree_tokens:
                paths, looked_up = split_budget(looked_up, scores, self.beam, nodes=tree)
        width = int(paths.max())
        if tree:
            if width == 0:  # the lookup fills the cap: no drafter draws this step, every token a point mass
                return looked_up, None
            # ``width`` nodes, siblings drawn without replacement
            shape = tree_shape(sibling_template(width, self.beam.length - 1))
            beams, dists = draw_tree(lambda n: self._drafter_step(context, n), g0, shape, params, generators,
                                     drafter.to_target_ids)
            draft_probs = DraftProbs(dists, drafter.draft_to_target, distinct=True)
            return (beams if looked_up is None else join_beams(beams, looked_up)), draft_probs
        # Every row takes the numbers of ``most`` paths, drawn or not: path w of a row uses column w
        numbers = uniforms(generators, (self.beam.length - 1) * most, g0.device).view(batch, -1, most)
        if width == 0:  # the lookup fills the cap: no drafter draws this step, every token a point mass
            return looked_up, None
        step, state = self._drafter_step(context, width), None
        beams, draws = g0.view(batch, 1, 1).expand(batch, width, 1), []
        for depth in range(self.beam.length - 1):
            state, logits = step(state, beams[:, :, -1])
            q = probabilities(logits, params)  # (batch, W, V_d)
            picked = inverse_cdf(q, numbers[:, depth, :width].contiguous())  # (batch, W)
            beams = torch.cat([beams, drafter.to_target_ids(picked).unsqueeze(-1)], dim=-1)
            draws.append(q)
        unused = torch.arange(width, device=g0.device).view(1, -1) >= paths.view(-1, 1)  # (batch, W)
        beams[:, :, 1:].masked_fill_(unused.unsqueeze(-1), NO_TOKEN)  # paths past a row's share: not verified
        # q over the draft vocabulary (zero outside it); the lookup beam's tokens are point masses
        draft_probs = DraftProbs(torch.stack(draws, dim=2), drafter.draft_to_target)  # (batch, W, L-1, V_d)
        if looked_up is not None:
            beams = join_beams(beams, looked_up)
        return beams, draft_probs

    def _drafter_step(self, context: torch.Tensor, width: int):
        """One depth of the drafter for W paths per row: a function (state (batch, W, S) or None for s_0,
        tokens (batch, W)) -> (state (batch, W, S), logits (batch, W, V_d)). It runs in one call
        (``FusedSearch.step``, the same values) where the drafter's fused search runs, else as
        ``Drafter.next_state`` and ``logits``."""
        drafter, batch = self.drafter, context.shape[0]
        fused = getattr(drafter, "fused_search", None)
        if fused is not None and fused.runs(context, self.table, batch * width):
            rows = context.to(fused.dtype).repeat_interleave(width, 0)  # (batch * W, H), row b * W + w

            def fused_step(state: torch.Tensor | None, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                flat = None if state is None else state.reshape(batch * width, -1)
                state, logits = fused.step(rows, flat, tokens.reshape(-1), self.table)
                return state.view(batch, width, -1), logits.view(batch, width, -1)

            return fused_step
        h = context.to(next(drafter.parameters()).dtype).unsqueeze(1).expand(batch, width, -1)

        def step(state: torch.Tensor | None, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            state = drafter.next_state(drafter.initial_state(h) if state is None else state,
                                       self.embed(tokens).to(h.dtype))
            return state, drafter.logits(h, state)

        return step


def search_shape(beam: BeamConfig) -> tuple[int, bool]:
    """(beams to search, keep_pruned) for ``ReDrafterProposer.propose``: under a cap K that can bind,
    min(W, K - 1) beams that keep every depth's nodes; otherwise W beams as configured."""
    if not beam.max_tree_tokens:
        return beam.width, False
    width = min(beam.width, max(1, beam.max_tree_tokens - 1))
    return width, beam.max_tree_tokens < 1 + width * (beam.length - 1)


SAMPLED_LOOKUP_MIN = 0.5  # a looked-up token goes before drawn paths when its confidence says it is more likely right


def split_budget(looked_up: torch.Tensor, scores: torch.Tensor, beam: BeamConfig,
                 nodes: bool = False) -> tuple[int, torch.Tensor]:
    """Share the K - 1 drafted slots of a capped tree between the lookup beam and paths drawn from q.

    Drawn paths cannot be chosen by what they drew (that would bias the tree walk), so the split is
    fixed from the history alone: in each row the looked-up tokens with confidence (``lookup_beams``'
    scores) of at least ``SAMPLED_LOOKUP_MIN`` come first; then as many whole paths of L-1 tokens as
    the row has room for (with ``nodes``, for the "tree" draft mode: as many single tree nodes as every
    row has room for, since the rows share the sibling tree's shape); slots left in a row go to its
    further looked-up tokens. With ``beam.extend_prob`` a row keeps its looked-up tokens of at least
    that confidence even past the cap, up to ``MAX_TREE_TOKENS``.

    Args:
        looked_up, scores: (batch, 1, 1 + N) the lookup beams and their scores (``lookup_beams``).
    Returns:
        ((batch,) paths, or nodes, to draw in each row, possibly 0; the lookup beams cut to their share
        of the slots).
    """
    budget = beam.max_tree_tokens - 1
    confident = (scores[:, 0, 1:] >= math.log(SAMPLED_LOOKUP_MIN)).sum(dim=-1).clamp(max=budget)  # (batch,)
    unit = draw_size(beam, nodes)
    paths = ((budget - confident) // unit).clamp(max=sampled_draws(beam, nodes=nodes, cap=False))  # (batch,)
    if nodes:
        paths = paths.min().expand_as(paths)
    allowed = budget - paths * unit  # (batch,) looked-up tokens each row may keep
    if beam.extend_prob > 0:
        sure = (scores[:, 0, 1:] >= math.log(beam.extend_prob)).sum(dim=-1)
        allowed = torch.maximum(allowed, sure.clamp(max=MAX_TREE_TOKENS - 1 - paths * unit))
    depth = torch.arange(looked_up.shape[-1], device=looked_up.device)
    return paths, torch.where(depth > allowed.view(-1, 1, 1), torch.full_like(looked_up, NO_TOKEN), looked_up)


def draw_size(beam: BeamConfig, nodes: bool) -> int:
    """Tree tokens per draw: a path of L-1 tokens ("sample"), or one node (``nodes``, "tree")."""
    return 1 if nodes else beam.length - 1


def sampled_draws(beam: BeamConfig, *, nodes: bool = False, cap: bool = True) -> int:
    """How many draws ``propose_sampled`` makes: W paths of L-1 tokens, or with ``nodes`` ("tree" draft
    mode) as many single nodes as those paths hold. Under ``max_tree_tokens`` K (unless ``cap`` is
    False) fewer, so that the tree of the draws has at most K tokens, g0 included, whatever they are
    (1 + draws * draw_size <= K, at least 1 draw)."""
    unit = draw_size(beam, nodes)
    most = beam.width * (beam.length - 1) // unit
    if not cap or beam.max_tree_tokens <= 0:
        return most
    return max(1, min(most, (beam.max_tree_tokens - 1) // unit))


def check_compatible(drafter: Drafter, target: TargetModel) -> None:
    """Fail up front, naming both sides, when a drafter was trained for another model."""
    config, info = drafter.config, target.info
    if config.hidden_size != info.hidden_size:
        raise RedrafterError(f"drafter hidden_size {config.hidden_size} does not match model "
                             f"'{info.name}' hidden size {info.hidden_size}")
    if config.full_vocab_size != info.vocab_size:
        field = "vocab_size" if config.target_vocab_size is None else "target_vocab_size"
        raise RedrafterError(f"drafter {field} {config.full_vocab_size} does not match model "
                             f"'{info.name}' vocabulary size {info.vocab_size}")


@dataclasses.dataclass(frozen=True)
class GenerationStats:
    """Per-row counters. ``num_steps`` counts target forwards after the prefill."""

    num_prompt_tokens: int
    num_new_tokens: int
    num_steps: int
    first_token_s: float
    elapsed_s: float
    num_tree_tokens: int = 0  # tokens verified over all steps, g0 included (num_steps for plain decoding)

    @property
    def tree_tokens_per_step(self) -> float:
        """Mean tokens per target forward after the prefill (the verified tree's size, g0 included)."""
        return self.num_tree_tokens / self.num_steps if self.num_steps else float("nan")

    @property
    def tokens_per_step(self) -> float:
        """τ: tokens appended per target forward after the prefill (the prefill yields the first
        token), counting the bonus token; exactly 1.0 for plain decoding."""
        return (self.num_new_tokens - 1) / self.num_steps if self.num_steps else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.num_new_tokens / self.elapsed_s if self.elapsed_s > 0 else float("nan")


@dataclasses.dataclass(frozen=True)
class TokensEvent:
    """New tokens of one row: ``accepted`` drafted tokens plus the bonus token (prefill: g0 only).

    ``hidden`` (only when asked for): (len(token_ids), H), row i the target's hidden state that
    predicted ``token_ids[i]`` (the state after the token before it), e.g. drafter training data.
    """

    row: int
    token_ids: tuple[int, ...]
    accepted: int
    hidden: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class FinishEvent:
    """A row is done: ``reason`` is "stop" (a stop token was emitted) or "length"."""

    row: int
    reason: str
    token_ids: tuple[int, ...]
    stats: GenerationStats


Event = Union[TokensEvent, FinishEvent]


PROBE_EVERY = 8  # a row below BeamConfig.min_tokens_per_step still speculates every 8th step
RATE_WEIGHT = 0.25  # weight of the newest speculative step in a row's running mean of tokens per step


@dataclasses.dataclass
class _Row:
    ids: History  # the prompt, then every emitted token: what a proposer may look back on (indexed)
    prompt_length: int
    steps: int = 0
    tree_tokens: int = 0  # tokens verified over all steps, g0 included
    first_token_s: float = 0.0
    finished: bool = False
    rate: float | None = None  # running mean of tokens per speculative step (BeamConfig.min_tokens_per_step)
    plain_run: int = 0  # plain steps since the last speculative one

    @property
    def num_tokens(self) -> int:
        """How many tokens the row has emitted."""
        return len(self.ids) - self.prompt_length

    def speculates(self, floor: float) -> bool:
        """Whether the row's next step speculates: always with no floor, until a first speculative
        step has been seen, while the mean pays, and every PROBE_EVERY-th step otherwise."""
        return floor <= 0 or self.rate is None or self.rate >= floor or self.plain_run + 1 >= PROBE_EVERY

    def observe(self, speculated: bool, tokens: int) -> None:
        """Record a step: a speculative one updates the mean, a plain one counts toward the next probe."""
        if speculated:
            self.rate = tokens if self.rate is None else (1 - RATE_WEIGHT) * self.rate + RATE_WEIGHT * tokens
            self.plain_run = 0
        else:
            self.plain_run += 1


class Engine:
    """Generation over one target backend with one proposer (a drafter, or none for plain decoding)."""

    def __init__(self, target: TargetModel, proposer: Proposer | None = None) -> None:
        self.target = target
        self.proposer = proposer if proposer is not None else AutoregressiveProposer()

    def generate(self, prompts: Sequence[Sequence[int]], config: GenerationConfig, *,
                 return_hidden: bool = False, row_offset: int = 0) -> Iterator[Event]:
        """Generate for a batch of tokenized prompts; yields events as tokens are decided.

        ``return_hidden`` attaches to each TokensEvent the hidden states that predicted its tokens.
        When sampling, row b draws from its own random stream, number ``row_offset + b`` of
        ``config.sampling.seed`` (so prompts sent one at a time can keep independent streams). What a
        row draws depends on that row alone, so in float32 it samples what the same prompt samples
        alone with its row number (except in the "tree" draft mode, whose sibling tree's shape the
        rows share); in bf16 a padded batch rounds differently (README, "Library")."""
        self.check(prompts, config, row_offset=row_offset)
        with torch.inference_mode():
            yield from self._generate(prompts, config, return_hidden, row_offset)

    def check(self, prompts: Sequence[Sequence[int]], config: GenerationConfig, *, row_offset: int = 0) -> None:
        """Fail with a clear message for prompts that cannot run: empty, or too long for the model's
        positions with ``config.max_new_tokens`` and the tokens a step may verify past that budget
        (the proposer's ``beam_length``). Prompts are numbered from ``row_offset + 1``."""
        if not prompts:
            raise RedrafterError("no prompts given")
        limit, vocab = self.target.info.max_positions, self.target.info.vocab_size
        reserve = self.proposer.beam_length
        for i, prompt in enumerate(prompts, start=row_offset + 1):
            if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence) or not all(
                    isinstance(t, int) for t in prompt):
                raise RedrafterError(f"prompt {i} must be a sequence of token ids (tokenize text first), got "
                                     f"{type(prompt).__name__}")
            if len(prompt) == 0:
                raise RedrafterError(f"prompt {i} is empty")
            if not (0 <= min(prompt) and max(prompt) < vocab):
                raise RedrafterError(f"prompt {i} holds token ids outside the model's vocabulary 0 .. {vocab - 1}: "
                                     f"{[t for t in prompt if not 0 <= t < vocab][:5]}")
            if len(prompt) + config.max_new_tokens + reserve > limit:
                room = limit - len(prompt) - reserve
                raise RedrafterError(
                    f"prompt {i} ({len(prompt)} tokens) + max_new_tokens {config.max_new_tokens} + the {reserve} "
                    f"tokens a step may verify past them exceed the model's {limit} positions"
                    + (f": at most {room} new tokens fit" if room >= 1 else ""))

    def _generate(self, prompts: Sequence[Sequence[int]], config: GenerationConfig,
                  return_hidden: bool, row_offset: int) -> Iterator[Event]:
        target, device = self.target, self.target.device
        start = time.perf_counter()
        batch = len(prompts)
        rows_index = torch.arange(batch, device=device)
        rows = [_Row(ids=History(p), prompt_length=len(p)) for p in prompts]
        stop_ids = set(config.stop_token_ids)
        params = config.sampling
        generators = None if params.greedy else row_generators(params.seed, batch, device, offset=row_offset)
        beam_config = getattr(self.proposer, "beam", None)
        floor = beam_config.min_tokens_per_step if isinstance(beam_config, BeamConfig) else 0.0

        # Prefill: every prompt token, causal, padded rows ignored past their length.
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        width = int(lengths.max())
        tokens = torch.zeros(batch, width, dtype=torch.long, device=device)
        for i, prompt in enumerate(prompts):
            tokens[i, : len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
        positions = torch.arange(width, device=device).expand(batch, width)
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril().expand(batch, width, width)
        cache = target.new_cache(batch, plain_decoding=self.proposer.beam_length == 1)
        out = target.forward(tokens, positions, causal, cache)
        target.commit(cache, positions, lengths)
        last = lengths - 1
        context = out.hidden[rows_index, last]  # (batch, H)
        g0 = draw(out.logits_at(rows_index, last), params, generators)  # (batch,): the head for these alone
        hidden = context.unsqueeze(1) if return_hidden else None  # (batch, 1, H): g0 came from it
        yield from self._emit(rows, list(range(batch)), [[t] for t in g0.tolist()], [0] * batch, config, stop_ids,
                              start, hidden)

        live = list(range(batch))  # the original row of each cache row; finished rows leave in groups
        while not all(row.finished for row in rows):
            # 0. Rows that finished leave the batch once they are a quarter of it (one cache gather
            #    each time; the remaining rows' results do not change).
            if sum(rows[r].finished for r in live) * 4 >= len(live):
                keep_rows = [b for b, r in enumerate(live) if not rows[r].finished]
                index = torch.tensor(keep_rows, device=device)
                target.select_rows(cache, index)
                context, g0 = context[index], g0[index]
                if generators is not None:
                    generators = [generators[b] for b in keep_rows]
                live = [live[b] for b in keep_rows]
                batch, rows_index = len(live), torch.arange(len(live), device=device)
            num_generated = torch.tensor([rows[r].num_tokens for r in live], device=device)
            history = [rows[r].ids for r in live]  # no copies: proposers only read them
            prompt_rows = torch.tensor(live, device=device)
            # 1. Draft: beam search (any deterministic draft is verified as point masses), or random
            #    draws from the drafter when sampling with draft_mode "sample" or "tree". Rows whose speculation
            #    does not pay (BeamConfig.min_tokens_per_step) keep g0 alone: a plain decode step.
            draft_probs = None
            speculating = [not rows[r].finished and rows[r].speculates(floor) for r in live]
            if not any(speculating):
                beams = g0.view(batch, 1, 1)
            elif not params.greedy and getattr(self.proposer, "draft_mode", "beam") in SAMPLED_DRAFT_MODES:
                beams, draft_probs = self.proposer.propose_sampled(context, g0, num_generated, params, generators,
                                                                   rows=prompt_rows, history=history)
            else:
                beams = self.proposer.propose(context, g0, num_generated, rows=prompt_rows,
                                              history=history)  # (batch, W, L)
            if any(speculating) and not all(speculating):
                plain = torch.tensor([not s for s in speculating], device=device).view(batch, 1, 1)
                drafted = torch.arange(beams.shape[2], device=device).view(1, 1, -1) > 0
                beams = torch.where(plain & drafted, torch.full_like(beams, NO_TOKEN), beams)
            # 2. Pack the beams into a tree.
            tree = pack(beams)
            # 3. Verify all beams in one forward.
            out = target.forward(tree.tokens, cache.lengths.view(batch, 1) + tree.depths, tree.mask, cache)
            # 4. Accept (greedy: longest run the target's argmax agrees with; sampling: tree rejection).
            acceptance = tree_accept(beams, tree.unpacker, out.logits, params, draft_probs, generators)
            # 5. Commit g0 and the accepted tokens; finished rows keep their cache as it is.
            keep = tree.unpacker[rows_index, acceptance.beam]  # (batch, L) packed indices of the chosen beam
            counts = acceptance.accepted + 1
            if any(rows[r].finished for r in live):
                counts = torch.where(torch.tensor([not rows[r].finished for r in live], device=device), counts, 0)
            target.commit(cache, keep, counts)
            # 6. Carry h and g0 into the next step.
            last_kept = keep[rows_index, acceptance.accepted]
            context = out.hidden[rows_index, last_kept]
            g0 = acceptance.bonus
            # 7. Emit.
            accepted = acceptance.accepted.tolist()
            chosen = acceptance.tokens.tolist()
            bonus = g0.tolist()
            tree_sizes = tree.lengths.tolist()
            new = [chosen[b][1: 1 + accepted[b]] + [bonus[b]] for b in range(batch)]
            for b, r in enumerate(live):
                if not rows[r].finished:
                    rows[r].steps += 1
                    rows[r].tree_tokens += tree_sizes[b]
                    rows[r].observe(speculating[b], accepted[b] + 1)
            # The kept tokens' states predicted the new ones: g0's the first drafted token, ... the last's the bonus.
            hidden = out.hidden[rows_index.view(batch, 1), keep] if return_hidden else None  # (batch, L, H)
            yield from self._emit(rows, live, new, accepted, config, stop_ids, start, hidden)

    @staticmethod
    def _emit(rows: list[_Row], live: list[int], new: list[list[int]], accepted: list[int], config: GenerationConfig,
              stop_ids: set[int], start: float, hidden: torch.Tensor | None = None) -> Iterator[Event]:
        """Events for the batch's rows: ``new[b]``, ``accepted[b]`` and ``hidden[b]`` belong to row ``live[b]``."""
        now = time.perf_counter() - start
        for b, index in enumerate(live):
            row = rows[index]
            if row.finished:
                continue
            tokens = new[b][: config.max_new_tokens - row.num_tokens]
            reason = None
            for i, token in enumerate(tokens):
                if token in stop_ids:
                    tokens, reason = tokens[: i + 1], "stop"
                    break
            if not row.num_tokens:
                row.first_token_s = now
            row.ids.extend(tokens)
            if reason is None and row.num_tokens >= config.max_new_tokens:
                reason = "length"
            states = None if hidden is None else hidden[b, : len(tokens)].clone()
            yield TokensEvent(row=index, token_ids=tuple(tokens), accepted=accepted[b], hidden=states)
            if reason is not None:
                row.finished = True
                stats = GenerationStats(num_prompt_tokens=row.prompt_length, num_new_tokens=row.num_tokens,
                                        num_steps=row.steps, first_token_s=row.first_token_s, elapsed_s=now,
                                        num_tree_tokens=row.tree_tokens)
                yield FinishEvent(row=index, reason=reason, token_ids=tuple(row.ids[row.prompt_length:]), stats=stats)
