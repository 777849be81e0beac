"""``torch.library`` glue shared by the fused ops: how a wrapper picks its path, and layout flags.

Every fused op runs over the same tensor-level ``*_fwd``/``*_bwd`` functions in two ways:

* its ``torch.autograd.Function``: the eager path, the cheapest to dispatch (~16 us per call);
* the custom op ``torch.ops.fastbisenet.<name>`` (``torch.library.custom_op`` with a fake
  implementation and an autograd registration whose backward is the custom op
  ``fastbisenet::<name>_backward``): one opaque node that ``torch.compile`` / ``torch.export`` trace
  without a graph break, but ~50 us to dispatch eagerly, so it is used only while compiling.

A custom op cannot keep Python state between forward and backward, so the values backward needs that
forward computes (spatial means, BN statistics, pre-activations) are extra outputs of the forward op;
:func:`call` returns the first output only, which is what the ``autograd.Function`` returns.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
"""The float dtypes the kernels take (fp32 accumulation inside)."""


def call(function: Callable[..., Tensor], op: Callable[..., Any], *args: Any) -> Tensor:
    """``op(*args)`` (its first output) while ``torch.compile`` traces, else ``function(*args)``.

    ``function`` is an ``autograd.Function``'s ``apply`` (or a plain function for ops without
    autograd) taking the same arguments as the custom op ``op``; both give identical results.
    """
    if torch.compiler.is_compiling():
        out = op(*args)
        return out[0] if isinstance(out, (tuple, list)) else out
    return function(*args)


def is_channels_last(x: Tensor) -> bool:
    """``x`` is laid out channels_last (and not also NCHW-contiguous): a custom-op-friendly layout flag."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def memory_format(channels_last: bool) -> torch.memory_format:
    """The memory format a :func:`is_channels_last` flag stands for."""
    return torch.channels_last if channels_last else torch.contiguous_format


def first_order_only(backward: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate an ``autograd.Function.backward`` that runs kernels (so autograd records nothing inside):
    under ``create_graph=True`` it raises instead of returning gradients cut off from the graph (which
    would silently drop terms of a higher-order gradient, even where PyTorch's ``once_differentiable``
    lets a gradient through as a constant)."""

    @functools.wraps(backward)
    def wrapper(ctx: Any, *grads: Any) -> Any:
        if torch.is_grad_enabled():
            raise RuntimeError("fastbisenet: the fused kernels have no double backward (create_graph=True); "
                               "use backend='torch' for higher-order gradients")
        return backward(ctx, *grads)

    return wrapper
