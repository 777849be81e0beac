"""Triton channel attention: ``mean_hw``, ``pixel_sums``, ``bn_attention`` (ARM, v1 FFM), ``mlp_attention`` (face
FFM), and ``global_context`` (the context path's ``relu(BN(1x1(mean)))``, the BN-attention kernel ending in a ReLU).

Each op has tensor-level ``*_fwd``/``*_bwd`` functions taking plain tensors and Python scalars, two
front ends built on them (an ``autograd.Function`` for eager calls and the ``torch.library`` custom
ops ``fastbisenet::<op>`` / ``fastbisenet::<op>_backward`` for ``torch.compile``; see
:mod:`fastbisenet.ops._library`), and a module-level wrapper with the signature of
:mod:`fastbisenet.reference` that picks between them.

The attention ops do not read the feature map: they take its fp32 partial pixel sums ``(S, N, C)``
and ``H * W`` (mean = ``sums.sum(0) / HW``, finished inside the attention kernel) and return
``dmean / HW`` expanded along S as the sums' gradient. The wrappers take the sums from ``pooled=``
when the producer of ``feat`` gathered them in its epilogue (a fused conv), else from the
differentiable op :func:`pixel_sums`, whose backward hands each chunk's gradient to its pixels. In
eval the standalone op is two launches (pixel sums, attention), with ``pooled`` one.

Module configurations the kernels do not cover (a 1x1 conv with bias or padding, groups, a kernel
other than 1x1) fall back to the reference formula, which gives the same result (and ignores
``pooled``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastbisenet import reference
from fastbisenet.kernels import channel_attention as K
from fastbisenet.ops._library import FLOAT_DTYPES, call, first_order_only, is_channels_last, memory_format


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
    """``scale * g`` broadcast to a new (N, C, H, W) map of ``dtype`` and layout ``fmt``.

    ``g`` is fp32 (N, C) (the same value at every pixel) or fp32 (S, N, C) per pixel chunk, chunked as
    :func:`pixel_sums` chunks a map of ``shape`` (see :func:`fastbisenet.kernels.channel_attention.broadcast_hw`).
    """
    out = torch.empty(shape, device=g.device, dtype=dtype, memory_format=fmt)
    return K.broadcast_hw(g, out, scale)


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
    @first_order_only
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


def _map_grad_fake(grad, shape, dtype, channels_last):
    """Fake of a map-reduction's backward op: the input map's gradient, of its shape, dtype and layout."""
    return torch.empty(shape, device=grad.device, dtype=dtype, memory_format=memory_format(channels_last))


def _map_meta_setup(ctx, inputs, output):
    """Autograd setup of a map-reduction op: what its backward op needs to rebuild the map's gradient."""
    (x,) = inputs
    ctx.meta = (list(x.shape), x.dtype, is_channels_last(x))


mean_hw_backward_op.register_fake(_map_grad_fake)


def _mean_hw_backward(ctx, grad):
    return torch.ops.fastbisenet.mean_hw_backward(grad, *ctx.meta)


mean_hw_op.register_autograd(_mean_hw_backward, setup_context=_map_meta_setup)


def mean_hw(x: Tensor) -> Tensor:
    """Global average over H and W, keeping dims: (N, C, H, W) -> (N, C, 1, 1)."""
    return call(MeanHWFunction.apply, torch.ops.fastbisenet.mean_hw, x)


# ----------------------------------------------------------------------------------- pixel_sums


def pixel_sums_fwd(x: Tensor) -> Tensor:
    """fp32 partial pixel sums (S, N, C) of an (N, C, H, W) map: chunk ``s`` sums the flat pixels
    ``p = h * W + w`` in ``[s * chunk, (s + 1) * chunk)``, ``(S, chunk) = split_plan(N, H * W, C, device)``."""
    check_map(x)
    return K.mean_partials(x)[0]


def pixel_sums_bwd(grad: Tensor, shape: torch.Size, dtype: torch.dtype, fmt: torch.memory_format) -> Tensor:
    """Gradient of :func:`pixel_sums_fwd`: ``dx[n, c, p] = grad[p // chunk, n, c]``, a map of ``dtype``/``fmt``.

    The chunking is recomputed from ``shape`` and the device (it is deterministic); ``grad`` may be
    expanded along S (stride 0, as the attention ops return it), which is read as a plain broadcast.
    """
    return broadcast_grad(grad.float(), shape, dtype, fmt, 1.0)


class PixelSumsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.meta = (x.shape, x.dtype, memory_format_of(x))
        return pixel_sums_fwd(x)

    @staticmethod
    @first_order_only
    def backward(ctx, grad: Tensor) -> Tensor:
        return pixel_sums_bwd(grad, *ctx.meta)


