"""Triton ``attend_add_upsample`` and ``attend_residual`` against float64 torch, forward and backward."""

from __future__ import annotations

import pytest
import torch
from conftest import HALF, HYPO, close, f64, make_map
from hypothesis import given
from hypothesis import strategies as st

from fastbisenet import reference as R
from fastbisenet.ops import attend_add_upsample as U
from fastbisenet.ops import attend_residual as AR

pytestmark = pytest.mark.usefixtures("poison")

MODES = [("nearest", None), ("bilinear", False), ("bilinear", True)]


def run_case(n, c, in_hw, size, mode, align_corners, other_full, channels_last, device, dtype=torch.float32):
    x = make_map(n, c, *in_hw, channels_last, device, dtype)
    a = torch.rand(n, c, 1, 1, device=device, dtype=dtype).requires_grad_()
    oshape = (n, c, *in_hw) if other_full else (n, c, 1, 1)
    other = torch.randn(oshape, device=device, dtype=dtype).requires_grad_()
    y = U.attend_add_upsample(x, a, other, size, mode, align_corners)
    assert y.shape == (n, c, *size) and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, other), g)
    refs = [f64(t) for t in (x, a, other)]
    yr = R.attend_add_upsample(*refs, size, mode, align_corners)
    grads_r = torch.autograd.grad(yr, refs, g.double().cpu())
    close(y, yr, dtype)
    for got, want, inp in zip(grads, grads_r, (x, a, other), strict=True):
        assert got.shape == inp.shape and got.dtype == inp.dtype
        close(got, want, dtype, scale=4.0)


@pytest.mark.parametrize(("mode", "align_corners"), MODES)
@pytest.mark.parametrize(("n", "in_hw", "size", "other_full", "channels_last"), [
    (1, (13, 21), (27, 41), True, True),
    (3, (13, 21), (27, 41), False, False),
    (1, (16, 16), (32, 32), True, False),
    (2, (8, 8), (16, 16), False, True),
    (3, (13, 21), (13, 21), True, True),
    (1, (9, 6), (4, 13), False, True),
])
def test_attend_add_upsample(n, in_hw, size, other_full, channels_last, mode, align_corners, device):
    run_case(n, 19, in_hw, size, mode, align_corners, other_full, channels_last, device)


@HYPO
@given(
    n=st.integers(1, 3), c=st.integers(1, 40), ih=st.integers(1, 9), iw=st.integers(1, 9),
    oh=st.integers(1, 19), ow=st.integers(1, 19), mode=st.sampled_from(MODES), other_full=st.booleans(),
    cl=st.booleans(),
)
def test_attend_add_upsample_random_shapes(n, c, ih, iw, oh, ow, mode, other_full, cl, device):
    run_case(n, c, (ih, iw), (oh, ow), *mode, other_full, cl, device)


def test_nearest_index_is_legacy_floor(device):
    """Nearest picks src = floor(dst * in / out): rows 0,0,1,1,2,3,3 for 4 -> 7 (not round-half)."""
    x = torch.arange(4.0, device=device).view(1, 1, 4, 1)
    y = U.attend_add_upsample(x, torch.ones(1, 1, 1, 1, device=device), torch.zeros(1, 1, 1, 1, device=device),
                              (7, 1), "nearest")
    assert y.flatten().tolist() == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 3.0]


def test_bad_arguments(device):
    x = torch.randn(1, 4, 5, 5, device=device)
    a = torch.rand(1, 4, 1, 1, device=device)
    with pytest.raises(ValueError, match="align_corners"):
        U.attend_add_upsample(x, a, a, (10, 10), "nearest", True)
    with pytest.raises(ValueError, match="mode"):
        U.attend_add_upsample(x, a, a, (10, 10), "bicubic", False)


@pytest.mark.parametrize("which", ["attention", "other"])
def test_float64_attention_or_other_runs_the_reference(which, device):
    """A float64 attention or ``other`` promotes the result to float64, computed in float64 (the reference
    formula), as PyTorch's ops do, not fp32 arithmetic stored as float64."""
    x = torch.randn(1, 4, 5, 5, device=device)
    a, other = torch.rand(1, 4, 1, 1, device=device), torch.randn(1, 4, 5, 5, device=device)
    if which == "attention":
        a = a.double() + 1e-9  # below fp32 resolution
    else:
        other = other.double() + 1e-9
    got = U.attend_add_upsample(x, a, other, (9, 9), "bilinear", False)
    want = R.attend_add_upsample(x, a, other, (9, 9), "bilinear", False)
    assert want.dtype == got.dtype == torch.float64 and torch.allclose(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("n", "c", "hw", "channels_last"), [(1, 37, (13, 21), True), (3, 64, (8, 8), False)])
def test_attend_residual(n, c, hw, channels_last, device):
    f = make_map(n, c, *hw, channels_last, device)
    a = torch.rand(n, c, 1, 1, device=device).requires_grad_()
    y = AR.attend_residual(f, a)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (f, a), g)
    fr, ar = f64(f), f64(a)
    yr = R.attend_residual(fr, ar)
    grads_r = torch.autograd.grad(yr, (fr, ar), g.double().cpu())
    close(y, yr)
    for got, want in zip(grads, grads_r, strict=True):
        close(got, want, scale=4.0)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(("mode", "align_corners"), MODES)
def test_half_dtypes(dtype, mode, align_corners, device):
    c, hw = (128, (32, 64)) if device == "cuda" else (24, (13, 21))  # model-like on a GPU, small interpreted
    out_hw = (2 * hw[0] + 1, 2 * hw[1] + 1) if device == "cpu" else (2 * hw[0], 2 * hw[1])
    run_case(2, c, hw, out_hw, mode, align_corners, True, True, device, dtype)
    run_case(2, c, (hw[0] // 2, hw[1] // 2), hw, mode, align_corners, False, True, device, dtype)
    f = make_map(2, 2 * c, *hw, True, device, dtype)
    a = torch.rand(2, 2 * c, 1, 1, device=device, dtype=dtype)
    close(AR.attend_residual(f, a), R.attend_residual(f64(f), f64(a)), dtype)


def test_backward_window_is_tight_for_power_of_two_nearest():
    """Nearest 2x / 4x (the context path's upsampling) walks exactly the k x k outputs that read each input pixel;
    other ratios keep the general window (its margin covers fp32 rounding and the clamp at the border)."""
    from fastbisenet.kernels.attend_add_upsample import BILINEAR, NEAREST, dim_params

    assert dim_params(32, 64, NEAREST, False)[3] == 2
    assert dim_params(16, 64, NEAREST, False)[3] == 4
    assert dim_params(13, 27, NEAREST, False)[3] == 5  # ceil(27 / 13) + 2
    assert dim_params(32, 64, BILINEAR, False)[3] == 6  # ceil(2 * 2) + 2
