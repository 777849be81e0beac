"""Eval-mode inference issues nothing but the fused kernels: no per-conv side ops (BN fold, weight packing).

Under a CUDA graph every aten op is one more (tiny) kernel node, ~2 us each; the eval conv+BN path once
ran 7 of them per conv (weight packing, ``rsqrt``, the scale/shift fold), ~217 per BiSeNet forward.

How ops are counted: a ``TorchDispatchMode`` records every aten op, and Triton launches are wrapped
(``KernelInterface.__getitem__``, through which every ``kernel[grid](...)`` launch, autotuned or not,
goes) to count launches per kernel and to set a flag while a launch runs. Ops issued during a launch
are the launcher's own: on CPU, Triton's interpreter moves every argument's storage to a host copy and
back (``empty``, ``new_empty``, ``set_``, ``copy_``), on a GPU there are none. Those are left out; every
other op is checked against an allowlist of allocation/view/metadata ops, which launch no GPU work.
"""

from __future__ import annotations

import collections
import contextlib

import pytest
import torch
import triton
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastbisenet import BiSeNet
from fastbisenet.ops import conv_bn as ops

# aten ops that allocate, alias or only touch metadata: no device work (and no CUDA-graph node).
NO_WORK = frozenset({
    "empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "view", "_unsafe_view",
    "as_strided", "permute", "detach", "select", "slice", "alias", "set_", "expand", "t", "transpose",
    "squeeze", "unsqueeze", "unbind", "split", "split_with_sizes", "promote_types", "result_type",
    "is_same_size", "_reshape_alias", "lift_fresh",
})

# The whole BiSeNet eval forward may run this many ops outside the Triton kernels: none today (the
# stem's max-pool is a kernel too), with some slack for glue a future op may need. Old code: ~217.
FORWARD_BUDGET = 2


class _Counter(TorchDispatchMode):
    def __init__(self, inside: list[int]) -> None:
        super().__init__()
        self.inside = inside
        self.ops: collections.Counter[str] = collections.Counter()  # outside launches
        self.launcher_ops: collections.Counter[str] = collections.Counter()  # issued by a launch itself
        self.op_shapes: list[tuple[str, tuple]] = []  # (name, first argument's shape) outside launches, in order

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        (self.launcher_ops if self.inside[0] else self.ops)[name] += 1
        if not self.inside[0]:  # shapes only: holding the tensors would change what autograd does (see below)
            self.op_shapes.append((name, tuple(getattr(args[0], "shape", ())) if args else ()))
        return func(*args, **(kwargs or {}))

    def work_ops(self) -> dict[str, int]:
        """Ops outside launches that do device work (not in the allowlist)."""
        return {k: v for k, v in self.ops.items() if k not in NO_WORK}


@pytest.fixture
def count(monkeypatch):
    """``with count() as c:`` records ``c.ops`` / ``c.work_ops()`` and ``c.launches`` (per kernel name)."""
    inside = [0]
    launches: collections.Counter[str] = collections.Counter()
    real_getitem = triton.runtime.KernelInterface.__getitem__

    def getitem(kernel, grid):
        launch = real_getitem(kernel, grid)
        name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "?")

        def run(*args, **kwargs):
            launches[name] += 1
            inside[0] += 1
            try:
                return launch(*args, **kwargs)
            finally:
                inside[0] -= 1

        return run

    monkeypatch.setattr(triton.runtime.KernelInterface, "__getitem__", getitem)

    @contextlib.contextmanager
    def ctx():
        launches.clear()
        mode = _Counter(inside)
        mode.launches = launches
        with mode:
            yield mode

    return ctx


_VECTOR_BNS = ("bn_atten", "ffm.bn", "cp.conv_avg.bn")
"""BNs on pooled (N, C, 1, 1) vectors, run inside the BN-attention kernel: the ARMs', the FFM's, and the global
context's (``global_context``)."""


def _n_conv_bn(model: nn.Module) -> int:
    """Conv+BN pairs the forward runs as ``conv_bn_act``: every BatchNorm2d except :data:`_VECTOR_BNS`."""
    return sum(isinstance(m, nn.BatchNorm2d) for name, m in model.named_modules() if not name.endswith(_VECTOR_BNS))


