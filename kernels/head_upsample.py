"""Segmentation head: 1x1 classifier at low resolution, then bilinear upsample (or upsample + argmax).

Order and fusion, with the numbers of the v1 main head at 1x3x1024x2048 (features at 1/8: 128x256 =
32,768 pixels x 256 channels, 19 classes, output 2,097,152 pixels):

* Bilinear resize is linear and its weights sum to 1, so ``up(W x + b) = W up(x) + b``: the 1x1 at
  low resolution costs 2*32,768*256*19 = 0.32 GFLOP; at full resolution it would be 20.4 GFLOP (64x)
  and would read 64x more (interpolated) features.
* Bytes (bf16 features, fp32 low-res logits): features read 16.8 MB; low-res logits written and read
  back 2 x 2.5 MB (mostly from L2); full-res bf16 logits written 79.7 MB (159 MB fp32). A single
  kernel fusing the 1x1 into the upsample would save only the 5 MB round trip (~5%) while every output
  tile would need the 1x1 of its source pixels plus a halo (recomputed or shared across tiles), so the
  cheap order is two kernels: :func:`head_conv1x1` (a small GEMM) then :func:`upsample_logits`.
* ``argmax`` is fused into the upsample: per output pixel all classes sit in one tile row, the
  full-resolution logits never exist, and the 79.7 MB write becomes a 8.4 MB int32 map.

Low-res logits are an fp32 (N, h*w, n_classes) buffer (classes contiguous, padded tiles masked).
Backward: the upsample's transpose is a gather (same window scheme as ``attend_add_upsample``), then
``dx = dz @ W`` and ``dW = dz^T x`` / ``db = sum dz`` from per-chunk partials (deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attend_add_upsample import BILINEAR, _window_weight, dim_params, src_index
from .channel_attention import configs, finish_partials, map_strides, split_plan


def _cls_block(n_classes: int) -> int:
    return max(16, triton.next_power_of_2(n_classes))


@triton.autotune(
    configs=configs(
        [
            triton.Config({"BLOCK_P": 64, "BLOCK_K": 32}, num_warps=4),
            triton.Config({"BLOCK_P": 128, "BLOCK_K": 32}, num_warps=4),
            triton.Config({"BLOCK_P": 128, "BLOCK_K": 64}, num_warps=8),
        ],
        triton.Config({"BLOCK_P": 128, "BLOCK_K": 64}, num_warps=4),
    ),
    key=["K", "NCLS"],
)
@triton.jit
def _head_conv1x1_kernel(
    x_ptr,  # (N, K, h, w) features, flat-pixel strides below
    w_ptr,  # (NCLS, K) classifier weight, strides below
    b_ptr,  # (NCLS,) bias (unused unless HAS_BIAS)
    z_ptr,  # out: fp32 (N, HW, NCLS) low-res logits, contiguous
    HW,  # low-res pixels per sample
    K,  # feature channels
    NCLS,  # classes
    sx_n, sx_c, sx_p,  # feature strides (sample, channel, flat pixel)
    sw_o, sw_i,  # weight strides (class, channel)
    HAS_BIAS: tl.constexpr,  # add the bias
    BLOCK_P: tl.constexpr,  # pixels per program
    BLOCK_K: tl.constexpr,  # channels per reduction step
    BLOCK_CLS: tl.constexpr,  # >= NCLS, power of two, >= 16
):
    n = tl.program_id(1)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_o = tl.arange(0, BLOCK_CLS)
    pmask = offs_p < HW
    omask = offs_o < NCLS
    xb = x_ptr + n.to(tl.int64) * sx_n + offs_p.to(tl.int64)[:, None] * sx_p
    acc = tl.zeros((BLOCK_P, BLOCK_CLS), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < K
        x = tl.load(xb + offs_k[None, :] * sx_c, mask=pmask[:, None] & kmask[None, :], other=0.0)
        wt = tl.load(w_ptr + offs_k[:, None] * sw_i + offs_o[None, :] * sw_o, mask=kmask[:, None] & omask[None, :],
                     other=0.0)
        acc += tl.dot(x.to(tl.float32), wt.to(tl.float32), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_o, mask=omask, other=0.0).to(tl.float32)[None, :]
    z_off = (n * HW + offs_p).to(tl.int64)[:, None] * NCLS + offs_o[None, :]
    tl.store(z_ptr + z_off, acc, mask=pmask[:, None] & omask[None, :])


@triton.autotune(
    configs=configs(
        [
            triton.Config({"BLOCK_P": 64}, num_warps=4),
            triton.Config({"BLOCK_P": 128}, num_warps=4),
            triton.Config({"BLOCK_P": 256}, num_warps=8),
        ],
        triton.Config({"BLOCK_P": 256}, num_warps=4),
    ),
    key=["NCLS", "OH", "OW"],
)
@triton.jit
def _upsample_logits_kernel(
    z_ptr,  # fp32 (N, IH*IW, NCLS) low-res logits
    y_ptr,  # out: (N, NCLS, OH, OW) logits with the strides below, or int32 (N, OH, OW) when ARGMAX
    IH, IW,  # low-res size
    OH, OW,  # output size
    NCLS,  # classes
    scale_h,  # fp32 bilinear source scale along H
    scale_w,  # fp32 bilinear source scale along W
    sy_n, sy_c, sy_h, sy_w,  # output strides (logits; for ARGMAX the map is contiguous)
    ALIGN: tl.constexpr,  # align_corners
    ARGMAX: tl.constexpr,  # write the int32 argmax over classes instead of the logits
    BLOCK_P: tl.constexpr,  # output pixels per program
    BLOCK_CLS: tl.constexpr,  # >= NCLS, power of two
):
    n = tl.program_id(1)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_o = tl.arange(0, BLOCK_CLS)
    pmask = offs_p < OH * OW
    omask = offs_o < NCLS
    mask = pmask[:, None] & omask[None, :]
    oh = offs_p // OW
    ow = offs_p - oh * OW
    h0, h1, lh0, lh1 = src_index(oh, IH, scale_h, 1, ALIGN)
    w0, w1, lw0, lw1 = src_index(ow, IW, scale_w, 1, ALIGN)
    zb = z_ptr + (n * IH * IW).to(tl.int64) * NCLS + offs_o[None, :]
    r0 = (h0 * IW).to(tl.int64)
    r1 = (h1 * IW).to(tl.int64)
    t00 = tl.load(zb + ((r0 + w0) * NCLS)[:, None], mask=mask, other=0.0)
    t01 = tl.load(zb + ((r0 + w1) * NCLS)[:, None], mask=mask, other=0.0)
    t10 = tl.load(zb + ((r1 + w0) * NCLS)[:, None], mask=mask, other=0.0)
    t11 = tl.load(zb + ((r1 + w1) * NCLS)[:, None], mask=mask, other=0.0)
    lw0 = lw0[:, None]
    lw1 = lw1[:, None]
    v = lh0[:, None] * (lw0 * t00 + lw1 * t01) + lh1[:, None] * (lw0 * t10 + lw1 * t11)
    if ARGMAX:
        v = tl.where(omask[None, :], v, float("-inf"))
        best = tl.max(v, axis=1)
        cls = tl.zeros((BLOCK_P, BLOCK_CLS), tl.int32) + offs_o[None, :]
        first_max = tl.min(tl.where(v == best[:, None], cls, BLOCK_CLS), axis=1)
        first_nan = tl.min(tl.where(v != v, cls, BLOCK_CLS), axis=1)  # torch.argmax: NaN is the maximum
        idx = tl.where(first_nan < BLOCK_CLS, first_nan, first_max)
        tl.store(y_ptr + n.to(tl.int64) * OH * OW + offs_p, idx, mask=pmask)
    else:
        y_off = n.to(tl.int64) * sy_n + offs_o.to(tl.int64)[None, :] * sy_c \
            + (oh.to(tl.int64) * sy_h + ow.to(tl.int64) * sy_w)[:, None]
        tl.store(y_ptr + y_off, v.to(y_ptr.dtype.element_ty), mask=mask)


@triton.autotune(
    configs=configs(
        [triton.Config({"BLOCK_P": 64}, num_warps=4), triton.Config({"BLOCK_P": 128}, num_warps=4)],
        triton.Config({"BLOCK_P": 128}, num_warps=4),
    ),
    key=["NCLS", "OH", "OW"],
)
@triton.jit
def _upsample_logits_bwd_kernel(
    g_ptr,  # (N, NCLS, OH, OW) gradient of the logits, strides below
    dz_ptr,  # out: fp32 (N, IH*IW, NCLS) gradient of the low-res logits
    IH, IW,  # low-res size
    OH, OW,  # output size
    NCLS,  # classes
    scale_h, inv_h, off_h, WIN_H,  # H: forward scale, 1/scale (0 if scale is 0), src offset, window
    scale_w, inv_w, off_w, WIN_W,  # the same along W
    sg_n, sg_c, sg_h, sg_w,  # gradient strides
    ALIGN: tl.constexpr,  # align_corners
    BLOCK_P: tl.constexpr,  # low-res pixels per program
    BLOCK_CLS: tl.constexpr,  # >= NCLS, power of two
):
    n = tl.program_id(1)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_o = tl.arange(0, BLOCK_CLS)
    pmask = offs_p < IH * IW
    omask = offs_o < NCLS
    ih = offs_p // IW
    iw = offs_p - ih * IW
    lo_h = tl.maximum(tl.floor((ih - 1 - off_h) * inv_h).to(tl.int32), 0)
    lo_w = tl.maximum(tl.floor((iw - 1 - off_w) * inv_w).to(tl.int32), 0)
    gb = g_ptr + n.to(tl.int64) * sg_n + offs_o.to(tl.int64)[None, :] * sg_c
    acc = tl.zeros((BLOCK_P, BLOCK_CLS), tl.float32)
    for kh in range(WIN_H):
        oh = lo_h + kh
        wh = _window_weight(oh, ih, IH, OH, scale_h, 1, ALIGN)
        for kw in range(WIN_W):
            ow = lo_w + kw
            wgt = wh * _window_weight(ow, iw, IW, OW, scale_w, 1, ALIGN)
            m = (pmask & (wgt != 0.0))[:, None] & omask[None, :]
            g = tl.load(gb + (oh.to(tl.int64) * sg_h + ow.to(tl.int64) * sg_w)[:, None], mask=m, other=0.0)
            acc += wgt[:, None] * g.to(tl.float32)
    dz_off = (n * IH * IW + offs_p).to(tl.int64)[:, None] * NCLS + offs_o[None, :]
    tl.store(dz_ptr + dz_off, acc, mask=pmask[:, None] & omask[None, :])


@triton.autotune(
    configs=configs(
        [
            triton.Config({"BLOCK_P": 64, "BLOCK_K": 64}, num_warps=4),
            triton.Config({"BLOCK_P": 128, "BLOCK_K": 64}, num_warps=4),
        ],
        triton.Config({"BLOCK_P": 128, "BLOCK_K": 64}, num_warps=4),
    ),
    key=["K", "NCLS"],
)
@triton.jit
def _head_dx_kernel(
    dz_ptr,  # fp32 (N, HW, NCLS) gradient of the low-res logits
    w_ptr,  # (NCLS, K) classifier weight, strides below
    dx_ptr,  # out: (N, K, h, w) feature gradient, flat-pixel strides below
    HW,  # low-res pixels per sample
    K,  # feature channels
    NCLS,  # classes
    sw_o, sw_i,  # weight strides (class, channel)
    sd_n, sd_c, sd_p,  # dx strides (sample, channel, flat pixel)
    BLOCK_P: tl.constexpr,  # pixels per program
    BLOCK_K: tl.constexpr,  # channels per program
    BLOCK_CLS: tl.constexpr,  # >= NCLS, power of two, >= 16
):
    n = tl.program_id(2)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_o = tl.arange(0, BLOCK_CLS)
    pmask = offs_p < HW
    kmask = offs_k < K
    omask = offs_o < NCLS
    dz = tl.load(dz_ptr + (n * HW + offs_p).to(tl.int64)[:, None] * NCLS + offs_o[None, :],
                 mask=pmask[:, None] & omask[None, :], other=0.0)
    w = tl.load(w_ptr + offs_o[:, None] * sw_o + offs_k[None, :] * sw_i, mask=omask[:, None] & kmask[None, :],
                other=0.0).to(tl.float32)
    dx = tl.dot(dz, w, input_precision="ieee")
    dx_off = n.to(tl.int64) * sd_n + offs_p.to(tl.int64)[:, None] * sd_p + offs_k.to(tl.int64)[None, :] * sd_c
    tl.store(dx_ptr + dx_off, dx.to(dx_ptr.dtype.element_ty), mask=pmask[:, None] & kmask[None, :])


@triton.autotune(
    configs=configs(
        [
            triton.Config({"BLOCK_P": 64, "BLOCK_K": 64}, num_warps=4),
            triton.Config({"BLOCK_P": 128, "BLOCK_K": 64}, num_warps=4),
        ],
        triton.Config({"BLOCK_P": 128, "BLOCK_K": 64}, num_warps=4),
    ),
    key=["K", "NCLS", "CHUNK"],
)
@triton.jit
def _head_dw_kernel(
    dz_ptr,  # fp32 (N, HW, NCLS) gradient of the low-res logits
    x_ptr,  # (N, K, h, w) features, flat-pixel strides below
    pw_ptr,  # out: fp32 (SPLIT * N, NCLS, K) partial weight gradients
    pb_ptr,  # out: fp32 (SPLIT * N, NCLS) partial bias gradients (unused unless HAS_BIAS)
    N,  # batch size
    HW,  # low-res pixels per sample
    K,  # feature channels
    NCLS,  # classes
    CHUNK,  # pixels per program
    SPLIT,  # chunks per sample
    sx_n, sx_c, sx_p,  # feature strides
    HAS_BIAS: tl.constexpr,  # also reduce the bias gradient (channel-block 0 only)
    BLOCK_P: tl.constexpr,  # pixels per reduction step
    BLOCK_K: tl.constexpr,  # channels per program
    BLOCK_CLS: tl.constexpr,  # >= NCLS, power of two, >= 16
):
    pid = tl.program_id(0)
    n = pid // SPLIT
    s = pid % SPLIT
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_o = tl.arange(0, BLOCK_CLS)
    kmask = offs_k < K
    omask = offs_o < NCLS
    xb = x_ptr + n.to(tl.int64) * sx_n + offs_k.to(tl.int64)[None, :] * sx_c
    acc = tl.zeros((BLOCK_CLS, BLOCK_K), tl.float32)
    accb = tl.zeros((BLOCK_CLS,), tl.float32)
    start = s * CHUNK
    end = tl.minimum(start + CHUNK, HW)
    for p0 in range(start, end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        pmask = offs_p < end
        dzt = tl.load(dz_ptr + (n * HW + offs_p).to(tl.int64)[None, :] * NCLS + offs_o[:, None],
                      mask=omask[:, None] & pmask[None, :], other=0.0)
        x = tl.load(xb + offs_p.to(tl.int64)[:, None] * sx_p, mask=pmask[:, None] & kmask[None, :], other=0.0)
        acc += tl.dot(dzt, x.to(tl.float32), input_precision="ieee")
        if HAS_BIAS:
            accb += tl.sum(dzt, axis=1)
    row = s * N + n
    tl.store(pw_ptr + (row * NCLS + offs_o[:, None]) * K + offs_k[None, :], acc,
             mask=omask[:, None] & kmask[None, :])
    if HAS_BIAS and tl.program_id(1) == 0:
        tl.store(pb_ptr + row * NCLS + offs_o, accb, mask=omask)


def head_conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 low-res logits (N, h*w, n_classes) of the 1x1 classifier ``weight`` (n_classes, K, 1, 1)."""
    x, sx_n, sx_c, sx_p = map_strides(x)
    n, k, h, w = x.shape
    ncls = weight.shape[0]
    z = torch.empty((n, h * w, ncls), device=x.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(h * w, meta["BLOCK_P"]), n)
    _head_conv1x1_kernel[grid](
        x, weight, bias if bias is not None else weight, z, h * w, k, ncls, sx_n, sx_c, sx_p,
        weight.stride(0), weight.stride(1), HAS_BIAS=bias is not None, BLOCK_CLS=_cls_block(ncls),
    )
    return z


