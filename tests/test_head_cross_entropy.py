"""Triton ``head_cross_entropy`` (1x1 + bilinear upsample + per-pixel CE, logits never written) against
float64 torch: loss, gradients of the features, the weight and the bias; ignored and bad labels;
what is saved and allocated; the model's ``model(x, labels)`` path and the OHEM reduction."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA, HYPO, close, f64, make_map
from hypothesis import given
from hypothesis import strategies as st
from test_head_upsample import make_head

from fastbisenet import BiSeNet
from fastbisenet import reference as R
from fastbisenet.losses import OhemCELoss, total_loss, total_pixel_loss
from fastbisenet.ops import fused
from fastbisenet.ops import head_cross_entropy as HC

IGNORE = 255
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])  # no bf16 math interpreted


def make_labels(n: int, ncls: int, size: tuple[int, int], device: str) -> torch.Tensor:
    labels = torch.randint(0, ncls, (n, *size))
    labels[0, 0, : size[1] // 2] = IGNORE  # a run of ignored pixels
    labels[-1, -1, -1] = IGNORE
    return labels.to(device)


def check(x, conv, labels, align_corners, dtype=torch.float32):
    """Loss and gradients (x, weight, bias) of the fused op against float64 torch, with a random
    per-pixel loss gradient."""
    loss = HC.head_cross_entropy(x, conv, labels, align_corners, IGNORE)
    assert loss.dtype == torch.float32 and loss.shape == labels.shape
    g = torch.rand_like(loss) + 0.1
    params = [x, *conv.parameters()]
    grads = torch.autograd.grad(loss, params, g)
    conv_r = copy.deepcopy(conv).cpu().double()
    xr = f64(x)
    loss_r = R.head_cross_entropy(xr, conv_r, labels.cpu(), align_corners, IGNORE)
    grads_r = torch.autograd.grad(loss_r, [xr, *conv_r.parameters()], g.double().cpu())
    # fp32 math from the inputs: the only low-precision rounding is the inputs' own (exact in float64)
    close(loss, loss_r, torch.float32, scale=4.0)
    for got, want, p in zip(grads, grads_r, params, strict=True):
        assert got.shape == p.shape and got.dtype == p.dtype and got.stride() == p.stride()
        close(got, want, dtype, scale=4.0)
    assert torch.all(loss[labels == IGNORE] == 0)


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize(("n", "in_hw", "size", "mid", "ncls", "bias", "channels_last"), [
    (1, (13, 21), (27, 41), 24, 19, True, True),  # sizes that do not divide by 2
    (3, (8, 8), (64, 64), 40, 5, False, False),  # batch 3, scale 8 (the model's main head), C odd
    (2, (5, 40), (37, 321), 16, 19, True, True),  # wide rows: several column blocks and chunks per program
    (1, (9, 10), (7, 6), 8, 3, True, False),  # downsampling
    (2, (4, 4), (16, 16), 8, 1, True, True),  # one class: loss 0, gradient 0
    (1, (4, 6), (20, 30), 12, 40, False, True),  # classes above 32: the unfused kernels
])
def test_matches_float64_reference(n, in_hw, size, mid, ncls, bias, channels_last, align_corners, device):
    x = make_map(n, mid, *in_hw, channels_last, device)
    check(x, make_head(mid, ncls, bias, device), make_labels(n, ncls, size, device), align_corners)


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_half_features(dtype, device):
    """bf16/fp16 features and classifier: fp32 math inside, gradients in the parameters' dtypes."""
    x = make_map(2, 32, 12, 16, True, device, dtype)
    check(x, make_head(32, 19, True, device, dtype), make_labels(2, 19, (96, 128), device), False, dtype)


@HYPO
@given(
    n=st.integers(1, 2), mid=st.integers(1, 24), ncls=st.integers(1, 21), ih=st.integers(1, 8),
    iw=st.integers(1, 8), oh=st.integers(1, 40), ow=st.integers(1, 40), align=st.booleans(), bias=st.booleans(),
)
def test_random_shapes(n, mid, ncls, ih, iw, oh, ow, align, bias, device):
    x = make_map(n, mid, ih, iw, True, device)
    check(x, make_head(mid, ncls, bias, device), make_labels(n, ncls, (oh, ow), device), align)


