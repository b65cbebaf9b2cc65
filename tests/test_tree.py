"""Golden, hand-computed tensors for dedup / pack / unpack / mask, plus a brute-force cross-check;
each for the tensor versions and for our C++ versions (csrc/tree.cpp), which must agree exactly."""

import itertools
import math

import pytest
import torch

from helpers import require_kernels
from redrafter.config import MAX_TREE_TOKENS, SamplingParams
import redrafter.drafter.lookup as lookup
from redrafter.drafter.lookup import join, join_beams, joined_tree
from redrafter.tree import NO_TOKEN, cap_tree, cap_tree_scored, drop_below, node_scores, owners, pack, pack_tensors, prefix_match, unpack
from redrafter.verify import tree_accept, uniforms_needed, walk


# Row 0: the module docstring's example. Row 1: beam 1 duplicates beam 0; beam 2 branches at depth 1.
BEAMS = torch.tensor([
    [[5, 1, 2], [5, 1, 3], [5, 4, 2]],
    [[7, 7, 7], [7, 7, 7], [7, 8, 9]],
])


def test_prefix_match_and_owners_golden():
    match = prefix_match(BEAMS)
    # Row 0, beams 0 and 1 share depth 0..1 but not 2; beams 0 and 2 share only depth 0.
    assert match[0, 0, 1].tolist() == [True, True, False]
    assert match[0, 0, 2].tolist() == [True, False, False]
    assert match[0, 2, 0].tolist() == [True, False, False]  # symmetric
    assert match[1, 0, 1].tolist() == [True, True, True]
    assert owners(BEAMS).tolist() == [
        [[0, 0, 0], [0, 0, 1], [0, 2, 2]],
        [[0, 0, 0], [0, 0, 0], [0, 2, 2]],
    ]


def test_pack_golden(implementation):
    tree = pack(BEAMS)
    assert tree.lengths.tolist() == [6, 5]
    assert tree.tokens.tolist() == [[5, 1, 2, 3, 4, 2], [7, 7, 7, 8, 9, 0]]
    assert tree.depths.tolist() == [[0, 1, 2, 2, 1, 2], [0, 1, 2, 1, 2, 0]]
    assert tree.unpacker.tolist() == [
        [[0, 1, 2], [0, 1, 3], [0, 4, 5]],
        [[0, 1, 2], [0, 1, 2], [0, 3, 4]],
    ]
    expected_mask = torch.tensor([
        [[1, 0, 0, 0, 0, 0],
         [1, 1, 0, 0, 0, 0],
         [1, 1, 1, 0, 0, 0],
         [1, 1, 0, 1, 0, 0],
         [1, 0, 0, 0, 1, 0],
         [1, 0, 0, 0, 1, 1]],
        [[1, 0, 0, 0, 0, 0],
         [1, 1, 0, 0, 0, 0],
         [1, 1, 1, 0, 0, 0],
         [1, 0, 0, 1, 0, 0],
         [1, 0, 0, 1, 1, 0],
         [0, 0, 0, 0, 0, 1]],  # padding attends only itself
    ], dtype=torch.bool)
    assert torch.equal(tree.mask, expected_mask)


def test_unpack_golden(implementation):
    tree = pack(BEAMS)
    assert torch.equal(unpack(tree.tokens, tree.unpacker), BEAMS)
    values = torch.arange(12, dtype=torch.float32).view(2, 6, 1).expand(2, 6, 2)  # (batch, n, 2)
    out = unpack(values, tree.unpacker)
    assert out.shape == (2, 3, 3, 2)
    assert out[0, 2, :, 0].tolist() == [0.0, 4.0, 5.0]
    assert out[1, 1, :, 1].tolist() == [6.0, 7.0, 8.0]


def test_single_beam_and_identical_beams(implementation):
    one = pack(torch.tensor([[[4, 2, 9, 9]]]))
    assert one.tokens.tolist() == [[4, 2, 9, 9]]
    assert torch.equal(one.mask[0], torch.ones(4, 4, dtype=torch.bool).tril())
    same = pack(torch.tensor([[[1, 2], [1, 2], [1, 2]]]))
    assert same.tokens.tolist() == [[1, 2]]
    assert same.unpacker.tolist() == [[[0, 1], [0, 1], [0, 1]]]


