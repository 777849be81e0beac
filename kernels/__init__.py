"""Triton kernels of fastbisenet, imported as ``fastbisenet.kernels``: one fused op per module.

Each ``<op>.py`` holds ``@triton.jit`` kernels and their launch helpers only; autograd Functions and
dispatch live in :mod:`fastbisenet.ops`.

``INTERPRET`` records whether Triton's CPU interpreter was requested (``TRITON_INTERPRET=1``) when
this package was first imported: kernels are built for the interpreter or for the GPU at that moment.
"""

import functools
import os

import torch

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=8)
def sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device ``index`` (grid sizing)."""
    return torch.cuda.get_device_properties(index).multi_processor_count