@torch.library.custom_op("fastbisenet::pixel_sums", mutates_args=())
def pixel_sums_op(x: Tensor) -> Tensor:
    return pixel_sums_fwd(x)


@pixel_sums_op.register_fake
def _(x):
    n, c, h, w = x.shape
    split, _ = K.split_plan(n, h * w, c, x.device)
    return x.new_empty((split, n, c), dtype=torch.float32)


@torch.library.custom_op("fastbisenet::pixel_sums_backward", mutates_args=())
def pixel_sums_backward_op(grad: Tensor, shape: list[int], dtype: torch.dtype, channels_last: bool) -> Tensor:
    return pixel_sums_bwd(grad, torch.Size(shape), dtype, memory_format(channels_last))


pixel_sums_backward_op.register_fake(_map_grad_fake)


def _pixel_sums_backward(ctx, grad):
    return torch.ops.fastbisenet.pixel_sums_backward(grad, *ctx.meta)


pixel_sums_op.register_autograd(_pixel_sums_backward, setup_context=_map_meta_setup)


def pixel_sums(x: Tensor) -> Tensor:
    """fp32 partial pixel sums (S, N, C) of an (N, C, H, W) map (see :func:`pixel_sums_fwd`); differentiable."""
    return call(PixelSumsFunction.apply, torch.ops.fastbisenet.pixel_sums, x)


def check_pooled(pooled: Tensor, feat: Tensor) -> Tensor:
    """``pooled`` as the attention kernels read it (contiguous), after checking that it can be ``feat``'s
    partial pixel sums: fp32 (S, N, C) on ``feat``'s device; raise ``ValueError`` otherwise."""
    n, c = feat.shape[:2]
    if not isinstance(pooled, Tensor) or pooled.dim() != 3 or pooled.shape[0] == 0:
        shape = tuple(pooled.shape) if isinstance(pooled, Tensor) else type(pooled).__name__
        raise ValueError(f"pooled must be a 3-D tensor (S, N, C) of partial pixel sums with S >= 1, got {shape}")
    if pooled.dtype != torch.float32:
        raise ValueError(f"pooled must be float32 (fp32 partial pixel sums), got {pooled.dtype}")
    if pooled.shape[1:] != (n, c):
        raise ValueError(f"pooled must be (S, {n}, {c}) for feat of shape {tuple(feat.shape)}, "
                         f"got {tuple(pooled.shape)}")
    if pooled.device != feat.device:
        raise ValueError(f"pooled is on {pooled.device} but feat is on {feat.device}")
    return pooled.contiguous()


def _pooled_sums(feat: Tensor, pooled: Tensor | None) -> Tensor:
    """The attention ops' input: ``pooled`` checked, or :func:`pixel_sums` of ``feat`` (checked map)."""
    check_map(feat, "feat")
    return pixel_sums(feat) if pooled is None else check_pooled(pooled, feat)


def sums_grad(dsum: Tensor, split: int) -> Tensor:
    """Gradient of the sums (S, N, C), mean = ``sums.sum(0) / hw``: ``dsum = dmean / hw`` (N, C) (as the
    backward kernels write it) expanded along S."""
    return dsum.expand(split, *dsum.shape)


# --------------------------------------------------------------------------------- bn_attention


