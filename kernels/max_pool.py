"""2-D max pooling (the ResNet stem's 3x3 / stride 2 / pad 1) without int64 indices, with backward.

PyTorch's CUDA ``max_pool2d`` always runs ``max_pool2d_with_indices`` and writes an int64 index per
output element, also in inference: for the stem of BiSeNet at 1x3x1024x2048 (64 x 512 x 1024 bf16 in,
64 x 256 x 512 out) that is 67 MB read + 17 MB written + 67 MB of indices written. In inference this
kernel writes the 17 MB of values only. In training (``ARGMAX``) it also writes, per output element, the
int8 position of the maximum inside its window (``kh * KW + kw``): 1 byte instead of 8 (at 8x3x1024x1024:
34 MB saved for backward instead of 268 MB). The backward (:func:`_max_pool_bwd_kernel`) is a gather, not
a scatter: each input element sums the gradients of the (at most ``cdiv(KH, SH) * cdiv(KW, SW)``, 4 for
the stem) windows that hold it and picked it, so there are no atomics and no zero-fill pass, and the
result is deterministic.

Semantics are PyTorch's: windows clipped to the input (padding never wins: it is ``-inf``), NaN
propagates (a window holding a NaN gives NaN), dilation 1, floor output size. The maximum is taken in
fp32 (exact for fp16/bf16/fp32 inputs) and stored in the input dtype, so results are bit-identical; the
picked element is PyTorch's too: the first maximum in row-major window order, the last NaN if any, the
first element inside the input if all are -inf.

Maps are addressed through ``(stride_n, stride_c, stride_h, stride_w)``; tiles are ``BLOCK_P`` pixels x
``BLOCK_C`` channels, channels the fast dimension (channels_last maps are read and written as
contiguous channel vectors).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .channel_attention import pixel_tile_configs, tiles_at_most


def _prune_fwd_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """With ``ARGMAX`` on 4-byte inputs, tiles of more than 16 elements per thread: every window tap is
    loaded before the compares and the int32 positions ride along, so the 64-pixel tiles used all 255
    registers and spilled 384 bytes per thread for sm_90 (triton 3.9, bench/compile_audit.py). Never
    returns an empty list (a single forced config stays)."""
    args = {**named_args, **kwargs}
    if not (args["ARGMAX"] and args["x_ptr"].element_size() >= 4):
        return configs
    return tiles_at_most(configs, 16)


@triton.autotune(configs=pixel_tile_configs(), key=["C", "H", "W", "OH", "OW", "KH", "KW", "ARGMAX"],
                 prune_configs_by={"early_config_prune": _prune_fwd_configs})
@triton.jit
def _max_pool_kernel(
    x_ptr,  # (N, C, H, W) input, strides below
    y_ptr,  # out: (N, C, OH, OW) output, strides below
    arg_ptr,  # out: int8 (N, C, OH, OW) window position of each maximum, y's strides (unused unless ARGMAX)
    C,  # channels
    H, W,  # input size
    OH, OW,  # output size
    sx_n, sx_c, sx_h, sx_w,  # input strides
    sy_n, sy_c, sy_h, sy_w,  # output strides
    KH: tl.constexpr, KW: tl.constexpr,  # window
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    ARGMAX: tl.constexpr,  # also write the int8 window position of each maximum (training)
    BLOCK_P: tl.constexpr,  # output pixels per program
    BLOCK_C: tl.constexpr,  # channels per program
):
    n = tl.program_id(2).to(tl.int64)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pmask = offs_p < OH * OW
    cmask = offs_c < C
    oh = offs_p // OW
    ow = offs_p - oh * OW
    c_off = offs_c.to(tl.int64)[None, :] * sx_c
    best = tl.full((BLOCK_P, BLOCK_C), float("-inf"), tl.float32)
    # PyTorch's index when nothing beats -inf: the window's first element inside the input
    first = tl.maximum(PAD_H - oh * STRIDE_H, 0) * KW + tl.maximum(PAD_W - ow * STRIDE_W, 0)
    arg = tl.zeros((BLOCK_P, BLOCK_C), tl.int32) + first[:, None]
    for kh in tl.static_range(KH):
        ih = oh * STRIDE_H - PAD_H + kh
        for kw in tl.static_range(KW):
            iw = ow * STRIDE_W - PAD_W + kw
            inside = pmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            off = n * sx_n + (ih.to(tl.int64) * sx_h + iw.to(tl.int64) * sx_w)[:, None] + c_off
            v = tl.load(x_ptr + off, mask=inside[:, None] & cmask[None, :], other=float("-inf")).to(tl.float32)
            take = (v > best) | (v != v)  # strict: the first maximum; every NaN: the last NaN (PyTorch)
            best = tl.where(take, v, best)
            if ARGMAX:
                arg = tl.where(take, kh * KW + kw, arg)
    y_off = n * sy_n + (oh.to(tl.int64) * sy_h + ow.to(tl.int64) * sy_w)[:, None] \
        + offs_c.to(tl.int64)[None, :] * sy_c
    mask = pmask[:, None] & cmask[None, :]
    tl.store(y_ptr + y_off, best.to(y_ptr.dtype.element_ty), mask=mask)
    if ARGMAX:
        tl.store(arg_ptr + y_off, arg.to(tl.int8), mask=mask)


@triton.autotune(configs=pixel_tile_configs(), key=["C", "H", "W", "KH", "KW", "STRIDE_H", "STRIDE_W", "PAD_H",
                                                   "PAD_W"])
@triton.jit
def _max_pool_bwd_kernel(
    g_ptr,  # (N, C, OH, OW) output gradient, strides below
    arg_ptr,  # int8 (N, C, OH, OW) window positions from the forward, strides below
    dx_ptr,  # out: (N, C, H, W) input gradient, strides below
    C,  # channels
    H, W,  # input size
    OH, OW,  # output size
    sg_n, sg_c, sg_h, sg_w,  # output-gradient strides
    sa_n, sa_c, sa_h, sa_w,  # window-position strides
    sd_n, sd_c, sd_h, sd_w,  # input-gradient strides
    KH: tl.constexpr, KW: tl.constexpr,  # window
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    BLOCK_P: tl.constexpr,  # input pixels per program
    BLOCK_C: tl.constexpr,  # channels per program
):
    """``dx[ih, iw] = sum g[oh, ow]`` over the windows ``(oh, ow)`` holding ``(ih, iw)`` whose maximum it is."""
    n = tl.program_id(2).to(tl.int64)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pmask = offs_p < H * W
    cmask = offs_c < C
    ih = offs_p // W
    iw = offs_p - ih * W
    c64 = offs_c.to(tl.int64)[None, :]
    acc = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    # windows holding row ih: oh in ((ih + PAD_H - KH) / STRIDE_H, (ih + PAD_H) / STRIDE_H], ascending
    for dh in tl.static_range((KH + STRIDE_H - 1) // STRIDE_H):
        oh = (ih + PAD_H) // STRIDE_H - ((KH + STRIDE_H - 1) // STRIDE_H - 1) + dh
        kh = ih + PAD_H - oh * STRIDE_H
        row_ok = pmask & (oh >= 0) & (oh < OH) & (kh < KH)
        for dw in tl.static_range((KW + STRIDE_W - 1) // STRIDE_W):
            ow = (iw + PAD_W) // STRIDE_W - ((KW + STRIDE_W - 1) // STRIDE_W - 1) + dw
            kw = iw + PAD_W - ow * STRIDE_W
            m = (row_ok & (ow >= 0) & (ow < OW) & (kw < KW))[:, None] & cmask[None, :]
            oh64 = oh.to(tl.int64)
            ow64 = ow.to(tl.int64)
            arg = tl.load(arg_ptr + n * sa_n + (oh64 * sa_h + ow64 * sa_w)[:, None] + c64 * sa_c, mask=m, other=-1)
            # masked by window only (not by the pick, which differs per element): vector loads
            g = tl.load(g_ptr + n * sg_n + (oh64 * sg_h + ow64 * sg_w)[:, None] + c64 * sg_c, mask=m, other=0.0)
            acc += tl.where(arg.to(tl.int32) == (kh * KW + kw)[:, None], g.to(tl.float32), 0.0)
    dx_off = n * sd_n + (ih.to(tl.int64) * sd_h + iw.to(tl.int64) * sd_w)[:, None] + c64 * sd_c
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=pmask[:, None] & cmask[None, :])


def _geometry(kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]) -> dict[str, int]:
    return dict(KH=kernel[0], KW=kernel[1], STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_H=padding[0],
                PAD_W=padding[1])


def max_pool_fwd(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                 out_hw: tuple[int, int], argmax: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch :func:`_max_pool_kernel`: the output, channels_last in ``x``'s dtype, and with ``argmax`` the
    int8 window positions of the maxima (same shape and strides; needs ``KH * KW <= 127``), else None."""
    n, c, h, w = x.shape
    oh, ow = out_hw
    y = torch.empty((n, c, oh, ow), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    arg = torch.empty_like(y, dtype=torch.int8) if argmax else None
    if y.numel() == 0:
        return y, arg
    assert not argmax or kernel[0] * kernel[1] <= 127
    grid = lambda meta: (triton.cdiv(oh * ow, meta["BLOCK_P"]), triton.cdiv(c, meta["BLOCK_C"]), n)
    _max_pool_kernel[grid](
        x, y, arg if argmax else y, c, h, w, oh, ow, *x.stride(), *y.stride(), **_geometry(kernel, stride, padding),
        ARGMAX=bool(argmax),
    )
    return y, arg


def max_pool_bwd(grad: torch.Tensor, arg: torch.Tensor, dx: torch.Tensor, kernel: tuple[int, int],
                 stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    """Launch :func:`_max_pool_bwd_kernel` into ``dx`` (allocated by the caller in the input's shape, layout
    and dtype) from the output gradient and the forward's window positions ``arg``; returns ``dx``."""
    n, c, h, w = dx.shape
    if dx.numel() == 0:
        return dx
    oh, ow = arg.shape[2:]
    grid = lambda meta: (triton.cdiv(h * w, meta["BLOCK_P"]), triton.cdiv(c, meta["BLOCK_C"]), n)
    _max_pool_bwd_kernel[grid](
        grad, arg, dx, c, h, w, oh, ow, *grad.stride(), *arg.stride(), *dx.stride(),
        **_geometry(kernel, stride, padding),
    )
    return dx
