"""Triton channel attention: ``mean_hw``, ``bn_attention`` (ARM, v1 FFM) and ``mlp_attention`` (face FFM).

Each op has tensor-level ``*_fwd``/``*_bwd`` functions taking plain tensors and Python scalars, two
front ends built on them (an ``autograd.Function`` for eager calls and the ``torch.library`` custom
ops ``fastbisenet::<op>`` / ``fastbisenet::<op>_backward`` for ``torch.compile``; see
:mod:`fastbisenet.ops._library`), and a module-level wrapper with the signature of
:mod:`fastbisenet.reference` that picks between them.

Module configurations the kernels do not cover (a 1x1 conv with bias or padding, groups, a kernel
other than 1x1) fall back to the reference formula, which gives the same result.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastbisenet import reference
from fastbisenet.kernels import channel_attention as K
from fastbisenet.ops._library import call, is_channels_last, memory_format

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
    return memory_format(is_channels_last(x))


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


def _widths_chain(x: Tensor, *convs: nn.Conv2d) -> bool:
    """``x``'s channels feed ``convs[0]``, whose outputs feed ``convs[1]``, ...: else the kernels, which
    take widths from the tensors, would read past a weight; the reference op raises instead."""
    width = x.shape[1] if x.dim() == 4 else -1
    for conv in convs:
        if conv.in_channels != width:
            return False
        width = conv.out_channels
    return True


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


@torch.library.custom_op("fastbisenet::mean_hw", mutates_args=())
def mean_hw_op(x: Tensor) -> Tensor:
    return mean_hw_fwd(x)


@mean_hw_op.register_fake
def _(x):
    return x.new_empty((x.shape[0], x.shape[1], 1, 1))


@torch.library.custom_op("fastbisenet::mean_hw_backward", mutates_args=())
def mean_hw_backward_op(grad: Tensor, shape: list[int], dtype: torch.dtype, channels_last: bool) -> Tensor:
    return mean_hw_bwd(grad, torch.Size(shape), dtype, memory_format(channels_last))


@mean_hw_backward_op.register_fake
def _(grad, shape, dtype, channels_last):
    return torch.empty(shape, device=grad.device, dtype=dtype, memory_format=memory_format(channels_last))


def _mean_hw_setup(ctx, inputs, output):
    (x,) = inputs
    ctx.meta = (list(x.shape), x.dtype, is_channels_last(x))


def _mean_hw_backward(ctx, grad):
    return torch.ops.fastbisenet.mean_hw_backward(grad, *ctx.meta)


mean_hw_op.register_autograd(_mean_hw_backward, setup_context=_mean_hw_setup)


def mean_hw(x: Tensor) -> Tensor:
    """Global average over H and W, keeping dims: (N, C, H, W) -> (N, C, 1, 1)."""
    return call(MeanHWFunction.apply, torch.ops.fastbisenet.mean_hw, x)


# --------------------------------------------------------------------------------- bn_attention


def bn_attention_fwd(
    feat: Tensor,
    weight: Tensor,
    gamma: Tensor | None,
    beta: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    batch_stats: bool,
    update: bool,
    momentum: float | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``sigmoid(BN(W @ mean_hw(feat)))``; returns ``(a (N, C, 1, 1), y, mean, smean, sinvstd)``.

    ``batch_stats`` normalises with the batch statistics over N; ``update`` also moves the running
    statistics in place by ``momentum``, or with ``momentum=None`` by ``1 / num_batches_tracked`` (a
    cumulative average; the caller has already counted this call in ``num_batches_tracked``, which is
    only read here). The last four outputs are fp32 and saved for backward.
    """
    check_map(feat, "feat")
    n, _, h, w = feat.shape
    if momentum is None and (not update or num_batches_tracked is None):
        momentum = 0.0  # nothing cumulative to update (as nn.BatchNorm2d: factor 0 without a counter)
    part, split = K.mean_partials(feat)
    a, y, mean, smean, sinvstd = K.bn_attention_fwd(
        part, split, h * w, weight, gamma, beta, running_mean, running_var, batch_stats, update, momentum, eps,
        feat.dtype, num_batches_tracked,
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


_NO_GRADS_BN = (None,) * 7  # running_mean, running_var, num_batches_tracked, batch_stats, update, momentum, eps


class BNAttentionFunction(torch.autograd.Function):
    """Eager ``bn_attention``: updates the running statistics in place (when ``update``)."""

    @staticmethod
    def forward(ctx, feat, weight, gamma, beta, running_mean, running_var, num_batches_tracked, batch_stats, update,
                momentum, eps):
        a, y, mean, smean, sinvstd = bn_attention_fwd(
            feat, weight, gamma, beta, running_mean, running_var, num_batches_tracked, batch_stats, update, momentum,
            eps,
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
        return dfeat, dw, dgamma, dbeta, *_NO_GRADS_BN


# A custom op that mutates an argument cannot have an autograd formula (torch.library refuses
# ``register_autograd`` on non-functional schemas), so ``fastbisenet::bn_attention`` is functional:
# with ``update`` it runs the kernel on copies of the running statistics and returns the updated
# copies (outputs 5 and 6; empty placeholders otherwise), which :func:`bn_attention` writes back with
# ``copy_`` -- a buffer mutation that torch.compile traces natively. ``num_batches_tracked`` is only
# read (the wrapper increments it before the call).
@torch.library.custom_op("fastbisenet::bn_attention", mutates_args=())
def bn_attention_op(
    feat: Tensor,
    weight: Tensor,
    gamma: Tensor | None,
    beta: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    batch_stats: bool,
    update: bool,
    momentum: float | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if update:
        running_mean, running_var = running_mean.clone(), running_var.clone()
    outs = bn_attention_fwd(
        feat, weight, gamma, beta, running_mean, running_var, num_batches_tracked, batch_stats, update, momentum, eps
    )
    if not update:
        running_mean, running_var = outs[3].new_empty(0), outs[3].new_empty(0)
    return (*outs, running_mean, running_var)


@bn_attention_op.register_fake
def _(feat, weight, gamma, beta, running_mean, running_var, num_batches_tracked, batch_stats, update, momentum, eps):
    n, c_in = feat.shape[:2]
    c_out = weight.shape[0]
    f32 = torch.float32
    stats = (
        (torch.empty_like(running_mean), torch.empty_like(running_var)) if update
        else (feat.new_empty(0, dtype=f32), feat.new_empty(0, dtype=f32))
    )
    return (
        feat.new_empty((n, c_out, 1, 1)), feat.new_empty((n, c_out), dtype=f32), feat.new_empty((n, c_in), dtype=f32),
        feat.new_empty((c_out,), dtype=f32), feat.new_empty((c_out,), dtype=f32), *stats,
    )


@torch.library.custom_op("fastbisenet::bn_attention_backward", mutates_args=())
def bn_attention_backward_op(
    grad: Tensor,
    y: Tensor,
    mean: Tensor,
    smean: Tensor,
    sinvstd: Tensor,
    weight: Tensor,
    gamma: Tensor | None,
    beta: Tensor | None,
    batch_stats: bool,
    feat_shape: list[int],
    feat_dtype: torch.dtype,
    channels_last: bool,
) -> list[Tensor]:
    """``[dfeat, dweight]``, plus ``[dgamma, dbeta]`` when BN is affine (a custom op returns no None)."""
    dfeat, dw, dgamma, dbeta = bn_attention_bwd(
        grad, y, mean, smean, sinvstd, weight, gamma, beta, batch_stats, torch.Size(feat_shape), feat_dtype,
        memory_format(channels_last),
    )
    return [dfeat, dw] if dgamma is None else [dfeat, dw, dgamma, dbeta]


@bn_attention_backward_op.register_fake
def _(grad, y, mean, smean, sinvstd, weight, gamma, beta, batch_stats, feat_shape, feat_dtype, channels_last):
    dfeat = torch.empty(feat_shape, device=grad.device, dtype=feat_dtype, memory_format=memory_format(channels_last))
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format)
    return [dfeat, dw] if gamma is None else [dfeat, dw, torch.empty_like(gamma), torch.empty_like(beta)]


def _bn_attention_setup(ctx, inputs, output):
    feat, weight, gamma, beta = inputs[:4]
    batch_stats = inputs[7]
    _, y, mean, smean, sinvstd, new_mean, new_var = output
    ctx.save_for_backward(y, mean, smean, sinvstd, weight, gamma, beta)
    ctx.mark_non_differentiable(y, mean, smean, sinvstd, new_mean, new_var)
    ctx.meta = (batch_stats, list(feat.shape), feat.dtype, is_channels_last(feat))


def _bn_attention_backward(ctx, grad, *_):
    y, mean, smean, sinvstd, weight, gamma, beta = ctx.saved_tensors
    dfeat, dw, *affine = torch.ops.fastbisenet.bn_attention_backward(
        grad, y, mean, smean, sinvstd, weight, gamma, beta, *ctx.meta
    )
    dgamma, dbeta = affine or (None, None)
    return dfeat, dw, dgamma, dbeta, *_NO_GRADS_BN


bn_attention_op.register_autograd(_bn_attention_backward, setup_context=_bn_attention_setup)


def bn_attention(feat: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Tensor:
    """``sigmoid(bn(conv(mean_hw(feat))))``: ARM and v1 FFM attention, shape (N, C, 1, 1).

    ``bn`` behaves as ``nn.BatchNorm2d`` does: batch statistics over N in training (or without running
    statistics), running statistics otherwise; in training the running statistics and
    ``num_batches_tracked`` are updated (``momentum=None``: cumulative average).
    """
    if not is_plain_1x1(conv) or not _widths_chain(feat, conv) or bn.num_features != conv.out_channels:
        return reference.bn_attention(feat, conv, bn)  # also raises PyTorch's own error for mismatched widths
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    if batch_stats and feat.shape[0] == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{torch.Size([1, conv.out_channels, 1, 1])}"
        )
    update = bn.training and bn.track_running_stats and bn.running_mean is not None
    if update and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    args = (
        feat, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked, batch_stats,
        update, None if bn.momentum is None else float(bn.momentum), float(bn.eps),
    )
    if not torch.compiler.is_compiling():
        return BNAttentionFunction.apply(*args)
    a, _, _, _, _, new_mean, new_var = torch.ops.fastbisenet.bn_attention(*args)
    if update:
        bn.running_mean.copy_(new_mean)
        bn.running_var.copy_(new_var)
    return a


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


@torch.library.custom_op("fastbisenet::mlp_attention", mutates_args=())
def mlp_attention_op(feat: Tensor, w1: Tensor, w2: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return mlp_attention_fwd(feat, w1, w2)


@mlp_attention_op.register_fake
def _(feat, w1, w2):
    n, c_in = feat.shape[:2]
    c_mid, c_out = w1.shape[0], w2.shape[0]
    f32 = torch.float32
    return (
        feat.new_empty((n, c_out, 1, 1)), feat.new_empty((n, c_mid), dtype=f32), feat.new_empty((n, c_out), dtype=f32),
        feat.new_empty((n, c_in), dtype=f32),
    )


@torch.library.custom_op("fastbisenet::mlp_attention_backward", mutates_args=())
def mlp_attention_backward_op(
    grad: Tensor,
    u: Tensor,
    z: Tensor,
    mean: Tensor,
    w1: Tensor,
    w2: Tensor,
    feat_shape: list[int],
    feat_dtype: torch.dtype,
    channels_last: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return mlp_attention_bwd(grad, u, z, mean, w1, w2, torch.Size(feat_shape), feat_dtype, memory_format(channels_last))


@mlp_attention_backward_op.register_fake
def _(grad, u, z, mean, w1, w2, feat_shape, feat_dtype, channels_last):
    dfeat = torch.empty(feat_shape, device=grad.device, dtype=feat_dtype, memory_format=memory_format(channels_last))
    contiguous = torch.contiguous_format
    return dfeat, torch.empty_like(w1, memory_format=contiguous), torch.empty_like(w2, memory_format=contiguous)


def _mlp_attention_setup(ctx, inputs, output):
    feat, w1, w2 = inputs
    _, u, z, mean = output
    ctx.save_for_backward(u, z, mean, w1, w2)
    ctx.mark_non_differentiable(u, z, mean)
    ctx.meta = (list(feat.shape), feat.dtype, is_channels_last(feat))


def _mlp_attention_backward(ctx, grad, *_):
    u, z, mean, w1, w2 = ctx.saved_tensors
    return torch.ops.fastbisenet.mlp_attention_backward(grad, u, z, mean, w1, w2, *ctx.meta)


mlp_attention_op.register_autograd(_mlp_attention_backward, setup_context=_mlp_attention_setup)


def mlp_attention(feat: Tensor, conv1: nn.Conv2d, conv2: nn.Conv2d) -> Tensor:
    """``sigmoid(conv2(relu(conv1(mean_hw(feat)))))``: face-parsing FFM attention, shape (N, C, 1, 1)."""
    if (not (is_plain_1x1(conv1) and is_plain_1x1(conv2)) or conv1.out_channels > K.MAX_MLP_HIDDEN
            or not _widths_chain(feat, conv1, conv2)):
        return reference.mlp_attention(feat, conv1, conv2)  # also raises PyTorch's error for mismatched widths
    return call(MLPAttentionFunction.apply, torch.ops.fastbisenet.mlp_attention, feat, conv1.weight, conv2.weight)