def bn_attention_fwd(
    sums: Tensor,
    hw: int,
    dtype: torch.dtype,
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
    relu: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``sigmoid(BN(W @ mean))`` (``relu(...)`` with ``relu``), mean = ``sums.sum(0) / hw``; returns
    ``(a (N, C, 1, 1), y, mean, smean, sinvstd)``.

    ``sums`` are fp32 contiguous partial pixel sums (S, N, C_IN) of a map of ``hw`` pixels; ``a`` is of
    ``dtype`` (the map's). ``batch_stats`` normalises with the batch statistics over N; ``update`` also
    moves the running statistics in place by ``momentum``, or with ``momentum=None`` by
    ``1 / num_batches_tracked`` (a cumulative average; the caller has already counted this call in
    ``num_batches_tracked``, which is only read here). The last four outputs are fp32 and saved for backward.
    """
    n = sums.shape[1]
    if momentum is None and (not update or num_batches_tracked is None):
        momentum = 0.0  # nothing cumulative to update (as nn.BatchNorm2d: factor 0 without a counter)
    a, y, mean, smean, sinvstd = K.bn_attention_fwd(
        sums, hw, weight, gamma, beta, running_mean, running_var, batch_stats, update, momentum, eps, dtype,
        num_batches_tracked, relu,
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
    relu: bool,
    hw: int,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Gradients ``(dsum fp32 (N, C_IN), dweight, dgamma, dbeta)`` of :func:`bn_attention_fwd`: ``dsum`` =
    ``dmean / hw``, the gradient of every partial sum (see :func:`sums_grad`)."""
    n, c_out = y.shape
    dsum, dw, dgamma, dbeta = K.bn_attention_bwd(
        grad.reshape(n, c_out).contiguous(), y, mean, smean, sinvstd, weight, gamma, beta, batch_stats, relu, hw
    )
    return dsum, dw.view(weight.shape), dgamma, dbeta


_NO_GRADS_BN = (None,) * 8  # running_mean, running_var, num_batches_tracked, batch_stats, update, momentum, eps, relu


class BNAttentionFunction(torch.autograd.Function):
    """Eager ``bn_attention``: updates the running statistics in place (when ``update``)."""

    @staticmethod
    def forward(ctx, sums, hw, dtype, weight, gamma, beta, running_mean, running_var, num_batches_tracked, batch_stats,
                update, momentum, eps, relu):
        a, y, mean, smean, sinvstd = bn_attention_fwd(
            sums, hw, dtype, weight, gamma, beta, running_mean, running_var, num_batches_tracked, batch_stats, update,
            momentum, eps, relu,
        )
        ctx.save_for_backward(y, mean, smean, sinvstd, weight, gamma, beta)
        ctx.meta = (batch_stats, sums.shape[0], hw, relu)
        return a

    @staticmethod
    @first_order_only
    def backward(ctx, grad):
        y, mean, smean, sinvstd, weight, gamma, beta = ctx.saved_tensors
        batch_stats, split, hw, relu = ctx.meta
        dsum, dw, dgamma, dbeta = bn_attention_bwd(grad, y, mean, smean, sinvstd, weight, gamma, beta, batch_stats,
                                                   relu, hw)
        return sums_grad(dsum, split), None, None, dw, dgamma, dbeta, *_NO_GRADS_BN


# A custom op that mutates an argument cannot have an autograd formula (torch.library refuses
# ``register_autograd`` on non-functional schemas), so ``fastbisenet::bn_attention`` is functional:
# with ``update`` it runs the kernel on copies of the running statistics and returns the updated
# copies (outputs 5 and 6; empty placeholders otherwise), which :func:`bn_attention` writes back with
# ``copy_`` -- a buffer mutation that torch.compile traces natively. ``num_batches_tracked`` is only
# read (the wrapper increments it before the call).
@torch.library.custom_op("fastbisenet::bn_attention", mutates_args=())
def bn_attention_op(
    sums: Tensor,
    hw: int,
    dtype: torch.dtype,
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
    relu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if update:
        running_mean, running_var = running_mean.clone(), running_var.clone()
    outs = bn_attention_fwd(
        sums, hw, dtype, weight, gamma, beta, running_mean, running_var, num_batches_tracked, batch_stats, update,
        momentum, eps, relu,
    )
    if not update:
        running_mean, running_var = outs[3].new_empty(0), outs[3].new_empty(0)
    return (*outs, running_mean, running_var)


@bn_attention_op.register_fake
def _(sums, hw, dtype, weight, gamma, beta, running_mean, running_var, num_batches_tracked, batch_stats, update,
      momentum, eps, relu):
    _, n, c_in = sums.shape
    c_out = weight.shape[0]
    stats = (
        (torch.empty_like(running_mean), torch.empty_like(running_var)) if update
        else (sums.new_empty(0), sums.new_empty(0))
    )
    return (
        sums.new_empty((n, c_out, 1, 1), dtype=dtype), sums.new_empty((n, c_out)), sums.new_empty((n, c_in)),
        sums.new_empty((c_out,)), sums.new_empty((c_out,)), *stats,
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
    relu: bool,
    hw: int,
) -> list[Tensor]:
    """``[dsum, dweight]``, plus ``[dgamma, dbeta]`` when BN is affine (a custom op returns no None)."""
    dsum, dw, dgamma, dbeta = bn_attention_bwd(grad, y, mean, smean, sinvstd, weight, gamma, beta, batch_stats,
                                               relu, hw)
    return [dsum, dw] if dgamma is None else [dsum, dw, dgamma, dbeta]


@bn_attention_backward_op.register_fake
def _(grad, y, mean, smean, sinvstd, weight, gamma, beta, batch_stats, relu, hw):
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format)
    dsum = torch.empty_like(mean, memory_format=torch.contiguous_format)
    return [dsum, dw] if gamma is None else [dsum, dw, torch.empty_like(gamma), torch.empty_like(beta)]


def _bn_attention_setup(ctx, inputs, output):
    sums, hw, _, weight, gamma, beta = inputs[:6]
    batch_stats, relu = inputs[9], inputs[13]
    _, y, mean, smean, sinvstd, new_mean, new_var = output
    ctx.save_for_backward(y, mean, smean, sinvstd, weight, gamma, beta)
    ctx.mark_non_differentiable(y, mean, smean, sinvstd, new_mean, new_var)
    ctx.meta = (batch_stats, sums.shape[0], hw, relu)


def _bn_attention_backward(ctx, grad, *_):
    y, mean, smean, sinvstd, weight, gamma, beta = ctx.saved_tensors
    batch_stats, split, hw, relu = ctx.meta
    dsum, dw, *affine = torch.ops.fastbisenet.bn_attention_backward(
        grad, y, mean, smean, sinvstd, weight, gamma, beta, batch_stats, relu, hw
    )
    dgamma, dbeta = affine or (None, None)
    return sums_grad(dsum, split), None, None, dw, dgamma, dbeta, *_NO_GRADS_BN


bn_attention_op.register_autograd(_bn_attention_backward, setup_context=_bn_attention_setup)


def bn_attention(feat: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, *, pooled: Tensor | None = None) -> Tensor:
    """``sigmoid(bn(conv(mean_hw(feat))))``: ARM and v1 FFM attention, shape (N, C, 1, 1), ``feat.dtype``.

    ``pooled``: ``feat``'s fp32 partial pixel sums (S, N, C) gathered by its producer (any chunking;
    gradients flow back into it); ``feat`` then supplies only H * W and the dtype. Without it the sums
    come from :func:`pixel_sums`. ``bn`` behaves as ``nn.BatchNorm2d`` does: batch statistics over N in
    training (or without running statistics), running statistics otherwise; in training the running
    statistics and ``num_batches_tracked`` are updated (``momentum=None``: cumulative average).
    """
    return _pooled_conv_bn(feat, conv, bn, pooled, relu=False)


def global_context(feat: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, *, pooled: Tensor | None = None) -> Tensor:
    """``relu(bn(conv(mean_hw(feat))))``: the context path's global-context vector (``conv_avg`` of the pooled
    stride-32 feature), shape (N, C, 1, 1), ``feat.dtype``; one kernel after the pixel sums (the
    :func:`bn_attention` kernel ending in a ReLU). ``pooled`` and ``bn`` as in :func:`bn_attention`.
    """
    return _pooled_conv_bn(feat, conv, bn, pooled, relu=True)


def _pooled_conv_bn(feat: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, pooled: Tensor | None, relu: bool) -> Tensor:
    """:func:`bn_attention` (``relu=False``) or :func:`global_context` (``relu=True``)."""
    half_affine = (bn.weight is None) != (bn.bias is None)  # the kernel takes both or neither
    if (not is_plain_1x1(conv) or not _widths_chain(feat, conv) or bn.num_features != conv.out_channels
            or half_affine):
        # also raises PyTorch's own error for mismatched widths
        return (reference.global_context if relu else reference.bn_attention)(feat, conv, bn)
    sums = _pooled_sums(feat, pooled)
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    if batch_stats and feat.shape[0] == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{torch.Size([1, conv.out_channels, 1, 1])}"
        )
    update = bn.training and bn.track_running_stats and bn.running_mean is not None
    if update and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    momentum = None if bn.momentum is None else float(bn.momentum)
    args = (
        sums, feat.shape[2] * feat.shape[3], feat.dtype, conv.weight, bn.weight, bn.bias, bn.running_mean,
        bn.running_var, bn.num_batches_tracked, batch_stats, update, momentum, float(bn.eps), relu,
    )
    if not torch.compiler.is_compiling():
        return BNAttentionFunction.apply(*args)
    a, _, _, _, _, new_mean, new_var = torch.ops.fastbisenet.bn_attention(*args)
    if update:
        bn.running_mean.copy_(new_mean)
        bn.running_var.copy_(new_var)
    return a


# -------------------------------------------------------------------------------- mlp_attention


def mlp_attention_fwd(
    sums: Tensor, hw: int, dtype: torch.dtype, w1: Tensor, w2: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``sigmoid(W2 @ relu(W1 @ mean))``, mean = ``sums.sum(0) / hw``; returns ``(a (N, C, 1, 1), u, z, mean)``.

    ``sums`` as in :func:`bn_attention_fwd`; ``a`` is of ``dtype``, the last three are fp32.
    """
    a, u, z, mean = K.mlp_attention_fwd(sums, hw, w1, w2, dtype)
    return a.view(sums.shape[1], -1, 1, 1), u, z, mean


def mlp_attention_bwd(
    grad: Tensor, u: Tensor, z: Tensor, mean: Tensor, w1: Tensor, w2: Tensor, hw: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dsum fp32 (N, C_IN), dw1, dw2)`` of :func:`mlp_attention_fwd` (``dsum`` as in
    :func:`bn_attention_bwd`)."""
    n, c_out = z.shape
    dsum, dw1, dw2 = K.mlp_attention_bwd(grad.reshape(n, c_out).contiguous(), z, u, mean, w1, w2, hw)
    return dsum, dw1.view(w1.shape), dw2.view(w2.shape)


class MLPAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sums, hw, dtype, w1, w2):
        a, u, z, mean = mlp_attention_fwd(sums, hw, dtype, w1, w2)
        ctx.save_for_backward(u, z, mean, w1, w2)
        ctx.meta = (sums.shape[0], hw)
        return a

    @staticmethod
    @first_order_only
    def backward(ctx, grad):
        u, z, mean, w1, w2 = ctx.saved_tensors
        split, hw = ctx.meta
        dsum, dw1, dw2 = mlp_attention_bwd(grad, u, z, mean, w1, w2, hw)
        return sums_grad(dsum, split), None, None, dw1, dw2


@torch.library.custom_op("fastbisenet::mlp_attention", mutates_args=())
def mlp_attention_op(
    sums: Tensor, hw: int, dtype: torch.dtype, w1: Tensor, w2: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return mlp_attention_fwd(sums, hw, dtype, w1, w2)


@mlp_attention_op.register_fake
def _(sums, hw, dtype, w1, w2):
    _, n, c_in = sums.shape
    c_mid, c_out = w1.shape[0], w2.shape[0]
    return (
        sums.new_empty((n, c_out, 1, 1), dtype=dtype), sums.new_empty((n, c_mid)), sums.new_empty((n, c_out)),
        sums.new_empty((n, c_in)),
    )


@torch.library.custom_op("fastbisenet::mlp_attention_backward", mutates_args=())
def mlp_attention_backward_op(
    grad: Tensor, u: Tensor, z: Tensor, mean: Tensor, w1: Tensor, w2: Tensor, hw: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dsum, dw1, dw2)``."""
    return mlp_attention_bwd(grad, u, z, mean, w1, w2, hw)


@mlp_attention_backward_op.register_fake
def _(grad, u, z, mean, w1, w2, hw):
    contiguous = torch.contiguous_format
    return (torch.empty_like(mean, memory_format=contiguous), torch.empty_like(w1, memory_format=contiguous),
            torch.empty_like(w2, memory_format=contiguous))


def _mlp_attention_setup(ctx, inputs, output):
    sums, hw, _, w1, w2 = inputs
    _, u, z, mean = output
    ctx.save_for_backward(u, z, mean, w1, w2)
    ctx.mark_non_differentiable(u, z, mean)
    ctx.meta = (sums.shape[0], hw)


def _mlp_attention_backward(ctx, grad, *_):
    u, z, mean, w1, w2 = ctx.saved_tensors
    split, hw = ctx.meta
    dsum, dw1, dw2 = torch.ops.fastbisenet.mlp_attention_backward(grad, u, z, mean, w1, w2, hw)
    return sums_grad(dsum, split), None, None, dw1, dw2


mlp_attention_op.register_autograd(_mlp_attention_backward, setup_context=_mlp_attention_setup)


def mlp_attention(feat: Tensor, conv1: nn.Conv2d, conv2: nn.Conv2d, *, pooled: Tensor | None = None) -> Tensor:
    """``sigmoid(conv2(relu(conv1(mean_hw(feat)))))``: face-parsing FFM attention, shape (N, C, 1, 1).

    ``pooled`` as in :func:`bn_attention`.
    """
    if (not (is_plain_1x1(conv1) and is_plain_1x1(conv2)) or conv1.out_channels > K.MAX_MLP_HIDDEN
            or not _widths_chain(feat, conv1, conv2)):
        return reference.mlp_attention(feat, conv1, conv2)  # also raises PyTorch's error for mismatched widths
    sums = _pooled_sums(feat, pooled)
    return call(MLPAttentionFunction.apply, torch.ops.fastbisenet.mlp_attention, sums, feat.shape[2] * feat.shape[3],
                feat.dtype, conv1.weight, conv2.weight)
