"""Triton ``max_pool2d`` for inference: values only, no int64 indices (see :mod:`fastbisenet.kernels.max_pool`).

A call whose input needs a gradient (training) runs PyTorch's op, which keeps the indices its backward
uses; so do inputs the kernel does not cover (not 4-D, not fp32/fp16/bf16) and invalid arguments (PyTorch
raises its own error). Under ``torch.compile`` the inference path is the custom op
``fastbisenet::max_pool2d``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastbisenet import reference
from fastbisenet.kernels import max_pool as K
from fastbisenet.ops._library import FLOAT_DTYPES, call


def _pair(v: int | tuple[int, ...] | list[int]) -> tuple[int, int] | None:
    """``(h, w)`` from an int or a 1- or 2-sequence of ints, as PyTorch reads them; None otherwise."""
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) in (1, 2) and all(isinstance(i, int) for i in v):
        return (v[0], v[-1])
    return None


def max_pool2d_fwd(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int]) -> Tensor:
    """``F.max_pool2d(x, kernel_size, stride, padding)`` (values), channels_last in ``x``'s dtype."""
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    oh = (x.shape[2] + 2 * ph - kh) // sh + 1
    ow = (x.shape[3] + 2 * pw - kw) // sw + 1
    return K.max_pool_fwd(x, (kh, kw), (sh, sw), (ph, pw), (oh, ow))


@torch.library.custom_op("fastbisenet::max_pool2d", mutates_args=())
def max_pool2d_op(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int]) -> Tensor:
    return max_pool2d_fwd(x, kernel_size, stride, padding)


@max_pool2d_op.register_fake
def _(x, kernel_size, stride, padding):
    oh = (x.shape[2] + 2 * padding[0] - kernel_size[0]) // stride[0] + 1
    ow = (x.shape[3] + 2 * padding[1] - kernel_size[1]) // stride[1] + 1
    return x.new_empty((x.shape[0], x.shape[1], oh, ow)).contiguous(memory_format=torch.channels_last)


def max_pool2d(x: Tensor, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] | None = None,
               padding: int | tuple[int, int] = 0) -> Tensor:
    """``F.max_pool2d(x, kernel_size, stride, padding)`` with the same values: from the kernel (channels_last
    output) in inference, else from PyTorch's op (its layout rules, and its errors for invalid arguments)."""
    k = _pair(kernel_size)
    s = _pair(kernel_size if stride is None or (isinstance(stride, (tuple, list)) and not stride) else stride)
    p = _pair(padding)
    covered = (
        k is not None and s is not None and p is not None
        and x.dim() == 4
        and x.dtype in FLOAT_DTYPES
        and 0 < x.shape[0] <= 65535 and min(x.shape[1:]) > 0  # the batch is grid axis z
        and not (torch.is_grad_enabled() and x.requires_grad)
        and all(kk > 0 and ss > 0 and 0 <= pp <= kk // 2 for kk, ss, pp in zip(k, s, p, strict=True))
        and all(size + 2 * pp >= kk for size, kk, pp in zip(x.shape[2:], k, p, strict=True))
    )
    if not covered:
        return reference.max_pool2d(x, kernel_size, stride, padding)
    return call(max_pool2d_fwd, torch.ops.fastbisenet.max_pool2d, x, list(k), list(s), list(p))
