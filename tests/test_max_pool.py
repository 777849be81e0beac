"""Triton max_pool2d (inference, no indices) against PyTorch's max_pool2d on float64: bit-identical values."""

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


def test_grad_uses_pytorch_op(device):
    """An input that needs a gradient takes PyTorch's op (its indices drive the backward): same values
    and the same gradient, ties included."""
    x = torch.randn(2, 3, 9, 10, device=device)
    x[:, :, :4, :4] = 0.25  # ties: the gradient goes to the first maximum in each window
    x.requires_grad_()
    y = max_pool.max_pool2d(x, 3, 2, 1)
    assert y.grad_fn is not None and "MaxPool2DWithIndices" in type(y.grad_fn).__name__
    g = torch.randn_like(y)
    y.backward(g)
    x64 = x.detach().cpu().double().requires_grad_()
    F.max_pool2d(x64, 3, 2, 1).backward(g.cpu().double())
    same(y.detach(), reference(x, 3, 2, 1))
    # the same elements receive gradient; sums of several windows round in fp32 vs float64
    assert torch.equal(x.grad.cpu() != 0, x64.grad != 0)
    torch.testing.assert_close(x.grad.cpu().double(), x64.grad, rtol=1e-6, atol=1e-6)


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
    x = torch.randn(n, c, h, w, device="cuda" if torch.cuda.is_available() else "cpu")
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        same(max_pool.max_pool2d(x, k, s, p), reference(x, k, s, p))


def test_model_stem_pool_is_the_kernel_in_inference_only(device, monkeypatch):
    """The backbone's stem pool goes through the op: the kernel in eval/no-grad, PyTorch's op in training."""
    calls = []
    real = max_pool.max_pool2d_fwd
    monkeypatch.setattr(max_pool, "max_pool2d_fwd", lambda *a: calls.append(1) or real(*a))
    model = BiSeNet(5, "pred", backend="triton").to(device).eval()
    x = torch.randn(1, 3, 64, 64, device=device)
    with torch.no_grad():
        model(x)
    assert calls == [1]
    model = BiSeNet(5, "train", backend="triton").to(device).train()
    model(torch.randn(2, 3, 64, 64, device=device))[0].sum().backward()
    assert calls == [1]
