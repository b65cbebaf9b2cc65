"""Greedy equivalence on tiny random Llama and Qwen2 models against transformers' generate."""

import pytest
import torch

from helpers import TINY_VOCAB, ScriptedProposer, hf_greedy, tiny_target
from redrafter import (BeamConfig, Drafter, DrafterConfig, Engine, FinishEvent, GenerationConfig, LookupProposer,
                       ReDrafterProposer, RedrafterError)
from redrafter.config import MAX_TREE_TOKENS
from redrafter.engine import TokensEvent
from redrafter.tree import NO_TOKEN, pack

PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8, 9, 7], [2]]
MAX_NEW = 48


def run(engine, prompts, config):
    events = list(engine.generate(prompts, config))
    finished = {e.row: e for e in events if isinstance(e, FinishEvent)}
    streamed = {}
    for e in events:
        if isinstance(e, TokensEvent):
            streamed.setdefault(e.row, []).extend(e.token_ids)
    assert sorted(finished) == list(range(len(prompts)))
    for row, event in finished.items():
        assert list(event.token_ids) == streamed[row]  # the stream adds up to the result
    return [finished[i] for i in range(len(prompts))]


@pytest.fixture(scope="module", params=[(k, b) for k in ("llama", "qwen2") for b in ("hf", "native")],
                ids=lambda p: "-".join(p))
def case(request):
    target = tiny_target(*request.param)
    references = [hf_greedy(target.model, p, MAX_NEW) for p in PROMPTS]
    return target, references


def test_autoregressive_equals_generate(case):
    target, references = case
    for prompt, reference in zip(PROMPTS, references):
        (result,) = run(Engine(target), [prompt], GenerationConfig(max_new_tokens=MAX_NEW))
        assert list(result.token_ids) == reference
        assert result.stats.tokens_per_step == 1.0 and result.stats.tree_tokens_per_step == 1.0


