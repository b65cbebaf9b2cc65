"""Exactly lossless sampling: the tokens speculative decoding emits follow the target's own p (after
temperature / top-k / top-p) whatever the drafter proposes, checked against the exact joint
distribution of the first three tokens on a 12-token vocabulary; and the test detects the bias of
the "verify each beam on its own, keep the longest" rule."""

import itertools
import math

import pytest
import torch
from scipy.stats import chi2

import redrafter.engine as engine_module
from helpers import require_kernels, tiny_model
from redrafter import BeamConfig, Drafter, DrafterConfig, Engine, FinishEvent, GenerationConfig, ReDrafterProposer
from redrafter.config import MAX_TREE_TOKENS, SamplingParams
from redrafter.errors import RedrafterError
from redrafter.drafter.sibling_tree import TreeShape, draw_siblings, sibling_template, without
from redrafter.models.native import NativeTarget
from redrafter.sampling import probabilities, sample
from redrafter.tree import NO_TOKEN
from redrafter.verify import Acceptance, DraftProbs

VOCAB, PROMPT, SAMPLES, BATCH = 12, [1, 5, 7], 20_000, 2_000


def test_probabilities_transform_by_hand():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    e = torch.exp(logits / 0.5)
    torch.testing.assert_close(probabilities(logits, SamplingParams(temperature=0.5)), e / e.sum())
    top2 = torch.exp(logits[:2])
    torch.testing.assert_close(probabilities(logits, SamplingParams(temperature=1.0, top_k=2)),
                               torch.cat([top2 / top2.sum(), torch.zeros(2)]))
    full = torch.softmax(logits, -1)  # 0.644, 0.237, 0.087, 0.032: the top 2 reach 0.85 -> nucleus {0, 1}
    torch.testing.assert_close(probabilities(logits, SamplingParams(temperature=1.0, top_p=0.85)),
                               torch.cat([full[:2] / full[:2].sum(), torch.zeros(2)]))
    torch.testing.assert_close(probabilities(logits, SamplingParams(temperature=1.0, top_p=0.5)),
                               torch.tensor([1.0, 0.0, 0.0, 0.0]))  # the top token always stays
    assert probabilities(logits, SamplingParams()).tolist() == [1.0, 0.0, 0.0, 0.0]  # greedy


@pytest.mark.parametrize("temperature", [1e-6, 1e-21, 1e-40, 1e-300])
def test_tiny_temperatures_approach_greedy(temperature):
    """logits / T overflows float32 for T below about 1e-37: the gaps to the maximum are divided
    instead, so a tiny temperature gives the greedy token (ties shared), never NaN."""
    logits = torch.tensor([[30.0, -20.0, 29.9999, 5.0], [7.0, 7.0, -3.0, float("-inf")]])
    probs = probabilities(logits, SamplingParams(temperature=temperature, top_p=0.9))
    assert probs.tolist() == [[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]]


@pytest.mark.parametrize("fields", [dict(top_k=2.5), dict(top_k=True), dict(top_k="3"), dict(top_k=None),
                                    dict(temperature="1"), dict(temperature=None), dict(temperature=True),
                                    dict(top_p=None), dict(top_p="0.5"), dict(seed=1.5), dict(seed="x"),
                                    dict(seed=True)])
def test_sampling_params_reject_wrong_types(fields):
    with pytest.raises(RedrafterError, match=next(iter(fields))):
        SamplingParams(**fields)
    SamplingParams(temperature=1, top_k=3, top_p=1, seed=-5)  # ints where floats go are fine


