"""Our CPU kernels besides int4 (tests/test_int4.py): the tree-attention kernel
(csrc/tree_attention.cpp) against a float64 reference, the native backend with it against the same
backend on torch's attention, and the bf16 RMSNorm (csrc/rms_norm.cpp) against PyTorch's."""

from __future__ import annotations

import pytest
import torch

from helpers import require_kernels, tiny_model
from redrafter.errors import RedrafterError
from redrafter.models import kernels
from redrafter.models.native import NativeTarget
from redrafter.tree import pack


def attention_kernel():
    return require_kernels("attention").tree_attention


def reference(q, keys, values, allowed, scale):
    """softmax(scale q k^T + mask) v in float64 with each key/value head repeated for its query heads,
    as (batch, n, heads, head_dim)."""
    group = q.shape[1] // keys.shape[1]
    k, v = keys.double().repeat_interleave(group, 1), values.double().repeat_interleave(group, 1)
    scores = q.double() @ k.transpose(-1, -2) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


SHAPES = [  # batch, heads, kv_heads, n, span, head_dim
    (1, 9, 3, 8, 300, 64),  # SmolLM2-135M verifying 8 tree tokens
    (1, 9, 3, 1, 17, 64),  # one token, a span shorter than one block of 16 keys
    (2, 12, 2, 5, 77, 128),
    (3, 4, 4, 3, 40, 32),  # no grouping
    (2, 4, 1, 7, 33, 80),  # an odd number of 16-value chunks
    (1, 4, 2, 2, 16, 16),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_kernel_equals_a_float64_reference(dtype, shape):
    """For masked and unmasked steps, with q strided as the native forward passes it (a slice of the
    q|k heads, transposed) and keys/values a prefix of a longer cache: the output equals the float64
    attention within the output's rounding (bf16: 2^-8 of the largest value; float32: 1e-5), masked
    slots get no weight, and the result does not depend on the thread count."""
    tree_attention = attention_kernel()
    batch, heads, kv_heads, n, span, dim = shape
    g = torch.Generator().manual_seed(sum(shape))
    q = torch.randn(batch, n, heads + kv_heads, dim, generator=g).to(dtype).transpose(1, 2)[:, :heads]
    keys = torch.randn(batch, kv_heads, span + 20, dim, generator=g).to(dtype)[:, :, :span]
    values = torch.randn(batch, kv_heads, span + 20, dim, generator=g).to(dtype)[:, :, :span]
    allowed = torch.rand(batch, n, span, generator=g) < 0.6
    allowed[:, :, -1] = True  # every query sees a slot
    allowed[:, :, 0] = False  # and none sees the first
    scale = dim ** -0.5
    tolerance = 2.0 ** -8 if dtype == torch.bfloat16 else 1e-5
    for mask in (allowed, None):
        out = tree_attention(q, keys, values, torch.empty(0, dtype=torch.bool) if mask is None else mask, scale)
        assert out.dtype == dtype and out.shape == (batch, n, heads, dim) and out.is_contiguous()
        expected = reference(q, keys, values, mask, scale)
        assert (out.double() - expected).abs().max() <= tolerance * max(1.0, expected.abs().max())
    # A masked slot gets no weight: a huge key and value there change nothing.
    poisoned_keys, poisoned_values = keys.clone(), values.clone()
    poisoned_keys[:, :, 0], poisoned_values[:, :, 0] = 100.0, 1e4
    assert torch.equal(tree_attention(q, poisoned_keys, poisoned_values, allowed, scale),
                       tree_attention(q, keys, values, allowed, scale))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = tree_attention(q, keys, values, allowed, scale)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, tree_attention(q, keys, values, allowed, scale))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_over_scattered_slots_equals_attention_over_the_same_slots_packed(dtype):
    """A tree token sees its ancestors at scattered slots; after a commit the same keys sit one after
    another. The kernel's output for a masked row is bit-identical to the unmasked attention over just
    its visible slots, packed in order, so greedy speculative decoding emits what plain decoding does."""
    tree_attention = attention_kernel()
    heads, kv_heads, span, dim = 9, 3, 91, 64
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, heads, 4, dim, generator=g).to(dtype)
    keys = torch.randn(1, kv_heads, span, dim, generator=g).to(dtype)
    values = torch.randn(1, kv_heads, span, dim, generator=g).to(dtype)
    allowed = torch.zeros(1, 4, span, dtype=torch.bool)
    allowed[:, :, :70] = True  # the committed context
    for row, tail in enumerate([[70], [70, 72], [70, 72, 77], [70, 75, 83, 90]]):  # ancestors and itself
        allowed[0, row, tail] = True
    out = tree_attention(q, keys, values, allowed, dim ** -0.5)
    for row in range(4):
        visible = allowed[0, row].nonzero().view(-1)
        packed = tree_attention(q[:, :, row: row + 1], keys[:, :, visible], values[:, :, visible],
                                torch.empty(0, dtype=torch.bool), dim ** -0.5)
        assert torch.equal(out[:, row: row + 1], packed), row