def test_bisenet_eval_forward_runs_no_side_ops(count, device: str) -> None:
    model = BiSeNet(19, "pred", backend="triton").to(device).eval()
    x = torch.randn(1, 3, 64, 64, device=device)
    with torch.no_grad():
        model(x)  # warm-up: autotuning, first packing of every weight
        with count() as c:
            model(x)
    work = c.work_ops()
    print(f"\naten ops per eval forward outside kernels: {sum(c.ops.values())} ({dict(c.ops)}); "
          f"with device work: {sum(work.values())} ({work}); kernel launches: {sum(c.launches.values())} "
          f"({dict(c.launches)}); issued by the interpreter inside launches: {dict(c.launcher_ops)}")
    n_conv = _n_conv_bn(model)
    assert n_conv == 30
    # one launch per conv+BN(+res)(+ReLU), the two 7x7 stems on the image as one (conv_bn_act_pair), nothing else:
    assert c.launches["conv_bn_fwd_kernel"] == n_conv - 1
    for name in ("bn_stats_kernel", "bn_act_kernel"):
        assert c.launches[name] == 0, name
    # the two ARMs, the FFM and the global context: one small kernel each on the pooled vectors
    assert c.launches["_bn_attention_fwd_kernel"] == sum(name.endswith(_VECTOR_BNS) for name, _ in
                                                         model.named_modules()) == 4
    # every spatial mean (ARMs, FFM, global context) comes from the epilogue of the conv writing the map
    assert "_mean_partial_kernel" not in c.launches
    assert c.launches["_max_pool_kernel"] == 1 and "max_pool2d_with_indices" not in work  # no int64 indices
    assert sum(work.values()) <= FORWARD_BUDGET, work


def test_bisenet_train_step_side_ops(count, device: str) -> None:
    """A training step (``model(x, labels)`` forward and backward) issues per conv+BN only what cannot be a
    kernel of ours: the weight packing (a copy) in the forward, cuDNN's dgrad/wgrad in the backward. The BN
    statistics, running-stat update, ``num_batches_tracked`` count, backward coefficients and dgamma/dbeta
    are all in the kernels: once ~10 small torch ops per conv (~370 per step, ~2 us each as graph nodes)."""
    model = BiSeNet(19, "train", backend="triton").to(device).train()
    x = torch.randn(2, 3, 64, 64, device=device)
    labels = torch.randint(0, 19, (2, 64, 64), device=device)
    sum(o.sum() for o in model(x, labels)).backward()  # warm-up
    model.zero_grad(set_to_none=True)
    with count() as c:
        losses = model(x, labels)
    fwd, fwd_launches = c.work_ops(), dict(c.launches)
    loss = sum(o.sum() for o in losses)
    with count() as c:
        loss.backward()
    bwd, bwd_launches = c.work_ops(), dict(c.launches)
    print(f"\ntrain forward work ops: {sum(fwd.values())} {fwd}; launches {sum(fwd_launches.values())} "
          f"{fwd_launches}\nbackward work ops: {sum(bwd.values())} {bwd}; launches {sum(bwd_launches.values())} "
          f"{bwd_launches}")
    n_conv = _n_conv_bn(model)
    assert fwd_launches["conv_bn_fwd_kernel"] == fwd_launches["bn_stats_kernel"] == n_conv
    assert bwd_launches["bn_bwd_coef_kernel"] == bwd_launches["bn_act_bwd_kernel"] == n_conv
    # forward: one weight packing per conv, and the four vector BNs' num_batches_tracked counts
    assert fwd_launches["_bn_attention_fwd_kernel"] == bwd_launches["_bn_attention_bwd_kernel"] == 4
    # their pixel sums come from the producing convs: no stand-alone pass over a map, nor its gradient broadcast
    assert "_mean_partial_kernel" not in fwd_launches and "_broadcast_kernel" not in bwd_launches
    assert fwd.pop("copy_", 0) <= n_conv and fwd.pop("add_", 0) <= 4, fwd
    assert sum(fwd.values()) <= 2, fwd
    # backward: dgrad/wgrad per conv (two for the FFM's concat), the gradient sums autograd makes where a
    # tensor feeds two ops (residuals, attention inputs), one copy per weight gradient into the parameter's
    # layout (the convolution backward returns them channels_last; none for 1x1 weights, whose layouts
    # agree), the heads' per-pixel loss gradients made dense (the test's sum() expands them)
    assert bwd.pop("convolution_backward", 0) <= n_conv + 1
    assert bwd.pop("add", 0) <= 11 and "cat" not in bwd, bwd
    assert bwd.pop("copy_", 0) <= n_conv and bwd.pop("clone", 0) <= 3, bwd
    # what is left: the loss's seed gradient (no per-conv BN math: once ~300; the attention means' 1/HW is
    # applied in their backward kernels)
    assert bwd == {"ones_like": 1}, bwd


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_eval_conv_bn_is_one_launch(count, bias: bool, affine: bool, device: str) -> None:
    """One eval conv+BN+res+ReLU call: one kernel launch and the output allocation, no other op."""
    conv = nn.Conv2d(5, 6, 3, 1, 1, bias=bias).to(device)
    bn = nn.BatchNorm2d(6, affine=affine).to(device).eval()
    x = torch.randn(1, 5, 6, 7, device=device)
    res = torch.randn(1, 6, 6, 7, device=device)
    with torch.no_grad():
        ops.conv_bn_act(x, conv, bn, residual=res)  # packs the weight (training-capable calls never cache)
    with torch.no_grad(), count() as c:
        ops.conv_bn_act(x, conv, bn, residual=res)
    assert dict(c.launches) == {"conv_bn_fwd_kernel": 1}
    assert c.work_ops() == {}, c.ops
    # grad mode on, but nothing requires grad (a frozen model): no backward can follow either
    conv.requires_grad_(False)
    bn.requires_grad_(False)
    with count() as c:
        out = ops.conv_bn_act(x, conv, bn, residual=res)
    assert out.grad_fn is None
    assert dict(c.launches) == {"conv_bn_fwd_kernel": 1}
    assert c.work_ops() == {}, c.ops