@pytest.mark.parametrize("width,length", [(1, 2), (3, 5), (4, 7)])
@pytest.mark.parametrize("right", ["oracle", "partial", "wrong"])
def test_scripted_drafters_equal_generate(case, width, length, right):
    target, references = case
    drafted = length - 1
    count = {"oracle": drafted, "partial": drafted // 2, "wrong": 0}[right]
    for prompt, reference in zip(PROMPTS, references):
        proposer = ScriptedProposer([reference], width=width, length=length, right=count, vocab=TINY_VOCAB)
        (result,) = run(Engine(target, proposer), [prompt], GenerationConfig(max_new_tokens=MAX_NEW))
        assert list(result.token_ids) == reference
        tau = result.stats.tokens_per_step
        if right == "oracle":
            assert tau >= length - 0.5  # the tree path is exercised: ~L tokens per forward
        elif right == "wrong":
            assert tau == 1.0
        else:
            assert count + 1 - 0.5 <= tau <= count + 1 + 0.5


def test_random_drafter_equals_generate(case):
    target, references = case
    torch.manual_seed(1)
    drafter = Drafter(DrafterConfig(hidden_size=64, vocab_size=TINY_VOCAB)).eval()
    proposer = ReDrafterProposer(drafter, target, BeamConfig(width=4, length=4))
    results = run(Engine(target, proposer), PROMPTS, GenerationConfig(max_new_tokens=MAX_NEW))  # a ragged batch
    for result, reference in zip(results, references):
        assert list(result.token_ids) == reference


def test_adaptive_draft_equals_generate(case):
    """min_prob makes beam search verify only the nodes the drafter is sure enough of (checked: some
    steps verify g0 alone, others several tokens, at several depths in a ragged batch); the output is
    still plain greedy decoding."""
    target, references = case
    torch.manual_seed(1)
    drafter = Drafter(DrafterConfig(hidden_size=64, vocab_size=TINY_VOCAB)).eval()
    for p in drafter.parameters():
        torch.nn.init.normal_(p, std=0.1)  # q peaked enough that the path probability varies
    proposer = ReDrafterProposer(drafter, target, BeamConfig(width=2, length=5, min_prob=0.1))
    lengths, nodes, propose = [], [], proposer.propose

    def recording(*args, **kwargs):
        beams = propose(*args, **kwargs)
        # the deepest kept position (the fused search pads its beams to L with NO_TOKEN, the loop stops early)
        lengths.append(int((beams != NO_TOKEN).any(dim=0).any(dim=0).sum()))
        nodes.extend(int(n) for n in (beams != NO_TOKEN).sum(dim=(1, 2)))
        return beams

    proposer.propose = recording
    results = run(Engine(target, proposer), PROMPTS, GenerationConfig(max_new_tokens=MAX_NEW))
    for result, reference in zip(results, references):
        assert list(result.token_ids) == reference
    assert len(set(lengths)) >= 2 and max(lengths) <= 5
    assert min(nodes) == 2 and max(nodes) > 2  # W=2 copies of g0 alone, and real drafts


def test_capped_tree_equals_generate(case):
    """max_tree_tokens verifies only the drafter's most probable nodes, so beams end early (checked:
    the cap binds); the output is still plain greedy decoding."""
    target, references = case
    torch.manual_seed(1)
    drafter = Drafter(DrafterConfig(hidden_size=64, vocab_size=TINY_VOCAB)).eval()
    proposer = ReDrafterProposer(drafter, target, BeamConfig(width=4, length=5, max_tree_tokens=6))
    ended, propose = [], proposer.propose

    def recording(*args, **kwargs):
        beams = propose(*args, **kwargs)
        ended.append(bool((beams == NO_TOKEN).any()))
        return beams

    proposer.propose = recording
    results = run(Engine(target, proposer), PROMPTS, GenerationConfig(max_new_tokens=MAX_NEW))
    for result, reference in zip(results, references):
        assert list(result.token_ids) == reference
    assert all(ended)


def test_context_lookup_equals_generate(case):
    """Context lookup alone, and as one more beam beside a capped drafter tree (beams of different
    lengths): the output is plain greedy decoding, and the looked-up tokens are accepted at times."""
    target, references = case
    torch.manual_seed(2)
    drafter = Drafter(DrafterConfig(hidden_size=64, vocab_size=TINY_VOCAB)).eval()
    both = ReDrafterProposer(drafter, target, BeamConfig(width=2, length=3, max_tree_tokens=3, lookup_tokens=5))
    assert both.beam_length == 6
    for proposer in (LookupProposer(4), both):
        results = run(Engine(target, proposer), PROMPTS, GenerationConfig(max_new_tokens=MAX_NEW))
        for result, reference in zip(results, references):
            assert list(result.token_ids) == reference
        tokens = sum(r.stats.num_new_tokens - 1 for r in results)
        assert tokens > sum(r.stats.num_steps for r in results)  # some steps kept drafted tokens


def test_sure_lookup_stretch_past_the_cap_equals_generate(case):
    """``extend_prob``: looked-up tokens scored at least that sure are verified past the cap K (here a
    confidence of 0.95 per token after any match, so every match makes several sure; checked: trees
    larger than K, and steps accepting more drafted tokens than a tree of K holds, in a prompt these
    models answer with a run of repeats); the output is still plain greedy decoding."""
    target, references = case
    torch.manual_seed(2)
    drafter = Drafter(DrafterConfig(hidden_size=64, vocab_size=TINY_VOCAB)).eval()
    cap, repeats = 3, [0] * 16
    beam = BeamConfig(width=2, length=3, max_tree_tokens=cap, lookup_tokens=16, lookup_confidence=(0.95,),
                      extend_prob=0.5)
    proposer = ReDrafterProposer(drafter, target, beam)
    sizes, propose = [], proposer.propose

    def recording(*args, **kwargs):
        beams = propose(*args, **kwargs)
        sizes.extend(int(n) for n in pack(beams).lengths)
        return beams

    proposer.propose = recording
    config = GenerationConfig(max_new_tokens=MAX_NEW)
    results = run(Engine(target, proposer), PROMPTS + [repeats], config)
    for result, reference in zip(results, references + [hf_greedy(target.model, repeats, MAX_NEW)]):
        assert list(result.token_ids) == reference
    assert cap < max(sizes) <= MAX_TREE_TOKENS
    accepted = max(e.accepted for e in Engine(target, proposer).generate([repeats], config)
                   if isinstance(e, TokensEvent))
    assert accepted > cap - 1


def test_probability_floor_on_a_lookup_tree_equals_generate(case):
    """``min_prob`` with the context-lookup beam and a cap: of the joined tree, only nodes whose
    score (the drafter's path probability, or the lookup's confidences for looked-up tokens) reaches the floor stay,
    so each step's tree is a subset of the unfloored capped tree, smaller in some steps (checked) and
    still drafting in others; the output is plain greedy decoding, and the stats count the tokens
    each step verified."""
    target, references = case
    torch.manual_seed(1)
    drafter = Drafter(DrafterConfig(hidden_size=64, vocab_size=TINY_VOCAB)).eval()
    for p in drafter.parameters():
        torch.nn.init.normal_(p, std=0.1)  # q peaked enough that the path probability varies
    shape = dict(width=4, length=4, max_tree_tokens=6, lookup_tokens=5)
    floored = ReDrafterProposer(drafter, target, BeamConfig(min_prob=0.15, **shape))
    unfloored = ReDrafterProposer(drafter, target, BeamConfig(**shape))
    sizes, smaller, drafting, propose = [], 0, 0, floored.propose

    def nodes(beams):
        return [{tuple(t for t in beam if t != NO_TOKEN) for beam in row} for row in beams.tolist()]

    def recording(*args, **kwargs):
        nonlocal smaller, drafting
        beams = propose(*args, **kwargs)
        for kept, full in zip(nodes(beams), nodes(unfloored.propose(*args, **kwargs))):
            prefixes = lambda paths: {p[:i] for p in paths for i in range(1, len(p) + 1)}
            assert prefixes(kept) <= prefixes(full)
            smaller += len(prefixes(kept)) < len(prefixes(full))
            drafting += len(prefixes(kept)) > 1
        sizes.append(pack(beams).lengths.tolist())
        return beams

    floored.propose = recording
    results = run(Engine(target, floored), PROMPTS, GenerationConfig(max_new_tokens=MAX_NEW))
    for result, reference in zip(results, references):
        assert list(result.token_ids) == reference
    assert smaller > 0 and drafting > 0
    sizes.clear()
    (alone,) = run(Engine(target, floored), PROMPTS[1:2], GenerationConfig(max_new_tokens=MAX_NEW))
    assert len(sizes) == alone.stats.num_steps and alone.stats.num_tree_tokens == sum(s for (s,) in sizes)
    assert alone.stats.num_steps < alone.stats.num_tree_tokens <= 6 * alone.stats.num_steps


def test_speculation_gate_equals_generate(case):
    """``min_tokens_per_step``: rows whose speculative steps emit too few tokens take plain steps (g0
    alone), probing every PROBE_EVERY-th step, also while other rows of the batch speculate; the output
    is still plain greedy decoding. A floor no step can reach (5 tokens, where a step emits at most 4)
    leaves only the first step and the probes speculative; a floor of 1 never gates."""
    from redrafter.engine import PROBE_EVERY

    target, references = case
    torch.manual_seed(2)
    drafter = Drafter(DrafterConfig(hidden_size=64, vocab_size=TINY_VOCAB)).eval()
    for floor in (5.0, 2.0, 1.0):
        proposer = ReDrafterProposer(drafter, target, BeamConfig(width=2, length=4, lookup_tokens=3,
                                                                 min_tokens_per_step=floor))
        drafted, propose = [], proposer.propose

        def recording(*args, **kwargs):
            beams = propose(*args, **kwargs)
            drafted.append(int(beams.shape[0]))
            return beams

        proposer.propose = recording
        results = run(Engine(target, proposer), PROMPTS, GenerationConfig(max_new_tokens=MAX_NEW))
        for result, reference in zip(results, references):
            assert list(result.token_ids) == reference
        steps = max(r.stats.num_steps for r in results)  # the rows step in lockstep
        if floor == 1.0:
            assert len(drafted) == steps  # every step drafted
        elif floor == 5.0:
            assert steps > PROBE_EVERY and len(drafted) == 1 + (steps - 1) // PROBE_EVERY


def test_batch_rows_are_independent(case):
    """A ragged batch with a scripted drafter gives each row its single-prompt result."""
    target, references = case
    proposer = ScriptedProposer(references, width=3, length=4, right=2, vocab=TINY_VOCAB)
    results = run(Engine(target, proposer), PROMPTS, GenerationConfig(max_new_tokens=MAX_NEW))
    for result, reference in zip(results, references):
        assert list(result.token_ids) == reference


def test_stops_exactly_at_stop_token_and_budget(case):
    target, references = case
    reference = references[0]
    stop = reference[10]
    first = reference.index(stop)
    oracle = ScriptedProposer([reference], width=2, length=6, right=5, vocab=TINY_VOCAB)
    (result,) = run(Engine(target, oracle), [PROMPTS[0]], GenerationConfig(max_new_tokens=MAX_NEW, stop_token_ids=(stop,)))
    assert list(result.token_ids) == reference[: first + 1] and result.reason == "stop"
    for budget in [1, 2, 7, 13]:
        (result,) = run(Engine(target, oracle), [PROMPTS[0]], GenerationConfig(max_new_tokens=budget))
        assert list(result.token_ids) == reference[:budget] and result.reason == "length"


def test_returned_hidden_states_are_the_states_that_predicted_each_token(case):
    """With return_hidden, event hidden rows equal the target's full-sequence hidden states at the
    position before each emitted token (speculative steps included)."""
    target, references = case
    prompt, reference = PROMPTS[1], references[1]
    proposer = ScriptedProposer([reference], width=3, length=4, right=2, vocab=TINY_VOCAB)
    events = list(Engine(target, proposer).generate([prompt], GenerationConfig(max_new_tokens=20), return_hidden=True))
    tokens = [t for e in events if isinstance(e, TokensEvent) for t in e.token_ids]
    states = torch.cat([e.hidden for e in events if isinstance(e, TokensEvent)])
    assert tokens == reference[:20] and states.shape == (20, target.info.hidden_size)
    sequence = prompt + tokens
    cache = target.new_cache(1)
    n = len(sequence)
    out = target.forward(torch.tensor([sequence]), torch.arange(n).view(1, n),
                         torch.ones(n, n, dtype=torch.bool).tril().view(1, n, n), cache)
    torch.testing.assert_close(states, out.hidden[0, len(prompt) - 1: n - 1], atol=1e-4, rtol=0)


def test_finished_rows_leave_the_batch(case, monkeypatch):
    """Rows that stop early leave the batch (the cache shrinks); every row still gets its
    single-prompt result: tokens, steps (the scripted drafter is right exactly ``right`` times per step
    only when it is asked about the right prompt) and the hidden states datagen stores."""
    target, references = case
    stop = references[1][6]
    expected = [ref[: ref.index(stop) + 1] if stop in ref else ref for ref in references]
    assert len({len(e) for e in expected}) >= 2  # rows finish at different steps
    calls = []
    original = target.select_rows
    monkeypatch.setattr(target, "select_rows", lambda cache, rows: (calls.append(rows.tolist()), original(cache, rows)))
    config = GenerationConfig(max_new_tokens=MAX_NEW, stop_token_ids=(stop,))

    def generate(proposer, prompts):
        events = list(Engine(target, proposer).generate(prompts, config, return_hidden=True))
        finished = {e.row: e for e in events if isinstance(e, FinishEvent)}
        states = {row: torch.cat([e.hidden for e in events if isinstance(e, TokensEvent) and e.row == row])
                  for row in finished}
        return [(list(finished[r].token_ids), finished[r].stats.num_steps, states[r]) for r in range(len(prompts))]

    for make in (lambda refs: None,
                 lambda refs: ScriptedProposer(refs, width=3, length=4, right=2, vocab=TINY_VOCAB)):
        calls.clear()
        batched = generate(make(references), PROMPTS)
        assert calls and all(len(c) < len(PROMPTS) for c in calls)
        for (tokens, steps, states), prompt, reference, want in zip(batched, PROMPTS, references, expected):
            ((alone_tokens, alone_steps, alone_states),) = generate(make([reference]), [prompt])
            assert tokens == alone_tokens == want and steps == alone_steps
            torch.testing.assert_close(states, alone_states, atol=1e-5, rtol=0)


def test_misused_inputs_raise_a_clear_error():
    """Library misuse is named: text instead of token ids, ids outside the vocabulary, a bare stop id;
    and the engine still generates afterwards."""
    target = tiny_target("llama", seed=0)
    engine = Engine(target)
    config = GenerationConfig(max_new_tokens=4)
    for prompts, message in ((["hello"], "prompt 1 must be a sequence of token ids"),
                             ([[1, 2], [3, TINY_VOCAB]], rf"prompt 2 holds token ids outside .* 0 \.\. {TINY_VOCAB - 1}: \[{TINY_VOCAB}\]"),
                             ([[-5, 1]], r"outside the model's vocabulary .*\[-5\]"),
                             ([[1, 2.0]], "must be a sequence of token ids")):
        with pytest.raises(RedrafterError, match=message):
            list(engine.generate(prompts, config))
    with pytest.raises(RedrafterError, match="stop_token_ids must be a sequence of token ids"):
        GenerationConfig(stop_token_ids=2)
    finish = [e for e in engine.generate([[1, 2, 3]], config) if isinstance(e, FinishEvent)]
    assert len(finish) == 1 and len(finish[0].token_ids) == 4
