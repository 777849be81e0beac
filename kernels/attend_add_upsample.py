"""``upsample(x * attention + other, size)`` in one pass, and its gather-formulated backward.

Forward: one program per (block of output pixels, block of channels); each output pixel gathers its
1 (nearest) or 4 (bilinear) source pixels, applies ``x * a + other`` to each tap and blends them in
PyTorch's order, so inputs are read once (neighbouring taps hit the cache) and the output written
once. Channels are the fast tile dimension: with channels_last tensors (channel stride 1) loads and
stores vectorise along C.

Backward: the transpose of the resize is a scatter; it is computed as a gather instead — each input
pixel visits the window of output pixels whose taps can reach it, re-derives their source indices and
weights with the forward's own code (:func:`src_index`) and sums the matching ones. No atomics: the
result is deterministic. The same pass writes ``dx = dt * a`` and ``dother`` (full) and per-chunk
partial sums of ``dt * x`` (for ``da``) and ``dt`` (for a broadcast ``other``).

``MODE``: 0 = PyTorch's legacy ``nearest`` (``src = min(floor(dst * in / out), in - 1)`` in fp32),
1 = bilinear with ``ALIGN`` = align_corners.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl

from .channel_attention import configs, split_plan, tiles_at_most

NEAREST, BILINEAR = 0, 1


@triton.jit
def src_index(
    o,  # int32 tensor of output indices along one dim
    in_size,  # input size along that dim
    scale,  # fp32 scale as PyTorch computes it (in/out, or (in-1)/(out-1) for align_corners)
    MODE: tl.constexpr,  # NEAREST or BILINEAR
    ALIGN: tl.constexpr,  # align_corners (bilinear only)
):
    """``(i0, i1, l0, l1)``: source indices and weights (``out = l0 * in[i0] + l1 * in[i1]``)."""
    of = o.to(tl.float32)
    if MODE == 0:
        i0 = tl.minimum(tl.floor(of * scale).to(tl.int32), in_size - 1)
        l0 = tl.zeros_like(of) + 1.0
        return i0, i0, l0, l0 * 0.0
    else:
        if ALIGN:
            src = of * scale
        else:
            src = tl.maximum(scale * (of + 0.5) - 0.5, 0.0)
        i0 = tl.minimum(src.to(tl.int32), in_size - 1)
        l1 = src - i0.to(tl.float32)
        i1 = i0 + (i0 < in_size - 1).to(tl.int32)
        return i0, i1, 1.0 - l1, l1


@triton.jit
def _tap(
    xb,  # [BLOCK_P, BLOCK_C] pointers to x[n, c, 0, 0]
    ob,  # [BLOCK_P, BLOCK_C] pointers to other[n, c, 0, 0] (used when OTHER_FULL)
    a,  # [BLOCK_P, BLOCK_C] fp32 attention
    oth,  # [BLOCK_P, BLOCK_C] fp32 broadcast other (used unless OTHER_FULL)
    h,  # [BLOCK_P] source rows
    w,  # [BLOCK_P] source columns
    sx_h,  # x stride along H
    sx_w,  # x stride along W
    so_h,  # other stride along H
    so_w,  # other stride along W
    mask,  # [BLOCK_P, BLOCK_C] load mask
    OTHER_FULL: tl.constexpr,  # other has x's shape (else it is (N, C, 1, 1))
):
    """fp32 ``x * a + other`` at source pixel (h, w)."""
    x = tl.load(xb + (h.to(tl.int64) * sx_h + w.to(tl.int64) * sx_w)[:, None], mask=mask, other=0.0)
    t = x.to(tl.float32) * a
    if OTHER_FULL:
        o = tl.load(ob + (h.to(tl.int64) * so_h + w.to(tl.int64) * so_w)[:, None], mask=mask, other=0.0)
        return t + o.to(tl.float32)
    else:
        return t + oth


_FWD_CONFIGS = [
    triton.Config({"BLOCK_P": 32, "BLOCK_C": 64}, num_warps=4),
    triton.Config({"BLOCK_P": 64, "BLOCK_C": 64}, num_warps=4),
    triton.Config({"BLOCK_P": 32, "BLOCK_C": 128}, num_warps=4),
    triton.Config({"BLOCK_P": 64, "BLOCK_C": 128}, num_warps=8),
]


def _prune_fwd_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Bilinear on 4-byte inputs: tiles of at most 16 elements per thread (four taps of ``x`` and of a full
    ``other`` are live at once: the larger tiles used 255 registers and spilled 72-96 B per thread for sm_90,
    triton 3.6 and 3.9; bf16 did not spill; ``bench/compile_audit.py --only upsample-modes``)."""
    args = {**named_args, **kwargs}
    if args["MODE"] == BILINEAR and args["x_ptr"].element_size() >= 4:
        return tiles_at_most(configs, 16)
    return configs


