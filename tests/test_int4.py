"""4-bit products for weights on a 4-bit grid (``models.int4``, ``--weights int4``): the grid is
recovered exactly, the kernel computes with exactly the dense weights in float32, the native backend
gives the dense backend's logits, and greedy decoding of the real Q4_1 model stays token-identical to
transformers' ``generate``."""

import pytest
import torch

from helpers import require_kernels, tiny_model
from redrafter.errors import RedrafterError
from redrafter.models.int4 import INT4_MAX_ROWS_AVX512, GROUP_SIZE, Int4GridError, Int4Weight, grid_4bit, pack_int4
from redrafter.models.native import NativeTarget, int4_layer_weights


def q4_1_weight(out_features: int, in_features: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 weight w = d * q + m per block of 32 inputs (d, m fp16 values as in GGUF's Q4_1),
    with some blocks on coarser grids (q even only, or q in 0..5) and one constant block. Returns
    (w, q)."""
    g = torch.Generator().manual_seed(seed)
    blocks = in_features // GROUP_SIZE
    q = torch.randint(0, 16, (out_features, blocks, GROUP_SIZE), generator=g)
    q[:, :, 0], q[:, :, 1] = 0, 15  # a Q4_1 quantizer maps each block's min and max to 0 and 15
    q[0, 0] = torch.randint(0, 8, (GROUP_SIZE,), generator=g) * 2  # levels 0, 2, ..., 14 only
    q[1 % out_features, 0] = torch.randint(0, 6, (GROUP_SIZE,), generator=g)
    q[2 % out_features, blocks - 1] = 7  # constant
    d = (torch.rand(out_features, blocks, 1, generator=g) * 0.02 + 0.001).half().float()
    m = (-torch.rand(out_features, blocks, 1, generator=g) * 0.1).half().float()
    return (d * q + m).view(out_features, in_features), q.view(out_features, in_features)


def test_grid_is_recovered_exactly_from_q4_1_weights():
    w, q = q4_1_weight(8, 96)
    found, step, low = grid_4bit(w)
    blocks = found.view(8, 3, GROUP_SIZE).float()
    rebuilt = (blocks * step.unsqueeze(-1) + low.unsqueeze(-1)).view_as(w)
    assert (rebuilt - w).abs().max() <= 1e-6 * w.abs().max()
    assert int(found.min()) >= 0 and int(found.max()) <= 15
    full = torch.ones(8, 3, dtype=torch.bool)  # blocks whose levels span 0..15 come back as the same q
    full[0, 0] = full[1, 0] = full[2, 2] = False
    assert torch.equal(found.view(8, 3, GROUP_SIZE)[full], q.view(8, 3, GROUP_SIZE)[full])


def test_weights_off_a_4bit_grid_are_rejected_by_name():
    with pytest.raises(Int4GridError, match="not on a 4-bit grid"):
        grid_4bit(torch.randn(4, 64))
    with pytest.raises(Int4GridError, match="not a multiple of the group size"):
        grid_4bit(torch.randn(4, 48))
    model = tiny_model("llama")  # random dense weights
    with pytest.raises(RedrafterError, match="no weight is 4-bit.*layer 0 qkv weight"):
        int4_layer_weights(model, torch.float32)
    snap_to_q4_1(model)  # a mix (as in GGUF's Q4_K_M): weights off the grid keep dense products
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.add_(torch.randn_like(model.model.layers[1].mlp.down_proj.weight) * 1e-3)
    layers = int4_layer_weights(model, torch.float32)
    assert [sorted(layer) for layer in layers] == [["down", "gate_up", "o", "qkv"], ["gate_up", "o", "qkv"]]
    target = NativeTarget(model, int4_layers=layers)
    assert target.int4_count == 7 and target.layers[1].down.int4 is None and target.layers[1].o.int4 is not None


def test_float32_int4_products_use_exactly_the_dense_weight():
    w, _ = q4_1_weight(64, 128, seed=1)
    packed = pack_int4(w, torch.float32)
    assert torch.equal(packed.dequantize(), w)
    x = torch.randn(3, 128)
    assert (packed(x) - x @ w.T).abs().max() <= 1e-5 * (x.abs() @ w.abs().T).max()


def snap_to_q4_1(model):
    """Round every decoder linear weight of ``model`` (float32) to a Q4_1 grid per 32 inputs, as a
    Q4_1 GGUF dequantized by transformers would hold it."""
    with torch.no_grad():
        for layer in model.model.layers:
            for linear in [*layer.self_attn.children(), *layer.mlp.children()]:
                if isinstance(linear, torch.nn.Linear):
                    w = linear.weight.view(linear.out_features, -1, GROUP_SIZE)
                    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
                    step = (high - low) / 15
                    linear.weight.copy_((((w - low) / step).round() * step + low).view_as(linear.weight))
    return model


PROMPT = torch.tensor([[5, 17, 3, 42, 8, 61, 29, 11, 70, 2, 33, 14]])  # one row of 12 tokens
TREE_MASK = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool).view(1, 4, 4)


def prefilled(target):
    """A one-row cache of ``target`` holding PROMPT, and the prefill's logits."""
    cache = target.new_cache(1)
    causal = torch.ones(12, 12, dtype=torch.bool).tril().view(1, 12, 12)
    logits = target.forward(PROMPT, torch.arange(12).view(1, 12), causal, cache).logits
    target.commit(cache, torch.arange(12).view(1, 12), torch.tensor([12]))
    return cache, logits


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_int4_gives_the_dense_backends_logits(kind, dtype, monkeypatch):
    """Prefill (dense products: more rows than int4_max_rows), decode steps and a 4-token tree (int4)
    on a tiny model with Q4_1-grid weights: logits equal the dense native backend's to float32
    precision (bf16: to bf16 rounding), and the int4 kernel really runs."""
    model = snap_to_q4_1(tiny_model(kind))
    int4 = int4_layer_weights(model, dtype)
    dense_target = NativeTarget(snap_to_q4_1(tiny_model(kind)).to(dtype), name="dense")  # the same seed
    int4_target = NativeTarget(model.to(dtype), name="int4", int4_layers=int4, int4_max_rows=8)
    calls = []
    original = Int4Weight.__call__
    monkeypatch.setattr(Int4Weight, "__call__", lambda self, x: calls.append(x.shape) or original(self, x))
    for attr in ("_decoder", "_decoder_f32"):  # all layers in one call (our kernels): 4 products per layer
        one_call = getattr(int4_target, attr)
        if one_call is not None:
            setattr(int4_target, attr,
                    lambda x, *args, run=one_call: calls.extend([x.shape] * 4 * len(args[1])) or run(x, *args))

    results = {}
    for name, target in (("dense", dense_target), ("int4", int4_target)):
        cache, logits = prefilled(target)
        steps = [logits]
        if name == "int4":
            assert not calls  # the prefill ran dense
        for token in (7, 19):
            steps.append(target.forward(torch.tensor([[token]]), cache.lengths.view(1, 1),
                                        torch.ones(1, 1, 1, dtype=torch.bool), cache).logits)
            target.commit(cache, torch.zeros(1, 1, dtype=torch.long), torch.tensor([1]))
        tree = torch.tensor([[4, 9, 23, 40]])
        positions = cache.lengths.view(1, 1) + torch.tensor([[0, 1, 1, 2]])
        steps.append(target.forward(tree, positions, TREE_MASK, cache).logits)
        target.commit(cache, torch.tensor([[0, 2, 3]]), torch.tensor([3]))
        steps.append(target.forward(torch.tensor([[1]]), cache.lengths.view(1, 1),
                                    torch.ones(1, 1, 1, dtype=torch.bool), cache).logits)
        results[name] = torch.cat([s.float().flatten() for s in steps])
    assert len(calls) == 4 * 2 * 4  # 4 products per layer, 2 layers, 4 int4 forwards
    scale = results["dense"].abs().max()
    tolerance = 1e-5 if dtype == torch.float32 else 0.03
    assert (results["int4"] - results["dense"]).abs().max() <= tolerance * scale


def snap_to_q6_k(weight: torch.Tensor) -> None:
    """Round a float32 weight in place to a symmetric 6-bit grid per 16 inputs, as a Q6_K weight is
    (q in -32..31, one scale per group)."""
    with torch.no_grad():
        w = weight.view(weight.shape[0], -1, 16)
        step = (w.abs().amax(-1, keepdim=True) / 32).half().float().clamp_min(1e-8)
        weight.copy_(((w / step).round().clamp(-32, 31) * step).view_as(weight))


def q4_k_m_mix(kind: str):
    """A tiny float32 model mixed as GGUF's Q4_K_M mixes Qwen2.5-Coder: 4-bit weights, but layer 0's
    v weight (inside the fused q|k|v), layer 1's MLP down weight and the LM head on a 6-bit (Q6_K) grid."""
    model = snap_to_q4_1(tiny_model(kind))
    snap_to_q6_k(model.model.layers[0].self_attn.v_proj.weight)
    snap_to_q6_k(model.model.layers[1].mlp.down_proj.weight)
    snap_to_q6_k(model.get_output_embeddings().weight)
    return model


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_q4_k_m_mix_runs_its_6_bit_weights_8_bit(kind):
    """bf16 with our kernels: the Q6_K-grid down weight and LM head run 8-bit (int8_mm, groups of 16),
    the q|k|v with a Q6_K v in parts (q|k 4-bit, v 8-bit: mixed_mm), with the decoder in one call; a
    decode step and a tree give the dense backend's logits to bf16 rounding."""
    avx512_kernel()
    require_kernels("attention")
    from redrafter.models.int4 import Int8Weight, MixedWeight
    from redrafter.models.loading import int8_lm_head

    model = q4_k_m_mix(kind)
    int4 = int4_layer_weights(model, torch.bfloat16)
    assert isinstance(int4[1]["down"], Int8Weight) and int4[1]["down"].group == 16
    assert isinstance(int4[0]["down"], Int4Weight) and isinstance(int4[1]["qkv"], Int4Weight)
    qkv = int4[0]["qkv"]
    assert isinstance(qkv, MixedWeight) and [type(p) for p in qkv.parts] == [Int4Weight, Int8Weight]
    assert [p.out_features for p in qkv.parts] == [96, 32]
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(5)).bfloat16()
    assert torch.equal(qkv(x), torch.cat([part(x) for part in qkv.parts], -1))  # each part as alone
    head = int8_lm_head(model)
    assert head is not None and head.group == 16
    target = NativeTarget(model.to(torch.bfloat16), name="mix", int4_layers=int4, int4_max_rows=8, lm_head_int8=head)
    assert target.int8_count == 2 and target.int4_count == 6 and target.lm_head_weights == "int8"
    assert target._decoder is not None
    dense = NativeTarget(q4_k_m_mix(kind).to(torch.bfloat16), name="dense")  # the same seed and grids
    results = {}
    for name, t in (("dense", dense), ("mix", target)):
        cache, _ = prefilled(t)
        one = t.forward(torch.tensor([[7]]), cache.lengths.view(1, 1), torch.ones(1, 1, 1, dtype=torch.bool), cache)
        t.commit(cache, torch.zeros(1, 1, dtype=torch.long), torch.tensor([1]))
        tree = t.forward(torch.tensor([[4, 9, 23, 40]]), cache.lengths.view(1, 1) + torch.tensor([[0, 1, 1, 2]]),
                         TREE_MASK, cache)
        results[name] = torch.cat([one.logits.float().flatten(), tree.logits.float().flatten()])
    scale = results["dense"].abs().max()
    assert (results["mix"] - results["dense"]).abs().max() <= 0.03 * scale


@pytest.mark.slow
def test_int4_greedy_on_the_real_q4_1_model_matches_generate(smollm2):
    """The embedded SmolLM2 is a Q4_1 GGUF: with --weights int4 every decoder product of a step of up to
    8 tokens runs 4-bit. In float32 the weights are exactly the dense ones, so greedy decoding (plain
    and speculative with the shipped drafter) gives transformers' generate tokens."""
    from redrafter import Engine, FinishEvent, GenerationConfig, ReDrafterProposer
    from redrafter.cli import encode_prompt, stop_token_ids
    from redrafter.drafter.model import load_drafter, recommended_beam
    from redrafter.models.loading import load_target, shipped_drafter

    reference_target, tokenizer = smollm2
    target, _ = load_target("smollm2-135m-instruct", dtype="float32", weights="int4")
    assert all(linear.int4 is not None for layer in target.layers
               for linear in (layer.qkv, layer.o, layer.gate_up, layer.down))
    stops = stop_token_ids(tokenizer, target)
    config = GenerationConfig(max_new_tokens=24, stop_token_ids=stops)
    drafter_dir = shipped_drafter("smollm2-135m-instruct")
    proposer = ReDrafterProposer(load_drafter(drafter_dir), target, recommended_beam(drafter_dir, "int4"))
    for text in ("Give me three tips for staying focused.",):  # the float32 int4 kernel is slow: one prompt
        ids = encode_prompt(tokenizer, text, chat_template=True)
        with torch.no_grad():
            out = reference_target.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                                  do_sample=False, max_new_tokens=24, eos_token_id=list(stops),
                                                  pad_token_id=tokenizer.pad_token_id)
        reference = out[0, len(ids):].tolist()
        for engine in (Engine(target), Engine(target, proposer)):
            result = next(e for e in engine.generate([ids], config) if isinstance(e, FinishEvent))
            assert list(result.token_ids) == reference


