"""Target-model backends behind one protocol (base.py) and the loader for ``--model SPEC``."""

from redrafter.models.base import ForwardOutput, KVCache, TargetInfo, TargetModel
from redrafter.models.loading import DEFAULT_MODEL, load_target

__all__ = ["DEFAULT_MODEL", "ForwardOutput", "KVCache", "TargetInfo", "TargetModel", "load_target"]
