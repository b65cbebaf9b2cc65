"""Beam search against brute-force enumeration on a tiny vocabulary."""

import itertools
import math

import pytest
import torch

from redrafter.config import DrafterConfig
from redrafter.drafter import Drafter, beam_search
from redrafter.tree import NO_TOKEN

VOCAB, HIDDEN = 4, 8


@pytest.fixture()
def setup():
    torch.manual_seed(0)
    drafter = Drafter(DrafterConfig(hidden_size=HIDDEN, vocab_size=VOCAB, exit_dim=12, num_draft_layers=2)).eval()
    for p in drafter.parameters():
        torch.nn.init.normal_(p, std=0.3)  # peaked enough q: no ties between sequences
    embedding = torch.nn.Embedding(VOCAB, HIDDEN)
    context = torch.randn(2, HIDDEN)
    g0 = torch.tensor([1, 3])
    return drafter, embedding, context, g0


def sequence_log_q(drafter, embedding, h, g0, drafted):
    """Score one drafted sequence by running the head token by token (no batching, no beams)."""
    with torch.no_grad():
        state, total, previous, per_step = torch.zeros(HIDDEN), 0.0, g0, []
        for token in drafted:
            state = drafter.next_state(state, embedding(torch.tensor(previous)))
            log_q = torch.log_softmax(drafter.logits(h, state), dim=-1)
            per_step.append(log_q)
            total += float(log_q[token])
            previous = token
    return total, per_step


def all_scores(drafter, embedding, h, g0, length):
    return {seq: sequence_log_q(drafter, embedding, h, g0, seq)[0]
            for seq in itertools.product(range(VOCAB), repeat=length - 1)}


@pytest.mark.parametrize("length", [2, 3, 4])
def test_wide_beam_is_exhaustive_top_w(implementation, setup, length):
    """With W >= V^(L-2) nothing is pruned before the last step, so the beams are exactly the W best
    of all V^(L-1) drafted sequences, in order, with their summed log q."""
    drafter, embedding, context, g0 = setup
    width = VOCAB ** (length - 2) if length > 2 else VOCAB
    result = beam_search(drafter, embedding, context, g0, width=width, length=length)
    for b in range(2):
        scores = all_scores(drafter, embedding, context[b], int(g0[b]), length)
        best = sorted(scores, key=scores.get, reverse=True)[:width]
        assert [tuple(beam[1:]) for beam in result.beams[b].tolist()] == best
        assert all(beam[0] == int(g0[b]) for beam in result.beams[b].tolist())
        torch.testing.assert_close(result.scores[b], torch.tensor([scores[s] for s in best]), atol=1e-5, rtol=0)


def test_width_one_is_greedy_chain(implementation, setup):
    drafter, embedding, context, g0 = setup
    result = beam_search(drafter, embedding, context, g0, width=1, length=5)
    for b in range(2):
        chain, previous, state = [], int(g0[b]), torch.zeros(HIDDEN)
        with torch.no_grad():
            for _ in range(4):
                state = drafter.next_state(state, embedding(torch.tensor(previous)))
                previous = int(drafter.logits(context[b], state).argmax())
                chain.append(previous)
        assert result.beams[b, 0, 1:].tolist() == chain


@pytest.mark.parametrize("width", [2, 3])
def test_pruned_beams_match_explicit_enumeration(implementation, setup, width):
    """Narrow beams: at each depth keep the W best extensions of the kept prefixes, done naively over
    explicit sequences scored from scratch; first step expands only g0."""
    drafter, embedding, context, g0 = setup
    length = 5
    result = beam_search(drafter, embedding, context, g0, width=width, length=length, return_log_probs=True)
    for b in range(2):
        kept = [()]
        for depth in range(1, length):
            candidates = [prefix + (t,) for prefix in kept for t in range(VOCAB)]
            score = {c: sequence_log_q(drafter, embedding, context[b], int(g0[b]), c)[0] for c in candidates}
            kept = sorted(candidates, key=score.get, reverse=True)[:width]
        assert [tuple(beam[1:]) for beam in result.beams[b].tolist()] == kept
        for i, seq in enumerate(kept):
            _, per_step = sequence_log_q(drafter, embedding, context[b], int(g0[b]), seq)
            torch.testing.assert_close(result.log_probs[b, i], torch.stack(per_step), atol=1e-5, rtol=0)


