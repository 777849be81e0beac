"""Segmentation heads: 1x1 classifier + bilinear upsample to full size, the fused argmax (pred), and
the fused head + per-pixel CE of the training loss (peers: head logits then ``F.cross_entropy``).

Shapes are traced from the model (bench.common.traced_cases); one row per variant, grouped by op+shape.
"""

from __future__ import annotations

from typing import Any

import pytest

from bench import common


@pytest.mark.parametrize(("case", "dtype", "pass_", "variant"), common.op_params("head"))
def test_head(benchmark: Any, case: Any, dtype: str, pass_: str, variant: str, floors: dict,
        bench_env: dict) -> None:
    common.run_op(benchmark, case, dtype, pass_, variant, floors, bench_env)
