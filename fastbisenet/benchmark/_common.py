"""Constants and small helpers shared by the modules of :mod:`fastbisenet.benchmark`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

SCHEMA = "fastbisenet-bench/2"
VARIANTS = ("fastbisenet", "eager", "compile", "max-autotune")
"""fastbisenet = Triton backend; eager = reference ops (cuDNN); compile / max-autotune = torch.compile
of the reference (:data:`.workloads.COMPILE_MODES`)."""
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IGNORE_INDEX = 255


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