def test_attention_kernel_rejects_what_it_cannot_run():
    tree_attention = attention_kernel()
    q = torch.randn(1, 4, 2, 64).bfloat16()
    keys = torch.randn(1, 2, 10, 64).bfloat16()
    with pytest.raises(RuntimeError, match="all bfloat16 or all float32"):
        tree_attention(q, keys.float(), keys.float(), torch.empty(0, dtype=torch.bool), 0.125)
    with pytest.raises(RuntimeError, match="head_dim 24"):
        tree_attention(q[..., :24].contiguous(), keys[..., :24].contiguous(), keys[..., :24].contiguous(),
                       torch.empty(0, dtype=torch.bool), 0.125)
    with pytest.raises(RuntimeError, match="multiple of kv_heads"):
        tree_attention(q[:, :3], keys, keys, torch.empty(0, dtype=torch.bool), 0.125)
    with pytest.raises(RuntimeError, match="allowed"):
        tree_attention(q, keys, keys, torch.ones(1, 2, 9, dtype=torch.bool), 0.125)


def native_pair(kind: str = "qwen2"):
    """The same bf16 tiny model behind the native backend with our attention and with torch's."""
    model = tiny_model(kind).to(torch.bfloat16)
    ours = NativeTarget(model, name="tiny", pack_weights=False, attention_kernel="ours")
    torch_ = NativeTarget(tiny_model(kind).to(torch.bfloat16), name="tiny", pack_weights=False, attention_kernel="torch")
    assert ours.attention_kernel == "ours" and torch_.attention_kernel == "torch"
    return ours, torch_


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_native_forward_with_our_attention_matches_torch_attention(kind):
    """A ragged bf16 prefill, a tree step with a pending forward committed on an accept pattern, then
    plain steps: the logits of our attention equal those of torch's within bf16 noise, and the
    plain-decoding cache keeps the model's dtype (bf16) with ours."""
    attention_kernel()
    targets = native_pair(kind)
    prompts = [[5, 4, 3, 2, 1, 9], [8, 2]]
    logits = []
    for target in targets:
        steps = []
        tokens = torch.tensor([prompts[0], prompts[1] + [0] * 4])
        positions = torch.arange(6).expand(2, 6)
        cache = target.new_cache(2)
        out = target.forward(tokens, positions, torch.ones(6, 6, dtype=torch.bool).tril().expand(2, -1, -1), cache)
        target.commit(cache, positions, torch.tensor([6, 2]))
        steps.append(out.logits[0])
        tree = pack(torch.tensor([[[1, 2, 3], [1, 4, 5]], [[7, 7, 7], [7, 6, 5]]]))
        out = target.forward(tree.tokens, cache.lengths.view(2, 1) + tree.depths, tree.mask, cache)
        steps.append(out.logits.flatten(0, 1))
        target.commit(cache, torch.tensor([[0, 3, 4], [0, 1, 2]]), torch.tensor([3, 2]))
        for token in (3, 6):
            out = target.forward(torch.tensor([[token], [token]]), cache.lengths.view(2, 1),
                                 torch.ones(2, 1, 1, dtype=torch.bool), cache)
            target.commit(cache, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, dtype=torch.long))
            steps.append(out.logits[:, 0])
        logits.append(torch.cat(steps).float())
    plain = targets[0].new_cache(1, plain_decoding=True)
    assert plain.kv.dtype == torch.bfloat16 and targets[1].new_cache(1, plain_decoding=True).kv.dtype == torch.float32
    scale = logits[1].abs().max()
    assert (logits[0] - logits[1]).abs().max() <= 0.03 * scale