@pytest.mark.parametrize("implementation", ["inverse_cdf", "inverse_cdf_tensors"])
def test_inverse_cdf_edges(implementation):
    """The first token whose cumulative weight exceeds u times the total: u = 0 skips leading zeros,
    u just below 1 never lands on a trailing zero, unnormalised weights work, and each token is picked
    for exactly its share of a fine grid of u; in C++ (``inverse_cdf`` on CPU float32) and in tensor
    operations alike."""
    import redrafter.sampling as sampling

    if implementation == "inverse_cdf":
        require_kernels("tree")
    inverse_cdf = getattr(sampling, implementation)
    weights = torch.tensor([0.0, 0.2, 0.0, 0.3, 0.5, 0.0])
    assert int(inverse_cdf(weights, torch.tensor(0.0))) == 1
    assert int(inverse_cdf(weights, torch.tensor(1 - 2.0 ** -53, dtype=torch.float64))) == 4
    assert int(inverse_cdf(weights * 7, torch.tensor(0.25))) == 3  # 0.25 of the total falls in token 3
    grid = (torch.arange(10_000, dtype=torch.float64) + 0.5) / 10_000
    picked = inverse_cdf(weights.expand(10_000, -1), grid)
    assert torch.bincount(picked, minlength=6).tolist() == [0, 2000, 0, 3000, 5000, 0]


def test_cumulative_weights_and_the_cpp_draw_agree_with_the_definition():
    """``cumulative_weights`` sums runs of tokens side by side: it is nondecreasing, ends at the
    total (within float64 rounding of an exact sum), and starts each run where the last one ended.
    The C++ draw (``inverse_cdf`` on CPU float32) picks the token the tensor definition picks, for
    vocabularies of 1 to 151,936 (runs of 1 to 9,496 tokens, some empty), rows with zeros and
    unnormalised weights, u on a grid and at 0 and just below 1."""
    from redrafter.sampling import CDF_BLOCKS, cumulative_weights, inverse_cdf, inverse_cdf_tensors

    require_kernels("tree")
    generator = torch.Generator().manual_seed(6)
    for vocab in (1, 2, 5, CDF_BLOCKS - 1, CDF_BLOCKS, CDF_BLOCKS + 1, 40, 1000, 8192, 49_152, 151_936):
        rows = 64 if vocab < 10_000 else 8
        weights = torch.rand(rows, vocab, generator=generator) ** 8 * 3  # many tiny weights, total not 1
        weights[torch.rand(rows, vocab, generator=generator) < 0.3] = 0.0
        weights[:, 0] = torch.where(weights.sum(-1) > 0, weights[:, 0], 1.0)  # no row of zeros
        cdf = cumulative_weights(weights)
        assert cdf.dtype == torch.float64 and bool((cdf.diff(dim=-1) >= 0).all())
        torch.testing.assert_close(cdf[:, -1], weights.double().sum(-1), rtol=1e-12, atol=0)
        u = torch.rand(rows, generator=generator, dtype=torch.float64)
        u[0], u[-1] = 0.0, 1 - 2.0 ** -53
        assert torch.equal(inverse_cdf(weights, u), inverse_cdf_tensors(weights, u)), vocab
        grid = (torch.arange(rows, dtype=torch.float64) + 0.5) / rows
        same_row = weights[:1].expand(rows, -1)
        assert torch.equal(inverse_cdf(same_row, grid), inverse_cdf_tensors(same_row, grid)), vocab
        assert bool((same_row.gather(1, inverse_cdf(same_row, grid).view(-1, 1)) > 0).all())


def test_nucleus_keeps_ties_and_falls_back_to_a_full_sort():
    """top-p keeps every token tied with the last one the nucleus needs; a nucleus wider than the
    partial top-k candidates (a flat row of 49,152 tokens) is found by the full sort, with the same
    result as sorting everything."""
    from redrafter.sampling import NUCLEUS_CANDIDATES, nucleus_threshold

    probs = torch.tensor([[0.4, 0.2, 0.2, 0.2]])
    kept = probabilities(probs.log(), SamplingParams(temperature=1.0, top_p=0.5))
    assert (kept > 0).tolist() == [[True, True, True, True]]  # 0.4 + 0.2 reaches 0.5; the other 0.2s tie
    flat = torch.softmax(torch.randn(2, 49_152, generator=torch.Generator().manual_seed(0)) * 0.01, -1)
    assert max(NUCLEUS_CANDIDATES) < 49_152 * 0.9
    threshold = nucleus_threshold(flat, 0.9)
    ordered = flat.sort(dim=-1, descending=True).values
    expected = ordered.gather(-1, (ordered.cumsum(-1) >= 0.9).int().argmax(-1, keepdim=True))
    assert torch.equal(threshold, expected)


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", vocab=VOCAB, init=0.1, seed=1)
    target = NativeTarget(model, name="tiny-v12")
    torch.manual_seed(3)
    drafter = Drafter(DrafterConfig(hidden_size=64, vocab_size=VOCAB, exit_dim=32)).eval()
    return model, target, drafter


