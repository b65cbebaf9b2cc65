"""Target backend on any transformers causal LM (Llama, Qwen2, ... with a dynamic KV cache)."""

from __future__ import annotations

import dataclasses

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from redrafter.errors import RedrafterError
from redrafter.models.base import ForwardOutput, TargetInfo, few_row_linear


@dataclasses.dataclass
class HFCache:
    """A transformers ``DynamicCache`` plus per-row committed lengths.

    Rows of a batch may hold different numbers of tokens: slots at or beyond ``lengths[b]`` are
    stale for row b and masked out. ``pending`` is how many slots the last forward appended.
    """

    kv: DynamicCache
    lengths: torch.Tensor  # (batch,) long
    pending: int = 0

    @property
    def num_slots(self) -> int:
        return self.kv.get_seq_length()


def target_info(model: PreTrainedModel, name: str = "") -> TargetInfo:
    """Static facts about a transformers causal LM (stop tokens from its generation config)."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    if eos is None:
        eos = text_config.eos_token_id
    stop = tuple(sorted({eos} if isinstance(eos, int) else set(eos or ())))
    return TargetInfo(
        name=name or getattr(config, "_name_or_path", type(model).__name__),
        hidden_size=text_config.hidden_size,
        vocab_size=model.get_output_embeddings().weight.shape[0],
        max_positions=getattr(text_config, "max_position_embeddings", 1 << 20),
        stop_token_ids=stop,
    )


class TransformersTarget:
    """The transformers implementation of the TargetModel protocol."""

    def __init__(self, model: PreTrainedModel, *, name: str = "") -> None:
        self.model = model.eval().requires_grad_(False)  # frozen: no gradients through the target
        self.base = model.base_model  # the decoder stack; its output is the final norm's output
        self.lm_head = model.get_output_embeddings()
        if self.lm_head is None:
            raise RedrafterError(f"model {name or type(model).__name__} has no LM head")
        self.info = target_info(model, name)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.weights = "dense"  # the weight format (``loading.WEIGHT_FORMATS``); 4-bit products are native only

    def new_cache(self, batch_size: int, *, plain_decoding: bool = False) -> HFCache:
        """``plain_decoding`` (a layout hint the native backend uses) changes nothing here."""
        return HFCache(kv=DynamicCache(config=self.model.config),
                       lengths=torch.zeros(batch_size, dtype=torch.long, device=self.device))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(tokens)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                cache: HFCache) -> ForwardOutput:
        if cache.pending:
            raise RuntimeError("forward called twice without commit")
        batch, n = tokens.shape
        slots = cache.num_slots
        # (batch, 1, n, slots + n): committed slots of the row, then the given tree mask.
        committed = torch.arange(slots, device=self.device).view(1, 1, slots) < cache.lengths.view(batch, 1, 1)
        allowed = torch.cat([committed.expand(batch, n, slots), mask], dim=-1).unsqueeze(1)
        additive = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        additive.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        out = self.base(input_ids=tokens, attention_mask=additive, position_ids=positions,
                        cache=cache.kv, use_cache=True)
        hidden = out.last_hidden_state  # (batch, n, H)
        cache.pending = n
        return ForwardOutput(hidden, self.project)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head logits (..., V) in float32 (few rows: weight-major, see ``few_row_linear``)."""
        return few_row_linear(hidden, self.lm_head.weight, self.lm_head.bias).float()

    @torch.inference_mode()
    def commit(self, cache: HFCache, keep: torch.Tensor, counts: torch.Tensor) -> None:
        if not cache.pending:
            raise RuntimeError("commit called without a pending forward")
        batch, kept = keep.shape
        old_slots = cache.num_slots - cache.pending
        new_lengths = cache.lengths + counts
        new_slots = int(new_lengths.max())
        slot = torch.arange(new_slots, device=self.device).view(1, new_slots)
        lengths = cache.lengths.view(batch, 1)
        offset = (slot - lengths).clamp(0, kept - 1)  # index into keep for slots after the old length
        source = torch.where(slot < lengths, slot, old_slots + keep.gather(1, offset))  # (batch, new_slots)
        # Slots below the shortest row's old length stay where they are: gather only the tail, write it
        # in place and keep a view of the first new_slots (the next forward's cat copies the cache anyway).
        low = int(cache.lengths.min())
        tail = source[:, low:]
        for layer in self.cache_layers(cache):
            index = tail.view(batch, 1, -1, 1).expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            for name in ("keys", "values"):
                tensor = getattr(layer, name)
                moved = tensor.gather(2, index)
                tensor[:, :, low:new_slots] = moved
                setattr(layer, name, tensor[:, :, :new_slots])
        cache.lengths = new_lengths
        cache.pending = 0

    @torch.inference_mode()
    def select_rows(self, cache: HFCache, rows: torch.Tensor) -> None:
        if cache.pending:
            raise RuntimeError("select_rows called with a pending forward")
        for layer in self.cache_layers(cache):
            layer.keys, layer.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)
        cache.lengths = cache.lengths[rows]

    @staticmethod
    def cache_layers(cache: HFCache) -> list[DynamicLayer]:
        layers = cache.kv.layers
        for layer in layers:
            if type(layer) is not DynamicLayer:
                raise RedrafterError(f"cache layer type {type(layer).__name__} (e.g. sliding window) is not "
                                     "supported by the transformers backend yet")
        return layers