def test_attention_kernel_choice(monkeypatch):
    """"ours" is refused for float32 models our float32 kernels cannot run (a head size that is not a
    multiple of 16) and where the kernel cannot run, naming the reason; "auto" then falls back to
    torch's; float32 models they can run get ours (AVX2); an unknown name is an error."""
    from transformers import LlamaConfig, LlamaForCausalLM

    attention_kernel()
    odd = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=72, intermediate_size=128, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2)).eval()  # head size 18
    with pytest.raises(RedrafterError, match="bfloat16 models"):
        NativeTarget(odd, name="tiny", attention_kernel="ours")
    assert NativeTarget(odd, name="tiny").attention_kernel == "torch"
    float32 = "ours" if kernels.avx2_layers() is not None else "torch"
    assert NativeTarget(tiny_model("llama"), name="tiny").attention_kernel == float32  # head size 16
    with pytest.raises(RedrafterError, match="unknown attention kernel"):
        NativeTarget(tiny_model("llama").to(torch.bfloat16), name="tiny", attention_kernel="flash")
    monkeypatch.setenv("REDRAFTER_ATTENTION_KERNEL", "torch")
    assert kernels.attention() is None
    with pytest.raises(RedrafterError, match="cannot run here: REDRAFTER_ATTENTION_KERNEL=torch"):
        NativeTarget(tiny_model("llama").to(torch.bfloat16), name="tiny", attention_kernel="ours")
    assert NativeTarget(tiny_model("llama").to(torch.bfloat16), name="tiny").attention_kernel == "torch"


@pytest.mark.parametrize("rows,dim", [(1, 576), (8, 576), (300, 576), (3, 100), (5, 1536)])
def test_rms_norm_kernel_is_bit_identical_to_the_pytorch_norm(rows, dim):
    """Any row count (one thread for a few rows, all beyond 64) and a size that is not a multiple of
    16: every output equals ``native.rms_norm`` (transformers' arithmetic) bit for bit."""
    from redrafter.models.native import rms_norm

    attention_kernel()  # the same extension
    g = torch.Generator().manual_seed(rows * dim)
    x = (torch.randn(2, rows, dim, generator=g) * 3).bfloat16()
    weight = torch.randn(dim, generator=g).bfloat16()
    assert torch.equal(kernels.load().rms_norm_bf16(x, weight, 1e-5), rms_norm(x, weight, 1e-5))
    with pytest.raises(RuntimeError, match="bfloat16"):
        kernels.load().rms_norm_bf16(x.float(), weight, 1e-5)


