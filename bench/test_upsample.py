"""Context-path stages: attend (x * a) + add + nearest upsample.

Shapes are traced from the model (bench.common.traced_cases); one row per variant, grouped by op+shape.
"""

from __future__ import annotations

from typing import Any

import pytest

from bench import common


@pytest.mark.parametrize(("case", "dtype", "pass_", "variant"), common.op_params("upsample"))
def test_upsample(benchmark: Any, case: Any, dtype: str, pass_: str, variant: str, floors: dict,
        bench_env: dict) -> None:
    common.run_op(benchmark, case, dtype, pass_, variant, floors, bench_env)
