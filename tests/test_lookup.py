"""Context lookup (drafter/lookup.py): the n-gram search on hand-worked histories and against a
brute-force search, the beams it adds, and the point masses that make it exact when sampling."""

import math
import random

import pytest
import torch

from redrafter import BeamConfig, LookupProposer, RedrafterError
from redrafter.drafter.lookup import (MATCH_CAP, History, context_lookup, copy_accuracy, join_beams,
                                     lookup_beams, matched_lookup, point_masses)
from redrafter.tree import NO_TOKEN, cap_tree, node_scores


def brute_force_lookup(history, num_tokens, max_ngram):
    """The definition, written out: longest n first, the latest earlier occurrence wins, and the copy
    runs on into itself past the history's end (an LZ77 copy)."""
    for n in range(max_ngram, 0, -1):
        if len(history) < n + 1:
            continue
        tail = history[-n:]
        for start in range(len(history) - n - 1, -1, -1):
            if history[start: start + n] == tail:
                extended = list(history)
                for k in range(num_tokens):
                    extended.append(extended[start + n + k])
                return extended[len(history):]
    return []


def brute_force_match_length(history, max_ngram):
    """How long the match behind ``brute_force_lookup`` is: equal tokens counted backwards from the
    ends of the found window and of the history (at most MATCH_CAP beyond the n-gram)."""
    for n in range(max_ngram, 0, -1):
        if len(history) < n + 1:
            continue
        for start in range(len(history) - n - 1, -1, -1):
            if history[start: start + n] == history[-n:]:
                m = n
                while m < MATCH_CAP and start + n - m - 1 >= 0 and \
                        history[start + n - m - 1] == history[len(history) - m - 1]:
                    m += 1
                return m
    return 0


def test_worked_example_of_the_module_docstring():
    assert context_lookup([7, 3, 9, 4, 1, 3, 9], num_tokens=3, max_ngram=3) == [4, 1, 3]


@pytest.mark.parametrize("history,num_tokens,max_ngram,expected", [
    ([1, 2, 3, 1, 2], 2, 3, [3, 1]),            # 2-gram "1 2" at 0
    ([1, 2, 3, 9, 2, 4, 1, 2], 2, 3, [3, 9]),    # "1 2" beats the later 1-gram "2"
    ([5, 1, 8, 1, 7, 1], 1, 3, [7]),             # several occurrences of "1": the latest
    ([5, 1, 8, 1, 7, 1], 4, 1, [7, 1, 7, 1]),    # past the end the copy repeats itself: the loop "7 1"
    ([4, 5, 6], 3, 3, []),                       # nothing repeats
    ([4], 3, 3, []),                             # g0 alone
    ([2, 2, 2, 2], 3, 2, [2, 2, 2]),             # overlapping windows: a loop of one token
])
def test_lookup_by_hand(history, num_tokens, max_ngram, expected):
    assert context_lookup(history, num_tokens=num_tokens, max_ngram=max_ngram) == expected


def test_lookup_equals_brute_force_on_random_histories():
    rng = random.Random(0)
    for _ in range(500):
        history = [rng.randrange(4) for _ in range(rng.randrange(1, 40))]
        num_tokens, max_ngram = rng.randrange(1, 6), rng.randrange(1, 5)
        assert context_lookup(history, num_tokens=num_tokens, max_ngram=max_ngram) == \
            brute_force_lookup(history, num_tokens, max_ngram), history
        assert matched_lookup(history, num_tokens=num_tokens, max_ngram=max_ngram)[0] == \
            brute_force_match_length(history, max_ngram), history


def test_match_length_counts_back_past_the_ngram_up_to_the_cap():
    # "1 2 3" matched as a 2-gram "2 3"; the tokens before agree for 1 more ("1"), then 9 != 8
    assert matched_lookup([9, 1, 2, 3, 4, 8, 1, 2, 3], num_tokens=1, max_ngram=2) == (3, [4])
    loop = [5, 6, 7] * 40  # a loop of period 3: the match runs back to the start, capped
    assert matched_lookup(loop, num_tokens=4, max_ngram=4) == (MATCH_CAP, [5, 6, 7, 5])
    assert History(loop).lookup(num_tokens=4, max_ngram=4) == (MATCH_CAP, [5, 6, 7, 5])


