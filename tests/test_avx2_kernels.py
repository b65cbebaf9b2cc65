"""Our AVX2 kernels for float32 models besides the products (tests/test_int4.py): attention over a cache
layer against a float64 reference, RMSNorm, the rotary embedding with its cache write and SiLU x up
against the tensor versions, the native backend with them against torch's, and greedy speculative
decoding of the real model with them against plain decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import require_kernels, tiny_model
from redrafter.models.native import NativeTarget, signed_rotary

SHAPES = [  # batch, heads, kv_heads, n, span, head_dim
    (1, 9, 3, 8, 300, 64),  # SmolLM2-135M verifying 8 tree tokens
    (1, 9, 3, 1, 17, 64),  # one token
    (2, 12, 2, 5, 77, 128),  # Qwen2.5's head size
    (3, 4, 4, 3, 40, 32),  # no grouping
    (1, 7, 1, 2, 33, 80),  # 7 heads on one key/value head, 10 lanes-blocks: the kernel's remainders
    (1, 9, 3, 2, 1100, 64),  # a long context: 2 or 3 runs per query, merged
    (2, 4, 1, 7, 33, 80),  # a head size the kernel has no special case for
]


def avx2():
    return require_kernels("avx2")


def cache_with(keys: torch.Tensor, values: torch.Tensor, layer: int = 1, layers: int = 2, spare: int = 20):
    """A (layers, 2, B, kv_heads, capacity, D) cache holding keys and values at ``layer``, with spare slots
    after them and other layers filled with noise."""
    batch, kv_heads, span, dim = keys.shape
    kv = torch.randn(layers, 2, batch, kv_heads, span + spare, dim, generator=torch.Generator().manual_seed(3))
    kv[layer, 0, :, :, :span], kv[layer, 1, :, :, :span] = keys, values
    return kv


def reference(q, keys, values, allowed, scale):
    """softmax(scale q k^T + mask) v in float64, q (B, n, heads, D) -> (B, n, heads, D)."""
    group = q.shape[2] // keys.shape[1]
    k, v = keys.double().repeat_interleave(group, 1), values.double().repeat_interleave(group, 1)
    scores = q.double().transpose(1, 2) @ k.transpose(-1, -2) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_avx2_attention_equals_a_float64_reference(shape):
    """Masked and unmasked steps over a layer of a longer cache: the float64 attention within 1e-5 of
    the largest value; a masked slot gets no weight; the thread count changes nothing."""
    module = avx2()
    batch, heads, kv_heads, n, span, dim = shape
    g = torch.Generator().manual_seed(sum(shape))
    q = torch.randn(batch, n, heads, dim, generator=g)
    keys = torch.randn(batch, kv_heads, span, dim, generator=g)
    values = torch.randn(batch, kv_heads, span, dim, generator=g)
    kv = cache_with(keys, values)
    allowed = torch.rand(batch, 1, n, span, generator=g) < 0.6
    allowed[..., -1], allowed[..., 0] = True, False  # every query sees a slot, none the first
    scale = dim ** -0.5
    for mask in (allowed, None):
        out = module.attention_f32(q, kv, 1, span, torch.empty(0, dtype=torch.bool) if mask is None else mask, scale)
        assert out.shape == (batch, n, heads * dim) and out.dtype == torch.float32
        expected = reference(q, keys, values, mask, scale).reshape(batch, n, heads * dim)
        assert (out.double() - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max())
    poisoned = kv.clone()
    poisoned[1, 0, :, :, 0], poisoned[1, 1, :, :, 0] = 100.0, 1e4
    assert torch.equal(module.attention_f32(q, poisoned, 1, span, allowed, scale),
                       module.attention_f32(q, kv, 1, span, allowed, scale))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = module.attention_f32(q, kv, 1, span, allowed, scale)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, module.attention_f32(q, kv, 1, span, allowed, scale))


@pytest.mark.parametrize("committed", [70, 600])
def test_avx2_attention_over_scattered_slots_equals_the_same_slots_packed(committed):
    """A tree token sees its ancestors at scattered slots; after a commit they sit one after another. The
    output for a masked query is bit-identical to the unmasked attention over its visible slots packed
    in order, so greedy speculative decoding emits what plain decoding does; also over 600 committed
    slots, which the kernel attends in several runs merged afterwards."""
    module = avx2()
    heads, kv_heads, span, dim = 9, 3, committed + 21, 64
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, heads, dim, generator=g)
    keys, values = torch.randn(1, kv_heads, span, dim, generator=g), torch.randn(1, kv_heads, span, dim, generator=g)
    allowed = torch.zeros(1, 1, 4, span, dtype=torch.bool)
    allowed[..., :committed] = True
    for row, tail in enumerate([[0], [0, 2], [0, 2, 7], [0, 5, 13, 20]]):
        allowed[0, 0, row, [committed + t for t in tail]] = True
    out = module.attention_f32(q, cache_with(keys, values), 1, span, allowed, dim ** -0.5)
    for row in range(4):
        visible = allowed[0, 0, row].nonzero().view(-1)
        packed_kv = cache_with(keys[:, :, visible], values[:, :, visible])
        packed = module.attention_f32(q[:, row: row + 1].contiguous(), packed_kv, 1, len(visible),
                                      torch.empty(0, dtype=torch.bool), dim ** -0.5)
        assert torch.equal(out[:, row: row + 1], packed), row


@pytest.mark.parametrize("rows,dim", [(1, 576), (8, 576), (3, 64), (5, 1536)])
def test_avx2_rms_norm_equals_the_pytorch_norm(rows, dim):
    module = avx2()
    g = torch.Generator().manual_seed(rows * dim)
    x, weight = torch.randn(2, rows, dim, generator=g) * 3, torch.rand(dim, generator=g) + 0.5
    out = module.rms_norm_f32(x, weight, 1e-5)
    expected = F.rms_norm(x.double(), (dim,), weight.double(), 1e-5)
    assert out.shape == x.shape and (out.double() - expected).abs().max() <= 1e-6 * expected.abs().max()


@pytest.mark.parametrize("batch,n,heads,kv_heads,dim", [(1, 1, 9, 3, 64), (2, 6, 9, 3, 64), (2, 3, 12, 2, 128)])
def test_avx2_rope_store_equals_the_tensor_version(batch, n, heads, kv_heads, dim):
    """q comes back rotated, k rotated and v as is land in each row's slots of the layer, and nothing else
    of the cache changes; the rotation is the native loop's tensor version to float32 rounding."""
    module = avx2()
    g = torch.Generator().manual_seed(n * dim)
    qkv = torch.randn(batch, n, (heads + 2 * kv_heads) * dim, generator=g)
    angles = torch.rand(batch, n, dim // 2, generator=g) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    cos, signed_sin = signed_rotary(cos, sin)
    kv = torch.randn(3, 2, batch, kv_heads, 16, dim, generator=g)
    before = kv.clone()
    starts = [4 + 2 * b for b in range(batch)]
    q = module.rope_store_f32(qkv, cos, signed_sin, kv, 1, starts, heads, kv_heads)
    heads_all = qkv.view(batch, n, heads + 2 * kv_heads, dim)
    qk = heads_all[:, :, : heads + kv_heads]
    rotated = qk * cos.unsqueeze(2) + qk.roll(dim // 2, dims=-1) * signed_sin.unsqueeze(2)
    assert q.shape == (batch, n, heads, dim)
    assert (q - rotated[:, :, :heads]).abs().max() <= 1e-6 * rotated.abs().max()
    expected = before.clone()
    for b, s in enumerate(starts):
        expected[1, 0, b, :, s: s + n] = rotated[b, :, heads:].transpose(0, 1)
        expected[1, 1, b, :, s: s + n] = heads_all[b, :, heads + kv_heads:].transpose(0, 1)
    assert (kv - expected).abs().max() <= 1e-6 * rotated.abs().max()
    changed = (kv != before).any(-1)
    for b, s in enumerate(starts):
        changed[1, :, b, :, s: s + n] = False
    assert not bool(changed.any())
    with pytest.raises(RuntimeError, match="beyond the cache"):
        module.rope_store_f32(qkv, cos, signed_sin, kv, 1, [17 - n] * batch, heads, kv_heads)


def test_avx2_silu_mul_equals_the_tensor_version():
    module = avx2()
    gate_up = torch.randn(5, 2 * 1536, generator=torch.Generator().manual_seed(1)) * 6
    gate_up[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -90.0])
    gate, up = gate_up.double().chunk(2, -1)
    expected = F.silu(gate) * up
    assert (module.silu_mul_f32(gate_up).double() - expected).abs().max() <= 1e-6 * expected.abs().max()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_native_float32_forward_with_our_kernels_matches_torch_kernels(kind):
    """A tiny float32 model behind the native backend with our AVX2 layer kernels and with torch's:
    prefill, decode steps of two rows at different lengths and a tree give the same logits to float32
    precision, and the cache holds the same keys and values."""
    avx2()
    ours = NativeTarget(tiny_model(kind), name="ours", pack_weights=False)
    torch_ = NativeTarget(tiny_model(kind), name="torch", pack_weights=False, attention_kernel="torch")
    assert ours.attention_kernel == "ours" and ours._avx2 is not None and torch_._avx2 is None
    prompts = torch.tensor([[5, 17, 3, 42, 8, 61, 29, 11, 70, 2], [9, 4, 13, 50, 7, 22, 1, 0, 0, 0]])
    causal = torch.ones(10, 10, dtype=torch.bool).tril().expand(2, 10, 10)
    tree_mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool).expand(2, 4, 4)
    results = []
    for target in (ours, torch_):
        cache, outputs = target.new_cache(2), []
        outputs.append(target.forward(prompts, torch.arange(10).expand(2, 10), causal, cache).logits)
        target.commit(cache, torch.arange(10).expand(2, 10), torch.tensor([10, 7]))
        for step in range(2):
            out = target.forward(torch.tensor([[4 + step, 9, 23, 40], [31, 2, 6, 44]]),
                                 cache.lengths.view(2, 1) + torch.tensor([[0, 1, 1, 2]]), tree_mask, cache)
            outputs.append(out.logits)
            target.commit(cache, torch.tensor([[0, 2, 3], [0, 1, 0]]), torch.tensor([3, 2]))
            outputs.append(target.forward(torch.tensor([[7], [19]]), cache.lengths.view(2, 1),
                                          torch.ones(2, 1, 1, dtype=torch.bool), cache).logits)
            target.commit(cache, torch.zeros(2, 1, dtype=torch.long), torch.tensor([1, 1]))
        results.append((torch.cat([o.flatten() for o in outputs]), cache.kv[..., : int(cache.lengths.max()), :]))
    (a, kv_a), (b, kv_b) = results
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    assert (kv_a - kv_b).abs().max() <= 1e-5 * kv_b.abs().max()


