"""Triton ``attend_residual``: ``feat * attention + feat`` (the FFM output) in one pass, with backward."""

from __future__ import annotations

import torch
from torch import Tensor

from fastbisenet import reference
from fastbisenet.kernels import attend_residual as K
from fastbisenet.kernels.channel_attention import finish_partials
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
    def backward(ctx, grad):
        feat, attention = ctx.saved_tensors
        return attend_residual_bwd(grad, feat, attention)


def attend_residual(feat: Tensor, attention: Tensor) -> Tensor:
    """``feat * attention + feat``: the FFM output; ``attention`` is (N, C, 1, 1)."""
    check_map(feat, "feat")
    if attention.shape != (*feat.shape[:2], 1, 1):
        return reference.attend_residual(feat, attention)
    return AttendResidualFunction.apply(feat, attention)
