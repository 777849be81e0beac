"""Triton channel attention (``mean_hw``, ``bn_attention``, ``mlp_attention``) against float64 torch.

Shared helpers (``close``, ``make_map``, ``f64``, ``HYPO``, the ``poison`` fixture) live in conftest.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import HYPO, close, f64, make_map
from fastbisenet.kernels import channel_attention as KCA
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from fastbisenet import reference as R
from fastbisenet.ops import channel_attention as CA

# ------------------------------------------------------------------------------------- mean_hw


@pytest.mark.parametrize(("shape", "channels_last"), [
    ((1, 37, 13, 21), True), ((3, 64, 16, 16), False), ((2, 5, 1, 1), True), ((3, 130, 7, 3), True),
])
def test_mean_hw(shape, channels_last, device, poison):
    x = make_map(*shape, channels_last, device)
    y = CA.mean_hw(x)
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    xr = f64(x)
    yr = R.mean_hw(xr)
    (dxr,) = torch.autograd.grad(yr, xr, g.double().cpu())
    close(y, yr)
    close(dx, dxr)
    assert dx.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_mean_hw_is_a_parallel_reduction(device):
    """At batch 1 the map is split into several pixel chunks (not one program per channel)."""
    x = torch.randn(1, 8, 64, 64, device=device)
    part, split = KCA.mean_partials(x)
    assert split > 1 and part.shape == (split, 1, 8)
    close(part.sum(0).view(1, 8, 1, 1) / 4096, R.mean_hw(x.double().cpu()))


@HYPO
@given(n=st.integers(1, 3), c=st.integers(1, 70), h=st.integers(1, 20), w=st.integers(1, 20), cl=st.booleans())
def test_mean_hw_random_shapes(n, c, h, w, cl, device):
    x = make_map(n, c, h, w, cl, device)
    y = CA.mean_hw(x)
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    xr = f64(x)
    (dxr,) = torch.autograd.grad(R.mean_hw(xr), xr, g.double().cpu())
    close(y, R.mean_hw(xr))
    close(dx, dxr)


# -------------------------------------------------------------------------------- bn_attention


def make_bn_attention(c: int, device: str, momentum: float | None = 0.1):
    conv = nn.Conv2d(c, c, 1, bias=False)
    bn = nn.BatchNorm2d(c, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
    return conv.to(device), bn.to(device)


def check_bn_attention(feat, conv, bn, conv_r, bn_r):
    a = CA.bn_attention(feat, conv, bn)
    g = torch.randn_like(a)
    params = [feat, conv.weight, bn.weight, bn.bias]
    grads = torch.autograd.grad(a, params, g)
    fr = f64(feat)
    ar = R.bn_attention(fr, conv_r, bn_r)
    grads_r = torch.autograd.grad(ar, [fr, conv_r.weight, bn_r.weight, bn_r.bias], g.double().cpu())
    close(a, ar)
    for got, want in zip(grads, grads_r, strict=True):
        close(got, want, scale=5.0)
    close(bn.running_mean, bn_r.running_mean)
    close(bn.running_var, bn_r.running_var)
    assert bn.num_batches_tracked.item() == bn_r.num_batches_tracked.item()


@pytest.mark.parametrize(("n", "c", "momentum", "channels_last"), [
    (3, 37, 0.1, True), (2, 48, None, False), (5, 19, 0.3, True),
])
def test_bn_attention_train(n, c, momentum, channels_last, device, poison):
    conv, bn = make_bn_attention(c, device, momentum)
    conv_r, bn_r = copy.deepcopy(conv).cpu().double(), copy.deepcopy(bn).cpu().double()
    for _ in range(2):  # the second call sees updated running stats and num_batches_tracked == 2
        feat = make_map(n, c, 9, 7, channels_last, device)
        check_bn_attention(feat, conv, bn, conv_r, bn_r)
    assert bn.num_batches_tracked.item() == 2


@pytest.mark.parametrize("n", [1, 3])
def test_bn_attention_eval_uses_current_running_stats(n, device, poison):
    conv, bn = make_bn_attention(37, device)
    bn.eval()
    conv_r, bn_r = copy.deepcopy(conv).cpu().double(), copy.deepcopy(bn).cpu().double()
    feat = make_map(n, 37, 11, 6, True, device)
    check_bn_attention(feat, conv, bn, conv_r, bn_r)
    with torch.no_grad():  # stats changed after the first call must be used by the next one
        for b in (bn, bn_r):
            b.running_mean.add_(0.25)
            b.running_var.mul_(1.5)
    check_bn_attention(feat, conv, bn, conv_r, bn_r)
    assert bn.num_batches_tracked.item() == 0


def test_bn_attention_train_batch1_raises_like_torch(device):
    conv, bn = make_bn_attention(16, device)
    feat = torch.randn(1, 16, 5, 5, device=device)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training") as ours:
        CA.bn_attention(feat, conv, bn)
    with pytest.raises(ValueError) as theirs:
        R.bn_attention(feat.cpu(), conv.cpu(), copy.deepcopy(bn).cpu())
    assert str(ours.value) == str(theirs.value)


def test_bn_attention_without_running_stats(device):
    conv, bn = make_bn_attention(24, device)
    bn = nn.BatchNorm2d(24, track_running_stats=False).to(device).eval()
    feat = make_map(4, 24, 5, 6, False, device)
    conv_r, bn_r = copy.deepcopy(conv).cpu().double(), copy.deepcopy(bn).cpu().double()
    a = CA.bn_attention(feat, conv, bn)
    close(a, R.bn_attention(f64(feat), conv_r, bn_r))


def test_bn_attention_falls_back_for_biased_conv(device):
    conv = nn.Conv2d(8, 8, 1, bias=True).to(device)
    bn = nn.BatchNorm2d(8).to(device).eval()
    feat = torch.randn(2, 8, 4, 4, device=device)
    torch.testing.assert_close(CA.bn_attention(feat, conv, bn), R.bn_attention(feat, conv, bn))


# ------------------------------------------------------------------------------- mlp_attention


@pytest.mark.parametrize(("n", "c", "mid", "channels_last"), [(1, 40, 10, True), (3, 64, 16, False), (2, 19, 5, True)])
def test_mlp_attention(n, c, mid, channels_last, device, poison):
    conv1 = nn.Conv2d(c, mid, 1, bias=False).to(device)
    conv2 = nn.Conv2d(mid, c, 1, bias=False).to(device)
    feat = make_map(n, c, 8, 13, channels_last, device)
    a = CA.mlp_attention(feat, conv1, conv2)
    g = torch.randn_like(a)
    grads = torch.autograd.grad(a, [feat, conv1.weight, conv2.weight], g)
    c1r, c2r = copy.deepcopy(conv1).cpu().double(), copy.deepcopy(conv2).cpu().double()
    fr = f64(feat)
    ar = R.mlp_attention(fr, c1r, c2r)
    grads_r = torch.autograd.grad(ar, [fr, c1r.weight, c2r.weight], g.double().cpu())
    close(a, ar)
    for got, want in zip(grads, grads_r, strict=True):
        close(got, want, scale=5.0)


# ---------------------------------------------------------------------------------- half types


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_half_dtypes(dtype, device):
    conv, bn = make_bn_attention(128, device)
    conv, bn = conv.to(dtype), bn.to(dtype)
    feat = make_map(4, 128, 32, 64, True, device, dtype)
    conv_r, bn_r = copy.deepcopy(conv).cpu().double(), copy.deepcopy(bn).cpu().double()
    a = CA.bn_attention(feat, conv, bn)
    assert a.dtype == dtype
    close(a, R.bn_attention(f64(feat), conv_r, bn_r), dtype)
    close(CA.mean_hw(feat), R.mean_hw(f64(feat)), dtype)
    conv1 = nn.Conv2d(128, 32, 1, bias=False).to(device, dtype)
    conv2 = nn.Conv2d(32, 128, 1, bias=False).to(device, dtype)
    a = CA.mlp_attention(feat, conv1, conv2)
    close(a, R.mlp_attention(f64(feat), copy.deepcopy(conv1).cpu().double(), copy.deepcopy(conv2).cpu().double()),
          dtype)


def test_mismatched_widths_raise_instead_of_reading_past_weights():
    """The kernels take widths from the tensors: a module of another width must fail like PyTorch, not
    read out of bounds."""
    from fastbisenet.ops import head_upsample as H

    feat = torch.randn(2, 6, 5, 7)
    with pytest.raises(RuntimeError):
        CA.bn_attention(feat, nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
    with pytest.raises(RuntimeError):
        CA.mlp_attention(feat, nn.Conv2d(6, 3, 1, bias=False), nn.Conv2d(4, 6, 1, bias=False))
    with pytest.raises(RuntimeError):
        H.head_logits(feat, nn.Conv2d(5, 3, 1), (10, 14), False)
    with pytest.raises(RuntimeError):
        H.head_argmax(feat, nn.Conv2d(7, 3, 1), (10, 14), False)