@pytest.mark.parametrize("shape", [(576, 576), (48, 70), (8192, 64)])
def test_bf16_kernel_equals_an_exact_product_for_few_rows(shape):
    """Our bf16 product (csrc/bf16_gemm.cpp) through ``Linear(few_rows=True)``: for 1 to 13 rows (13:
    beyond its 8, oneDNN runs) the result equals the float64 product of the bf16 values within bf16
    output rounding, and the bias and the residual are added after it."""
    from redrafter.models.base import BF16_KERNEL_MAX_ROWS, Linear

    attention_kernel()  # the same extension
    out_features, in_features = shape
    g = torch.Generator().manual_seed(out_features + in_features)
    weight = torch.randn(out_features, in_features, generator=g).bfloat16()
    bias = torch.randn(out_features, generator=g).bfloat16()
    plain, linear = Linear(weight, pack=True, few_rows=True), Linear(weight, bias, pack=True, few_rows=True)
    assert linear.bf16 is not None and BF16_KERNEL_MAX_ROWS == 8
    for rows in (1, 2, 3, 4, 5, 8, 13):
        x = torch.randn(1, rows, in_features, generator=g).bfloat16()
        residual = torch.randn(1, rows, out_features, generator=g).bfloat16()
        y = plain(x)
        assert y.shape == (1, rows, out_features) and y.dtype == torch.bfloat16
        exact = x.double() @ weight.double().T
        assert bool(((y.double() - exact).abs() <= 2.0 ** -8 * exact.abs() + 1e-3).all()), rows
        if rows <= BF16_KERNEL_MAX_ROWS:  # the bias, then the residual, added in bf16
            assert torch.equal(linear(x, residual=residual), residual + (y + bias))
    assert Linear(weight.float(), pack=True, few_rows=True).bf16 is None  # float32: not ours
    assert Linear(weight[:40], pack=True, few_rows=True).bf16 is None  # 40 outputs: not a multiple of 16


