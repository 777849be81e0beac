"""The Triton backend: every op of :mod:`fastbisenet.reference`, same names and signatures, on fused kernels.

:func:`fastbisenet.ops.impl` returns this module for calls that run on the kernels.
"""

from fastbisenet.ops.attend_add_upsample import attend_add_upsample
from fastbisenet.ops.attend_residual import attend_residual
from fastbisenet.ops.channel_attention import bn_attention, mean_hw, mlp_attention
from fastbisenet.ops.conv_bn import concat_conv_bn_act, conv_bn_act
from fastbisenet.ops.head_upsample import head_argmax, head_logits

__all__ = [
    "attend_add_upsample",
    "attend_residual",
    "bn_attention",
    "concat_conv_bn_act",
    "conv_bn_act",
    "head_argmax",
    "head_logits",
    "mean_hw",
    "mlp_attention",
]