@pytest.mark.slow
def test_float32_speculative_decoding_equals_plain_decoding_with_our_avx2_kernels():
    """The embedded model in float32 with its 4-bit weights on our AVX2 kernels (the default where AVX-512
    BF16 is missing): greedy ReDrafter with the shipped drafter gives plain decoding's tokens on
    MT-Bench questions, with trees really verified."""
    avx2()
    from redrafter import Engine, FinishEvent, GenerationConfig, ReDrafterProposer
    from redrafter.bench.workloads import mt_bench
    from redrafter.cli import encode_prompt, stop_token_ids
    from redrafter.drafter.model import load_drafter, recommended_beam
    from redrafter.models.loading import load_target, shipped_drafter

    target, tokenizer = load_target("smollm2-135m-instruct", dtype="float32", weights="int4", int4_kernel="avx2")
    assert target.int4_kernels == ["avx2"] and target._decoder_f32 is not None
    config = GenerationConfig(max_new_tokens=64, stop_token_ids=stop_token_ids(tokenizer, target))
    drafter_dir = shipped_drafter("smollm2-135m-instruct")
    proposer = ReDrafterProposer(load_drafter(drafter_dir), target, recommended_beam(drafter_dir, "int4:avx2"))
    questions = {q.id: q.turns[0] for q in mt_bench()}
    prompts = [encode_prompt(tokenizer, questions[f"mt-bench/{n}"], chat_template=True) for n in (151, 81, 101)]

    def finished(engine):
        return sorted((e for e in engine.generate(prompts, config) if isinstance(e, FinishEvent)), key=lambda e: e.row)

    plain, fast = finished(Engine(target)), finished(Engine(target, proposer))
    assert [e.token_ids for e in fast] == [e.token_ids for e in plain]
    assert all(len(e.token_ids) >= 32 for e in plain)
    assert all(e.stats.tokens_per_step > 1.2 for e in fast)


