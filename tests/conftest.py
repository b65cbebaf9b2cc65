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
