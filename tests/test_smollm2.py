"""Greedy parity on the real embedded model (SmolLM2-135M-Instruct, fp32) against transformers'
own ``generate(do_sample=False)`` for several chat prompts of 64+ new tokens."""

import pytest
import torch

from helpers import ScriptedProposer
from redrafter import BeamConfig, Drafter, DrafterConfig, Engine, FinishEvent, GenerationConfig, ReDrafterProposer
from redrafter.cli import encode_prompt, stop_token_ids

PROMPTS = [
    "Describe the city of Paris in one paragraph.",
    "Write a short Python function that reverses a string, and explain it.",
    "Give me three tips for staying focused while studying.",
    "Explain what a hash table is to a ten-year-old.",
]
MAX_NEW = 72

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cases(smollm2):
    target, tokenizer = smollm2
    stops = stop_token_ids(tokenizer, target)
    cases = []
    for text in PROMPTS:
        ids = encode_prompt(tokenizer, text, chat_template=True)
        with torch.no_grad():
            out = target.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                        do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=list(stops),
                                        pad_token_id=tokenizer.pad_token_id)
        cases.append((ids, out[0, len(ids):].tolist()))
    assert sum(len(ref) for _, ref in cases) >= 3 * 64  # long answers, not early stops
    return target, GenerationConfig(max_new_tokens=MAX_NEW, stop_token_ids=stops), cases


def finish(engine, ids, config):
    return next(e for e in engine.generate([ids], config) if isinstance(e, FinishEvent))


def test_autoregressive_matches_generate(cases):
    target, config, items = cases
    for ids, reference in items:
        assert list(finish(Engine(target), ids, config).token_ids) == reference


def test_oracle_drafter_matches_generate_with_tau_near_length(cases):
    target, config, items = cases
    vocab = target.info.vocab_size
    tokens = steps = 0
    for ids, reference in items:
        oracle = ScriptedProposer([reference], width=3, length=5, right=4, vocab=vocab)
        result = finish(Engine(target, oracle), ids, config)
        assert list(result.token_ids) == reference
        tokens, steps = tokens + result.stats.num_new_tokens - 1, steps + result.stats.num_steps
    assert tokens / steps >= 4.5  # L = 5: the tree path carries almost every token


def test_scripted_partial_drafter_matches_generate(cases):
    target, config, items = cases
    tokens = steps = 0
    for ids, reference in items:
        scripted = ScriptedProposer([reference], width=4, length=6, right=2, vocab=target.info.vocab_size)
        result = finish(Engine(target, scripted), ids, config)
        assert list(result.token_ids) == reference
        tokens, steps = tokens + result.stats.num_new_tokens - 1, steps + result.stats.num_steps
    assert 2.5 <= tokens / steps <= 3.0  # 2 drafted tokens right, plus the bonus token


def test_random_drafter_matches_generate(cases):
    target, config, items = cases
    torch.manual_seed(0)
    drafter = Drafter(DrafterConfig(hidden_size=target.info.hidden_size, vocab_size=target.info.vocab_size,
                                    exit_dim=128)).eval()
    proposer = ReDrafterProposer(drafter, target, BeamConfig(width=4, length=4))
    for ids, reference in items:
        assert list(finish(Engine(target, proposer), ids, config).token_ids) == reference
