"""Segmentation head + per-pixel cross-entropy for training: the full-resolution logits are never written.

``loss[n, oh, ow] = CE(up(z)[n, :, oh, ow], label[n, oh, ow])`` where ``z`` is the head's low-res 1x1
output (:func:`head_upsample.head_conv1x1`, fp32 (N, h*w, CLS) with zero padding classes) and ``up``
the bilinear resize to the labels' size. The unfused chain (:func:`head_upsample.upsample_logits` then
:mod:`cross_entropy`) writes the (N, C, H, W) logits, reads them back, saves them for backward, reads
them again there and writes and reads their gradient; here each full-resolution pixel's logits exist
only in registers, interpolated from ``z`` (4 rows of ``z``, L2-resident: 16.8 MB at 8x128x128x32 fp32).

Bytes per head at 8x3x1024x1024 (19 classes, labels int64, bf16 logits in the unfused chain):

* forward: labels 67 MB read, loss + lse 2 x 33.5 MB written: ~134 MB (unfused: + 319 MB logits
  written and read again: ~772 MB).
* backward: labels 67 MB, lse and the loss gradient 2 x 33.5 MB, the W-reduced fp32 gradient ``t``
  (N, H, w, C) 79.7 MB written and read, ``dz`` 10 MB: ~304 MB (unfused: + logits 319 MB read and
  their bf16 gradient 319 MB written and read: ~1.26 GB).
* so ~1.6 GB less traffic per head and step (~0.5 ms at 3 TB/s; three heads), to be measured.
* saved for backward: ``z`` (16.8 MB) and the fp32 log-sum-exp (33.5 MB) instead of the 319 MB logits.

Backward, pass 1 (:func:`_head_ce_bwd_w_kernel`): a program owns ``BLOCK_IW`` low-res columns of one
full-resolution row and walks, ``BLOCK_OW`` pixels at a time, the output columns that read them (the
forward's bilinear window: ~``scale * BLOCK_IW + 2 * scale`` columns, so ~1.2x of the pixels are
computed twice, by the two programs sharing them). Per chunk it recomputes the logits from ``z``, the
softmax from the saved log-sum-exp and ``d = g * (softmax - onehot)`` once per pixel and class, then
distributes ``d`` to its two low-res columns as a matmul with the chunk's bilinear weight matrix,
``t[iw, :] += Wt[iw, ow] @ d[ow, :]`` (``tf32x3`` on the GPU: fp32-accurate on tensor cores; the
matrix has two non-zeros per column). ``t`` is (N, H, w, C), classes fastest, and pass 2 is
:func:`head_upsample.reduce_h` (``PIXEL_MAJOR``): the transpose of the H interpolation into ``dz``.
No atomics: deterministic. Labels outside ``[0, C)`` other than ``ignore_index`` give NaN loss and
a NaN gradient in the low-res logits that pixel reads (as the unfused chain). NaN or inf logits (from
the features) spread further: through the matmul to the program's whole column block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attend_add_upsample import BILINEAR, _window_weight, dim_params
from .channel_attention import configs
from .cross_entropy import ce_grad, ce_loss
from .head_upsample import DOT_PRECISION, _cls_block, full_res_configs, interp_logits, reduce_h

MAX_CLASSES: int = 32
"""Classes of one 32-wide class block: the tiles bench/compile_audit.py checked for sm_90 (no spills); the
ops run the unfused head logits + cross-entropy kernels above it (e.g. ADE20K's 150 classes)."""


@triton.autotune(configs=full_res_configs(), key=["NCLS", "OH", "OW"])
@triton.jit
def _head_ce_fwd_kernel(
    z_ptr,  # fp32 (N, IH*IW, BLOCK_CLS) low-res logits (zero padding classes)
    labels_ptr,  # (N, OH, OW) contiguous integer labels
    loss_ptr,  # out: fp32 (N, OH, OW) per-pixel loss
    lse_ptr,  # out: fp32 (N, OH, OW) log-sum-exp of the upsampled logits
    IH, IW,  # low-res size
    OH, OW,  # output (label) size
    NCLS,  # classes
    scale_h, scale_w,  # fp32 bilinear source scales
    ignore_index,  # label excluded from the loss
    ALIGN: tl.constexpr,  # align_corners
    BLOCK_P: tl.constexpr,  # output pixels per program
    BLOCK_CLS: tl.constexpr,  # z's row length: >= NCLS, power of two
):
    n = tl.program_id(1)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.arange(0, BLOCK_CLS)
    p_mask = offs_p < OH * OW
    oh = offs_p // OW
    ow = offs_p - oh * OW
    mask = p_mask[:, None] & (offs_c < NCLS)[None, :]
    x = tl.where(mask, interp_logits(z_ptr, n, oh, ow, p_mask, IH, IW, scale_h, scale_w, ALIGN, BLOCK_CLS),
                 float("-inf"))
    pix = n.to(tl.int64) * OH * OW + offs_p
    y = tl.load(labels_ptr + pix, mask=p_mask, other=ignore_index).to(tl.int64)
    loss, lse = ce_loss(x, y, mask, p_mask, p_mask & (y != ignore_index), offs_c, NCLS)
    tl.store(loss_ptr + pix, loss, mask=p_mask)
    tl.store(lse_ptr + pix, lse, mask=p_mask)


@triton.autotune(
    configs=configs(
        [
            triton.Config({"BLOCK_IW": 16, "BLOCK_OW": 32}, num_warps=4),
            triton.Config({"BLOCK_IW": 16, "BLOCK_OW": 64}, num_warps=4),
            triton.Config({"BLOCK_IW": 32, "BLOCK_OW": 64}, num_warps=4),
        ],  # 32 x 128 at 8 warps spilled ~100 bytes per thread in the loop for sm_90 (bench/compile_audit.py)
        triton.Config({"BLOCK_IW": 32, "BLOCK_OW": 128}, num_warps=4),  # interpreted: few, big steps
    ),
    key=["NCLS", "IW", "OH", "OW"],
)
@triton.jit
def _head_ce_bwd_w_kernel(
    z_ptr,  # fp32 (N, IH*IW, BLOCK_CLS) low-res logits from the forward
    labels_ptr,  # (N, OH, OW) contiguous integer labels
    lse_ptr,  # fp32 (N, OH, OW) log-sum-exp from the forward
    g_ptr,  # fp32 (N, OH, OW) contiguous gradient of the per-pixel loss
    t_ptr,  # out: fp32 (N, OH, IW, NCLS) contiguous, the logits' gradient reduced along W
    IH, IW,  # low-res size
    OH, OW,  # output size
    NCLS,  # classes
    scale_h, scale_w,  # fp32 bilinear source scales of the forward
    inv_w, off_w, WIN_W,  # W: 1/scale (0 if scale is 0), source offset, window of one low-res column
    ignore_index,  # label excluded from the loss
    ALIGN: tl.constexpr,  # align_corners
    DOT_PRECISION: tl.constexpr,  # tl.dot input precision of the bilinear transpose
    BLOCK_IW: tl.constexpr,  # low-res columns per program (>= 16: the dot's M)
    BLOCK_OW: tl.constexpr,  # output columns per step (>= 16: the dot's K)
    BLOCK_CLS: tl.constexpr,  # z's row length: >= NCLS, power of two, >= 16
):
    """Pass 1: ``t[n, oh, iw, c] = sum_ow wgt_w(ow, iw) * d[n, c, oh, ow]``, ``d`` recomputed in registers."""
    r = tl.program_id(0)  # full-resolution row n * OH + oh
    n = r // OH
    oh = r - n * OH
    i_first = tl.program_id(1) * BLOCK_IW
    iw = i_first + tl.arange(0, BLOCK_IW)
    i_last = tl.minimum(i_first + BLOCK_IW, IW) - 1
    # output columns reading [i_first, i_last]: from the first one's window start to the last one's end
    o_lo = tl.maximum(tl.floor((i_first - 1 - off_w) * inv_w).to(tl.int32), 0)
    o_hi = tl.minimum(tl.maximum(tl.floor((i_last - 1 - off_w) * inv_w).to(tl.int32), 0) + WIN_W, OW)
    offs_c = tl.arange(0, BLOCK_CLS)
    c_mask = offs_c < NCLS
    oh_v = tl.zeros((BLOCK_OW,), tl.int32) + oh
    row = r.to(tl.int64) * OW
    acc = tl.zeros((BLOCK_IW, BLOCK_CLS), tl.float32)
    n_bad = tl.zeros((BLOCK_IW,), tl.int32)
    for o0 in range(o_lo, o_hi, BLOCK_OW):
        ow = o0 + tl.arange(0, BLOCK_OW)
        p_mask = ow < o_hi
        mask = p_mask[:, None] & c_mask[None, :]
        x = tl.where(mask, interp_logits(z_ptr, n, oh_v, ow, p_mask, IH, IW, scale_h, scale_w, ALIGN, BLOCK_CLS),
                     float("-inf"))
        y = tl.load(labels_ptr + row + ow, mask=p_mask, other=ignore_index).to(tl.int64)
        lse = tl.load(lse_ptr + row + ow, mask=p_mask, other=0.0)
        g = tl.load(g_ptr + row + ow, mask=p_mask, other=0.0)
        valid = p_mask & (y != ignore_index)
        bad = valid & ((y < 0) | (y >= NCLS))
        # bad labels enter the dot as 0 (a NaN row would reach every column of the tile: 0 * NaN) ...
        d = ce_grad(x, y, lse, g, valid & ~bad, offs_c, NCLS)  # 0 outside p_mask
        wgt = _window_weight(ow[None, :], iw[:, None], IW, OW, scale_w, 1, ALIGN)  # [BLOCK_IW, BLOCK_OW]
        acc += tl.dot(wgt, d, input_precision=DOT_PRECISION)
        n_bad += tl.sum(tl.where(bad[None, :] & (wgt != 0.0), 1, 0), axis=1)
    acc = tl.where(n_bad[:, None] > 0, float("nan"), acc)  # ... and as NaN in the columns that read them
    t_off = (r.to(tl.int64) * IW + iw)[:, None] * NCLS + offs_c[None, :]
    tl.store(t_ptr + t_off, acc, mask=(iw < IW)[:, None] & c_mask[None, :])


def _check_z(z: torch.Tensor, ncls: int) -> None:
    assert z.dtype == torch.float32 and z.is_contiguous() and z.shape[2] == _cls_block(ncls)


def head_ce_fwd(
    z: torch.Tensor, labels: torch.Tensor, ncls: int, in_hw: tuple[int, int], align: bool, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(loss, lse)``, both (N, H, W) like ``labels``, of the bilinear upsample of ``z`` (from
    :func:`head_upsample.head_conv1x1`, ``ncls`` classes, low-res size ``in_hw``) to the labels' size."""
    _check_z(z, ncls)
    n, oh, ow = labels.shape
    ih, iw = in_hw
    labels = labels.contiguous()
    loss = torch.empty((n, oh, ow), device=z.device, dtype=torch.float32)
    lse = torch.empty_like(loss)
    scale_h = dim_params(ih, oh, BILINEAR, align)[0]
    scale_w = dim_params(iw, ow, BILINEAR, align)[0]
    grid = lambda meta: (triton.cdiv(oh * ow, meta["BLOCK_P"]), n)
    _head_ce_fwd_kernel[grid](z, labels, loss, lse, ih, iw, oh, ow, ncls, scale_h, scale_w, ignore_index,
                              ALIGN=bool(align), BLOCK_CLS=z.shape[2])
    return loss, lse


def head_ce_bwd(
    grad_loss: torch.Tensor, z: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, ncls: int,
    in_hw: tuple[int, int], align: bool, ignore_index: int,
) -> torch.Tensor:
    """fp32 gradient (N, h*w, ncls) of the low-res logits ``z`` given the per-pixel loss gradient."""
    _check_z(z, ncls)
    n, oh, ow = labels.shape
    ih, iw = in_hw
    dz = torch.empty((n, ih * iw, ncls), device=z.device, dtype=torch.float32)
    if dz.numel() == 0 or labels.numel() == 0:
        return dz.zero_()
    t = torch.empty((n, oh, iw, ncls), device=z.device, dtype=torch.float32)
    scale_h = dim_params(ih, oh, BILINEAR, align)[0]
    scale_w, inv_w, off_w, win_w = dim_params(iw, ow, BILINEAR, align)
    grid = lambda meta: (n * oh, triton.cdiv(iw, meta["BLOCK_IW"]))
    _head_ce_bwd_w_kernel[grid](
        z, labels.contiguous(), lse, grad_loss.contiguous().float(), t, ih, iw, oh, ow, ncls, scale_h, scale_w,
        inv_w, off_w, win_w, ignore_index, ALIGN=bool(align), DOT_PRECISION=DOT_PRECISION, BLOCK_CLS=z.shape[2],
    )
    reduce_h(t, dz, in_hw, oh, align, pixel_major=True)
    return dz
