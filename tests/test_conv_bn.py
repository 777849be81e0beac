"""Fused conv + BN (+ residual) (+ ReLU): forward, backward and running statistics vs a float64 reference.

The reference is plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` copies run in float64 on the same inputs.
On CPU the kernels run under Triton's interpreter (conftest), so shapes are tiny; on a GPU they run
compiled, and the ``gpu``-marked tests add model-size shapes. fp16/bf16 run in both.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import weakref
from dataclasses import dataclass

import pytest
import torch
import triton
from conftest import HALF
from fastbisenet.kernels import conv_bn as K
from torch import Tensor, nn

from fastbisenet.ops import conv_bn as ops

# Every buffer the ops allocate starts NaN (conftest ``poison``): an element a kernel forgets to write fails.
pytestmark = pytest.mark.usefixtures("poison")

# Normalised max error ``max|got - ref| / max(max|ref|, 1)`` allowed per dtype.
TOL: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}


def check(got: Tensor | None, ref: Tensor | None, dtype: torch.dtype, what: str, tol: float | None = None,
          floor: float = 1.0) -> None:
    """``max|got - ref| / max(max|ref|, floor) <= tol`` (default ``TOL[dtype]``); ``floor`` < 1 for values
    that are small by construction, where the absolute floor of 1 would hide relative errors."""
    assert got is not None and ref is not None, what
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    got64, ref64 = got.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(got64).all(), f"{what}: non-finite values"
    err = (got64 - ref64).abs().max().item() / max(ref64.abs().max().item(), floor)
    tol = TOL[dtype] if tol is None else tol
    assert err <= tol, f"{what}: normalised error {err:.3g} > {tol:.3g}"


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else v


def make_modules(cin: int, cout: int, k: int | tuple[int, int], s: int | tuple[int, int], *, bias: bool, bn: bool,
                 train: bool, momentum: float | None = 0.1, eps: float = 0.05, device: str = "cpu"):
    """Random conv/BN pair (non-trivial affine and running stats, padding ``k // 2`` per dimension) and its
    float64 copy. ``eps`` is not PyTorch's default, so that a kernel or launcher using 1e-5 instead of the
    module's value fails (at 1e-5 against variances of ~1-10 the difference would be within tolerance)."""
    kh, kw = _pair(k)
    conv = nn.Conv2d(cin, cout, (kh, kw), s, (kh // 2, kw // 2), bias=bias)
    norm = nn.BatchNorm2d(cout, eps=eps, momentum=momentum) if bn else None
    with torch.no_grad():
        if bias:
            conv.bias.uniform_(-0.5, 0.5)
        if norm is not None:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
            norm.running_mean.uniform_(-1.0, 1.0)
            norm.running_var.uniform_(0.5, 2.0)
            norm.num_batches_tracked.fill_(3)
            norm.train(train)
    conv, norm = conv.to(device), (norm.to(device) if norm is not None else None)
    conv64 = copy.deepcopy(conv).double()
    norm64 = copy.deepcopy(norm).double() if norm is not None else None
    return conv, norm, conv64, norm64


def ref_forward(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, residual: Tensor | None, relu: bool,
                mask: Tensor | None = None, mask_tol: float = 0.0):
    """The reference; with ``mask``, the ReLU keeps exactly the ``mask`` elements (the tested op's own ReLU
    mask, ``out > 0``), checking that the two disagree only on inputs within ``mask_tol`` (relative to the
    largest) of zero. A half-precision output puts near-zero values on the other side of zero, and each
    flipped element moves the input gradient by a full upstream gradient value (seen: 5-6% normalised
    error on the fp16 stem for 2 seeds in 8, eager fp16 alike); pinning removes that chaos, not the check."""
    y = conv(x)
    if bn is not None:
        y = bn(y)
    if residual is not None:
        y = y + residual
    if not relu:
        return y
    if mask is None:
        return torch.relu(y)
    flipped = y.detach()[mask != (y.detach() > 0)]
    if flipped.numel():
        assert flipped.abs().max() <= mask_tol * y.detach().abs().max(), "ReLU masks differ away from zero"
    return y * mask.to(y.dtype)


def ref_pixel_sums(out: Tensor, rows: int) -> Tensor:
    """(S, N, C) sums of ``out`` over consecutive slots of ``rows`` flat pixels (``h * W + w``) of each image."""
    n, c, h, w = out.shape
    slots = -(-h * w // rows)
    flat = torch.nn.functional.pad(out.reshape(n, c, h * w), (0, slots * rows - h * w))
    return flat.reshape(n, c, slots, rows).sum(3).permute(2, 0, 1)


@dataclass
class Case:
    n: int
    cin: int
    cout: int
    h: int
    w: int
    k: int | tuple[int, int]
    s: int | tuple[int, int]
    train: bool = True
    residual: bool = False
    relu: bool = True
    bias: bool = False
    bn: bool = True
    channels_last: bool = False
    freeze_bn: bool = False


CASES = {
    # the stem: Cin=3 (flattened-K loop with masking), 7x7 s2 on an odd image, NCHW input
    "7x7s2-cin3-train": Case(1, 3, 8, 37, 53, 7, 2),
    "7x7s1-cin5-eval": Case(1, 5, 6, 12, 10, 7, 1, train=False, bias=True),
    # 3x3 s2 on odd sizes, channels not a power of two, residual + bias, channels_last input
    "3x3s2-train-res-bias-cl": Case(3, 20, 12, 17, 23, 3, 2, residual=True, bias=True, channels_last=True),
    "3x3s2-eval-res": Case(2, 20, 12, 17, 23, 3, 2, train=False, residual=True),
    # Cin >= 32: tap loop with an inner, masked channel-block loop
    "3x3s1-cin33-train": Case(2, 33, 7, 9, 11, 3, 1, channels_last=True),
    "3x3s1-cin40-eval-frozen": Case(2, 40, 20, 9, 11, 3, 1, train=False, freeze_bn=True, residual=True),
    "1x1s1-train-res-norelu": Case(2, 40, 24, 8, 8, 1, 1, residual=True, relu=False),
    "1x1s2-eval-norelu": Case(2, 24, 40, 9, 9, 1, 2, train=False, relu=False, channels_last=True),
    "3x3s1-eval-res-bias": Case(2, 6, 5, 7, 9, 3, 1, train=False, residual=True, bias=True),
    # no BN: conv (+bias) (+residual) (+relu)
    "3x3s1-nobn-bias": Case(2, 6, 10, 7, 9, 3, 1, bn=False, bias=True, residual=True),
    "1x1s1-nobn-norelu": Case(2, 6, 10, 7, 9, 1, 1, bn=False, relu=False),
    # rectangular kernels and unequal strides (padding (1, 2) / (2, 1)): no axis may stand in for the other
    "3x5s21-cin5-train": Case(2, 5, 6, 13, 17, (3, 5), (2, 1)),
    "5x3s22-cin40-eval-res": Case(2, 40, 12, 11, 15, (5, 3), (2, 2), train=False, residual=True),
    "3x5s12-cin36-train-cl": Case(1, 36, 10, 9, 14, (3, 5), (1, 2), channels_last=True),
}


def run_case(case: Case, device: str, dtype: torch.dtype = torch.float32, pool: bool = False) -> None:
    """Forward, backward and BN buffers against float64 modules; ``pool`` also checks the pixel sums output
    and back-propagates a random (slot-dependent) gradient through it."""
    conv, bn, conv64, bn64 = make_modules(case.cin, case.cout, case.k, case.s, bias=case.bias, bn=case.bn,
                                          train=case.train, device=device)
    if bn is not None and case.freeze_bn:
        for m in (bn, bn64):
            m.weight.requires_grad_(False)
            m.bias.requires_grad_(False)
    conv, bn = conv.to(dtype), (bn.to(dtype) if bn is not None else None)
    x = (torch.randn(case.n, case.cin, case.h, case.w, device=device) * 2 + 1.5).to(dtype)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    x64 = x.detach().double().requires_grad_()
    (kh, kw), (sh, sw) = _pair(case.k), _pair(case.s)
    ho = (case.h + 2 * (kh // 2) - kh) // sh + 1
    wo = (case.w + 2 * (kw // 2) - kw) // sw + 1
    res = res64 = None
    if case.residual:
        res = torch.randn(case.n, case.cout, ho, wo, device=device).to(dtype).requires_grad_()
        res64 = res.detach().double().requires_grad_()

    out = ops.conv_bn_act(x, conv, bn, residual=res, relu=case.relu, pool=pool)
    if pool:
        out, sums = out
    pinned = (out.detach() > 0) if dtype != torch.float32 else None
    ref = ref_forward(x64, conv64, bn64, res64, case.relu, mask=pinned, mask_tol=TOL[dtype])
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    check(out, ref, dtype, "out")
    if case.relu:
        assert (out == 0).any() and (out > 0).any(), "test data must exercise the ReLU mask"

    go = torch.randn(ref.shape, device=device, dtype=torch.float64)
    if pool:
        rows = ops.pool_rows(bn is not None, case.train)
        ref_sums = ref_pixel_sums(ref, rows)
        assert sums.dtype == torch.float32 and sums.shape == ref_sums.shape
        check(sums, ref_sums, dtype, "pixel sums")
        # what is summed is the output as stored (its own dtype), exactly up to fp32 summation order
        check(sums, ref_pixel_sums(out.detach().double(), rows), dtype, "sums of the stored output", tol=1e-5)
        gs = torch.randn(ref_sums.shape, device=device, dtype=torch.float64)
        torch.autograd.backward([out, sums], [go.to(dtype), gs.float()])
        torch.autograd.backward([ref, ref_sums], [go, gs])
    else:
        out.backward(go.to(dtype))
        ref.backward(go)
    check(x.grad, x64.grad, dtype, "dx")
    check(conv.weight.grad, conv64.weight.grad, dtype, "dweight")
    if case.bias:
        check(conv.bias.grad, conv64.bias.grad, dtype, "dbias")
    if case.residual:
        check(res.grad, res64.grad, dtype, "dresidual")
    if bn is not None:
        if case.freeze_bn:
            assert bn.weight.grad is None and bn.bias.grad is None
        else:
            check(bn.weight.grad, bn64.weight.grad, dtype, "dgamma")
            check(bn.bias.grad, bn64.bias.grad, dtype, "dbeta")
        check(bn.running_mean, bn64.running_mean, dtype, "running_mean")
        check(bn.running_var, bn64.running_var, dtype, "running_var")
        assert bn.num_batches_tracked.item() == bn64.num_batches_tracked.item() == (4 if case.train else 3)


@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_forward_backward(name: str, pool: bool, device: str) -> None:
    run_case(CASES[name], device, pool=pool)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_over_steps(momentum: float | None, device: str) -> None:
    """Several train steps (different batches, non-zero mean), then eval with the updated statistics."""
    conv, bn, conv64, bn64 = make_modules(5, 6, 3, 1, bias=True, bn=True, train=True, momentum=momentum,
                                          device=device)
    for step in range(3):
        x = torch.randn(2, 5, 6, 7, device=device) * (1 + step) + 2 - step
        out = ops.conv_bn_act(x, conv, bn)
        check(out, ref_forward(x.double(), conv64, bn64, None, True), torch.float32, f"out step {step}")
        check(bn.running_mean, bn64.running_mean, torch.float32, f"running_mean step {step}")
        check(bn.running_var, bn64.running_var, torch.float32, f"running_var step {step}")
        assert bn.num_batches_tracked.item() == bn64.num_batches_tracked.item() == 4 + step
    bn.eval()
    bn64.eval()
    x = torch.randn(2, 5, 6, 7, device=device) + 1
    check(ops.conv_bn_act(x, conv, bn), ref_forward(x.double(), conv64, bn64, None, True), torch.float32, "eval")
    assert bn.num_batches_tracked.item() == 6


def test_eval_folds_current_running_stats(device: str) -> None:
    """Eval BN is folded from the running stats of *this* call, never a cached copy."""
    conv, bn, conv64, bn64 = make_modules(4, 6, 1, 1, bias=False, bn=True, train=False, device=device)
    x = torch.randn(1, 4, 5, 5, device=device)
    ops.conv_bn_act(x, conv, bn)
    with torch.no_grad():
        for m in (bn, bn64):
            m.running_mean.add_(0.7)
            m.running_var.mul_(3.0)
            m.weight.mul_(-1.0)
    check(ops.conv_bn_act(x, conv, bn, relu=False), ref_forward(x.double(), conv64, bn64, None, False),
          torch.float32, "out after changing running stats")


def test_batch_stats_large_mean(device: str) -> None:
    """Channel mean >> std: the variance must not lose its digits to E[x^2] - E[x]^2 cancellation."""
    conv, bn, conv64, bn64 = make_modules(8, 4, 1, 1, bias=True, bn=True, train=True, momentum=1.0, device=device)
    with torch.no_grad():
        for c in (conv, conv64):
            c.bias.fill_(1000.0)
    x = torch.randn(2, 8, 12, 11, device=device) * 0.5 + 1.0
    out = ops.conv_bn_act(x, conv, bn, relu=False)
    ref = ref_forward(x.double(), conv64, bn64, None, False)
    # the stored fp32 conv output (~1000) has an ulp of 6e-5, amplified by 1/std after normalising
    check(out, ref, torch.float32, "out", tol=1e-3)
    # momentum=1: running_var is exactly the unbiased batch variance (~1 here, mean ~1000)
    err = ((bn.running_var.double().cpu() - bn64.running_var.cpu()) / bn64.running_var.cpu()).abs().max().item()
    assert err < 1e-4, f"relative variance error {err:.3g}"
    check(bn.running_mean, bn64.running_mean, torch.float32, "running_mean")


@pytest.mark.parametrize("train", [True, False])
def test_concat_conv_bn_act(train: bool, device: str) -> None:
    """Two K segments (NCHW + channels_last inputs) == 1x1 conv over the materialised concat."""
    conv, bn, conv64, bn64 = make_modules(40, 12, 1, 1, bias=False, bn=True, train=train, device=device)
    a = (torch.randn(2, 24, 7, 9, device=device) + 1).requires_grad_()
    b = (torch.randn(2, 16, 7, 9, device=device) - 0.5).contiguous(memory_format=torch.channels_last)
    b.requires_grad_()
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    out = ops.concat_conv_bn_act([a, b], conv, bn)
    ref = ref_forward(torch.cat([a64, b64], dim=1), conv64, bn64, None, True)
    check(out, ref, torch.float32, "out")
    go = torch.randn(ref.shape, device=device, dtype=torch.float64)
    out.backward(go.float())
    ref.backward(go)
    check(a.grad, a64.grad, torch.float32, "da")
    check(b.grad, b64.grad, torch.float32, "db")
    check(conv.weight.grad, conv64.weight.grad, torch.float32, "dweight")
    check(bn.weight.grad, bn64.weight.grad, torch.float32, "dgamma")
    check(bn.bias.grad, bn64.bias.grad, torch.float32, "dbeta")
    check(bn.running_mean, bn64.running_mean, torch.float32, "running_mean")
    check(bn.running_var, bn64.running_var, torch.float32, "running_var")


def test_concat_rejects_unsupported(device: str) -> None:
    conv3, bn, _, _ = make_modules(8, 4, 3, 1, bias=False, bn=True, train=True, device=device)
    xs = [torch.randn(1, 4, 5, 5, device=device)] * 2
    with pytest.raises(NotImplementedError, match="1x1"):
        ops.concat_conv_bn_act(xs, conv3, bn)
    conv1, bn, _, _ = make_modules(12, 4, 1, 1, bias=False, bn=True, train=True, device=device)
    with pytest.raises(NotImplementedError, match="1 or 2 inputs"):
        ops.concat_conv_bn_act(xs + xs[:1], conv1, bn)
    with pytest.raises(ValueError, match="differ"):
        ops.concat_conv_bn_act([xs[0], torch.randn(1, 8, 4, 5, device=device)], conv1, bn)


def test_rejects_unsupported_convs(device: str) -> None:
    x = torch.randn(1, 4, 6, 6, device=device)
    bn = nn.BatchNorm2d(4).to(device)
    with pytest.raises(NotImplementedError):
        ops.conv_bn_act(x, nn.Conv2d(4, 4, 3, padding=1, groups=2).to(device), bn)
    with pytest.raises(NotImplementedError):
        ops.conv_bn_act(x, nn.Conv2d(4, 4, 3, padding=2, dilation=2).to(device), bn)
    with pytest.raises(ValueError, match="more than 1 value"):
        ops.conv_bn_act(torch.randn(1, 4, 1, 1, device=device), nn.Conv2d(4, 4, 1).to(device), bn)
    with pytest.raises(ValueError, match="residual"):
        ops.conv_bn_act(x, nn.Conv2d(4, 4, 1).to(device), bn, residual=torch.randn(1, 4, 3, 3, device=device))


def _check_fwd_bwd(conv: nn.Conv2d, bn: nn.BatchNorm2d, device: str) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    """Output, dx, dweight and (affine BN) dgamma/dbeta against float64 copies (ReLU on, non-zero-mean input);
    returns the copies."""
    conv64, bn64 = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()
    x = (torch.randn(2, 5, 6, 7, device=device) + 1).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    out, ref = ops.conv_bn_act(x, conv, bn), ref_forward(x64, conv64, bn64, None, True)
    check(out, ref, torch.float32, "out")
    go = torch.randn(ref.shape, device=device, dtype=torch.float64)
    out.backward(go.float())
    ref.backward(go)
    check(x.grad, x64.grad, torch.float32, "dx")
    check(conv.weight.grad, conv64.weight.grad, torch.float32, "dweight")
    for name in ("weight", "bias"):  # each may be None (affine=False, or half-affine BNs)
        if getattr(bn, name) is not None:
            check(getattr(bn, name).grad, getattr(bn64, name).grad, torch.float32, f"d{name} of the BN")
    return conv64, bn64


@pytest.mark.parametrize("variant", ["affine_false", "no_running_stats_eval", "no_running_stats_train"])
def test_bn_variants(variant: str, device: str) -> None:
    affine = variant != "affine_false"
    track = variant == "affine_false"
    bn = nn.BatchNorm2d(6, affine=affine, track_running_stats=track).to(device)
    bn.train(variant != "no_running_stats_eval")
    conv = nn.Conv2d(5, 6, 3, 1, 1, bias=False).to(device)
    _, bn64 = _check_fwd_bwd(conv, bn, device)
    if track:
        check(bn.running_mean, bn64.running_mean, torch.float32, "running_mean")
        check(bn.running_var, bn64.running_var, torch.float32, "running_var")
        assert bn.num_batches_tracked.item() == bn64.num_batches_tracked.item() == 1


@pytest.mark.parametrize("train", [True, False])
def test_frozen_input_and_no_grad_mode(train: bool, device: str) -> None:
    """An image input without grad (only parameters get gradients), and inference under no_grad."""
    conv, bn, conv64, bn64 = make_modules(3, 6, 3, 2, bias=False, bn=True, train=train, device=device)
    x = torch.randn(2, 3, 9, 10, device=device) + 0.5
    with torch.no_grad():
        out = ops.conv_bn_act(x, conv, bn)
    assert out.grad_fn is None
    check(out, ref_forward(x.double(), conv64, bn64, None, True), torch.float32, "no_grad out")
    out = ops.conv_bn_act(x, conv, bn)
    ref = ref_forward(x.double(), conv64, bn64, None, True)
    go = torch.randn(ref.shape, device=device, dtype=torch.float64)
    out.backward(go.float())
    ref.backward(go)
    check(conv.weight.grad, conv64.weight.grad, torch.float32, "dweight")
    check(bn.weight.grad, bn64.weight.grad, torch.float32, "dgamma")
    check(bn.running_mean, bn64.running_mean, torch.float32, "running_mean")


def test_kernels_write_every_output(device: str) -> None:
    """NaN-poisoned output buffers are fully overwritten with the right values, for each launcher."""
    x = torch.randn(2, 7, 11, 13, device=device) + 1
    conv = nn.Conv2d(7, 10, 3, 2, 1, bias=True).to(device)
    w = ops._pack_weight(conv.weight, x.dtype)
    y_ref = torch.nn.functional.conv2d(x.double(), conv.weight.double(), conv.bias.double(), 2, 1)
    M = y_ref.numel() // 10
    for stat_m in (32, 64):  # one and two statistics slots per 64-row tile
        out = torch.full_like(y_ref, float("nan"), dtype=torch.float32).contiguous(memory_format=torch.channels_last)
        part = torch.full((2, -(-M // stat_m), 10), float("nan"), device=device)
        y, part = K.conv_bn_fwd(x, w, (3, 3), (2, 2), (1, 1), bias=conv.bias, stats=True, stat_m=stat_m,
                                out=out, part=part)
        check(y, y_ref, torch.float32, f"conv out (stat_m={stat_m})")
        mean, invstd, scale = K.bn_stats(part, M, stat_m, 1e-5, None)
        check(mean, y_ref.mean(dim=(0, 2, 3)), torch.float32, f"batch mean (stat_m={stat_m})")
        var = y_ref.var(dim=(0, 2, 3), unbiased=False)
        check(invstd, (var + 1e-5).rsqrt(), torch.float32, f"batch invstd (stat_m={stat_m})")
        assert torch.equal(scale, invstd)

    C = 10
    mean, scale, shift = (torch.randn(C, device=device) for _ in range(3))
    res = torch.randn(y.shape, device=device)
    out = torch.full_like(y, float("nan"))
    z, _ = K.bn_act(y, mean, scale, shift, res, True, out=out)
    shape = (1, C, 1, 1)
    z_ref = torch.relu((y.double() - mean.double().view(shape)) * scale.double().view(shape)
                       + shift.double().view(shape) + res.double())
    check(z, z_ref, torch.float32, "bn_act")

    go = torch.randn(y.shape, device=device)
    a, b, c = (torch.randn(C, device=device) for _ in range(3))
    dy, dres = K.bn_act_bwd(go, z, y, mean, a, b, c, dy_dtype=torch.float32, dres_dtype=torch.float32)
    g = go.double() * (z > 0)
    check(dres, g, torch.float32, "dres")
    check(dy, g * a.double().view(shape) + b.double().view(shape) * (y.double() - mean.double().view(shape))
          + c.double().view(shape), torch.float32, "dy")


def _slot_moments(y: Tensor, slot_m: int) -> Tensor:
    """fp32 (2, n_slot, C) per-slot mean and centred sum of squares of the rows of ``y`` (M, C), float64 math."""
    slots = y.double().split(slot_m)
    mean = torch.stack([s.mean(0) for s in slots])
    m2 = torch.stack([((s - s.mean(0)) ** 2).sum(0) for s in slots])
    return torch.stack([mean, m2]).float().contiguous()


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("C", [10, 70])
def test_bn_stats_many_slots(C: int, momentum: float | None, device: str) -> None:
    """Batch statistics of thousands of rows through the parallel partial levels (PARTIALS_CHUNK slots per
    program), a partial last slot, a large mean (a sum of squares would cancel), running-stat update and
    one ``num_batches_tracked`` count per call."""
    stat_m = 8
    n_part = K.PARTIALS_CHUNK ** 2 * 3 + 5  # two reduction levels before the finish
    M = n_part * stat_m - 3
    y = (torch.randn(M, C, dtype=torch.float64) * (torch.rand(C, dtype=torch.float64) * 3 + 0.1)
         + torch.linspace(-1000, 1000, C, dtype=torch.float64)).to(device)
    part = _slot_moments(y, stat_m)
    gamma = torch.rand(C, device=device) + 0.5
    rm, rv = torch.randn(C, device=device), torch.rand(C, device=device) + 0.5
    nbt = torch.tensor(4, device=device)
    rm0, rv0 = rm.clone(), rv.clone()
    mean, invstd, scale = K.bn_stats(part, M, stat_m, 1e-5, gamma, rm, rv, nbt, momentum)
    ref_var = y.var(0, unbiased=False)
    check(mean, y.mean(0), torch.float32, "mean")
    check(invstd, (ref_var + 1e-5).rsqrt(), torch.float32, "invstd", tol=1e-5)
    check(scale, gamma.double() * (ref_var + 1e-5).rsqrt(), torch.float32, "scale", tol=1e-5)
    assert nbt.item() == 5
    f = 0.1 if momentum is not None else 1 / 5
    check(rm, (1 - f) * rm0.double() + f * y.mean(0), torch.float32, "running_mean")
    check(rv, (1 - f) * rv0.double() + f * y.var(0, unbiased=True), torch.float32, "running_var")
    # no running statistics: nothing counted, nothing updated
    mean2, _, _ = K.bn_stats(part, M, stat_m, 1e-5, None)
    assert torch.equal(mean2, mean)


@pytest.mark.parametrize("batch_stats", [True, False])
@pytest.mark.parametrize("n_part", [3, K.PARTIALS_CHUNK ** 2 + 7])
def test_bn_bwd_coefficients(n_part: int, batch_stats: bool, device: str) -> None:
    """Coefficients ``a, b, c`` and dgamma/dbeta from partial sums (one level or several), own dtypes."""
    C, M = 70, 1000
    part = torch.randn(2, n_part, C, device=device)
    gamma, invstd = torch.rand(C, device=device) + 0.5, torch.rand(C, device=device) + 0.5
    coef, dgamma, dbeta = K.bn_bwd_coefficients(part, M, gamma, invstd, batch_stats=batch_stats,
                                                dgamma_dtype=torch.float32, dbeta_dtype=torch.float16)
    sum_g, sum_gx = part.double().sum(1)
    a = gamma.double() * invstd.double()
    check(coef[0], a, torch.float32, "a")
    zero = torch.zeros_like(a)
    floor = 1e-30 if batch_stats else 1.0  # b and c are ~1e-2 here: relative to their own size
    check(coef[1], -a * invstd.double() * sum_gx / M if batch_stats else zero, torch.float32, "b", floor=floor)
    check(coef[2], -a * sum_g / M if batch_stats else zero, torch.float32, "c", floor=floor)
    check(dgamma, sum_gx, torch.float32, "dgamma")
    assert dbeta.dtype == torch.float16
    check(dbeta, sum_g, torch.float16, "dbeta")
    # no sums (eval, no parameter gradients): a = invstd without gamma, b = c = 0
    coef, dgamma, dbeta = K.bn_bwd_coefficients(None, M, None, invstd, batch_stats=False)
    assert dgamma is None and dbeta is None
    check(coef, torch.stack([invstd.double(), zero, zero]), torch.float32, "eval coefficients")


@pytest.mark.parametrize("train", [False, True])
def test_pixel_sums_poisoned(train: bool, device: str, poison) -> None:
    """Every pixel-sum slot is written, with several tiles and a partial last slot per image, batch 3."""
    conv, bn, conv64, bn64 = make_modules(3, 10, 7, 2, bias=False, bn=True, train=train, device=device)
    x = torch.rand(3, 3, 37, 53, device=device) * 2 - 0.5  # 19x27 = 513 output pixels per image
    out, sums = ops.conv_bn_act(x, conv, bn, pool=True)
    ref = ref_forward(x.double(), conv64, bn64, None, True)
    check(out, ref, torch.float32, "out")
    ref_sums = ref_pixel_sums(ref, ops.pool_rows(True, train))
    assert sums.shape[0] > 2 and 513 % ops.pool_rows(True, train) != 0
    check(sums, ref_sums, torch.float32, "pixel sums")


# ------------------------------------------------------------------------------------------ eval BN fold


@pytest.mark.parametrize("params", ["gamma_beta", "gamma_only", "beta_only", "none"])
@pytest.mark.parametrize("bias", [False, True])
def test_eval_fold_optional_affine(params: str, bias: bool, device: str) -> None:
    """The in-kernel fold with each of gamma/beta absent (1/0), a conv bias, a large eps, fp64 reference."""
    x = torch.randn(2, 5, 6, 7, device=device) + 0.5
    w = torch.randn(6, 5, 3, 3, device=device) * 0.3
    b = torch.randn(6, device=device) if bias else None
    gamma = torch.rand(6, device=device) + 0.5 if params in ("gamma_beta", "gamma_only") else None
    beta = torch.randn(6, device=device) if params in ("gamma_beta", "beta_only") else None
    rm, rv = torch.randn(6, device=device), torch.rand(6, device=device) + 0.5
    eps = 0.25
    out, y, mean, invstd, sums = ops.forward(x, None, w, b, gamma, beta, None, rm, rv, None, (1, 1), (1, 1), eps,
                                             0.1, True, False, False, need_stats=False)
    assert y is None and mean is None and invstd is None and sums is None
    ref = torch.nn.functional.batch_norm(
        torch.nn.functional.conv2d(x.double(), w.double(), None if b is None else b.double(), 1, 1),
        rm.double(), rv.double(), None if gamma is None else gamma.double(),
        None if beta is None else beta.double(), False, 0.0, eps)
    check(out, ref, torch.float32, "out")
    _, _, mean, invstd, _ = ops.forward(x, None, w, b, gamma, beta, None, rm, rv, None, (1, 1), (1, 1), eps, 0.1,
                                        True, False, False)
    assert torch.equal(mean, rm) and mean.data_ptr() != rm.data_ptr()
    check(invstd, (rv.double() + eps).rsqrt(), torch.float32, "invstd")


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("params", ["gamma_only", "beta_only"])
def test_half_affine_backward(params: str, train: bool, device: str) -> None:
    """A BN with only one of weight/bias (the other set to None): its gradient, train and eval, as the reference's."""
    conv = nn.Conv2d(5, 6, 3, 1, 1, bias=False).to(device)
    bn = nn.BatchNorm2d(6).to(device).train(train)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    kept = "weight" if params == "gamma_only" else "bias"
    setattr(bn, "bias" if kept == "weight" else "weight", None)
    _, bn64 = _check_fwd_bwd(conv, bn, device)
    got, ref = getattr(bn, kept).grad, getattr(bn64, kept).grad
    check(got, ref, torch.float32, f"d{kept}")


@pytest.mark.parametrize("affine", [True, False])
def test_eval_affine_backward(affine: bool, device: str) -> None:
    """Eval mode with a conv bias, affine BN or not (gamma/beta absent in the kernel), with grads."""
    conv = nn.Conv2d(5, 6, 3, 1, 1, bias=True).to(device)
    bn = nn.BatchNorm2d(6, affine=affine).to(device).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    conv64, _ = _check_fwd_bwd(conv, bn, device)
    check(conv.bias.grad, conv64.bias.grad, torch.float32, "dbias")


def test_eval_backward_uses_forward_time_stats(device: str) -> None:
    """Frozen-BN backward uses the running statistics of its forward, even if they change before it runs."""
    conv, bn, conv64, bn64 = make_modules(4, 6, 3, 1, bias=False, bn=True, train=False, device=device)
    x = (torch.randn(2, 4, 5, 6, device=device) + 0.5).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    out, ref = ops.conv_bn_act(x, conv, bn), ref_forward(x64, conv64, bn64, None, True)
    with torch.no_grad():
        bn.running_mean.add_(5.0)
        bn.running_var.mul_(10.0)
    go = torch.randn(ref.shape, device=device, dtype=torch.float64)
    out.backward(go.float())
    ref.backward(go)
    check(x.grad, x64.grad, torch.float32, "dx")
    check(bn.weight.grad, bn64.weight.grad, torch.float32, "dgamma")


def test_custom_op_eval_without_stats(device: str) -> None:
    """``fastbisenet::conv_bn_act`` with ``need_stats=False`` (eval, no backward): opcheck and outputs."""
    x = torch.randn(2, 5, 7, 9, device=device)
    w = torch.randn(6, 5, 3, 3, device=device)
    rm, rv = torch.randn(6, device=device) * 0.1, torch.rand(6, device=device) + 0.5
    for gamma, beta in ((torch.rand(6, device=device) + 0.5, torch.randn(6, device=device)), (None, None)):
        args = (x, None, w, torch.randn(6, device=device), gamma, beta, None, rm, rv, None, [1, 1], [1, 1], 1e-5,
                0.1, True, False, True, False)
        result = torch.library.opcheck(torch.ops.fastbisenet.conv_bn_act.default, args)
        assert set(result.values()) == {"SUCCESS"}, result
        outs = torch.ops.fastbisenet.conv_bn_act(*args)
        assert [t.numel() for t in outs[1:]] == [0] * 7
        want = ops.forward(*args[:10], (1, 1), (1, 1), *args[12:17])[0]
        torch.testing.assert_close(outs[0], want, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ packed weights


def _eval_pair(device: str):
    conv, bn, _, _ = make_modules(4, 6, 3, 1, bias=True, bn=True, train=False, device=device)
    return conv, bn, torch.randn(1, 4, 5, 6, device=device)


def _check_fresh(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: Tensor, what: str) -> None:
    """The fused eval output matches an fp64 reference built from the modules' *current* state."""
    conv64, bn64 = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()
    with torch.no_grad():
        check(ops.conv_bn_act(x, conv, bn, relu=False), ref_forward(x.double(), conv64, bn64, None, False),
              torch.float32, what)


def test_packed_weight_is_cached(device: str) -> None:
    w = nn.Conv2d(4, 6, 3).to(device).weight
    p = ops._packed_weight(w, torch.float32)
    assert ops._packed_weight(w, torch.float32) is p
    assert torch.equal(p, ops._pack_weight(w, torch.float32))
    assert torch.equal(p.view(3, 3, 4, 6), w.detach().permute(2, 3, 1, 0))
    with torch.no_grad():
        w.mul_(2.0)
    q = ops._packed_weight(w, torch.float32)
    assert q is p and torch.equal(q, ops._pack_weight(w, torch.float32))  # repacked into the same buffer
    h = ops._packed_weight(w, torch.float64)  # one packing per dtype
    assert h.dtype == torch.float64 and ops._packed_weight(w, torch.float32) is p
    ref = weakref.ref(p)
    del w, p, q, h
    gc.collect()
    assert ref() is None  # the cache does not keep dead weights' packings alive


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
@pytest.mark.parametrize("optimizer", ["SGD", "AdamW"])
def test_packed_weight_never_stale_optimizer_step(optimizer: str, fused: bool, device: str) -> None:
    """Fused optimizers write parameters without moving their version counters: the global step hook does."""
    conv, bn, x = _eval_pair(device)
    kwargs = dict(lr=0.5, momentum=0.9) if optimizer == "SGD" else dict(lr=0.05)
    opt = getattr(torch.optim, optimizer)(conv.parameters(), fused=fused, foreach=None if fused else True, **kwargs)
    for step in range(2):
        _check_fresh(conv, bn, x, f"before step {step}")
        ops.conv_bn_act(x, conv, bn).square().sum().backward()
        opt.step()
        opt.zero_grad()
    _check_fresh(conv, bn, x, "after steps")


def test_step_hook_leaves_parameters_without_gradients_alone() -> None:
    """The global step hook moves only the versions of parameters with a gradient: an optimizer step over a
    parameter without one (frozen, or not in this loss) does not invalidate a graph that saved it."""
    q, w = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
    loss = (q * w).sum()  # saves q and w for backward
    torch.optim.SGD([q], lr=0.1, fused=True).step()  # q.grad is None
    loss.backward()
    assert torch.equal(q.grad, w.detach())


def test_model_conversion_drops_its_packings_and_swaps(device: str, monkeypatch) -> None:
    """``model.half()`` leaves no packing of the old weights behind, and with
    ``torch.__future__.set_swap_module_params_on_conversion(True)`` conversions and ``load_state_dict`` (which
    swap tensors, refused for a tensor with a weak reference) work after an inference."""
    from fastbisenet import BiSeNet

    model = BiSeNet(3, "eval", backend="triton").to(device).eval()
    x = torch.randn(1, 3, 32, 32, device=device)
    with torch.no_grad():
        model(x)
    merged = lambda: any(m in ops._MERGED for m in model.modules())  # the v1 stems' merged conv
    assert any(p in ops._PACKED for p in model.parameters()) and merged()
    state = copy.deepcopy(model.state_dict())
    model.half()
    assert not any(p in ops._PACKED for p in model.parameters()) and not merged()
    monkeypatch.setattr(torch.__future__, "_swap_module_params_on_conversion", True)
    model.float()
    with torch.no_grad():
        model(x)
    model.load_state_dict(state)
    model.double().float()
    ref = BiSeNet(3, "eval", backend="torch").to(device).eval()
    ref.load_state_dict(state)
    with torch.no_grad():
        check(model(x)[0], ref(x)[0].double(), torch.float32, "after the conversions")


def test_packed_weight_never_stale_load_state_dict(device: str) -> None:
    conv, bn, x = _eval_pair(device)
    _check_fresh(conv, bn, x, "initial")
    other = nn.Conv2d(4, 6, 3, 1, 1, bias=True).to(device)
    conv.load_state_dict(other.state_dict())
    assert torch.equal(conv.weight, other.weight)
    _check_fresh(conv, bn, x, "after load_state_dict")


def test_packed_weight_never_stale_in_place(device: str) -> None:
    conv, bn, x = _eval_pair(device)
    _check_fresh(conv, bn, x, "initial")
    with torch.no_grad():
        conv.weight.add_(0.25)
    _check_fresh(conv, bn, x, "after no_grad add_")
    with torch.no_grad():
        conv.weight[:, 1].neg_()  # through a view
    _check_fresh(conv, bn, x, "after an in-place write through a view")


def test_packed_weight_never_stale_data_replacement(device: str) -> None:
    conv, bn, x = _eval_pair(device)
    _check_fresh(conv, bn, x, "initial")
    for i in range(3):  # also replacements that could land at a freed address of an earlier one
        conv.weight.data = torch.randn_like(conv.weight)
        _check_fresh(conv, bn, x, f"after .data replacement {i}")
    conv.weight.data = torch.randn(6, 4, 3, 3, device=device).permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    _check_fresh(conv, bn, x, "after .data replacement with other strides")
    with torch.no_grad():
        conv.weight.data.mul_(-1.0)  # bypasses the version counter: documented, needs a manual clear
    ops.clear_packed_weights()
    _check_fresh(conv, bn, x, "after .data.mul_ and clear_packed_weights")


def test_packed_weight_under_graph_capture(device: str, monkeypatch) -> None:
    """While a CUDA graph is captured, inference calls use a valid cached packing (replays read it); a stale
    one is packed afresh inside the graph and the cache is left alone. Training calls always pack afresh."""
    conv, bn, x = _eval_pair(device)
    with torch.no_grad():
        ops.conv_bn_act(x, conv, bn)
    cached = ops._packed_weight(conv.weight, x.dtype)
    calls = []
    real_pack = ops._pack_weight
    monkeypatch.setattr(ops, "_pack_weight", lambda *a, **k: calls.append(1) or real_pack(*a, **k))
    monkeypatch.setattr(ops, "_capturing", lambda weight: True)
    with torch.no_grad():
        ops.conv_bn_act(x, conv, bn)  # inference capture, valid cache: no packing
    assert calls == [] and ops._packed_weight(conv.weight, x.dtype) is cached
    with torch.no_grad():
        conv.weight.add_(1.0)
        ops.conv_bn_act(x, conv, bn)  # stale: packed inside the "graph", cache untouched
    assert len(calls) == 1
    ops.conv_bn_act(x, conv, bn)  # grads possible (frozen-BN fine-tuning): packed afresh
    assert len(calls) == 2
    bn.train()
    with torch.no_grad():
        ops.conv_bn_act(x, conv, bn)  # train-mode BN: packed afresh
    assert len(calls) == 3
    monkeypatch.setattr(ops, "_capturing", lambda weight: False)
    bn.eval()
    with torch.no_grad():
        ops.conv_bn_act(x, conv, bn)  # eager again: the stale entry is repacked in place
    assert len(calls) == 4 and ops._packed_weight(conv.weight, x.dtype) is cached


def test_training_never_uses_a_stale_packing(device: str) -> None:
    """Writes through ``.data`` bypass the version counter; training calls pack afresh, so they still see them."""
    conv, bn, x = _eval_pair(device)
    bn.train()
    ops.conv_bn_act(x, conv, bn)
    with torch.no_grad():
        conv.weight.data.mul_(-1.0)
    bn.eval()
    x = x.detach().requires_grad_()  # a backward may follow: packed afresh
    conv64, bn64 = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()
    got = ops.conv_bn_act(x, conv, bn, relu=False)
    with torch.no_grad():
        check(got.detach(), ref_forward(x.detach().double(), conv64, bn64, None, False), torch.float32,
              "after .data.mul_ with autograd recording")


def test_packed_weight_inference_mode(device: str) -> None:
    conv, bn, x = _eval_pair(device)
    with torch.inference_mode():
        _check_fresh(conv, bn, x, "under inference_mode")  # the packed buffer is made here...
    with torch.no_grad():
        conv.weight.add_(1.0)
    _check_fresh(conv, bn, x, "after inference_mode")  # ...and must stay writable outside it
    with torch.inference_mode():
        frozen = nn.Conv2d(4, 6, 3, 1, 1, bias=True).to(device)  # inference-tensor weights: never cached
        _check_fresh(frozen, bn, x, "inference-tensor weights")
        frozen.weight.add_(1.0)  # no version counter to bump
        _check_fresh(frozen, bn, x, "inference-tensor weights after add_")


# ------------------------------------------------------------------------------------------ half precision


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", ["7x7s2-cin3-train", "3x3s2-train-res-bias-cl", "3x3s2-eval-res",
                                  "1x1s1-train-res-norelu"])
def test_half_precision(name: str, dtype: torch.dtype, device: str) -> None:
    run_case(CASES[name], device, dtype, pool=name.endswith("-cl") or name.endswith("-eval-res"))


# ------------------------------------------------------------------------------------------ GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("case", [
    Case(2, 64, 64, 56, 56, 3, 1, residual=True, channels_last=True),
    Case(2, 64, 128, 56, 56, 3, 2),
    Case(2, 2048, 96, 8, 8, 1, 1, train=False, channels_last=True),
    Case(2, 3, 64, 224, 224, 7, 2),
], ids=["3x3-64", "3x3s2-64-128", "1x1-2048", "stem"])
@pytest.mark.parametrize("pool", [False, True])
def test_gpu_realistic_shapes(case: Case, pool: bool, device: str) -> None:
    run_case(case, device, pool=pool)


def test_tf32_setting_read_through_the_new_api() -> None:
    """After ``torch.backends.fp32_precision = "ieee"`` the legacy ``cudnn.allow_tf32`` getter raises; the
    launcher asks the new per-op setting first."""
    from fastbisenet.kernels import conv_bn as kernels

    if not hasattr(torch.backends, "fp32_precision"):
        pytest.skip("this torch has only the legacy TF32 flags")
    flags = [(torch.backends, "fp32_precision"), (torch.backends.cudnn.conv, "fp32_precision"),
             (torch.backends.cudnn.rnn, "fp32_precision"), (torch.backends.cuda.matmul, "fp32_precision")]
    saved = [getattr(obj, name) for obj, name in flags]
    try:
        torch.backends.fp32_precision = "ieee"
        assert kernels._conv_allows_tf32() is False
    finally:
        for (obj, name), value in zip(flags, saved, strict=True):
            setattr(obj, name, value)
    assert isinstance(torch.backends.cudnn.allow_tf32, bool)  # the legacy getter works again


def test_track_running_stats_turned_off_after_construction(device: str) -> None:
    """nn.BatchNorm2d keeps its buffers but neither updates nor reads them in training then."""
    conv = nn.Conv2d(3, 4, 3, 1, 1, bias=False).to(device)
    bn = nn.BatchNorm2d(4).to(device).train()
    bn.track_running_stats = False
    twin_conv, twin_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    x = torch.randn(2, 3, 5, 6, device=device)
    got = ops.conv_bn_act(x, conv, bn)
    want = torch.relu(twin_bn(twin_conv(x)))
    check(got.detach().double(), want.detach().double(), torch.float32, "output")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(bn, name), getattr(twin_bn, name)), name


def test_residual_of_another_dtype_is_refused(device: str) -> None:
    conv, bn = nn.Conv2d(3, 4, 1, bias=False).to(device), nn.BatchNorm2d(4).to(device).eval()
    x = torch.randn(1, 3, 4, 4, device=device)
    with pytest.raises(ValueError, match="residual dtype"):
        ops.conv_bn_act(x, conv, bn, residual=torch.randn(1, 4, 4, 4, device=device, dtype=torch.float64))


def test_in_image_offsets_that_overflow_int32_are_refused() -> None:
    """A strided view can address past 2**31 within one image while holding few elements (meta: no memory)."""
    storage = torch.empty(2**31 + 16, dtype=torch.int8, device="meta")
    view = storage.as_strided((1, 2, 3, 3), (0, 2**31, 1, 3))
    with pytest.raises(ValueError, match="2\\*\\*31"):
        K._check_image_numel(view)
    K._check_image_numel(torch.empty(2, 3, 4, 5, device="meta"))


SMALL_C_CASES = {
    "3x3s2-cin5": Case(2, 5, 6, 9, 11, 3, 2, residual=True),  # K = 45: 3 steps of 16
    "3x3s1-cin6": CASES["3x3s1-eval-res-bias"],  # K = 54
    "7x7s2-cin3": CASES["7x7s2-cin3-train"],  # K = 147: 10 steps, the stem
    "3x5s21-cin5": CASES["3x5s21-cin5-train"],  # K = 75, rows of KW * C = 25
    "7x7s1-cin5": CASES["7x7s1-cin5-eval"],  # K = 245
}


@contextlib.contextmanager
def forward_block_k(block_k: int | None, one_loop: bool = False):
    """Run the forward conv kernel with one config of ``BLOCK_K=block_k`` and the given K-loop form
    (``block_k=None``: the current configs)."""
    kernel = K.conv_bn_fwd_kernel
    configs, cache = kernel.configs, kernel.cache
    if block_k is not None:
        kernel.configs = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": block_k, "GROUP_M": 8,
                                         "ONE_LOOP": one_loop}, num_warps=4)]
    kernel.cache = {}
    try:
        yield
    finally:
        kernel.configs, kernel.cache = configs, cache


@pytest.mark.parametrize("name", list(SMALL_C_CASES))
def test_small_channel_loop_over_several_k_steps(name, device, monkeypatch):
    """Inputs with C < 32 take the flattened-K loop when the row loop is off. The interpreter's one config
    has BLOCK_K=256, one step for every K of these convs, so this forces BLOCK_K=16 to run the loop over
    several steps (the K index split across steps, a partial last step) under the interpreter too, against
    the float64 references."""
    monkeypatch.setattr(K, "STEM_ROW_LOOP", False)
    with forward_block_k(16):
        run_case(SMALL_C_CASES[name], device)
        run_case(SMALL_C_CASES[name], device, pool=True)


@pytest.mark.parametrize("block_k", [None, 16], ids=["interp-config", "block_k16"])
@pytest.mark.parametrize("name", list(SMALL_C_CASES))
def test_small_channel_row_loop(name, block_k, device, monkeypatch):
    """The per-kernel-row loop (``STEM_ROW_LOOP``, the default): every small-C case at the interpreter's config
    (BLOCK_K=256: one step per kernel row for all of them) and at BLOCK_K=16 (per row where a row's
    KW*C pairs fit, 3x3 with C=5; the others fall back to the flattened loop)."""
    monkeypatch.setattr(K, "STEM_ROW_LOOP", True)
    with forward_block_k(block_k):
        run_case(SMALL_C_CASES[name], device)
        run_case(SMALL_C_CASES[name], device, pool=True)


ONE_LOOP_CASES = {  # C_in >= 32: smaller inputs take the FLAT_C loops
    "3x3s2-cin36-train-res-bias": Case(3, 36, 12, 17, 23, 3, 2, residual=True, bias=True),
    "3x3s1-cin33-train": CASES["3x3s1-cin33-train"],
    "3x3s1-cin40-eval-frozen": CASES["3x3s1-cin40-eval-frozen"],
    "3x3s1-cin35-nobn-bias": Case(2, 35, 10, 7, 9, 3, 1, bn=False, bias=True, residual=True),
    # C_in a multiple of BLOCK_K (the model's 64/128/256: the step that wraps to the next tap is a full one),
    # and C_out >= 32 so that the stride-1 input gradient (C_in = C_out) takes the one-loop form too
    "3x3s1-cin32-cout40-train": Case(2, 32, 40, 7, 9, 3, 1),
    "3x3s1-cin48-cout48-eval-res": Case(2, 48, 48, 6, 8, 3, 1, train=False, residual=True),
    "3x3s2-cin64-train-cl": Case(2, 64, 24, 9, 11, 3, 2, channels_last=True),
    "3x5s21-cin36-train": Case(2, 36, 10, 9, 13, (3, 5), (2, 1)),  # tap -> (kh, kw) split by KW, not KH
}


@pytest.mark.parametrize("block_k", [16, 32])
@pytest.mark.parametrize("name", list(ONE_LOOP_CASES))
def test_one_loop_over_taps_and_channels(name, block_k, device, monkeypatch):
    """The single (tap, channel block) K loop (``ONE_LOOP``, an autotune choice on GPUs) against the float64
    references: C_in of 32-64 at BLOCK_K 16/32 gives 1-4 channel steps per tap, with and without partial last steps
    (the step -> (tap, channel block) split), stride 1 and 2, padding at every border, NCHW and
    channels_last, train and eval, residual, pixel sums, and (``TRITON_DGRAD``) the stride-1 input gradients
    through the same kernel."""
    monkeypatch.setattr(ops, "TRITON_DGRAD", True)
    with forward_block_k(block_k, one_loop=True):
        run_case(ONE_LOOP_CASES[name], device)
        run_case(ONE_LOOP_CASES[name], device, pool=True)


@pytest.mark.parametrize("train", [False, True])
def test_relu_keeps_nan_like_torch(train: bool, device: str) -> None:
    """A NaN input reaches the output as NaN through the fused ReLU, as ``torch.relu`` propagates it (a plain
    ``max(x, 0)`` compiles to ``max.f32``, which returns 0 for NaN). Eval: only the outputs whose window holds
    the NaN (ReLU in the conv's epilogue); train: every output (batch statistics, ReLU in the BN pass). Backward:
    the gradient of a NaN output passes the ReLU, as in torch (``out > 0`` would zero it)."""
    conv, bn, conv64, bn64 = make_modules(5, 6, 3, 1, bias=False, bn=True, train=train, device=device)
    x = torch.randn(2, 5, 7, 9, device=device)
    x[1, 2, 3, 4] = float("nan")
    x64 = x.double().requires_grad_()
    x.requires_grad_()
    out = ops.conv_bn_act(x, conv, bn, relu=True)
    ref = ref_forward(x64, conv64, bn64, None, True)
    assert torch.isnan(ref).any() and (torch.isnan(ref).all() if train else (ref == 0).any())
    # backward: torch's ReLU passes the gradient of a NaN output (eval: dx stays finite, it does not read x)
    grad = torch.rand_like(ref)
    out.backward(grad.float())
    ref.backward(grad)
    for name, got, want in (("out", out, ref), ("dx", x.grad, x64.grad), ("dw", conv.weight.grad, conv64.weight.grad)):
        assert torch.equal(torch.isnan(got).cpu(), torch.isnan(want).cpu()), name
        finite = ~torch.isnan(want)
        if finite.any():
            check(got.detach()[finite], want.detach()[finite], torch.float32, f"finite {name}")


def _tf32_rna(t: Tensor) -> Tensor:
    """fp32 ``t`` rounded to tf32 (10 mantissa bits) to nearest, ties away from zero (PTX ``cvt.rna``)."""
    bits = t.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & -8192).view(torch.float32)


def _above_tf32_half_ulp(shape: tuple[int, ...], device: str) -> Tensor:
    """Positive fp32 values in [1, 2) whose dropped 13 bits are 0b11 followed by zeros: 3/4 of a tf32 ulp
    above a tf32 value. Rounding to nearest moves every one up by 1/4 ulp, truncation down by 3/4 and exact
    fp32 keeps them: on positive products the results differ by ~3e-4 (exact) and ~1e-3 (truncated) relative
    to the rounded operands' result, with one sign, not noise."""
    bits = (torch.rand(shape) + 1.0).view(torch.int32)
    return ((bits & -8192) | 0x1800).view(torch.float32).to(device)


@pytest.mark.parametrize(("c_in", "k", "loop"), [
    (3, 7, "row"), (3, 7, "flat"), (36, 3, "one_loop"), (36, 3, "nested"), (40, 1, "nested"),
])
def test_tf32_dots_round_operands_to_nearest(c_in, k, loop, device, monkeypatch) -> None:
    """With TF32 allowed (PyTorch's default for fp32 convs) the kernels round fp32 operands to tf32 to nearest
    before the dot, as cuDNN does, in every K-loop form. The tensor cores would truncate them (a bias toward
    zero that compounds through a network). The reference is the float64 conv of the rounded operands; the
    inputs are built so that exact fp32 (the interpreter without the rounding) misses it by ~15x the tolerance
    and truncation (the GPU without it) by ~50x."""
    monkeypatch.setattr(K, "dot_precision", lambda x: "tf32")
    monkeypatch.setattr(K, "STEM_ROW_LOOP", loop == "row")
    x = _above_tf32_half_ulp((2, c_in, 11, 13), device)
    w = _above_tf32_half_ulp((10, c_in, k, k), device)
    block_k = {"one_loop": 16, "nested": 16}.get(loop)
    with forward_block_k(block_k, one_loop=loop == "one_loop"):
        got, _ = K.conv_bn_fwd(x, ops._pack_weight(w, torch.float32), (k, k), (2, 2), (k // 2, k // 2))
    conv = lambda a, b: torch.nn.functional.conv2d(a.double().cpu(), b.double().cpu(), stride=2, padding=k // 2)
    want = conv(_tf32_rna(x), _tf32_rna(w))
    check(got, want, torch.float32, "tf32 conv", tol=2e-5)
    assert (conv(x, w) - want).abs().max() / want.abs().max() > 10 * 2e-5  # exact fp32 would fail the check


# ------------------------------------------------------------------------------------------ two convs, one input


def _stem_pair(device: str, *, bias_a: bool = False, affine_b: bool = True, c_b: int = 5):
    """Two 7x7/s2 conv + eval BN on a 3-channel input with different widths (v1's stems, scaled down)."""
    conv_a, bn_a, _, _ = make_modules(3, 6, 7, 2, bias=bias_a, bn=True, train=False, device=device)
    conv_b, bn_b, _, _ = make_modules(3, c_b, 7, 2, bias=False, bn=True, train=False, device=device)
    if not affine_b:
        bn_b = nn.BatchNorm2d(c_b, eps=bn_a.eps, affine=False).to(device).eval()
        with torch.no_grad():
            bn_b.running_mean.uniform_(-1.0, 1.0)
            bn_b.running_var.uniform_(0.5, 2.0)
    return (conv_a, bn_a), (conv_b, bn_b), torch.randn(2, 3, 37, 53, device=device)


@pytest.fixture
def apply_calls(monkeypatch):
    """Every ``_apply`` call (one per conv kernel launch of the op) records its conv's output width."""
    calls: list[int] = []
    real = ops._apply
    monkeypatch.setattr(ops, "_apply", lambda x, x2, conv, *a, **k: calls.append(conv.out_channels) or
                        real(x, x2, conv, *a, **k))
    return calls


def _check_pair(a, b, x: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """Both outputs of :func:`ops.conv_bn_act_pair` against fp64 references of the modules' current state."""
    with torch.no_grad():
        got = ops.conv_bn_act_pair(x, a, b)
        for g, (conv, bn), name in zip(got, (a, b), "ab", strict=True):
            want = ref_forward(x.double(), copy.deepcopy(conv).double(), copy.deepcopy(bn).double(), None, True)
            check(g, want, torch.float32, f"{what}: output {name}")
    return got


@pytest.mark.parametrize("bias_a,affine_b", [(False, True), (True, False)])
def test_pair_merged_in_inference(bias_a: bool, affine_b: bool, device: str, poison, apply_calls) -> None:
    a, b, x = _stem_pair(device, bias_a=bias_a, affine_b=affine_b)
    out_a, out_b = _check_pair(a, b, x, "merged")
    assert apply_calls == [11]  # one conv with both sets of channels
    assert out_a.shape == (2, 6, 19, 27) and out_b.shape == (2, 5, 19, 27)
    assert out_a.data_ptr() + 6 * out_a.element_size() == out_b.data_ptr()  # channel slices of one tensor
    _check_pair(a, b, x.contiguous(memory_format=torch.channels_last), "channels_last input")
    assert apply_calls == [11, 11]


@pytest.mark.parametrize("source", ["conv_a.weight", "conv_a.bias", "bn_a.weight", "bn_a.bias", "bn_a.running_mean",
                                    "bn_a.running_var", "conv_b.weight", "bn_b.weight", "bn_b.running_var"])
def test_pair_never_stale(source: str, device: str) -> None:
    a, b, x = _stem_pair(device, bias_a=True)
    mods = {"conv_a": a[0], "bn_a": a[1], "conv_b": b[0], "bn_b": b[1]}
    mod, attr = source.split(".")
    t = getattr(mods[mod], attr)
    _check_pair(a, b, x, "initial")
    with torch.no_grad():
        t.mul_(0.5).add_(0.3)  # keeps a variance positive
    _check_pair(a, b, x, f"after in-place writes to {source}")
    with torch.no_grad():
        t[:1].add_(0.5)  # through a view
    _check_pair(a, b, x, f"after a write to {source} through a view")
    for i in range(3):  # replacements that could land at a freed address of an earlier one
        t.data = torch.rand_like(t) + 0.5
        _check_pair(a, b, x, f"after {source}.data replacement {i}")
    t.data.mul_(2.0)  # bypasses the version counter: documented, needs a manual clear
    ops.clear_packed_weights()
    _check_pair(a, b, x, f"after {source}.data.mul_ and clear_packed_weights")


def test_pair_never_stale_load_state_dict_and_to(device: str) -> None:
    a, b, x = _stem_pair(device)
    _check_pair(a, b, x, "initial")
    other, _, _ = _stem_pair(device)
    a[1].load_state_dict(other[1].state_dict())
    a[0].load_state_dict(other[0].state_dict())
    _check_pair(a, b, x, "after load_state_dict")
    b[0].double()  # new parameter dtype: no merge (mixed dtypes), the two convs run separately
    b[0].float()
    _check_pair(a, b, x, "after a dtype round trip")


def test_pair_merge_only_where_exact(device: str, apply_calls) -> None:
    """Training BN, autograd, differing geometry or eps: two separate calls, with their usual semantics."""
    a, b, x = _stem_pair(device)
    a2, b2 = copy.deepcopy(a), copy.deepcopy(b)
    a[1].train()
    a2[1].train()
    with torch.no_grad():
        got = ops.conv_bn_act_pair(x, a, b)
        want = (ops.conv_bn_act(x, *a2), ops.conv_bn_act(x, *b2))
    assert apply_calls == [6, 5, 6, 5]
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    assert torch.equal(a[1].running_mean, a2[1].running_mean) and torch.equal(a[1].num_batches_tracked,
                                                                              a2[1].num_batches_tracked)
    a[1].eval()
    apply_calls.clear()
    out_a, out_b = ops.conv_bn_act_pair(x, a, b)  # grad mode, parameters require grad: a backward may follow
    assert apply_calls == [6, 5]
    (out_a.sum() + out_b.square().sum()).backward()
    assert a[0].weight.grad is not None and b[1].weight.grad is not None
    for change in ("stride", "eps"):
        c, d, _ = _stem_pair(device)
        if change == "stride":
            d[0].stride = (1, 1)
        else:
            d[1].eps = 1e-3
        apply_calls.clear()
        _check_pair(c, d, x, f"different {change}")
        assert apply_calls == [6, 5], change


def test_pair_unsupported_convs_raise_as_single_calls(device: str) -> None:
    a, b, x = _stem_pair(device)
    for conv in (a[0], b[0]):
        conv.dilation = (2, 2)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="dilation"):
        ops.conv_bn_act_pair(x, a, b)


def test_pair_under_graph_capture(device: str, monkeypatch, apply_calls) -> None:
    """While a CUDA graph is captured a valid merged conv is used as is; a stale one is not refreshed (its
    copies would be recorded in the graph): the two convs run separately, and the cache is left alone."""
    a, b, x = _stem_pair(device)
    _check_pair(a, b, x, "eager")
    monkeypatch.setattr(ops, "_capturing", lambda weight: True)
    _check_pair(a, b, x, "capture, valid cache")
    assert apply_calls == [11, 11]
    with torch.no_grad():
        b[1].running_var.add_(1.0)
    _check_pair(a, b, x, "capture, stale cache")
    assert apply_calls == [11, 11, 6, 5]
    monkeypatch.setattr(ops, "_capturing", lambda weight: False)
    _check_pair(a, b, x, "eager again: refreshed")
    assert apply_calls == [11, 11, 6, 5, 11]


def test_pair_cache_dies_with_its_modules(device: str) -> None:
    a, b, x = _stem_pair(device)
    _check_pair(a, b, x, "merged")
    merged = weakref.ref(ops._MERGED[a[0]][b[0]].conv)
    del a, b
    gc.collect()
    assert merged() is None


def test_pair_buffers_kept_alive_for_cuda_graphs(device: str) -> None:
    """``packed_weights_of`` (what a captured graph holds on to) lists the merged conv, its BN tensors and
    its packed weight: a graph replay reads them, whatever becomes of the cache entry later."""
    a, b, x = _stem_pair(device)
    holder = nn.ModuleList([*a, *b])
    _check_pair(a, b, x, "merged")
    entry = ops._MERGED[a[0]][b[0]]
    held = {id(t) for t in ops.packed_weights_of(holder)}
    packed = ops._packed_weight(entry.conv.weight, x.dtype)
    for t in (packed, entry.conv.weight, entry.bn.weight, entry.bn.bias, entry.bn.running_mean, entry.bn.running_var):
        assert id(t) in held


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_pair_after_training_mode_updates(backend: str, device: str) -> None:
    """Running-statistics updates do not bump the buffers' version counters (neither PyTorch's BN nor the
    kernels); the merged pair still sees them, through ``num_batches_tracked``."""
    from fastbisenet import reference

    a, b, x = _stem_pair(device)
    _check_pair(a, b, x, "merged, before training")
    for bn in (a[1], b[1]):
        bn.train()
    with torch.no_grad():
        for _ in range(2):
            (ops if backend == "triton" else reference).conv_bn_act_pair(x * 3.0 + 1.0, a, b)
    for bn in (a[1], b[1]):
        bn.eval()
    _check_pair(a, b, x, f"after {backend} training-mode updates")


def test_pair_sees_hyperparameter_changes(device: str) -> None:
    a, b, x = _stem_pair(device)
    _check_pair(a, b, x, "initial")
    for conv in (a[0], b[0]):
        conv.stride = (1, 1)
    _check_pair(a, b, x, "stride 1")
    for bn in (a[1], b[1]):
        bn.eps = 0.5
    _check_pair(a, b, x, "eps 0.5")


def test_pair_with_inference_tensor_buffers(device: str) -> None:
    a, b, x = _stem_pair(device)
    with torch.inference_mode():
        a[1].running_mean = a[1].running_mean.clone()  # an inference tensor: no version counter
    _check_pair(a, b, x, "inference-tensor running_mean")


# ------------------------------------------------------------------------ Triton dgrad candidate

@pytest.mark.parametrize(("n", "c_in", "c_out", "h", "w", "k", "pad", "channels_last"), [
    (1, 5, 7, 9, 11, (3, 3), (1, 1), True),  # odd sizes, channels not powers of two
    (3, 33, 20, 6, 5, (3, 3), (1, 1), False),  # NCHW gradient, C_out >= 32: the per-tap loop
    (2, 40, 24, 8, 7, (1, 1), (0, 0), True),  # 1x1
    (1, 3, 8, 15, 13, (7, 7), (3, 3), True),  # 7x7 (C_out < 32: the flattened loop over the gradient's channels)
    (2, 6, 4, 7, 9, (3, 3), (0, 0), True),  # no padding: the dgrad pads by 2
    (1, 6, 5, 8, 9, (3, 5), (1, 0), True),  # rectangular kernel, asymmetric padding
])
def test_conv_input_grad(n, c_in, c_out, h, w, k, pad, channels_last, device, poison) -> None:
    """Stride-1 dgrad through the forward kernel against autograd of a float64 conv."""
    weight = torch.randn(c_out, c_in, *k, device=device)
    x64 = torch.randn(n, c_in, h, w, dtype=torch.float64, requires_grad=True)
    y64 = torch.nn.functional.conv2d(x64, weight.double().cpu(), padding=pad)
    g = torch.randn(y64.shape, device=device)
    (want,) = torch.autograd.grad(y64, x64, g.double().cpu())
    if channels_last:
        g = g.contiguous(memory_format=torch.channels_last)
    got = ops.conv_input_grad(g, weight, pad)
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
    check(got, want, torch.float32, "dx")


@pytest.mark.parametrize("dtype", HALF)
def test_conv_input_grad_half(dtype, device) -> None:
    weight = torch.randn(64, 48, 3, 3, device=device)
    g = torch.randn(2, 64, 33, 47, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    x64 = torch.randn(2, 48, 33, 47, dtype=torch.float64, requires_grad=True)
    y64 = torch.nn.functional.conv2d(x64, weight.double().cpu(), padding=1)
    (want,) = torch.autograd.grad(y64, x64, g.double().cpu())
    got = ops.conv_input_grad(g, weight.to(dtype), (1, 1))
    assert got.dtype == dtype
    check(got, want, dtype, "dx")


def test_conv_input_grad_rejects_what_it_cannot_do(device) -> None:
    weight = torch.randn(8, 4, 3, 3, device=device)
    with pytest.raises(ValueError, match="stride-1"):
        ops.conv_input_grad(torch.randn(1, 5, 6, 6, device=device), weight, (1, 1))  # C_out mismatch
    with pytest.raises(ValueError, match="stride-1"):
        ops.conv_input_grad(torch.randn(1, 8, 6, 6, device=device), weight, (3, 3))  # padding > k - 1
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        ops.conv_input_grad(torch.randn(1, 8, 6, 6, device=device, dtype=torch.float64), weight, (1, 1))


def test_float64_is_rejected_on_every_device(device) -> None:
    """The kernels have no fp64 path (under the interpreter they once ran and returned garbage): a clear error,
    as on a GPU, pointing at the reference backend."""
    conv = nn.Conv2d(3, 4, 3, 1, 1, bias=False).double().to(device)
    bn = nn.BatchNorm2d(4).double().to(device)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, device=device)
    for mode in (bn.train, bn.eval):
        mode()
        with pytest.raises(ValueError, match=r"float32/float16/bfloat16.*backend='torch'"):
            ops.conv_bn_act(x, conv, bn)


def test_channels_last_weight_gets_its_gradient_in_its_layout(device) -> None:
    """A channels_last model's conv weight: its gradient comes back in that layout (cuDNN's own, no relayout
    copy either way) and accumulates over steps."""
    conv, bn, conv64, bn64 = make_modules(5, 6, 3, 1, bias=False, bn=True, train=True, device=device)
    conv = conv.to(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    x = torch.randn(2, 5, 7, 9, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
    x64 = x.detach().double().cpu().requires_grad_()
    g = torch.randn(2, 6, 7, 9, device=device)
    ops.conv_bn_act(x, conv, bn).backward(g)
    ref_forward(x64, conv64, bn64, None, True).backward(g.double().cpu())
    assert conv.weight.grad.stride() == conv.weight.stride()
    check(conv.weight.grad, conv64.weight.grad, torch.float32, "dweight")
    first = conv.weight.grad.clone()
    ops.conv_bn_act(x, conv, bn).backward(g)  # same batch: the same gradient again, accumulated
    check(conv.weight.grad, 2 * first, torch.float32, "accumulated dweight", tol=1e-5)


@pytest.mark.parametrize("name", ["3x3s1-cin33-train", "1x1s1-train-res-norelu", "3x3s1-cin40-eval-frozen",
                                  "3x3s2-train-res-bias-cl"])
def test_backward_with_triton_dgrad(name, device, monkeypatch) -> None:
    """``TRITON_DGRAD``: stride-1 input gradients by :func:`conv_input_grad` (strided ones stay with cuDNN),
    every gradient and BN buffer still matching the float64 reference."""
    monkeypatch.setattr(ops, "TRITON_DGRAD", True)
    calls = []
    real = ops.conv_input_grad
    monkeypatch.setattr(ops, "conv_input_grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    run_case(CASES[name], device, pool=True)
    assert len(calls) == (CASES[name].s == 1)