def test_history_index_equals_the_scan_as_the_history_grows():
    """``History`` answers from its n-gram index, updated as tokens are appended a few at a time
    (as the engine does), with max_ngram changing between calls; every answer equals the scan's."""
    rng = random.Random(1)
    for _ in range(100):
        vocab = rng.randrange(2, 6)
        history = History([rng.randrange(vocab) for _ in range(rng.randrange(1, 10))])
        for _ in range(rng.randrange(1, 30)):
            num_tokens, max_ngram = rng.randrange(1, 9), rng.randrange(1, 5)
            assert history.lookup(num_tokens=num_tokens, max_ngram=max_ngram) == \
                matched_lookup(list(history), num_tokens=num_tokens, max_ngram=max_ngram), list(history)
            assert context_lookup(history, num_tokens=num_tokens, max_ngram=max_ngram) == \
                brute_force_lookup(list(history), num_tokens, max_ngram)
            history.extend(rng.randrange(vocab) for _ in range(rng.randrange(1, 5)))
    shrunk = History([1, 2, 3, 1, 2])
    assert shrunk.lookup(num_tokens=1, max_ngram=2) == (2, [3])
    del shrunk[2:]  # not an append: the index starts again
    shrunk.extend([5, 2])
    assert shrunk.lookup(num_tokens=1, max_ngram=2) == (1, [5])
    # Changes that leave the length where it was are noticed too.
    edits = [lambda h: (h.__delitem__(slice(1, None)), h.extend([9, 9, 9, 1])), lambda h: h.__setitem__(3, 7),
             lambda h: (h.pop(0), h.append(1)), lambda h: (h.insert(0, 9), h.remove(2)), lambda h: h.reverse(),
             lambda h: h.sort(), lambda h: (h.clear(), h.extend([4, 1, 4, 1, 4]))]
    for edit in edits:
        history = History([1, 2, 3, 1, 2])
        history.lookup(num_tokens=2, max_ngram=2)
        edit(history)
        assert history.lookup(num_tokens=2, max_ngram=2) == matched_lookup(list(history), num_tokens=2, max_ngram=2)


def test_copy_accuracy_by_hand():
    """The calibration data behind LOOKUP_CONFIDENCE, counted by hand: in [1 2 3] + [1 2 3 1 2] every
    copy is right (the match grows by one per copied token), in [1 2 3] + [1 2 9] the third token
    breaks both copies, and [5] + [6 7] never matches."""
    got = copy_accuracy([([1, 2, 3], [1, 2, 3, 1, 2]), ([1, 2, 3], [1, 2, 9]), ([5], [6, 7])])
    assert got == {1: (2, 2), 2: (4, 2), 3: (3, 3), 4: (4, 4)}


def test_lookup_beams_join_the_drafters_beams_with_no_token_padding():
    g0 = torch.tensor([9, 4])
    looked, scores = lookup_beams(g0, [[1, 9, 2, 3, 9], [4, 5, 6, 4]], num_tokens=3, max_ngram=2,
                                  confidence=(0.5, 0.8))
    assert looked.tolist() == [[[9, 2, 3, 9]], [[4, 5, 6, 4]]]
    # both rows matched a 1-gram ("9", "4"); the j-th copied token scores c_1 ... c_j, c_2 on for longer
    torch.testing.assert_close(scores, torch.tensor([0.0, math.log(0.5), math.log(0.5 * 0.8),
                                                     math.log(0.5 * 0.8 * 0.8)]).expand(2, 1, 4))
    none, none_scores = lookup_beams(torch.tensor([7]), [[1, 2, 7]], num_tokens=2, max_ngram=2)
    assert none.tolist() == [[[7, NO_TOKEN, NO_TOKEN]]]
    assert none_scores.tolist() == [[[0.0, -math.inf, -math.inf]]]
    _, long_match = lookup_beams(torch.tensor([3]), [[1, 2, 3, 8, 1, 2, 3]], num_tokens=1, max_ngram=4,
                                 confidence=(0.5, 0.8))
    assert long_match[0, 0, 1].item() == pytest.approx(math.log(0.8))  # 3-token match: the last confidence
    drafted = torch.tensor([[[9, 1, 1], [9, 2, 5]], [[4, 0, 0], [4, 6, 6]]])
    joined = join_beams(drafted, looked)
    assert joined.shape == (2, 3, 4)
    assert joined[:, :2, :3].tolist() == drafted.tolist() and (joined[:, :2, 3] == NO_TOKEN).all()
    assert joined[:, 2].tolist() == looked[:, 0].tolist()


