"""The ``torch.library`` registration of the fused ops: ``opcheck``, the compile path, and path parity.

* ``opcheck`` (schema, autograd registration, fake tensors incl. strides, AOT dispatch with dynamic
  shapes) on every ``fastbisenet::*`` op, forward and backward ops, small CPU inputs.
* ``torch.compile(fullgraph=True)`` over a chain of the ops traces without graph breaks and matches
  eager forward, gradients and BN buffers bit for bit (both paths run the same kernels).
* The wrappers give bit-identical results whether they take the eager ``autograd.Function`` path or
  the custom-op path (forced with ``torch.compiler.is_compiling`` patched to ``True``).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from conftest import DEVICE
from fastbisenet.kernels.channel_attention import split_plan
from torch import nn

from fastbisenet.ops import attend_add_upsample as U
from fastbisenet.ops import attend_residual as AR
from fastbisenet.ops import channel_attention as CA
from fastbisenet.ops import conv_bn as CB
from fastbisenet.ops import (
    cross_entropy,  # noqa: F401 (registers fastbisenet::cross_entropy[_backward])
    head_cross_entropy,  # noqa: F401 (registers fastbisenet::head_cross_entropy[_backward])
    max_pool,  # noqa: F401 (registers fastbisenet::max_pool2d)
)
from fastbisenet.ops import head_upsample as H

ops = torch.ops.fastbisenet

# Every tensor below is made on the test device: on a GPU the ops run their compiled kernels, which cannot
# read CPU tensors (without a GPU, "cpu" and the interpreter).
_ON_DEVICE = contextlib.nullcontext() if DEVICE == "cpu" else torch.device(DEVICE)


@pytest.fixture(autouse=True)
def _on_device():
    with _ON_DEVICE:
        yield

N, C, MID, NCLS, HW = 2, 6, 3, 4, (5, 7)
S = 3  # partial pixel sums fed to the attention ops


def leaf(*shape, channels_last: bool = False, grad: bool = True) -> torch.Tensor:
    t = torch.randn(*shape)
    if channels_last:
        t = t.to(memory_format=torch.channels_last)
    return t.requires_grad_(grad)


def bn_state(affine: bool = True):
    gamma = torch.rand(C).add_(0.5).requires_grad_() if affine else None
    beta = torch.randn(C).requires_grad_() if affine else None
    return gamma, beta, torch.randn(C) * 0.1, torch.rand(C) + 0.5, torch.tensor(3)


def _labels(ignore_index: int = 255, hw: tuple[int, int] = HW) -> torch.Tensor:
    labels = torch.randint(0, NCLS, (N, *hw))
    labels[0, 0] = ignore_index
    return labels


def forward_cases():
    """``(id, op, args)`` for every differentiable forward op, inputs requiring grad."""
    w = leaf(C, C, 1, 1)
    a = torch.rand(N, C, 1, 1).requires_grad_()
    cases = []
    for cl in (False, True):
        x = leaf(N, C, *HW, channels_last=cl)
        tag = "cl" if cl else "nchw"
        cases += [
            (f"mean_hw-{tag}", ops.mean_hw.default, (x,)),
            (f"pixel_sums-{tag}", ops.pixel_sums.default, (x,)),
            (f"attend_residual-{tag}", ops.attend_residual.default, (x, a)),
            (f"attend_add_upsample-full-{tag}", ops.attend_add_upsample.default,
             (x, a, leaf(N, C, *HW), [9, 11], "bilinear", cl)),
        ]
    x = leaf(N, C, *HW, channels_last=True)
    g, b, rm, rv, nbt = bn_state()
    # the attention ops take partial pixel sums (S, N, C), H * W and the output dtype instead of the map
    sums, hw, f32 = leaf(S, N, C), HW[0] * HW[1], torch.float32
    cases += [
        # (sums, hw, dtype, weight, gamma, beta, running_mean, running_var, num_batches_tracked, batch_stats,
        #  update, momentum, eps, relu)
        ("bn_attention-train", ops.bn_attention.default,
         (sums, hw, f32, w, g, b, rm, rv, nbt, True, True, 0.1, 1e-5, False)),
        ("bn_attention-train-cumulative", ops.bn_attention.default,
         (sums, hw, f32, w, g, b, rm, rv, nbt, True, True, None, 1e-5, False)),
        ("bn_attention-eval-one-partial", ops.bn_attention.default,
         (leaf(1, N, C), hw, f32, w, g, b, rm, rv, nbt, False, False, 0.1, 1e-5, False)),
        ("bn_attention-no-stats-no-affine", ops.bn_attention.default,
         (sums, hw, f32, w, None, None, None, None, None, True, False, 0.1, 1e-5, False)),
        ("bn_attention-relu-train", ops.bn_attention.default,  # global_context
         (sums, hw, f32, w, g, b, rm, rv, nbt, True, True, 0.1, 1e-5, True)),
        ("bn_attention-relu-eval", ops.bn_attention.default,
         (sums, hw, f32, w, g, b, rm, rv, nbt, False, False, 0.1, 1e-5, True)),
        ("mlp_attention", ops.mlp_attention.default, (sums, hw, f32, leaf(MID, C, 1, 1), leaf(C, MID, 1, 1))),
        ("attend_add_upsample-vec-nearest", ops.attend_add_upsample.default,
         (x, a, leaf(N, C, 1, 1), [9, 4], "nearest", False)),
        ("head_logits-bias", ops.head_logits.default, (x, leaf(NCLS, C, 1, 1), leaf(NCLS), [10, 14], False)),
        ("head_logits-nobias", ops.head_logits.default, (x, leaf(NCLS, C, 1, 1), None, [10, 14], True)),
        ("cross_entropy-nchw", ops.cross_entropy.default, (leaf(N, NCLS, *HW), _labels(), 255)),
        ("cross_entropy-cl", ops.cross_entropy.default, (leaf(N, NCLS, *HW, channels_last=True), _labels(-100), -100)),
        ("max_pool2d_train-cl", ops.max_pool2d_train.default, (x, [3, 3], [2, 2], [1, 1])),
        ("max_pool2d_train-nchw-rect", ops.max_pool2d_train.default, (leaf(N, C, *HW), [3, 2], [2, 1], [1, 0])),
        ("head_cross_entropy-bias", ops.head_cross_entropy.default,
         (x, leaf(NCLS, C, 1, 1), leaf(NCLS), _labels(255, (10, 14)), False, 255)),
        ("head_cross_entropy-nobias-nchw", ops.head_cross_entropy.default,
         (leaf(N, C, *HW), leaf(NCLS, C, 1, 1), None, _labels(-100, (9, 11)), True, -100)),
    ]
    cases += conv_forward_cases()
    return cases


def conv_forward_cases():
    """``fastbisenet::conv_bn_act`` in train/eval, with residual, bias, concat, NCHW and channels_last."""
    cases = []
    for cl in (False, True):
        x = leaf(N, 5, 7, 9, channels_last=cl)
        w3 = leaf(C, 5, 3, 3)
        g, b, rm, rv, nbt = bn_state()
        res = leaf(N, C, 4, 5, channels_last=True)
        tag = "cl" if cl else "nchw"
        # (x, x2, weight, bias, bn_weight, bn_bias, residual, running_mean, running_var, nbt,
        #  stride, padding, eps, momentum, has_bn, batch_stats, relu)
        cases += [
            (f"conv_bn_act-train-res-{tag}", ops.conv_bn_act.default,
             (x, None, w3, None, g, b, res, rm, rv, nbt, [2, 2], [1, 1], 1e-5, 0.1, True, True, True)),
            (f"conv_bn_act-eval-bias-{tag}", ops.conv_bn_act.default,
             (x, None, w3, leaf(C), g, b, None, rm, rv, nbt, [1, 1], [1, 1], 1e-5, 0.1, True, False, True)),
        ]
    g, b, rm, rv, nbt = bn_state()
    cases += [
        ("conv_bn_act-train-concat-cumulative", ops.conv_bn_act.default,
         (leaf(N, 3, 4, 5), leaf(N, 2, 4, 5, channels_last=True), leaf(C, 5, 1, 1), None, g, b, None, rm, rv, nbt,
          [1, 1], [0, 0], 1e-5, None, True, True, True)),
        ("conv_bn_act-no-bn", ops.conv_bn_act.default,
         (leaf(N, 5, 6, 6), None, leaf(C, 5, 1, 1), leaf(C), None, None, None, None, None, None,
          [1, 1], [0, 0], 0.0, 0.0, False, False, False)),
    ]
    # pool=True: the pixel sums output (differentiable), train (BN pass) and eval (conv epilogue)
    for batch_stats in (True, False):
        g, b, rm, rv, nbt = bn_state()
        cases.append((
            f"conv_bn_act-pool-{'train' if batch_stats else 'eval'}", ops.conv_bn_act.default,
            (leaf(N, 5, 7, 9, channels_last=True), None, leaf(C, 5, 3, 3), None, g, b, None, rm, rv, nbt,
             [1, 1], [1, 1], 1e-5, 0.1, True, batch_stats, True, True, True),
        ))
    return cases


def conv_backward_cases():
    """``fastbisenet::conv_bn_act_backward`` on saved values from a real forward (train and eval)."""
    cases = []
    for batch_stats in (True, False):
        x = torch.randn(N, 5, 7, 9)
        w = torch.randn(C, 5, 3, 3)
        g, b, rm, rv, nbt = (t.detach() if t.dtype.is_floating_point else t for t in bn_state())
        out, y, mean, invstd, sums = CB.forward(x, None, w, None, g, b, None, rm.clone(), rv.clone(), nbt.clone(),
                                                (1, 1), (1, 1), 1e-5, 0.1, True, batch_stats, True, pool=True)
        cases.append((
            f"conv_bn_act_backward-{'train' if batch_stats else 'eval'}", ops.conv_bn_act_backward.default,
            (torch.randn_like(out), x, None, w, None, g, out, y, mean, invstd, [1, 1], [1, 1], True, batch_stats,
             torch.float32, [True, False, True, False, True, True, True]),
        ))
        cases.append((  # with the pixel sums' gradient: random, and broadcast along the slots (stride 0)
            f"conv_bn_act_backward-grad-sums-{'train' if batch_stats else 'eval'}", ops.conv_bn_act_backward.default,
            (torch.randn_like(out), x, None, w, None, g, out, y, mean, invstd, [1, 1], [1, 1], True, batch_stats,
             None, [True, False, True, False, True, True, False],
             torch.randn_like(sums) if batch_stats else torch.randn(sums.shape[1:]).expand(sums.shape)),
        ))
        cases.append((  # a BN with a bias but no weight: dbeta (fp32, (C,)) with bn_weight None
            f"conv_bn_act_backward-bias-only-bn-{'train' if batch_stats else 'eval'}", ops.conv_bn_act_backward.default,
            (torch.randn_like(out), x, None, w, None, None, out, y, mean, invstd, [1, 1], [1, 1], True, batch_stats,
             None, [True, False, True, False, False, True, False]),
        ))
    return cases


def backward_cases():
    """``(id, op, args)`` for the ops without autograd: the backward ops and ``head_argmax``."""
    x = leaf(N, C, *HW, channels_last=True, grad=False)
    w = torch.randn(C, C, 1, 1)
    a = torch.rand(N, C, 1, 1)
    g_vec = torch.randn(N, C, 1, 1)
    y, mean, smean, sinvstd = torch.randn(N, C), torch.randn(N, C), torch.randn(C), torch.rand(C) + 0.5
    u, z = torch.randn(N, MID), torch.randn(N, C)
    shape = [N, C, *HW]
    split = split_plan(N, HW[0] * HW[1], C, x.device)[0]  # pixel_sums' chunking of such a map
    return [
        ("mean_hw_backward", ops.mean_hw_backward.default, (g_vec, shape, torch.float32, True)),
        ("pixel_sums_backward-cl", ops.pixel_sums_backward.default,
         (torch.randn(split, N, C), shape, torch.float32, True)),
        ("pixel_sums_backward-nchw-expanded", ops.pixel_sums_backward.default,
         (torch.randn(N, C).expand(split, N, C), shape, torch.float32, False)),
        # (grad, y, mean, smean, sinvstd, weight, gamma, beta, batch_stats, relu, hw)
        #   -> [dmean / hw, dweight, (dgamma, dbeta)]
        ("bn_attention_backward-affine", ops.bn_attention_backward.default,
         (g_vec, y, mean, smean, sinvstd, w, torch.rand(C), torch.randn(C), True, False, 35)),
        ("bn_attention_backward-plain", ops.bn_attention_backward.default,
         (g_vec, y, mean, smean, sinvstd, w, None, None, False, False, 1)),
        ("bn_attention_backward-relu", ops.bn_attention_backward.default,
         (g_vec, y, mean, smean, sinvstd, w, torch.rand(C), torch.randn(C), True, True, 35)),
        ("mlp_attention_backward", ops.mlp_attention_backward.default,
         (g_vec, u, z, mean, torch.randn(MID, C, 1, 1), torch.randn(C, MID, 1, 1), 35)),
        ("attend_add_upsample_backward", ops.attend_add_upsample_backward.default,
         (torch.randn(N, C, 9, 11), x, a, True, torch.float32, "bilinear", False)),
        ("attend_residual_backward", ops.attend_residual_backward.default, (torch.randn(N, C, *HW), x, a)),
        ("head_logits_backward", ops.head_logits_backward.default,
         (torch.randn(N, NCLS, 10, 14), x, torch.randn(NCLS, C, 1, 1), torch.randn(NCLS), False)),
        ("head_argmax", ops.head_argmax.default, (x, torch.randn(NCLS, C, 1, 1), torch.randn(NCLS), [10, 14], False)),
        ("max_pool2d", ops.max_pool2d.default, (x, [3, 3], [2, 2], [1, 1])),
        # (grad, int8 window positions, x shape, x channels_last, dtype, kernel, stride, padding)
        ("max_pool2d_train_backward", ops.max_pool2d_train_backward.default,
         (torch.randn(N, C, 3, 4), torch.randint(0, 9, (N, C, 3, 4), dtype=torch.int8), [N, C, *HW], True,
          torch.float32, [3, 3], [2, 2], [1, 1])),
        ("cross_entropy_backward", ops.cross_entropy_backward.default,
         (torch.rand(N, *HW), torch.randn(N, NCLS, *HW), _labels(), torch.randn(N, *HW), 255)),
        # (grad, x, weight, bias, labels, z (N, h*w, 16: the padded class row), lse, align_corners, ignore_index)
        ("head_cross_entropy_backward", ops.head_cross_entropy_backward.default,
         (torch.rand(N, 10, 14), x, torch.randn(NCLS, C, 1, 1), torch.randn(NCLS), _labels(255, (10, 14)),
          torch.randn(N, HW[0] * HW[1], 16), torch.randn(N, 10, 14) + 3, False, 255)),
        *conv_backward_cases(),
    ]


def _check(op, args):
    # All four default utils apply to every op: ``bn_attention`` is functional (it returns updated
    # copies of the running statistics, since torch.library refuses autograd on mutating ops), so
    # ``test_aot_dispatch_dynamic`` needs no exemption.
    result = torch.library.opcheck(op, args)
    assert set(result.values()) == {"SUCCESS"}, result


with _ON_DEVICE:
    FORWARD, BACKWARD = forward_cases(), backward_cases()


@pytest.mark.parametrize(("op", "args"), [c[1:] for c in FORWARD], ids=[c[0] for c in FORWARD])
def test_opcheck_forward(op, args):
    _check(op, args)


@pytest.mark.parametrize(("op", "args"), [c[1:] for c in BACKWARD], ids=[c[0] for c in BACKWARD])
def test_opcheck_backward_and_argmax(op, args):
    _check(op, args)


def test_every_op_is_checked():
    registered = {name for name in dir(ops) if not name.startswith("_")}
    checked = {c[1].name().split("::")[1].split(".")[0] for c in FORWARD + BACKWARD}
    ours = {"mean_hw", "pixel_sums", "bn_attention", "mlp_attention", "attend_add_upsample", "attend_residual",
            "head_logits", "head_argmax", "conv_bn_act", "max_pool2d", "max_pool2d_train", "cross_entropy",
            "head_cross_entropy"}
    ours |= {f"{name}_backward" for name in ours - {"head_argmax", "max_pool2d"}}  # inference-only ops
    assert ours <= registered
    assert checked == ours


# ------------------------------------------------------------------------------ module-level chain


class Chain(nn.Module):
    """A fake ARM + FFM + head chaining every fused op: mean + global context -> BN attention -> upsample -> MLP
    -> head."""

    def __init__(self, c: int = C, mid: int = MID, ncls: int = NCLS) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1, bias=False)
        self.bn = nn.BatchNorm2d(c, momentum=None)  # cumulative average: reads num_batches_tracked
        self.conv_gc = nn.Conv2d(c, c, 1, bias=False)
        self.bn_gc = nn.BatchNorm2d(c)
        self.fc1 = nn.Conv2d(c, mid, 1, bias=False)
        self.fc2 = nn.Conv2d(mid, c, 1, bias=False)
        self.head = nn.Conv2d(c, ncls, 1)

    def forward(self, feat: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = other.shape[-2:]
        ctx = CA.mean_hw(feat) + CA.global_context(feat, self.conv_gc, self.bn_gc)
        a = CA.bn_attention(feat, self.conv, self.bn)
        up = U.attend_add_upsample(feat, a, ctx, size, "bilinear", False)
        up = U.attend_add_upsample(up, a, other, size, "nearest")
        m = CA.mlp_attention(up, self.fc1, self.fc2)
        fused = AR.attend_residual(up, m)
        out_size = (2 * size[0], 2 * size[1])
        logits = H.head_logits(fused, self.head, out_size, False)
        labels = H.head_argmax(fused, self.head, out_size, True)
        return logits, labels


def run_chain(fn, model: Chain, feat: torch.Tensor, other: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    """``fn(feat, other)`` (``model`` or a compiled ``model``): outputs, gradients of the inputs and
    parameters for ``g`` on the logits, and the BN buffers afterwards."""
    feat, other = feat.detach().requires_grad_(), other.detach().requires_grad_()
    logits, labels = fn(feat, other)
    grads = torch.autograd.grad(logits, [feat, other, *model.parameters()], g)
    return [logits.detach(), labels, *grads, *(b.clone() for b in [*model.bn.buffers(), *model.bn_gc.buffers()])]


def make_inputs():
    feat = torch.randn(N, C, *HW).to(memory_format=torch.channels_last)
    other = torch.randn(N, C, 9, 11)
    return feat, other, torch.randn(N, NCLS, 18, 22)


def assert_identical(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    for i, (x, y) in enumerate(zip(got, want, strict=True)):
        assert x.stride() == y.stride() or x.numel() <= 1, (what, i, x.stride(), y.stride())
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=f"{what}, output {i}")


def test_compile_fullgraph_matches_eager():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = Chain().train()
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 2.0)
    twin = copy.deepcopy(model)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(twin, fullgraph=True, backend=counter)
    for step in range(2):  # the second step sees updated running stats and num_batches_tracked == 2
        feat, other, g = make_inputs()
        want = run_chain(model, model, feat, other, g)
        got = run_chain(compiled, twin, feat, other, g)
        assert_identical(got, want, f"step {step}")
    assert twin.bn.num_batches_tracked.item() == 2
    assert counter.frame_count == 1  # one graph for both steps: no graph break, no recompile
    targets = {str(node.target) for graph in counter.graphs for node in graph.graph.nodes}
    used = {t.split(".")[1] for t in targets if t.startswith("fastbisenet.")}
    assert used == {"mean_hw", "pixel_sums", "bn_attention", "mlp_attention", "attend_add_upsample",
                    "attend_residual", "head_logits", "head_argmax"}, targets


@pytest.mark.parametrize("train", [True, False])
def test_custom_op_path_is_identical_to_eager_path(train, monkeypatch):
    model = Chain().train(train)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.3, 0.3)
        model.bn.running_var.uniform_(0.5, 2.0)
    twin = copy.deepcopy(model)
    feat, other, g = make_inputs()
    want = run_chain(model, model, feat, other, g)
    asked = []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: asked.append(1) or True)
    got = run_chain(twin, twin, feat, other, g)
    assert len(asked) == 12  # every wrapper took the custom-op path (the attention ops' pixel_sums too)
    assert_identical(got, want, "train" if train else "eval")
