"""Drafter checkpoints: the reference layout, round trips, and clear errors on bad files."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny_target
from redrafter import Drafter, DrafterConfig, RedrafterError, load_drafter, save_drafter
from redrafter.engine import ReDrafterProposer
from redrafter.config import BeamConfig


def reference_keys(num_layers: int, input_proj: bool) -> set[str]:
    keys = {"rnn_u.weight", "rnn_u.bias", "rnn_w.weight", f"lm_head.{num_layers}.weight"}
    for i in range(num_layers):
        keys |= {f"lm_head.{i}.linear.weight", f"lm_head.{i}.linear.bias"}
    if input_proj:
        keys |= {"input_proj.weight", "input_proj.bias"}
    return keys


@pytest.mark.parametrize("exit_dim,input_proj", [(None, False), (24, True)])
def test_save_load_round_trip_in_reference_layout(tmp_path, exit_dim, input_proj):
    torch.manual_seed(0)
    drafter = Drafter(DrafterConfig(hidden_size=16, vocab_size=50, exit_dim=exit_dim, num_draft_layers=3))
    save_drafter(drafter, tmp_path / "d")
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["model_type"] == "recurrent_drafting_drafter"
    assert config["exit_dim"] == (exit_dim or 32) and config["rnn"] is True and config["num_lookback_tokens"] == -1
    state = load_file(str(tmp_path / "d" / "model.safetensors"))
    assert set(state) == reference_keys(3, input_proj)
    assert state["lm_head.3.weight"].shape == (50, exit_dim or 32)
    loaded = load_drafter(tmp_path / "d")
    h, s = torch.randn(2, 16), torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(h, s), drafter.logits(h, s))
    save_drafter(loaded, tmp_path / "d")  # overwrite in place, atomically
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.json", "model.safetensors"):  # ordinary files, readable as the umask allows
        assert (tmp_path / "d" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_rnn_equation():
    torch.manual_seed(0)
    drafter = Drafter(DrafterConfig(hidden_size=4, vocab_size=7))
    s, e = torch.randn(4), torch.randn(4)
    with torch.no_grad():
        expected = torch.nn.functional.silu(drafter.rnn_w.weight @ e + drafter.rnn_u.weight @ s + drafter.rnn_u.bias)
        torch.testing.assert_close(drafter.next_state(s, e), expected)
    no_rnn = Drafter(DrafterConfig(hidden_size=4, vocab_size=7, rnn=False))
    torch.testing.assert_close(no_rnn.next_state(s, e), s + e)


def test_corrupt_and_missing_files_raise_clear_errors(tmp_path):
    with pytest.raises(RedrafterError, match="not found"):
        load_drafter(tmp_path / "nope")
    save_drafter(Drafter(DrafterConfig(hidden_size=8, vocab_size=10)), tmp_path / "d")
    weights = tmp_path / "d" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(RedrafterError, match="cannot read drafter weights"):
        load_drafter(tmp_path / "d")
    weights.unlink()
    with pytest.raises(RedrafterError, match="has no model.safetensors"):
        load_drafter(tmp_path / "d")


def test_config_weights_mismatch(tmp_path):
    save_drafter(Drafter(DrafterConfig(hidden_size=8, vocab_size=10)), tmp_path / "d")
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    config["vocab_size"] = 11
    (tmp_path / "d" / "config.json").write_text(json.dumps(config))
    with pytest.raises(RedrafterError, match="do not match its config.json"):
        load_drafter(tmp_path / "d")


def test_drafter_for_another_model_is_refused():
    target = tiny_target("llama")  # H = 64, V = 96
    with pytest.raises(RedrafterError, match="hidden_size 32 does not match"):
        ReDrafterProposer(Drafter(DrafterConfig(hidden_size=32, vocab_size=96)), target, BeamConfig())
    with pytest.raises(RedrafterError, match="vocab_size 100 does not match"):
        ReDrafterProposer(Drafter(DrafterConfig(hidden_size=64, vocab_size=100)), target, BeamConfig())


def test_beam_resolution_flags_then_drafter_recommendation_then_default(tmp_path):
    from redrafter.cli import DEFAULT_BEAM, resolve_beam
    from redrafter.errors import RedrafterError

    assert resolve_beam(None, None, None) == DEFAULT_BEAM
    assert resolve_beam(None, None, tmp_path) == DEFAULT_BEAM  # no generation.json
    (tmp_path / "generation.json").write_text('{"beam_width": 2, "beam_length": 4}')
    assert (resolve_beam(None, None, tmp_path).width, resolve_beam(None, None, tmp_path).length) == (2, 4)
    assert (resolve_beam(3, None, tmp_path).width, resolve_beam(3, None, tmp_path).length) == (3, 4)
    assert resolve_beam(None, 6, tmp_path).length == 6
    assert resolve_beam(None, None, tmp_path).min_prob == 0.0  # no adaptive length stored
    (tmp_path / "generation.json").write_text('{"beam_width": 1, "beam_length": 5, "min_draft_prob": 0.2}')
    assert resolve_beam(None, None, tmp_path) == BeamConfig(1, 5, min_prob=0.2)
    assert resolve_beam(None, None, tmp_path, 0.0).min_prob == 0.0  # the flag wins
    assert resolve_beam(None, 4, tmp_path).min_prob == 0.0  # measured for 1 x 5 only
    assert resolve_beam(2, None, tmp_path, 0.3).min_prob == 0.3
    (tmp_path / "generation.json").write_text('{"beam_width": 8, "beam_length": 4, "max_tree_tokens": 12}')
    assert resolve_beam(None, None, tmp_path) == BeamConfig(8, 4, max_tree_tokens=12)
    assert resolve_beam(None, None, tmp_path, None, 0).max_tree_tokens == 0  # the flag wins
    assert resolve_beam(4, None, tmp_path).max_tree_tokens == 0  # measured for 8 x 4 only
    assert resolve_beam(None, 3, tmp_path, None, 6).max_tree_tokens == 6
    # A section per weight format: the target's format picks it, a format without one gets the top level.
    (tmp_path / "generation.json").write_text('{"beam_width": 16, "beam_length": 3, "max_tree_tokens": 8, '
                                              '"int4": {"beam_width": 4, "beam_length": 3, "max_tree_tokens": 4}}')
    assert resolve_beam(None, None, tmp_path) == BeamConfig(16, 3, max_tree_tokens=8)
    assert resolve_beam(None, None, tmp_path, weights="dense") == BeamConfig(16, 3, max_tree_tokens=8)
    assert resolve_beam(None, None, tmp_path, weights="int4") == BeamConfig(4, 3, max_tree_tokens=4)
    assert resolve_beam(8, None, tmp_path, weights="int4") == BeamConfig(8, 3, max_tree_tokens=0)
    # A kernel's own section (int4 with torch's kernel), else its format's.
    assert resolve_beam(None, None, tmp_path, weights="int4:torch") == BeamConfig(4, 3, max_tree_tokens=4)
    (tmp_path / "generation.json").write_text('{"beam_width": 16, "beam_length": 3, '
                                              '"int4": {"beam_width": 8, "beam_length": 3, "max_tree_tokens": 8}, '
                                              '"int4:torch": {"beam_width": 8, "beam_length": 3, "max_tree_tokens": 4}}')
    assert resolve_beam(None, None, tmp_path, weights="int4") == BeamConfig(8, 3, max_tree_tokens=8)
    assert resolve_beam(None, None, tmp_path, weights="int4:torch") == BeamConfig(8, 3, max_tree_tokens=4)
    # A setting measured for sampling overrides the entry's keys at temperature > 0 only.
    (tmp_path / "generation.json").write_text('{"beam_width": 16, "beam_length": 3, '
                                              '"int4": {"beam_width": 8, "beam_length": 3, "max_tree_tokens": 8, '
                                              '"lookup_tokens": 8, "sampling": {"max_tree_tokens": 4}}}')
    assert resolve_beam(None, None, tmp_path, weights="int4") == BeamConfig(8, 3, max_tree_tokens=8, lookup_tokens=8)
    assert resolve_beam(None, None, tmp_path, weights="int4", sampling=True) == BeamConfig(
        8, 3, max_tree_tokens=4, lookup_tokens=8)
    assert resolve_beam(None, None, tmp_path, weights="dense", sampling=True) == BeamConfig(16, 3)
    # A speculation floor measured for sampling, and an explicit flag over it.
    (tmp_path / "generation.json").write_text('{"beam_width": 8, "beam_length": 3, '
                                              '"sampling": {"max_tree_tokens": 4, "min_tokens_per_step": 1.6}}')
    assert resolve_beam(None, None, tmp_path, sampling=True) == BeamConfig(8, 3, max_tree_tokens=4,
                                                                          min_tokens_per_step=1.6)
    assert resolve_beam(None, None, tmp_path, sampling=True, min_tokens_per_step=0).min_tokens_per_step == 0
    assert resolve_beam(None, None, tmp_path).min_tokens_per_step == 0
    # Sure looked-up stretches past the cap: stored with the lookup, off when sampling, a flag over both.
    (tmp_path / "generation.json").write_text('{"beam_width": 8, "beam_length": 3, "int4": {"beam_width": 8, '
                                              '"beam_length": 3, "max_tree_tokens": 6, "lookup_tokens": 32, '
                                              '"extend_prob": 0.5, "sampling": {"lookup_tokens": 8, "extend_prob": 0}}}')
    assert resolve_beam(None, None, tmp_path, weights="int4") == BeamConfig(8, 3, max_tree_tokens=6, lookup_tokens=32,
                                                                           extend_prob=0.5)
    assert resolve_beam(None, None, tmp_path, weights="int4", sampling=True).extend_prob == 0
    assert resolve_beam(None, None, tmp_path, weights="int4", extend_prob=0.3).extend_prob == 0.3
    # An explicit shape under a cap keeps the stored lookup and extension; a whole tree (no cap) gets a
    # lookup beam of a beam's length and no extension.
    assert resolve_beam(4, None, tmp_path, None, 6, weights="int4") == BeamConfig(
        4, 3, max_tree_tokens=6, lookup_tokens=32, extend_prob=0.5)
    assert resolve_beam(4, 5, tmp_path, weights="int4") == BeamConfig(4, 5, lookup_tokens=4)
    assert resolve_beam(4, 5, tmp_path, weights="int4", lookup_tokens=16, extend_prob=0.5) == BeamConfig(
        4, 5, lookup_tokens=16, extend_prob=0.5)  # the flags win
    assert resolve_beam(None, None, tmp_path, weights="dense").extend_prob == 0
    (tmp_path / "generation.json").write_text('{"beam_width": 8, "beam_length": 4, "max_tree_tokens": 1}')
    with pytest.raises(RedrafterError, match="max tree tokens"):
        resolve_beam(None, None, tmp_path)
    (tmp_path / "generation.json").write_text('{"beam_width": 1, "beam_length": 5, "min_draft_prob": 2}')
    with pytest.raises(RedrafterError, match="minimum draft probability"):
        resolve_beam(None, None, tmp_path)
    (tmp_path / "generation.json").write_text('{"beam_width": "x"}')
    with pytest.raises(RedrafterError, match="generation.json"):
        resolve_beam(None, None, tmp_path)


def test_inference_copy_drafts_the_same_and_is_a_frozen_snapshot():
    from redrafter.drafter.beam_search import beam_search
    from redrafter.drafter.model import inference_copy
    from redrafter.models.base import pack_linear_weight

    torch.manual_seed(0)
    drafter = Drafter(DrafterConfig(hidden_size=16, vocab_size=40, exit_dim=24, num_draft_layers=2))
    fast = inference_copy(drafter)
    assert inference_copy(fast) is fast and not any(p.requires_grad for p in fast.parameters())
    if pack_linear_weight(torch.zeros(2, 2)) is not None:  # CPU with oneDNN: the forwards were replaced
        assert all("forward" in vars(m) for m in fast.modules() if isinstance(m, torch.nn.Linear))
    context, state = torch.randn(3, 16), torch.randn(3, 16)
    torch.testing.assert_close(fast.logits(context, state), drafter.logits(context, state), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.next_state(state, context), drafter.next_state(state, context), atol=1e-5, rtol=1e-5)
    table = torch.randn(40, 16)
    embed = lambda t: table[t]  # noqa: E731
    a = beam_search(drafter, embed, context, torch.tensor([1, 2, 3]), width=3, length=4)
    b = beam_search(fast, embed, context, torch.tensor([1, 2, 3]), width=3, length=4)
    assert torch.equal(a.beams, b.beams)
    with torch.no_grad():
        drafter.lm_head[-1].weight.zero_()  # later training does not reach the snapshot
    assert fast.logits(context, state).abs().sum() > 0


def test_int4_drafting_computes_with_the_rounded_weights():
    """--drafter-weights int4: each linear layer of a bf16 drafter computes with its weight rounded to 4
    bits per group of 32 inputs (``round_4bit``: q * step + low, step and low float16, q in 0..15), to
    bf16 output rounding; "dense" keeps the loaded weights; a float64 drafter cannot take int4 and
    says why; "auto" falls back to dense for it."""
    from helpers import require_kernels
    from redrafter.drafter.model import inference_copy
    from redrafter.models import kernels
    from redrafter.models.int4 import round_4bit

    require_kernels("int4")
    torch.manual_seed(0)
    drafter = Drafter(DrafterConfig(hidden_size=32, vocab_size=64, exit_dim=64, num_draft_layers=2)).to(torch.bfloat16)
    fast = inference_copy(drafter, weights="int4")
    assert fast.weights == "int4" and inference_copy(drafter, weights="dense").weights == "dense"
    linears = [m for m in fast.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.forward.int4 is not None for m in linears)
    x = torch.randn(5, 32).bfloat16()
    for module in (fast.rnn_u, fast.rnn_w):
        q, step, low = round_4bit(module.weight.float())
        rounded = (q.view(32, 1, 32).float() * step.float().unsqueeze(-1) + low.float().unsqueeze(-1)).view(32, 32)
        assert 0 < (rounded - module.weight.float()).abs().max() <= step.float().max() / 2 + 1e-6  # it was rounded
        exact = x.double() @ rounded.double().T + (0 if module.bias is None else module.bias.double())
        got = module(x).double()
        assert bool(((got - exact).abs() <= 2.0 ** -7 * exact.abs() + 1e-3).all())
    state = torch.randn(3, 32).bfloat16()
    dense, rounded = drafter.logits(state, state).float(), fast.logits(state, state).float()
    assert (rounded - dense).norm() / dense.norm() < 0.15
    with pytest.raises(RedrafterError, match="int4 drafting runs bfloat16 or float32 drafters on CPU, not torch.float64"):
        inference_copy(drafter.double(), weights="int4")
    assert inference_copy(drafter.double()).weights == "dense"
    # float32 takes our AVX2 kernel, which every CPU with the AVX-512 one also runs
    assert inference_copy(drafter.float()).weights == ("int4" if kernels.avx2() is not None else "dense")
    with pytest.raises(RedrafterError, match="unknown drafter weights"):
        inference_copy(drafter, weights="int8")


def test_round_4bit_is_a_q4_1_quantizer():
    """Per group of 32: the smallest weight is level 0, the largest level 15 (up to float16 scales),
    every weight within half a step of its level; a constant group has step 0 and is exact."""
    from redrafter.models.int4 import round_4bit

    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=g)
    w[3, 32:] = 0.25
    q, step, low = round_4bit(w)
    assert q.dtype == torch.int32 and step.dtype == low.dtype == torch.float16 and step.shape == (16, 2)
    levels = q.view(16, 2, 32)
    rebuilt = levels.float() * step.float().unsqueeze(-1) + low.float().unsqueeze(-1)
    assert bool(((rebuilt - w.view(16, 2, 32)).abs() <= step.float().unsqueeze(-1) * 0.5 + 1e-3).all())
    top = levels.amax(-1)
    top[3, 1] = 15  # the constant group, checked below
    assert bool((levels.amin(-1) == 0).all()) and int(top.min()) >= 14
    assert float(step[3, 1]) == 0 and bool((rebuilt[3, 1] == 0.25).all())
