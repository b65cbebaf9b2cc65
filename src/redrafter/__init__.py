"""redrafter: ReDrafter speculative decoding (recurrent drafter + beam search + dynamic tree
attention), lossless against the target model's own greedy decoding."""

from redrafter.config import BeamConfig, DrafterConfig, GenerationConfig, SamplingParams
from redrafter.drafter import Drafter, beam_search, load_drafter, save_drafter
from redrafter.engine import (AutoregressiveProposer, Engine, FinishEvent, GenerationStats, LookupProposer,
                              ReDrafterProposer, TokensEvent)
from redrafter.errors import RedrafterError
from redrafter.models import DEFAULT_MODEL, load_target

__version__ = "0.1.0"

__all__ = [
    "AutoregressiveProposer", "BeamConfig", "DEFAULT_MODEL", "Drafter", "DrafterConfig", "Engine", "FinishEvent",
    "GenerationConfig", "GenerationStats", "LookupProposer", "ReDrafterProposer", "RedrafterError", "SamplingParams",
    "TokensEvent", "beam_search",
    "load_drafter", "load_target", "save_drafter",
]