def test_matches_the_unfused_ops(device):
    """Same loss and gradients as head_logits then cross_entropy (the chain it replaces)."""
    x = make_map(2, 16, 6, 7, True, device)
    conv = make_head(16, 19, True, device)
    labels = make_labels(2, 19, (48, 56), device)
    got = HC.head_cross_entropy(x, conv, labels, False, IGNORE)
    grads = torch.autograd.grad(got.sum(), [x, *conv.parameters()])
    want = fused.cross_entropy(fused.head_logits(x, conv, (48, 56), False), labels, IGNORE)
    grads_w = torch.autograd.grad(want.sum(), [x, *conv.parameters()])
    close(got, want.detach(), torch.float32, scale=4.0)
    for a, b in zip(grads, grads_w, strict=True):
        close(a, b, torch.float32, scale=4.0)


def test_out_of_range_label_is_nan_not_silent(device):
    """No host sync in the kernel: a label outside [0, C) that is not ignore_index gives NaN for that
    pixel's loss, and NaN gradients in exactly the low-res pixels it reads (OhemCELoss raises IndexError
    before that)."""
    x = make_map(1, 8, 4, 6, True, device)
    conv = make_head(8, 5, True, device)
    labels = make_labels(1, 5, (16, 24), device)
    labels[0, 5, 7] = 5
    labels[0, 9, 2] = -1
    loss = HC.head_cross_entropy(x, conv, labels, False, IGNORE)
    bad = torch.zeros_like(labels, dtype=torch.bool)
    bad[0, 5, 7] = bad[0, 9, 2] = True
    assert loss[bad].isnan().all() and not loss[~bad].isnan().any()
    loss.sum().backward()
    assert conv.weight.grad.isnan().any()
    # the low-res pixels the bad ones read: where the resize's transpose of a one-hot at them is non-zero
    z = torch.zeros(1, 1, 4, 6, dtype=torch.float64, requires_grad=True)
    up = F.interpolate(z, size=(16, 24), mode="bilinear", align_corners=False)
    (read,) = torch.autograd.grad(up, z, bad.cpu().double().unsqueeze(1))
    assert torch.equal(x.grad.isnan().any(1).cpu(), (read != 0)[:, 0])


def test_many_classes_take_the_unfused_kernels(device, monkeypatch):
    """Above one 32-wide class block: the head logits + cross-entropy kernels, same values."""
    calls = []
    real = HC.head_logits
    monkeypatch.setattr(HC, "head_logits", lambda *a: calls.append(1) or real(*a))
    x = make_map(1, 8, 3, 4, True, device)
    conv = make_head(8, 40, True, device)
    labels = make_labels(1, 40, (9, 11), device)
    got = HC.head_cross_entropy(x, conv, labels, True, IGNORE)
    assert calls == [1]
    close(got, R.head_cross_entropy(f64(x), copy.deepcopy(conv).cpu().double(), labels.cpu(), True, IGNORE)
          .detach(), torch.float32, scale=4.0)


def test_double_backward_raises(device):
    """The kernels' backward is not differentiable: a ``create_graph`` backward raises instead of giving
    gradients with missing terms."""
    x = make_map(1, 8, 3, 4, True, device)
    conv = make_head(8, 5, True, device)
    loss = HC.head_cross_entropy(x, conv, make_labels(1, 5, (9, 11), device), False, IGNORE)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(loss.sum(), x, create_graph=True)


def test_saves_no_full_resolution_tensor(device):
    """Saved for backward: features, classifier, labels, low-res logits and one fp32 per pixel; nothing
    the size of the (N, C, H, W) logits is allocated."""
    x = make_map(2, 16, 8, 8, True, device, torch.float16)
    conv = make_head(16, 19, True, device, torch.float16)
    labels = make_labels(2, 19, (64, 64), device)
    saved, sizes = [], []
    real_empty = torch.empty

    def empty(*a, **k):
        t = real_empty(*a, **k)
        sizes.append(t.numel())
        return t

    with pytest.MonkeyPatch.context() as mp, \
            torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        mp.setattr(torch, "empty", empty)
        loss = HC.head_cross_entropy(x, conv, labels, False, IGNORE)
        loss.sum().backward()
    full = 2 * 19 * 64 * 64
    assert sizes and max(sizes) < full / 4  # the largest is the W-reduced gradient, C * H * w
    inputs = {t.untyped_storage().data_ptr() for t in (x, conv.weight, conv.bias, labels)}
    new = [t for t in saved if t.untyped_storage().data_ptr() not in inputs]
    assert sum(t.numel() * t.element_size() for t in new) == 2 * 64 * 64 * 4 + 2 * 8 * 8 * 32 * 4  # lse + z