def test_avx2_switches_turn_off_what_they_name(monkeypatch):
    """REDRAFTER_ATTENTION_KERNEL=torch turns off our float32 layer kernels (attention, rotary, RMSNorm,
    SiLU) but not the 4-bit products; REDRAFTER_INT4_KERNEL=torch the products but not the layer
    kernels; --int4-kernel torch in float32 keeps --weights auto dense (torch's float32 int4 is slow)."""
    from redrafter.models import kernels
    from redrafter.models.loading import auto_weights

    avx2()
    monkeypatch.setenv("REDRAFTER_ATTENTION_KERNEL", "torch")
    assert kernels.avx2_layers() is None and kernels.avx2() is not None
    target = NativeTarget(tiny_model("llama"), name="tiny", pack_weights=False)
    assert target._avx2 is None and target.attention_kernel == "torch"
    monkeypatch.setenv("REDRAFTER_ATTENTION_KERNEL", "auto")
    monkeypatch.setenv("REDRAFTER_INT4_KERNEL", "torch")
    assert kernels.avx2() is None and kernels.avx2_layers() is not None
    assert auto_weights("smollm2-135m-instruct", "auto", torch.float32, "cpu") == "dense"
    monkeypatch.setenv("REDRAFTER_INT4_KERNEL", "auto")
    assert auto_weights("smollm2-135m-instruct", "auto", torch.float32, "cpu") == "int4"
    assert auto_weights("smollm2-135m-instruct", "auto", torch.float32, "cpu", "torch") == "dense"
    assert auto_weights("smollm2-135m-instruct", "hf", torch.float32, "cpu") == "dense"
