"""Triton ``max_pool2d`` without int64 indices (see :mod:`fastbisenet.kernels.max_pool`), with backward.

Inference writes the values only. A call whose input needs a gradient goes through
:class:`MaxPool2dFunction`: the forward also writes the int8 window position of each maximum, the only
tensor saved for backward (PyTorch saves an int64 index per output), and the backward gathers the
gradient from it. Inputs the kernel does not cover (not 4-D, not fp32/fp16/bf16, windows over 127
elements with a gradient) and invalid arguments run PyTorch's op (which raises its own error). Under
``torch.compile`` the paths are the custom ops ``fastbisenet::max_pool2d`` (inference) and
``fastbisenet::max_pool2d_train`` + ``fastbisenet::max_pool2d_train_backward``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastbisenet import reference
from fastbisenet.kernels import max_pool as K
from fastbisenet.ops._library import FLOAT_DTYPES, call, first_order_only, is_channels_last, memory_format


def _pair(v: int | tuple[int, ...] | list[int]) -> tuple[int, int] | None:
    """``(h, w)`` from an int or a 1- or 2-sequence of ints, as PyTorch reads them; None otherwise."""
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) in (1, 2) and all(isinstance(i, int) for i in v):
        return (v[0], v[-1])
    return None


def _out_hw(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int]) -> tuple[int, int]:
    return tuple((size + 2 * p - k) // s + 1 for size, k, s, p in zip(x.shape[2:], kernel_size, stride, padding,
                                                                     strict=True))


def max_pool2d_fwd(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int]) -> Tensor:
    """``F.max_pool2d(x, kernel_size, stride, padding)`` (values), channels_last in ``x``'s dtype."""
    geometry = (tuple(kernel_size), tuple(stride), tuple(padding))
    return K.max_pool_fwd(x, *geometry, _out_hw(x, kernel_size, stride, padding))[0]


def max_pool2d_train_fwd(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int]
                         ) -> tuple[Tensor, Tensor]:
    """The values and the int8 window positions of the maxima (what the backward needs)."""
    geometry = (tuple(kernel_size), tuple(stride), tuple(padding))
    return K.max_pool_fwd(x, *geometry, _out_hw(x, kernel_size, stride, padding), argmax=True)


def max_pool2d_bwd(grad: Tensor, arg: Tensor, x_shape: list[int], x_channels_last: bool, dtype: torch.dtype,
                   kernel_size: list[int], stride: list[int], padding: list[int]) -> Tensor:
    """The input gradient, in the input's shape, layout and dtype."""
    dx = torch.empty(x_shape, device=grad.device, dtype=dtype, memory_format=memory_format(x_channels_last))
    return K.max_pool_bwd(grad, arg, dx, tuple(kernel_size), tuple(stride), tuple(padding))


def _save_for_backward(ctx, x: Tensor, arg: Tensor, kernel_size: list[int], stride: list[int],
                       padding: list[int]) -> None:
    """What :func:`max_pool2d_bwd` needs: the window positions and the input's shape, layout and dtype."""
    ctx.save_for_backward(arg)
    ctx.args = (list(x.shape), is_channels_last(x), x.dtype, kernel_size, stride, padding)
    ctx.mark_non_differentiable(arg)


class MaxPool2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding):
        y, arg = max_pool2d_train_fwd(x, kernel_size, stride, padding)
        _save_for_backward(ctx, x, arg, kernel_size, stride, padding)
        return y

    @staticmethod
    @first_order_only
    def backward(ctx, grad):
        (arg,) = ctx.saved_tensors
        return max_pool2d_bwd(grad, arg, *ctx.args), None, None, None


def _fake_out(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
              dtype: torch.dtype | None = None) -> Tensor:
    shape = (x.shape[0], x.shape[1], *_out_hw(x, kernel_size, stride, padding))
    return x.new_empty(shape, dtype=dtype or x.dtype).contiguous(memory_format=torch.channels_last)


@torch.library.custom_op("fastbisenet::max_pool2d", mutates_args=())
def max_pool2d_op(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int]) -> Tensor:
    return max_pool2d_fwd(x, kernel_size, stride, padding)


@max_pool2d_op.register_fake
def _(x, kernel_size, stride, padding):
    return _fake_out(x, kernel_size, stride, padding)


@torch.library.custom_op("fastbisenet::max_pool2d_train", mutates_args=())
def max_pool2d_train_op(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int]
                        ) -> tuple[Tensor, Tensor]:
    """``(values, int8 window positions)``."""
    return max_pool2d_train_fwd(x, kernel_size, stride, padding)


@max_pool2d_train_op.register_fake
def _(x, kernel_size, stride, padding):
    return _fake_out(x, kernel_size, stride, padding), _fake_out(x, kernel_size, stride, padding, torch.int8)


@torch.library.custom_op("fastbisenet::max_pool2d_train_backward", mutates_args=())
def max_pool2d_train_backward_op(grad: Tensor, arg: Tensor, x_shape: list[int], x_channels_last: bool,
                                 dtype: torch.dtype, kernel_size: list[int], stride: list[int],
                                 padding: list[int]) -> Tensor:
    return max_pool2d_bwd(grad, arg, x_shape, x_channels_last, dtype, kernel_size, stride, padding)


@max_pool2d_train_backward_op.register_fake
def _(grad, arg, x_shape, x_channels_last, dtype, kernel_size, stride, padding):
    return grad.new_empty(x_shape, dtype=dtype).contiguous(memory_format=memory_format(x_channels_last))


def _setup(ctx, inputs, output):
    _save_for_backward(ctx, inputs[0], output[1], *inputs[1:])


def _backward(ctx, grad, _grad_arg):
    (arg,) = ctx.saved_tensors
    return torch.ops.fastbisenet.max_pool2d_train_backward(grad, arg, *ctx.args), None, None, None


max_pool2d_train_op.register_autograd(_backward, setup_context=_setup)


def max_pool2d(x: Tensor, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] | None = None,
               padding: int | tuple[int, int] = 0) -> Tensor:
    """``F.max_pool2d(x, kernel_size, stride, padding)`` with the same values and gradient: from the kernels
    (channels_last output), else from PyTorch's op (its layout rules, and its errors for invalid arguments)."""
    k = _pair(kernel_size)
    s = _pair(kernel_size if stride is None or (isinstance(stride, (tuple, list)) and not stride) else stride)
    p = _pair(padding)
    covered = (
        k is not None and s is not None and p is not None
        and x.dim() == 4
        and x.dtype in FLOAT_DTYPES
        and 0 < x.shape[0] <= 65535 and min(x.shape[1:]) > 0  # the batch is grid axis z
        and all(kk > 0 and ss > 0 and 0 <= pp <= kk // 2 for kk, ss, pp in zip(k, s, p, strict=True))
        and all(size + 2 * pp >= kk for size, kk, pp in zip(x.shape[2:], k, p, strict=True))
    )
    grad = torch.is_grad_enabled() and x.requires_grad
    if not covered or (grad and k[0] * k[1] > 127):  # window positions are stored as int8
        return reference.max_pool2d(x, kernel_size, stride, padding)
    if grad:
        return call(MaxPool2dFunction.apply, torch.ops.fastbisenet.max_pool2d_train, x, list(k), list(s), list(p))
    return call(max_pool2d_fwd, torch.ops.fastbisenet.max_pool2d, x, list(k), list(s), list(p))