def test_int4_needs_the_native_backend_on_cpu():
    from redrafter.models.loading import load_target

    with pytest.raises(RedrafterError, match="--weights int4 needs the native backend"):
        load_target("smollm2-135m-instruct", backend="hf", weights="int4")
    with pytest.raises(RedrafterError, match="do not go together"):
        load_target("smollm2-135m-instruct", weights="int4", compile=True)
    with pytest.raises(RedrafterError, match="unknown weight format"):
        load_target("smollm2-135m-instruct", weights="int8")


# --- our AVX-512 kernel (models/kernels.py, csrc/int4_gemm.cpp) --------------------------------------

from redrafter.models import kernels  # noqa: E402


def avx512_kernel():
    return require_kernels("int4")


@pytest.mark.parametrize("shape", [(48, 96), (64, 32), (160, 1536)])
def test_avx512_kernel_equals_an_exact_product_for_any_row_count(shape):
    """Every row count (one tile pass for chunks of up to 8 rows, and a remainder) gives the product
    of the bf16 activations with exactly q * step + low, computed in float64, to bf16 output
    rounding, and each row exactly what it gets alone; the result does not depend on how many
    threads split the tiles."""
    avx512_kernel()
    out_features, in_features = shape
    w, _ = q4_1_weight(out_features, in_features, seed=out_features)
    packed = pack_int4(w, torch.bfloat16, kernel="avx512")
    assert packed.kernel == "avx512" and packed.max_rows == INT4_MAX_ROWS_AVX512 == 64
    g = torch.Generator().manual_seed(1)
    for rows in (1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 33, 64):
        x = torch.randn(rows, in_features, generator=g).bfloat16()
        y = packed(x)
        assert y.dtype == torch.bfloat16 and y.shape == (rows, out_features)
        exact = x.double() @ w.double().T
        bound = 2.0 ** -8 * exact.abs() + 1e-6 * (x.double().abs() @ w.double().abs().T)
        assert bool(((y.double() - exact).abs() <= bound).all()), rows
        # each row's result is the one it gets alone, bit for bit (a tree step computes what plain steps do)
        assert torch.equal(y, torch.cat([packed(x[i: i + 1]) for i in range(rows)])), rows
    x = torch.randn(11, in_features, generator=g).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = packed(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, packed(x.view(1, 11, in_features)).view(11, out_features))


