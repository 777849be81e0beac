"""Segmentation head: 1x1 classifier at low resolution, then bilinear upsample (or upsample + argmax).

Order and fusion, with the numbers of the v1 main head at 1x3x1024x2048 (features at 1/8: 128x256 =
32,768 pixels x 256 channels, 19 classes, output 2,097,152 pixels):

* Bilinear resize is linear and its weights sum to 1, so ``up(W x + b) = W up(x) + b``: the 1x1 at
  low resolution costs 2*32,768*256*19 = 0.32 GFLOP; at full resolution it would be 20.4 GFLOP (64x)
  and would read 64x more (interpolated) features.
* Bytes (bf16 features, fp32 low-res logits): features read 16.8 MB; low-res logits written and read
  back 2 x 4.2 MB (rows padded from 19 to 32 classes, below; mostly from L2); full-res bf16 logits
  written 79.7 MB (159 MB fp32). A single kernel fusing the 1x1 into the upsample would save only that
  8 MB L2 round trip while every output tile would need the 1x1 of its source pixels plus a halo
  (recomputed or shared across tiles), so the cheap order is two kernels: :func:`head_conv1x1` (a small
  GEMM) then :func:`upsample_logits`.
* ``argmax`` is fused into the upsample: per output pixel all classes sit in one tile row, the
  full-resolution logits never exist, and the 79.7 MB write becomes a 8.4 MB int32 map.

Low-res logits are an fp32 (N, h*w, CLS) buffer, ``CLS = _cls_block(n_classes)`` (a power of two >= 16),
classes contiguous, the padding classes written as the 1x1 of zero weights (0, or NaN where the
features hold NaN/inf). Every row is 64/128-byte aligned and read whole (no per-class mask; the
padding's values are discarded: masked to -inf before the argmax, never stored as logits), so the conv
stores and the upsample loads each tap as 16-byte vectors: with 76-byte rows (19 fp32 classes) the
sm_90 code had one 4-byte access per class and tap and 146-255 registers with spills, now at most 144
and none (bench/compile_audit.py).
Backward: the upsample's transpose, then ``dx = dz @ W`` and ``dW = dz^T x`` / ``db = sum dz`` from
per-chunk partials (deterministic).

The transpose of a bilinear resize is separable, ``dz = Wh^T g Ww``, so it is two 1-D gathers (no
atomics: deterministic), each output element summing its window of inputs with the forward's own
source indices and weights (:func:`_window_weight` -> ``src_index``; PyTorch's fp32
area_pixel_compute_source_index, both align_corners, edge clamping, any sizes):

1. :func:`_upsample_bwd_w_kernel` reduces along W: every full-resolution row ``(n, c, oh)`` gives
   ``t[n, c, oh, iw] = sum_ow wgt_w(ow, iw) g[n, c, oh, ow]``, an fp32 (N, C, H, w) buffer. The tile is
   rows x low-res columns x window taps, taps fastest: a warp's lanes read 4 low-res columns x 8
   consecutive output columns = 32 consecutive elements of ``g`` (scale 8).
2. :func:`_upsample_bwd_h_kernel` reduces along H: ``dz[n, ih, iw, c] = sum_oh wgt_h(oh, ih) t[n, c, oh,
   iw]``; the tile is low-res rows x taps x (class, low-res column) pairs, read as contiguous rows of t.

Traffic of the backward for 8x3x1024x1024 training (19 classes, scale 8: g is (8, 19, 1024, 1024) =
159.4 M elements, dz 8 x 128*128 x 19 = 2.49 M fp32):

* pass 1: reads g once, 637.5 MB fp32 / 318.8 MB bf16 (each element is requested by the 2 low-res
  columns it feeds, the second request hits L1/L2); writes t = 8x19x1024x128 fp32 = 79.7 MB.
* pass 2: reads t, 79.7 MB (each row requested by the ~2 low-res rows it feeds); writes dz, 10.0 MB.
* total ~807 MB (fp32 grads) / ~488 MB (bf16 grads): ~0.27 / ~0.16 ms at 3 TB/s. GPU serial work per
  program: 3 steps of 8 taps (pass 1, window 18) + 5 steps of 4 taps (pass 2).
* the previous single-pass 2-D gather (each low-res pixel x 32 class lanes walking its 18x18 = 324-tap
  window of output pixels): no intermediate, so a DRAM floor of 637.5 + 10 MB (fp32), but each g
  element was requested 4 times (2.55 GB fp32 / 1.27 GB bf16 of load requests) with no coalescing
  (lanes 8 columns or a whole class plane apart: one 32-byte sector per 4- or 2-byte element, ~20 GB of
  sector traffic through L1/L2) behind a serial chain of 324 taps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET
from .attend_add_upsample import BILINEAR, _window_weight, dim_params, src_index
from .channel_attention import configs, finish_partials, map_strides, split_plan

DOT_PRECISION: str = "ieee" if INTERPRET else "tf32x3"
"""``tl.dot`` precision of the heads' fp32 matmuls (the 1x1 classifier and its gradients, the bilinear
transpose of the fused CE): three tf32 tensor-core products, fp32-accurate, on a GPU (an ``ieee`` fp32
dot is an FMA loop on the CUDA cores: ~4x the memory floor of the classifier at 8x1024x1024)."""


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
    z_ptr,  # out: fp32 (N, HW, BLOCK_CLS) low-res logits, contiguous; classes >= NCLS are written as 0
    HW,  # low-res pixels per sample
    K,  # feature channels
    NCLS,  # classes
    sx_n, sx_c, sx_p,  # feature strides (sample, channel, flat pixel)
    sw_o, sw_i,  # weight strides (class, channel)
    HAS_BIAS: tl.constexpr,  # add the bias
    DOT_PRECISION: tl.constexpr,  # tl.dot input precision (DOT_PRECISION)
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
        acc += tl.dot(x.to(tl.float32), wt.to(tl.float32), input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_o, mask=omask, other=0.0).to(tl.float32)[None, :]
    # classes >= NCLS hold 0 (weight and bias loads masked): whole rows are stored, unmasked along classes
    z_off = (n * HW + offs_p).to(tl.int64)[:, None] * BLOCK_CLS + offs_o[None, :]
    tl.store(z_ptr + z_off, acc, mask=pmask[:, None])


def full_res_configs() -> list[triton.Config]:
    """Tiles of the kernels that walk full-resolution pixels with all classes of a pixel in a tile row;
    a fresh list each."""
    return configs(
        [
            triton.Config({"BLOCK_P": 64}, num_warps=4),
            triton.Config({"BLOCK_P": 128}, num_warps=4),
            triton.Config({"BLOCK_P": 256}, num_warps=8),
        ],
        triton.Config({"BLOCK_P": 256}, num_warps=4),
    )


@triton.jit
def interp_logits(
    z_ptr,  # fp32 (N, IH*IW, BLOCK_CLS) low-res logits from _head_conv1x1_kernel (zero padding classes)
    n,  # sample
    oh, ow,  # [BLOCK_P] output rows and columns
    pmask,  # [BLOCK_P] pixels inside the output
    IH, IW,  # low-res size
    scale_h, scale_w,  # fp32 bilinear source scales
    ALIGN: tl.constexpr,  # align_corners
    BLOCK_CLS: tl.constexpr,  # z's row length
):
    """fp32 [BLOCK_P, BLOCK_CLS] bilinear logits at the output pixels ``(oh, ow)`` (padding classes 0;
    0 for pixels outside ``pmask``)."""
    h0, h1, lh0, lh1 = src_index(oh, IH, scale_h, 1, ALIGN)
    w0, w1, lw0, lw1 = src_index(ow, IW, scale_w, 1, ALIGN)
    zb = z_ptr + (n * IH * IW).to(tl.int64) * BLOCK_CLS + tl.arange(0, BLOCK_CLS)[None, :]
    r0 = (h0 * IW).to(tl.int64)
    r1 = (h1 * IW).to(tl.int64)
    # whole rows (padding classes are 0): masked by pixel only, so each tap is read as 16-byte vectors
    row_mask = pmask[:, None]
    t00 = tl.load(zb + ((r0 + w0) * BLOCK_CLS)[:, None], mask=row_mask, other=0.0)
    t01 = tl.load(zb + ((r0 + w1) * BLOCK_CLS)[:, None], mask=row_mask, other=0.0)
    t10 = tl.load(zb + ((r1 + w0) * BLOCK_CLS)[:, None], mask=row_mask, other=0.0)
    t11 = tl.load(zb + ((r1 + w1) * BLOCK_CLS)[:, None], mask=row_mask, other=0.0)
    lw0 = lw0[:, None]
    lw1 = lw1[:, None]
    return lh0[:, None] * (lw0 * t00 + lw1 * t01) + lh1[:, None] * (lw0 * t10 + lw1 * t11)


@triton.autotune(configs=full_res_configs(), key=["NCLS", "OH", "OW"])
@triton.jit
def _upsample_logits_kernel(
    z_ptr,  # fp32 (N, IH*IW, BLOCK_CLS) low-res logits from _head_conv1x1_kernel (zero padding classes)
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
    BLOCK_CLS: tl.constexpr,  # z's row length: >= NCLS, power of two
):
    n = tl.program_id(1)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_o = tl.arange(0, BLOCK_CLS)
    pmask = offs_p < OH * OW
    omask = offs_o < NCLS
    mask = pmask[:, None] & omask[None, :]
    oh = offs_p // OW
    ow = offs_p - oh * OW
    v = interp_logits(z_ptr, n, oh, ow, pmask, IH, IW, scale_h, scale_w, ALIGN, BLOCK_CLS)
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


@triton.jit
def _upsample_bwd_w_kernel(
    g_ptr,  # (N, NCLS, OH, OW) gradient of the logits, strides below
    t_ptr,  # out: fp32 (N, NCLS, OH, IW) contiguous, the gradient reduced along W
    ROWS,  # N * NCLS * OH full-resolution rows
    NCLS,  # classes
    OH,  # output height
    IW, OW,  # low-res / output width
    scale_w, inv_w, off_w, WIN_W,  # W: forward scale, 1/scale (0 if scale is 0), src offset, window
    sg_n, sg_c, sg_h, sg_w,  # gradient strides
    ALIGN: tl.constexpr,  # align_corners
    BLOCK_R: tl.constexpr,  # full-resolution rows per program
    BLOCK_IW: tl.constexpr,  # low-res columns per program
    BLOCK_K: tl.constexpr,  # window taps per step (the fast tile dim: consecutive output columns)
):
    """Pass 1: ``t[r, iw] = sum_ow wgt_w(ow, iw) * g[r, ow]`` over the window of ``iw``."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    iw = tl.program_id(1) * BLOCK_IW + tl.arange(0, BLOCK_IW)
    rmask = offs_r < ROWS
    nc = offs_r // OH
    oh = offs_r - nc * OH
    n = nc // NCLS
    c = nc - n * NCLS
    row = n.to(tl.int64) * sg_n + c.to(tl.int64) * sg_c + oh.to(tl.int64) * sg_h
    gb = g_ptr + row[:, None, None]
    lo = tl.maximum(tl.floor((iw - 1 - off_w) * inv_w).to(tl.int32), 0)
    taps = tl.arange(0, BLOCK_K)[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_IW, BLOCK_K), tl.float32)
    for k0 in range(0, WIN_W, BLOCK_K):
        # taps past the window (BLOCK_K padding) get their exact weight too: 0 for a correct window
        ow = lo[:, None] + k0 + taps  # [BLOCK_IW, BLOCK_K]
        wgt = _window_weight(ow, iw[:, None], IW, OW, scale_w, 1, ALIGN)  # 0 for ow >= OW, iw >= IW
        m = rmask[:, None, None] & (wgt != 0.0)[None, :, :]
        g = tl.load(gb + (ow.to(tl.int64) * sg_w)[None, :, :], mask=m, other=0.0)
        acc += wgt[None, :, :] * g.to(tl.float32)
    t = tl.sum(acc, axis=2)
    t_off = offs_r.to(tl.int64)[:, None] * IW + iw[None, :]
    tl.store(t_ptr + t_off, t, mask=rmask[:, None] & (iw < IW)[None, :])