def _prune_bwd_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Bilinear: tiles of at most 16 elements per thread (the 64x64 tile spilled 88-224 B per thread for sm_90
    with triton 3.6, 18-74 of the spill instructions inside the window loop, bf16 and fp32; same audit)."""
    args = {**named_args, **kwargs}
    return tiles_at_most(configs, 16) if args["MODE"] == BILINEAR else configs


@triton.autotune(configs=configs(_FWD_CONFIGS), key=["C", "OH", "OW", "MODE", "OTHER_FULL"],
                 prune_configs_by={"early_config_prune": _prune_fwd_configs})
@triton.jit
def _attend_add_upsample_kernel(
    x_ptr,  # (N, C, IH, IW) input, any strides
    a_ptr,  # (N, C, 1, 1) attention
    o_ptr,  # other: (N, C, IH, IW) or (N, C, 1, 1)
    y_ptr,  # out: (N, C, OH, OW) result, any strides (channels_last from the launcher)
    C,  # channels
    IH,  # input height
    IW,  # input width
    OH,  # output height
    OW,  # output width
    P,  # N * OH * OW output pixels
    scale_h,  # fp32 source scale along H (see src_index)
    scale_w,  # fp32 source scale along W
    sx_n, sx_c, sx_h, sx_w,  # x strides
    sa_n, sa_c,  # attention strides
    so_n, so_c, so_h, so_w,  # other strides (H/W unused when broadcast)
    sy_n, sy_c, sy_h, sy_w,  # output strides
    MODE: tl.constexpr,  # NEAREST or BILINEAR
    ALIGN: tl.constexpr,  # align_corners (bilinear only)
    OTHER_FULL: tl.constexpr,  # other has x's shape
    BLOCK_P: tl.constexpr,  # output pixels per program
    BLOCK_C: tl.constexpr,  # channels per program
):
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pmask = offs_p < P
    cmask = offs_c < C
    mask = pmask[:, None] & cmask[None, :]
    n = offs_p // (OH * OW)
    r = offs_p - n * (OH * OW)
    oh = r // OW
    ow = r - oh * OW
    n64 = n.to(tl.int64)[:, None]
    c64 = offs_c.to(tl.int64)[None, :]
    a = tl.load(a_ptr + n64 * sa_n + c64 * sa_c, mask=mask, other=0.0).to(tl.float32)
    xb = x_ptr + n64 * sx_n + c64 * sx_c
    ob = o_ptr + n64 * so_n + c64 * so_c
    if OTHER_FULL:
        oth = a
    else:
        oth = tl.load(ob, mask=mask, other=0.0).to(tl.float32)
    h0, h1, lh0, lh1 = src_index(oh, IH, scale_h, MODE, ALIGN)
    w0, w1, lw0, lw1 = src_index(ow, IW, scale_w, MODE, ALIGN)
    if MODE == 0:
        out = _tap(xb, ob, a, oth, h0, w0, sx_h, sx_w, so_h, so_w, mask, OTHER_FULL)
    else:
        t00 = _tap(xb, ob, a, oth, h0, w0, sx_h, sx_w, so_h, so_w, mask, OTHER_FULL)
        t01 = _tap(xb, ob, a, oth, h0, w1, sx_h, sx_w, so_h, so_w, mask, OTHER_FULL)
        t10 = _tap(xb, ob, a, oth, h1, w0, sx_h, sx_w, so_h, so_w, mask, OTHER_FULL)
        t11 = _tap(xb, ob, a, oth, h1, w1, sx_h, sx_w, so_h, so_w, mask, OTHER_FULL)
        lw0 = lw0[:, None]
        lw1 = lw1[:, None]
        out = lh0[:, None] * (lw0 * t00 + lw1 * t01) + lh1[:, None] * (lw0 * t10 + lw1 * t11)
    y_off = n64 * sy_n + c64 * sy_c + (oh.to(tl.int64) * sy_h + ow.to(tl.int64) * sy_w)[:, None]
    tl.store(y_ptr + y_off, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _window_weight(
    o,  # [BLOCK_P] candidate output indices along one dim
    i,  # [BLOCK_P] input index receiving the gradient
    in_size,  # input size along the dim
    out_size,  # output size along the dim
    scale,  # fp32 source scale (as in the forward)
    MODE: tl.constexpr,  # NEAREST or BILINEAR
    ALIGN: tl.constexpr,  # align_corners
):
    """Weight with which output index ``o`` reads input index ``i`` in the forward (0 if none)."""
    i0, i1, l0, l1 = src_index(o, in_size, scale, MODE, ALIGN)
    wgt = tl.where(i0 == i, l0, 0.0) + tl.where(i1 == i, l1, 0.0)
    return tl.where(o < out_size, wgt, 0.0)


@triton.autotune(
    configs=configs([
        triton.Config({"BLOCK_P": 32, "BLOCK_C": 64}, num_warps=4),
        triton.Config({"BLOCK_P": 64, "BLOCK_C": 64}, num_warps=4),
        triton.Config({"BLOCK_P": 16, "BLOCK_C": 128}, num_warps=4),
    ]),
    key=["C", "OH", "OW", "CHUNK", "MODE", "OTHER_FULL"],
    prune_configs_by={"early_config_prune": _prune_bwd_configs},
)
@triton.jit
def _attend_add_upsample_bwd_kernel(
    g_ptr,  # (N, C, OH, OW) output gradient, any strides
    x_ptr,  # (N, C, IH, IW) forward input x
    a_ptr,  # (N, C, 1, 1) attention
    dx_ptr,  # out: (N, C, IH, IW) gradient of x
    do_ptr,  # out: (N, C, IH, IW) gradient of a full-size other (unused unless OTHER_FULL)
    part_ptr,  # out: fp32 (2, SPLIT, N, C) partial sums of dt * x and of dt
    N,  # batch size
    C,  # channels
    IH, IW,  # input size
    OH, OW,  # output size
    CHUNK,  # input pixels per program
    SPLIT,  # chunks per sample
    scale_h, inv_h, off_h, WIN_H,  # H: forward scale, 1/scale (0 if scale is 0), src offset, window
    scale_w, inv_w, off_w, WIN_W,  # the same along W
    sg_n, sg_c, sg_h, sg_w,  # grad strides
    sx_n, sx_c, sx_h, sx_w,  # x strides
    sa_n, sa_c,  # attention strides
    sdx_n, sdx_c, sdx_h, sdx_w,  # dx strides
    sdo_n, sdo_c, sdo_h, sdo_w,  # dother strides
    MODE: tl.constexpr,  # NEAREST or BILINEAR
    ALIGN: tl.constexpr,  # align_corners
    OTHER_FULL: tl.constexpr,  # other has x's shape
    BLOCK_P: tl.constexpr,  # input pixels per tile
    BLOCK_C: tl.constexpr,  # channels per program
):
    pid = tl.program_id(0)
    n = pid // SPLIT
    s = pid % SPLIT
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    c64 = offs_c.to(tl.int64)[None, :]
    n64 = n.to(tl.int64)
    a = tl.load(a_ptr + n64 * sa_n + offs_c.to(tl.int64) * sa_c, mask=cmask, other=0.0).to(tl.float32)
    gb = g_ptr + n64 * sg_n + c64 * sg_c
    REACH: tl.constexpr = 0 if MODE == 0 else 1
    acc_da = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    acc_do = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    start = s * CHUNK
    end = tl.minimum(start + CHUNK, IH * IW)
    for p0 in range(start, end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        pmask = offs_p < end
        mask = pmask[:, None] & cmask[None, :]
        ih = offs_p // IW
        iw = offs_p - ih * IW
        lo_h = tl.maximum(tl.floor((ih - REACH - off_h) * inv_h).to(tl.int32), 0)
        lo_w = tl.maximum(tl.floor((iw - REACH - off_w) * inv_w).to(tl.int32), 0)
        dt = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
        for kh in range(WIN_H):
            oh = lo_h + kh
            wh = _window_weight(oh, ih, IH, OH, scale_h, MODE, ALIGN)
            for kw in range(WIN_W):
                ow = lo_w + kw
                wgt = wh * _window_weight(ow, iw, IW, OW, scale_w, MODE, ALIGN)
                m = (pmask & (wgt != 0.0))[:, None] & cmask[None, :]
                g_off = (oh.to(tl.int64) * sg_h + ow.to(tl.int64) * sg_w)[:, None]
                dt += wgt[:, None] * tl.load(gb + g_off, mask=m, other=0.0).to(tl.float32)
        ih64 = ih.to(tl.int64)
        iw64 = iw.to(tl.int64)
        dx_off = n64 * sdx_n + c64 * sdx_c + (ih64 * sdx_h + iw64 * sdx_w)[:, None]
        tl.store(dx_ptr + dx_off, (dt * a[None, :]).to(dx_ptr.dtype.element_ty), mask=mask)
        if OTHER_FULL:
            do_off = n64 * sdo_n + c64 * sdo_c + (ih64 * sdo_h + iw64 * sdo_w)[:, None]
            tl.store(do_ptr + do_off, dt.to(do_ptr.dtype.element_ty), mask=mask)
        else:
            acc_do += dt
        x = tl.load(x_ptr + n64 * sx_n + c64 * sx_c + (ih64 * sx_h + iw64 * sx_w)[:, None], mask=mask, other=0.0)
        acc_da += dt * x.to(tl.float32)
    tl.store(part_ptr + (s * N + n) * C + offs_c, tl.sum(acc_da, axis=0), mask=cmask)
    if not OTHER_FULL:
        tl.store(part_ptr + ((SPLIT + s) * N + n) * C + offs_c, tl.sum(acc_do, axis=0), mask=cmask)


def dim_params(in_size: int, out_size: int, mode: int, align: bool) -> tuple[float, float, float, int]:
    """``(scale, inv, off, win)`` for one dim: PyTorch's fp32 source scale, its inverse, the source
    offset (``src = o * scale + off`` before clamping) and the backward window length."""
    f32 = np.float32
    if mode == BILINEAR and align:
        scale = f32(in_size - 1) / f32(out_size - 1) if out_size > 1 else f32(0.0)
        off = 0.0
    else:
        scale = f32(in_size) / f32(out_size)
        off = 0.5 * float(scale) - 0.5 if mode == BILINEAR else 0.0
    reach = 0 if mode == NEAREST else 1
    if scale > 0:
        inv = 1.0 / float(scale)
        k = int(inv)
        if mode == NEAREST and k == inv and k & (k - 1) == 0 and out_size == in_size * k:
            # exact power-of-two nearest upsampling (the context path's 2x): o * scale is exact in fp32, so
            # input i is read by outputs [i * k, i * k + k) exactly; the general window below walks k + 2
            # taps per dim (16 taps for 4 live at 2x)
            win = k
        else:
            win = min(out_size, math.ceil((1 + reach) * inv) + 2)
    else:
        inv, win = 0.0, out_size
    return float(scale), inv, off, win


def _s4(t: torch.Tensor) -> tuple[int, int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def attend_add_upsample_fwd(
    x: torch.Tensor, a: torch.Tensor, other: torch.Tensor, size: tuple[int, int], mode: int, align: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Launch the forward; returns a channels_last (N, C, OH, OW) tensor of ``out_dtype``."""
    n, c, ih, iw = x.shape
    oh, ow = size
    y = torch.empty((n, c, oh, ow), device=x.device, dtype=out_dtype, memory_format=torch.channels_last)
    full = other.shape[2:] == x.shape[2:] and other.shape[2:] != (1, 1)
    scale_h = dim_params(ih, oh, mode, align)[0]
    scale_w = dim_params(iw, ow, mode, align)[0]
    p = n * oh * ow
    grid = lambda meta: (triton.cdiv(p, meta["BLOCK_P"]), triton.cdiv(c, meta["BLOCK_C"]))
    _attend_add_upsample_kernel[grid](
        x, a, other, y, c, ih, iw, oh, ow, p, scale_h, scale_w,
        *_s4(x), a.stride(0), a.stride(1), *_s4(other), *_s4(y),
        MODE=mode, ALIGN=bool(align), OTHER_FULL=full,
    )
    return y