def test_weight_arena_holds_the_tensors_in_order_on_their_own_pages():
    """``utils.weight_arena``: views with each tensor's dtype, shape and values, one after another in
    the order given, each starting on a page of its own; writing a view leaves the others alone."""
    from redrafter.utils import ARENA_ALIGN, weight_arena

    tensors = [torch.randint(0, 256, (5, 7, 32), dtype=torch.uint8), torch.randn(3, 11).half(),
               torch.randn(4097), torch.randn(2, 3).bfloat16()]
    views = weight_arena(tensors)
    addresses = [v.data_ptr() for v in views]
    for tensor, view in zip(tensors, views):
        assert view.dtype == tensor.dtype and view.shape == tensor.shape and view.is_contiguous()
        assert torch.equal(view, tensor) and view.data_ptr() != tensor.data_ptr()
    assert addresses == sorted(addresses) and all(a % ARENA_ALIGN == 0 for a in addresses)
    assert addresses[3] - addresses[2] == 5 * ARENA_ALIGN  # 4,097 floats (16,388 bytes) take 5 pages
    views[2].fill_(0)
    assert torch.equal(views[1], tensors[1]) and torch.equal(views[3], tensors[3])


def test_native_int4_weights_live_in_one_arena_in_the_order_of_use():
    """bf16 with our kernels: the decoder's 4-bit weights (and scales) are views of one block, in the
    order a forward reads them."""
    avx512_kernel()
    require_kernels("attention")
    model = snap_to_q4_1(tiny_model("llama"))
    int4 = int4_layer_weights(model, torch.bfloat16)
    target = NativeTarget(model.to(torch.bfloat16), name="int4", int4_layers=int4, int4_max_rows=8)
    order = [tensor for layer in target.layers for linear in (layer.qkv, layer.o, layer.gate_up, layer.down)
             for tensor in (linear.int4.packed, linear.int4.scales)]
    addresses = [t.data_ptr() for t in order]
    assert addresses == sorted(addresses)
    assert len({t.untyped_storage().data_ptr() for t in order}) == 1  # one block
    for i, layer in enumerate(int4):  # the same values as packed
        assert torch.equal(target.layers[i].down.int4.packed, layer["down"].packed)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decoder_layers_in_one_call_equal_the_layer_loop(kind, dtype):
    """With our kernels (bf16: AVX-512's ``decoder_layers``; float32: AVX2's ``decoder_layers_f32``),
    every layer in one C++ call gives the Python layer loop's logits, hidden states and cache, bit for
    bit, for decode steps and trees of two rows at different lengths (Qwen2: with its q|k|v bias; both
    with one 8-bit weight and a q|k|v in parts); and it really runs."""
    if dtype == torch.bfloat16:
        avx512_kernel()
        require_kernels("attention")
    else:
        require_kernels("avx2")
    attr = "_decoder" if dtype == torch.bfloat16 else "_decoder_f32"
    model = q4_k_m_mix(kind)  # layer 1's down weight runs 8-bit, layer 0's q|k|v in parts
    int4 = int4_layer_weights(model, dtype)
    target = NativeTarget(model.to(dtype), name="int4", int4_layers=int4, int4_max_rows=8)
    assert getattr(target, attr) is not None and target._decoder_rows == 8 and target.int8_count == 2
    assert (target.layers[0].qkv.bias is not None) == (kind == "qwen2")
    one_call, calls = getattr(target, attr), []
    prompts = torch.tensor([[5, 17, 3, 42, 8, 61, 29, 11, 70, 2], [9, 4, 13, 50, 7, 22, 1, 0, 0, 0]])
    lengths = torch.tensor([10, 7])
    causal = torch.ones(10, 10, dtype=torch.bool).tril().expand(2, 10, 10)
    tree_mask = TREE_MASK.expand(2, 4, 4)
    results = {}
    for name, decoder in (("loop", None), ("one call", one_call)):
        setattr(target, attr, None if decoder is None else (lambda *args: calls.append(1) or one_call(*args)))
        cache, outputs = target.new_cache(2), []
        target.forward(prompts, torch.arange(10).expand(2, 10), causal, cache)
        target.commit(cache, torch.arange(10).expand(2, 10), lengths)
        for step in range(3):
            tokens = torch.tensor([[4 + step, 9, 23, 40], [31, 2 + step, 6, 44]])
            out = target.forward(tokens, cache.lengths.view(2, 1) + torch.tensor([[0, 1, 1, 2]]), tree_mask, cache)
            outputs += [out.logits, out.hidden]
            target.commit(cache, torch.tensor([[0, 2, 3], [0, 1, 0]]), torch.tensor([3, 2 - step % 2]))
            out = target.forward(torch.tensor([[7], [19]]), cache.lengths.view(2, 1),
                                 torch.ones(2, 1, 1, dtype=torch.bool), cache)
            outputs += [out.logits, out.hidden]
            target.commit(cache, torch.zeros(2, 1, dtype=torch.long), torch.tensor([1, 1]))
        results[name] = (outputs, cache.kv[:, :, :, :, : int(cache.lengths.max())])
    assert len(calls) == 6  # the prefill (20 rows) ran the loop, every later forward the one call
    for a, b in zip(results["loop"][0], results["one call"][0]):
        assert torch.equal(a, b)
    assert torch.equal(results["loop"][1], results["one call"][1])


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_bf16_batched_tree_steps_of_up_to_64_rows_compute_each_row_as_alone(kind):
    """A bf16 step of 3 rows x 8 tree tokens (24 rows, more than one product chunk) gives each row the
    logits, hidden states and cache it gets alone, bit for bit: products of up to 64 rows run our int4
    kernel, whose rows do not depend on the rows beside them. With the old cap of 16 rows, the 24 rows
    ran dense products, which sum in another order: some row then differs (the test's power)."""
    avx512_kernel()
    require_kernels("attention")
    from redrafter.models.native import NativeCache

    assert INT4_MAX_ROWS_AVX512 >= 64
    model = q4_k_m_mix(kind)
    int4 = int4_layer_weights(model, torch.bfloat16)  # from the float32 grid, as the decoder test does
    model = model.to(torch.bfloat16)
    prompts = [[5, 17, 3, 42, 8, 61, 29, 11, 70, 2], [9, 4, 13, 50, 7, 22, 1], [33, 12, 64, 3, 3]]
    tokens = torch.tensor([[4, 9, 23, 40, 11, 6, 2, 30], [31, 2, 6, 44, 9, 9, 17, 1], [8, 60, 5, 14, 27, 3, 50, 12]])
    depth = torch.tensor([0, 1, 1, 2, 2, 3, 1, 2])  # a tree: 0 <- 1, 2; 2 <- 3, 4; 4 <- 5; 0 <- 6 <- 7
    parent = [-1, 0, 0, 2, 2, 4, 0, 6]
    mask = torch.eye(8, dtype=torch.bool)
    for i, p in enumerate(parent):
        j = p
        while j >= 0:
            mask[i, j], j = True, parent[j]

    def run(cap):
        target = NativeTarget(model, name="int4", int4_layers=int4, int4_max_rows=cap)
        alone = []
        for prompt in prompts:  # each prompt prefilled alone, so every cache holds the same values
            cache = target.new_cache(1)
            n = len(prompt)
            target.forward(torch.tensor([prompt]), torch.arange(n).view(1, n),
                           torch.ones(n, n, dtype=torch.bool).tril().view(1, n, n), cache)
            target.commit(cache, torch.arange(n).view(1, n), torch.tensor([n]))
            alone.append(cache)
        batch = NativeCache(kv=torch.cat([c.kv for c in alone], dim=2), lengths=torch.cat([c.lengths for c in alone]))
        together = target.forward(tokens, batch.lengths.view(3, 1) + depth, mask.expand(3, 8, 8), batch)
        same = []
        for row, cache in enumerate(alone):
            out = target.forward(tokens[row : row + 1], cache.lengths.view(1, 1) + depth, mask.view(1, 8, 8), cache)
            length = int(cache.lengths[0]) + 8
            same.append(torch.equal(out.logits[0], together.logits[row])
                        and torch.equal(out.hidden[0], together.hidden[row])
                        and torch.equal(cache.kv[:, :, 0, :, :length], batch.kv[:, :, row, :, :length]))
        return same

    assert run(None) == [True, True, True]
    assert not all(run(16))