@triton.jit
def _upsample_bwd_h_kernel(
    t_ptr,  # fp32 contiguous, from pass 1: (N, NCLS, OH, IW), or (N, OH, IW, NCLS) when PIXEL_MAJOR
    dz_ptr,  # out: fp32 (N, IH*IW, NCLS) gradient of the low-res logits
    NCLS,  # classes
    IH, IW,  # low-res size
    OH,  # output height
    scale_h, inv_h, off_h, WIN_H,  # H: forward scale, 1/scale (0 if scale is 0), src offset, window
    ALIGN: tl.constexpr,  # align_corners
    PIXEL_MAJOR: tl.constexpr,  # t's layout (classes fastest: the fused head cross-entropy's pass 1)
    BLOCK_I: tl.constexpr,  # low-res rows per program
    BLOCK_K: tl.constexpr,  # window taps per step
    BLOCK_B: tl.constexpr,  # (class, low-res column) pairs per program, in t's order (read coalesced)
):
    """Pass 2: ``dz[n, ih, iw, c] = sum_oh wgt_h(oh, ih) * t[n, c, oh, iw]`` over the window of ``ih``."""
    n = tl.program_id(2)
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    ih = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    bmask = offs_b < NCLS * IW
    plane = OH * IW
    if PIXEL_MAJOR:  # b = iw * NCLS + c: a row of t and of dz is the same (IW, NCLS) block
        row_stride = IW * NCLS
        tb = t_ptr + n.to(tl.int64) * NCLS * plane + offs_b[None, None, :]
        b_out = offs_b
    else:  # b = c * IW + iw
        c = offs_b // IW
        iw = offs_b - c * IW
        row_stride = IW
        tb = t_ptr + n.to(tl.int64) * NCLS * plane + (c.to(tl.int64) * plane + iw)[None, None, :]
        b_out = iw * NCLS + c
    lo = tl.maximum(tl.floor((ih - 1 - off_h) * inv_h).to(tl.int32), 0)
    taps = tl.arange(0, BLOCK_K)[None, :]
    acc = tl.zeros((BLOCK_I, BLOCK_K, BLOCK_B), tl.float32)
    for k0 in range(0, WIN_H, BLOCK_K):
        oh = lo[:, None] + k0 + taps  # [BLOCK_I, BLOCK_K]
        wgt = _window_weight(oh, ih[:, None], IH, OH, scale_h, 1, ALIGN)  # 0 for oh >= OH, ih >= IH
        m = (wgt != 0.0)[:, :, None] & bmask[None, None, :]
        v = tl.load(tb + (oh.to(tl.int64) * row_stride)[:, :, None], mask=m, other=0.0)
        acc += wgt[:, :, None] * v
    dz = tl.sum(acc, axis=1)
    dz_off = (n * IH + ih).to(tl.int64)[:, None] * IW * NCLS + b_out[None, :]
    tl.store(dz_ptr + dz_off, dz, mask=(ih < IH)[:, None] & bmask[None, :])


