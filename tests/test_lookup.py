"""Context lookup (drafter/lookup.py): the n-gram search on hand-worked histories and against a
brute-force search, the beams it adds, and the point masses that make it exact when sampling."""

import random

import pytest
import torch

from redrafter import BeamConfig, LookupProposer, RedrafterError
from redrafter.drafter.lookup import context_lookup, join_beams, lookup_beams, point_masses
from redrafter.tree import NO_TOKEN


def brute_force_lookup(history, num_tokens, max_ngram):
    """The definition, written out: longest n first, the latest earlier occurrence wins."""
    for n in range(max_ngram, 0, -1):
        if len(history) < n + 1:
            continue
        tail = history[-n:]
        for start in range(len(history) - n - 1, -1, -1):
            if history[start: start + n] == tail:
                return history[start + n: start + n + num_tokens]
    return []


def test_worked_example_of_the_module_docstring():
    assert context_lookup([7, 3, 9, 4, 1, 3, 9], num_tokens=3, max_ngram=3) == [4, 1, 3]


@pytest.mark.parametrize("history,num_tokens,max_ngram,expected", [
    ([1, 2, 3, 1, 2], 2, 3, [3, 1]),            # 2-gram "1 2" at 0
    ([1, 2, 3, 9, 2, 4, 1, 2], 2, 3, [3, 9]),    # "1 2" beats the later 1-gram "2"
    ([5, 1, 8, 1, 7, 1], 1, 3, [7]),             # several occurrences of "1": the latest
    ([5, 1, 8, 1, 7, 1], 4, 1, [7, 1]),          # fewer tokens left than asked for
    ([4, 5, 6], 3, 3, []),                       # nothing repeats
    ([4], 3, 3, []),                             # g0 alone
    ([2, 2, 2, 2], 3, 2, [2]),                   # overlapping windows; only the token before g0 follows
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


def test_lookup_beams_join_the_drafters_beams_with_no_token_padding():
    g0 = torch.tensor([9, 4])
    looked = lookup_beams(g0, [[1, 9, 2, 3, 9], [4, 5, 6, 4]], num_tokens=3, max_ngram=2)
    assert looked.tolist() == [[[9, 2, 3, 9]], [[4, 5, 6, 4]]]
    none = lookup_beams(torch.tensor([7]), [[1, 2, 7]], num_tokens=2, max_ngram=2)
    assert none.tolist() == [[[7, NO_TOKEN, NO_TOKEN]]]
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