@pytest.mark.slow
def test_bf16_speculative_decoding_equals_plain_decoding_with_our_int4_kernel():
    """The embedded model in bf16 with our int4 products (the default on this CPU): greedy ReDrafter
    with the shipped drafter gives plain decoding's tokens, so a tree's rows compute what single
    steps do."""
    avx512_kernel()
    from redrafter import Engine, FinishEvent, GenerationConfig, ReDrafterProposer
    from redrafter.cli import encode_prompt, stop_token_ids
    from redrafter.drafter.model import load_drafter, recommended_beam
    from redrafter.bench.workloads import mt_bench
    from redrafter.models.loading import load_target, shipped_drafter

    target, tokenizer = load_target("smollm2-135m-instruct", dtype="bfloat16", weights="int4", int4_kernel="avx512")
    assert target.int4_kernels == ["avx512"]
    config = GenerationConfig(max_new_tokens=64, stop_token_ids=stop_token_ids(tokenizer, target))
    drafter_dir = shipped_drafter("smollm2-135m-instruct")
    proposer = ReDrafterProposer(load_drafter(drafter_dir, dtype=torch.bfloat16), target, recommended_beam(drafter_dir, "int4"))
    # MT-Bench 151 and 81 diverged from plain decoding after 21 and 32 tokens when a tree's attention
    # summed its softmax in slot order (a branch's ancestors sit at other slots than after a commit).
    questions = {q.id: q.turns[0] for q in mt_bench()}
    prompts = [encode_prompt(tokenizer, questions[f"mt-bench/{n}"], chat_template=True) for n in (151, 81)]
    def finished(engine):
        return sorted((e for e in engine.generate(prompts, config) if isinstance(e, FinishEvent)), key=lambda e: e.row)

    plain, fast = finished(Engine(target)), finished(Engine(target, proposer))
    assert [e.token_ids for e in fast] == [e.token_ids for e in plain]
    assert all(len(e.token_ids) >= 32 for e in plain)
    assert all(e.stats.tokens_per_step > 1.3 for e in fast)  # trees were verified, not single tokens


