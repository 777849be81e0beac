"""``feat * attention + feat`` (the FFM output) in one pass, and its backward.

Maps are addressed through ``(stride_n, stride_c, stride_p)`` with a flat pixel index (see
:func:`fastbisenet.kernels.channel_attention.map_strides`); channels are the fast tile dimension.
The backward writes ``dfeat = g * a + g`` and per-chunk partial sums of ``g * feat`` (for ``da``) in
the same pass; the partials are summed by ``finish_partials`` (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .channel_attention import chunk_tile, map_strides, pixel_tile_configs, split_plan


@triton.autotune(configs=pixel_tile_configs(), key=["C", "CHUNK"])
@triton.jit
def _attend_residual_kernel(
    f_ptr,  # (N, C, H, W) feat, flat-pixel strides below
    a_ptr,  # (N, C) attention, strides below
    y_ptr,  # out: (N, C, H, W) result with y's strides
    N,  # batch size
    C,  # channels
    HW,  # pixels per sample
    CHUNK,  # pixels per program
    SPLIT,  # chunks per sample
    sf_n, sf_c, sf_p,  # feat strides (sample, channel, flat pixel)
    sa_n, sa_c,  # attention strides
    sy_n, sy_c, sy_p,  # output strides
    BLOCK_P: tl.constexpr,  # pixels per tile
    BLOCK_C: tl.constexpr,  # channels per program
):
    n, _, offs_c, cmask, start, end = chunk_tile(C, HW, CHUNK, SPLIT, BLOCK_C)
    n64 = n.to(tl.int64)
    c64 = offs_c.to(tl.int64)[None, :]
    a1 = tl.load(a_ptr + n64 * sa_n + offs_c.to(tl.int64) * sa_c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    for p0 in range(start, end, BLOCK_P):
        offs_p = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)[:, None]
        mask = (offs_p < end) & cmask[None, :]
        f = tl.load(f_ptr + n64 * sf_n + c64 * sf_c + offs_p * sf_p, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + n64 * sy_n + c64 * sy_c + offs_p * sy_p, (f * a1 + f).to(y_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=pixel_tile_configs(), key=["C", "CHUNK"])
@triton.jit
def _attend_residual_bwd_kernel(
    g_ptr,  # (N, C, H, W) output gradient, flat-pixel strides below
    f_ptr,  # (N, C, H, W) feat
    a_ptr,  # (N, C) attention, strides below
    df_ptr,  # out: (N, C, H, W) gradient of feat
    part_ptr,  # out: fp32 (SPLIT, N, C) partial sums of g * feat
    N,  # batch size
    C,  # channels
    HW,  # pixels per sample
    CHUNK,  # pixels per program
    SPLIT,  # chunks per sample
    sg_n, sg_c, sg_p,  # grad strides
    sf_n, sf_c, sf_p,  # feat strides
    sa_n, sa_c,  # attention strides
    sd_n, sd_c, sd_p,  # dfeat strides
    BLOCK_P: tl.constexpr,  # pixels per tile
    BLOCK_C: tl.constexpr,  # channels per program
):
    n, s, offs_c, cmask, start, end = chunk_tile(C, HW, CHUNK, SPLIT, BLOCK_C)
    n64 = n.to(tl.int64)
    c64 = offs_c.to(tl.int64)[None, :]
    a1 = tl.load(a_ptr + n64 * sa_n + offs_c.to(tl.int64) * sa_c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    acc = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    for p0 in range(start, end, BLOCK_P):
        offs_p = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)[:, None]
        mask = (offs_p < end) & cmask[None, :]
        g = tl.load(g_ptr + n64 * sg_n + c64 * sg_c + offs_p * sg_p, mask=mask, other=0.0).to(tl.float32)
        f = tl.load(f_ptr + n64 * sf_n + c64 * sf_c + offs_p * sf_p, mask=mask, other=0.0).to(tl.float32)
        tl.store(df_ptr + n64 * sd_n + c64 * sd_c + offs_p * sd_p, (g * a1 + g).to(df_ptr.dtype.element_ty),
                 mask=mask)
        acc += g * f
    tl.store(part_ptr + (s * N + n) * C + offs_c, tl.sum(acc, axis=0), mask=cmask)


def attend_residual_fwd(feat: torch.Tensor, a: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Launch the forward; the result has feat's layout (NCHW or channels_last) and ``out_dtype``."""
    feat, sf_n, sf_c, sf_p = map_strides(feat)
    y = torch.empty_like(feat, dtype=out_dtype)
    y, sy_n, sy_c, sy_p = map_strides(y)
    n, c, h, w = feat.shape
    split, chunk = split_plan(n, h * w, c, feat.device)
    grid = lambda meta: (n * split, triton.cdiv(c, meta["BLOCK_C"]))
    _attend_residual_kernel[grid](feat, a, y, n, c, h * w, chunk, split, sf_n, sf_c, sf_p, a.stride(0), a.stride(1),
                                  sy_n, sy_c, sy_p)
    return y


def attend_residual_bwd(g: torch.Tensor, feat: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward; returns ``(dfeat, fp32 partials (SPLIT, N, C) of g * feat)``."""
    g, sg_n, sg_c, sg_p = map_strides(g)
    feat, sf_n, sf_c, sf_p = map_strides(feat)
    df = torch.empty_like(feat)
    df, sd_n, sd_c, sd_p = map_strides(df)
    n, c, h, w = feat.shape
    split, chunk = split_plan(n, h * w, c, feat.device)
    part = torch.empty((split, n, c), device=feat.device, dtype=torch.float32)
    grid = lambda meta: (n * split, triton.cdiv(c, meta["BLOCK_C"]))
    _attend_residual_bwd_kernel[grid](g, feat, a, df, part, n, c, h * w, chunk, split, sg_n, sg_c, sg_p,
                                      sf_n, sf_c, sf_p, a.stride(0), a.stride(1), sd_n, sd_c, sd_p)
    return df, part
