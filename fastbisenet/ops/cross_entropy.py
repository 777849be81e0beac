"""Triton per-pixel cross-entropy (``reduction="none"``) with backward (see :mod:`fastbisenet.kernels.cross_entropy`).

Eager calls go through :class:`CrossEntropyFunction`; under ``torch.compile`` the custom ops
``fastbisenet::cross_entropy[_backward]``. Saved for backward: the logits, the labels and one fp32
log-sum-exp per pixel, instead of eager's fp32 log-softmax (C floats per pixel).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastbisenet import reference
from fastbisenet.kernels import cross_entropy as K
from fastbisenet.ops._library import FLOAT_DTYPES, call, first_order_only


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index):
        loss, lse = K.ce_fwd(logits, labels, ignore_index)
        ctx.save_for_backward(logits, labels, lse)
        ctx.ignore_index = ignore_index
        return loss

    @staticmethod
    @first_order_only
    def backward(ctx, grad_loss):
        logits, labels, lse = ctx.saved_tensors
        return K.ce_bwd(grad_loss, logits, labels, lse, ctx.ignore_index), None, None


@torch.library.custom_op("fastbisenet::cross_entropy", mutates_args=())
def cross_entropy_op(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """``(loss, lse)``: fp32 (N, H, W) per-pixel loss and log-sum-exp."""
    return K.ce_fwd(logits, labels, ignore_index)


@cross_entropy_op.register_fake
def _(logits, labels, ignore_index):
    n, _, h, w = logits.shape
    return logits.new_empty((n, h, w), dtype=torch.float32), logits.new_empty((n, h, w), dtype=torch.float32)


@torch.library.custom_op("fastbisenet::cross_entropy_backward", mutates_args=())
def cross_entropy_backward_op(grad_loss: Tensor, logits: Tensor, labels: Tensor, lse: Tensor,
                              ignore_index: int) -> Tensor:
    return K.ce_bwd(grad_loss, logits, labels, lse, ignore_index)


@cross_entropy_backward_op.register_fake
def _(grad_loss, logits, labels, lse, ignore_index):
    return torch.empty_like(K.dense(logits))


def _setup(ctx, inputs, output):
    logits, labels, ignore_index = inputs
    ctx.save_for_backward(logits, labels, output[1])
    ctx.ignore_index = ignore_index
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_loss, _grad_lse):
    logits, labels, lse = ctx.saved_tensors
    return torch.ops.fastbisenet.cross_entropy_backward(grad_loss, logits, labels, lse, ctx.ignore_index), None, None


cross_entropy_op.register_autograd(_backward, setup_context=_setup)


def cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """``F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")``: fp32 (N, H, W).

    ``logits`` (N, C, H, W) fp32/fp16/bf16, NCHW or channels_last; ``labels`` (N, H, W) int64. Other
    inputs (other ranks or dtypes, C > :data:`K.MAX_CLASSES`, empty maps) run PyTorch's op, with its
    errors. A label outside ``[0, C)`` other than ``ignore_index`` gives NaN for that pixel.
    """
    covered = (
        logits.dim() == 4 and labels.dim() == 3 and labels.shape == (logits.shape[0], *logits.shape[2:])
        and logits.dtype in FLOAT_DTYPES and labels.dtype == torch.int64 and labels.device == logits.device
        and 0 < logits.shape[1] <= K.MAX_CLASSES and logits.numel() > 0 and 0 < logits.shape[0] <= 65535
    )
    if not covered:
        return reference.cross_entropy(logits, labels, ignore_index)
    return call(CrossEntropyFunction.apply, torch.ops.fastbisenet.cross_entropy, K.dense(logits), labels,
                int(ignore_index))
