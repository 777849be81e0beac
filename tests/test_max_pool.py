"""Triton max_pool2d against PyTorch's max_pool2d on float64: bit-identical values (inference, no indices),
and in training the same values and the same gradient from int8 window positions (ties, NaN, -inf)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import HYPO
from hypothesis import assume, given
from hypothesis import strategies as st

from fastbisenet import BiSeNet
from fastbisenet.ops import max_pool

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

CASES = [  # (shape, kernel_size, stride, padding)
    ((1, 3, 37, 53), 3, 2, 1),  # the stem's pool on odd sizes
    ((3, 70, 8, 9), 3, 2, 1),  # batch 3, channels not a power of two, across channel blocks
    ((2, 5, 11, 7), (3, 2), (2, 1), (1, 0)),  # rectangular everything
    ((1, 4, 6, 6), 2, 2, 0),  # no padding, exact tiling
    ((2, 3, 5, 9), 3, None, 1),  # stride defaults to the kernel size
    ((1, 2, 3, 3), 3, 1, 1),  # output as large as the input
]


def reference(x: torch.Tensor, k, s, p) -> torch.Tensor:
    return F.max_pool2d(x.detach().cpu().double(), k, s, p)


def same(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal values (NaN where the reference has NaN): a max is exact in every dtype."""
    assert got.shape == want.shape
    got = got.cpu().double()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize(("shape", "k", "s", "p"), CASES)
def test_matches_pytorch(shape, k, s, p, channels_last, dtype, device, poison):
    x = torch.randn(shape).to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = max_pool.max_pool2d(x, k, s, p)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert y.grad_fn is None
    same(y, reference(x, k, s, p).to(dtype).double())  # rounding to dtype is exact: the max is an input


def test_views_and_argument_forms(device):
    """Strided views (a channel slice of a channels_last map, a transposed map) and PyTorch's argument forms
    (1-sequences, an empty stride = the kernel size) give PyTorch's values."""
    base = torch.randn(2, 12, 9, 11, device=device).contiguous(memory_format=torch.channels_last)
    for x in (base[:, 3:10], base.transpose(2, 3), base[:, :, ::2]):
        with torch.no_grad():
            same(max_pool.max_pool2d(x, 3, 2, 1), reference(x, 3, 2, 1))
    with torch.no_grad():
        same(max_pool.max_pool2d(base, [3], [], [1]), reference(base, 3, 3, 1))
        same(max_pool.max_pool2d(base, (3, 2), [2], 0), reference(base, (3, 2), 2, 0))


def test_nan_inf_and_ties(device):
    x = torch.randn(2, 3, 7, 8, device=device)
    x[0, 0, 2, 3] = float("nan")  # propagates to the two windows holding it (rows 1-3, columns 1-3 and 3-5)
    x[1, 1] = float("-inf")  # a whole plane of -inf pools to -inf
    x[1, 2] = 1.5  # all ties
    x[0, 2, 0, 0] = float("inf")
    with torch.no_grad():
        y = max_pool.max_pool2d(x, 3, 2, 1)
    want = reference(x, 3, 2, 1)
    same(y, want)
    assert y[0, 0].isnan().sum() == 2 and (y[1, 1] == float("-inf")).all() and (y[1, 2] == 1.5).all()


