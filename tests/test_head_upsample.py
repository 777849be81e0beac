"""Triton ``head_logits`` / ``head_argmax`` against float64 torch: values, gradients, argmax ties."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import HALF, HYPO, close, f64, make_map
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from fastbisenet import reference as R
from fastbisenet.ops import head_upsample as H

pytestmark = pytest.mark.usefixtures("poison")


def make_head(mid: int, n_classes: int, bias: bool, device: str, dtype=torch.float32) -> nn.Conv2d:
    conv = nn.Conv2d(mid, n_classes, 1, bias=bias)
    if bias:
        nn.init.uniform_(conv.bias, -0.5, 0.5)
    return conv.to(device, dtype)


def check_logits(x, conv, size, align_corners, dtype=torch.float32):
    y = H.head_logits(x, conv, size, align_corners)
    n, ncls = x.shape[0], conv.out_channels
    assert y.shape == (n, ncls, *size) and y.dtype == x.dtype and y.is_contiguous()
    g = torch.randn_like(y)
    params = [x, *conv.parameters()]
    grads = torch.autograd.grad(y, params, g)
    conv_r = copy.deepcopy(conv).cpu().double()
    xr = f64(x)
    yr = R.head_logits(xr, conv_r, size, align_corners)
    grads_r = torch.autograd.grad(yr, [xr, *conv_r.parameters()], g.double().cpu())
    close(y, yr, dtype)
    for got, want, p in zip(grads, grads_r, params, strict=True):
        assert got.shape == p.shape and got.dtype == p.dtype
        close(got, want, dtype, scale=4.0)
    return yr


def check_argmax(x, conv, size, align_corners, logits_r, margin=1e-3):
    """Equal to torch's argmax wherever the top two reference logits differ by more than ``margin``."""
    idx = H.head_argmax(x, conv, size, align_corners)
    assert idx.dtype == torch.int32 and idx.shape == (x.shape[0], *size)
    ref = logits_r.argmax(1).to(torch.int32)
    top2 = logits_r.topk(min(2, logits_r.shape[1]), dim=1).values
    clear = (top2[:, 0] - top2[:, -1] > margin) if logits_r.shape[1] > 1 else torch.ones_like(ref, dtype=torch.bool)
    assert clear.float().mean() > 0.9
    assert torch.equal(idx.cpu()[clear], ref[clear])
    assert ((idx >= 0) & (idx < conv.out_channels)).all()


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize(("n", "in_hw", "size", "mid", "ncls", "bias", "channels_last"), [
    (1, (13, 21), (27, 41), 24, 19, True, True),
    (3, (8, 8), (16, 16), 40, 5, False, False),
    (2, (16, 16), (32, 32), 16, 19, True, False),
    (1, (7, 9), (7, 9), 33, 3, True, True),
    (2, (5, 6), (64, 32), 20, 19, False, True),
])
def test_head_logits_and_argmax(n, in_hw, size, mid, ncls, bias, channels_last, align_corners, device):
    x = make_map(n, mid, *in_hw, channels_last, device)
    conv = make_head(mid, ncls, bias, device)
    logits_r = check_logits(x, conv, size, align_corners)
    check_argmax(x, conv, size, align_corners, logits_r)


@HYPO
@given(
    n=st.integers(1, 2), mid=st.integers(1, 40), ncls=st.integers(1, 21), ih=st.integers(1, 8),
    iw=st.integers(1, 8), oh=st.integers(1, 24), ow=st.integers(1, 24), align=st.booleans(), bias=st.booleans(),
)
def test_head_random_shapes(n, mid, ncls, ih, iw, oh, ow, align, bias, device):
    x = make_map(n, mid, ih, iw, True, device)
    conv = make_head(mid, ncls, bias, device)
    logits_r = check_logits(x, conv, (oh, ow), align)
    check_argmax(x, conv, (oh, ow), align, logits_r)


@pytest.mark.parametrize("align_corners", [False, True])
def test_head_argmax_ties_go_to_lowest_class(align_corners, device):
    mid, ncls = 16, 9
    conv = make_head(mid, ncls, True, device)
    with torch.no_grad():  # classes 6 and 2 duplicate class 4 and class 1: exact ties in any arithmetic
        conv.weight[6] = conv.weight[4]
        conv.bias[6] = conv.bias[4]
        conv.weight[2] = conv.weight[1]
        conv.bias[2] = conv.bias[1]
        conv.weight[:, :, 0, 0] *= 3.0
    x = make_map(2, mid, 6, 7, True, device)
    idx = H.head_argmax(x, conv, (13, 15), align_corners)
    assert not (idx == 6).any() and not (idx == 2).any()
    assert (idx == 4).any() or (idx == 1).any()
    ref = R.head_argmax(x.detach(), conv, (13, 15), align_corners)
    assert torch.equal(idx, ref)
    with torch.no_grad():  # all classes equal everywhere -> class 0
        conv.weight.zero_()
        conv.bias.fill_(0.25)
    assert (H.head_argmax(x, conv, (13, 15), align_corners) == 0).all()


