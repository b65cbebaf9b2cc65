"""The packed-weight cache (models/weight_cache.py): a reload reads the packed 4- and 8-bit weights
instead of recovering their grids, computes exactly what the first load computed, and never reads a
stale or damaged file."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import TINY_VOCAB, require_kernels
from test_int4 import q4_k_m_mix

from redrafter.errors import RedrafterError
from redrafter.models import loading, native, weight_cache
from redrafter.models.int4 import packed_parts
from redrafter.models.loading import load_target


def save_model_dir(model, path):
    """``model`` as a transformers directory with a word-level tokenizer of its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model.save_pretrained(str(path))
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(TINY_VOCAB)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0").save_pretrained(str(path))
    return path


def packed_tensors(target) -> list[torch.Tensor]:
    linears = [linear for layer in target.layers for linear in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    return [tensor for linear in linears + [target.lm_head] for part in packed_parts(linear.int4)
            for tensor in (part.packed, part.scales)]


def logits(target) -> torch.Tensor:
    """A prefill of two rows, a commit, then a 3-token tree step."""
    prompt = torch.randint(0, TINY_VOCAB, (2, 20), generator=torch.Generator().manual_seed(5))
    cache = target.new_cache(2)
    causal = torch.ones(20, 20, dtype=torch.bool).tril().expand(2, 20, 20)
    first = target.forward(prompt, torch.arange(20).expand(2, 20), causal, cache).logits
    target.commit(cache, torch.arange(20).expand(2, 20), torch.tensor([20, 13]))
    tree = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool).expand(2, 3, 3)
    positions = cache.lengths.view(2, 1) + torch.tensor([0, 1, 1])
    step = target.forward(torch.tensor([[3, 9, 11], [40, 2, 7]]), positions, tree, cache).logits
    return torch.cat([first.flatten(), step.flatten()])


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("REDRAFTER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("REDRAFTER_WEIGHT_CACHE", raising=False)
    return tmp_path / "cache"


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_a_reload_reads_the_packed_weights_and_computes_the_same_logits(kind, cache_root, tmp_path, monkeypatch):
    """Q4_K_M-like weights (4-bit, a Q6_K v inside q|k|v, a Q6_K down weight and LM head) in float32 on
    our AVX2 kernel: the first load packs and saves; a second load and a lean one (no transformers
    model kept: the decoder's plain weights are never read from the file) pack nothing, hold the same
    packed tensors and give bit-identical logits to the first load's."""
    require_kernels("avx2")
    directory = save_model_dir(q4_k_m_mix(kind), tmp_path / "model")
    first, _ = load_target(str(directory), dtype="float32", weights="int4")
    assert first.int4_every_row and first.lm_head_weights == "int8"
    files = list((cache_root / "packed").glob("*.safetensors"))
    assert len(files) == 1
    expected = logits(first)

    def no_packing(*args, **kwargs):
        raise AssertionError("packed again instead of reading the cache")

    monkeypatch.setattr(native, "int4_layer_weights", no_packing)
    monkeypatch.setattr(loading, "int8_lm_head", no_packing)
    lean_models = []
    original = loading.model_without_decoder_weights
    monkeypatch.setattr(loading, "model_without_decoder_weights",
                        lambda *a, **k: lean_models.append(original(*a, **k)) or lean_models[-1])
    second, _ = load_target(str(directory), dtype="float32", weights="int4")
    assert not lean_models  # the transformers model is kept: it loads whole
    assert second.model.model.layers[0].mlp.down_proj.weight.abs().sum() > 0
    lean, _ = load_target(str(directory), dtype="float32", weights="int4", keep_transformers_model=False)
    assert len(lean_models) == 1 and lean.model is None
    skipped = lean_models[0].model.layers[1].self_attn.q_proj.weight
    assert skipped.is_meta and lean_models[0].lm_head.weight.is_meta
    assert not lean_models[0].model.embed_tokens.weight.is_meta
    for target in (second, lean):
        assert all(torch.equal(a, b) for a, b in zip(packed_tensors(first), packed_tensors(target), strict=True))
        assert torch.equal(logits(target), expected)
    assert lean.info == first.info


def test_a_stale_or_damaged_cache_file_is_never_used(cache_root, tmp_path, monkeypatch, caplog):
    """Touching the model's weights changes the key (a new file replaces the stale one; another
    variant's file stays); a damaged file is ignored with a
    warning and replaced; ``REDRAFTER_WEIGHT_CACHE=off`` neither reads nor writes."""
    require_kernels("avx2")
    directory = save_model_dir(q4_k_m_mix("llama"), tmp_path / "model")
    expected = logits(load_target(str(directory), dtype="float32", weights="int4")[0])
    (path,) = (cache_root / "packed").glob("*.safetensors")
    weights_file = directory / "model.safetensors"
    stat = weights_file.stat()
    os.utime(weights_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    load_target(str(directory), dtype="float32", weights="int4", int4_kernel="torch")  # another variant
    load_target(str(directory), dtype="float32", weights="int4")
    newest = weight_cache.cache_path(directory, torch.float32, "auto", cache_root)
    assert newest != path and newest.is_file() and not path.exists()  # the stale version is gone
    assert weight_cache.cache_path(directory, torch.float32, "torch", cache_root).is_file()  # the other stays
    newest.write_bytes(newest.read_bytes()[:1000])  # a truncated file
    with caplog.at_level("WARNING"):
        target, _ = load_target(str(directory), dtype="float32", weights="int4")
    assert "ignoring the packed-weight cache" in caplog.text
    assert torch.equal(logits(target), expected)
    assert weight_cache.load(newest, 2) is not None  # rewritten whole
    assert weight_cache.load(newest, 3) is None  # another model's layer count
    monkeypatch.setenv("REDRAFTER_WEIGHT_CACHE", "off")
    for file in (cache_root / "packed").glob("*.safetensors"):
        file.unlink()
    load_target(str(directory), dtype="float32", weights="int4")
    assert not list((cache_root / "packed").glob("*.safetensors"))


def test_torch_int4_kernel_weights_round_trip(cache_root, tmp_path, monkeypatch):
    """Weights packed for torch's int4 kernel (``--int4-kernel torch``) save and load too, under their
    own key, and compute the same logits."""
    directory = save_model_dir(q4_k_m_mix("qwen2"), tmp_path / "model")
    first, _ = load_target(str(directory), dtype="float32", weights="int4", int4_kernel="torch")
    monkeypatch.setattr(native, "int4_layer_weights", lambda *a, **k: pytest.fail("packed again"))
    second, _ = load_target(str(directory), dtype="float32", weights="int4", int4_kernel="torch")
    assert first.int4_kernels == second.int4_kernels == ["torch"]
    assert weight_cache.cache_path(directory, torch.float32, "torch", cache_root).is_file()
    assert torch.equal(logits(first), logits(second))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_a_lean_load_of_a_tied_model(kind, cache_root, tmp_path, monkeypatch):
    """A model whose LM head is its embedding (SmolLM2's and Qwen2.5's are): the lean load keeps the
    embedding as the head, and its logits, stop tokens and packed weights equal a whole load's."""
    require_kernels("avx2")
    lean_models = []
    original = loading.model_without_decoder_weights
    monkeypatch.setattr(loading, "model_without_decoder_weights",
                        lambda *a, **k: lean_models.append(original(*a, **k)) or lean_models[-1])
    model = q4_k_m_mix(kind)
    model.config.tie_word_embeddings = True
    model.model.embed_tokens.weight = model.lm_head.weight  # the head snapped to Q6_K, shared
    model.generation_config.eos_token_id = 7
    directory = save_model_dir(model, tmp_path / "model")
    whole, _ = load_target(str(directory), dtype="float32", weights="int4")
    assert whole.lm_head_weights == "int8"
    lean, _ = load_target(str(directory), dtype="float32", weights="int4", keep_transformers_model=False)
    assert len(lean_models) == 1 and lean_models[0].model.layers[0].self_attn.o_proj.weight.is_meta
    assert lean_models[0].lm_head.weight is lean_models[0].model.embed_tokens.weight
    assert lean.model is None and lean.info == whole.info and lean.info.stop_token_ids == (7,)
    assert torch.equal(lean.embedding, whole.embedding)
    assert all(torch.equal(a, b) for a, b in zip(packed_tensors(whole), packed_tensors(lean), strict=True))
    assert torch.equal(logits(lean), logits(whole))


def test_weights_left_unloaded_are_refused_where_a_product_would_read_them(tmp_path):
    """The native backend refuses a model with weights on the meta device unless every product that
    would read them runs packed weights (here: dense products, so it must refuse)."""
    model = q4_k_m_mix("llama")
    directory = save_model_dir(model, tmp_path / "model")
    lean = loading.model_without_decoder_weights(directory, skip_lm_head=True)
    assert lean.model.layers[0].mlp.up_proj.weight.is_meta
    with pytest.raises(RedrafterError, match="not loaded"):
        native.NativeTarget(lean, name="lean")


def test_a_model_directory_missing_tensors_is_refused(tmp_path):
    """transformers fills tensors a directory lacks with random values and only logs it; loading
    such a directory fails, naming them, instead of generating from random weights."""
    from helpers import tiny_model
    from safetensors.torch import load_file, save_file

    path = save_model_dir(tiny_model("llama"), tmp_path / "m")
    state = load_file(str(path / "model.safetensors"))
    save_file({k: v for k, v in state.items() if ".1.mlp." not in k}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(RedrafterError, match=r"lack or misshape 3 tensors .*model\.layers\.1\.mlp\."):
        load_target(str(path), dtype="float32")


def test_a_sliding_window_as_long_as_the_positions_is_full_attention():
    """Mistral-style configs set a window; one at least as long as the model's positions never cuts
    anything off, so the native backend runs it. A shorter one is refused without pointing to the
    transformers backend, which has no sliding-window cache either."""
    from transformers import MistralConfig

    common = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    assert native.unsupported_reason(MistralConfig(**common, sliding_window=4096)) is None
    assert native.unsupported_reason(MistralConfig(**common, sliding_window=None)) is None
    reason = native.unsupported_reason(MistralConfig(**common, sliding_window=128))
    assert reason == "sliding-window attention (a window of 128 < 512 positions)"
    assert "--backend hf" not in native.unsupported_message(reason)
    assert "--backend hf" in native.unsupported_message("architecture 'gpt2'")


def test_files_of_an_installation_that_is_gone_are_removed_on_the_next_save(tmp_path):
    """Each checkout (every CI clone too) keys its own files; once it is deleted nothing can read
    them, so the next save removes them. Files that do not record their installation stay."""
    from safetensors.torch import save_file

    packed = tmp_path / "packed"
    packed.mkdir()
    one = {"x": torch.zeros(1)}
    save_file(one, str(packed / "gone.safetensors"), metadata={"installation": str(tmp_path / "deleted-checkout")})
    save_file(one, str(packed / "here.safetensors"), metadata={"installation": str(tmp_path)})
    save_file(one, str(packed / "older.safetensors"), metadata={"format": "x"})
    weight_cache.save(packed / "new.safetensors", [], None)
    assert sorted(p.name for p in packed.iterdir()) == ["here.safetensors", "new.safetensors", "older.safetensors"]