def exact_joint(model, params: SamplingParams) -> torch.Tensor:
    """P(x1, x2, x3 | prompt) under p, enumerated with one transformers forward over all V^3 continuations."""
    sequences = torch.tensor([PROMPT + list(c) for c in itertools.product(range(VOCAB), repeat=3)])
    with torch.no_grad():
        logits = model(sequences).logits  # (V^3, len, V)
    n = len(PROMPT)
    joint = torch.ones(len(sequences), dtype=torch.float64)
    for i in range(3):
        p = probabilities(logits[:, n - 1 + i], params).double()
        joint *= p.gather(1, sequences[:, n + i: n + i + 1]).squeeze(1)
    return joint.view(VOCAB, VOCAB, VOCAB)


def sampled_counts(target, drafter, params: SamplingParams, draft_mode: str = "sample",
                   beam: BeamConfig | None = None) -> torch.Tensor:
    beam = beam or BeamConfig(width=3, length=3)
    engine = Engine(target, ReDrafterProposer(drafter, target, beam, draft_mode=draft_mode))
    counts = torch.zeros(VOCAB, VOCAB, VOCAB, dtype=torch.float64)
    config = GenerationConfig(max_new_tokens=3, sampling=params)
    for start in range(0, SAMPLES, BATCH):
        for e in engine.generate([PROMPT] * BATCH, config, row_offset=start):
            if isinstance(e, FinishEvent):
                counts[e.token_ids] += 1
    return counts


