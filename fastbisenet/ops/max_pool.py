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
from fastbisenet.ops._library import call

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _pair(v: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[-1]))


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
    """``F.max_pool2d(x, kernel_size, stride, padding)`` with the same values; channels_last output."""
    k = _pair(kernel_size)
    s = _pair(stride if stride is not None else kernel_size)
    p = _pair(padding)
    covered = (
        x.dim() == 4
        and x.dtype in _DTYPES
        and not (torch.is_grad_enabled() and x.requires_grad)
        and all(kk > 0 and ss > 0 and 0 <= pp <= kk // 2 for kk, ss, pp in zip(k, s, p, strict=True))
        and all(size + 2 * pp >= kk for size, kk, pp in zip(x.shape[2:], k, p, strict=True))
    )
    if not covered:
        return reference.max_pool2d(x, kernel_size, stride, padding)
    return call(max_pool2d_fwd, torch.ops.fastbisenet.max_pool2d, x, list(k), list(s), list(p))
