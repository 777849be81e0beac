"""The backbone stem's max-pool (3x3, stride 2, pad 1), inference only: values without int64 indices.

Shapes are traced from the model (bench.common.traced_cases); one row per variant, grouped by op+shape.
"""

from __future__ import annotations

from typing import Any

import pytest

from bench import common


@pytest.mark.parametrize(("case", "dtype", "pass_", "variant"), common.op_params("pool"))
def test_pool(benchmark: Any, case: Any, dtype: str, pass_: str, variant: str, floors: dict,
        bench_env: dict) -> None:
    common.run_op(benchmark, case, dtype, pass_, variant, floors, bench_env)