def test_weight_repacked_only_when_changed(count, device: str) -> None:
    conv = nn.Conv2d(5, 6, 3, 1, 1, bias=False).to(device)
    bn = nn.BatchNorm2d(6).to(device).eval()
    x = torch.randn(1, 5, 6, 7, device=device)
    with torch.no_grad():
        ops.conv_bn_act(x, conv, bn)
        with count() as c:
            ops.conv_bn_act(x, conv, bn)
        assert c.work_ops() == {}
        conv.weight.add_(1.0)
        with count() as c:
            ops.conv_bn_act(x, conv, bn)
        assert c.work_ops() == {"copy_": 1}  # one repack (layout + cast in one copy), into the old buffer


def test_frozen_bn_backward_saves_stats_only_when_needed(count, device: str) -> None:
    """With a grad-requiring input the eval call snapshots the statistics (a few ops) for backward."""
    conv = nn.Conv2d(5, 6, 3, 1, 1, bias=False).to(device)
    bn = nn.BatchNorm2d(6).to(device).eval()
    x = torch.randn(1, 5, 6, 7, device=device, requires_grad=True)
    ops.conv_bn_act(x, conv, bn)
    with count() as c:
        out = ops.conv_bn_act(x, conv, bn)
    assert dict(c.launches) == {"conv_bn_fwd_kernel": 1}
    assert 0 < sum(c.work_ops().values()) <= 4, c.ops  # mean copy, rsqrt(var + eps)
    out.sum().backward()
    assert x.grad is not None and conv.weight.grad is not None and bn.weight.grad is not None


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("concat", [False, True])
def test_weight_gradient_is_written_once_in_the_parameters_layout(count, autocast: bool, concat: bool,
                                                                  device: str) -> None:
    """The conv weight's gradient is cast, relaid out (cuDNN returns it channels_last) and, for the FFM's
    two input segments, concatenated in one copy; autograd then stores it as it is (no copy of its own).

    (AccumulateGrad steals a gradient only when nothing else references it: the counter keeps shapes, not
    tensors, or it would see a copy that is not there.)"""
    k, c_in = (1, 6) if concat else (3, 5)
    conv = nn.Conv2d(c_in, 8, k, 1, k // 2, bias=False).to(device)
    bn = nn.BatchNorm2d(8).to(device)
    xs = [torch.randn(2, c, 6, 7, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
          for c in ((2, 4) if concat else (c_in,))]
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    with torch.autocast(device, dtype=dtype, enabled=autocast):
        out = ops.concat_conv_bn_act(xs, conv, bn) if concat else ops.conv_bn_act(xs[0], conv, bn)
    with count() as c:
        out.float().sum().backward()
    w_shape = conv.weight.shape
    def on_weight(op: str, shape: tuple) -> bool:  # the weight, its gradient or their column slices
        return op not in NO_WORK and len(shape) == 4 and shape[0] == w_shape[0] and shape[2:] == w_shape[2:]

    weight_ops = [op for op, shape in c.op_shapes if on_weight(op, shape) or op == "cat"]
    # the dgrad's weight cast under autocast, per input segment (the forward's packed copy has another layout;
    # the FFM's segments cast their column slices: no full cast, no slice copies of our own; at fp32 the
    # strided slices go to convolution_backward as they are, which may copy them internally, unseen here),
    # then each segment's gradient copied once into its slice of dW
    assert weight_ops == ["_to_copy"] * len(xs) * autocast + ["copy_"] * len(xs), weight_ops
    assert conv.weight.grad.dtype == torch.float32 and conv.weight.grad.is_contiguous()
