"""Triton ``attend_add_upsample``: ``upsample(x * attention + other, size)`` in one pass, with backward.

Tensor-level ``attend_add_upsample_fwd``/``_bwd`` (plain tensors and Python scalars, ready for
``torch.library``), :class:`AttendAddUpsampleFunction`, and the wrapper with the reference signature.
Shapes the kernels do not cover (an attention or ``other`` that only broadcasts partially) fall back
to the reference formula.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastbisenet import reference
from fastbisenet.kernels import attend_add_upsample as K
from fastbisenet.kernels.channel_attention import finish_partials
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
    """``size`` as a pair of positive ints."""
    if len(size) != 2 or any(int(s) < 1 for s in size):
        raise ValueError(f"size must be two positive ints (H, W), got {tuple(size)}")
    return int(size[0]), int(size[1])


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


class AttendAddUpsampleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, attention, other, size, mode, align):
        ctx.save_for_backward(x, attention)
        ctx.meta = (other.shape == x.shape and other.shape[2:] != (1, 1), other.dtype, mode, align)
        return attend_add_upsample_fwd(x, attention, other, size, mode, align)

    @staticmethod
    def backward(ctx, grad):
        x, attention = ctx.saved_tensors
        dx, da, dother = attend_add_upsample_bwd(grad, x, attention, *ctx.meta)
        return dx, da, dother, None, None, None


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
    kmode, align = resolve_mode(mode, align_corners)
    size = check_size(size)
    check_map(x)
    n, c = x.shape[:2]
    if attention.shape != (n, c, 1, 1) or other.shape not in (x.shape, (n, c, 1, 1)):
        return reference.attend_add_upsample(x, attention, other, size, mode, align_corners)
    return AttendAddUpsampleFunction.apply(x, attention, other, size, kmode, align)