def test_head_argmax_nan_is_the_maximum_like_torch(device):
    conv = make_head(8, 5, True, device)
    with torch.no_grad():
        conv.bias[3] = float("nan")
    x = torch.randn(1, 8, 4, 4, device=device)
    assert (H.head_argmax(x, conv, (8, 8), False) == 3).all()
    assert (R.head_argmax(x, conv, (8, 8), False) == 3).all()
    with torch.no_grad():  # several NaN classes: the first, as torch.argmax
        conv.bias[1] = float("nan")
    assert (H.head_argmax(x, conv, (8, 8), False) == 1).all()
    assert (R.head_argmax(x, conv, (8, 8), False) == 1).all()


def test_head_argmax_never_allocates_full_resolution_logits(device, monkeypatch):
    sizes = []
    real_empty = torch.empty

    def empty(*a, **k):
        t = real_empty(*a, **k)
        sizes.append((t.numel(), t.dtype))
        return t

    monkeypatch.setattr(torch, "empty", empty)
    x = torch.randn(2, 32, 8, 8, device=device)
    conv = make_head(32, 19, True, device)
    H.head_argmax(x, conv, (64, 64), False)
    full = 2 * 19 * 64 * 64
    assert sizes and all(numel < full for numel, _ in sizes)
    assert (2 * 64 * 64, torch.int32) in sizes


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("align_corners", [False, True])
def test_head_half_dtypes(dtype, align_corners, device):
    """Half-precision features and weights: the logits are computed from them in fp32, so the argmax matches
    the float64 reference's wherever its top two differ by more than 1e-4 of the largest logit."""
    c, hw, size = (256, (64, 128), (512, 1024)) if device == "cuda" else (40, (13, 21), (104, 168))
    x = make_map(2, c, *hw, True, device, dtype)
    conv = make_head(c, 19, True, device, dtype)
    logits_r = check_logits(x, conv, size, align_corners, dtype)
    check_argmax(x, conv, size, align_corners, logits_r, margin=1e-4 * logits_r.abs().max().item())


def test_uncovered_inputs_run_the_reference(device, monkeypatch):
    """An empty batch, float64 features, more images than a grid axis takes, a 3x3 classifier: the reference
    formula (PyTorch's results); a width mismatch: PyTorch's error."""
    conv = make_head(8, 5, True, device)
    calls = []
    for name in ("head_logits", "head_argmax"):
        real = getattr(R, name)
        monkeypatch.setattr(R, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))

    def reference_ran(name: str, result):
        assert calls and calls[0] == name, calls
        calls.clear()
        return result

    empty = torch.randn(0, 8, 4, 4, device=device)
    assert reference_ran("head_logits", H.head_logits(empty, conv, (8, 8), False)).shape == (0, 5, 8, 8)
    assert reference_ran("head_argmax", H.head_argmax(empty, conv, (8, 8), False)).shape == (0, 8, 8)
    x64 = torch.randn(2, 8, 4, 4, device=device, dtype=torch.float64)
    got = reference_ran("head_logits", H.head_logits(x64, copy.deepcopy(conv).double(), (8, 8), True))
    assert got.dtype == torch.float64
    big = torch.randn(1, 8, 1, 1, device=device).expand(65536, 8, 1, 1)  # one pixel per image
    assert reference_ran("head_argmax", H.head_argmax(big, conv, (1, 1), False)).shape == (65536, 1, 1)
    conv3 = nn.Conv2d(8, 5, 3, padding=1).to(device)
    x = make_map(1, 8, 4, 4, True, device)
    close(reference_ran("head_logits", H.head_logits(x, conv3, (8, 8), False)),
          R.head_logits(f64(x), copy.deepcopy(conv3).cpu().double(), (8, 8), False).detach())
    with pytest.raises(RuntimeError):
        H.head_logits(make_map(1, 7, 4, 4, True, device), conv, (8, 8), False)
    x = make_map(2, 8, 4, 4, True, device)
    calls.clear()
    H.head_logits(x, conv, (8, 8), False)
    H.head_argmax(x, conv, (8, 8), False)
    assert calls == []  # covered inputs run the kernels
