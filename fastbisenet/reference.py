"""Plain-PyTorch formulas of every fused op: the CPU path and what the kernels are checked against.

Each function here has a twin with the same signature in the Triton backend; the model never calls
either directly but goes through :mod:`fastbisenet.ops`, the single dispatch point.

The formulas follow the public BiSeNet implementations operation for operation (same order of
additions and multiplications), so the reference backend reproduces them bit for bit on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_bn_act(
    x: Tensor,
    conv: nn.Conv2d,
    bn: nn.BatchNorm2d | None,
    *,
    residual: Tensor | None = None,
    relu: bool = True,
    pool: bool = False,
) -> Tensor | tuple[Tensor, Tensor | None]:
    """``relu?(bn?(conv(x)) + residual?)`` with the modules' own train/eval semantics.

    ``pool=True`` returns ``(out, pooled)`` where ``pooled`` is what the fused backend gathers for the
    attention ops (``out``'s pixel sums); the reference gathers nothing and returns ``(out, None)``, and
    its attention ops take the mean of the map themselves.
    """
    y = conv(x)
    if bn is not None:
        y = bn(y)
    if residual is not None:
        y = y + residual
    out = F.relu(y) if relu else y
    return (out, None) if pool else out


def concat_conv_bn_act(
    xs: list[Tensor], conv: nn.Conv2d, bn: nn.BatchNorm2d, *, pool: bool = False
) -> Tensor | tuple[Tensor, Tensor | None]:
    """``relu(bn(conv(cat(xs, dim=1))))``: the FFM's ``convblk`` over the spatial and context features.

    ``pool`` as in :func:`conv_bn_act`.
    """
    return conv_bn_act(torch.cat(xs, dim=1), conv, bn, pool=pool)


def conv_bn_act_pair(
    x: Tensor, a: tuple[nn.Conv2d, nn.BatchNorm2d], b: tuple[nn.Conv2d, nn.BatchNorm2d]
) -> tuple[Tensor, Tensor]:
    """``(conv_bn_act(x, *a), conv_bn_act(x, *b))``: two conv + BN + ReLU on the same input (v1's two stems)."""
    return conv_bn_act(x, *a), conv_bn_act(x, *b)


def mean_hw(x: Tensor) -> Tensor:
    """Global average over H and W, keeping dims: (N, C, H, W) -> (N, C, 1, 1)."""
    return torch.mean(x, dim=(2, 3), keepdim=True)


def bn_attention(feat: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, *, pooled: Tensor | None = None) -> Tensor:
    """``sigmoid(bn(conv(mean_hw(feat))))``: ARM and v1 FFM attention, shape (N, C, 1, 1).

    ``pooled`` (pixel sums gathered by a fused producer, see :func:`conv_bn_act`) is ignored here: the
    mean is always taken from ``feat``, as the public code does.
    """
    return torch.sigmoid(bn(conv(mean_hw(feat))))


def global_context(feat: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, *, pooled: Tensor | None = None) -> Tensor:
    """``relu(bn(conv(mean_hw(feat))))``: the context path's global-context vector (its ``conv_avg``),
    shape (N, C, 1, 1). ``pooled`` is ignored, as in :func:`bn_attention`.
    """
    return conv_bn_act(mean_hw(feat), conv, bn)


def mlp_attention(feat: Tensor, conv1: nn.Conv2d, conv2: nn.Conv2d, *, pooled: Tensor | None = None) -> Tensor:
    """``sigmoid(conv2(relu(conv1(mean_hw(feat)))))``: face-parsing FFM attention, shape (N, C, 1, 1).

    ``pooled`` is ignored, as in :func:`bn_attention`.
    """
    return torch.sigmoid(conv2(F.relu(conv1(mean_hw(feat)))))


def cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Per-pixel cross-entropy in fp32, ``reduction="none"``: (N, C, H, W) logits -> (N, H, W)."""
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")


def max_pool2d(x: Tensor, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] | None = None,
               padding: int | tuple[int, int] = 0) -> Tensor:
    """The backbone stem's max-pool (dilation 1, floor mode)."""
    return F.max_pool2d(x, kernel_size, stride, padding)


def upsample(x: Tensor, size: tuple[int, int], mode: str, align_corners: bool | None = None) -> Tensor:
    """Resize to ``size``; ``align_corners`` only for bilinear (PyTorch rejects it for nearest)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode=mode, align_corners=align_corners)


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
    or the same shape as ``x``.
    """
    return upsample(torch.mul(x, attention) + other, size, mode, align_corners)


def attend_residual(feat: Tensor, attention: Tensor) -> Tensor:
    """``feat * attention + feat``: the FFM output."""
    return torch.mul(feat, attention) + feat


def head_logits(
    x: Tensor, conv_out: nn.Conv2d, size: tuple[int, int], align_corners: bool
) -> Tensor:
    """``upsample_bilinear(conv_out(x), size)``: a segmentation head's classifier and resize."""
    return upsample(conv_out(x), size, "bilinear", align_corners)


def head_cross_entropy(x: Tensor, conv_out: nn.Conv2d, labels: Tensor, align_corners: bool,
                       ignore_index: int = -100) -> Tensor:
    """Per-pixel fp32 cross-entropy (N, H, W) of :func:`head_logits` at the labels' size: a head's training loss."""
    return cross_entropy(head_logits(x, conv_out, tuple(labels.shape[-2:]), align_corners), labels, ignore_index)


def head_argmax(x: Tensor, conv_out: nn.Conv2d, size: tuple[int, int], align_corners: bool) -> Tensor:
    """``argmax_c(head_logits(...))`` as int32 (N, H, W); ties go to the lowest class index."""
    return head_logits(x, conv_out, size, align_corners).argmax(dim=1).to(torch.int32)
