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
    """"ours" is refused for float32 models and where the kernel cannot run, naming the reason; "auto"
    then falls back to torch's; an unknown name is an error."""
    attention_kernel()
    with pytest.raises(RedrafterError, match="bfloat16 models"):
        NativeTarget(tiny_model("llama"), name="tiny", attention_kernel="ours")
    assert NativeTarget(tiny_model("llama"), name="tiny").attention_kernel == "torch"  # float32: torch's
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
