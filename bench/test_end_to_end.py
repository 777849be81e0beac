"""End-to-end BiSeNet v1 (19 classes): inference (aux_mode "pred") at several resolutions and a
training step as ``fastbisenet train`` runs it (fp32 master weights, autocast forward, OHEM CE on the
three outputs, backward, SGD step) at batch 8 of 1024x1024. Timed warm (weights stay in L2)."""

from __future__ import annotations

import pytest

from bench import common


@pytest.mark.parametrize(("aux_mode", "shape", "dtype", "variant"), common.e2e_params())
def test_end_to_end(benchmark, aux_mode: str, shape: tuple, dtype: str, variant: str, floors: dict,
                    bench_env: dict) -> None:
    common.run_e2e(benchmark, aux_mode, shape, dtype, variant, floors, bench_env)
