"""Input gradient (dgrad) of every stride-1 conv of BiSeNet v1: cuDNN against the Triton candidate.

The conv + BN op's backward computes dgrad/wgrad with ``aten.convolution_backward`` (cuDNN). The Triton
alternative for stride-1 convs is the forward implicit-GEMM kernel run on the flipped, transposed weight
(:func:`fastbisenet.ops.conv_bn.conv_input_grad`, its weight packing timed too). These rows are the
measurement that decides which one the backward should use: "eager" is cuDNN's dgrad as the backward
calls it, "fastbisenet" the Triton one; the report's speedup reads cuDNN time / Triton time. Two more
rows time a whole bf16 training step at 8x3x1024x1024 with each dgrad (``ops.conv_bn.TRITON_DGRAD``).
"""

from __future__ import annotations

from typing import Any

import pytest

from bench import common
from fastbisenet import benchmark as fb
from fastbisenet.ops import conv_bn

DGRADS = {"cudnn": False, "triton": True}
DEFAULT = "triton" if conv_bn.TRITON_DGRAD else "cudnn"  # this process's (FASTBISENET_TRITON_DGRAD), read at import


@pytest.mark.parametrize(("case", "dtype", "variant"), common.dgrad_params())
def test_conv_dgrad(benchmark: Any, case: Any, dtype: str, variant: str, floors: dict, bench_env: dict) -> None:
    torch_dtype = fb.DTYPES[dtype]
    flops, nbytes = fb.dgrad_cost(case, torch_dtype)
    info = dict(op="conv_dgrad", case=case.label, pass_="dgrad", dtype=torch_dtype, shape=case.args[0].shape,
                flops=flops, nbytes=nbytes, floors=floors, env=bench_env, model_input=list(case.input_shape),
                calls=case.calls, call_sites=list(case.where))
    common.measure_row(benchmark, make_step=lambda: fb.dgrad_workload(case, variant, torch_dtype, device=common.DEVICE),
                       group=f"conv_dgrad {case.label} {dtype}", variant=variant, e2e=False, info=info)


@pytest.mark.parametrize("dgrad", list(DGRADS), ids=[f"train-e2e-dgrad-{d}" for d in DGRADS])
@pytest.mark.bench_priority(common.priority("ab", kind=common.AB_DGRAD_E2E))
def test_train_step_dgrad(benchmark: Any, dgrad: str, floors: dict, bench_env: dict,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conv_bn, "TRITON_DGRAD", DGRADS[dgrad])
    arm = common.ab_arm(common.e2e_group("train", common.TRAIN_SHAPE, "bf16"), "dgrad", dgrad, DEFAULT)
    common.run_e2e(benchmark, "train", common.TRAIN_SHAPE, "bf16", "fastbisenet", floors, bench_env, **arm)