def test_point_masses_are_one_hot_and_zero_past_the_end():
    beams = torch.tensor([[[3, 1, NO_TOKEN]]])
    probs = point_masses(beams, 5)
    assert probs.shape == (1, 1, 2, 5)
    assert probs[0, 0, 0].tolist() == [0, 1, 0, 0, 0] and probs[0, 0, 1].tolist() == [0] * 5


def test_flags_are_validated():
    with pytest.raises(RedrafterError, match="lookup tokens"):
        BeamConfig(lookup_tokens=-1)
    with pytest.raises(RedrafterError, match="n-gram"):
        BeamConfig(lookup_tokens=2, lookup_ngram=0)
    with pytest.raises(RedrafterError, match="at least 1 token"):
        LookupProposer(0)


def test_node_scores_agree_on_shared_nodes_and_never_rise():
    """Drafter beams [5 1 2], [5 4 6] (log q path scores) and a lookup beam [5 4 6 8] scored higher:
    the shared nodes 4 and 6 take the lookup's scores; node 1's child 2 cannot outrank node 1."""
    beams = torch.tensor([[[5, 1, 2, NO_TOKEN], [5, 4, 6, NO_TOKEN], [5, 4, 6, 8]]])
    scores = torch.tensor([[[0.0, -1.0, -0.5, 0.0], [0.0, -2.0, -3.0, 0.0], [0.0, -0.1, -0.2, -0.3]]])
    got = node_scores(beams, scores)
    inf = math.inf
    torch.testing.assert_close(got, torch.tensor([[[0.0, -1.0, -1.0, -inf], [0.0, -0.1, -0.2, -inf],
                                                  [0.0, -0.1, -0.2, -0.3]]]))
    # K = 4: g0, then 4, 6, 8 (lookup) beat 1 and 2 (drafter)
    assert cap_tree(beams, got, 4).tolist() == [[[5, NO_TOKEN, NO_TOKEN, NO_TOKEN], [5, 4, 6, NO_TOKEN], [5, 4, 6, 8]]]
    # K = 5: node 1 joins, and its child 2 (tied with it) does not come before it
    assert cap_tree(beams, got, 5)[0, 0].tolist() == [5, 1, NO_TOKEN, NO_TOKEN]


def test_capped_union_of_drafter_and_lookup(monkeypatch):
    """ReDrafterProposer under a cap: a 4-gram match's tokens take the slots; a 1-gram match's do not."""
    from redrafter import Drafter, DrafterConfig, ReDrafterProposer
    from helpers import tiny_target

    target = tiny_target("llama", "native")
    torch.manual_seed(0)
    drafter = Drafter(DrafterConfig(hidden_size=64, vocab_size=target.info.vocab_size)).eval()
    beam = BeamConfig(width=4, length=3, max_tree_tokens=4, lookup_tokens=3, lookup_confidence=(1e-6, 1e-6, 1e-6, 0.999))
    proposer = ReDrafterProposer(drafter, target, beam)
    context, g0 = torch.randn(2, 64), torch.tensor([3, 3])
    weak = [1, 2, 3, 11, 12, 13, 1, 2, 3]  # 3-gram match: confidence 1e-6, below every drafter node
    strong4 = [0, 1, 2, 3, 11, 12, 13, 0, 1, 2, 3]  # 4-gram match, confidence 0.999
    beams = proposer.propose(context, g0, torch.ones(2, dtype=torch.long), rows=torch.arange(2),
                             history=[weak, strong4])
    # min(W, K - 1) = 3 drafter beams, their depth-1 prefixes (keep_pruned), then the lookup beam
    assert beams.shape == (2, 3 * 2 + 1, 4)
    for b in range(2):
        nodes = {tuple(beams[b, w, : k + 1].tolist()) for w in range(7) for k in range(4) if beams[b, w, k] != NO_TOKEN}
        assert len(nodes) == 4  # the cap holds for the union
    assert beams[1, -1].tolist() == [3, 11, 12, 13]  # the confident lookup beam is kept whole
    assert beams[0, -1, 1:].tolist() == [NO_TOKEN] * 3  # the weak one loses every slot
