"""Test configuration: Triton runs interpreted on CPU when no CUDA device is present.

``TRITON_INTERPRET=1`` must be in the environment before ``triton`` is first imported, so it is set
here, at conftest import, before any test module imports fastbisenet's kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def device() -> str:
    """``"cuda"`` when a GPU is present (kernels compiled), else ``"cpu"`` (kernels interpreted)."""
    return DEVICE


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
