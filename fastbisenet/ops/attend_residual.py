"""Triton ``attend_residual``: ``feat * attention + feat`` (the FFM output) in one pass, with backward.

Eager calls go through :class:`AttendResidualFunction`; under ``torch.compile`` the custom ops
``fastbisenet::attend_residual[_backward]`` (see :mod:`fastbisenet.ops._library`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastbisenet import reference
from fastbisenet.kernels import attend_residual as K
from fastbisenet.kernels.channel_attention import finish_partials, map_strides
from fastbisenet.ops._library import call, first_order_only
from fastbisenet.ops.channel_attention import check_map


def attend_residual_fwd(feat: Tensor, attention: Tensor) -> Tensor:
    """``feat * attention + feat`` in feat's layout and the promoted dtype."""
    return K.attend_residual_fwd(feat, attention, torch.promote_types(feat.dtype, attention.dtype))


def attend_residual_bwd(grad: Tensor, feat: Tensor, attention: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients ``(dfeat, dattention)`` of :func:`attend_residual_fwd`."""
    n, c = feat.shape[:2]
    dfeat, part = K.attend_residual_bwd(grad, feat, attention)
    return dfeat, finish_partials(part, attention.dtype).view(n, c, 1, 1)


class AttendResidualFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feat, attention):
        ctx.save_for_backward(feat, attention)
        return attend_residual_fwd(feat, attention)

    @staticmethod
    @first_order_only
    def backward(ctx, grad):
        feat, attention = ctx.saved_tensors
        return attend_residual_bwd(grad, feat, attention)


def _like_feat(feat: Tensor, dtype: torch.dtype) -> Tensor:
    """An empty map laid out as the kernels lay out maps derived from ``feat`` (fake implementations)."""
    return torch.empty_like(map_strides(feat)[0], dtype=dtype)


@torch.library.custom_op("fastbisenet::attend_residual", mutates_args=())
def attend_residual_op(feat: Tensor, attention: Tensor) -> Tensor:
    return attend_residual_fwd(feat, attention)


@attend_residual_op.register_fake
def _(feat, attention):
    return _like_feat(feat, torch.promote_types(feat.dtype, attention.dtype))


@torch.library.custom_op("fastbisenet::attend_residual_backward", mutates_args=())
def attend_residual_backward_op(grad: Tensor, feat: Tensor, attention: Tensor) -> tuple[Tensor, Tensor]:
    return attend_residual_bwd(grad, feat, attention)


@attend_residual_backward_op.register_fake
def _(grad, feat, attention):
    return _like_feat(feat, feat.dtype), attention.new_empty((*feat.shape[:2], 1, 1))


def _attend_residual_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _attend_residual_backward(ctx, grad):
    return torch.ops.fastbisenet.attend_residual_backward(grad, *ctx.saved_tensors)


attend_residual_op.register_autograd(_attend_residual_backward, setup_context=_attend_residual_setup)


def attend_residual(feat: Tensor, attention: Tensor) -> Tensor:
    """``feat * attention + feat``: the FFM output; ``attention`` is (N, C, 1, 1)."""
    check_map(feat, "feat")
    if attention.shape != (*feat.shape[:2], 1, 1):
        return reference.attend_residual(feat, attention)
    return call(AttendResidualFunction.apply, torch.ops.fastbisenet.attend_residual, feat, attention)
