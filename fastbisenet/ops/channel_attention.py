"""Triton channel attention: ``mean_hw``, ``bn_attention`` (ARM, v1 FFM) and ``mlp_attention`` (face FFM).

Each op has tensor-level ``*_fwd``/``*_bwd`` functions taking plain tensors and Python scalars (ready
for ``torch.library`` registration), an ``autograd.Function`` built on them, and a module-level
wrapper with the signature of :mod:`fastbisenet.reference`.

Module configurations the kernels do not cover (a 1x1 conv with bias or padding, groups, a kernel
other than 1x1) fall back to the reference formula, which gives the same result.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastbisenet import reference
from fastbisenet.kernels import channel_attention as K

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_map(x: Tensor, name: str = "x") -> None:
    """Raise ``ValueError`` unless ``x`` is a non-empty 4-D float map the kernels can read."""
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")


def memory_format_of(x: Tensor) -> torch.memory_format:
    """``channels_last`` when ``x`` is laid out so (and not also NCHW-contiguous), else contiguous."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def broadcast_grad(g: Tensor, shape: torch.Size, dtype: torch.dtype, fmt: torch.memory_format, scale: float) -> Tensor:
    """``scale * g`` (fp32 (N, C)) broadcast to a new (N, C, H, W) map of ``dtype`` and layout ``fmt``."""
    out = torch.empty(shape, device=g.device, dtype=dtype, memory_format=fmt)
    return K.broadcast_hw(g.contiguous(), out, scale)


def is_plain_1x1(conv: nn.Conv2d) -> bool:
    """A bias-free, ungrouped 1x1 conv without padding: a matmul on a (N, C, 1, 1) vector."""
    return (
        isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (1, 1)
        and conv.groups == 1
        and conv.bias is None
        and (conv.padding == (0, 0) or conv.padding == "valid")
    )


# -------------------------------------------------------------------------------------- mean_hw


def mean_hw_fwd(x: Tensor) -> Tensor:
    """Spatial mean (N, C, H, W) -> (N, C, 1, 1), fp32 accumulation, in ``x.dtype``."""
    check_map(x)
    n, c, h, w = x.shape
    part, _ = K.mean_partials(x)
    return K.finish_partials(part, x.dtype, 1.0 / (h * w)).view(n, c, 1, 1)


def mean_hw_bwd(grad: Tensor, shape: torch.Size, dtype: torch.dtype, fmt: torch.memory_format) -> Tensor:
    """Gradient of :func:`mean_hw_fwd`: ``grad / HW`` broadcast over the map."""
    n, c, h, w = shape
    return broadcast_grad(grad.reshape(n, c).float(), shape, dtype, fmt, 1.0 / (h * w))


class MeanHWFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.meta = (x.shape, x.dtype, memory_format_of(x))
        return mean_hw_fwd(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return mean_hw_bwd(grad, *ctx.meta)


def mean_hw(x: Tensor) -> Tensor:
    """Global average over H and W, keeping dims: (N, C, H, W) -> (N, C, 1, 1)."""
    return MeanHWFunction.apply(x)


# --------------------------------------------------------------------------------- bn_attention


def bn_attention_fwd(
    feat: Tensor,
    weight: Tensor,
    gamma: Tensor | None,
    beta: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    batch_stats: bool,
    update: bool,
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``sigmoid(BN(W @ mean_hw(feat)))``; returns ``(a (N, C, 1, 1), y, mean, smean, sinvstd)``.

    ``batch_stats`` normalises with the batch statistics over N; ``update`` also moves the running
    statistics in place by ``momentum``. The last four outputs are fp32 and saved for backward.
    """
    check_map(feat, "feat")
    n, _, h, w = feat.shape
    part, split = K.mean_partials(feat)
    a, y, mean, smean, sinvstd = K.bn_attention_fwd(
        part, split, h * w, weight, gamma, beta, running_mean, running_var, batch_stats, update, momentum, eps,
        feat.dtype,
    )
    return a.view(n, -1, 1, 1), y, mean, smean, sinvstd


def bn_attention_bwd(
    grad: Tensor,
    y: Tensor,
    mean: Tensor,
    smean: Tensor,
    sinvstd: Tensor,
    weight: Tensor,
    gamma: Tensor | None,
    beta: Tensor | None,
    batch_stats: bool,
    feat_shape: torch.Size,
    feat_dtype: torch.dtype,
    feat_format: torch.memory_format,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Gradients ``(dfeat, dweight, dgamma, dbeta)`` of :func:`bn_attention_fwd`."""
    n, c_out = y.shape
    dmean, dw, dgamma, dbeta = K.bn_attention_bwd(
        grad.reshape(n, c_out).contiguous(), y, mean, smean, sinvstd, weight, gamma, beta, batch_stats
    )
    h, w = feat_shape[2], feat_shape[3]
    dfeat = broadcast_grad(dmean, feat_shape, feat_dtype, feat_format, 1.0 / (h * w))
    return dfeat, dw.view(weight.shape), dgamma, dbeta


class BNAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feat, weight, gamma, beta, running_mean, running_var, batch_stats, update, momentum, eps):
        a, y, mean, smean, sinvstd = bn_attention_fwd(
            feat, weight, gamma, beta, running_mean, running_var, batch_stats, update, momentum, eps
        )
        ctx.save_for_backward(y, mean, smean, sinvstd, weight, gamma, beta)
        ctx.meta = (batch_stats, feat.shape, feat.dtype, memory_format_of(feat))
        return a

    @staticmethod
    def backward(ctx, grad):
        y, mean, smean, sinvstd, weight, gamma, beta = ctx.saved_tensors
        batch_stats, shape, dtype, fmt = ctx.meta
        dfeat, dw, dgamma, dbeta = bn_attention_bwd(
            grad, y, mean, smean, sinvstd, weight, gamma, beta, batch_stats, shape, dtype, fmt
        )
        return dfeat, dw, dgamma, dbeta, None, None, None, None, None, None


def bn_attention(feat: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Tensor:
    """``sigmoid(bn(conv(mean_hw(feat))))``: ARM and v1 FFM attention, shape (N, C, 1, 1).

    ``bn`` behaves as ``nn.BatchNorm2d`` does: batch statistics over N in training (or without running
    statistics), running statistics otherwise; in training the running statistics and
    ``num_batches_tracked`` are updated (``momentum=None``: cumulative average).
    """
    if not is_plain_1x1(conv):
        return reference.bn_attention(feat, conv, bn)
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    if batch_stats and feat.shape[0] == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{torch.Size([1, conv.out_channels, 1, 1])}"
        )
    update = bn.training and bn.track_running_stats and bn.running_mean is not None
    momentum = 0.0
    if update:
        momentum = bn.momentum if bn.momentum is not None else 0.0
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                momentum = 1.0 / float(bn.num_batches_tracked)
    return BNAttentionFunction.apply(
        feat, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, batch_stats, update,
        float(momentum), float(bn.eps),
    )


# -------------------------------------------------------------------------------- mlp_attention


def mlp_attention_fwd(feat: Tensor, w1: Tensor, w2: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``sigmoid(W2 @ relu(W1 @ mean_hw(feat)))``; returns ``(a (N, C, 1, 1), u, z, mean)`` (last three fp32)."""
    check_map(feat, "feat")
    n, _, h, w = feat.shape
    part, split = K.mean_partials(feat)
    a, u, z, mean = K.mlp_attention_fwd(part, split, h * w, w1, w2, feat.dtype)
    return a.view(n, -1, 1, 1), u, z, mean


def mlp_attention_bwd(
    grad: Tensor,
    u: Tensor,
    z: Tensor,
    mean: Tensor,
    w1: Tensor,
    w2: Tensor,
    feat_shape: torch.Size,
    feat_dtype: torch.dtype,
    feat_format: torch.memory_format,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dfeat, dw1, dw2)`` of :func:`mlp_attention_fwd`."""
    n, c_out = z.shape
    dmean, dw1, dw2 = K.mlp_attention_bwd(grad.reshape(n, c_out).contiguous(), z, u, mean, w1, w2)
    h, w = feat_shape[2], feat_shape[3]
    dfeat = broadcast_grad(dmean, feat_shape, feat_dtype, feat_format, 1.0 / (h * w))
    return dfeat, dw1.view(w1.shape), dw2.view(w2.shape)


class MLPAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feat, w1, w2):
        a, u, z, mean = mlp_attention_fwd(feat, w1, w2)
        ctx.save_for_backward(u, z, mean, w1, w2)
        ctx.meta = (feat.shape, feat.dtype, memory_format_of(feat))
        return a

    @staticmethod
    def backward(ctx, grad):
        u, z, mean, w1, w2 = ctx.saved_tensors
        return mlp_attention_bwd(grad, u, z, mean, w1, w2, *ctx.meta)


def mlp_attention(feat: Tensor, conv1: nn.Conv2d, conv2: nn.Conv2d) -> Tensor:
    """``sigmoid(conv2(relu(conv1(mean_hw(feat)))))``: face-parsing FFM attention, shape (N, C, 1, 1)."""
    if not (is_plain_1x1(conv1) and is_plain_1x1(conv2)) or conv1.out_channels > K.MAX_MLP_HIDDEN:
        return reference.mlp_attention(feat, conv1, conv2)
    return MLPAttentionFunction.apply(feat, conv1.weight, conv2.weight)