def test_int4_kernel_choice():
    """bf16 takes our kernel where it runs and the groups suit it (32 inputs); float32 and other
    groups take torch's, whose row limit stays 8; a Linear follows its weight's limit."""
    from redrafter.models.base import Linear
    from redrafter.models.int4 import INT4_MAX_ROWS

    w, _ = q4_1_weight(64, 64, seed=3)
    assert pack_int4(w, torch.float32).kernel == ("avx2" if kernels.avx2_unavailable_reason() is None else "torch")
    assert pack_int4(w, torch.float32, kernel="torch").kernel == "torch"
    q = torch.randint(0, 16, (64, 64), generator=torch.Generator().manual_seed(4))
    q[:, 0], q[:, 1] = 0, 15
    wide = q.float() * 0.0078125 - 0.0625  # one grid per 64 inputs
    coarse = pack_int4(wide, torch.bfloat16, group=64)
    assert coarse.kernel == "torch"
    assert Linear(wide, int4=coarse).int4_max_rows == INT4_MAX_ROWS
    assert Linear(w, int4=pack_int4(w, torch.bfloat16), int4_max_rows=4).int4_max_rows == 4
    if kernels.int4_unavailable_reason() is None:
        packed = pack_int4(w, torch.bfloat16)
        assert packed.kernel == "avx512" and Linear(w, int4=packed).int4_max_rows == INT4_MAX_ROWS_AVX512
    with pytest.raises(ValueError, match="unknown int4 kernel"):
        pack_int4(w, torch.bfloat16, kernel="amx")
    with pytest.raises(ValueError, match="takes bfloat16 activations"):
        pack_int4(w, torch.float32, kernel="avx512")
    with pytest.raises(ValueError, match="takes float32 activations"):
        pack_int4(w, torch.bfloat16, kernel="avx2")
    odd, _ = q4_1_weight(40, 64, seed=5)
    with pytest.raises(Int4GridError, match="not a multiple of 16"):
        pack_int4(odd, torch.bfloat16)


def test_int4_kernel_choice_on_the_command_line(monkeypatch):
    """--int4-kernel torch loads torch's kernel everywhere; avx512 is refused, with the reason, where
    it cannot run (here: turned off by the environment) and for float32."""
    from redrafter.models.loading import load_target

    from redrafter.cli import beam_format

    target, _ = load_target("smollm2-135m-instruct", dtype="bfloat16", weights="int4", int4_kernel="torch")
    assert target.int4_kernels == ["torch"] and target.int4_max_rows == 8
    assert beam_format(target) == "int4:torch"  # the drafter's setting measured for torch's kernel
    with pytest.raises(RedrafterError, match="runs bfloat16 models only"):
        load_target("smollm2-135m-instruct", dtype="float32", weights="int4", int4_kernel="avx512")
    with pytest.raises(RedrafterError, match="runs float32 models only"):
        load_target("smollm2-135m-instruct", dtype="bfloat16", weights="int4", int4_kernel="avx2")
    monkeypatch.setenv("REDRAFTER_INT4_KERNEL", "torch")
    assert kernels.int4_unavailable_reason() == "REDRAFTER_INT4_KERNEL=torch" and kernels.int4() is None
    assert kernels.avx2_unavailable_reason() == "REDRAFTER_INT4_KERNEL=torch" and kernels.avx2() is None
    with pytest.raises(RedrafterError, match="cannot run here: REDRAFTER_INT4_KERNEL=torch"):
        load_target("smollm2-135m-instruct", dtype="bfloat16", weights="int4", int4_kernel="avx512")
    with pytest.raises(RedrafterError, match="cannot run here: REDRAFTER_INT4_KERNEL=torch"):
        load_target("smollm2-135m-instruct", dtype="float32", weights="int4", int4_kernel="avx2")
    target, _ = load_target("smollm2-135m-instruct", dtype="float32")  # auto: dense without our kernel
    assert target.weights == "dense"


def test_float16_scales_where_they_hold_the_grid_exactly():
    """A Q4_1 weight (d, m float16 in the file) packs with float16 steps and lows, and its products
    equal bit for bit those of the same values held in float32; grids whose steps are not float16
    values keep float32: products of two scales (Q4_K: d times a 6-bit sub-block scale), and a block
    whose levels span 0..5 (found as 3 q on a step of d / 3)."""
    from redrafter.models.int4 import float16_scales

    module = avx512_kernel()
    g = torch.Generator().manual_seed(3)
    q_file = torch.randint(0, 16, (64, 4, GROUP_SIZE), generator=g)
    q_file[:, :, 0], q_file[:, :, 1] = 0, 15  # a Q4_1 quantizer maps each block's min and max to 0 and 15
    d = (torch.rand(64, 4, 1, generator=g) * 0.02 + 0.001).half().float()
    m = (-torch.rand(64, 4, 1, generator=g) * 0.1).half().float()
    d[2, 3] = 0.0  # a constant block, as a file holds it
    w = (d * q_file + m).view(64, 128)
    q, step, low = grid_4bit(w)
    halves = float16_scales(w, q, step, low)
    assert halves is not None and halves[0].dtype == torch.float16
    packed = pack_int4(w, torch.bfloat16, kernel="avx512")
    assert packed.scales.dtype == torch.float16
    wide, scales = module.pack_weight(q, halves[0].float(), halves[1].float())
    assert scales.dtype == torch.float32 and torch.equal(wide, packed.packed)
    x = torch.randn(13, 128, generator=torch.Generator().manual_seed(0)).bfloat16()
    for rows in (1, 4, 13):
        assert torch.equal(packed(x[:rows]), module.int4_mm(x[:rows], wide, scales))
    # Q4_K-like steps: float16 d times 6-bit sub-block scales are not float16 values.
    d = (torch.rand(64, 4, 1, generator=g) * 0.01 + 0.001).half().float()
    sub = torch.randint(33, 64, (64, 4, 1), generator=g).float()
    q_k = torch.randint(0, 16, (64, 4, GROUP_SIZE), generator=g)
    q_k[:, :, 0], q_k[:, :, 1] = 0, 15
    w_k = (q_k * (d * sub) - 0.05).view(64, 128)
    assert float16_scales(w_k, *grid_4bit(w_k)) is None
    assert pack_int4(w_k, torch.bfloat16, kernel="avx512").scales.dtype == torch.float32
    # The generator above has blocks on coarser grids (levels 0..5 come back as q = 3 level, step d / 3).
    assert pack_int4(q4_1_weight(64, 128, seed=3)[0], torch.bfloat16, kernel="avx512").scales.dtype == torch.float32


