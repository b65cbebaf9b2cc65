"""The recurrent draft head and beam search over it."""

from redrafter.drafter.beam_search import BeamSearchResult, beam_search
from redrafter.drafter.model import Drafter, load_drafter, save_drafter

__all__ = ["BeamSearchResult", "Drafter", "beam_search", "load_drafter", "save_drafter"]
