"""Both target backends (transformers and native): tree verification equals sequential decoding of the
plain transformers model; commit keeps exactly the accepted path."""

import pytest
import torch
from transformers import DynamicCache

from helpers import BACKENDS, TINY_VOCAB, cache_layer, tiny_target
from redrafter.tree import NO_TOKEN, pack, unpack


def sequential(model, tokens: list[int]):
    """Independent reference: feed tokens one at a time through the plain model with its own cache.
    Returns logits (len, V)."""
    cache, logits = DynamicCache(config=model.config), []
    with torch.no_grad():
        for token in tokens:
            out = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)
            logits.append(out.logits[0, -1])
    return torch.stack(logits)


def prefill(target, prompts):
    batch, width = len(prompts), max(len(p) for p in prompts)
    tokens = torch.zeros(batch, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    positions = torch.arange(width).expand(batch, width)
    cache = target.new_cache(batch)
    out = target.forward(tokens, positions, torch.ones(width, width, dtype=torch.bool).tril().expand(batch, -1, -1), cache)
    target.commit(cache, positions, torch.tensor([len(p) for p in prompts]))
    return cache, out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_prefill_logits_equal_sequential_with_ragged_batch(kind, backend):
    target = tiny_target(kind, backend)
    prompts = [[3, 1, 4, 1, 5, 9, 2], [6, 5, 3]]
    _, out = prefill(target, prompts)
    # Each row's last token alone (the engine's prefill): only those rows go through the LM head.
    rows, last = torch.arange(2), torch.tensor([len(p) - 1 for p in prompts])
    lasts = out.logits_at(rows, last)
    assert lasts.shape == (2, TINY_VOCAB) and "logits" not in out.__dict__
    for i, p in enumerate(prompts):
        torch.testing.assert_close(out.logits[i, : len(p)], sequential(target.model, p), atol=1e-4, rtol=0)
        torch.testing.assert_close(lasts[i], out.logits[i, len(p) - 1], atol=1e-5, rtol=0)
    assert torch.equal(out.logits_at(rows, last), out.logits[rows, last])  # read from the full logits now


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_tree_logits_equal_sequential_then_commit(kind, backend):
    target = tiny_target(kind, backend)
    prompts = [[3, 1, 4, 1, 5, 9, 2], [6, 5, 3]]
    cache, _ = prefill(target, prompts)
    generator = torch.Generator().manual_seed(1)
    beams = torch.randint(0, TINY_VOCAB, (2, 4, 5), generator=generator)
    beams[:, :, 0] = beams[:, :1, 0]
    beams[:, 1, :3] = beams[:, 0, :3]  # shared prefixes exercise deduplication
    beams[:, 3] = beams[:, 2]
    tree = pack(beams)
    assert int(tree.lengths.max()) < 4 * 5
    out = target.forward(tree.tokens, cache.lengths.view(2, 1) + tree.depths, tree.mask, cache)
    tree_logits = unpack(out.logits, tree.unpacker)  # (batch, W, L, V)
    for b, p in enumerate(prompts):
        for i in range(4):
            reference = sequential(target.model, p + beams[b, i].tolist())[len(p):]
            torch.testing.assert_close(tree_logits[b, i], reference, atol=1e-4, rtol=0)

    # Commit: row 0 keeps 3 tokens of beam 1, row 1 keeps 2 tokens of beam 2; then decode one more.
    chosen, counts = [1, 2], [3, 2]
    keep = tree.unpacker[torch.arange(2), torch.tensor(chosen)]
    target.commit(cache, keep, torch.tensor(counts))
    paths = [prompts[b] + beams[b, chosen[b], : counts[b]].tolist() for b in range(2)]
    assert cache.lengths.tolist() == [len(p) for p in paths]
    nxt = torch.tensor([[7], [8]])
    out = target.forward(nxt, cache.lengths.view(2, 1), torch.ones(2, 1, 1, dtype=torch.bool), cache)
    for b in range(2):
        reference = sequential(target.model, paths[b] + [int(nxt[b])])[-1]
        torch.testing.assert_close(out.logits[b, 0], reference, atol=1e-4, rtol=0)


def assert_cache_is_plain_decoding(target, cache, path: list[int]) -> None:
    """The one-row cache holds exactly the keys and values of the plain model run over ``path``."""
    plain = DynamicCache(config=target.model.config)
    with torch.no_grad():
        target.model(input_ids=torch.tensor([path]), cache=plain, use_cache=True)
    assert cache.lengths.tolist() == [len(path)]
    for layer, theirs in enumerate(plain.layers):
        keys, values = cache_layer(cache, layer)
        torch.testing.assert_close(keys[:, :, : len(path)], theirs.keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(values[:, :, : len(path)], theirs.values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_compacted_cache_equals_plain_cache(kind, backend):
    """After any accept pattern, the committed cache equals the cache of plain decoding of the same tokens."""
    target = tiny_target(kind, backend)
    prompt = [2, 7, 1, 8]
    cache, _ = prefill(target, [prompt])
    path = list(prompt)
    generator = torch.Generator().manual_seed(2)
    for count in [1, 4, 2, 3]:
        beams = torch.randint(0, TINY_VOCAB, (1, 3, 4), generator=generator)
        beams[:, :, 0] = beams[:, :1, 0]
        tree = pack(beams)
        target.forward(tree.tokens, cache.lengths.view(1, 1) + tree.depths, tree.mask, cache)
        beam = int(torch.randint(0, 3, (1,), generator=generator))
        target.commit(cache, tree.unpacker[:, beam], torch.tensor([count]))
        path += beams[0, beam, :count].tolist()
    assert_cache_is_plain_decoding(target, cache, path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_capped_tree_commit_at_the_end_of_the_cache(backend):
    """A capped tree can hold fewer tokens than its beams have positions; committing a branch of it
    when the row fills the cache up to its last slot moves exactly the kept tokens (no slot past the
    forward's tokens is touched), and the cache equals plain decoding of the same tokens."""
    target = tiny_target("llama", backend)
    capacity = 16
    prompt = list(range(1, capacity - 2))  # 13 tokens: the 3-token tree fills slots 13..15
    cache = target.new_cache(1, capacity) if backend.startswith("native") else target.new_cache(1)
    positions = torch.arange(len(prompt)).view(1, -1)
    target.forward(torch.tensor([prompt]), positions, torch.ones(len(prompt), len(prompt), dtype=torch.bool).tril()[None], cache)
    target.commit(cache, positions, torch.tensor([len(prompt)]))
    beams = torch.tensor([[[5, 6, NO_TOKEN, NO_TOKEN, NO_TOKEN], [5, 7, NO_TOKEN, NO_TOKEN, NO_TOKEN]]])  # W=2, L=5, 3 nodes
    tree = pack(beams)
    assert tree.tokens.tolist() == [[5, 6, 7]]
    target.forward(tree.tokens, cache.lengths.view(1, 1) + tree.depths, tree.mask, cache)
    target.commit(cache, tree.unpacker[:, 1], torch.tensor([2]))  # keep g0 and the second branch
    path = prompt + [5, 7]
    assert_cache_is_plain_decoding(target, cache, path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_state_is_final_norm_output(backend):
    target = tiny_target("llama", backend)
    cache, out = prefill(target, [[1, 2, 3]])
    with torch.no_grad():
        reference = target.model(input_ids=torch.tensor([[1, 2, 3]]))
        # The hidden state is the LM head's input: projecting it gives the model's own logits.
        torch.testing.assert_close(target.model.get_output_embeddings()(out.hidden), reference.logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("native_backend,compile", [("native", False), ("native-plain", False), ("native-plain", True)],
                         ids=["packed", "plain", "compiled"])
def test_native_cache_grows_and_matches_transformers_backend_on_a_ragged_batch(native_backend, compile):
    """Native and transformers backends give the same logits step by step on a ragged batch, with the
    native cache starting too small (it must grow while keeping what it holds); with oneDNN-packed
    weights, plain ones, and the native forward under torch.compile (dynamic shapes: every step has a
    new context length)."""
    native, hf = tiny_target("qwen2", native_backend, compile=compile), tiny_target("qwen2", "hf")
    prompts = [[5, 4, 3, 2, 1, 9, 9, 9], [8], [7, 7, 2]]
    caches = {"native": native.new_cache(3, capacity=2), "hf": hf.new_cache(3)}
    outs = {}
    for name, target in (("native", native), ("hf", hf)):
        width = 8
        tokens = torch.zeros(3, width, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.tensor(p)
        positions = torch.arange(width).expand(3, width)
        outs[name] = [target.forward(tokens, positions, torch.ones(width, width, dtype=torch.bool).tril().expand(3, -1, -1),
                                     caches[name])]
        target.commit(caches[name], positions, torch.tensor([len(p) for p in prompts]))
    generator = torch.Generator().manual_seed(4)
    for step in range(6):
        beams = torch.randint(0, TINY_VOCAB, (3, 3, 4), generator=generator)
        beams[:, :, 0] = beams[:, :1, 0]
        tree = pack(beams)
        choice = torch.randint(0, 3, (3,), generator=generator)
        counts = torch.randint(1, 5, (3,), generator=generator)
        for name, target in (("native", native), ("hf", hf)):
            cache = caches[name]
            outs[name].append(target.forward(tree.tokens, cache.lengths.view(3, 1) + tree.depths, tree.mask, cache))
            target.commit(cache, tree.unpacker[torch.arange(3), choice], counts)
    assert caches["native"].capacity > 2
    assert caches["native"].lengths.tolist() == caches["hf"].lengths.tolist()
    for a, b in zip(outs["native"], outs["hf"]):
        torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(a.hidden, b.hidden, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_released_transformers_weights_leave_the_packed_native_model_unchanged(kind):
    """``release_transformers_weights`` frees the plain copy of every packed linear weight (what a
    server keeps is the packed one); logits before and after are identical."""
    target = tiny_target(kind, "native")
    prompt = [[3, 1, 4, 1, 5, 9, 2, 6]]
    _, before = prefill(target, prompt)
    layer_bytes = sum(p.numel() * p.element_size() for name, p in target.model.named_parameters()
                      if name.endswith("proj.weight") or name == "lm_head.weight")
    assert target.release_transformers_weights() == layer_bytes
    assert target.model is None
    assert all(linear.weight is None for layer in target.layers
               for linear in (layer.qkv, layer.o, layer.gate_up, layer.down))
    _, after = prefill(target, prompt)
    assert torch.equal(before.logits, after.logits)
    assert target.release_transformers_weights() == 0  # nothing left to free


@pytest.mark.parametrize("native_backend", ["native", "native-plain"])
def test_plain_decoding_of_an_equal_length_batch_matches_transformers(native_backend):
    """One new token per row with all rows at the same length runs attention without a mask (nothing
    is masked); it must match the transformers backend step by step."""
    native, hf = tiny_target("llama", native_backend), tiny_target("llama", "hf")
    prompts = [[5, 4, 3, 2], [8, 1, 1, 7]]
    (native_cache, native_out), (hf_cache, hf_out) = prefill(native, prompts), prefill(hf, prompts)
    for step in range(4):
        torch.testing.assert_close(native_out.logits[:, -1], hf_out.logits[:, -1], atol=1e-4, rtol=0)
        tokens = hf_out.logits[:, -1].argmax(-1, keepdim=True)
        outs = []
        for target, cache in ((native, native_cache), (hf, hf_cache)):
            out = target.forward(tokens, cache.lengths.view(2, 1), torch.ones(2, 1, 1, dtype=torch.bool), cache)
            target.commit(cache, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, dtype=torch.long))
            outs.append(out)
        native_out, hf_out = outs
    torch.testing.assert_close(native_out.logits, hf_out.logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_selected_rows_continue_as_their_own_batch(backend):
    """After ``select_rows`` (finished rows leave), the kept rows' next forward gives the logits a
    batch of only those prompts gives, in the new order."""
    target = tiny_target("llama", backend)
    prompts = [[3, 1, 4, 1, 5, 9, 2], [6, 5, 3], [8, 8, 1, 2, 7]]
    cache, _ = prefill(target, prompts)
    target.select_rows(cache, torch.tensor([2, 0]))
    assert cache.lengths.tolist() == [5, 7]
    alone, _ = prefill(target, [prompts[2], prompts[0]])
    tokens, mask = torch.tensor([[4, 2], [1, 6]]), torch.ones(2, 2, dtype=torch.bool).tril().expand(2, -1, -1)
    positions = cache.lengths.view(2, 1) + torch.arange(2)
    selected = target.forward(tokens, positions, mask, cache)
    reference = target.forward(tokens, positions, mask, alone)
    torch.testing.assert_close(selected.logits, reference.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("masked", [False, True])
def test_grouped_attention_equals_the_fused_kernel(dtype, tolerance, masked):
    from redrafter.models.native import grouped_attention

    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, n, span, dim = 3, 6, 2, 4, 11, 8
    q = torch.randn(batch, heads, n, dim, generator=generator).to(dtype)
    k = torch.randn(batch, kv_heads, span, dim, generator=generator).to(dtype)
    v = torch.randn(batch, kv_heads, span, dim, generator=generator).to(dtype)
    allowed = None
    if masked:
        allowed = torch.rand(batch, 1, n, span, generator=generator) > 0.4
        allowed[..., 0] = True  # every query sees at least one slot
    reference = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=allowed,
                                                                 enable_gqa=True)
    torch.testing.assert_close(grouped_attention(q, k, v, allowed).float(), reference, atol=tolerance, rtol=0)


def test_native_forward_with_grouped_attention_matches_transformers(monkeypatch):
    """The native forward with the grouped attention path forced on (it is chosen for bf16 batches)
    still matches the transformers backend on a ragged prefill plus a tree step."""
    import redrafter.models.native as native_module

    monkeypatch.setattr(native_module, "use_grouped_attention", lambda *args, **kwargs: True)
    native, hf = tiny_target("qwen2", "native"), tiny_target("qwen2", "hf")
    prompts = [[5, 4, 3, 2, 1, 9], [8, 2]]
    (native_cache, native_out), (hf_cache, hf_out) = prefill(native, prompts), prefill(hf, prompts)
    torch.testing.assert_close(native_out.logits, hf_out.logits, atol=1e-4, rtol=0)
    beams = torch.tensor([[[1, 2, 3], [1, 4, 5]], [[7, 7, 7], [7, 6, 5]]])
    tree = pack(beams)
    outs = [target.forward(tree.tokens, cache.lengths.view(2, 1) + tree.depths, tree.mask, cache)
            for target, cache in ((native, native_cache), (hf, hf_cache))]
    torch.testing.assert_close(outs[0].logits, outs[1].logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("prompts", [[[5, 4, 3, 2, 1, 9, 7]], [[5, 4, 3, 2, 1, 9], [8, 2]]], ids=["one-row", "ragged"])
def test_plain_decoding_cache_of_a_bf16_model_is_float32_and_decodes_like_the_bf16_cache(prompts):
    """A bf16 model's plain-decoding cache on CPU is float32 (attention in float32 over the model's own
    bf16 k and v): prefill and decode steps give the bf16 cache's logits up to bf16 rounding, on the
    fused (one row) and the grouped (several rows) attention paths."""
    from helpers import tiny_model
    from redrafter.models.native import NativeTarget

    target = NativeTarget(tiny_model("qwen2").to(torch.bfloat16), name="tiny-qwen2", pack_weights=False,
                          attention_kernel="torch")  # ours keeps a bf16 cache (tests/test_cpu_kernels.py)
    batch, width = len(prompts), max(len(p) for p in prompts)
    tokens = torch.zeros(batch, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    positions = torch.arange(width).expand(batch, width)
    causal = torch.ones(width, width, dtype=torch.bool).tril().expand(batch, -1, -1)
    lengths = torch.tensor([len(p) for p in prompts])
    caches = {plain: target.new_cache(batch, plain_decoding=plain) for plain in (False, True)}
    assert caches[True].kv.dtype == torch.float32 and caches[False].kv.dtype == torch.bfloat16
    logits = {}
    for plain, cache in caches.items():
        out = target.forward(tokens, positions, causal, cache)
        target.commit(cache, positions, lengths)
        steps = [out.logits[torch.arange(batch), lengths - 1].float()]
        next_token = steps[0].argmax(-1)
        for _ in range(4):  # both caches decode the same tokens (the bf16 cache's choices)
            out = target.forward(next_token.view(batch, 1), cache.lengths.view(batch, 1),
                                 torch.ones(batch, 1, 1, dtype=torch.bool), cache)
            target.commit(cache, cache.lengths.view(batch, 1) * 0, torch.ones(batch, dtype=torch.long))
            steps.append(out.logits[:, 0].float())
            next_token = torch.tensor([3, 6][:batch])
        logits[plain] = torch.stack(steps)
    scale = logits[False].abs().max()
    assert (logits[True] - logits[False]).abs().max() <= 0.02 * scale
    for layer in range(target.num_layers):  # the float32 cache holds the bf16 values exactly
        for held in cache_layer(caches[True], layer):
            held = held[:, :, : int(lengths.max())]
            assert torch.equal(held.bfloat16().float(), held)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_rotary_table_equals_the_models_rotary_embedding(kind, dtype):
    """The native backend's table of cos and signed sin (grown past its first 1,024 positions) gives
    exactly what the model's rotary embedding computes at the same positions."""
    from helpers import tiny_model
    from redrafter.models.native import ROTARY_TABLE_MIN, NativeTarget, signed_rotary

    target = NativeTarget(tiny_model(kind).to(dtype), name="tiny")
    x = torch.zeros(2, 3, 64, dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    for high in (300, ROTARY_TABLE_MIN + 500, 4000):
        positions = torch.randint(0, high, (2, 3), generator=generator)
        cos, signed_sin = target._rotary(x, positions, high)
        want_cos, want_sin = signed_rotary(*target.rotary(x, positions))
        assert cos.dtype == dtype and torch.equal(cos, want_cos) and torch.equal(signed_sin, want_sin)
    assert target._rotary_table[0].shape[0] >= 4000
