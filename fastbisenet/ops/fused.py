"""The Triton backend: every op of :mod:`fastbisenet.reference`, same names and signatures, on fused kernels.

:func:`fastbisenet.ops.impl` returns this module for calls that run on the kernels.

``nn.SyncBatchNorm`` in training mode needs statistics reduced across processes, which the kernels do
not do: ops whose BatchNorm is one run the reference op instead (cuDNN + NCCL all-reduce), so DDP
training with ``convert_sync_batchnorm`` stays exact.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import Tensor, nn

from fastbisenet import reference
from fastbisenet.ops import channel_attention, conv_bn
from fastbisenet.ops.attend_add_upsample import attend_add_upsample
from fastbisenet.ops.attend_residual import attend_residual
from fastbisenet.ops.channel_attention import mean_hw, mlp_attention
from fastbisenet.ops.cross_entropy import cross_entropy
from fastbisenet.ops.head_cross_entropy import head_cross_entropy
from fastbisenet.ops.head_upsample import head_argmax, head_logits
from fastbisenet.ops.max_pool import max_pool2d


def _sync_bn_uses_reference(fn: Callable) -> Callable:
    """Run ``reference.<name>`` when the op's BatchNorm (third argument) is a training SyncBatchNorm."""
    name = fn.__name__

    @functools.wraps(fn)
    def op(a, conv, bn, *args, **kwargs):
        if isinstance(bn, nn.SyncBatchNorm) and bn.training:
            return getattr(reference, name)(a, conv, bn, *args, **kwargs)
        return fn(a, conv, bn, *args, **kwargs)

    return op


conv_bn_act = _sync_bn_uses_reference(conv_bn.conv_bn_act)
concat_conv_bn_act = _sync_bn_uses_reference(conv_bn.concat_conv_bn_act)
bn_attention = _sync_bn_uses_reference(channel_attention.bn_attention)
global_context = _sync_bn_uses_reference(channel_attention.global_context)


def conv_bn_act_pair(x: Tensor, a: conv_bn.ConvBN, b: conv_bn.ConvBN) -> tuple[Tensor, Tensor]:
    """:func:`conv_bn_act_pair <fastbisenet.ops.conv_bn.conv_bn_act_pair>`; two :func:`conv_bn_act` calls
    (each handing a training SyncBatchNorm to the reference) when either BN is a SyncBatchNorm."""
    if isinstance(a[1], nn.SyncBatchNorm) or isinstance(b[1], nn.SyncBatchNorm):
        return conv_bn_act(x, *a), conv_bn_act(x, *b)
    return conv_bn.conv_bn_act_pair(x, a, b)


__all__ = [
    "attend_add_upsample",
    "attend_residual",
    "bn_attention",
    "concat_conv_bn_act",
    "conv_bn_act",
    "conv_bn_act_pair",
    "cross_entropy",
    "global_context",
    "head_argmax",
    "head_cross_entropy",
    "head_logits",
    "max_pool2d",
    "mean_hw",
    "mlp_attention",
]
