"""Triton segmentation-head ops: ``head_logits`` (1x1 at low resolution + bilinear upsample, with
backward) and ``head_argmax`` (upsample + argmax fused; full-resolution logits are never written).

See :mod:`fastbisenet.kernels.head_upsample` for the order of operations and its byte/FLOP count.
Eager calls go through :class:`HeadLogitsFunction` / :func:`head_argmax_fwd`; under ``torch.compile``
the custom ops ``fastbisenet::head_logits[_backward]`` and ``fastbisenet::head_argmax`` (see
:mod:`fastbisenet.ops._library`).
Classifiers the kernels do not cover (not a plain 1x1 conv) fall back to the reference formula.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastbisenet import reference
from fastbisenet.kernels import head_upsample as K
from fastbisenet.kernels.channel_attention import map_strides
from fastbisenet.ops._library import FLOAT_DTYPES, call, first_order_only
from fastbisenet.ops.attend_add_upsample import check_size
from fastbisenet.ops.channel_attention import check_map


def is_classifier(conv: nn.Conv2d) -> bool:
    """A 1x1, ungrouped, unpadded conv (bias allowed): a per-pixel matmul."""
    return (
        isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.groups == 1
        and (conv.padding == (0, 0) or conv.padding == "valid")
    )


def head_logits_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, size: tuple[int, int], align_corners: bool
) -> Tensor:
    """NCHW-contiguous logits ``upsample_bilinear(W x + b, size)`` in ``x``'s dtype."""
    check_map(x)
    z = K.head_conv1x1(x, weight, bias)
    return K.upsample_logits(z, weight.shape[0], tuple(x.shape[2:]), size, align_corners, False, x.dtype)


def head_logits_bwd(
    grad: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, align_corners: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients ``(dx, dweight, dbias)`` of :func:`head_logits_fwd`."""
    dz = K.upsample_logits_bwd(grad, tuple(x.shape[2:]), align_corners)
    dx, dw, db = K.head_conv1x1_bwd(dz, x, weight, bias is not None, bias.dtype if bias is not None else None)
    return dx, dw.view(weight.shape), db


def head_argmax_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, size: tuple[int, int], align_corners: bool
) -> Tensor:
    """int32 (N, H, W) argmax over classes of :func:`head_logits_fwd`'s logits (lowest index on ties)."""
    check_map(x)
    z = K.head_conv1x1(x, weight, bias)
    return K.upsample_logits(z, weight.shape[0], tuple(x.shape[2:]), size, align_corners, True, x.dtype)


class HeadLogitsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, size, align_corners):
        ctx.save_for_backward(x, weight, bias)
        ctx.align_corners = align_corners
        return head_logits_fwd(x, weight, bias, size, align_corners)

    @staticmethod
    @first_order_only
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        dx, dw, db = head_logits_bwd(grad, x, weight, bias, ctx.align_corners)
        return dx, dw, db, None, None


@torch.library.custom_op("fastbisenet::head_logits", mutates_args=())
def head_logits_op(x: Tensor, weight: Tensor, bias: Tensor | None, size: list[int], align_corners: bool) -> Tensor:
    return head_logits_fwd(x, weight, bias, tuple(size), align_corners)


@head_logits_op.register_fake
def _(x, weight, bias, size, align_corners):
    return x.new_empty((x.shape[0], weight.shape[0], *size))


@torch.library.custom_op("fastbisenet::head_logits_backward", mutates_args=())
def head_logits_backward_op(
    grad: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, align_corners: bool
) -> list[Tensor]:
    """``[dx, dweight]``, plus ``[dbias]`` with a bias (a custom op returns no None)."""
    dx, dw, db = head_logits_bwd(grad, x, weight, bias, align_corners)
    return [dx, dw] if db is None else [dx, dw, db]


@head_logits_backward_op.register_fake
def _(grad, x, weight, bias, align_corners):
    grads = [torch.empty_like(map_strides(x)[0]), torch.empty_like(weight, memory_format=torch.contiguous_format)]
    return grads if bias is None else [*grads, torch.empty_like(bias)]


def _head_logits_setup(ctx, inputs, output):
    x, weight, bias, _, align_corners = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.align_corners = align_corners


def _head_logits_backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    dx, dw, *db = torch.ops.fastbisenet.head_logits_backward(grad, x, weight, bias, ctx.align_corners)
    return dx, dw, db[0] if db else None, None, None


head_logits_op.register_autograd(_head_logits_backward, setup_context=_head_logits_setup)


@torch.library.custom_op("fastbisenet::head_argmax", mutates_args=())
def head_argmax_op(x: Tensor, weight: Tensor, bias: Tensor | None, size: list[int], align_corners: bool) -> Tensor:
    return head_argmax_fwd(x, weight, bias, tuple(size), align_corners)


@head_argmax_op.register_fake
def _(x, weight, bias, size, align_corners):
    return x.new_empty((x.shape[0], *size), dtype=torch.int32)


def kernels_cover(x: Tensor, conv_out: nn.Conv2d) -> bool:
    """Inputs the kernels take: a plain 1x1 classifier of a non-empty fp32/fp16/bf16 (N, C, H, W) map of at most
    65535 images (the batch is a grid axis). Others run the reference formula, with PyTorch's errors (e.g. a
    width mismatch) and results (empty batches, float64)."""
    return (is_classifier(conv_out) and x.dim() == 4 and x.shape[1] == conv_out.in_channels
            and x.dtype in FLOAT_DTYPES and x.numel() > 0 and x.shape[0] <= 65535)


def head_logits(x: Tensor, conv_out: nn.Conv2d, size: tuple[int, int], align_corners: bool) -> Tensor:
    """``upsample_bilinear(conv_out(x), size)``: a segmentation head's classifier and resize."""
    if not kernels_cover(x, conv_out):
        return reference.head_logits(x, conv_out, size, align_corners)
    return call(
        HeadLogitsFunction.apply, torch.ops.fastbisenet.head_logits,
        x, conv_out.weight, conv_out.bias, check_size(size), bool(align_corners),
    )


def head_argmax(x: Tensor, conv_out: nn.Conv2d, size: tuple[int, int], align_corners: bool) -> Tensor:
    """``argmax_c(head_logits(...))`` as int32 (N, H, W); ties go to the lowest class index."""
    if not kernels_cover(x, conv_out):
        return reference.head_argmax(x, conv_out, size, align_corners)
    with torch.no_grad():
        return call(
            head_argmax_fwd, torch.ops.fastbisenet.head_argmax,
            x, conv_out.weight, conv_out.bias, check_size(size), bool(align_corners),
        )