_upsample_bwd_w_tuned = triton.autotune(
    configs=[
        triton.Config({"BLOCK_R": 4, "BLOCK_IW": 32}, num_warps=4),
        triton.Config({"BLOCK_R": 8, "BLOCK_IW": 32}, num_warps=4),
        triton.Config({"BLOCK_R": 16, "BLOCK_IW": 16}, num_warps=4),
        triton.Config({"BLOCK_R": 8, "BLOCK_IW": 64}, num_warps=8),
    ],
    key=["NCLS", "OH", "IW", "OW", "BLOCK_K"],
)(_upsample_bwd_w_kernel)

_upsample_bwd_h_tuned = triton.autotune(
    configs=[
        triton.Config({"BLOCK_I": 2, "BLOCK_B": 128}, num_warps=4),
        triton.Config({"BLOCK_I": 2, "BLOCK_B": 256}, num_warps=4),
        triton.Config({"BLOCK_I": 4, "BLOCK_B": 256}, num_warps=8),
        triton.Config({"BLOCK_I": 2, "BLOCK_B": 512}, num_warps=8),
    ],
    key=["NCLS", "IH", "IW", "OH", "BLOCK_K", "PIXEL_MAJOR"],
)(_upsample_bwd_h_kernel)


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
    DOT_PRECISION: tl.constexpr,  # tl.dot input precision (DOT_PRECISION)
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
    dx = tl.dot(dz, w, input_precision=DOT_PRECISION)
    dx_off = n.to(tl.int64) * sd_n + offs_p.to(tl.int64)[:, None] * sd_p + offs_k.to(tl.int64)[None, :] * sd_c
    tl.store(dx_ptr + dx_off, dx.to(dx_ptr.dtype.element_ty), mask=pmask[:, None] & kmask[None, :])


