"""Triton channel attention (``mean_hw``, ``pixel_sums``, ``bn_attention``, ``global_context``, ``mlp_attention``)
against float64 torch.

``global_context`` is ``bn_attention``'s kernel ending in a ReLU instead of the sigmoid: every BN-attention
test below runs for both ops (``BN_OPS``).

The attention ops are checked both on their own (sums from ``pixel_sums``) and fed ``pooled=`` partial
pixel sums computed by plain torch with arbitrary chunkings, as a fused producer would hand them over.

Shared helpers (``close``, ``make_map``, ``f64``, ``HYPO``, the ``poison`` fixture) live in conftest.py.
"""

from __future__ import annotations

import collections
import copy
import itertools

import pytest
import torch
import triton
from conftest import HALF, HAS_CUDA, HYPO, close, f64, make_map
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


# ---------------------------------------------------------------------------------- pixel_sums


def chunk_sums(x: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """Partial pixel sums (S, N, C) of ``x`` by plain torch (differentiable, in ``x``'s dtype, fp32 at least):
    chunk ``s`` sums the flat pixels ``[bounds[s], bounds[s + 1])``."""
    flat = x.flatten(2) if x.dtype == torch.float64 else x.float().flatten(2)
    return torch.stack([flat[:, :, a:b].sum(2) for a, b in itertools.pairwise(bounds)])


def plan_bounds(x: torch.Tensor) -> list[int]:
    """The chunk bounds ``pixel_sums`` uses for ``x`` (consecutive chunks of ``split_plan``'s size)."""
    n, c, h, w = x.shape
    _, chunk = KCA.split_plan(n, h * w, c, x.device)
    return [*range(0, h * w, chunk), h * w]


def check_pixel_sums(x: torch.Tensor) -> None:
    s = CA.pixel_sums(x)
    n, c = x.shape[:2]
    bounds = plan_bounds(x)
    assert s.dtype == torch.float32 and s.shape == (len(bounds) - 1, n, c)
    xr = f64(x)
    sr = chunk_sums(xr, bounds)
    close(s, sr)
    g = torch.randn_like(s)  # differs along S: each chunk's pixels get their own chunk's gradient
    (dx,) = torch.autograd.grad(s, x, g, retain_graph=True)
    (dxr,) = torch.autograd.grad(sr, xr, g.double().cpu(), retain_graph=True)
    close(dx, dxr)
    assert dx.is_contiguous(memory_format=CA.memory_format_of(x))
    g1 = torch.randn(n, c, device=x.device).expand_as(s)  # stride 0 along S: read as a plain broadcast
    (dx,) = torch.autograd.grad(s, x, g1)
    (dxr,) = torch.autograd.grad(sr, xr, g1.double().cpu())
    close(dx, dxr)


@pytest.mark.parametrize(("shape", "channels_last", "multi_chunk"), [
    ((1, 3, 37, 53), True, True), ((1, 3, 37, 53), False, True), ((2, 33, 5, 7), True, True),
    ((3, 19, 37, 53), False, False), ((3, 130, 7, 3), True, False), ((2, 5, 1, 1), False, False),
])
def test_pixel_sums(shape, channels_last, multi_chunk, device, poison):
    x = make_map(*shape, channels_last, device)
    if not HAS_CUDA:  # the interpreter's split plan aims at four programs: several chunks at small batch
        assert (len(plan_bounds(x)) > 2) == multi_chunk
    check_pixel_sums(x)


@HYPO
@given(n=st.integers(1, 3), c=st.integers(1, 70), h=st.integers(1, 20), w=st.integers(1, 20), cl=st.booleans())
def test_pixel_sums_random_shapes(n, c, h, w, cl, device):
    check_pixel_sums(make_map(n, c, h, w, cl, device))


def test_pixel_sums_rejects_a_bad_map(device):
    with pytest.raises(ValueError, match="4-D"):
        CA.pixel_sums(torch.randn(2, 3, 4, device=device))
    with pytest.raises(ValueError, match="float32"):
        CA.pixel_sums(torch.ones(2, 3, 4, 4, device=device, dtype=torch.int32))


@pytest.mark.parametrize("split, length", [(1, 19), (11, 150), (64, 1216)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_finish_partials(split, length, dtype, device):
    """``scale * part.sum(0)`` with split and length not multiples of the kernel's tiles, output dtype as asked."""
    part = torch.randn(split, length, device=device)
    out = KCA.finish_partials(part, dtype, 0.25)
    assert out.dtype == dtype and out.shape == (length,)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.double(), part.double().sum(0) * 0.25, rtol=tol, atol=tol * split ** 0.5)


@pytest.mark.parametrize("split, rows", [(3, 4), (11, 4), (512, 32)])
def test_fold_partials(split, rows, device):
    """At most ``rows`` fp32 partials, each the sum of consecutive ones; a short list is returned as it is."""
    part = torch.randn(split, 3, 5, device=device)
    folded = KCA.fold_partials(part, rows)
    if split <= rows:
        assert folded is part
        return
    chunk = -(-split // rows)
    ref = torch.stack([c.double().sum(0) for c in part.split(chunk)])
    assert folded.dtype == torch.float32 and folded.shape == ref.shape and folded.shape[0] <= rows
    torch.testing.assert_close(folded.double(), ref, rtol=1e-5, atol=1e-5)


def test_broadcast_hw_rejects_sums_of_another_chunking(device):
    out = torch.empty(1, 3, 37, 53, device=device)
    split = len(plan_bounds(out)) - 1
    with pytest.raises(ValueError, match="broadcast_hw"):
        KCA.broadcast_hw(torch.zeros(split + 1, 1, 3, device=device), out)


# -------------------------------------------------------------------------------- bn_attention


BN_OPS = ("bn_attention", "global_context")
"""The two ops on the BN-attention kernel: sigmoid(BN(1x1(mean))) and relu(BN(1x1(mean)))."""


def make_bn_attention(c: int, device: str, momentum: float | None = 0.1, c_out: int | None = None, eps: float = 0.1):
    """1x1 conv + BN with random affine and running stats; ``eps`` not PyTorch's default, so that a kernel using
    1e-5 instead of the module's value fails."""
    conv = nn.Conv2d(c, c_out or c, 1, bias=False)
    bn = nn.BatchNorm2d(c_out or c, eps=eps, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
    return conv.to(device), bn.to(device)


def check_bn_attention(feat, conv, bn, conv_r, bn_r, pooled=None, op="bn_attention"):
    """``op`` (``bn_attention`` or ``global_context``; with ``pooled`` if given), its gradients and running
    statistics against the float64 reference; returns the output (detached)."""
    a = getattr(CA, op)(feat, conv, bn, pooled=pooled)
    g = torch.randn_like(a)
    params = [feat, conv.weight, bn.weight, bn.bias]
    grads = torch.autograd.grad(a, params, g)
    fr = f64(feat)
    ar = getattr(R, op)(fr, conv_r, bn_r)
    if op == "global_context":  # the ReLU both cuts and passes (else its gradient mask goes untested)
        assert (ar == 0).any() and (ar > 0).any()
    grads_r = torch.autograd.grad(ar, [fr, conv_r.weight, bn_r.weight, bn_r.bias], g.double().cpu())
    close(a, ar)
    for got, want in zip(grads, grads_r, strict=True):
        close(got, want, scale=5.0)
    if bn.track_running_stats:
        close(bn.running_mean, bn_r.running_mean)
        close(bn.running_var, bn_r.running_var)
        assert bn.num_batches_tracked.item() == bn_r.num_batches_tracked.item()
    return a.detach()


@pytest.mark.parametrize("op", BN_OPS)
@pytest.mark.parametrize(("n", "c", "c_out", "momentum", "channels_last"), [
    (3, 37, 37, 0.1, True), (2, 48, 20, None, False), (5, 19, 33, 0.3, True),
])
def test_bn_attention_train(op, n, c, c_out, momentum, channels_last, device, poison):
    conv, bn = make_bn_attention(c, device, momentum, c_out)
    conv_r, bn_r = copy.deepcopy(conv).cpu().double(), copy.deepcopy(bn).cpu().double()
    for _ in range(2):  # the second call sees updated running stats and num_batches_tracked == 2
        feat = make_map(n, c, 9, 7, channels_last, device)
        check_bn_attention(feat, conv, bn, conv_r, bn_r, op=op)
    assert bn.num_batches_tracked.item() == 2


@pytest.mark.parametrize("op", BN_OPS)
@pytest.mark.parametrize("n", [1, 3])
def test_bn_attention_eval_uses_current_running_stats(op, n, device, poison):
    conv, bn = make_bn_attention(37, device)
    bn.eval()
    conv_r, bn_r = copy.deepcopy(conv).cpu().double(), copy.deepcopy(bn).cpu().double()
    feat = make_map(n, 37, 11, 6, True, device)
    check_bn_attention(feat, conv, bn, conv_r, bn_r, op=op)
    with torch.no_grad():  # stats changed after the first call must be used by the next one
        for b in (bn, bn_r):
            b.running_mean.add_(0.25)
            b.running_var.mul_(1.5)
    check_bn_attention(feat, conv, bn, conv_r, bn_r, op=op)
    assert bn.num_batches_tracked.item() == 0


@pytest.mark.parametrize("op", [*BN_OPS, "mlp_attention"])
def test_relu_keeps_nan_like_torch(op, device):
    """A NaN in one image's map makes that image's attention NaN, as torch's ReLU propagates it (``max(x, 0)``
    compiles to ``max.f32``, which returns 0 for NaN): global_context's output ReLU, the MLP's hidden one."""
    if op == "mlp_attention":
        conv1, conv2 = make_mlp(37, 10, device)
        run = lambda f: CA.mlp_attention(f, conv1, conv2)
        c1r, c2r = copy.deepcopy(conv1).cpu().double(), copy.deepcopy(conv2).cpu().double()
        ref = lambda f: R.mlp_attention(f, c1r, c2r)
    else:
        conv, bn = make_bn_attention(37, device)
        bn.eval()
        conv_r, bn_r = copy.deepcopy(conv).cpu().double(), copy.deepcopy(bn).cpu().double()
        run = lambda f: getattr(CA, op)(f, conv, bn)
        ref = lambda f: getattr(R, op)(f, conv_r, bn_r)
    feat = make_map(2, 37, 5, 6, True, device).detach()
    feat[1, 3, 2, 2] = float("nan")
    feat_r = feat.double().cpu().requires_grad_()
    feat.requires_grad_()
    a, ar = run(feat), ref(feat_r)
    assert torch.isnan(ar[1]).all() and not torch.isnan(ar[0]).any()
    assert torch.equal(torch.isnan(a).cpu(), torch.isnan(ar))
    close(a[0], ar[0])
    # backward: NaN where torch's is (its ReLU backward passes the gradient of a NaN output: the MLP's image 1)
    grad = torch.rand_like(ar)
    a.backward(grad.to(a))
    ar.backward(grad)
    assert torch.equal(torch.isnan(feat.grad).cpu(), torch.isnan(feat_r.grad))
    finite = ~torch.isnan(feat_r.grad)
    close(feat.grad.cpu()[finite], feat_r.grad[finite])


@pytest.mark.parametrize("op", BN_OPS)
def test_bn_attention_train_batch1_raises_like_torch(op, device):
    conv, bn = make_bn_attention(16, device)
    feat = torch.randn(1, 16, 5, 5, device=device)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training") as ours:
        getattr(CA, op)(feat, conv, bn)
    with pytest.raises(ValueError) as theirs:
        getattr(R, op)(feat.cpu(), conv.cpu(), copy.deepcopy(bn).cpu())
    assert str(ours.value) == str(theirs.value)
    assert bn.num_batches_tracked.item() == 0  # nothing counted for a rejected call


@pytest.mark.parametrize("op", BN_OPS)
def test_bn_attention_without_running_stats(op, device):
    conv, _ = make_bn_attention(24, device)
    bn = nn.BatchNorm2d(24, eps=0.1, track_running_stats=False).to(device).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    feat = make_map(4, 24, 5, 6, False, device)
    conv_r, bn_r = copy.deepcopy(conv).cpu().double(), copy.deepcopy(bn).cpu().double()
    check_bn_attention(feat, conv, bn, conv_r, bn_r, op=op)  # batch statistics in eval: forward and backward


@pytest.mark.parametrize("op", BN_OPS)
def test_bn_attention_falls_back_for_biased_conv(op, device):
    conv = nn.Conv2d(8, 8, 1, bias=True).to(device)
    bn = nn.BatchNorm2d(8).to(device).eval()
    feat = torch.randn(2, 8, 4, 4, device=device)
    torch.testing.assert_close(getattr(CA, op)(feat, conv, bn), getattr(R, op)(feat, conv, bn))


@pytest.mark.parametrize("op", BN_OPS)
@pytest.mark.parametrize("missing", ["weight", "bias"])
def test_bn_attention_with_half_affine_bn(op, missing, device):
    """A BN with only a weight or only a bias (the other set to None) is honoured (the reference op runs)."""
    conv = nn.Conv2d(8, 6, 1, bias=False).to(device)
    bn = nn.BatchNorm2d(6).to(device).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1.0, 1.0)
        bn.running_mean.uniform_(-1, 1)
    setattr(bn, missing, None)
    feat = torch.randn(2, 8, 4, 4, device=device)
    torch.testing.assert_close(getattr(CA, op)(feat, conv, bn), getattr(R, op)(feat, conv, bn))


# ------------------------------------------------------------------------------- mlp_attention


def check_mlp_attention(a: torch.Tensor, feat: torch.Tensor, conv1: nn.Conv2d, conv2: nn.Conv2d) -> None:
    """``a`` and its gradients (feat, both weights) against the float64 reference."""
    g = torch.randn_like(a)
    grads = torch.autograd.grad(a, [feat, conv1.weight, conv2.weight], g)
    c1r, c2r = copy.deepcopy(conv1).cpu().double(), copy.deepcopy(conv2).cpu().double()
    fr = f64(feat)
    ar = R.mlp_attention(fr, c1r, c2r)
    grads_r = torch.autograd.grad(ar, [fr, c1r.weight, c2r.weight], g.double().cpu())
    close(a, ar)
    for got, want in zip(grads, grads_r, strict=True):
        close(got, want, scale=5.0)


@pytest.mark.parametrize(("n", "c", "mid", "channels_last"), [(1, 40, 10, True), (3, 64, 16, False), (2, 19, 5, True)])
def test_mlp_attention(n, c, mid, channels_last, device, poison):
    conv1 = nn.Conv2d(c, mid, 1, bias=False).to(device)
    conv2 = nn.Conv2d(mid, c, 1, bias=False).to(device)
    feat = make_map(n, c, 8, 13, channels_last, device)
    a = CA.mlp_attention(feat, conv1, conv2)
    check_mlp_attention(a, feat, conv1, conv2)


# ------------------------------------------------------------------------------- pooled= sums

H_, W_ = 9, 7  # 63 pixels: uneven torch chunkings below
CUTS = {"S1": [0, 63], "S3": [0, 10, 34, 63], "S4-singles": [0, 1, 2, 62, 63]}


def make_mlp(c: int, mid: int, device: str):
    return nn.Conv2d(c, mid, 1, bias=False).to(device), nn.Conv2d(mid, c, 1, bias=False).to(device)


@pytest.mark.parametrize("op", BN_OPS)
@pytest.mark.parametrize("cuts", list(CUTS), ids=list(CUTS))
@pytest.mark.parametrize(("n", "c", "momentum", "train", "channels_last"), [
    (3, 37, 0.1, True, True), (2, 24, None, True, False), (1, 19, 0.1, False, True),
])
def test_bn_attention_pooled(op, cuts, n, c, momentum, train, channels_last, device, poison):
    """``pooled=`` torch-computed sums of any chunking: same output, gradients (into feat through the torch
    sums, and into the weights) and running statistics as the reference, and as the unpooled op."""
    conv, bn = make_bn_attention(c, device, momentum)
    bn.train(train)
    conv_u, bn_u = copy.deepcopy(conv), copy.deepcopy(bn)
    conv_r, bn_r = copy.deepcopy(conv).cpu().double(), copy.deepcopy(bn).cpu().double()
    for _ in range(2):  # the second call sees updated running stats
        feat = make_map(n, c, H_, W_, channels_last, device)
        a = check_bn_attention(feat, conv, bn, conv_r, bn_r, pooled=chunk_sums(feat, CUTS[cuts]), op=op)
        close(a, getattr(CA, op)(feat, conv_u, bn_u).detach())
        close(bn.running_mean, bn_u.running_mean)
        close(bn.running_var, bn_u.running_var)
        assert bn.num_batches_tracked.item() == bn_u.num_batches_tracked.item()


@pytest.mark.parametrize("cuts", list(CUTS), ids=list(CUTS))
@pytest.mark.parametrize(("n", "c", "mid", "channels_last"), [(1, 40, 10, True), (3, 19, 5, False)])
def test_mlp_attention_pooled(cuts, n, c, mid, channels_last, device, poison):
    conv1, conv2 = make_mlp(c, mid, device)
    feat = make_map(n, c, H_, W_, channels_last, device)
    a = CA.mlp_attention(feat, conv1, conv2, pooled=chunk_sums(feat, CUTS[cuts]))
    close(a, CA.mlp_attention(feat, conv1, conv2).detach())
    check_mlp_attention(a, feat, conv1, conv2)


def pooled_leaf(feat: torch.Tensor, bounds: list[int], contiguous: bool) -> torch.Tensor:
    """fp32 sums of ``feat`` as a leaf requiring grad; ``contiguous=False``: an (S, C, N) buffer transposed."""
    sums = chunk_sums(feat.detach(), bounds)
    if not contiguous:
        sums = sums.transpose(1, 2).contiguous().transpose(1, 2)
    return sums.requires_grad_()


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("cuts", list(CUTS), ids=list(CUTS))
@pytest.mark.parametrize("kind", ["bn-train", "bn-eval", "mlp"])
def test_pooled_leaf_gets_the_mean_gradient(kind, cuts, contiguous, device, poison):
    """A leaf ``pooled`` gets ``dmean / HW`` broadcast along S: the exact gradient of mean = sums.sum(0) / HW."""
    n, c, mid = 3, 21, 6
    feat = make_map(n, c, H_, W_, True, device)
    pooled = pooled_leaf(feat, CUTS[cuts], contiguous)
    pr = f64(pooled)
    mean_r = (pr.sum(0) / (H_ * W_)).view(n, c, 1, 1)
    if kind == "mlp":
        conv1, conv2 = make_mlp(c, mid, device)
        a = CA.mlp_attention(feat, conv1, conv2, pooled=pooled)
        params = [conv1.weight, conv2.weight]
        c1r, c2r = copy.deepcopy(conv1).cpu().double(), copy.deepcopy(conv2).cpu().double()
        ar = torch.sigmoid(c2r(torch.relu(c1r(mean_r))))
        params_r = [c1r.weight, c2r.weight]
    else:
        conv, bn = make_bn_attention(c, device)
        bn.train(kind == "bn-train")
        conv_r, bn_r = copy.deepcopy(conv).cpu().double(), copy.deepcopy(bn).cpu().double()
        a = CA.bn_attention(feat, conv, bn, pooled=pooled)
        params = [conv.weight, bn.weight, bn.bias]
        ar = torch.sigmoid(bn_r(conv_r(mean_r)))
        params_r = [conv_r.weight, bn_r.weight, bn_r.bias]
        close(bn.running_mean, bn_r.running_mean)
        close(bn.running_var, bn_r.running_var)
    g = torch.randn_like(a)
    dp, *grads = torch.autograd.grad(a, [pooled, *params], g)
    dpr, *grads_r = torch.autograd.grad(ar, [pr, *params_r], g.double().cpu())
    close(a, ar)
    assert dp.shape == pooled.shape
    close(dp, dpr, scale=5.0)
    for got, want in zip(grads, grads_r, strict=True):
        close(got, want, scale=5.0)
    assert not feat.grad_fn and feat.grad is None  # feat supplied only H * W and the dtype


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
@pytest.mark.parametrize("kind", ["bn", "mlp"])
def test_attention_many_partials(kind, fold, device, poison, monkeypatch):
    """S = 200 partials (a conv epilogue's 2-pixel chunks). Folded first (as the launchers do past FOLD_SPLIT),
    and unfolded: the kernel then finishes the mean in several [BLOCK_S, N, C] steps, the last one partial (on
    a GPU that loop runs whenever more than FOLD_SPLIT = 32 partials meet a BLOCK_S below them)."""
    n, c, h, w = 4, 64, 20, 20
    feat = make_map(n, c, h, w, True, device)
    bounds = list(range(0, h * w + 1, 2))
    pooled = chunk_sums(feat, bounds)
    assert pooled.shape == (200, n, c)
    kernel_name = f"_{kind}_attention_fwd_kernel"
    steps: list[int] = []
    if not fold:
        monkeypatch.setattr(KCA, "fold_partials", lambda part, rows=0: part)
        kernel = getattr(KCA, kernel_name)

        class Recording:  # the partials and BLOCK_S each launch gets
            def __getitem__(self, grid):
                def launch(part, *args, **kwargs):
                    steps.append((part.shape[0], kwargs["BLOCK_S"]))
                    return kernel[grid](part, *args, **kwargs)
                return launch

        monkeypatch.setattr(KCA, kernel_name, Recording())
    fr = f64(feat)
    if kind == "bn":
        conv, bn = make_bn_attention(c, device)
        conv_r, bn_r = copy.deepcopy(conv).cpu().double(), copy.deepcopy(bn).cpu().double()
        a = CA.bn_attention(feat, conv, bn, pooled=pooled)
        ar = R.bn_attention(fr, conv_r, bn_r)
        close(bn.running_mean, bn_r.running_mean)
        close(bn.running_var, bn_r.running_var)
    else:
        conv1, conv2 = make_mlp(c, 16, device)
        a = CA.mlp_attention(feat, conv1, conv2, pooled=pooled)
        ar = R.mlp_attention(fr, copy.deepcopy(conv1).cpu().double(), copy.deepcopy(conv2).cpu().double())
    close(a, ar)
    if not fold:
        assert steps and all(split == 200 and 1 < block_s < split and split % block_s for split, block_s in steps)
    g = torch.randn_like(a)
    (dx,) = torch.autograd.grad(a, feat, g)
    (dxr,) = torch.autograd.grad(ar, fr, g.double().cpu())
    close(dx, dxr, scale=5.0)


@pytest.mark.parametrize(("bad", "match"), [
    (lambda s: s.double(), "float32"),
    (lambda s: s.half(), "float32"),
    (lambda s: s[:, :2], r"\(S, 3, 8\)"),
    (lambda s: s[:, :, :5], r"\(S, 3, 8\)"),
    (lambda s: s.sum(0), "3-D"),
    (lambda s: s[:0], "S >= 1"),
    (lambda s: s.unsqueeze(0), "3-D"),
])
def test_bad_pooled_raises(bad, match, device):
    feat = torch.randn(3, 8, 5, 6, device=device)
    pooled = bad(chunk_sums(feat, [0, 11, 30]))
    conv, bn = make_bn_attention(8, device)
    with pytest.raises(ValueError, match=match):
        CA.bn_attention(feat, conv, bn, pooled=pooled)
    assert bn.num_batches_tracked.item() == 0  # nothing counted for a rejected call
    conv1, conv2 = make_mlp(8, 4, device)
    with pytest.raises(ValueError, match=match):
        CA.mlp_attention(feat, conv1, conv2, pooled=pooled)


def test_eval_attention_launches(device, monkeypatch):
    """Eval: pixel sums + attention, two launches; with ``pooled`` the attention kernel alone."""
    launches: collections.Counter[str] = collections.Counter()
    real_getitem = triton.runtime.KernelInterface.__getitem__

    def getitem(kernel, grid):
        launches[getattr(kernel, "__name__", None) or kernel.fn.__name__] += 1
        return real_getitem(kernel, grid)

    monkeypatch.setattr(triton.runtime.KernelInterface, "__getitem__", getitem)
    conv, bn = make_bn_attention(16, device)
    bn.eval()
    conv1, conv2 = make_mlp(16, 4, device)
    feat = torch.randn(2, 16, 8, 8, device=device)
    pooled = chunk_sums(feat, [0, 30, 64])
    with torch.no_grad():
        CA.bn_attention(feat, conv, bn)
        assert dict(launches) == {"_mean_partial_kernel": 1, "_bn_attention_fwd_kernel": 1}
        launches.clear()
        CA.bn_attention(feat, conv, bn, pooled=pooled)
        CA.mlp_attention(feat, conv1, conv2, pooled=pooled)
        assert dict(launches) == {"_bn_attention_fwd_kernel": 1, "_mlp_attention_fwd_kernel": 1}


def test_fallback_ignores_pooled(device):
    feat = torch.randn(2, 8, 4, 4, device=device)
    pooled = torch.zeros(1, 2, 8, device=device)  # wrong sums: the reference takes the mean of feat itself
    conv, bn = nn.Conv2d(8, 8, 1, bias=True).to(device), nn.BatchNorm2d(8).to(device).eval()
    torch.testing.assert_close(CA.bn_attention(feat, conv, bn, pooled=pooled), R.bn_attention(feat, conv, bn))
    conv1, conv2 = nn.Conv2d(8, 4, 1, bias=True).to(device), nn.Conv2d(4, 8, 1, bias=False).to(device)
    torch.testing.assert_close(CA.mlp_attention(feat, conv1, conv2, pooled=pooled),
                               R.mlp_attention(feat, conv1, conv2))


# ---------------------------------------------------------------------------------- half types


@pytest.mark.parametrize("dtype", HALF)
def test_attention_half_dtypes(dtype, device):
    c, hw = (128, (32, 64)) if device == "cuda" else (40, (9, 13))  # model-like on a GPU, small interpreted
    conv, bn = make_bn_attention(c, device)
    conv, bn = conv.to(dtype), bn.to(dtype)
    feat = make_map(4, c, *hw, True, device, dtype)
    conv_r, bn_r = copy.deepcopy(conv).cpu().double(), copy.deepcopy(bn).cpu().double()
    a = CA.bn_attention(feat, conv, bn)
    assert a.dtype == dtype
    close(a, R.bn_attention(f64(feat), conv_r, bn_r), dtype)
    close(CA.mean_hw(feat), R.mean_hw(f64(feat)), dtype)
    conv1 = nn.Conv2d(c, c // 4, 1, bias=False).to(device, dtype)
    conv2 = nn.Conv2d(c // 4, c, 1, bias=False).to(device, dtype)
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