def train_step(x: torch.Tensor, k, s, p) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward + backward and PyTorch's float64 ones for the same output gradient:
    ``(y, dx, y_ref, dx_ref)``."""
    x = x.detach().requires_grad_()
    y = max_pool.max_pool2d(x, k, s, p)
    assert type(y.grad_fn).__name__ == "MaxPool2dFunctionBackward"
    g = torch.randn(y.shape, dtype=torch.float64).to(device=y.device, dtype=y.dtype)
    (dx,) = torch.autograd.grad(y, x, g)
    x64 = x.detach().cpu().double().requires_grad_()
    y64 = F.max_pool2d(x64, k, s, p)
    (dx64,) = torch.autograd.grad(y64, x64, g.cpu().double())
    return y.detach(), dx, y64.detach(), dx64


def same_grad(dx: torch.Tensor, dx64: torch.Tensor, x: torch.Tensor) -> None:
    """The same elements receive gradient (PyTorch's choice of maximum), with the same values: a sum of
    up to four output gradients, in fp32, rounded to the input dtype once."""
    assert dx.shape == x.shape and dx.dtype == x.dtype and dx.stride() == x.stride()
    assert torch.equal(dx.cpu() != 0, dx64 != 0)
    eps = torch.finfo(x.dtype).eps
    torch.testing.assert_close(dx.cpu().double(), dx64, rtol=eps, atol=eps * dx64.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize(("shape", "k", "s", "p"), CASES)
def test_train_matches_pytorch(shape, k, s, p, channels_last, dtype, device, poison):
    """ReLU'd input (as the stem's): many all-zero windows, the gradient goes to the first zero."""
    x = F.relu(torch.randn(shape)).to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y, dx, y64, dx64 = train_step(x, k, s, p)
    assert y.is_contiguous(memory_format=torch.channels_last)
    same(y, y64.to(dtype).double())
    same_grad(dx, dx64, x)


def test_train_nan_inf_and_ties(device):
    """PyTorch's choice in every special case: the first of tied maxima, the last NaN of a window, the
    first element inside the input when everything is -inf."""
    x = torch.randn(2, 3, 7, 8, device=device)
    x[0, 0, 2, 3] = x[0, 0, 2, 4] = float("nan")  # two NaNs in the windows of columns 3-5
    x[1, 1] = float("-inf")  # a whole plane of -inf (padding never wins)
    x[1, 2] = 1.5  # all ties
    x[0, 2, 0, 0] = float("inf")
    y, dx, y64, dx64 = train_step(x, 3, 2, 1)
    same(y, y64)
    same_grad(dx, dx64, x)
    assert (dx[1, 1] != 0).sum() == y.shape[2] * y.shape[3]  # one receiving element per window


def test_train_saves_one_byte_per_output(device):
    x = torch.randn(2, 6, 10, 12, device=device, dtype=torch.float16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = max_pool.max_pool2d(x, 3, 2, 1)
    assert [(t.dtype, t.shape) for t in saved] == [(torch.int8, y.shape)]


def test_train_double_backward_raises(device):
    """The gather backward is not differentiable: a ``create_graph`` backward raises instead of giving
    gradients without the pool's second-order terms."""
    x = torch.randn(1, 2, 6, 6, device=device, requires_grad=True)
    y = max_pool.max_pool2d(x * 2, 3, 2, 1)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x)  # first order is fine
    assert torch.isfinite(gx).all()


def test_train_large_window_uses_pytorch(device):
    """Window positions are int8: windows over 127 elements with a gradient take PyTorch's op."""
    x = torch.randn(1, 2, 14, 14, device=device, requires_grad=True)
    y = max_pool.max_pool2d(x, 12, 2, 0)
    assert "MaxPool2DWithIndices" in type(y.grad_fn).__name__
    with torch.no_grad():
        same(max_pool.max_pool2d(x, 12, 2, 0), reference(x, 12, 2, 0))


@pytest.mark.parametrize(("shape", "k", "s", "p"), [((1, 2, 4, 4), 3, 2, 2), ((1, 2, 4, 4), 0, 1, 0),
                                                   ((1, 2, 4, 4), 5, 1, 0), ((1, 2, 4, 4), (3, 3, 3), 2, 1),
                                                   ((2, 0, 8, 8), 3, 2, 1), ((1, 2, 0, 8), 1, 1, 0)])
def test_invalid_arguments_raise_pytorchs_error(shape, k, s, p, device):
    x = torch.randn(shape, device=device)
    with pytest.raises(RuntimeError) as want:
        F.max_pool2d(x, k, s, p)
    with pytest.raises(RuntimeError) as got:
        max_pool.max_pool2d(x, k, s, p)
    assert str(got.value) == str(want.value)


@HYPO
@given(n=st.integers(1, 3), c=st.integers(1, 70), h=st.integers(1, 20), w=st.integers(1, 20),
       k=st.integers(1, 4), s=st.integers(1, 3), cl=st.booleans(), data=st.data())
def test_random_shapes(n, c, h, w, k, s, cl, data):
    p = data.draw(st.integers(0, k // 2))
    assume(h + 2 * p >= k and w + 2 * p >= k)
    x = F.relu(torch.randn(n, c, h, w, device="cuda" if torch.cuda.is_available() else "cpu"))
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        same(max_pool.max_pool2d(x, k, s, p), reference(x, k, s, p))
    y, dx, y64, dx64 = train_step(x, k, s, p)
    same(y, y64)
    same_grad(dx, dx64, x)


def test_model_stem_pool_is_the_kernel(device, monkeypatch):
    """The backbone's stem pool goes through the op: values only in eval/no-grad, values + window
    positions in training."""
    calls = []
    for name in ("max_pool2d_fwd", "max_pool2d_train_fwd"):
        real = getattr(max_pool, name)
        monkeypatch.setattr(max_pool, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    model = BiSeNet(5, "pred", backend="triton").to(device).eval()
    x = torch.randn(1, 3, 64, 64, device=device)
    with torch.no_grad():
        model(x)
    assert calls == ["max_pool2d_fwd"]
    model = BiSeNet(5, "train", backend="triton").to(device).train()
    model(torch.randn(2, 3, 64, 64, device=device))[0].sum().backward()
    assert calls == ["max_pool2d_fwd", "max_pool2d_train_fwd"]
