"""Per-pixel softmax cross-entropy over the class axis of a (N, C, H, W) logits map, with backward.

Eager ``F.cross_entropy(logits.float(), labels, reduction="none")`` on bf16 logits writes an fp32 copy,
writes and saves an fp32 log-softmax (C floats per pixel), and in backward writes fp32 gradients that
are cast back: ~10 full passes over C channels. Here the forward reads the logits once and writes two
floats per pixel (the loss and the log-sum-exp); the backward reads the logits, labels, log-sum-exp
and the loss gradient once and writes the logits gradient once, recomputing the softmax from the
saved log-sum-exp. Only the logits (usually alive anyway) and the log-sum-exp are saved.

Semantics are PyTorch's ``reduction="none"``: ``loss = logsumexp(x) - x[label]`` in fp32, 0 where the
label is ``ignore_index`` (gradient 0 there too). A label outside ``[0, C)`` that is not
``ignore_index`` gives NaN loss and gradient for that pixel (PyTorch raises a device-side assert on
CUDA; a kernel cannot raise without a host sync, so the error is made loud instead of silent).

Maps are addressed through ``(stride_n, stride_c, stride_h, stride_w)`` (NCHW or channels_last);
tiles are ``BLOCK_P`` pixels x ``BLOCK_C >= C`` classes, one image per program row of the grid.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET

MAX_CLASSES: int = 256
"""Largest C one tile covers (the ops fall back to PyTorch above it: wider tiles would spill)."""


@triton.jit
def _logits_tile(x_ptr, labels_ptr, n, offs_p, offs_c, HW, W, C, s_n, s_c, s_h, s_w, ignore_index):
    """fp32 logits tile (-inf outside), int32 labels, pixel and validity masks, and offsets of the tile."""
    p_mask = offs_p < HW
    c_mask = offs_c < C
    h = offs_p // W
    w = offs_p - h * W
    off = n * s_n + (h.to(tl.int64) * s_h + w.to(tl.int64) * s_w)[:, None] + offs_c.to(tl.int64)[None, :] * s_c
    mask = p_mask[:, None] & c_mask[None, :]
    x = tl.load(x_ptr + off, mask=mask, other=float("-inf")).to(tl.float32)
    y = tl.load(labels_ptr + n * HW + offs_p, mask=p_mask, other=ignore_index).to(tl.int64)
    valid = p_mask & (y != ignore_index)
    return x, y, off, mask, p_mask, valid


@triton.jit
def ce_loss(x, y, mask, p_mask, valid, offs_c, C):
    """``(loss, lse)`` per row of an fp32 logits tile ``x`` (-inf outside ``mask``) with labels ``y``:
    ``lse - x[y]`` where ``valid``, 0 elsewhere, NaN for a valid label outside ``[0, C)``."""
    m = tl.max(x, axis=1)
    m = tl.where(p_mask, m, 0.0)  # rows outside the map are all -inf
    e = tl.where(mask, tl.exp(x - m[:, None]), 0.0)
    lse = m + tl.log(tl.where(p_mask, tl.sum(e, axis=1), 1.0))
    picked = tl.sum(tl.where(offs_c[None, :] == y[:, None], x, 0.0), axis=1)
    loss = tl.where(valid, lse - picked, 0.0)
    loss = tl.where(valid & ((y < 0) | (y >= C)), float("nan"), loss)
    return loss, lse


@triton.jit
def ce_grad(x, y, lse, g, valid, offs_c, C):
    """Logits gradient ``g * (softmax(x) - onehot(y))`` of a tile (0 on rows not ``valid``, NaN for a
    valid label outside ``[0, C)``); the softmax is recomputed from the forward's ``lse``."""
    g = tl.where(valid, g, 0.0)
    g = tl.where(valid & ((y < 0) | (y >= C)), float("nan"), g)
    soft = tl.exp(x - lse[:, None])
    return g[:, None] * (soft - tl.where(offs_c[None, :] == y[:, None], 1.0, 0.0))


