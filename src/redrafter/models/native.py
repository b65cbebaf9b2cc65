"""The native backend: a lean Llama / Qwen2 / Mistral decoder with a static, position-indexed KV cache.

What it does differently from the transformers backend, all in plain device-agnostic PyTorch:

- One pre-allocated cache tensor for every layer, (layers, 2, batch, kv_heads, capacity, head_dim).
  A forward writes its n new tokens at slots ``lengths[b] .. lengths[b] + n - 1`` of each row and
  attends over slots ``0 .. max(lengths) + n - 1`` with one boolean mask (committed slots of the row,
  then the given tree mask). For bf16 models on CPUs with AVX-512 BF16, steps of up to 64 new tokens
  per row attend through our kernel (``kernels``, csrc/tree_attention.cpp: one call per layer, float32
  arithmetic), and RMSNorm, the rotary embedding with the cache write, and the MLP's SiLU and multiply
  are one kernel call each (csrc/rms_norm.cpp, csrc/layer_ops.cpp). Elsewhere, ``scaled_dot_product_attention`` with
  grouped KV heads, or, for bf16 batches of a few new tokens per row on CPUs, the same attention as two
  batched products (``grouped_attention``), which is ten times faster there. Without our kernel, plain
  decoding of a bf16/fp16 model on CPU keeps the cache in float32 (``new_cache(plain_decoding=True)``),
  where one new token attends 2-3x faster; tree steps keep the model's dtype.
- Commit moves the accepted tree tokens down to ``lengths[b] + j`` with one gather and one scatter over
  the whole cache tensor (all layers, keys and values at once); plain decoding and prefill, whose kept
  tokens are already in place, move nothing.
- Fused projections (q|k|v and gate|up) and few Python operations per layer.
- On CPUs, every linear weight is reordered once at load time for oneDNN (``base.Linear``,
  ``pack_weights``): its kernels cost about the same for 1 to 8 rows and grow smoothly beyond, which
  is what makes verifying a small tree cost about one decode step. Elsewhere (CUDA, or a dtype
  oneDNN cannot pack on this CPU), a handful of rows run as ``weight @ x^T`` (``base.few_row_linear``,
  ``weight_major_rows``), which streams the weight once instead of repacking it for a tiny GEMM.

The weights come from a transformers model (so every source the transformers backend reads works
here: HF directories, GGUF, the embedded default); its rotary embedding module is reused as is, so
every RoPE variant transformers knows (default, linear, llama3, yarn, ...) is computed the same way.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from redrafter.errors import RedrafterError
from redrafter.models import kernels
from redrafter.models.base import EVERY_ROW, ForwardOutput, Linear, TargetInfo
from redrafter.models.hf import target_info
from redrafter.models.int4 import (OUR_KERNELS, Int4GridError, Int8Weight, MixedWeight, in_one_block, pack_int4, pack_int8,
                                  pack_parts, packed_parts)
from redrafter.utils import release_free_heap

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


def unsupported_reason(config) -> str | None:
    """Why the native backend cannot run a transformers config (None when it can)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"architecture '{model_type}' (native supports {', '.join(SUPPORTED_MODEL_TYPES)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act}"
    window = getattr(config, "sliding_window", None)
    positions = getattr(config, "max_position_embeddings", None)
    # A window as long as the model's positions never cuts anything off: that is full attention.
    if window and getattr(config, "use_sliding_window", model_type == "mistral") and not (
            positions is not None and window >= positions):
        return f"sliding-window attention (a window of {window} < {positions} positions)"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    return None


def unsupported_message(reason: str) -> str:
    """The error for a model the native backend cannot run, pointing to the transformers backend
    where that one can (our transformers backend has no sliding-window cache either)."""
    if reason.startswith("sliding-window"):
        return f"the native backend does not support {reason}, and the transformers backend does not either yet"
    return f"the native backend does not support {reason}; use --backend hf"


@dataclasses.dataclass
class NativeCache:
    """Per-row committed lengths over one static cache tensor.

    ``kv`` is (layers, 2, batch, kv_heads, capacity, head_dim); slots at or beyond ``lengths[b]`` are
    stale for row b (a pending forward's tokens sit there until ``commit``). The capacity grows by
    doubling when a forward needs more slots, so callers need not know the final length up front.
    """

    kv: torch.Tensor
    lengths: torch.Tensor  # (batch,) long
    pending: int = 0

    @property
    def capacity(self) -> int:
        return self.kv.shape[4]


