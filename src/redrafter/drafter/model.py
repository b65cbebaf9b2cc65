"""The recurrent draft head (REDRAFTER.md "Drafter"), in the reference checkpoint layout.

    s_0 = 0
    s_t = SiLU(rnn_w · E(x_t) + rnn_u · s_{t-1} + b_u)          (rnn=False: s_t = s_{t-1} + E(x_t))
    z   = input_proj(concat[h, s_t])                              (only when exit_dim != 2H)
    z   = z + SiLU(lm_head.i.linear(z))     for i < num_draft_layers
    q   = softmax(lm_head.{num_draft_layers}(z))

E is the target's input embedding table; the drafter does not own it, so callers pass embeddings.
With a reduced draft vocabulary the projection covers V_d tokens and ``draft_to_target`` (V_d,)
maps its indices to target token ids; drafts are proposals only, so verification stays exact.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from redrafter.config import DrafterConfig
from redrafter.errors import RedrafterError
from redrafter.utils import atomic_directory, ordinary_permissions

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
RECOMMENDED_NAME = "generation.json"  # optional: the beam setting measured best for this drafter


class ResBlock(nn.Module):
    """x + SiLU(Linear(x)); the parameter lives at ``linear`` as in the reference."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(x))


class Drafter(nn.Module):
    """The ReDrafter head. Parameter names follow the reference layout exactly."""

    def __init__(self, config: DrafterConfig) -> None:
        super().__init__()
        self.config = config
        hidden, exit_dim = config.hidden_size, config.exit_dim
        self.input_proj = nn.Linear(2 * hidden, exit_dim, bias=True) if config.has_input_proj else None
        self.lm_head = nn.Sequential(
            *[ResBlock(exit_dim) for _ in range(config.num_draft_layers)],
            nn.Linear(exit_dim, config.vocab_size, bias=False),
        )
        if config.rnn:
            self.rnn_u = nn.Linear(hidden, hidden, bias=True)
            self.rnn_w = nn.Linear(hidden, hidden, bias=False)
        self.draft_to_target: torch.Tensor | None
        if config.target_vocab_size is not None:
            self.register_buffer("draft_to_target", torch.arange(config.vocab_size))
        else:
            self.draft_to_target = None

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Map indices of the drafter's vocabulary projection to target token ids."""
        return draft_ids if self.draft_to_target is None else self.draft_to_target[draft_ids]

    def initial_state(self, context: torch.Tensor) -> torch.Tensor:
        """s_0 = 0, shaped like ``context`` (..., H)."""
        return torch.zeros_like(context)

    def next_state(self, state: torch.Tensor, token_embedding: torch.Tensor) -> torch.Tensor:
        """One RNN step. state, token_embedding: (..., H) -> (..., H)."""
        if not self.config.rnn:
            return state + token_embedding
        return nn.functional.silu(self.rnn_w(token_embedding) + self.rnn_u(state))

    def logits(self, context: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Draft logits. context h: (..., H), state s_t: (..., H) -> (..., vocab_size)."""
        z = torch.cat([context, state], dim=-1)
        if self.input_proj is not None:
            z = self.input_proj(z)
        return self.lm_head(z)


DRAFTER_WEIGHTS = ("auto", "dense", "int4")


def int4_drafting_unavailable_reason(drafter: Drafter) -> str | None:
    """Why ``inference_copy(drafter, weights="int4")`` cannot run (None when it can)."""
    from redrafter.models import kernels

    parameter = next(drafter.parameters())
    if parameter.device.type != "cpu" or parameter.dtype not in (torch.bfloat16, torch.float32):
        return f"int4 drafting runs bfloat16 or float32 drafters on CPU, not {parameter.dtype} on {parameter.device.type}"
    if parameter.dtype == torch.float32:
        return kernels.avx2_unavailable_reason() or (None if kernels.avx2() is not None else "our kernels did not build")
    return kernels.int4_unavailable_reason() or (None if kernels.int4() is not None else "our kernels did not build")


def inference_copy(drafter: Drafter, *, weights: str = "auto") -> Drafter:
    """A frozen copy of ``drafter`` for drafting: its linear layers run on oneDNN-packed weights where
    the device offers them (``models.base.Linear``; the same products, in another summation order).

    Drafting runs a few rows at a time, where MKL repacks the weight for each product (W = 2 cost twice
    W = 1); products of up to 8 rows of a bf16 drafter run our bf16 kernel where it loads (``few_rows``).
    ``weights``: "int4" rounds each linear weight to 4 bits per group of 32 inputs (``int4.round_4bit``,
    a Q4_1 quantizer) and runs products of up to 64 rows with our int4 kernel: drafting follows a
    forward that streamed the target's weights through the caches, so the drafter's weights come cold
    from memory, and 4 bits stream a quarter of the bytes (docs/PERFORMANCE.md). Only the proposals
    change (the target verifies every token), and little: MT-Bench τ 2.10 with bf16 weights, 2.09
    rounded. "auto": int4 where it runs (a bf16 drafter on a CPU with our AVX-512 kernels, a float32 one
    with our AVX2 kernel), else "dense".
    The copy is a snapshot: later changes to ``drafter`` (training) do not reach it, and it
    stays on its device and dtype (make another copy rather than moving it). A drafter that already is
    such a copy is returned as is, so proposers sharing one drafter can share one copy.
    """
    from redrafter.models.base import Linear
    from redrafter.models.int4 import pack_int4

    if getattr(drafter, "is_inference_copy", False):
        return drafter
    if weights not in DRAFTER_WEIGHTS:
        raise RedrafterError(f"unknown drafter weights '{weights}' (expected one of {', '.join(DRAFTER_WEIGHTS)})")
    reason = int4_drafting_unavailable_reason(drafter) if weights != "dense" else "dense weights requested"
    if weights == "int4" and reason is not None:
        raise RedrafterError(f"--drafter-weights int4 cannot run here: {reason}")
    fast = copy.deepcopy(drafter).eval().requires_grad_(False)
    fast.weights = "dense"
    for module in fast.modules():
        if isinstance(module, nn.Linear):
            weight = module.weight.detach()
            out_features, in_features = weight.shape
            int4 = None
            if reason is None and out_features % 16 == 0 and in_features % 32 == 0:
                dtype = weight.dtype if weight.dtype == torch.float32 else torch.bfloat16
                int4 = pack_int4(weight.float(), dtype, kernel="avx2" if dtype == torch.float32 else "avx512",
                                 rounding=True)
                fast.weights = "int4"
            layer = Linear(weight, None if module.bias is None else module.bias.detach(), pack=True, few_rows=True,
                           int4=int4)
            if layer.packed is not None or layer.bf16 is not None or layer.int4 is not None:
                module.forward = layer
    fast.is_inference_copy = True
    fast.fused_search = FusedSearch.of(fast)
    return fast


class FusedSearch:
    """The whole beam search of an inference copy in one call (``csrc/draft_search.cpp``), when every
    linear layer runs our int4 products: the same products and roundings as ``beam_search``'s loop
    over the copy, so the same beams and scores, bit for bit (tests/test_beam_search.py), without
    the loop's tensor operations from Python (docs/PERFORMANCE.md). A bf16 drafter runs the AVX-512
    extension's (``kernels.int4()``), a float32 one the AVX2 extension's (``kernels.avx2()``)."""

    def __init__(self, module, layers: list, draft_to_target: torch.Tensor | None, has_input_proj: bool,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        from redrafter.models.int4 import in_one_block

        # The layers' 4-bit weights move into one block on huge pages, which the layers then share:
        # a search reads them right after a target forward has evicted them.
        in_one_block(layers)
        self.packed = [layer.int4.packed for layer in layers]
        self.scales = [layer.int4.scales for layer in layers]
        self.dtype = dtype  # the drafter's activations and the embedding table the search reads
        empty = torch.empty(0, dtype=dtype)
        self.biases = [empty if layer.bias is None else layer.bias for layer in layers]
        self.draft_to_target = torch.empty(0, dtype=torch.long) if draft_to_target is None else draft_to_target
        self.has_input_proj = has_input_proj
        self.max_rows = min(layer.int4_max_rows for layer in layers)  # beyond: the loop's other kernels
        self.module = module  # the extension (kernels.int4() or kernels.avx2())

    @classmethod
    def of(cls, fast: Drafter) -> "FusedSearch | None":
        """The fused search of an inference copy, or None (not every layer int4, or no RNN, or an
        extension without ``draft_search``)."""
        from redrafter.models import kernels
        from redrafter.models.base import Linear

        if not fast.config.rnn:
            return None
        modules = [fast.rnn_w, fast.rnn_u] + ([fast.input_proj] if fast.input_proj is not None else [])
        modules += [block.linear for block in fast.lm_head[:-1]] + [fast.lm_head[-1]]
        layers = [linear.forward for linear in modules]
        kinds = {layer.int4.kernel if isinstance(layer, Linear) and layer.int4 is not None else None for layer in layers}
        if kinds not in ({"avx512"}, {"avx2"}) or layers[1].bias is None:
            return None
        kernel = kinds.pop()
        module = kernels.int4() if kernel == "avx512" else kernels.avx2()
        if module is None or not hasattr(module, "draft_search"):
            return None
        return cls(module, layers, fast.draft_to_target, fast.input_proj is not None,
                   torch.bfloat16 if kernel == "avx512" else torch.float32)

    def __call__(self, context: torch.Tensor, g0: torch.Tensor, embedding: torch.Tensor, *, width: int,
                 length: int, keep_pruned: bool, min_prob: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(beams, scores, path_scores) as ``beam_search`` returns them, before any tree cap. With
        ``min_prob`` the nodes below it come back ``NO_TOKEN`` (``drop_below``), and only beams at or
        above it are extended: their children are the only ones that can reach it."""
        floor = math.log(min_prob) if min_prob > 0 else float("-inf")
        return tuple(self.module.draft_search(context.to(self.dtype).contiguous(), g0.contiguous(), embedding,
                                              self.packed, self.scales, self.biases, self.draft_to_target,
                                              self.has_input_proj, width, length, keep_pruned, floor))

    def step(self, context: torch.Tensor, state: torch.Tensor | None, ids: torch.Tensor,
             embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One depth for R rows: (next_state, logits (R, V_d)) as ``Drafter.next_state`` from ``state``
        (None: s_0) and the embedding of ``ids`` (R,), then ``Drafter.logits``, with context (R, H)."""
        empty = torch.empty(0, dtype=self.dtype)
        return tuple(self.module.draft_step(context, empty if state is None else state, ids.contiguous(), embedding,
                                            self.packed, self.scales, self.biases, self.has_input_proj))

    def runs(self, context: torch.Tensor, table: torch.Tensor | None, rows: int) -> bool:
        """Whether the fused calls serve ``rows`` drafter rows for ``context``, with the target's
        embedding ``table``: a table of the drafter's dtype, rows the int4 kernel takes, our tree kernels
        switched on."""
        from redrafter.tree import tree_kernel

        return (table is not None and table.dtype == self.dtype and rows <= self.max_rows
                and tree_kernel(context) is not None)


def load_drafter(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> Drafter:
    """Load a drafter directory (``config.json`` + ``model.safetensors``), checking every tensor."""
    path = Path(path)
    if not path.is_dir():
        raise RedrafterError(f"drafter directory not found: {path}")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise RedrafterError(f"drafter directory {path} has no {name}")
    try:
        raw = json.loads((path / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RedrafterError(f"drafter config {path / CONFIG_NAME} is not valid JSON: {exc}") from None
    config = DrafterConfig.from_dict(raw)
    try:
        state = load_file(str(path / WEIGHTS_NAME))
    except (SafetensorError, OSError, ValueError) as exc:
        raise RedrafterError(f"cannot read drafter weights {path / WEIGHTS_NAME}: {exc}") from None
    drafter = Drafter(config)
    expected = {k: tuple(v.shape) for k, v in drafter.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing {missing}")
        if unexpected:
            details.append(f"unexpected {unexpected}")
        if wrong:
            details.append("wrong shape " + ", ".join(f"{k} {found[k]} != {expected[k]}" for k in wrong))
        raise RedrafterError(f"drafter weights {path / WEIGHTS_NAME} do not match its config.json: "
                             + "; ".join(details))
    drafter.load_state_dict(state)
    return drafter.to(device=device, dtype=dtype).eval()  # casts floating tensors only; the map stays int64


def save_drafter(drafter: Drafter, path: str | os.PathLike) -> None:
    """Write the reference layout atomically (a temporary sibling directory renamed into place)."""
    with atomic_directory(path) as tmp:
        write_drafter_files(drafter, tmp)


def write_drafter_files(drafter: Drafter, directory: Path, dtype: torch.dtype | None = None) -> None:
    """``config.json`` and ``model.safetensors`` into an existing directory (floats cast to ``dtype``)."""
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
             for k, v in drafter.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    ordinary_permissions(directory / WEIGHTS_NAME)
    (directory / CONFIG_NAME).write_text(json.dumps(drafter.config.to_dict(), indent=2) + "\n")


def recommended_beam(path: str | os.PathLike | None, weights: str = "dense", sampling: bool = False):
    """The draft shape stored next to a drafter as the best one measured (``generation.json`` with
    ``beam_width``, ``beam_length`` and optionally ``min_draft_prob``, ``max_tree_tokens``,
    ``lookup_tokens``, ``lookup_ngram``, ``min_tokens_per_step`` and ``extend_prob``), or None.

    The best shape depends on what a tree of K tokens costs against a decode step, which depends on the
    target's weight format (``weights``: "dense" or "int4"); an object under the format's name (e.g.
    ``"int4": {"beam_width": 8, ...}``) holds the shape measured for it, and the top-level keys the
    dense one (also used for a format with no entry). ``weights`` may name a kernel too, as
    "int4:torch" (``beam_format``): its own entry when there is one, else the format's. With
    ``sampling`` (temperature > 0), keys under the entry's ``"sampling"`` object override it: drafts
    drawn from q fill a tree cap differently, so the best cap may differ."""
    from redrafter.config import BeamConfig

    if path is None or not (Path(path) / RECOMMENDED_NAME).is_file():
        return None
    try:
        data = json.loads((Path(path) / RECOMMENDED_NAME).read_text())
        for key in (weights, weights.partition(":")[0]):
            if isinstance(data.get(key), dict):
                data = data[key]
                break
        if sampling and isinstance(data.get("sampling"), dict):
            data = {**data, **data["sampling"]}
        return BeamConfig(width=int(data["beam_width"]), length=int(data["beam_length"]),
                          min_prob=float(data.get("min_draft_prob", 0.0)),
                          max_tree_tokens=int(data.get("max_tree_tokens", 0)),
                          lookup_tokens=int(data.get("lookup_tokens", 0)),
                          lookup_ngram=int(data.get("lookup_ngram", BeamConfig.lookup_ngram)),
                          min_tokens_per_step=float(data.get("min_tokens_per_step", 0.0)),
                          extend_prob=float(data.get("extend_prob", 0.0)))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RedrafterError(f"{Path(path) / RECOMMENDED_NAME} is not a valid beam recommendation: {exc}") from None