def q8_0_weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """A float32 weight as a Q8_0 GGUF holds it: per block of 32 inputs, d = fp16(max |x| / 127) and
    q = round(x / (max |x| / 127)) in -127..127, w = d * q; one block all zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(out_features, in_features // GROUP_SIZE, GROUP_SIZE, generator=g) * 0.05
    x[0, 0] = 0
    d = x.abs().amax(-1, keepdim=True) / 127
    q = (x / d.clamp_min(1e-30)).round()
    return (q * d.half().float()).view(out_features, in_features)


def test_q8_0_grid_is_recovered_exactly_and_off_grid_weights_are_refused():
    from redrafter.models.int4 import grid_8bit

    w = q8_0_weight(32, 96, seed=1)
    q, d = grid_8bit(w)
    assert d.dtype == torch.float16 and q.dtype == torch.int8
    assert int(q.abs().max()) == 127 and int(q.view(32, 3, 32)[0, 0].abs().max()) == 0
    assert torch.equal((q.view(32, 3, 32).float() * d.float().unsqueeze(-1)).view(32, 96), w)
    off = w.clone()
    off[5, 7] += float(d[5, 0]) * 0.3
    with pytest.raises(Int4GridError, match="1 groups of 32 inputs in rows 0-31 of 32 are not on an 8-bit"):
        grid_8bit(off)


def test_q8_0_grid_of_a_weight_checked_in_row_chunks_is_the_whole_grid():
    """A weight taller than one chunk of the check: the chunks' grids join into the whole weight's, and
    a group off the grid in the last chunk is found there."""
    from redrafter.models import int4

    rows = int4._GRID_CHUNK_ROWS * 2 + 37
    w = q8_0_weight(rows, 64, seed=2)
    q, d = int4.grid_8bit(w)
    assert q.shape == (rows, 64) and d.shape == (rows, 2)
    assert torch.equal((q.view(rows, 2, 32).float() * d.float().unsqueeze(-1)).view(rows, 64), w)
    off = w.clone()
    off[rows - 1, 40] += float(d[rows - 1, 1]) * 0.3
    last = int4._GRID_CHUNK_ROWS * 2
    with pytest.raises(Int4GridError, match=f"1 groups of 32 inputs in rows {last}-{rows - 1} of {rows}"):
        int4.grid_8bit(off)


def q4_k_weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """A float32 weight as a Q4_K GGUF holds it: per block of 256 inputs float16 d and dmin, per group of
    32 a 6-bit sc and m (the block's largest 63), q in 0..15, w = d * sc * q - dmin * m. Some groups'
    q start above 0 or end below 15, as the file's do."""
    g = torch.Generator().manual_seed(seed)
    groups, blocks = in_features // 32, in_features // 256
    q = torch.randint(0, 16, (out_features, groups, 32), generator=g)
    q[:, :, 0], q[:, :, 1] = 0, 15
    q[:, 1::5] = torch.randint(3, 16, (out_features, len(range(1, groups, 5)), 32), generator=g)  # smallest q above 0
    q[:, 2::7] = torch.randint(0, 12, (out_features, len(range(2, groups, 7)), 32), generator=g)  # largest below 15
    sc = torch.randint(1, 64, (out_features, blocks, 8), generator=g)
    m = torch.randint(0, 64, (out_features, blocks, 8), generator=g)
    sc[:, :, 3], m[:, :, 5] = 63, 63
    d = (torch.rand(out_features, blocks, 1, generator=g) * 1e-3 + 1e-4).half().float()
    dmin = (torch.rand(out_features, blocks, 1, generator=g) * 1e-3 + 1e-4).half().float()
    step = (d * sc).view(out_features, groups, 1)
    low = (-dmin * m).view(out_features, groups, 1)
    return (q * step + low).view(out_features, in_features)


@pytest.mark.parametrize("shape", [(32, 512), (160, 1536)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_q4_k_weights_run_with_byte_scales_and_exactly_their_weights(shape, dtype):
    """A Q4_K weight's steps and lows are recovered as byte multipliers of per-256 units (K scales,
    4.75 bits per weight streamed instead of 6), for our bf16 kernel (tiles of 16) and our float32 one
    (tiles of 8): products equal the exact float64 product to output rounding (bf16: 2^-8; float32:
    float32 sums) for any row count, each row as alone."""
    if dtype == torch.bfloat16:
        avx512_kernel()
    else:
        require_kernels("avx2")
    from redrafter.models.int4 import k_scales

    kernel, tile = ("avx512", 16) if dtype == torch.bfloat16 else ("avx2", 8)
    out_features, in_features = shape
    w = q4_k_weight(out_features, in_features, seed=out_features)
    packed = pack_int4(w, dtype, kernel=kernel)
    assert packed.scales.dtype == torch.uint8
    assert packed.scales.shape == (out_features // tile, in_features // 32 * 2 * tile + in_features // 256 * 8 * tile)
    g = torch.Generator().manual_seed(2)
    relative = 2.0 ** -8 if dtype == torch.bfloat16 else 1e-6
    for rows in (1, 3, 8, 11):
        x = torch.randn(rows, in_features, generator=g).to(dtype)
        y = packed(x)
        exact = x.double() @ w.double().T
        bound = relative * exact.abs() + 1e-5 * (x.double().abs() @ w.double().abs().T)
        assert bool(((y.double() - exact).abs() <= bound).all()), rows
        assert torch.equal(y, torch.cat([packed(x[i: i + 1]) for i in range(rows)])), rows
    from redrafter.models.int4 import MixedWeight, pack_parts  # a Q4_K q|k beside a Q6_K v, in parts

    mixed = pack_parts(torch.cat([w, q6_k_weight(32, in_features, seed=3)]), [out_features, 32], dtype)
    assert isinstance(mixed, MixedWeight) and mixed.parts[0].scales.dtype == torch.uint8
    assert torch.equal(mixed(x), torch.cat([part(x) for part in mixed.parts], -1))
    q, step, low = grid_4bit(w)  # steps and lows that are no Q4_K's keep float32
    noise = 1 + 0.01 * torch.rand(step.shape, generator=g)
    assert k_scales(w, q, step * noise, low) is None


def q6_k_weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """A float32 weight as a Q6_K GGUF holds it: per block of 256 inputs a float16 d, per group of 16
    an 8-bit scale sc, q in -32..31, w = d * sc * q (one group all zero, one on a coarse grid)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-32, 32, (out_features, in_features // 16, 16), generator=g).float()
    q[0, 0] = 0
    q[1 % out_features, 0] = torch.randint(-4, 4, (16,), generator=g).float() * 8  # levels 8 apart
    sc = torch.randint(-127, 128, (out_features, in_features // 16, 1), generator=g).float()
    d = (torch.rand(out_features, -(-in_features // 256), 1, generator=g) * 1e-3 + 1e-5).half().float()
    d = d.repeat_interleave(16, dim=1)[:, : in_features // 16]
    return (d * sc * q).view(out_features, in_features)


def test_q6_k_grid_is_recovered_and_off_grid_weights_are_refused():
    from redrafter.models.int4 import grid_8bit_16

    w = q6_k_weight(32, 512, seed=1)
    q, d = grid_8bit_16(w)
    assert q.dtype == torch.int8 and d.shape == (32, 32) and int(q.abs().max()) <= 127
    rebuilt = (q.view(32, 32, 16).float() * d.float().unsqueeze(-1)).view(32, 512)
    assert (rebuilt - w).abs().max() <= 1e-6 * w.abs().max()
    off = w.clone()
    off[5, 7] += float(d[5, 0]) * 0.3
    with pytest.raises(Int4GridError, match="1 groups of 16 inputs in rows 0-31 of 32 are not on an 8-bit grid"):
        grid_8bit_16(off)


@pytest.mark.parametrize("kind", ["q8_0", "q6_k"])
@pytest.mark.parametrize("shape", [(48, 512), (160, 576)])
def test_int8_products_use_exactly_the_8bit_weight_for_any_row_count(shape, kind):
    """Our kernel's int8_mm (an 8-bit LM head, a Q6_K down weight) gives the product of the bf16
    activations with exactly the Q8_0 or Q6_K weight, computed in float64, to bf16 output rounding;
    each row gets what it gets alone."""
    avx512_kernel()
    from redrafter.models.int4 import pack_int8

    out_features, in_features = shape
    w = (q8_0_weight if kind == "q8_0" else q6_k_weight)(out_features, in_features, seed=out_features)
    packed = pack_int8(w)
    assert packed.max_rows == INT4_MAX_ROWS_AVX512 and packed.packed.dtype == torch.uint8
    assert packed.group == (32 if kind == "q8_0" else 16)
    if kind == "q8_0":
        assert packed.scales.dtype == torch.float16
    g = torch.Generator().manual_seed(2)
    for rows in (1, 3, 6, 9, 16, 24, 64):
        x = torch.randn(rows, in_features, generator=g).bfloat16()
        y = packed(x.view(1, rows, in_features)).view(rows, out_features)
        exact = x.double() @ w.double().T
        bound = 2.0 ** -8 * exact.abs() + 1e-6 * (x.double().abs() @ w.double().abs().T)
        assert bool(((y.double() - exact).abs() <= bound).all()), rows
        assert torch.equal(y, torch.cat([packed(x[i: i + 1]) for i in range(rows)])), rows
    with pytest.raises(Int4GridError, match="not on an 8-bit"):
        pack_int8(q4_1_weight(48, 96)[0] + 1e-4)


def test_the_embedded_models_lm_head_runs_8_bit_in_bf16():
    """SmolLM2's GGUF ties its LM head to a Q8_0 embedding: in bf16 with our int4 kernel the head's
    products of a step run with exactly those weights; its logits stay within bf16 rounding of the
    dense bf16 head's (whose weights are the Q8_0 ones rounded to bf16)."""
    avx512_kernel()
    from redrafter.models.loading import load_target

    target, _ = load_target("smollm2-135m-instruct", dtype="bfloat16", weights="int4")
    assert target.lm_head_weights == "int8" and target.lm_head.int4 is not None
    h = torch.randn(1, 3, target.info.hidden_size, generator=torch.Generator().manual_seed(3)).bfloat16()
    eight = target.project(h)
    dense = torch.ops.mkldnn._linear_pointwise(h, target.lm_head.packed, None, "none", [], "").float()
    assert eight.shape == dense.shape == (1, 3, target.info.vocab_size)
    assert (eight - dense).abs().max() <= 0.02 * dense.abs().max()
    assert (eight.argmax(-1) == dense.argmax(-1)).all()


# --- our AVX2 kernel for float32 models (csrc/avx2/gemm_f32.cpp) -------------------------------------


@pytest.mark.parametrize("shape", [(48, 96), (64, 32), (176, 1536)])
@pytest.mark.parametrize("scales", ["float16", "float32"])
def test_avx2_kernel_equals_an_exact_product_for_any_row_count(shape, scales):
    """float32 rows through a 4-bit weight with our AVX2 kernel: the product with exactly q * step + low
    (float16 steps and lows where they hold the grid, else float32), computed in float64, to float32
    rounding of the sums; each row gets what it gets alone, whatever the row count (chunks of 8, 4, 2,
    1) and the number of threads."""
    require_kernels("avx2")
    out_features, in_features = shape
    w, _ = q4_1_weight(out_features, in_features, seed=out_features)
    if scales == "float16":  # rows 0-2's special groups have lows above m (d * q + m), not float16 values
        w[:3] = w[3]
    else:  # steps that float16 cannot hold
        w = w * 1.0001
    packed = pack_int4(w, torch.float32)
    assert packed.kernel == "avx2" and packed.max_rows == 16
    assert packed.scales.dtype == (torch.float16 if scales == "float16" else torch.float32)
    if scales == "float16":  # the file's own d and m: exactly its weights
        assert torch.equal(packed.dequantize(), w)
    g = torch.Generator().manual_seed(1)
    for rows in (1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 33, 300):  # 300: two passes (kPassRows 256)
        x = torch.randn(rows, in_features, generator=g)
        y = packed(x)
        assert y.dtype == torch.float32 and y.shape == (rows, out_features)
        exact = x.double() @ w.double().T
        bound = 1e-6 * (x.double().abs() @ w.double().abs().T) + 1e-6 * exact.abs()
        assert bool(((y.double() - exact).abs() <= bound).all()), rows
        assert torch.equal(y, torch.cat([packed(x[i: i + 1]) for i in range(rows)])), rows
    x = torch.randn(11, in_features, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = packed(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, packed(x.view(1, 11, in_features)).view(11, out_features))


@pytest.mark.parametrize("kind", ["q8_0", "q6_k"])
def test_avx2_int8_products_use_exactly_the_8bit_weight(kind):
    """float32 rows through a Q8_0 or Q6_K weight (an LM head, a Q4_K_M file's down weights) with our
    AVX2 kernel: the float64 product with exactly the file's weight, to float32 rounding; rows alone
    get the same; a fused weight in parts (4-bit q|k, 8-bit v) gives each part's columns as alone."""
    require_kernels("avx2")
    from redrafter.models.int4 import MixedWeight, pack_int8, pack_parts

    w = (q8_0_weight if kind == "q8_0" else q6_k_weight)(176, 576, seed=7)
    packed = pack_int8(w, torch.float32)
    assert packed.kernel == "avx2" and packed.group == (32 if kind == "q8_0" else 16)
    g = torch.Generator().manual_seed(2)
    for rows in (1, 3, 6, 9, 16):
        x = torch.randn(rows, 576, generator=g)
        y = packed(x)
        exact = x.double() @ w.double().T
        assert bool(((y.double() - exact).abs() <= 1e-6 * (x.double().abs() @ w.double().abs().T)).all()), rows
        assert torch.equal(y, torch.cat([packed(x[i: i + 1]) for i in range(rows)])), rows
    four, _ = q4_1_weight(96, 576, seed=8)
    fused = pack_parts(torch.cat([four, w[:32]]), [64, 32, 32], torch.float32)
    assert isinstance(fused, MixedWeight) and fused.kernel == "avx2"
    assert [type(p).__name__ for p in fused.parts] == ["Int4Weight", "Int8Weight"]
    x = torch.randn(5, 576, generator=g)
    assert torch.equal(fused(x), torch.cat([part(x) for part in fused.parts], -1))
    assert (fused(x) - x @ torch.cat([four, w[:32]]).T).abs().max() <= 1e-5 * x.abs().sum(-1).max()


def test_float32_int4_model_on_avx2_runs_every_product_with_our_kernel():
    """The embedded SmolLM2 in float32 with --weights auto where our AVX2 kernel runs: every decoder
    weight 4-bit and the LM head 8-bit (its tied Q8_0 embedding) with our kernel, and a decode step's
    logits within float32 summation-order noise of the dense float32 model's."""
    require_kernels("avx2")
    from redrafter.cli import beam_format
    from redrafter.models.loading import load_target

    target, _ = load_target("smollm2-135m-instruct", dtype="float32")
    dense, _ = load_target("smollm2-135m-instruct", dtype="float32", weights="dense")
    assert target.weights == "int4" and target.int4_kernels == ["avx2"] and target.lm_head_weights == "int8"
    assert target.int4_count == 4 * target.num_layers and beam_format(target) == "int4:avx2"
    results = []
    for t in (target, dense):
        cache, _ = prefilled(t)
        step = t.forward(torch.tensor([[7, 19, 4]]), cache.lengths.view(1, 1) + torch.tensor([[0, 1, 1]]),
                         TREE_MASK[:, :3, :3], cache).logits
        results.append(step)
    assert (results[0] - results[1]).abs().max() <= 1e-4 * results[1].abs().max()
    assert torch.equal(results[0].argmax(-1), results[1].argmax(-1))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_float32_int4_on_avx2_runs_every_row_count_without_dense_copies(kind, monkeypatch):
    """float32 with our AVX2 kernel for every decoder weight (int4_max_rows left to the kernel): a
    prefill longer than any tree runs the 4-bit products too, no oneDNN copy of those weights is
    made, the logits equal the dense backend's to float32 precision, and releasing the transformers
    weights frees every plain decoder weight while forwards still run."""
    require_kernels("avx2")
    model = snap_to_q4_1(tiny_model(kind))
    int4 = int4_layer_weights(model, torch.float32)
    target = NativeTarget(model, name="int4", int4_layers=int4)
    dense = NativeTarget(snap_to_q4_1(tiny_model(kind)), name="dense")  # the same seed
    linears = [linear for layer in target.layers for linear in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    assert target.int4_every_row and all(linear.packed is None for linear in linears)
    assert not dense.int4_every_row
    if target._decoder_f32 is not None:
        assert target._decoder_rows == 16  # the one-call decoder stays for steps, not prefills
    rows_seen = []
    original = Int4Weight.__call__
    monkeypatch.setattr(Int4Weight, "__call__", lambda self, x: rows_seen.append(x.numel() // x.shape[-1])
                        or original(self, x))
    prompt = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(3))
    causal = torch.ones(40, 40, dtype=torch.bool).tril().expand(2, 40, 40)

    def run(t):
        cache = t.new_cache(2)
        logits = t.forward(prompt, torch.arange(40).expand(2, 40), causal, cache).logits
        t.commit(cache, torch.arange(40).expand(2, 40), torch.tensor([40, 31]))
        step = t.forward(torch.tensor([[7], [19]]), cache.lengths.view(2, 1), torch.ones(2, 1, 1, dtype=torch.bool),
                         cache).logits
        return torch.cat([logits.flatten(), step.flatten()])

    expected, got = run(dense), run(target)
    assert 80 in rows_seen  # the prefill's 2 x 40 rows ran 4-bit
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert target.release_transformers_weights() > 0 and all(linear.weight is None for linear in linears)
    assert torch.equal(run(target), got)


def test_grids_checked_in_many_row_chunks_equal_the_grids_of_one_chunk(monkeypatch):
    """grid_4bit, float16_scales and k_scales work in chunks of rows: with chunks of 3 rows (a
    remainder included) they give the same tensors as with the whole weight in one chunk, for a Q4_1
    and a Q4_K weight, and a weight off the grid still fails."""
    from redrafter.models import int4
    from redrafter.models.int4 import float16_scales, k_scales

    weights = [q4_1_weight(40, 256, seed=4)[0], q4_k_weight(40, 512, seed=5)]
    whole = []
    for w in weights:
        q, step, low = grid_4bit(w)
        whole.append(((q, step, low), float16_scales(w, q, step, low), k_scales(w, q, step, low)))
    monkeypatch.setattr(int4, "_GRID_CHUNK_ELEMENTS", 3 * 512)
    assert len(int4._row_chunks(40, 512)) == 14
    for w, (grid, half, k_form) in zip(weights, whole):
        q, step, low = grid_4bit(w)
        assert all(torch.equal(a, b) for a, b in zip((q, step, low), grid))
        chunked_half, chunked_k = float16_scales(w, q, step, low), k_scales(w, q, step, low)
        assert (chunked_half is None) == (half is None) and (chunked_k is None) == (k_form is None)
        for a, b in zip(chunked_half or (), half or ()):
            assert torch.equal(a, b)
        for a, b in zip(chunked_k or (), k_form or ()):
            assert torch.equal(a, b)
    assert whole[1][2] is not None  # the Q4_K weight takes K scales: their check ran in chunks
    off = weights[0].clone()
    off[37, 5] += float(grid_4bit(weights[0])[1][37, 0]) * 0.3
    with pytest.raises(Int4GridError, match="1 groups of 32 inputs in rows 36-39 of 40 are not on a 4-bit grid"):
        grid_4bit(off)
