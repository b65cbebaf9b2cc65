"""Tiny random target models and scripted proposers shared by the tests (no downloads)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from redrafter.models.hf import TransformersTarget
from redrafter.models.native import NativeTarget

TINY_VOCAB = 96


def tiny_model(kind: str, *, seed: int = 0, vocab: int = TINY_VOCAB, dtype=torch.float32, init: float = 0.2):
    """A 2-layer random model of the given architecture ("llama" or "qwen2"); the default large init
    gives peaked logits so greedy choices are not near-ties."""
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=init, eos_token_id=None, bos_token_id=None, pad_token_id=None,
                  tie_word_embeddings=False)
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))
    else:
        raise ValueError(kind)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.to(dtype).eval()


# "native" packs its weights for oneDNN on CPU; "native-plain" runs the unpacked path other devices use.
BACKENDS = ["hf", "native", "native-plain"]


def tiny_target(kind: str, backend: str = "hf", *, compile: bool = False, **kwargs):
    """A tiny random model behind the given backend ("hf", "native" or "native-plain", optionally
    torch.compiled)."""
    if backend in ("native", "native-plain"):
        target = NativeTarget(tiny_model(kind, **kwargs), name=f"tiny-{kind}", compile=compile,
                              pack_weights=backend == "native" and not compile)
        if backend == "native" and not compile and not target.packed:
            pytest.skip("oneDNN cannot pack weights on this build")
        assert target.packed == (backend == "native" and not compile)
        return target
    return TransformersTarget(tiny_model(kind, **kwargs), name=f"tiny-{kind}")


def cache_layer(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) of one layer of either backend's cache, each (batch, kv_heads, slots, head_dim)."""
    if hasattr(cache.kv, "layers"):
        return cache.kv.layers[layer].keys, cache.kv.layers[layer].values
    return cache.kv[layer, 0], cache.kv[layer, 1]


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos_token_id=None) -> list[int]:
    """The independent reference: transformers' own greedy generate."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=eos_token_id, pad_token_id=0, num_beams=1)
    return out[0, len(prompt):].tolist()


class ScriptedProposer:
    """Proposes W beams from a known reference continuation: beam ``correct_beam`` follows the
    reference for ``right`` drafted tokens and then deviates; the others share a random-length prefix
    of it and then go random. ``right = L - 1`` is the oracle (always right); ``right = 0`` is
    always wrong from the first drafted token."""

    def __init__(self, reference: list[list[int]], *, width: int, length: int, right: int, vocab: int,
                 correct_beam: int | None = None, seed: int = 0) -> None:
        self.reference, self.width, self.beam_length, self.right, self.vocab = reference, width, length, right, vocab
        self.correct_beam = width - 1 if correct_beam is None else correct_beam
        self.generator = torch.Generator().manual_seed(seed)

    def _random(self, n: int) -> list[int]:
        return torch.randint(0, self.vocab, (n,), generator=self.generator).tolist()

    def propose(self, context, g0, num_generated, *, rows, history=None):
        beams = []
        for row, first, done in zip(rows.tolist(), g0.tolist(), num_generated.tolist()):
            # The reference continuation after g0 (g0 is reference[row][done - 1]).
            truth = self.reference[row][done: done + self.beam_length - 1]
            truth = truth + self._random(self.beam_length - 1 - len(truth))
            row_beams = []
            for i in range(self.width):
                if i == self.correct_beam:
                    keep = self.right
                else:
                    keep = int(torch.randint(0, self.beam_length, (1,), generator=self.generator))
                    keep = min(keep, self.right)
                drafted = truth[:keep] + [(t + 1 + r) % self.vocab for t, r in
                                          zip(truth[keep:], self._random(self.beam_length - 1 - keep))]
                # make sure a deviation really deviates
                drafted = drafted[:keep] + [t if t != truth[keep + j] else (t + 1) % self.vocab
                                            for j, t in enumerate(drafted[keep:])]
                row_beams.append([first] + drafted)
            beams.append(row_beams)
        return torch.tensor(beams, device=g0.device)


def require_kernels(kind: str):
    """Our CPU kernels for ``kind`` ("int4", "attention" or "tree"), which must build wherever the CPU can run
    them (a failed build fails the test); skips where they cannot run, saying why."""
    from redrafter.models import kernels

    reason = getattr(kernels, f"{kind}_unavailable_reason")()
    if reason is not None:
        pytest.skip(f"no {kind} kernel on this machine: {reason}")
    module = getattr(kernels, kind)()
    assert module is not None, f"the CPU can run our {kind} kernels but they did not build (see the log)"
    return module
