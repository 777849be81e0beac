"""2-D max pooling without indices (the ResNet stem's 3x3 / stride 2 / pad 1): one read, one write.

PyTorch's CUDA ``max_pool2d`` always runs ``max_pool2d_with_indices`` and writes an int64 index per
output element, also in inference: for the stem of BiSeNet at 1x3x1024x2048 (64 x 512 x 1024 bf16 in,
64 x 256 x 512 out) that is 67 MB read + 17 MB written + 67 MB of indices written. This kernel writes
the 17 MB of values only. It serves inference; a call that needs a gradient takes PyTorch's op (see
:mod:`fastbisenet.ops.max_pool`).

Semantics are PyTorch's: windows clipped to the input (padding never wins: it is ``-inf``), NaN
propagates (a window holding a NaN gives NaN), dilation 1, floor output size. The maximum is taken in
fp32 (exact for fp16/bf16/fp32 inputs) and stored in the input dtype, so results are bit-identical.

Maps are addressed through ``(stride_n, stride_c, stride_h, stride_w)``; output tiles are
``BLOCK_P`` output pixels x ``BLOCK_C`` channels, channels the fast dimension (channels_last maps are
read and written as contiguous channel vectors).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .channel_attention import pixel_tile_configs


@triton.autotune(configs=pixel_tile_configs(), key=["C", "OH", "OW", "KH", "KW"])
@triton.jit
def _max_pool_kernel(
    x_ptr,  # (N, C, H, W) input, strides below
    y_ptr,  # out: (N, C, OH, OW) output, strides below
    C,  # channels
    H, W,  # input size
    OH, OW,  # output size
    sx_n, sx_c, sx_h, sx_w,  # input strides
    sy_n, sy_c, sy_h, sy_w,  # output strides
    KH: tl.constexpr, KW: tl.constexpr,  # window
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr, PAD_W: tl.constexpr,
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
    for kh in tl.static_range(KH):
        ih = oh * STRIDE_H - PAD_H + kh
        for kw in tl.static_range(KW):
            iw = ow * STRIDE_W - PAD_W + kw
            inside = pmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            off = n * sx_n + (ih.to(tl.int64) * sx_h + iw.to(tl.int64) * sx_w)[:, None] + c_off
            v = tl.load(x_ptr + off, mask=inside[:, None] & cmask[None, :], other=float("-inf")).to(tl.float32)
            best = tl.where((v > best) | (v != v), v, best)  # a NaN, once taken, is never replaced
    y_off = n * sy_n + (oh.to(tl.int64) * sy_h + ow.to(tl.int64) * sy_w)[:, None] \
        + offs_c.to(tl.int64)[None, :] * sy_c
    tl.store(y_ptr + y_off, best.to(y_ptr.dtype.element_ty), mask=pmask[:, None] & cmask[None, :])


def max_pool_fwd(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                 out_hw: tuple[int, int]) -> torch.Tensor:
    """Launch :func:`_max_pool_kernel`; the output is channels_last in ``x``'s dtype."""
    n, c, h, w = x.shape
    oh, ow = out_hw
    y = torch.empty((n, c, oh, ow), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    if y.numel() == 0:
        return y
    grid = lambda meta: (triton.cdiv(oh * ow, meta["BLOCK_P"]), triton.cdiv(c, meta["BLOCK_C"]), n)
    _max_pool_kernel[grid](
        x, y, c, h, w, oh, ow, *x.stride(), *y.stride(),
        KH=kernel[0], KW=kernel[1], STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_H=padding[0], PAD_W=padding[1],
    )
    return y
