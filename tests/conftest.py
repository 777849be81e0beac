"""Test configuration: Triton runs interpreted on CPU when no CUDA device is present.

``TRITON_INTERPRET=1`` must be in the environment before ``triton`` is first imported, so it is set
here, at conftest import, before any test module imports fastbisenet's kernels.

Also hosts the helpers shared by the fused-op tests (``from conftest import close, ...``): the
per-dtype tolerance table ``TOL`` with ``close``, ``make_map``/``f64`` input builders, the hypothesis
profile ``HYPO``, and the ``poison`` fixture (every buffer the ops allocate starts NaN / -7, so an
unwritten element shows up in the result).
"""

import contextlib
import math
import os

# numpy's OpenBLAS threads and torch's OpenMP threads oversubscribe the cores and make small matmuls
# (every interpreted tl.dot) ~100x slower; must be set before numpy is first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import HealthCheck, settings


def _interpreter_bf16_dot() -> None:
    """Make the interpreter's ``tl.dot`` take bf16 operands (test harness only, no effect on a GPU).

    Triton's interpreter keeps bf16 tensors as their uint16 bit patterns, and its ``create_dot`` converts fp8
    operands to fp16 but multiplies bf16 ones as those integers: garbage (triton 3.6 and 3.9). Here bf16
    operands are converted to fp32 first, which is exact and what the tensor cores multiply, so the kernels'
    bf16 paths are tested on CPU too. Other bf16 arithmetic in a kernel would still be wrong interpreted (the
    kernels convert loads to fp32 before computing).
    """
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    real_dot = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a, b = (self.cast_impl(t, tl.float32) if t.dtype.scalar == tl.bfloat16 else t for t in (a, b))
        return real_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot


def _interpreter_bf16_rounding() -> None:
    """Make the interpreter round fp32 -> bf16 conversions to nearest even, as the GPU's ``cvt.rn.bf16.f32``
    does (test harness only). The interpreter (triton 3.6 and 3.9) drops the low 16 bits instead: truncation,
    a bias toward zero that made every bf16 kernel output ~1 ulp low and the interpreted bf16 model ~4x further
    from fp32 than a real bf16 run. fp16 conversions already round (numpy)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    real_cast, real_fp_to_fp = builder.cast_impl, builder.create_fp_to_fp

    def to_bf16(src):
        bits = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16).view(torch.int16)
        return interpreter.TensorHandle(bits.numpy().view(np.uint16).reshape(np.shape(src.data)), tl.bfloat16)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return to_bf16(src)
        return real_cast(self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16 and rounding_mode is None:
            return to_bf16(src)  # an explicit rounding mode (rtne, rtz) is the interpreter's own, and right
        return real_fp_to_fp(self, src, dst_type, rounding_mode)

    builder.cast_impl = cast_impl
    builder.create_fp_to_fp = create_fp_to_fp


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_bf16_dot()
    _interpreter_bf16_rounding()

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

# pytest -n N (pytest-xdist): each worker gets its share of the cores, not all of them
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


@pytest.fixture
def device() -> str:
    """``"cuda"`` when a GPU is present (kernels compiled), else ``"cpu"`` (kernels interpreted)."""
    return DEVICE


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@contextlib.contextmanager
def cudnn_tf32(enabled: bool):
    """``torch.backends.cudnn.allow_tf32 = enabled`` inside, the previous value restored after."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """fp32 convs in full precision on a GPU: PyTorch's default lets cuDNN and the conv kernels use TF32 (10
    mantissa bits), and the fp32 tolerances here are for fp32 arithmetic. TF32 is tested on its own
    (``test_conv_bn.py::test_tf32_dots_round_operands_to_nearest``)."""
    with cudnn_tf32(False):
        yield


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


# Half-precision parametrization: both run interpreted too (bf16 dots through _interpreter_bf16_dot).
HALF = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]

# (rtol, atol) relative to the largest reference magnitude: |a - ref|.max() <= atol + rtol * |ref|.max()
TOL = {torch.float32: (2e-5, 1e-6), torch.float16: (4e-3, 1e-4), torch.bfloat16: (3e-2, 1e-3)}
# derandomize: the same examples every run, so CI cannot fail on a draw a local run never saw.
HYPO = settings(max_examples=6, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> None:
    """Assert ``actual`` matches the float64 ``expected`` within ``TOL[dtype]`` (times ``scale``)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "non-finite values (unwritten poisoned output?)"
    rtol, atol = TOL[dtype]
    err = (actual.double().cpu() - expected.double().cpu()).abs().max().item()
    bound = scale * (atol + rtol * expected.abs().max().item())
    assert err <= bound, f"max abs error {err:.3g} > {bound:.3g}"


def make_map(n: int, c: int, h: int, w: int, channels_last: bool, device: str, dtype=torch.float32) -> torch.Tensor:
    """A leaf (N, C, H, W) map requiring grad, NCHW-contiguous or channels_last, values around 0.5."""
    x = torch.randn(n, c, h, w, dtype=dtype) + 0.5
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x.to(device).requires_grad_()


def f64(t: torch.Tensor) -> torch.Tensor:
    """A float64 CPU leaf copy of ``t`` requiring grad: the reference computation's input."""
    return t.detach().cpu().double().requires_grad_()


@pytest.fixture
def poison(monkeypatch):
    """Make ``torch.empty``/``empty_like`` return NaN-filled (float) or -7-filled (signed int) tensors."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            t.fill_(math.nan)
        elif t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
            t.fill_(-7)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))