def test_uncovered_inputs_run_the_reference(device):
    """int32 labels, a 3x3 classifier, a width mismatch: the reference formula, with PyTorch's errors."""
    x = make_map(1, 8, 4, 4, True, device)
    conv = make_head(8, 5, True, device)
    labels = make_labels(1, 5, (8, 8), device)
    with pytest.raises(RuntimeError):
        HC.head_cross_entropy(x, conv, labels.int(), False, IGNORE)
    conv3 = torch.nn.Conv2d(8, 5, 3, padding=1).to(device)
    got = HC.head_cross_entropy(x, conv3, labels, False, IGNORE)
    close(got, R.head_cross_entropy(x, conv3, labels, False, IGNORE).detach(), torch.float32)
    with pytest.raises(RuntimeError):
        HC.head_cross_entropy(make_map(1, 7, 4, 4, True, device), conv, labels, False, IGNORE)


@pytest.mark.parametrize("preset", ["v1", "face-parsing"])
def test_model_with_labels_returns_the_per_pixel_losses(preset, device):
    """``model(x, labels)``: the per-pixel CE of each output; ``total_pixel_loss`` of them is the
    ``total_loss`` of the logits; fused and reference backends agree."""
    torch.manual_seed(0)
    model = BiSeNet(4, "train", preset=preset, backend="torch").to(device).eval()  # eval BN: deterministic
    x = torch.randn(2, 3, 32, 48, device=device)
    labels = make_labels(2, 4, (32, 48), device)
    crit = OhemCELoss(backend="torch")
    with torch.no_grad():
        logits = model(x)
        pixel = model(x, labels)
        assert len(pixel) == 3 and all(p.shape == labels.shape and p.dtype == torch.float32 for p in pixel)
        for p, o in zip(pixel, logits, strict=True):
            close(p, F.cross_entropy(o, labels, ignore_index=IGNORE, reduction="none"), torch.float32)
        want = total_loss(logits, labels, crit)
        close(total_pixel_loss(pixel, labels, crit, 4), want, torch.float32)
        model.backend = "triton"
        close(total_pixel_loss(model(x, labels), labels, crit, 4), want, torch.float32, scale=10.0)
        model.aux_mode = "eval"
        assert len(model(x, labels)) == 1


def test_model_with_labels_checks_them(device):
    model = BiSeNet(4, "train", backend="torch").to(device)
    x = torch.randn(1, 3, 32, 32, device=device)
    for bad, match in [(torch.zeros(1, 32, 31, dtype=torch.long), "shape"), (torch.zeros(1, 32, 32), "integer"),
                       (torch.zeros(2, 32, 32, dtype=torch.long), "shape")]:
        with pytest.raises(ValueError, match=match):
            model(x, bad.to(device))
    model.aux_mode = "pred"
    with pytest.raises(ValueError, match="pred"):
        model(x, torch.zeros(1, 32, 32, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="output size"):  # a head called directly
        model.conv_out(torch.randn(1, 256, 4, 4, device=device), (32, 32), torch.zeros(1, 32, 31, dtype=torch.long))


def test_ohem_reduce_raises_on_bad_labels(device):
    crit = OhemCELoss()
    labels = make_labels(1, 4, (6, 6), device)
    labels[0, 1, 1] = 4
    with pytest.raises(IndexError, match="outside"):
        crit.reduce(torch.rand(1, 6, 6, device=device), labels, 4)
    with pytest.raises(ValueError, match="shape"):
        crit.reduce(torch.rand(1, 6, 5, device=device), labels, 4)


def test_train_step_through_the_model_loss(device):
    """One fused training step with ``model(x, labels)``: finite loss, every parameter has a gradient,
    matching the reference backend's gradients."""
    torch.manual_seed(0)
    model = BiSeNet(4, "train", backend="triton").to(device).train()
    ref = copy.deepcopy(model)
    ref.backend = "torch"
    x = torch.randn(2, 3, 32, 48, device=device)
    labels = make_labels(2, 4, (32, 48), device)
    crit = OhemCELoss()
    loss = total_pixel_loss(model(x, labels), labels, crit, 4)
    loss.backward()
    assert torch.isfinite(loss)
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    loss_r = total_pixel_loss(ref(x, labels), labels, crit, 4)
    loss_r.backward()
    close(loss, loss_r.detach(), torch.float32, scale=10.0)
    for n, p in ref.named_parameters():  # the last classifier's gradient is far from the ReLU flips
        if n.endswith("conv_out.conv_out.weight"):
            close(grads[n], p.grad, torch.float32, scale=50.0)