# Pixel steps: as an ``ieee`` fp32 dot (an FMA loop over register tiles) BLOCK_P >= 64 spilled 0.2-1.8 KB
# per thread for sm_90 with bf16/fp16 features (bench/compile_audit.py), hence the short steps; the
# tf32x3 tensor-core dot keeps its accumulator in MMA fragments, so longer steps are offered too.
@triton.autotune(
    configs=configs(
        [
            triton.Config({"BLOCK_P": 16, "BLOCK_K": 64}, num_warps=4),
            triton.Config({"BLOCK_P": 32, "BLOCK_K": 32}, num_warps=4),
            triton.Config({"BLOCK_P": 32, "BLOCK_K": 64}, num_warps=4),
            triton.Config({"BLOCK_P": 64, "BLOCK_K": 64}, num_warps=4),
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
    DOT_PRECISION: tl.constexpr,  # tl.dot input precision (DOT_PRECISION)
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
        acc += tl.dot(dzt, x.to(tl.float32), input_precision=DOT_PRECISION)
        if HAS_BIAS:
            accb += tl.sum(dzt, axis=1)
    row = s * N + n
    tl.store(pw_ptr + (row * NCLS + offs_o[:, None]) * K + offs_k[None, :], acc,
             mask=omask[:, None] & kmask[None, :])
    if HAS_BIAS and tl.program_id(1) == 0:
        tl.store(pb_ptr + row * NCLS + offs_o, accb, mask=omask)


def head_conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 low-res logits (N, h*w, _cls_block(n_classes)) of the 1x1 classifier ``weight`` (n_classes, K, 1, 1);
    the padding classes past ``n_classes`` hold 0."""
    x, sx_n, sx_c, sx_p = map_strides(x)
    n, k, h, w = x.shape
    ncls = weight.shape[0]
    z = torch.empty((n, h * w, _cls_block(ncls)), device=x.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(h * w, meta["BLOCK_P"]), n)
    _head_conv1x1_kernel[grid](
        x, weight, bias if bias is not None else weight, z, h * w, k, ncls, sx_n, sx_c, sx_p,
        weight.stride(0), weight.stride(1), HAS_BIAS=bias is not None, DOT_PRECISION=DOT_PRECISION,
        BLOCK_CLS=_cls_block(ncls),
    )
    return z


def upsample_logits(
    z: torch.Tensor, ncls: int, in_hw: tuple[int, int], size: tuple[int, int], align: bool, argmax: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Bilinear upsample of :func:`head_conv1x1`'s ``z`` (``ncls`` classes): NCHW-contiguous logits of
    ``dtype``, or the int32 argmax."""
    n, _, block_cls = z.shape
    assert block_cls == _cls_block(ncls) and z.is_contiguous() and z.dtype == torch.float32
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
        ALIGN=bool(align), ARGMAX=bool(argmax), BLOCK_CLS=block_cls,
    )
    return y


def _interp_rows(rows: int, per_row: int) -> int:
    """Interpreter block length over ``rows`` so that a tile holds at most about 2**19 elements (numpy
    runs a whole tile per op and each op has a fixed Python cost: few big programs beat many small)."""
    return min(triton.next_power_of_2(rows), max(1, 2**19 // per_row))


def upsample_logits_bwd(g: torch.Tensor, in_hw: tuple[int, int], align: bool) -> torch.Tensor:
    """fp32 gradient (N, h*w, n_classes) of the low-res logits from the logits' gradient ``g``.

    Two separable 1-D gathers: along W into an fp32 (N, n_classes, H, w) buffer, then along H."""
    n, ncls, oh, ow = g.shape
    ih, iw = in_hw
    dz = torch.empty((n, ih * iw, ncls), device=g.device, dtype=torch.float32)
    if dz.numel() == 0:
        return dz
    t = torch.empty((n, ncls, oh, iw), device=g.device, dtype=torch.float32)
    sw, inv_w, off_w, win_w = dim_params(iw, ow, BILINEAR, align)
    rows = n * ncls * oh
    w_args = (g, t, rows, ncls, oh, iw, ow, sw, inv_w, off_w, win_w, *g.stride())
    # 8 taps per step along W: a warp's 32 lanes read 4 low-res columns x 8 consecutive output columns;
    # padded taps past the window get their exact weight (0), so any power of two >= 2 is correct
    block_kw = max(2, min(triton.next_power_of_2(win_w), 8))
    if INTERPRET:
        block_iw = min(triton.next_power_of_2(iw), 128)
        block_r = _interp_rows(rows, block_iw * block_kw)
        grid = (triton.cdiv(rows, block_r), triton.cdiv(iw, block_iw))
        _upsample_bwd_w_kernel[grid](*w_args, ALIGN=bool(align), BLOCK_R=block_r, BLOCK_IW=block_iw,
                                     BLOCK_K=block_kw)
    else:
        grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]), triton.cdiv(iw, meta["BLOCK_IW"]))
        _upsample_bwd_w_tuned[grid](*w_args, ALIGN=bool(align), BLOCK_K=block_kw)
    reduce_h(t, dz, in_hw, oh, align, pixel_major=False)
    return dz


def reduce_h(t: torch.Tensor, dz: torch.Tensor, in_hw: tuple[int, int], oh: int, align: bool,
             pixel_major: bool) -> None:
    """Pass 2 of the upsample's backward into ``dz`` (fp32 (N, h*w, n_classes)) from the W-reduced
    fp32 ``t``: (N, n_classes, H, w), or (N, H, w, n_classes) when ``pixel_major``."""
    n, _, ncls = dz.shape
    ih, iw = in_hw
    assert t.is_contiguous() and t.numel() == n * ncls * oh * iw and dz.is_contiguous()
    h_args = (t, dz, ncls, ih, iw, oh, *dim_params(ih, oh, BILINEAR, align))
    flags = dict(ALIGN=bool(align), PIXEL_MAJOR=bool(pixel_major))
    if INTERPRET:
        block_kh = max(2, min(triton.next_power_of_2(h_args[-1]), 64))  # usually the whole window in one step
        block_b = min(triton.next_power_of_2(ncls * iw), 4096)
        block_i = _interp_rows(ih, block_b * block_kh)
        grid = (triton.cdiv(ncls * iw, block_b), triton.cdiv(ih, block_i), n)
        _upsample_bwd_h_kernel[grid](*h_args, **flags, BLOCK_I=block_i, BLOCK_K=block_kh, BLOCK_B=block_b)
    else:
        block_kh = max(2, min(triton.next_power_of_2(h_args[-1]), 4))
        grid = lambda meta: (triton.cdiv(ncls * iw, meta["BLOCK_B"]), triton.cdiv(ih, meta["BLOCK_I"]), n)
        _upsample_bwd_h_tuned[grid](*h_args, **flags, BLOCK_K=block_kh)


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
                          DOT_PRECISION=DOT_PRECISION, BLOCK_CLS=block_cls)
    split, chunk = split_plan(n, h * w, k, x.device)
    pw = torch.empty((split * n, ncls, k), device=x.device, dtype=torch.float32)
    pb = torch.empty((split * n, ncls), device=x.device, dtype=torch.float32) if has_bias else pw
    grid = lambda meta: (n * split, triton.cdiv(k, meta["BLOCK_K"]))
    _head_dw_kernel[grid](dz, x, pw, pb, n, h * w, k, ncls, chunk, split, sx_n, sx_c, sx_p,
                          HAS_BIAS=has_bias, DOT_PRECISION=DOT_PRECISION, BLOCK_CLS=block_cls)
    dw = finish_partials(pw, weight.dtype)
    db = finish_partials(pb, bias_dtype) if has_bias else None
    return dx, dw, db