def upsample_logits(
    z: torch.Tensor, in_hw: tuple[int, int], size: tuple[int, int], align: bool, argmax: bool, dtype: torch.dtype
) -> torch.Tensor:
    """Bilinear upsample of low-res logits ``z``: NCHW-contiguous logits of ``dtype``, or the int32 argmax."""
    n, _, ncls = z.shape
    ih, iw = in_hw
    oh, ow = size
    if argmax:
        y = torch.empty((n, oh, ow), device=z.device, dtype=torch.int32)
        strides = (0, 0, 0, 0)
    else:
        y = torch.empty((n, ncls, oh, ow), device=z.device, dtype=dtype)
        strides = y.stride()
    scale_h = dim_params(ih, oh, BILINEAR, align)[0]
    scale_w = dim_params(iw, ow, BILINEAR, align)[0]
    grid = lambda meta: (triton.cdiv(oh * ow, meta["BLOCK_P"]), n)
    _upsample_logits_kernel[grid](
        z, y, ih, iw, oh, ow, ncls, scale_h, scale_w, *strides,
        ALIGN=bool(align), ARGMAX=bool(argmax), BLOCK_CLS=max(2, triton.next_power_of_2(ncls)),
    )
    return y


def upsample_logits_bwd(g: torch.Tensor, in_hw: tuple[int, int], align: bool) -> torch.Tensor:
    """fp32 gradient (N, h*w, n_classes) of the low-res logits from the logits' gradient ``g``."""
    n, ncls, oh, ow = g.shape
    ih, iw = in_hw
    dz = torch.empty((n, ih * iw, ncls), device=g.device, dtype=torch.float32)
    sh, inv_h, off_h, win_h = dim_params(ih, oh, BILINEAR, align)
    sw, inv_w, off_w, win_w = dim_params(iw, ow, BILINEAR, align)
    grid = lambda meta: (triton.cdiv(ih * iw, meta["BLOCK_P"]), n)
    _upsample_logits_bwd_kernel[grid](
        g, dz, ih, iw, oh, ow, ncls, sh, inv_h, off_h, win_h, sw, inv_w, off_w, win_w, *g.stride(),
        ALIGN=bool(align), BLOCK_CLS=max(2, triton.next_power_of_2(ncls)),
    )
    return dz