@triton.jit
def _ce_fwd_kernel(
    x_ptr,  # (N, C, H, W) logits, strides below, any float dtype
    labels_ptr,  # (N, H, W) contiguous integer labels
    loss_ptr,  # out: (N, H, W) contiguous fp32 per-pixel loss
    lse_ptr,  # out: (N, H, W) contiguous fp32 log-sum-exp of the logits
    C, HW, W,  # classes, pixels per image, width
    s_n, s_c, s_h, s_w,  # logits strides
    ignore_index,  # label excluded from the loss
    BLOCK_P: tl.constexpr,  # pixels per program
    BLOCK_C: tl.constexpr,  # power of two >= C
):
    n = tl.program_id(1).to(tl.int64)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.arange(0, BLOCK_C)
    x, y, _, mask, p_mask, valid = _logits_tile(x_ptr, labels_ptr, n, offs_p, offs_c, HW, W, C,
                                                s_n, s_c, s_h, s_w, ignore_index)
    loss, lse = ce_loss(x, y, mask, p_mask, valid, offs_c, C)
    tl.store(loss_ptr + n * HW + offs_p, loss, mask=p_mask)
    tl.store(lse_ptr + n * HW + offs_p, lse, mask=p_mask)


@triton.jit
def _ce_bwd_kernel(
    x_ptr,  # (N, C, H, W) logits, strides below
    labels_ptr,  # (N, H, W) contiguous integer labels
    lse_ptr,  # (N, H, W) contiguous fp32 log-sum-exp from the forward
    g_ptr,  # (N, H, W) contiguous fp32 gradient of the per-pixel loss
    dx_ptr,  # out: (N, C, H, W) logits gradient, the logits' strides and dtype
    C, HW, W,
    s_n, s_c, s_h, s_w,
    ignore_index,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.arange(0, BLOCK_C)
    x, y, off, mask, p_mask, valid = _logits_tile(x_ptr, labels_ptr, n, offs_p, offs_c, HW, W, C,
                                                  s_n, s_c, s_h, s_w, ignore_index)
    lse = tl.load(lse_ptr + n * HW + offs_p, mask=p_mask, other=0.0)
    g = tl.load(g_ptr + n * HW + offs_p, mask=p_mask, other=0.0)
    d = ce_grad(x, y, lse, g, valid, offs_c, C)
    tl.store(dx_ptr + off, d.to(dx_ptr.dtype.element_ty), mask=mask)


def _blocks(C: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C): ~4096 elements per tile (fewer pixels under the interpreter)."""
    block_c = triton.next_power_of_2(C)
    return max(16, (1024 if INTERPRET else 4096) // block_c), block_c


def dense(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` if NCHW- or channels_last-dense, else a contiguous copy (the backward writes the gradient
    through the logits' strides into an ``empty_like`` of them, which must then have the same strides)."""
    if logits.is_contiguous() or logits.is_contiguous(memory_format=torch.channels_last):
        return logits
    return logits.contiguous()


def ce_fwd(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch :func:`_ce_fwd_kernel`; returns fp32 ``(loss, lse)``, both (N, H, W) contiguous."""
    logits = dense(logits)
    n, c, h, w = logits.shape
    labels = labels.contiguous()
    loss = torch.empty((n, h, w), device=logits.device, dtype=torch.float32)
    lse = torch.empty_like(loss)
    block_p, block_c = _blocks(c)
    grid = (triton.cdiv(h * w, block_p), n)
    _ce_fwd_kernel[grid](logits, labels, loss, lse, c, h * w, w, *logits.stride(), ignore_index,
                         BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)
    return loss, lse


def ce_bwd(grad_loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
           ignore_index: int) -> torch.Tensor:
    """Launch :func:`_ce_bwd_kernel`; the gradient has the logits' dtype and layout (dense)."""
    logits = dense(logits)
    n, c, h, w = logits.shape
    dx = torch.empty_like(logits)
    assert dx.stride() == logits.stride()
    block_p, block_c = _blocks(c)
    grid = (triton.cdiv(h * w, block_p), n)
    _ce_bwd_kernel[grid](logits, labels.contiguous(), lse, grad_loss.contiguous().float(), dx, c, h * w, w,
                         *logits.stride(), ignore_index, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)
    return dx
