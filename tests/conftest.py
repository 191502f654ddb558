"""Test configuration: seeded RNGs, Triton in interpreter mode when there is no GPU, a `gpu` marker."""
import os
import random

import pytest
import torch

# Triton kernels run on CPU tensors in the interpreter where no GPU exists; this must be set before any
# Triton kernel is defined, i.e. before sparsegen_kernels.triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)
    try:
        import numpy as np

        np.random.seed(0)
    except ImportError:
        pass
    yield


def devices():
    """Devices to run op tests on: CPU always, CUDA where present."""
    return ["cpu"] + (["cuda"] if CUDA else [])