def head_conv1x1_bwd(
    dz: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool, bias_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(dx, dW (n_classes, K), db)`` of the low-res classifier from ``dz`` (fp32 (N, h*w, n_classes))."""
    x, sx_n, sx_c, sx_p = map_strides(x)
    n, k, h, w = x.shape
    ncls = weight.shape[0]
    dx = torch.empty_like(x)
    dx, sd_n, sd_c, sd_p = map_strides(dx)
    block_cls = _cls_block(ncls)
    grid = lambda meta: (triton.cdiv(h * w, meta["BLOCK_P"]), triton.cdiv(k, meta["BLOCK_K"]), n)
    _head_dx_kernel[grid](dz, weight, dx, h * w, k, ncls, weight.stride(0), weight.stride(1), sd_n, sd_c, sd_p,
                          BLOCK_CLS=block_cls)
    split, chunk = split_plan(n, h * w, k, x.device)
    pw = torch.empty((split * n, ncls, k), device=x.device, dtype=torch.float32)
    pb = torch.empty((split * n, ncls), device=x.device, dtype=torch.float32) if has_bias else pw
    grid = lambda meta: (n * split, triton.cdiv(k, meta["BLOCK_K"]))
    _head_dw_kernel[grid](dz, x, pw, pb, n, h * w, k, ncls, chunk, split, sx_n, sx_c, sx_p,
                          HAS_BIAS=has_bias, BLOCK_CLS=block_cls)
    dw = finish_partials(pw, weight.dtype)
    db = finish_partials(pb, bias_dtype) if has_bias else None
    return dx, dw, db