def test_pack_matches_brute_force_on_random_beams(implementation):
    """Independent Python construction of the deduplicated tree for many random beam sets."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        width, length = int(torch.randint(1, 6, (1,), generator=generator)), int(torch.randint(2, 6, (1,), generator=generator))
        beams = torch.randint(0, 3, (2, width, length), generator=generator)
        beams[:, :, 0] = beams[:, :1, 0]  # g0 is shared
        tree = pack(beams)
        for b in range(2):
            nodes = []  # distinct prefixes in beam-major order
            for i, k in itertools.product(range(width), range(length)):
                prefix = tuple(beams[b, i, : k + 1].tolist())
                if prefix not in nodes:
                    nodes.append(prefix)
            n = len(nodes)
            assert int(tree.lengths[b]) == n
            assert tree.tokens[b, :n].tolist() == [p[-1] for p in nodes]
            assert tree.depths[b, :n].tolist() == [len(p) - 1 for p in nodes]
            for q, k in itertools.product(range(n), range(n)):
                ancestor = nodes[q][: len(nodes[k])] == nodes[k]
                assert bool(tree.mask[b, q, k]) == ancestor
            for i, k in itertools.product(range(width), range(length)):
                assert nodes[int(tree.unpacker[b, i, k])] == tuple(beams[b, i, : k + 1].tolist())


def random_scored_beams(generator, batch, width, length, vocab=3):
    """Random beams plus consistent path scores: every distinct prefix gets its own log q < 0."""
    beams = torch.randint(0, vocab, (batch, width, length), generator=generator)
    beams[:, :, 0] = beams[:, :1, 0]
    step = {}
    scores = torch.zeros(batch, width, length)
    for b, i in itertools.product(range(batch), range(width)):
        for k in range(1, length):
            prefix = (b,) + tuple(beams[b, i, : k + 1].tolist())
            if prefix not in step:
                # Few distinct steps, zero included: ties between a node and its child (q = 1) and between
                # unrelated nodes are common, so the shallower-first order is exercised.
                step[prefix] = -float(torch.randint(0, 3, (), generator=generator))
            scores[b, i, k] = scores[b, i, k - 1] + step[prefix]
    return beams, scores


def test_cap_tree_keeps_the_most_probable_nodes_and_their_ancestors(implementation):
    """Brute force: the kept nodes are the K best distinct prefixes by (score, then shallower first),
    and packing the capped beams gives exactly the tree of those prefixes."""
    generator = torch.Generator().manual_seed(1)
    capped_somewhere = 0
    for _ in range(60):
        width, length = int(torch.randint(1, 6, (1,), generator=generator)), int(torch.randint(2, 6, (1,), generator=generator))
        beams, scores = random_scored_beams(generator, 2, width, length)
        cap = int(torch.randint(1, 9, (1,), generator=generator))
        capped = cap_tree_scored(beams, scores, cap)
        assert torch.equal(capped, cap_tree(beams, scores, cap))  # node_scores changes nothing here
        tree = pack(capped)
        for b in range(2):
            nodes = {}  # distinct prefix -> (score, depth)
            for i, k in itertools.product(range(width), range(length)):
                nodes.setdefault(tuple(beams[b, i, : k + 1].tolist()), (float(scores[b, i, k]), k))
            ranked = sorted(nodes, key=lambda p: (-nodes[p][0], nodes[p][1]))
            kept = set(ranked[:cap])  # full ties (score and depth) keep the beam-major first, as cap_tree does
            capped_somewhere += len(kept) < len(nodes)
            assert all(p[:d] in kept for p in kept for d in range(1, len(p)))  # ancestors stay
            for i in range(width):
                row = capped[b, i].tolist()
                ends = [k for k in range(length) if tuple(beams[b, i, : k + 1].tolist()) not in kept]
                end = ends[0] if ends else length
                assert row[:end] == beams[b, i, :end].tolist()  # a beam keeps a prefix...
                assert row[end:] == [NO_TOKEN] * (length - end)  # ...and loses the rest
            assert int(tree.lengths[b]) == len(kept)
            packed = [tuple(capped[b, i, : k + 1].tolist()) for i, k in itertools.product(range(width), range(length))
                      if capped[b, i, k] != NO_TOKEN]
            order = list(dict.fromkeys(packed))  # beam-major first occurrence, as pack orders nodes
            assert tree.tokens[b, : len(kept)].tolist() == [p[-1] for p in order]
            assert tree.depths[b, : len(kept)].tolist() == [len(p) - 1 for p in order]
            for q, k in itertools.product(range(len(order)), range(len(order))):
                assert bool(tree.mask[b, q, k]) == (order[q][: len(order[k])] == order[k])
            for i, k in itertools.product(range(width), range(length)):
                if capped[b, i, k] != NO_TOKEN:
                    assert order[int(tree.unpacker[b, i, k])] == tuple(capped[b, i, : k + 1].tolist())
    assert capped_somewhere > 20  # the cap was binding in many cases


def inconsistent_scored_beams(generator, batch, width, length, vocab=3):
    """Beams of two proposers side by side (the drafter's and a context-lookup beam): the scores of a
    shared node may disagree and may rise with depth, and some beams end early (NO_TOKEN)."""
    beams, scores = random_scored_beams(generator, batch, width, length, vocab)
    scores = scores + torch.randn(batch, width, length, generator=generator).round()  # ties stay common
    scores[:, :, 0] = 0.0
    ends = torch.randint(1, length + 1, (batch, width, 1), generator=generator)
    past = torch.arange(length).view(1, 1, length) >= ends
    beams[past] = NO_TOKEN
    scores[past] = float("-inf")
    return beams, scores


def test_cpp_tree_bookkeeping_equals_the_tensor_versions(monkeypatch):
    """Our C++ cap, pack and greedy walk against the tensor versions on random trees: the same
    tensors, value for value (including the unpacker at NO_TOKEN positions)."""
    module = require_kernels("tree")
    generator = torch.Generator().manual_seed(2)
    capped_somewhere = accepted_somewhere = 0
    for trial in range(200):
        batch = int(torch.randint(1, 4, (1,), generator=generator))
        width, length = int(torch.randint(1, 10, (1,), generator=generator)), int(torch.randint(1, 10, (1,), generator=generator))
        beams, scores = inconsistent_scored_beams(generator, batch, width, length)
        cap = int(torch.randint(1, 12, (1,), generator=generator))
        expected = cap_tree(beams, node_scores(beams, scores), cap)
        capped = module.cap_tree_scored(beams, scores, cap)
        assert torch.equal(capped, expected), trial
        capped_somewhere += bool((capped != beams).any())
        reference, tree = pack_tensors(capped), module.pack_tree(capped)
        for name, value in zip(["tokens", "depths", "mask", "unpacker", "lengths"], tree):
            assert torch.equal(value, getattr(reference, name)), (trial, name)
        # The greedy walk: logits whose argmax often follows a beam, so runs of several tokens are
        # accepted; rounded, so the argmax often has ties (the first index wins); vocabularies of 3 to 60
        # (vector loop and tail); a NaN now and then (it counts as the largest, as in torch.argmax).
        n, vocab = reference.tokens.shape[1], int(torch.randint(3, 60, (1,), generator=generator))
        logits = torch.randn(batch, n, vocab, generator=generator).round()
        logits[..., 3:] -= 1.0
        if trial % 10 == 0:
            logits.view(-1)[int(torch.randint(0, logits.numel(), (1,), generator=generator))] = float("nan")
        monkeypatch.setenv("REDRAFTER_TREE_KERNEL", "torch")
        walked = tree_accept(capped, reference.unpacker, logits, SamplingParams())
        monkeypatch.delenv("REDRAFTER_TREE_KERNEL")
        fast = tree_accept(capped, reference.unpacker, logits, SamplingParams())
        for name in ("beam", "accepted", "tokens", "bonus"):
            assert torch.equal(getattr(fast, name), getattr(walked, name)), (trial, name)
        accepted_somewhere += int(walked.accepted.max())
    assert capped_somewhere > 50 and accepted_somewhere > 100


def test_cpp_joined_tree_equals_the_tensor_version(monkeypatch):
    """``lookup.joined_tree`` in one C++ call against its tensor definition (``join_beams``, ``join``,
    ``drop_below``, ``cap_tree``) on random pairs of proposers' beams of different widths and lengths,
    with and without a floor, a cap, and sure nodes let past the cap (``extend_prob``, up to a most):
    the same tensor, value for value."""
    module = require_kernels("tree")
    generator = torch.Generator().manual_seed(5)
    dropped = capped = extended = most_bound = 0
    for trial in range(400):
        batch = int(torch.randint(1, 4, (1,), generator=generator))
        parts = []
        for _ in range(2):
            width, length = int(torch.randint(1, 8, (1,), generator=generator)), int(torch.randint(1, 7, (1,), generator=generator))
            beams, scores = inconsistent_scored_beams(generator, batch, width, length)
            parts.append((beams, scores - torch.rand(batch, width, length, generator=generator)))  # scores in (-inf, 0]
        (beams, scores), (extra, extra_scores) = parts
        min_prob = [0.0, 0.05, 0.3, 0.7][trial % 4]
        extend_prob = [0.0, 0.1, 0.4, 0.8][trial // 4 % 4]
        cap = int(torch.randint(0, 12, (1,), generator=generator))
        most = int(torch.randint(1, 20, (1,), generator=generator))
        sure = math.log(extend_prob) if extend_prob > 0 else math.inf
        joined, joined_scores = join_beams(beams, extra), join(scores, extra_scores, float("-inf"))
        expected = drop_below(joined, joined_scores, min_prob) if min_prob > 0 else joined
        dropped += not torch.equal(expected, joined)
        expected_most = expected
        if cap:
            floored, scored = expected, node_scores(expected, joined_scores)
            expected = cap_tree(floored, scored, cap, sure_log_prob=sure, most_tokens=MAX_TREE_TOKENS)
            expected_most = cap_tree(floored, scored, cap, sure_log_prob=sure, most_tokens=most)
            plain = cap_tree(floored, scored, cap)
            capped += not torch.equal(plain, floored)
            extended += not torch.equal(expected, plain)
            most_bound += not torch.equal(expected_most, expected)
        floor = math.log(min_prob) if min_prob > 0 else float("-inf")
        assert torch.equal(module.cap_tree_joined(beams, scores, extra, extra_scores, floor, cap, sure, most),
                           expected_most), trial
        assert torch.equal(joined_tree(beams, scores, extra, extra_scores, min_prob=min_prob, max_tokens=cap,
                                       extend_prob=extend_prob), expected)
        # joined_tree's own tensor path (other devices, or no kernels built)
        monkeypatch.setattr(lookup, "tree_kernel", lambda *args: None)
        assert torch.equal(joined_tree(beams, scores, extra, extra_scores, min_prob=min_prob, max_tokens=cap,
                                       extend_prob=extend_prob), expected)
        monkeypatch.undo()
    assert dropped > 50 and capped > 50 and extended > 20 and most_bound > 5


def test_a_nan_score_ranks_last_in_both_versions(monkeypatch):
    """A NaN path score (a drafter gone wrong) counts as -inf in node_scores, as in the C++ cap: node 2
    (NaN) is dropped, not ranked first, and the kept nodes stay a tree in both versions."""
    module = require_kernels("tree")
    beams, scores = torch.tensor([[[5, 1, 2], [5, 3, 4]]]), torch.tensor([[[0.0, -0.1, math.nan], [0.0, -0.2, -0.3]]])
    extra, extra_scores = torch.tensor([[[5, 7]]]), torch.tensor([[[0.0, -2.0]]])
    n = NO_TOKEN
    expected = [[[5, 1, n], [5, 3, n], [5, n, n]]]
    assert module.cap_tree_joined(beams, scores, extra, extra_scores, -math.inf, 3, math.inf, 0).tolist() == expected
    monkeypatch.setattr(lookup, "tree_kernel", lambda *args: None)
    assert joined_tree(beams, scores, extra, extra_scores, max_tokens=3).tolist() == expected


def test_sure_nodes_pass_the_cap_in_score_order_up_to_the_most():
    """cap_tree by hand: beams [0 1 2 3] (scores 0, -0.1, -0.2, -0.3) and [0 4 5] (-0.05, -2): K = 2
    keeps g0 and node 4; with sure nodes at log 0.75 ~ -0.29 the chain 1, 2 joins (3 at -0.3 is
    below); with at most 3 tokens in all only 1 of them."""
    beams = torch.tensor([[[0, 1, 2, 3], [0, 4, 5, NO_TOKEN]]])
    scores = torch.tensor([[[0.0, -0.1, -0.2, -0.3], [0.0, -0.05, -2.0, -math.inf]]])
    n = NO_TOKEN
    assert cap_tree(beams, scores, 2).tolist() == [[[0, n, n, n], [0, 4, n, n]]]
    sure = math.log(0.75)
    assert cap_tree(beams, scores, 2, sure_log_prob=sure, most_tokens=64).tolist() == [[[0, 1, 2, n], [0, 4, n, n]]]
    assert cap_tree(beams, scores, 2, sure_log_prob=sure, most_tokens=3).tolist() == [[[0, 1, n, n], [0, 4, n, n]]]
    # the cap itself stays a floor on what is kept: K = 5 with the same sure nodes keeps 5
    assert cap_tree(beams, scores, 5, sure_log_prob=sure, most_tokens=3).tolist() == [[[0, 1, 2, 3], [0, 4, n, n]]]


def test_cpp_sampled_walk_equals_the_tensor_version():
    """Our C++ sampling walk (``sampled_accept``) against ``verify.walk`` given the same p, q and
    random numbers, on random capped trees: drafts drawn from q (here: any q) and point masses, p
    with zeros (top-k), vocabularies of 2 to 40. The same beam, count and bonus, value for value."""
    module = require_kernels("tree")
    generator = torch.Generator().manual_seed(4)
    accepted_somewhere = rejected_somewhere = 0
    for trial in range(300):
        batch = int(torch.randint(1, 4, (1,), generator=generator))
        width, length = int(torch.randint(1, 7, (1,), generator=generator)), int(torch.randint(1, 6, (1,), generator=generator))
        vocab = int(torch.randint(2, 40, (1,), generator=generator))
        beams, scores = inconsistent_scored_beams(generator, batch, width, length, vocab=min(vocab, 3))
        capped = cap_tree(beams, node_scores(beams, scores), int(torch.randint(1, 10, (1,), generator=generator)))
        tree = pack_tensors(capped)
        n = tree.tokens.shape[1]
        logits = 2 * torch.randn(batch, n, vocab, generator=generator)
        logits[..., :3] += 1.5  # the beams' tokens (0..2) are likely, so runs get accepted
        logits[torch.rand(batch, n, vocab, generator=generator) < 0.2] = float("-inf")
        logits[..., 0] = logits[..., 0].nan_to_num(neginf=0.0)  # every node keeps some mass
        probs = logits.softmax(-1)
        draft = None if trial % 2 else torch.rand(batch, width, max(length - 1, 0), vocab, generator=generator).softmax(-1)
        draws = torch.rand(batch, uniforms_needed(width, length), generator=generator, dtype=torch.float64)
        empty = torch.empty(0)
        fast = module.sampled_accept(capped, tree.unpacker, probs, empty if draft is None else draft, empty.long(), draws)
        reference = walk(capped, tree.unpacker, None, probs, draft, draws)
        for name, a, b in zip(["beam", "accepted", "bonus"], fast, reference):
            assert torch.equal(a, b), (trial, name)
        accepted_somewhere += int(reference[1].sum())
        rejected_somewhere += int((reference[1] < (capped != NO_TOKEN).sum(-1).amax(-1) - 1).sum())
    assert accepted_somewhere > 100 and rejected_somewhere > 100


def test_sampled_walks_keep_the_residual_when_rounding_empties_it():
    """After a rejection whose update max(r - q, 0) sums to 0 in float32 (r and q equal up to
    rounding), both walks keep r as it was: the bonus is a token of p, never one of weight 0."""
    module = require_kernels("tree")
    probs = torch.tensor([[[0.0, 0.49999997, 0.5], [0.0, 0.5, 0.5]]])
    draft = torch.tensor([[[[0.0, 0.5, 0.5]]]])
    beams, unpacker = torch.tensor([[[5, 1]]]), torch.tensor([[[0, 1]]])
    draws = torch.tensor([[0.99999999, 0.7]], dtype=torch.float64)
    fast = module.sampled_accept(beams, unpacker, probs, draft, torch.empty(0, dtype=torch.long), draws)
    reference = walk(beams, unpacker, None, probs, draft, draws)
    assert [int(t) for t in fast] == [int(t) for t in reference] == [0, 0, 2]


def test_compact_draft_probs_walk_as_their_dense_tensor():
    """``DraftProbs`` (q over a reduced draft vocabulary for the first W_q beams and L_q depths, point
    masses elsewhere) in the C++ walk against the dense tensor it stands for in ``verify.walk``: the
    same beam, count and bonus on random trees, with the lookup-like point-mass beams after the
    drawn ones and tokens outside the draft vocabulary among the candidates; and so for both walks
    with ``distinct`` (each node a candidate once), which changes the outcome of some trees."""
    from redrafter.verify import DraftProbs

    module = require_kernels("tree")
    generator = torch.Generator().manual_seed(5)
    accepted_somewhere = rejected_somewhere = differ = 0
    for trial in range(300):
        batch, vocab = int(torch.randint(1, 4, (1,), generator=generator)), int(torch.randint(4, 40, (1,), generator=generator))
        width, length = int(torch.randint(1, 6, (1,), generator=generator)), int(torch.randint(2, 6, (1,), generator=generator))
        q_width, q_length = int(torch.randint(1, width + 1, (1,), generator=generator)), int(torch.randint(1, length, (1,), generator=generator))
        q_vocab = int(torch.randint(2, vocab + 1, (1,), generator=generator))
        vocab_map = None if trial % 3 == 0 else torch.randperm(vocab, generator=generator)[:q_vocab]
        q = torch.rand(batch, q_width, q_length, vocab if vocab_map is None else q_vocab, generator=generator).softmax(-1)
        beams = torch.randint(0, min(vocab, 4), (batch, width, length), generator=generator)
        beams[:, :, 0] = beams[:, :1, 0]
        tree = pack_tensors(beams)
        n = tree.tokens.shape[1]
        logits = 2 * torch.randn(batch, n, vocab, generator=generator)
        logits[..., :4] += 1.5
        probs = logits.softmax(-1)
        draws = torch.rand(batch, uniforms_needed(width, length), generator=generator, dtype=torch.float64)
        compact = DraftProbs(q, vocab_map)
        empty_map = torch.empty(0, dtype=torch.long)
        outcomes = []
        for distinct in (False, True):  # with distinct, a node shared by several beams is tested once
            fast = module.sampled_accept(beams, tree.unpacker, probs, q, empty_map if vocab_map is None else vocab_map,
                                         draws, distinct)
            reference = walk(beams, tree.unpacker, None, probs, compact.dense(beams, vocab), draws, distinct=distinct)
            for name, a, b in zip(["beam", "accepted", "bonus"], fast, reference):
                assert torch.equal(a, b), (trial, distinct, name)
            outcomes.append(torch.stack(reference))
        differ += int(not torch.equal(*outcomes))
        accepted_somewhere += int(reference[1].sum())
        rejected_somewhere += int((reference[1] < length - 1).sum())
    assert accepted_somewhere > 100 and rejected_somewhere > 100 and differ > 30


def test_cpp_tree_bookkeeping_rejects_bad_input():
    module = require_kernels("tree")
    with pytest.raises(RuntimeError, match="int64"):
        module.pack_tree(torch.zeros(1, 2, 3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="max_tokens"):
        module.cap_tree_scored(torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 2, 3), 0)
    with pytest.raises(RuntimeError, match="shaped like beams"):
        module.greedy_accept(torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long),
                             torch.zeros(1, 4, 5))
    with pytest.raises(RuntimeError, match="float64"):
        module.sampled_accept(torch.zeros(1, 1, 2, dtype=torch.long), torch.tensor([[[0, 1]]]), torch.rand(1, 2, 5),
                              torch.empty(0), torch.empty(0, dtype=torch.long), torch.rand(1, 2))
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        module.sampled_accept(torch.tensor([[[0, 7]]]), torch.tensor([[[0, 1]]]), torch.rand(1, 2, 5),
                              torch.empty(0), torch.empty(0, dtype=torch.long), torch.rand(1, 2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="distinct token ids"):
        module.sampled_accept(torch.tensor([[[0, 1]]]), torch.tensor([[[0, 1]]]), torch.rand(1, 2, 5),
                              torch.rand(1, 1, 1, 2), torch.tensor([3, 3]), torch.rand(1, 2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="outside the 1 packed nodes"):
        module.greedy_accept(torch.zeros(1, 1, 2, dtype=torch.long), torch.tensor([[[0, 3]]]), torch.zeros(1, 1, 5))