@pytest.mark.parametrize("width", [1, 3])
def test_min_prob_drops_every_node_below_it_and_stops_where_none_is_left(implementation, setup, width):
    """Adaptive draft: the result is the beam search of depth d with every node of drafter probability
    below min_prob set to NO_TOKEN (down to g0 alone), where d is the deepest search whose best beam
    of some row still reaches min_prob."""
    drafter, embedding, context, g0 = setup
    full = {n: beam_search(drafter, embedding, context, g0, width=width, length=n) for n in range(2, 7)}
    scores = full[6].path_scores.flatten().unique().sort(descending=True).values  # 0 (g0) first
    assert len(scores) > 6
    depths = set()
    for i in (0, 1, 2, len(scores) // 2, len(scores) - 2):
        floor = float((scores[i] + scores[i + 1]) / 2)
        result = beam_search(drafter, embedding, context, g0, width=width, length=6, min_prob=math.exp(floor))
        depth = max([n for n in full if float(full[n].scores[:, 0].max()) >= floor], default=1)
        reference = full[max(depth, 2)]
        expected = torch.where(reference.path_scores >= floor, reference.beams,
                               torch.full_like(reference.beams, NO_TOKEN))[..., :depth]
        assert torch.equal(result.beams, expected)
        depths.add(depth)
    assert len(depths) >= 3
    unsure = beam_search(drafter, embedding, context, g0, width=width, length=6, min_prob=0.999)
    assert torch.equal(unsure.beams, g0.view(-1, 1, 1).expand(-1, width, 1))  # g0 alone: a plain decode step
    assert torch.equal(beam_search(drafter, embedding, context, g0, width=width, length=6, min_prob=1e-12).beams,
                       full[6].beams)


@pytest.mark.parametrize("width", [1, 3])
def test_path_scores_are_the_prefix_log_q_and_the_cap_keeps_the_best_nodes(implementation, setup, width):
    """path_scores[b, w, k] is the log q of the beam's first k drafted tokens (scored one by one),
    and max_tree_tokens keeps the K most probable distinct nodes (g0 included)."""
    drafter, embedding, context, g0 = setup
    full = beam_search(drafter, embedding, context, g0, width=width, length=4)
    for b in range(2):
        for w in range(width):
            drafted = full.beams[b, w, 1:].tolist()
            for k in range(1, 4):
                expected, _ = sequence_log_q(drafter, embedding, context[b], int(g0[b]), drafted[:k])
                assert abs(float(full.path_scores[b, w, k]) - expected) < 1e-5
    cap = 3  # binds for both widths (4 and 10 nodes)
    capped = beam_search(drafter, embedding, context, g0, width=width, length=4, max_tree_tokens=cap).beams
    for b in range(2):
        nodes = {}
        for w, k in itertools.product(range(width), range(4)):
            nodes.setdefault(tuple(full.beams[b, w, : k + 1].tolist()), float(full.path_scores[b, w, k]))
        best = sorted(nodes, key=lambda p: (-nodes[p], len(p)))[:cap]
        kept = {tuple(capped[b, w, : k + 1].tolist()) for w, k in itertools.product(range(width), range(4))
                if capped[b, w, k] >= 0}
        assert kept == set(best)


@pytest.mark.parametrize("length", [3, 4])
def test_under_a_cap_k_minus_one_beams_give_the_same_tree(implementation, setup, length):
    """ReDrafterProposer searches min(W, K - 1) beams under a cap K, keeping every depth's beams
    (``keep_pruned``): the K - 1 best drafted nodes lie on the best K - 1 paths of every depth, so
    the capped tree is the one of an exhaustive search (W = V^(L-1)). Without keep_pruned a node
    whose extensions all fell out of the top W is lost (the test has power: that case occurs)."""
    drafter, embedding, context, g0 = setup
    exhaustive = VOCAB ** (length - 1)

    def nodes(width, cap, keep_pruned):
        beams = beam_search(drafter, embedding, context, g0, width=width, length=length, max_tree_tokens=cap,
                            keep_pruned=keep_pruned).beams
        return [{tuple(beams[b, w, : k + 1].tolist()) for w, k in itertools.product(range(beams.shape[1]), range(length))
                 if beams[b, w, k] >= 0} for b in range(2)]

    lost = 0
    for cap in range(1, 9):
        assert nodes(max(1, cap - 1), cap, True) == nodes(exhaustive, cap, False), cap
        lost += nodes(max(1, cap - 1), cap, False) != nodes(exhaustive, cap, False)
    assert lost > 0


@pytest.mark.parametrize("extension", ["int4", "avx2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_beam_select_is_the_best_w_of_scores_plus_log_q(dtype, extension):
    """Our one-pass selection (csrc/beam_select.cpp, 16 lanes in the AVX-512 extension, 8 in the AVX2
    one) against float64: the W best of score[r] + log_softmax(logits[r])[v], best first, ties to the
    smaller r * V + v; beams at -inf add nothing while W finite candidates exist. Vocabularies cover
    the vector loop and its tail."""
    from helpers import require_kernels

    module = require_kernels(extension)
    generator = torch.Generator().manual_seed(3)
    for trial in range(60):
        batch, beams = int(torch.randint(1, 3, (1,), generator=generator)), int(torch.randint(1, 9, (1,), generator=generator))
        vocab = int(torch.randint(1, 80, (1,), generator=generator))
        width = int(torch.randint(1, min(beams * vocab, 12) + 1, (1,), generator=generator))
        logits = (torch.randn(batch, beams, vocab, generator=generator) * 3).round().to(dtype)  # many exact ties
        scores = -torch.rand(batch, beams, generator=generator).round(decimals=1) * 4
        if trial % 3 == 0 and beams > 1:
            scores[:, 1:] = float("-inf")  # the first depth: only beam 0 is live
        top, parent, token = module.beam_select(logits, scores, width)
        exact = scores.double().unsqueeze(-1) + torch.log_softmax(logits.double(), dim=-1)  # (batch, R, V)
        for b in range(batch):
            flat = (parent[b] * vocab + token[b]).tolist()
            assert len(set(flat)) == width and all(0 <= f < beams * vocab for f in flat)
            values = exact[b].flatten()
            torch.testing.assert_close(top[b].double(), values[flat], atol=1e-5, rtol=0)
            assert all(top[b, k] >= top[b, k + 1] for k in range(width - 1))
            assert all(flat[k] < flat[k + 1] for k in range(width - 1) if top[b, k] == top[b, k + 1])
            rest = [v for i, v in enumerate(values.tolist()) if i not in flat]
            if rest:
                assert float(top[b, -1]) >= max(rest) - 1e-5  # nothing left out beats what was kept


@pytest.mark.parametrize("extension", ["int4", "avx2"])
def test_beam_select_rejects_bad_input(extension):
    from helpers import require_kernels

    module = require_kernels(extension)
    with pytest.raises(RuntimeError, match="width"):
        module.beam_select(torch.zeros(1, 2, 3), torch.zeros(1, 2), 7)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        module.beam_select(torch.zeros(1, 2, 3, dtype=torch.float64), torch.zeros(1, 2), 2)
    with pytest.raises(RuntimeError, match="scores"):
        module.beam_select(torch.zeros(1, 2, 3), torch.zeros(1, 3), 2)


def test_search_shape_and_keep_pruned_limits():
    """The proposer's search: K - 1 beams keeping every depth under a cap that can bind, else as
    configured; log q is not returned for kept shallower beams."""
    from redrafter import BeamConfig
    from redrafter.engine import search_shape

    assert search_shape(BeamConfig(width=8, length=3, max_tree_tokens=6)) == (5, True)
    assert search_shape(BeamConfig(width=8, length=3)) == (8, False)
    assert search_shape(BeamConfig(width=2, length=3, max_tree_tokens=8)) == (2, False)  # 5 nodes at most: no cap
    drafter = Drafter(DrafterConfig(hidden_size=HIDDEN, vocab_size=VOCAB, exit_dim=12)).eval()
    with pytest.raises(ValueError, match="keep_pruned"):
        beam_search(drafter, torch.nn.Embedding(VOCAB, HIDDEN), torch.randn(1, HIDDEN), torch.tensor([1]), width=2,
                    length=3, keep_pruned=True, return_log_probs=True)


def kept_paths(beams: torch.Tensor) -> list[set[tuple[int, ...]]]:
    """Per row, the tree's nodes as the paths from g0 to them (a node is kept while its token is not
    NO_TOKEN; the floor only cuts the ends of beams)."""
    rows = []
    for row in beams.tolist():
        paths = set()
        for beam in row:
            for depth in range(1, len(beam) + 1):
                if beam[depth - 1] == NO_TOKEN:
                    break
                paths.add(tuple(beam[:depth]))
        rows.append(paths)
    return rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("input_proj", [True, False])
def test_fused_search_equals_the_loop_bit_for_bit(input_proj, dtype):
    """``FusedSearch`` (csrc/draft_search.cpp) against ``beam_search``'s own loop over the same int4
    inference copy: the same beams, scores and path scores, exactly, for batches of 1-4 rows, 1-5 beams,
    lengths 1-5, with and without the shallower depths (keep_pruned) and a tree cap, and a reduced draft
    vocabulary. The loop runs wherever no table is passed; with one, the fused search must have run
    (a loop whose drafter's ``next_state`` fails cannot be the one that answered). bf16 runs the AVX-512
    extension's search, float32 the AVX2 one's."""
    from helpers import require_kernels

    from redrafter.drafter.model import inference_copy

    require_kernels("int4" if dtype == torch.bfloat16 else "avx2")
    require_kernels("tree")
    hidden, vocab, target_vocab = 64, 256, 1000
    torch.manual_seed(1)
    config = DrafterConfig(hidden_size=hidden, vocab_size=vocab, exit_dim=hidden if input_proj else 2 * hidden,
                           num_draft_layers=2, target_vocab_size=target_vocab)
    drafter = Drafter(config)
    for p in drafter.parameters():
        if p.is_floating_point():
            torch.nn.init.normal_(p, std=0.2)
    drafter.draft_to_target = torch.randperm(target_vocab)[:vocab]
    fast = inference_copy(drafter.to(dtype), weights="int4")
    assert fast.fused_search is not None and (fast.input_proj is not None) == input_proj
    table = torch.randn(target_vocab, hidden).to(dtype)
    embed = torch.nn.functional.embedding
    generator = torch.Generator().manual_seed(2)
    compared = floored = 0
    for batch in (1, 2, 4):
        for width, length, keep_pruned, cap in [(4, 3, True, 5), (1, 3, False, 0), (3, 4, True, 0), (2, 2, False, 0),
                                                (4, 5, True, 6), (2, 1, False, 0), (4, 3, False, 0), (3, 5, False, 0)]:
            context = torch.randn(batch, hidden, generator=generator).to(dtype)
            g0 = torch.randint(0, target_vocab, (batch,), generator=generator)
            kwargs = dict(width=width, length=length, keep_pruned=keep_pruned, max_tree_tokens=cap)
            loop = beam_search(fast, lambda ids: embed(ids, table), context, g0, **kwargs)
            original = fast.next_state
            fast.next_state = None  # the loop would call it
            try:
                fused = beam_search(fast, lambda ids: embed(ids, table), context, g0, table=table, **kwargs)
            finally:
                fast.next_state = original
            assert torch.equal(fused.beams, loop.beams), (batch, width, length)
            assert torch.equal(fused.scores, loop.scores) and torch.equal(fused.path_scores, loop.path_scores)
            assert fused.beams.shape[1] == width * (max(length - 1, 1) if keep_pruned else 1)
            compared += 1
            # A probability floor: the loop stops at the first depth it leaves empty, the fused search
            # drops the nodes after; the same nodes stay (each path from g0 to a kept node).
            for min_prob in (1e-4, 0.05, 0.3, 0.999):
                loop = beam_search(fast, lambda ids: embed(ids, table), context, g0, min_prob=min_prob, **kwargs)
                fast.next_state = None
                try:
                    fused = beam_search(fast, lambda ids: embed(ids, table), context, g0, table=table,
                                        min_prob=min_prob, **kwargs)
                finally:
                    fast.next_state = original
                assert kept_paths(fused.beams) == kept_paths(loop.beams), (batch, width, length, min_prob)
                floored += len(kept_paths(loop.beams)[0]) < len(kept_paths(beam_search(
                    fast, lambda ids: embed(ids, table), context, g0, **kwargs).beams)[0])
    assert compared == 24 and floored > 0  # some floors dropped nodes

    # A floor that all 4 depth-2 beams of one row reach and only some of the other's: at depth 3 the
    # fused search extends different numbers of beams per row (the other row padded with a beam it does
    # not extend), and those beams' RNN states differ, so each extended beam must get its own state.
    def search(context, g0, **kwargs):
        return beam_search(fast, lambda ids: embed(ids, table), context, g0, **kwargs)

    uneven = 0
    for _ in range(60):
        context = torch.randn(2, hidden, generator=generator).to(dtype)
        g0 = torch.randint(0, target_vocab, (2,), generator=generator)
        second = search(context, g0, width=4, length=3).path_scores[:, :, 2]  # (2, 4) depth-2 scores, best first
        full, part = (0, 1) if second[0, 3] > second[1, 3] else (1, 0)
        low, high = float(second[part, 3]), float(min(second[full, 3], second[part, 0]))
        if not low < high:
            continue
        kwargs = dict(width=4, length=4, keep_pruned=True, min_prob=math.exp((low + high) / 2))
        loop = search(context, g0, **kwargs)
        original = fast.next_state
        fast.next_state = None
        try:
            fused = search(context, g0, table=table, **kwargs)
        finally:
            fast.next_state = original
        assert kept_paths(fused.beams) == kept_paths(loop.beams)
        uneven += any(len(p) == 4 for row in kept_paths(loop.beams) for p in row)  # some depth-3 node kept
    assert uneven >= 5
