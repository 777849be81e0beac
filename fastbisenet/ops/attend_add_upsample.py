"""Triton ``attend_add_upsample``: ``upsample(x * attention + other, size)`` in one pass, with backward.

Tensor-level ``attend_add_upsample_fwd``/``_bwd`` (plain tensors and Python scalars), two front ends
on them (:class:`AttendAddUpsampleFunction` for eager calls, the custom ops
``fastbisenet::attend_add_upsample[_backward]`` for ``torch.compile``; see
:mod:`fastbisenet.ops._library`), and the wrapper with the reference signature.
Shapes the kernels do not cover (an attention or ``other`` that only broadcasts partially) fall back
to the reference formula.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastbisenet import reference
from fastbisenet.kernels import attend_add_upsample as K
from fastbisenet.kernels.channel_attention import finish_partials
from fastbisenet.ops._library import FLOAT_DTYPES, call, first_order_only
from fastbisenet.ops.channel_attention import check_map

MODES = {"nearest": K.NEAREST, "bilinear": K.BILINEAR}


def resolve_mode(mode: str, align_corners: bool | None) -> tuple[int, bool]:
    """Kernel ``(MODE, ALIGN)`` for an interpolate ``mode``/``align_corners`` pair, validated as PyTorch does."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
    if mode == "nearest" and align_corners is not None:
        raise ValueError(
            "align_corners option can only be set with the interpolating modes: linear | bilinear | bicubic | trilinear"
        )
    return MODES[mode], bool(align_corners)


def check_size(size) -> tuple[int, int]:
    """``size`` as a pair of positive ints (symbolic sizes under ``torch.compile`` stay symbolic)."""
    if len(size) != 2 or any(s < 1 for s in size):
        raise ValueError(f"size must be two positive ints (H, W), got {tuple(size)}")
    return tuple(s if isinstance(s, torch.SymInt) else int(s) for s in size)


def attend_add_upsample_fwd(
    x: Tensor, attention: Tensor, other: Tensor, size: tuple[int, int], mode: int, align: bool
) -> Tensor:
    """Resized ``x * attention + other`` (channels_last) for kernel ``mode``/``align``; see module doc."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, attention.dtype), other.dtype)
    return K.attend_add_upsample_fwd(x, attention, other, size, mode, align, dtype)


def attend_add_upsample_bwd(
    grad: Tensor, x: Tensor, attention: Tensor, other_full: bool, other_dtype: torch.dtype, mode: int, align: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dx, dattention, dother)`` of :func:`attend_add_upsample_fwd`."""
    n, c = x.shape[:2]
    dx, part, dother = K.attend_add_upsample_bwd(grad, x, attention, other_full, other_dtype, mode, align)
    da = finish_partials(part[0], attention.dtype).view(n, c, 1, 1)
    if dother is None:
        dother = finish_partials(part[1], other_dtype).view(n, c, 1, 1)
    return dx, da, dother


def other_is_full(x: Tensor, other: Tensor) -> bool:
    """``other`` is a full map (x's shape), not an (N, C, 1, 1) vector broadcast over the pixels."""
    return other.shape == x.shape and other.shape[2:] != (1, 1)


class AttendAddUpsampleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, attention, other, size, mode, align_corners):
        kmode = MODES[mode]
        ctx.save_for_backward(x, attention)
        ctx.meta = (other_is_full(x, other), other.dtype, kmode, align_corners)
        return attend_add_upsample_fwd(x, attention, other, size, kmode, align_corners)

    @staticmethod
    @first_order_only
    def backward(ctx, grad):
        x, attention = ctx.saved_tensors
        dx, da, dother = attend_add_upsample_bwd(grad, x, attention, *ctx.meta)
        return dx, da, dother, None, None, None


@torch.library.custom_op("fastbisenet::attend_add_upsample", mutates_args=())
def attend_add_upsample_op(
    x: Tensor, attention: Tensor, other: Tensor, size: list[int], mode: str, align_corners: bool
) -> Tensor:
    return attend_add_upsample_fwd(x, attention, other, tuple(size), MODES[mode], align_corners)


@attend_add_upsample_op.register_fake
def _(x, attention, other, size, mode, align_corners):
    dtype = torch.promote_types(torch.promote_types(x.dtype, attention.dtype), other.dtype)
    return torch.empty((*x.shape[:2], *size), device=x.device, dtype=dtype, memory_format=torch.channels_last)


@torch.library.custom_op("fastbisenet::attend_add_upsample_backward", mutates_args=())
def attend_add_upsample_backward_op(
    grad: Tensor, x: Tensor, attention: Tensor, other_full: bool, other_dtype: torch.dtype, mode: str,
    align_corners: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return attend_add_upsample_bwd(grad, x, attention, other_full, other_dtype, MODES[mode], align_corners)


@attend_add_upsample_backward_op.register_fake
def _(grad, x, attention, other_full, other_dtype, mode, align_corners):
    vec = (*x.shape[:2], 1, 1)
    dother = torch.empty_like(x, dtype=other_dtype) if other_full else x.new_empty(vec, dtype=other_dtype)
    return torch.empty_like(x), attention.new_empty(vec), dother


def _attend_add_upsample_setup(ctx, inputs, output):
    x, attention, other, _, mode, align_corners = inputs
    ctx.save_for_backward(x, attention)
    ctx.meta = (other_is_full(x, other), other.dtype, mode, align_corners)


def _attend_add_upsample_backward(ctx, grad):
    x, attention = ctx.saved_tensors
    dx, da, dother = torch.ops.fastbisenet.attend_add_upsample_backward(grad, x, attention, *ctx.meta)
    return dx, da, dother, None, None, None


attend_add_upsample_op.register_autograd(_attend_add_upsample_backward, setup_context=_attend_add_upsample_setup)


def attend_add_upsample(
    x: Tensor,
    attention: Tensor,
    other: Tensor,
    size: tuple[int, int],
    mode: str = "nearest",
    align_corners: bool | None = None,
) -> Tensor:
    """``upsample(x * attention + other, size)``: one context-path stage.

    ``attention`` is (N, C, 1, 1); ``other`` is either (N, C, 1, 1) (the global context, broadcast)
    or the same shape as ``x``. The result is channels_last.
    """
    _, align = resolve_mode(mode, align_corners)
    size = check_size(size)
    check_map(x)
    n, c = x.shape[:2]
    if (attention.shape != (n, c, 1, 1) or other.shape not in (x.shape, (n, c, 1, 1))
            or attention.dtype not in FLOAT_DTYPES or other.dtype not in FLOAT_DTYPES):
        return reference.attend_add_upsample(x, attention, other, size, mode, align_corners)
    op = torch.ops.fastbisenet.attend_add_upsample
    return call(AttendAddUpsampleFunction.apply, op, x, attention, other, size, mode, align)