def fused_weights(hf_layer: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """A decoder layer's four products as {name: (weight (out, in), bias or None)}, with q|k|v and
    gate|up concatenated: the layout ``_Layer`` runs and ``int4_layer_weights`` packs."""
    attn, mlp = hf_layer.self_attn, hf_layer.mlp

    def cat(modules: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = None if modules[0].bias is None else torch.cat([m.bias for m in modules]).detach()
        return torch.cat([m.weight for m in modules]).detach(), bias

    def single(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        return module.weight.detach(), None if module.bias is None else module.bias.detach()

    return {"qkv": cat([attn.q_proj, attn.k_proj, attn.v_proj]), "o": single(attn.o_proj),
            "gate_up": cat([mlp.gate_proj, mlp.up_proj]), "down": single(mlp.down_proj)}


DECODER_PARTS = 3  # packed parts of a linear weight that ``decoder_layers`` takes, at most (csrc/decoder.cpp)


def fused_sizes(hf_layer: nn.Module) -> dict[str, list[int]]:
    """The rows of each weight inside ``fused_weights``' fused ones: q, k, v and gate, up."""
    attn, mlp = hf_layer.self_attn, hf_layer.mlp
    return {"qkv": [m.weight.shape[0] for m in (attn.q_proj, attn.k_proj, attn.v_proj)],
            "gate_up": [m.weight.shape[0] for m in (mlp.gate_proj, mlp.up_proj)]}


def _int4_operands(linear: Linear, none: torch.Tensor) -> list[torch.Tensor]:
    """A linear layer that runs our 4- or 8-bit kernel as ``decoder_layers`` takes it: (packed weight,
    scales) of each part, ``none`` for the parts it lacks, then its bias or ``none``."""
    parts = packed_parts(linear.int4)
    operands = [tensor for part in parts for tensor in (part.packed, part.scales)]
    operands += [none] * (2 * (DECODER_PARTS - len(parts)))
    return operands + [linear.bias.detach() if linear.bias is not None else none]


class _Layer:
    """One decoder layer's weights, with q|k|v and gate|up fused."""

    def __init__(self, hf_layer: nn.Module, heads: int, kv_heads: int, head_dim: int, *, pack: bool,
                 max_rows: int, int4: dict | None = None, int4_max_rows: int | None = None) -> None:
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.input_norm = hf_layer.input_layernorm.weight
        self.post_norm = hf_layer.post_attention_layernorm.weight
        self.eps = hf_layer.input_layernorm.variance_epsilon
        weights = fused_weights(hf_layer)
        (qkv, qkv_bias), (gate_up, gate_up_bias) = weights["qkv"], weights["gate_up"]
        # The transformers modules now view the fused tensors, so the model stays usable without a copy.
        q_size, kv_size = heads * head_dim, kv_heads * head_dim
        for name, tensor in (("weight", qkv), ("bias", qkv_bias)):
            if tensor is not None:
                getattr(attn.q_proj, name).data = tensor[:q_size]
                getattr(attn.k_proj, name).data = tensor[q_size: q_size + kv_size]
                getattr(attn.v_proj, name).data = tensor[q_size + kv_size:]
        intermediate = gate_up.shape[0] // 2
        for name, tensor in (("weight", gate_up), ("bias", gate_up_bias)):
            if tensor is not None:
                getattr(mlp.gate_proj, name).data = tensor[:intermediate]
                getattr(mlp.up_proj, name).data = tensor[intermediate:]

        int4 = int4 or {}
        self.qkv, self.o, self.gate_up, self.down = (
            Linear(weight, bias, pack=pack, max_rows=max_rows, int4=int4.get(name), int4_max_rows=int4_max_rows)
            for name, (weight, bias) in weights.items())


def int4_layer_weights(model: nn.Module, dtype: torch.dtype, kernel: str = "auto") -> list[dict]:
    """Each decoder layer's q|k|v, o, gate|up and down weights that lie on a 4-bit grid, as
    ``int4.Int4Weight`` for activations in ``dtype``, fused in ``_Layer``'s order (a dict per layer).
    With our kernel, a weight on an 8-bit grid instead (a Q8_0 one, or the Q6_K ones GGUF's Q4_K_M
    mixes in) runs 8-bit as ``int4.Int8Weight``. A weight on neither grid is left out and keeps dense
    products. ``model`` should hold float32 weights (a dequantized GGUF loaded in float32), so the
    grid is exact. ``kernel``: see ``int4.pack_int4``. Raises ``RedrafterError`` naming the first weight
    when no weight is on a 4-bit grid."""
    layers, first_error, any_int4 = [], None, False
    ours = {torch.bfloat16: kernels.int4, torch.float32: kernels.avx2}.get(dtype)
    eight_bit = kernel != "torch" and ours is not None and ours() is not None
    for index, layer in enumerate(model.model.layers):
        packed, sizes = {}, fused_sizes(layer)
        for name, (weight, _) in fused_weights(layer).items():
            try:
                packed[name] = pack_int4(weight, dtype, kernel=kernel)
                any_int4 = True
            except Int4GridError as exc:
                first_error = first_error or f"layer {index} {name} weight: {exc}"
                if not eight_bit:
                    continue
                try:
                    packed[name] = pack_int8(weight, dtype)
                except Int4GridError:  # fused weights of different grids (q, k 4-bit, v 8-bit): in parts
                    try:
                        packed[name] = pack_parts(weight, sizes[name], dtype) if name in sizes else None
                    except Int4GridError:
                        pass
                if packed.get(name) is None:
                    packed.pop(name, None)
        layers.append(packed)
    if not any_int4:
        raise RedrafterError(f"--weights int4: no weight is 4-bit ({first_error}); int4 needs 4-bit weights, "
                             "e.g. a Q4_0 / Q4_1 / Q4_K GGUF")
    return layers


def runs_every_row(int4_layers: list[dict]) -> bool:
    """Whether packed layers (``int4_layer_weights``) run every decoder weight through our float32 kernel,
    which then runs every row count (``NativeTarget.int4_every_row``): the plain decoder weights are
    never read (``loading.model_without_decoder_weights`` does not load them)."""
    return all(len(layer) == 4 and all(w.kernel == "avx2" for w in layer.values()) for layer in int4_layers)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 and cast back, exactly as transformers' Llama/Qwen2 norms do."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:  # the same arithmetic, one fused op
        return F.rms_norm(x, weight.shape, weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def grouped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      allowed: torch.Tensor | None) -> torch.Tensor:
    """Attention with grouped key/value heads as two batched matrix products (softmax in float32).

    Args:
        q:       (batch, heads, n, head_dim) queries.
        keys:    (batch, kv_heads, span, head_dim); values the same shape.
        allowed: (batch, 1, n, span) bool, or None for all slots.
    Returns:
        (batch, heads, n, head_dim), what ``F.scaled_dot_product_attention(..., enable_gqa=True)``
        computes. The query heads that share a key/value head become rows of one product, so nothing is
        repeated per head. On CPUs in bfloat16 this beats the fused kernel for one new token, or several
        rows of a few tokens each (``use_grouped_attention``; decoding 64 rows over 300 slots: 1.9 ms
        against 19 ms per layer; docs/PERFORMANCE.md). It holds all scores at once (the fused kernel works in blocks), so it is
        meant for few new tokens per row. A query that may see no slot at all gets NaN (the fused kernel
        gives 0); the engine never builds such a mask (every token sees itself).
    """
    batch, heads, n, head_dim = q.shape
    kv_heads, span = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    scores = torch.matmul(q.reshape(batch, kv_heads, group * n, head_dim), keys.transpose(-1, -2))
    scores = scores.float().mul_(head_dim ** -0.5).view(batch, kv_heads, group, n, span)
    if allowed is not None:
        scores.masked_fill_(~allowed.view(batch, 1, 1, n, span), float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(q.dtype).view(batch, kv_heads, group * n, span)
    return torch.matmul(weights, values).view(batch, heads, n, head_dim)


GROUPED_ATTENTION_MAX_TOKENS = 64  # new tokens per row; prefills of longer prompts keep the fused kernel
ATTENTION_KERNEL_MAX_TOKENS = 64  # the same for our kernels (csrc/tree_attention.cpp, csrc/avx2/layer_f32.cpp)
ATTENTION_KERNEL_HEAD_DIMS = (16, 32, 64, 80, 96, 128, 192, 256)


def cache_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """A plain-decoding cache's dtype for a model in ``dtype``: float32 for bf16/fp16 on CPU, else the model's."""
    return torch.float32 if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) else dtype


def use_grouped_attention(dtype: torch.dtype, device: torch.device, batch: int, n: int, *, wide: bool = False) -> bool:
    """Where ``grouped_attention`` is faster than the fused kernel (measured on CPU, docs/PERFORMANCE.md)
    for a model in ``dtype``: bf16/fp16 with a single new token, or several rows of at most 64 new
    tokens (prefills of 128 or 256 tokens are faster fused). On a float32 cache of such a model
    (``wide``, plain decoding) one row is faster fused (41 against 78 us per layer for one token over
    300 slots). float32 models keep the fused kernel (both cost the same there, and the exactness
    tests run in float32), or run ours (``kernels.avx2_layers``) where it runs."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return False
    if wide:
        return batch > 1 and n <= GROUPED_ATTENTION_MAX_TOKENS
    return n == 1 or (batch > 1 and n <= GROUPED_ATTENTION_MAX_TOKENS)


STATIC_ROPE = ("default", "linear", "llama3")  # rotary types whose cos/sin depend on the position alone
ROTARY_TABLE_MIN = 1024  # positions in the first rotary table (NativeTarget._rotary)


def signed_rotary(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) -> (cos, sin with its first half negated): rotate_half's sign folded into sin."""
    half = sin.shape[-1] // 2
    return cos, torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


class NativeTarget:
    """The native implementation of the TargetModel protocol (see the module docstring)."""

    def __init__(self, model: nn.Module, *, name: str = "", weight_major_rows: int | None = None,
                 pack_weights: bool | None = None, compile: bool = False, int4_layers: list[dict] | None = None,
                 int4_max_rows: int | None = None, attention_kernel: str = "auto", lm_head_int8=None) -> None:
        config = model.config
        reason = unsupported_reason(config)
        if reason is not None:
            raise RedrafterError(unsupported_message(reason))
        self.model = model.eval().requires_grad_(False)  # kept (sharing the fused weights) for transformers baselines
        self.info: TargetInfo = target_info(model, name)
        self.config = config
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.num_layers = config.num_hidden_layers
        base = model.model
        self.embedding = base.embed_tokens.weight.detach()
        self.rotary = base.rotary_emb
        self._rotary_table: tuple[torch.Tensor, torch.Tensor] | None = None  # (positions, head_dim) cos and signed sin
        self._compiled = compile  # a compiled forward computes the rotary embedding each time (no table to trace)
        self.norm = base.norm.weight.detach()
        self.norm_eps = base.norm.variance_epsilon
        # Linear kernels (module doc): oneDNN-packed weights on CPU unless compiling (inductor cannot
        # trace opaque oneDNN tensors); otherwise weight @ x^T up to this many rows.
        if weight_major_rows is None:
            weight_major_rows = 64 if self.device.type == "cpu" else 0
        if pack_weights is None:
            pack_weights = self.device.type == "cpu"
        pack_weights = pack_weights and not compile
        self.weight_major_rows = weight_major_rows
        head = model.get_output_embeddings()
        head_bias = getattr(head, "bias", None)
        # float32 with our AVX2 products for every decoder weight: they run every row count, a prefill's
        # too (within about 15% of oneDNN's dense float32 products at 256 rows, faster below 64 rows), so
        # no oneDNN copy of those weights is made: a quarter of the load time and 6 GB less memory for
        # Qwen2.5-1.5B. The 8-bit LM head then runs every row count as well.
        self.int4_every_row = int4_layers is not None and int4_max_rows is None and runs_every_row(int4_layers)
        every_row = {"pack": False, "int4_max_rows": EVERY_ROW} if self.int4_every_row else {}
        # lm_head_int8 (``int4.pack_int8``, for an LM head on a Q8_0 grid): steps of up to 16 tokens run it.
        head_every_row = every_row if lm_head_int8 is not None and lm_head_int8.kernel == "avx2" else {}
        # Weights left on the meta device (``loading.model_without_decoder_weights``) must never be read.
        unloaded = [name for name, p in model.named_parameters() if p.is_meta]
        if unloaded and not (self.int4_every_row and (not head.weight.is_meta or head_every_row)):
            raise RedrafterError(f"{len(unloaded)} weights were not loaded (e.g. {unloaded[0]}), but some product "
                                 "would read them: load the model whole")
        self.lm_head = Linear(head.weight.detach(), None if head_bias is None else head_bias.detach(),
                              **{"pack": pack_weights, "max_rows": weight_major_rows, "int4": lm_head_int8,
                                 **head_every_row})
        self.lm_head_weights = "int8" if lm_head_int8 is not None else "dense"
        # int4_layers (``int4_layer_weights``): products of up to int4_max_rows rows run 4-bit.
        if int4_layers is not None and len(int4_layers) != len(base.layers):
            raise RedrafterError(f"{len(int4_layers)} int4 layers for a model of {len(base.layers)}")
        # int4_max_rows None: each weight's kernel decides (``Int4Weight.max_rows``).
        self.weights = "int4" if int4_layers is not None else "dense"  # what --weights chose
        # of the 4 * layers decoder weights: how many run 4-bit, how many 8-bit in all or part (Q8_0 / Q6_K)
        self.int8_count = sum(isinstance(w, (Int8Weight, MixedWeight)) for layer in int4_layers or [] for w in layer.values())
        self.int4_count = sum(len(layer) for layer in int4_layers or []) - self.int8_count
        self.layers = [_Layer(layer, self.heads, self.kv_heads, self.head_dim, **{
                              "pack": pack_weights, "max_rows": weight_major_rows,
                              "int4": None if int4_layers is None else int4_layers[i], "int4_max_rows": int4_max_rows,
                              **every_row})
                       for i, layer in enumerate(base.layers)]
        linears = [linear for layer in self.layers for linear in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        self.int4_max_rows = max(linear.int4_max_rows for linear in linears)  # the longest 4-bit step
        self.int4_kernels = sorted({linear.int4.kernel for linear in linears if linear.int4})  # "avx512", "avx2", "torch"
        self.packed = self.lm_head.packed is not None or self.int4_every_row  # the plain weights can go
        # Attention of steps of up to ATTENTION_KERNEL_MAX_TOKENS new tokens per row: ours
        # (kernels.attention) for bf16 models on CPU where it runs, ours for float32 (kernels.avx2_layers,
        # below) where that runs, else torch's.
        if attention_kernel not in ("auto", "ours", "torch"):
            raise RedrafterError(f"unknown attention kernel '{attention_kernel}' (expected auto, ours or torch)")
        fits = self.device.type == "cpu" and self.dtype == torch.bfloat16 and self.head_dim in ATTENTION_KERNEL_HEAD_DIMS
        float32_ours = (self.device.type == "cpu" and self.dtype == torch.float32 and not compile
                        and config.hidden_size % 8 == 0 and self.head_dim % 16 == 0 and self.head_dim <= 256
                        and config.intermediate_size % 8 == 0 and kernels.avx2_layers() is not None)
        if attention_kernel == "ours" and not fits and not float32_ours:
            reason = (f"not here: {kernels.avx2_layers_unavailable_reason()}" if self.dtype == torch.float32
                      and kernels.avx2_layers_unavailable_reason() else "")
            raise RedrafterError("our attention kernel runs bfloat16 models on CPU with a head size of "
                                 f"{'/'.join(map(str, ATTENTION_KERNEL_HEAD_DIMS))} (AVX-512 BF16), or float32 models "
                                 f"on CPUs with AVX2 and a head size a multiple of 16 up to 256 {reason}".rstrip())
        module = kernels.attention() if fits and attention_kernel != "torch" and not compile else None
        if attention_kernel == "ours" and module is None and not float32_ours:
            raise RedrafterError("our attention kernel cannot run here: "
                                 f"{(kernels.avx2_layers_unavailable_reason() if self.dtype == torch.float32 else kernels.attention_unavailable_reason()) or 'its build failed (see the log)'}")
        # With it, each layer's rotary embedding and cache write are one call (csrc/layer_ops.cpp, bit-identical
        # to the tensor version), attention reads the cache without views made in Python, and the MLP's
        # SiLU and multiply are one call (the same roundings; our exp can move a SiLU by its last bit).
        self._layer_kernels = module
        # RMSNorm of bf16 rows in one call (kernels: bit-identical to ``rms_norm``, tests/test_cpu_kernels.py).
        fused = kernels.load() if self.device.type == "cpu" and self.dtype == torch.bfloat16 and not compile else None
        self._norm = fused.rms_norm_bf16 if fused is not None else rms_norm
        # float32 on CPU with AVX2: our RMSNorm (one call instead of about ten operations), SiLU x up, and for
        # steps of up to ATTENTION_KERNEL_MAX_TOKENS tokens the rotary embedding with the cache write and
        # attention (csrc/avx2/layer_f32.cpp).
        self._avx2 = kernels.avx2_layers() if float32_ours and attention_kernel != "torch" else None
        if self._avx2 is not None:
            self._norm = self._avx2.rms_norm_f32
        self.attention_kernel = "ours" if module is not None or self._avx2 is not None else "torch"  # what runs
        # Every decoder layer in one call (csrc/decoder.cpp: the same kernel calls in the same order, so
        # the same values, without ten Python-level calls per layer) where all of them run our kernels:
        # our attention and RMSNorm, and our 4- or 8-bit products for every linear weight.
        self._decoder = None
        # the 4- and 8-bit decoder weights our kernel runs, then an 8-bit LM head's, in the order a forward reads them
        ours = [linear for linear in linears + [self.lm_head] if linear.int4 is not None and linear.int4.kernel in OUR_KERNELS]
        if ours:
            in_one_block(ours)
        self._decoder_f32 = None
        kinds = {linear.int4.kernel if linear.int4 is not None else None for linear in linears}
        if module is not None and fused is not None and kinds == {"avx512"}:
            self._decoder = module.decoder_layers
        elif self._avx2 is not None and kinds == {"avx2"}:
            # The same for a float32 model whose linear weights all run our AVX2 kernel (csrc/avx2/gemm_f32.cpp:
            # the loop's calls, from C++).
            self._decoder_f32 = self._avx2.decoder_layers_f32
        if self._decoder is not None or self._decoder_f32 is not None:
            no_bias = torch.empty(0, dtype=self.dtype, device=self.device)
            self._decoder_weights = [
                tensor for layer in self.layers for tensor in (
                    layer.input_norm, layer.post_norm, *_int4_operands(layer.qkv, no_bias),
                    *_int4_operands(layer.o, no_bias), *_int4_operands(layer.gate_up, no_bias),
                    *_int4_operands(layer.down, no_bias))]
            self._decoder_eps = [float(layer.eps) for layer in self.layers]
            # rows every product runs 4-bit, and at most the kernels' own step size (not a prefill's)
            self._decoder_rows = min(min(linear.int4_max_rows for linear in linears),
                                     min(linear.int4.max_rows for linear in linears))
        if compile:  # dynamic shapes: the context and the tree size change every step
            self.forward = torch.compile(self.forward, dynamic=True)

    def release_transformers_weights(self) -> int:
        """Free the plain weights that only the transformers model still needs; returns the bytes freed.

        With packed weights (CPU), every linear weight exists twice: the oneDNN copy this backend runs
        and the plain tensor the transformers modules (used by transformers-based baselines and
        datagen's sampling path) hold. A server or ``redrafter generate`` needs only the packed copy,
        so this halves the weights' memory. Afterwards ``self.model`` is None. The embedding (and an
        LM head tied to it) stays. Weights whose 4-/8-bit kernel runs every row count (``int4_every_row``)
        need no plain copy either. Without packed weights, nothing is freed.
        """
        if not self.packed or self.model is None:
            return 0
        freed = 0
        empty = torch.empty(0, dtype=self.dtype, device=self.device)
        embedding_storage = self.embedding.untyped_storage().data_ptr()
        linears = [linear for layer in self.layers for linear in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        if self.lm_head.weight.untyped_storage().data_ptr() != embedding_storage:
            linears.append(self.lm_head)
        for linear in linears:
            if linear.packed is None and linear.int4_max_rows < EVERY_ROW:  # runs the plain weight
                continue
            if not linear.weight.is_meta:  # (never loaded: ``loading.model_without_decoder_weights``)
                freed += linear.weight.numel() * linear.weight.element_size()
            linear.weight = None
        for module in self.model.modules():  # the transformers modules' views of the same tensors
            if (isinstance(module, nn.Linear) and not module.weight.is_meta
                    and module.weight.untyped_storage().data_ptr() != embedding_storage):
                module.weight.data = empty
        self.model = None
        release_free_heap()
        return freed

    # ------------------------------------------------------------------ cache

    @torch.inference_mode()
    def new_cache(self, batch_size: int, capacity: int = 256, *, plain_decoding: bool = False) -> NativeCache:
        """``plain_decoding``: after the prefill every step brings one token per row. A bf16/fp16 model
        on CPU then keeps its cache in float32 (``cache_dtype``) and attends in float32: one new token
        attends 2-3x faster there than in bf16 (docs/PERFORMANCE.md). The cached k and v are the
        model's own reduced-precision values, held exactly. Tree steps keep the model's dtype, where
        the casts cost more than the wider attention saves. With our attention kernel
        (``attention_kernel``), which attends a bf16 cache faster than torch's a float32 one, every
        cache keeps the model's dtype."""
        dtype = cache_dtype(self.dtype, self.device) if plain_decoding and self._layer_kernels is None else self.dtype
        kv = torch.zeros(self.num_layers, 2, batch_size, self.kv_heads, capacity, self.head_dim,
                         dtype=dtype, device=self.device)
        return NativeCache(kv=kv, lengths=torch.zeros(batch_size, dtype=torch.long, device=self.device))

    @staticmethod
    def _reserve(cache: NativeCache, slots: int) -> None:
        if slots <= cache.capacity:
            return
        capacity = cache.capacity
        while capacity < slots:
            capacity *= 2
        grown = cache.kv.new_zeros(*cache.kv.shape[:4], capacity, cache.kv.shape[5])
        grown[:, :, :, :, : cache.capacity] = cache.kv
        cache.kv = grown

    # ------------------------------------------------------------------ model

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.embedding)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                cache: NativeCache) -> ForwardOutput:
        if cache.pending:
            raise RuntimeError("forward called twice without commit")
        batch, n = tokens.shape
        start = cache.lengths
        span = int(start.max()) + n  # slots the attention reads
        self._reserve(cache, span)
        rows = torch.arange(batch, device=self.device).view(batch, 1)
        slots = start.view(batch, 1) + torch.arange(n, device=self.device)  # (batch, n) where new tokens go
        same_start = bool((start == start[0]).all())
        allowed = None  # one new token per row, all rows at the same length: every slot is visible
        # Our kernels (bf16 on CPU; the cache then keeps the model's dtype): rotary and cache write always,
        # attention for steps of up to ATTENTION_KERNEL_MAX_TOKENS tokens per row.
        fused = self._layer_kernels if cache.kv.dtype == self.dtype else None
        ours = fused is not None and n <= ATTENTION_KERNEL_MAX_TOKENS
        if n > 1 or not same_start or not bool(mask.all()):
            # (batch, 1, n, span): the row's committed slots, then the tree mask over the new slots.
            slot = torch.arange(span, device=self.device).view(1, span)
            offset = slot - start.view(batch, 1)  # (batch, span) index of a slot among the new tokens
            inside = (offset >= 0) & (offset < n)
            tree = mask.gather(2, offset.clamp(0, n - 1).view(batch, 1, span).expand(batch, n, span))
            allowed = ((offset < 0).view(batch, 1, span) | (inside.view(batch, 1, span) & tree)).unsqueeze(1)
        if ours:  # (batch, n, span), or empty for every slot
            allowed_rows = torch.empty(0, dtype=torch.bool) if allowed is None else allowed.view(batch, n, span)

        x = self.embed(tokens)
        cos, signed_sin = self._rotary(x, positions, span)  # (batch, n, head_dim) in the model dtype
        half = self.head_dim // 2
        rope_cos, rope_sin = cos, signed_sin  # (batch, n, head_dim), for the kernel
        cos, signed_sin = cos.unsqueeze(2), signed_sin.unsqueeze(2)  # (batch, n, 1, head_dim): over heads
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        wide = cache.kv.dtype != x.dtype  # a plain-decoding cache: attention in its wider dtype
        grouped = use_grouped_attention(x.dtype, x.device, batch, n, wide=wide)
        scale = self.head_dim ** -0.5
        one_call = ours and self._decoder is not None and batch * n <= self._decoder_rows
        if one_call:  # every layer in one call: the loop below, in C++
            x = self._decoder(x, self._decoder_weights, self._decoder_eps, rope_cos, rope_sin, cache.kv, slots,
                              self.heads, self.kv_heads, span, allowed_rows, scale)
        # float32 with our AVX2 kernels: the rotary embedding, cache write and attention of steps of a few tokens
        avx2_attention = self._avx2 is not None and not wide and n <= ATTENTION_KERNEL_MAX_TOKENS
        if avx2_attention:
            starts = start.tolist()
            allowed_or_all = torch.empty(0, dtype=torch.bool) if allowed is None else allowed
        if (not one_call and avx2_attention and self._decoder_f32 is not None
                and batch * n <= self._decoder_rows):  # and all our products: the loop below, in C++
            one_call = True
            x = self._decoder_f32(x, self._decoder_weights, self._decoder_eps, rope_cos, rope_sin, cache.kv, starts,
                                  self.heads, self.kv_heads, span, allowed_or_all, scale)
        for i, layer in enumerate(() if one_call else self.layers):
            h = self._norm(x, layer.input_norm, layer.eps)
            qkv = layer.qkv(h)
            if avx2_attention:  # q (batch, n, heads, head_dim) -> attn (batch, n, heads * head_dim)
                q = self._avx2.rope_store_f32(qkv, rope_cos, rope_sin, cache.kv, i, starts, self.heads, self.kv_heads)
                attn = self._avx2.attention_f32(q, cache.kv, i, span, allowed_or_all, scale)
            elif fused is not None:  # rotary and cache write in one call; q is (batch, n, heads, head_dim)
                q = fused.rope_store(qkv, rope_cos, rope_sin, cache.kv, i, slots, self.heads, self.kv_heads)
                if ours:
                    attn = fused.cache_attention(q, cache.kv, i, span, allowed_rows, scale).view(batch, n, q_size)
                else:
                    q = q.transpose(1, 2)
            else:
                # Rotary embedding on the q and k heads together: (batch, n, heads + kv_heads, head_dim).
                qk = qkv[..., : q_size + kv_size].view(batch, n, self.heads + self.kv_heads, self.head_dim)
                qk = torch.addcmul(qk * cos, qk.roll(half, dims=-1), signed_sin).transpose(1, 2)
                v = qkv[..., q_size + kv_size:].view(batch, n, self.kv_heads, self.head_dim).transpose(1, 2)
                if wide:
                    qk, v = qk.to(cache.kv.dtype), v.to(cache.kv.dtype)
                q, k = qk[:, : self.heads], qk[:, self.heads:]
                keys, values = cache.kv[i, 0], cache.kv[i, 1]  # (batch, kv_heads, capacity, head_dim)
                if same_start:
                    s0 = int(start[0])
                    keys[:, :, s0: s0 + n] = k
                    values[:, :, s0: s0 + n] = v
                else:
                    keys[rows, :, slots] = k.transpose(1, 2)
                    values[rows, :, slots] = v.transpose(1, 2)
            if not ours and not avx2_attention:  # q (batch, heads, n, head_dim)
                keys, values = cache.kv[i, 0, :, :, :span], cache.kv[i, 1, :, :, :span]
                if grouped:
                    attn = grouped_attention(q, keys, values, allowed)
                else:
                    attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed,
                                                          enable_gqa=self.kv_heads != self.heads)
                attn = attn.transpose(1, 2).reshape(batch, n, q_size).to(x.dtype)
            x = layer.o(attn, residual=x)
            h = self._norm(x, layer.post_norm, layer.eps)
            if fused is not None:
                x = layer.down(fused.silu_mul(layer.gate_up(h)), residual=x)
            elif self._avx2 is not None:
                gate_up = layer.gate_up(h)
                x = layer.down(self._avx2.silu_mul_f32(gate_up.view(-1, gate_up.shape[-1])).view(batch, n, -1),
                               residual=x)
            else:
                gate, up = layer.gate_up(h).chunk(2, dim=-1)
                x = layer.down(F.silu(gate) * up, residual=x)
        hidden = self._norm(x, self.norm, self.norm_eps)
        cache.pending = n
        return ForwardOutput(hidden, self.project)

    def _rotary(self, x: torch.Tensor, positions: torch.Tensor, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin) at ``positions`` (batch, n), each (batch, n, head_dim) in x's dtype.

        Rotary: x * cos + rotate_half(x) * sin, where rotate_half(x) = cat(-x2, x1) = roll(x, half) * sign;
        folding the sign into sin leaves one roll per layer instead of two slices, a neg and a cat.
        Where the model's rotary embedding does not change with the positions seen (``STATIC_ROPE``),
        both come from a table it computed for every position up to ``span`` or more: one lookup per
        forward instead of about ten operations, the same values (its cos and sin are elementwise)."""
        if self._compiled or getattr(self.rotary, "rope_type", None) not in STATIC_ROPE:
            return signed_rotary(*self.rotary(x, positions))
        table = self._rotary_table
        if table is None or table[0].shape[0] < span or table[0].dtype != x.dtype:
            size = max(span, ROTARY_TABLE_MIN, 2 * table[0].shape[0] if table is not None else 0)
            cos, signed_sin = signed_rotary(*self.rotary(x[:1, :1], torch.arange(size, device=x.device).view(1, size)))
            table = self._rotary_table = (cos[0], signed_sin[0])
        return table[0][positions], table[1][positions]

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head logits (..., V) in float32."""
        return self.lm_head(hidden).float()

    @torch.inference_mode()
    def select_rows(self, cache: NativeCache, rows: torch.Tensor) -> None:
        if cache.pending:
            raise RuntimeError("select_rows called with a pending forward")
        cache.kv = cache.kv.index_select(2, rows)
        cache.lengths = cache.lengths[rows]

    @torch.inference_mode()
    def commit(self, cache: NativeCache, keep: torch.Tensor, counts: torch.Tensor) -> None:
        if not cache.pending:
            raise RuntimeError("commit called without a pending forward")
        # Only the first counts.max() columns matter: a capped tree can have fewer tokens than keep has
        # columns, and slots past the forward's tokens may lie beyond the reserved cache.
        keep = keep[:, : int(counts.max()) if counts.numel() else 0]
        batch, kept = keep.shape
        start = cache.lengths.view(batch, 1)
        order = torch.arange(kept, device=self.device).view(1, kept)
        # Slots past a row's count copy onto themselves; kept tokens already in place need no move.
        source = torch.where(order < counts.view(batch, 1), keep, order)
        if not bool((source == order).all()):
            rows = torch.arange(batch, device=self.device).view(batch, 1)
            cache.kv[:, :, rows, :, start + order] = cache.kv[:, :, rows, :, start + source]
        cache.lengths = cache.lengths + counts
        cache.pending = 0