def chi_square_p_value(counts: torch.Tensor, joint: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; outcomes expected fewer than 5 times are pooled."""
    expected = joint.flatten() * counts.sum()
    observed = counts.flatten()
    big = expected >= 5
    e = torch.cat([expected[big], expected[~big].sum().view(1)])
    o = torch.cat([observed[big], observed[~big].sum().view(1)])
    keep = e > 0
    statistic = float(((o[keep] - e[keep]) ** 2 / e[keep]).sum())
    return float(chi2.sf(statistic, int(keep.sum()) - 1))


@pytest.mark.parametrize("params,draft_mode,beam", [
    (SamplingParams(temperature=1.0, seed=11), "sample", None), (SamplingParams(temperature=0.5, seed=12), "sample", None),
    (SamplingParams(temperature=1.0, top_k=4, seed=13), "sample", None),
    (SamplingParams(temperature=1.0, top_p=0.8, seed=14), "sample", None),
    (SamplingParams(temperature=1.0, seed=15), "beam", None), (SamplingParams(temperature=0.5, top_p=0.9, seed=16), "beam", None),
    (SamplingParams(temperature=1.0, seed=17), "beam", BeamConfig(width=3, length=3, max_tree_tokens=4)),
    (SamplingParams(temperature=1.0, seed=18), "sample", BeamConfig(width=2, length=3, lookup_tokens=3)),
    (SamplingParams(temperature=0.7, top_k=6, seed=19), "beam", BeamConfig(width=2, length=2, lookup_tokens=2)),
    (SamplingParams(temperature=1.0, seed=20), "sample",
     BeamConfig(width=3, length=3, max_tree_tokens=4, lookup_tokens=3, lookup_confidence=(0.6, 0.9))),
    (SamplingParams(temperature=1.0, seed=21), "sample", BeamConfig(width=3, length=3, min_tokens_per_step=3)),
    (SamplingParams(temperature=1.0, seed=23), "tree", None), (SamplingParams(temperature=0.5, seed=24), "tree", None),
    (SamplingParams(temperature=1.0, top_k=2, seed=25), "tree", BeamConfig(width=4, length=3)),
    (SamplingParams(temperature=1.0, top_p=0.8, seed=26), "tree", BeamConfig(width=2, length=4)),
    (SamplingParams(temperature=1.0, seed=27), "tree",
     BeamConfig(width=3, length=3, max_tree_tokens=5, lookup_tokens=3, lookup_confidence=(0.6, 0.9))),
    (SamplingParams(temperature=1.0, seed=28), "sample",
     BeamConfig(width=3, length=3, max_tree_tokens=3, lookup_tokens=4, lookup_confidence=(0.9,), extend_prob=0.5))],
    ids=["T1", "T0.5", "top-k4", "top-p0.8", "beam-drafts-T1", "beam-drafts-T0.5-top-p0.9", "beam-drafts-T1-capped-tree",
         "T1-lookup", "beam-drafts-T0.7-top-k6-lookup", "T1-lookup-capped", "T1-gated", "tree-T1", "tree-T0.5",
         "tree-top-k2-more-siblings-than-tokens", "tree-top-p0.8-depth3", "tree-T1-lookup-capped",
         "T1-lookup-extended-past-the-cap"])
def test_speculative_samples_follow_the_exact_joint(setup, params, draft_mode, beam):
    """Drafts drawn from q ("sample") or made by beam search and tested as point masses ("beam"),
    also with the tree capped to its 4 most probable nodes (beams that end early), with the
    context-lookup beam (point masses, longer than the drafter's beams) after the drafter's, and with a
    speculation floor no first step reaches unless all its drafts are accepted (a batch of rows in
    which some speculate and some take plain steps), with looked-up tokens sure enough to pass the
    cap (``extend_prob``); and trees whose siblings are drawn without replacement ("tree"), also
    where a top-k q has fewer tokens than a node has children."""
    model, target, drafter = setup
    counts = sampled_counts(target, drafter, params, draft_mode, beam)
    assert counts.sum() == SAMPLES
    p_value = chi_square_p_value(counts, exact_joint(model, params))
    assert p_value > 1e-3, f"chi-square p-value {p_value:.2e}: samples do not follow p"


def independent_beams_keep_longest(beams, unpacker, logits, params, draft_probs=None, generators=None):
    """The biased rule (reference ReDrafter's sampling mode): each beam runs standard speculative
    sampling on its own; the longest accepted beam wins; its bonus comes from its own residual."""
    batch, width, length = beams.shape
    if isinstance(draft_probs, DraftProbs):
        draft_probs = draft_probs.dense(beams, logits.shape[-1])
    best = []
    for b in range(batch):
        results = []
        for w in range(width):
            accepted, bonus = 0, None
            for j in range(1, length):
                p = probabilities(logits[b, unpacker[b, w, j - 1]], params)
                q = draft_probs[b, w, j - 1]
                x = int(beams[b, w, j])
                if float(torch.rand((), generator=generators[b])) * float(q[x]) < float(p[x]):
                    accepted = j
                    continue
                residual = (p - q).clamp(min=0)
                bonus = sample(residual / residual.sum(), generators[b])
                break
            if bonus is None:
                bonus = sample(probabilities(logits[b, unpacker[b, w, accepted]], params), generators[b])
            results.append((accepted, w, bonus))
        accepted, w, bonus = max(results, key=lambda r: (r[0], -r[1]))
        best.append((w, accepted, bonus))
    beam = torch.tensor([r[0] for r in best])
    return Acceptance(beam=beam, accepted=torch.tensor([r[1] for r in best]), tokens=beams[torch.arange(batch), beam],
                      bonus=torch.tensor([r[2] for r in best]))


def test_the_test_detects_the_biased_keep_longest_rule(setup, monkeypatch):
    model, target, drafter = setup
    params = SamplingParams(temperature=1.0, seed=21)
    monkeypatch.setattr(engine_module, "tree_accept", independent_beams_keep_longest)
    counts = sampled_counts(target, drafter, params)
    assert chi_square_p_value(counts, exact_joint(model, params)) < 1e-6


def test_the_test_detects_siblings_drawn_without_replacement_but_tested_with_q(setup, monkeypatch):
    """The "tree" mode's draws are right, but each sibling is tested with the drafter's q itself instead
    of q without the siblings drawn before it: biased. (Top-k 3 makes q's first sibling take much of its
    mass, so q and q without it differ enough for 20,000 samples to see.)"""
    from redrafter.drafter import sibling_tree

    model, target, drafter = setup
    params = SamplingParams(temperature=1.0, top_k=3, seed=28)
    draw = sibling_tree.draw_siblings

    def tested_with_q(q, counts, generators):
        tokens, dists = draw(q, counts, generators)
        return tokens, q.unsqueeze(2).expand_as(dists) * (tokens >= 0).unsqueeze(-1)

    monkeypatch.setattr(sibling_tree, "draw_siblings", tested_with_q)
    counts = sampled_counts(target, drafter, params, draft_mode="tree", beam=BeamConfig(width=3, length=2))
    assert chi_square_p_value(counts, exact_joint(model, params)) < 1e-6


def bonus_from_p_after_rejection(beams, unpacker, logits, params, draft_probs=None, generators=None):
    """A biased rule for deterministic drafts: children are tested as point masses (accept x with
    probability p(x)), but after rejecting them the bonus is drawn from p itself instead of the
    residual without the rejected children, so drafted tokens come out too often."""
    batch, width, length = beams.shape
    chosen, counts, bonuses = [], [], []
    for b in range(batch):
        live, node, accepted, beam, bonus = list(range(width)), int(unpacker[b, 0, 0]), 0, 0, None
        for j in range(1, length):
            p = probabilities(logits[b, node], params)
            hit = next((w for w in live if float(torch.rand((), generator=generators[b])) < float(p[beams[b, w, j]])),
                       None)
            if hit is None:
                bonus = sample(p, generators[b])
                break
            accepted, beam, node = j, hit, int(unpacker[b, hit, j])
            live = [w for w in live if int(unpacker[b, w, j]) == node]
        if bonus is None:
            bonus = sample(probabilities(logits[b, node], params), generators[b])
        chosen.append(beam)
        counts.append(accepted)
        bonuses.append(bonus)
    beam = torch.tensor(chosen)
    return Acceptance(beam=beam, accepted=torch.tensor(counts), tokens=beams[torch.arange(batch), beam],
                      bonus=torch.tensor(bonuses))


def test_the_test_detects_a_bonus_drawn_from_p_after_rejected_beam_drafts(setup, monkeypatch):
    model, target, drafter = setup
    params = SamplingParams(temperature=1.0, seed=22)
    monkeypatch.setattr(engine_module, "tree_accept", bonus_from_p_after_rejection)
    counts = sampled_counts(target, drafter, params, draft_mode="beam")
    assert chi_square_p_value(counts, exact_joint(model, params)) < 1e-6


@pytest.mark.parametrize("draft_mode", ["beam", "sample", "tree"])
def test_seeded_runs_repeat_and_rows_are_independent(setup, draft_mode):
    _, target, drafter = setup
    engine = Engine(target, ReDrafterProposer(drafter, target, BeamConfig(width=2, length=3), draft_mode=draft_mode))

    def run(seed, offset=0):
        config = GenerationConfig(max_new_tokens=16, sampling=SamplingParams(temperature=1.0, seed=seed))
        done = [e for e in engine.generate([PROMPT] * 4, config, row_offset=offset) if isinstance(e, FinishEvent)]
        return [e.token_ids for e in sorted(done, key=lambda e: e.row)]

    first = run(5)
    assert run(5) == first  # reproducible
    assert len(set(first)) == 4  # the same prompt in 4 rows: 4 different samples
    assert run(6) != first
    assert run(5, offset=1)[0] == first[1]  # a row's stream depends on its global row number only


@pytest.mark.parametrize("draft_mode", ["beam", "sample"])
def test_a_rows_sample_does_not_depend_on_the_rows_beside_it(setup, draft_mode):
    """float32: prompts of different lengths and lookups (one repeats itself, so its lookup takes
    slots of the cap the other's paths get), batched, sample what each samples alone with its row
    number; so does a greedy batch."""
    _, target, drafter = setup
    beam = BeamConfig(width=3, length=3, max_tree_tokens=5, lookup_tokens=4)
    engine = Engine(target, ReDrafterProposer(drafter, target, beam, draft_mode=draft_mode))
    prompts = [[3, 4, 5, 3, 4, 5, 3, 4, 5, 3, 4], [1, 5, 7], [9, 2, 9, 2, 6, 0, 11, 2]]
    for params in (SamplingParams(temperature=1.0, seed=4), SamplingParams(temperature=0.6, top_p=0.9, seed=9),
                   SamplingParams()):
        config = GenerationConfig(max_new_tokens=24, sampling=params)
        batch = {e.row: e.token_ids for e in engine.generate(prompts, config, row_offset=2)
                 if isinstance(e, FinishEvent)}
        for row, prompt in enumerate(prompts):
            alone = next(e.token_ids for e in engine.generate([prompt], config, row_offset=2 + row)
                         if isinstance(e, FinishEvent))
            assert batch[row] == alone, (params, row)


def test_a_beam_that_ended_is_never_a_candidate():
    """NO_TOKEN past a beam's end (a capped tree) is skipped: here p puts all its mass on the last
    vocabulary id, which a NO_TOKEN (-1) used as an index would read."""
    from redrafter.tree import NO_TOKEN, pack
    from redrafter.verify import tree_accept

    beams = torch.tensor([[[4, NO_TOKEN, NO_TOKEN], [4, 2, NO_TOKEN]]])
    tree = pack(beams)
    logits = torch.full((1, tree.tokens.shape[1], VOCAB), -30.0)
    logits[..., VOCAB - 1] = 30.0
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=1)):
        generators = None if params.greedy else [torch.Generator().manual_seed(1)]
        result = tree_accept(beams, tree.unpacker, logits, params, None, generators)
        assert result.accepted.tolist() == [0] and result.bonus.tolist() == [VOCAB - 1]


def test_sampled_drafts_under_a_tree_cap_draw_fewer_paths(setup):
    """Drafts drawn from q are never chosen by value; the cap limits how many are drawn instead."""
    from redrafter.engine import sampled_draws

    assert sampled_draws(BeamConfig(width=16, length=3)) == 16
    assert sampled_draws(BeamConfig(width=16, length=3, max_tree_tokens=8)) == 3  # 1 + 3 * 2 <= 8
    assert sampled_draws(BeamConfig(width=2, length=3, max_tree_tokens=8)) == 2
    assert sampled_draws(BeamConfig(width=4, length=5, max_tree_tokens=3)) == 1
    # "tree": single nodes, as many as W paths hold, or K - 1
    assert sampled_draws(BeamConfig(width=4, length=3), nodes=True) == 8
    assert sampled_draws(BeamConfig(width=4, length=3, max_tree_tokens=6), nodes=True) == 5
    assert sampled_draws(BeamConfig(width=2, length=3, max_tree_tokens=8), nodes=True) == 4
    _, target, drafter = setup
    proposer = ReDrafterProposer(drafter, target, BeamConfig(width=16, length=3, max_tree_tokens=8))
    params = SamplingParams(temperature=1.0, seed=1)
    beams, probs = proposer.propose_sampled(torch.randn(2, 64), torch.tensor([1, 2]), torch.ones(2, dtype=torch.long),
                                            params, [torch.Generator().manual_seed(i) for i in range(2)],
                                            rows=torch.arange(2), history=[[1], [2]])
    assert beams.shape == (2, 3, 3) and probs.dense(beams, VOCAB).shape == (2, 3, 2, VOCAB)


def test_a_capped_sampled_tree_gives_confident_lookups_their_slots_first():
    """K = 5 (4 drafted slots), L = 3: row 0's lookup is confident (c^depth >= 0.5) for 2 tokens
    (0.75, 0.56; then 0.42), so it gets one path of 2 and keeps 4 - 2 = 2 looked-up tokens; row 1's is
    confident for none (0.4), so it gets two paths and no looked-up token. Each row's split is its
    own, whatever the other rows hold. A lookup confident for all 4 slots leaves no path."""
    from redrafter.engine import split_budget

    beam = BeamConfig(width=4, length=3, max_tree_tokens=5, lookup_tokens=4)
    looked_up = torch.tensor([[[7, 1, 2, 3, 4]], [[8, 5, 6, NO_TOKEN, NO_TOKEN]]])
    log = torch.log(torch.tensor([0.75, 0.4]))
    scores = log.view(2, 1, 1) * torch.arange(5.0)
    scores[1, 0, 3:] = -math.inf
    paths, cut = split_budget(looked_up, scores, beam)
    assert paths.tolist() == [1, 2]
    assert cut.tolist() == [[[7, 1, 2, NO_TOKEN, NO_TOKEN]], [[8, NO_TOKEN, NO_TOKEN, NO_TOKEN, NO_TOKEN]]]
    for row in (0, 1):  # the same split as the row alone
        alone, alone_cut = split_budget(looked_up[row:row + 1], scores[row:row + 1], beam)
        assert alone.tolist() == [paths[row]] and alone_cut.tolist() == cut[row:row + 1].tolist()
    nodes, _ = split_budget(looked_up, scores, beam, nodes=True)  # "tree" mode: one shape for the batch
    assert nodes.tolist() == [2, 2]
    paths, cut = split_budget(looked_up[:1], scores[:1] / 10, beam)  # c = 0.99: all 4 slots are its
    assert paths == 0 and cut.tolist() == [[[7, 1, 2, 3, 4]]]


def test_sure_lookups_pass_a_sampled_trees_cap():
    """K = 3 (2 drafted slots): row 0's lookup is confident for both slots (no path), row 1's for
    none (one path of 2, no looked-up token). With ``extend_prob`` 0.5, row 0's looked-up tokens scored
    0.9, 0.81, 0.73, 0.66 all stay (a tree of 5 past the cap); without it they are cut to 2."""
    from redrafter.engine import split_budget

    looked_up = torch.tensor([[[7, 1, 2, 3, 4]], [[8, 5, 6, 9, 9]]])
    scores = torch.log(torch.tensor([0.9, 0.4])).view(2, 1, 1) * torch.arange(5.0)
    cut_both = [[[7, 1, 2, NO_TOKEN, NO_TOKEN]], [[8, NO_TOKEN, NO_TOKEN, NO_TOKEN, NO_TOKEN]]]
    paths, cut = split_budget(looked_up, scores, BeamConfig(width=4, length=3, max_tree_tokens=3, lookup_tokens=4))
    assert paths.tolist() == [0, 1] and cut.tolist() == cut_both
    beam = BeamConfig(width=4, length=3, max_tree_tokens=3, lookup_tokens=4, extend_prob=0.5)
    paths, cut = split_budget(looked_up, scores, beam)
    assert paths.tolist() == [0, 1] and cut.tolist() == [[[7, 1, 2, 3, 4]], cut_both[1]]
    # Beside drawn paths (K = 4: one path of 2 and 1 looked-up slot), up to MAX_TREE_TOKENS in all:
    # a lookup of 70 sure tokens keeps 64 - 1 - 2 = 61 of them.
    long_lookup = torch.arange(71).view(1, 1, 71)
    # scores just under 0.4 (< SAMPLED_LOOKUP_MIN: the path keeps its room), all above 0.3
    long_scores = torch.cat([torch.zeros(1), math.log(0.4) - torch.arange(70) * 1e-4]).view(1, 1, 71)
    beam = BeamConfig(width=4, length=3, max_tree_tokens=4, lookup_tokens=70, extend_prob=0.3)
    paths, cut = split_budget(long_lookup, long_scores, beam)
    kept = int((cut != NO_TOKEN).sum()) - 1
    assert paths == 1 and kept == MAX_TREE_TOKENS - 1 - 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sampled_drafts_from_the_fused_drafter_step_equal_the_loop(dtype):
    """``propose_sampled`` with an int4 drafter copy runs each depth in one call (``FusedSearch.step``)
    where the target has an embedding table: the same drawn paths and the same q, bit for bit, as the
    drafter's own ``next_state`` and ``logits`` (the path taken without the table). bf16 runs the AVX-512
    extension's step, float32 the AVX2 one's."""
    from helpers import require_kernels

    require_kernels("int4" if dtype == torch.bfloat16 else "avx2")
    require_kernels("tree")
    target = NativeTarget(tiny_model("llama", vocab=1000, dtype=dtype), name=f"tiny-{dtype}")
    torch.manual_seed(4)
    drafter = Drafter(DrafterConfig(hidden_size=64, vocab_size=256, exit_dim=64, target_vocab_size=1000))
    for p in drafter.parameters():
        torch.nn.init.normal_(p, std=0.2)
    drafter.draft_to_target = torch.randperm(1000)[:256]
    proposer = ReDrafterProposer(drafter.to(dtype), target, BeamConfig(width=3, length=4), draft_mode="sample")
    assert proposer.table is not None and proposer.drafter.fused_search is not None
    context, g0 = torch.randn(2, 64).to(dtype), torch.tensor([5, 900])
    cases = [(SamplingParams(temperature=1.0, seed=1), "sample"), (SamplingParams(temperature=0.7, top_p=0.9, seed=2), "sample"),
             (SamplingParams(temperature=1.0, seed=3), "tree")]
    for params, mode in cases:
        proposer.draft_mode = mode
        def run():
            generators = [torch.Generator().manual_seed(10 + i) for i in range(2)]
            return proposer.propose_sampled(context, g0, torch.ones(2, dtype=torch.long), params, generators,
                                            rows=torch.arange(2), history=[[5], [900]])
        table = proposer.table
        proposer.table = None
        loop_beams, loop_q = run()
        proposer.table = table
        proposer.drafter.next_state = None  # the loop would call it
        try:
            fused_beams, fused_q = run()
        finally:
            del proposer.drafter.next_state
        width = 3 if mode == "sample" else len(TreeShape.of(sibling_template(9, 3)).leaves)  # 9 nodes of depth <= 3
        assert torch.equal(fused_beams, loop_beams) and loop_beams.shape == (2, width, 4)
        assert torch.equal(fused_q.probs, loop_q.probs) and torch.equal(fused_q.vocab_map, drafter.draft_to_target)
        assert fused_q.distinct == (mode == "tree")


def test_sibling_templates_are_trees_ordered_by_estimated_acceptance():
    assert sibling_template(3, 2, (0.5, 0.2)) == ((0,), (0, 0), (1,))
    assert sibling_template(4, 1, (0.5, 0.2)) == ((0,), (1,), (2,), (3,))  # depth 1: siblings only
    assert sibling_template(0, 2) == ()
    for nodes in range(1, 12):
        paths = sibling_template(nodes, 3)
        assert len(paths) == nodes and max(map(len, paths)) <= 3
        TreeShape.of(paths)  # raises unless closed under prefixes and earlier siblings
    shape = TreeShape.of(((0,), (0, 0), (0, 1), (1,), (2,), (2, 0)))
    assert shape.levels == (((0, 0), (0, 1), (0, 2)), ((0, 0), (0, 1), (2, 0)))
    assert shape.leaves == ((0, 0), (0, 1), (1,), (2, 2))  # beams in rank-path order: siblings in draw order
    with pytest.raises(ValueError):
        TreeShape.of(((0,), (1, 0)))  # (1, 0) without (1,)
    with pytest.raises(ValueError):
        TreeShape.of(((0,), (2,)))  # the third child without the second


def test_siblings_are_distinct_and_each_comes_with_the_q_it_was_drawn_from():
    q = torch.tensor([[[0.5, 0.3, 0.2, 0.0], [0.0, 0.0, 1.0, 0.0]]])
    generators = [torch.Generator().manual_seed(0)]
    tokens, dists = draw_siblings(q, [3, 2], generators)
    assert tokens.shape == (1, 2, 3)
    first = tokens[0, 0].tolist()
    assert sorted(first) == [0, 1, 2]  # three distinct tokens: all of q's support
    drawn = torch.zeros(4, dtype=torch.bool)
    for rank, token in enumerate(first):
        assert torch.allclose(dists[0, 0, rank], without(q[0, 0], drawn))
        drawn[token] = True
    # one token of mass: the second child cannot be drawn (q has nothing left), the third is not wanted
    assert tokens[0, 1].tolist() == [2, -1, -1] and dists[0, 1, 1:].abs().sum() == 0
    # over many draws, the second sibling follows q without the first
    many = draw_siblings(q[:, :1].expand(1, 4000, 4).contiguous(), [2] * 4000, generators)[0][0]
    second_after_0 = many[many[:, 0] == 0, 1]
    share = float((second_after_0 == 1).double().mean())
    assert abs(share - 0.3 / 0.5) < 0.05