def rotary_reference(qkv, cos, signed_sin, heads, kv_heads):
    """The native backend's tensor version: q, rotated k, v as (batch, n, heads, head_dim)."""
    batch, n, _ = qkv.shape
    dim = cos.shape[-1]
    qk = qkv[..., : (heads + kv_heads) * dim].view(batch, n, heads + kv_heads, dim)
    qk = torch.addcmul(qk * cos.unsqueeze(2), qk.roll(dim // 2, dims=-1), signed_sin.unsqueeze(2))
    return qk[:, :, :heads], qk[:, :, heads:], qkv[..., (heads + kv_heads) * dim:].view(batch, n, kv_heads, dim)


@pytest.mark.parametrize("batch,n,heads,kv_heads,dim", [(1, 1, 9, 3, 64), (2, 6, 9, 3, 64), (3, 70, 4, 2, 32),
                                                        (1, 5, 12, 2, 128)])
def test_rope_store_is_bit_identical_to_the_tensor_version(batch, n, heads, kv_heads, dim):
    """csrc/layer_ops.cpp: the rotated q it returns and the rotated k and plain v it writes at each
    row's slots (ragged starts, strided inputs, a prefill past 64 tokens that runs on all threads) equal
    the native backend's tensor operations bit for bit, and no other slot or layer of the cache changes."""
    module = require_kernels("attention")
    g = torch.Generator().manual_seed(batch * n * dim)
    width = (heads + 2 * kv_heads) * dim
    qkv = (torch.randn(batch, n, width + 8, generator=g) * 4).bfloat16()[..., 8:]  # a strided view
    angles = torch.randn(batch, n, dim, generator=g) * 3
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    signed_sin = torch.cat([-sin[..., : dim // 2], sin[..., dim // 2:]], dim=-1)
    layers, capacity = 3, n + 40
    kv = torch.randn(layers, 2, batch, kv_heads, capacity, dim, generator=g).bfloat16()
    before = kv.clone()
    starts = torch.tensor([7 * b + 1 for b in range(batch)])
    slots = starts.view(batch, 1) + torch.arange(n)
    q = module.rope_store(qkv, cos, signed_sin, kv, 1, slots, heads, kv_heads)
    q_ref, k_ref, v_ref = rotary_reference(qkv, cos, signed_sin, heads, kv_heads)
    assert q.shape == (batch, n, heads, dim) and q.is_contiguous() and torch.equal(q, q_ref)
    written = torch.zeros(capacity, dtype=torch.bool)
    for b in range(batch):
        assert torch.equal(kv[1, 0, b, :, slots[b]], k_ref[b].transpose(0, 1))
        assert torch.equal(kv[1, 1, b, :, slots[b]], v_ref[b].transpose(0, 1))
        untouched = ~written.index_fill(0, slots[b], True)
        assert torch.equal(kv[1, :, b, :, untouched], before[1, :, b, :, untouched])
    assert torch.equal(kv[0], before[0]) and torch.equal(kv[2], before[2])


def test_rope_store_and_cache_attention_reject_bad_input():
    """Slots outside the cache, wrong dtypes and shapes are errors naming the problem, not stray writes;
    ``cache_attention`` equals ``tree_attention`` on the same slots of the cache."""
    module = require_kernels("attention")
    qkv = torch.randn(1, 2, (4 + 2 * 2) * 16).bfloat16()
    cos = torch.randn(1, 2, 16).bfloat16()
    kv = torch.zeros(2, 2, 1, 2, 8, 16, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="outside the cache"):
        module.rope_store(qkv, cos, cos, kv, 0, torch.tensor([[7, 8]]), 4, 2)
    assert not bool(kv.any())
    with pytest.raises(RuntimeError, match="bfloat16"):
        module.rope_store(qkv.float(), cos, cos, kv, 0, torch.tensor([[0, 1]]), 4, 2)
    with pytest.raises(RuntimeError, match="heads"):
        module.rope_store(qkv, cos, cos, kv, 0, torch.tensor([[0, 1]]), 3, 2)
    with pytest.raises(RuntimeError, match="this layer"):
        module.rope_store(qkv, cos, cos, kv, 2, torch.tensor([[0, 1]]), 4, 2)
    kv = torch.randn(2, 2, 1, 2, 8, 16).bfloat16()
    q = torch.randn(1, 3, 4, 16).bfloat16()
    allowed = torch.rand(1, 3, 5) < 0.7
    allowed[..., 0] = True
    expected = module.tree_attention(q.transpose(1, 2), kv[1, 0, :, :, :5], kv[1, 1, :, :, :5], allowed, 0.25)
    assert torch.equal(module.cache_attention(q, kv, 1, 5, allowed, 0.25), expected)
    with pytest.raises(RuntimeError, match="span"):
        module.cache_attention(q, kv, 1, 9, allowed, 0.25)


@pytest.mark.parametrize("shape", [(1, 1, 3072), (2, 6, 3072), (3, 40)])
def test_silu_mul_matches_the_tensor_version(shape):
    """csrc/layer_ops.cpp's ``silu_mul`` against ``F.silu(gate) * up`` in bf16 (a 20-value tail past the
    vector width included): equal on all but a rare few values, and those within one bf16 step; its
    SiLU rounded to bf16 within half a bf16 step of float64's; large negative gates give 0, not NaN."""
    module = require_kernels("attention")
    g = torch.Generator().manual_seed(shape[-1])
    gate_up = (torch.randn(*shape, generator=g) * 4).bfloat16()
    gate_up.view(-1)[0] = -200.0  # exp(200) overflows float32: silu is -0
    out = module.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    assert out.shape == expected.shape and out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())
    differ = out != expected
    assert int(differ.sum()) <= max(1, expected.numel() // 1000)
    step = expected.float().abs() * 2.0 ** -7 + 1e-30
    assert bool(((out.float() - expected.float()).abs() <= step).all())
    # The float32 SiLU itself: up = 1 and ones in bf16 keep the product exact, so out = bf16(silu(g)).
    ones = torch.cat([gate, torch.ones_like(gate)], dim=-1).contiguous()
    exact = gate.double() / (1 + torch.exp(-gate.double()))
    assert bool(((module.silu_mul(ones).double() - exact).abs() <= exact.abs() * 2.0 ** -8 * (1 + 1e-5) + 1e-30).all())
    with pytest.raises(RuntimeError, match="bfloat16"):
        module.silu_mul(gate_up.float())