def attend_add_upsample_bwd(
    g: torch.Tensor, x: torch.Tensor, a: torch.Tensor, other_full: bool, other_dtype: torch.dtype, mode: int,
    align: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the backward; returns ``(dx, fp32 partials (2, SPLIT, N, C), dother_full or None)``."""
    n, c, ih, iw = x.shape
    oh, ow = g.shape[2:]
    dx = torch.empty_like(x)
    dother = torch.empty_like(x, dtype=other_dtype) if other_full else None
    split, chunk = split_plan(n, ih * iw, c, x.device)
    part = torch.empty((2, split, n, c), device=x.device, dtype=torch.float32)
    sh, ih_inv, off_h, win_h = dim_params(ih, oh, mode, align)
    sw, iw_inv, off_w, win_w = dim_params(iw, ow, mode, align)
    do = dother if dother is not None else dx
    grid = lambda meta: (n * split, triton.cdiv(c, meta["BLOCK_C"]))
    _attend_add_upsample_bwd_kernel[grid](
        g, x, a, dx, do, part, n, c, ih, iw, oh, ow, chunk, split,
        sh, ih_inv, off_h, win_h, sw, iw_inv, off_w, win_w,
        *_s4(g), *_s4(x), a.stride(0), a.stride(1), *_s4(dx), *_s4(do),
        MODE=mode, ALIGN=bool(align), OTHER_FULL=other_full,
    )
    return dx, part, dother
