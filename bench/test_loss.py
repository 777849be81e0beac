"""Per-pixel cross-entropy of the training loss (OHEM CE on the three heads' full-resolution logits).

Not a model op, so the case is built here: the heads' (N, 19, H, W) logits at each model input of
bench.common.OP_INPUTS, three calls per step (main + two aux heads). Forward, and forward + backward.
"""

from __future__ import annotations

from typing import Any

import pytest

from bench import common
from fastbisenet import benchmark as fb

N_CLASSES = 19
IGNORE_INDEX = 255


def _cases() -> list[fb.OpCase]:
    cases = []
    for shape in common.OP_INPUTS:
        n, _, h, w = shape
        logits = fb.TensorSpec((n, N_CLASSES, h, w), "float", channels_last=False)  # the heads write NCHW
        args = (logits, fb.TensorSpec((n, h, w), "int64"), IGNORE_INDEX)
        cases.append(fb.OpCase("cross_entropy", args, (), 3, ("conv_out", "conv_out16", "conv_out32"), shape, "v1"))
    return cases


@pytest.mark.parametrize(("case", "dtype", "pass_", "variant"), common.op_params("loss", _cases()))
def test_cross_entropy(benchmark: Any, case: Any, dtype: str, pass_: str, variant: str, floors: dict,
                       bench_env: dict) -> None:
    common.run_op(benchmark, case, dtype, pass_, variant, floors, bench_env)
