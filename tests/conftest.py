import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default model in fp32 (converted once into the user cache) and its tokenizer."""
    from redrafter.models.loading import load_target

    return load_target("smollm2-135m-instruct", dtype="float32")


@pytest.fixture(params=["tensors", "cpp"])
def implementation(request, monkeypatch):
    """Runs a test once with the tensor versions of the tree bookkeeping and beam selection, and once
    with our C++ versions (csrc/tree.cpp, csrc/beam_select.cpp; ``REDRAFTER_TREE_KERNEL``)."""
    if request.param == "tensors":
        monkeypatch.setenv("REDRAFTER_TREE_KERNEL", "torch")
    else:
        monkeypatch.delenv("REDRAFTER_TREE_KERNEL", raising=False)
        from helpers import require_kernels

        require_kernels("tree")
    return request.param
