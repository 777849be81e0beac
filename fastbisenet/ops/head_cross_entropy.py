"""Triton segmentation head + per-pixel cross-entropy (training): ``head_cross_entropy``, with backward.

``cross_entropy(head_logits(x, conv_out, labels' size, align_corners), labels)`` without writing the
full-resolution logits (see :mod:`fastbisenet.kernels.head_cross_entropy` for the bytes): the 1x1
classifier runs at low resolution (:func:`~fastbisenet.kernels.head_upsample.head_conv1x1`), then one
kernel interpolates each pixel's logits in registers and writes its loss and log-sum-exp. Saved for
backward: the features, the classifier, the labels, the low-res logits ``z`` and the fp32
log-sum-exp, instead of the (N, C, H, W) logits. Eager calls go through
:class:`HeadCrossEntropyFunction`; under ``torch.compile`` the custom ops
``fastbisenet::head_cross_entropy[_backward]``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastbisenet import reference
from fastbisenet.kernels import head_cross_entropy as K
from fastbisenet.kernels.channel_attention import map_strides
from fastbisenet.kernels.head_upsample import _cls_block, head_conv1x1, head_conv1x1_bwd
from fastbisenet.ops._library import call, first_order_only
from fastbisenet.ops.cross_entropy import cross_entropy
from fastbisenet.ops.head_upsample import head_logits, kernels_cover


def head_ce_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, align_corners: bool, ignore_index: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, z, lse)``: the fp32 (N, H, W) per-pixel loss, and what backward needs (the fp32 low-res
    logits and the per-pixel log-sum-exp)."""
    z = head_conv1x1(x, weight, bias)
    loss, lse = K.head_ce_fwd(z, labels, weight.shape[0], tuple(x.shape[2:]), align_corners, ignore_index)
    return loss, z, lse


def head_ce_bwd(
    grad: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, z: Tensor, lse: Tensor,
    align_corners: bool, ignore_index: int,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients ``(dx, dweight, dbias)`` of :func:`head_ce_fwd`'s loss."""
    dz = K.head_ce_bwd(grad, z, labels, lse, weight.shape[0], tuple(x.shape[2:]), align_corners, ignore_index)
    dx, dw, db = head_conv1x1_bwd(dz, x, weight, bias is not None, bias.dtype if bias is not None else None)
    return dx, dw.view(weight.shape), db


class HeadCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, labels, align_corners, ignore_index):
        loss, z, lse = head_ce_fwd(x, weight, bias, labels, align_corners, ignore_index)
        ctx.save_for_backward(x, weight, bias, labels, z, lse)
        ctx.args = (align_corners, ignore_index)
        return loss

    @staticmethod
    @first_order_only
    def backward(ctx, grad):
        dx, dw, db = head_ce_bwd(grad, *ctx.saved_tensors, *ctx.args)
        return dx, dw, db, None, None, None


@torch.library.custom_op("fastbisenet::head_cross_entropy", mutates_args=())
def head_cross_entropy_op(x: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, align_corners: bool,
                          ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, z, lse)`` of :func:`head_ce_fwd`."""
    return head_ce_fwd(x, weight, bias, labels, align_corners, ignore_index)


@head_cross_entropy_op.register_fake
def _(x, weight, bias, labels, align_corners, ignore_index):
    loss = labels.new_empty(labels.shape, dtype=torch.float32)
    z = x.new_empty((x.shape[0], x.shape[2] * x.shape[3], _cls_block(weight.shape[0])), dtype=torch.float32)
    return loss, z, torch.empty_like(loss)


@torch.library.custom_op("fastbisenet::head_cross_entropy_backward", mutates_args=())
def head_cross_entropy_backward_op(
    grad: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, z: Tensor, lse: Tensor,
    align_corners: bool, ignore_index: int,
) -> list[Tensor]:
    """``[dx, dweight]``, plus ``[dbias]`` with a bias (a custom op returns no None)."""
    dx, dw, db = head_ce_bwd(grad, x, weight, bias, labels, z, lse, align_corners, ignore_index)
    return [dx, dw] if db is None else [dx, dw, db]


@head_cross_entropy_backward_op.register_fake
def _(grad, x, weight, bias, labels, z, lse, align_corners, ignore_index):
    grads = [torch.empty_like(map_strides(x)[0]), torch.empty_like(weight, memory_format=torch.contiguous_format)]
    return grads if bias is None else [*grads, torch.empty_like(bias)]


def _setup(ctx, inputs, output):
    x, weight, bias, labels, align_corners, ignore_index = inputs
    _, z, lse = output
    ctx.save_for_backward(x, weight, bias, labels, z, lse)
    ctx.args = (align_corners, ignore_index)
    ctx.mark_non_differentiable(z, lse)


def _backward(ctx, grad, _grad_z, _grad_lse):
    dx, dw, *db = torch.ops.fastbisenet.head_cross_entropy_backward(grad, *ctx.saved_tensors, *ctx.args)
    return dx, dw, db[0] if db else None, None, None, None


head_cross_entropy_op.register_autograd(_backward, setup_context=_setup)


def head_cross_entropy(x: Tensor, conv_out: nn.Conv2d, labels: Tensor, align_corners: bool,
                       ignore_index: int = -100) -> Tensor:
    """``cross_entropy(head_logits(x, conv_out, labels.shape[-2:], align_corners), labels, ignore_index)``:
    fp32 (N, H, W) per-pixel loss, 0 where the label is ``ignore_index``, NaN where a label is outside
    ``[0, n_classes)``; the full-resolution logits are never written.

    Above :data:`K.MAX_CLASSES` classes this is the unfused chain of the fused ``head_logits`` and
    ``cross_entropy`` ops. Inputs the kernels do not cover (a classifier that is not a plain 1x1 conv,
    labels that are not int64 (N, H, W) on ``x``'s device, empty maps) run the reference formula, with
    PyTorch's errors.
    """
    covered = (
        kernels_cover(x, conv_out)
        and labels.dim() == 3 and labels.shape[0] == x.shape[0] and labels.numel() > 0
        and labels.dtype == torch.int64 and labels.device == x.device
    )
    if not covered:
        return reference.head_cross_entropy(x, conv_out, labels, align_corners, ignore_index)
    if conv_out.out_channels > K.MAX_CLASSES:
        logits = head_logits(x, conv_out, tuple(labels.shape[-2:]), align_corners)
        return cross_entropy(logits, labels, ignore_index)
    return call(
        HeadCrossEntropyFunction.apply, torch.ops.fastbisenet.head_cross_entropy,
        x, conv_out.weight, conv_out.bias, labels, bool(align_corners), int(ignore_index),
    )
