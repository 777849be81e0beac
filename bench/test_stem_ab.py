"""A/B of the stem conv's two K-loop forms (``kernels.conv_bn.STEM_ROW_LOOP``), fastbisenet only, bf16.

The 7x7 stems on the 3-channel image are gather-bound: the per-kernel-row loop (the default) issues about
half the sm_90 instructions per tile of the flattened loop (bench/results/compile-audit_2026-11-21), at
40% more MMA work. No GPU had timed either when the default was chosen; these rows do: the merged stem
pair, one stem alone, and the whole pred forward at 1x3x1024x2048, each with both loop forms (the
autotune key includes the form, so each is tuned on its own).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from fastbisenet.kernels import conv_bn as K

from bench import common
from fastbisenet import benchmark as fb

LOOPS = {"row": True, "flat": False}
DEFAULT = "row" if K.STEM_ROW_LOOP else "flat"  # the form this process runs (FASTBISENET_STEM_ROW_LOOP), read
# at import, before any test sets it


def _stem_cases() -> list[fb.OpCase]:
    pair = next(c for c in common.traced_cases() if c.op == "conv_bn_act_pair" and c.input_shape == common.MAIN_SHAPE)
    image, (conv, bn), _ = pair.args
    single = dataclasses.replace(pair, op="conv_bn_act", args=(image, conv, bn), calls=2)
    return [pair, single]


def _params() -> list[Any]:
    ops, e2e = common.priority("ab", kind=common.AB_STEM_OPS), common.priority("ab", kind=common.AB_STEM_E2E)
    params = [pytest.param(case, loop, marks=pytest.mark.bench_priority(ops), id=f"{case.op}-{loop}")
              for case in _stem_cases() for loop in LOOPS]
    params += [pytest.param(None, loop, marks=pytest.mark.bench_priority(e2e), id=f"pred-e2e-{loop}")
               for loop in LOOPS]
    return params


@pytest.mark.parametrize(("case", "loop"), _params())
def test_stem_loop(benchmark: Any, case: fb.OpCase | None, loop: str, floors: dict, bench_env: dict,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(K, "STEM_ROW_LOOP", LOOPS[loop])
    if case is None:
        arm = common.ab_arm(common.e2e_group("pred", common.MAIN_SHAPE, "bf16"), "stem_loop", loop, DEFAULT)
        common.run_e2e(benchmark, "pred", common.MAIN_SHAPE, "bf16", "fastbisenet", floors, bench_env, **arm)
    else:
        arm = common.ab_arm(common.op_group(case, "bf16", "fwd"), "stem_loop", loop, DEFAULT)
        common.run_op(benchmark, case, "bf16", "fwd", "fastbisenet", floors, bench_env, **arm)
