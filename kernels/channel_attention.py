"""Channel attention: parallel pixel sums, the tiny 1x1(+BN)+sigmoid|ReLU / MLP attention kernels, and broadcasts.

The attention ops read the feature map only through its fp32 partial pixel sums ``(SPLIT, N, C)``:
chunk ``s`` of sample ``n`` sums the flat pixels ``p = h * W + w`` in ``[s * CHUNK, (s + 1) * CHUNK)``
(the last chunk may be shorter). Whoever produces the map may gather them (a conv epilogue does);
otherwise :func:`mean_partials` streams the map once for them. Nothing is reduced with atomics, so
every result here is deterministic.

1. :func:`mean_partials` -- the (N, C, H, W) map is cut into ``N * SPLIT`` pixel chunks x channel
   blocks (:func:`split_plan`), so even at batch 1 hundreds of programs stream the map (one program
   per channel would idle the GPU); each writes one partial sum vector.
2. one small kernel per attention kind finishes the mean (``sums.sum(0) / HW``, vectorised over
   ``BLOCK_S`` partials at a time, so thousands of partials from a conv epilogue cost a few loop
   trips), then does the per-sample matvec(s), BN (batch or running statistics, running update in
   place) and the sigmoid; with ``RELU`` the BN kernel ends in a ReLU instead: the context path's
   global-context vector ``relu(BN(1x1(mean)))`` is the same computation.

The backward kernels work on (N, C)-sized vectors except :func:`broadcast_hw`, which writes a
per-chunk vector over the map in the map's own layout: ``g[p // CHUNK, n, c]`` gathered through a
split stride, which is 0 for a plain broadcast (the mean's gradient ``g / HW``) and ``N * C`` for the
gradient of the partial sums themselves.

Vectors passed between these kernels are fp32 and contiguous; maps are addressed through
``(stride_n, stride_c, stride_p)`` where ``p = h * W + w`` (NCHW-contiguous and channels_last both
have a flat pixel stride; the channel stride is then 1 and Triton vectorises along C).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET, sm_count

INTERPRET_CONFIG = triton.Config({"BLOCK_P": 128, "BLOCK_C": 64}, num_warps=4)
"""The one config used under the interpreter: big tiles, few programs (numpy runs a tile at once)."""


def configs(gpu: list[triton.Config], interp: triton.Config = INTERPRET_CONFIG) -> list[triton.Config]:
    """Autotune configs: ``interp`` alone under the interpreter, ``gpu`` on a GPU."""
    return [interp] if INTERPRET else gpu


def split_plan(n: int, hw: int, c: int, device: torch.device) -> tuple[int, int]:
    """``(SPLIT, CHUNK)``: each sample's ``hw`` pixels cut into SPLIT chunks of CHUNK pixels.

    Aims at ~4 programs per SM over ``n * SPLIT`` chunks x 64-wide channel blocks, with chunks of at
    least 256 pixels on a GPU (a few loop trips per program); under the interpreter it aims at four
    programs so that the multi-chunk path is exercised by small tests.
    """
    if INTERPRET or device.type != "cuda":
        target, min_chunk = 4, 8
    else:
        target, min_chunk = 4 * sm_count(device.index if device.index is not None else 0), 256
    want = max(1, target // max(1, n * triton.cdiv(c, 64)))
    chunk = max(min_chunk, triton.cdiv(hw, want))
    chunk = triton.cdiv(chunk, 8) * 8
    return triton.cdiv(hw, chunk), chunk


def map_strides(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """``(x', stride_n, stride_c, stride_p)`` for an (N, C, H, W) map with a flat pixel index.

    NCHW-contiguous and channels_last tensors are used as they are; anything else is copied to
    channels_last.
    """
    if x.shape[2] > 1 and x.shape[3] > 1 and x.stride(2) != x.shape[3] * x.stride(3):
        x = x.contiguous(memory_format=torch.channels_last)
    return x, x.stride(0), x.stride(1), x.stride(3) if x.shape[3] > 1 else x.stride(2)


# ------------------------------------------------------------------------------------------ mean


def pixel_tile_configs() -> list[triton.Config]:
    """(pixels x channels) tiles of the map-streaming kernels (mean partials, broadcast, attend_residual, max_pool);
    a fresh list each."""
    return configs([
        triton.Config({"BLOCK_P": 32, "BLOCK_C": 64}, num_warps=4),
        triton.Config({"BLOCK_P": 64, "BLOCK_C": 64}, num_warps=4),
        triton.Config({"BLOCK_P": 16, "BLOCK_C": 128}, num_warps=4),
        triton.Config({"BLOCK_P": 64, "BLOCK_C": 128}, num_warps=8),
    ])


def tiles_at_most(configs: list[triton.Config], per_thread: int) -> list[triton.Config]:
    """The (BLOCK_P x BLOCK_C) configs holding at most ``per_thread`` elements per thread; all of them when none
    does (a single forced config stays)."""
    kept = [c for c in configs if c.kwargs["BLOCK_P"] * c.kwargs["BLOCK_C"] <= per_thread * 32 * c.num_warps]
    return kept or configs


@triton.jit
def chunk_tile(C, HW, CHUNK, SPLIT, BLOCK_C: tl.constexpr):
    """This program's share of a map streamed in chunks: grid ``(N * SPLIT, cdiv(C, BLOCK_C))``.

    Returns ``(n, s, offs_c, cmask, start, end)``: sample ``n``, chunk ``s`` covering flat pixels
    ``[start, end)``, and the program's channel block ``offs_c`` with its mask.
    """
    pid = tl.program_id(0)
    n = pid // SPLIT
    s = pid % SPLIT
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    start = s * CHUNK
    return n, s, offs_c, offs_c < C, start, tl.minimum(start + CHUNK, HW)


@triton.autotune(configs=pixel_tile_configs(), key=["C", "CHUNK"])
@triton.jit
def _mean_partial_kernel(
    x_ptr,  # (N, C, H, W) map, any float dtype, addressed by the three strides below
    part_ptr,  # out: fp32 (SPLIT, N, C) partial sums
    N,  # batch size
    C,  # channels
    HW,  # pixels per sample (H * W)
    CHUNK,  # pixels per program (the last chunk of a sample may be shorter)
    SPLIT,  # chunks per sample
    stride_n,  # element strides of x: sample,
    stride_c,  # channel,
    stride_p,  # flat pixel p = h * W + w
    BLOCK_P: tl.constexpr,  # pixels per tile
    BLOCK_C: tl.constexpr,  # channels per tile (the program's channel block)
):
    n, s, offs_c, cmask, start, end = chunk_tile(C, HW, CHUNK, SPLIT, BLOCK_C)
    base = x_ptr + n.to(tl.int64) * stride_n + offs_c.to(tl.int64)[None, :] * stride_c
    acc = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    for p0 in range(start, end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask = (offs_p < end)[:, None] & cmask[None, :]
        acc += tl.load(base + offs_p.to(tl.int64)[:, None] * stride_p, mask=mask, other=0.0).to(tl.float32)
    tl.store(part_ptr + (s * N + n) * C + offs_c, tl.sum(acc, axis=0), mask=cmask)


@triton.jit
def _finish_partials_kernel(
    part_ptr,  # fp32 (SPLIT, L) partial sums
    out_ptr,  # out: (cdiv(SPLIT, CHUNK), L) in its own dtype
    L,  # length of one partial vector
    SPLIT,  # number of partial vectors
    CHUNK,  # partial vectors summed into each output row (SPLIT: one finished vector)
    scale,  # fp32 factor applied to the sum (1 / HW for a mean)
    BLOCK_S: tl.constexpr,  # partial vectors summed per loop step
    BLOCK: tl.constexpr,  # elements per program
):
    # [BLOCK_S, BLOCK] tiles per step: CHUNK / BLOCK_S dependent steps (the head's weight gradient has
    # ~4 partials per SM, ~500 on an H100; one load per partial would be ~500 latency-bound steps)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    start = tl.program_id(1) * CHUNK
    end = tl.minimum(start + CHUNK, SPLIT)
    offs_s = tl.arange(0, BLOCK_S)
    acc = tl.zeros((BLOCK,), tl.float32)
    for s0 in range(start, end, BLOCK_S):
        rows = s0 + offs_s
        ptrs = part_ptr + rows.to(tl.int64)[:, None] * L + offs[None, :]
        acc += tl.sum(tl.load(ptrs, mask=(rows < end)[:, None] & mask[None, :], other=0.0), axis=0)
    out = out_ptr + tl.program_id(1).to(tl.int64) * L + offs
    tl.store(out, (acc * scale).to(out_ptr.dtype.element_ty), mask=mask)


def mean_partials(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """fp32 partial pixel sums (SPLIT, N, C) of an (N, C, H, W) map, chunked by :func:`split_plan`, and SPLIT."""
    x, sn, sc, sp = map_strides(x)
    n, c, h, w = x.shape
    split, chunk = split_plan(n, h * w, c, x.device)
    part = torch.empty((split, n, c), device=x.device, dtype=torch.float32)
    grid = lambda meta: (n * split, triton.cdiv(c, meta["BLOCK_C"]))
    _mean_partial_kernel[grid](x, part, n, c, h * w, chunk, split, sn, sc, sp)
    return part, split


def _sum_partials(part: torch.Tensor, dtype: torch.dtype, chunk: int, scale: float) -> torch.Tensor:
    split = part.shape[0]
    rows = triton.cdiv(split, chunk)
    out = torch.empty((rows, *part.shape[1:]), device=part.device, dtype=dtype)
    length = out[0].numel()
    block, block_s = (64, 4) if INTERPRET else (128, 32)
    _finish_partials_kernel[(triton.cdiv(length, block), rows)](part, out, length, split, chunk, scale,
                                                                BLOCK_S=block_s, BLOCK=block)
    return out


def finish_partials(part: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """``scale * part.sum(0)`` for fp32 partials (SPLIT, ...), as a tensor of ``part.shape[1:]``."""
    return _sum_partials(part, dtype, part.shape[0], scale)[0]


FOLD_SPLIT: int = 4 if INTERPRET else 32
"""Partials beyond which the attention kernels' inputs are first folded by :func:`fold_partials`."""


def fold_partials(part: torch.Tensor, rows: int = FOLD_SPLIT) -> torch.Tensor:
    """fp32 (SPLIT, ...) partial sums folded to at most ``rows`` partials (sums of consecutive ones), in parallel.

    The attention kernels run one program per block of output channels and each finishes the mean from
    every partial; the FFM's conv epilogue gives 512 of them at 1x3x1024x2048, ~16 dependent steps per
    program against one step after this fold (a few hundred programs, one step each).
    """
    split = part.shape[0]
    if split <= rows:
        return part
    return _sum_partials(part, torch.float32, triton.cdiv(split, rows), 1.0)


@triton.autotune(configs=pixel_tile_configs(), key=["C", "CHUNK"])
@triton.jit
def _broadcast_kernel(
    g_ptr,  # fp32 (SPLIT, N, C) per-chunk values, each (N, C) slice contiguous, chunks stride_gs apart
    out_ptr,  # out: (N, C, H, W) map in its own dtype, addressed by the strides below
    N,  # batch size
    C,  # channels
    HW,  # pixels per sample
    CHUNK,  # pixels per program: chunk s of a sample covers flat pixels [s * CHUNK, (s + 1) * CHUNK)
    SPLIT,  # chunks per sample
    scale,  # fp32 factor (1 / HW for the mean's gradient)
    stride_gs,  # element stride of g between chunks (0: the same (N, C) vector for every chunk)
    stride_n,  # element strides of out: sample,
    stride_c,  # channel,
    stride_p,  # flat pixel
    BLOCK_P: tl.constexpr,  # pixels per tile
    BLOCK_C: tl.constexpr,  # channels per tile
):
    n, s, offs_c, cmask, start, end = chunk_tile(C, HW, CHUNK, SPLIT, BLOCK_C)
    g = tl.load(g_ptr + s.to(tl.int64) * stride_gs + n * C + offs_c, mask=cmask, other=0.0) * scale
    tile = tl.zeros((BLOCK_P, BLOCK_C), tl.float32) + g[None, :]
    tile = tile.to(out_ptr.dtype.element_ty)
    base = out_ptr + n.to(tl.int64) * stride_n + offs_c.to(tl.int64)[None, :] * stride_c
    for p0 in range(start, end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask = (offs_p < end)[:, None] & cmask[None, :]
        tl.store(base + offs_p.to(tl.int64)[:, None] * stride_p, tile, mask=mask)


def broadcast_hw(g: torch.Tensor, out: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Write ``scale * g`` over the map ``out`` (NCHW or channels_last); return it.

    ``g`` is fp32 (N, C), broadcast over every pixel, or fp32 (SPLIT, N, C) laid out as
    :func:`mean_partials` writes its sums (SPLIT and the chunking from :func:`split_plan` for ``out``'s
    shape): pixel ``p`` gets ``g[p // CHUNK]``, the gradient of the partial sums. Only each (N, C)
    slice must be contiguous: a ``g`` expanded along SPLIT (stride 0) is read as a plain broadcast.
    """
    out, sn, sc, sp = map_strides(out)
    n, c, h, w = out.shape
    split, chunk = split_plan(n, h * w, c, out.device)
    if g.dim() == 2:
        g = g.expand(split, n, c)
    if g.shape != (split, n, c):
        raise ValueError(f"broadcast_hw: g must be ({n}, {c}) or ({split}, {n}, {c}) for a map of shape "
                         f"{tuple(out.shape)}, got {tuple(g.shape)}")
    if not g[0].is_contiguous():
        g = g.contiguous()
    grid = lambda meta: (n * split, triton.cdiv(c, meta["BLOCK_C"]))
    _broadcast_kernel[grid](g, out, n, c, h * w, chunk, split, scale, g.stride(0), sn, sc, sp)
    return out


# ------------------------------------------------------------------------- shared small helpers


@triton.jit
def _load_mean(
    part_ptr,  # fp32 (SPLIT, N, C) partial sums, contiguous
    offs_n,  # [BLOCK_N] sample indices
    offs_i,  # [BLOCK_I] channel indices
    N,  # batch size
    C,  # channels
    SPLIT,  # number of partials
    inv_hw,  # 1 / HW
    BLOCK_S: tl.constexpr,  # partials summed per loop step ([BLOCK_S, BLOCK_N, BLOCK_I] tiles)
):
    """Finished mean tile [BLOCK_N, BLOCK_I] (fp32, zero outside the tensor): ``sum_s part[s] * inv_hw``."""
    idx = offs_n[:, None] * C + offs_i[None, :]
    mask = (offs_n < N)[:, None] & (offs_i < C)[None, :]
    m = tl.zeros(idx.shape, tl.float32)
    for s0 in range(0, SPLIT, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        ptrs = part_ptr + offs_s.to(tl.int64)[:, None, None] * (N * C) + idx[None, :, :]
        m += tl.sum(tl.load(ptrs, mask=(offs_s < SPLIT)[:, None, None] & mask[None, :, :], other=0.0), axis=0)
    return m * inv_hw


@triton.jit
def _matvec_tile(
    v,  # [BLOCK_N, BLOCK_I] fp32 input rows
    w_ptr,  # weight (C_OUT, C_IN) addressed by strides
    offs_o,  # [BLOCK_O] output indices
    offs_i,  # [BLOCK_I] input indices
    C_OUT,  # rows of w
    C_IN,  # columns of w
    stride_wo,  # element stride of w along the output dim
    stride_wi,  # element stride of w along the input dim
):
    """[BLOCK_N, BLOCK_O] = v @ w[offs_o, offs_i]^T in fp32."""
    wmask = (offs_o < C_OUT)[:, None] & (offs_i < C_IN)[None, :]
    w = tl.load(w_ptr + offs_o[:, None] * stride_wo + offs_i[None, :] * stride_wi, mask=wmask, other=0.0)
    return tl.sum(v[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)


@triton.jit
def _mean_matvec(
    part_ptr,  # fp32 (SPLIT, N, C_IN) partial pixel sums, contiguous
    mean_ptr,  # out: fp32 (N, C_IN) finished mean (written only when store_mean)
    w_ptr,  # weight (C_OUT, C_IN) addressed by strides
    offs_n,  # [BLOCK_N] sample indices
    offs_o,  # [BLOCK_O] output indices
    N,  # batch size
    C_IN,  # input channels
    C_OUT,  # rows of w
    SPLIT,  # number of partials
    inv_hw,  # 1 / HW
    stride_wo,  # element stride of w along C_OUT
    stride_wi,  # element stride of w along C_IN
    store_mean,  # this program writes the mean (one program of the grid does)
    BLOCK_N: tl.constexpr,  # >= N, power of two
    BLOCK_O: tl.constexpr,  # outputs of this program
    BLOCK_I: tl.constexpr,  # input channels per loop step
    BLOCK_S: tl.constexpr,  # partials summed per step
):
    """[BLOCK_N, BLOCK_O] fp32 ``mean @ w[offs_o]^T``, the mean finished from the partials block by block."""
    acc = tl.zeros((BLOCK_N, BLOCK_O), tl.float32)
    for i0 in range(0, C_IN, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        m = _load_mean(part_ptr, offs_n, offs_i, N, C_IN, SPLIT, inv_hw, BLOCK_S)
        if store_mean:
            tl.store(mean_ptr + offs_n[:, None] * C_IN + offs_i[None, :], m,
                     mask=(offs_n < N)[:, None] & (offs_i < C_IN)[None, :])
        acc += _matvec_tile(m, w_ptr, offs_o, offs_i, C_OUT, C_IN, stride_wo, stride_wi)
    return acc


# ------------------------------------------------------------------------------- BN attention


@triton.jit
def _bn_attention_fwd_kernel(
    part_ptr,  # fp32 (SPLIT, N, C_IN) partial pixel sums of feat, contiguous
    w_ptr,  # 1x1 conv weight (C_OUT, C_IN), strides below
    gamma_ptr,  # BN weight (C_OUT,) (unused unless AFFINE)
    beta_ptr,  # BN bias (C_OUT,) (unused unless AFFINE)
    rmean_ptr,  # BN running_mean (C_OUT,): read in eval, updated in place when UPDATE
    rvar_ptr,  # BN running_var (C_OUT,): read in eval, updated in place when UPDATE
    nbt_ptr,  # int64 num_batches_tracked, already counted for this call (read only when CUMULATIVE)
    a_ptr,  # out: attention (N, C_OUT) in the output dtype
    y_ptr,  # out: fp32 (N, C_OUT) pre-BN conv output, saved for backward
    mean_ptr,  # out: fp32 (N, C_IN) finished mean, saved for backward (written by program 0)
    smean_ptr,  # out: fp32 (C_OUT,) mean used for normalising (batch or running)
    sinvstd_ptr,  # out: fp32 (C_OUT,) 1/sqrt(var + eps) used for normalising
    N,  # batch size
    C_IN,  # input channels
    C_OUT,  # output channels
    SPLIT,  # number of partials
    inv_hw,  # 1 / (H * W)
    eps,  # BN eps
    momentum,  # running-average factor (unused when CUMULATIVE)
    stride_wo,  # weight element stride along C_OUT
    stride_wi,  # weight element stride along C_IN
    BATCH_STATS: tl.constexpr,  # normalise with batch statistics (train, or no running stats)
    UPDATE: tl.constexpr,  # update running_mean / running_var in place
    CUMULATIVE: tl.constexpr,  # momentum=None: factor 1 / num_batches_tracked, read on the device (no sync)
    AFFINE: tl.constexpr,  # BN has weight and bias
    RELU: tl.constexpr,  # output relu(z) (the global-context vector) instead of sigmoid(z) (attention)
    BLOCK_N: tl.constexpr,  # >= N, power of two
    BLOCK_O: tl.constexpr,  # output channels per program
    BLOCK_I: tl.constexpr,  # input channels per loop step
    BLOCK_S: tl.constexpr,  # partials summed per step when finishing the mean
):
    pid = tl.program_id(0)
    offs_n = tl.arange(0, BLOCK_N)
    offs_o = pid * BLOCK_O + tl.arange(0, BLOCK_O)
    nmask = offs_n < N
    omask = offs_o < C_OUT
    y = _mean_matvec(part_ptr, mean_ptr, w_ptr, offs_n, offs_o, N, C_IN, C_OUT, SPLIT, inv_hw, stride_wo, stride_wi,
                     pid == 0, BLOCK_N, BLOCK_O, BLOCK_I, BLOCK_S)
    mask = nmask[:, None] & omask[None, :]
    tl.store(y_ptr + offs_n[:, None] * C_OUT + offs_o[None, :], y, mask=mask)
    if BATCH_STATS:
        mu = tl.sum(tl.where(mask, y, 0.0), axis=0) / N
        d = tl.where(mask, y - mu[None, :], 0.0)
        var = tl.sum(d * d, axis=0) / N
        if UPDATE:
            rm = tl.load(rmean_ptr + offs_o, mask=omask, other=0.0)
            rv = tl.load(rvar_ptr + offs_o, mask=omask, other=0.0)
            if CUMULATIVE:
                f = 1.0 / tl.load(nbt_ptr).to(tl.float32)
            else:
                f = momentum
            rm_new = (1.0 - f) * rm.to(tl.float32) + f * mu
            rv_new = (1.0 - f) * rv.to(tl.float32) + f * (var * N / (N - 1))
            tl.store(rmean_ptr + offs_o, rm_new.to(rm.dtype), mask=omask)
            tl.store(rvar_ptr + offs_o, rv_new.to(rv.dtype), mask=omask)
    else:
        mu = tl.load(rmean_ptr + offs_o, mask=omask, other=0.0).to(tl.float32)
        var = tl.load(rvar_ptr + offs_o, mask=omask, other=1.0).to(tl.float32)
    invstd = 1.0 / tl.sqrt_rn(var + eps)  # IEEE-rounded, as PyTorch (tl.sqrt is approximate on the GPU)
    tl.store(smean_ptr + offs_o, mu, mask=omask)
    tl.store(sinvstd_ptr + offs_o, invstd, mask=omask)
    z = (y - mu[None, :]) * invstd[None, :]
    if AFFINE:
        g = tl.load(gamma_ptr + offs_o, mask=omask, other=0.0).to(tl.float32)
        b = tl.load(beta_ptr + offs_o, mask=omask, other=0.0).to(tl.float32)
        z = z * g[None, :] + b[None, :]
    if RELU:
        a = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)
    else:
        a = tl.sigmoid(z)
    tl.store(a_ptr + offs_n[:, None] * C_OUT + offs_o[None, :], a.to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_attention_bwd_kernel(
    da_ptr,  # (N, C_OUT) gradient of the attention, contiguous, any float dtype
    y_ptr,  # fp32 (N, C_OUT) saved pre-BN conv output
    mean_ptr,  # fp32 (N, C_IN) saved mean of feat
    smean_ptr,  # fp32 (C_OUT,) saved normalising mean
    sinvstd_ptr,  # fp32 (C_OUT,) saved normalising 1/std
    gamma_ptr,  # BN weight (unused unless AFFINE)
    beta_ptr,  # BN bias (unused unless AFFINE)
    dy_ptr,  # out: fp32 (N, C_OUT) gradient of the conv output
    dw_ptr,  # out: (C_OUT, C_IN) contiguous weight gradient in the weight's dtype
    dgamma_ptr,  # out: (C_OUT,) BN weight gradient (unused unless AFFINE)
    dbeta_ptr,  # out: (C_OUT,) BN bias gradient (unused unless AFFINE)
    N,  # batch size
    C_IN,  # input channels
    C_OUT,  # output channels
    BATCH_STATS: tl.constexpr,  # forward normalised with batch statistics
    AFFINE: tl.constexpr,  # BN has weight and bias
    RELU: tl.constexpr,  # the forward output relu(z), else sigmoid(z)
    BLOCK_N: tl.constexpr,  # >= N, power of two
    BLOCK_O: tl.constexpr,  # output channels per program
    BLOCK_I: tl.constexpr,  # input channels per loop step
):
    pid = tl.program_id(0)
    offs_n = tl.arange(0, BLOCK_N)
    offs_o = pid * BLOCK_O + tl.arange(0, BLOCK_O)
    nmask = offs_n < N
    omask = offs_o < C_OUT
    mask = nmask[:, None] & omask[None, :]
    idx = offs_n[:, None] * C_OUT + offs_o[None, :]
    y = tl.load(y_ptr + idx, mask=mask, other=0.0)
    da = tl.load(da_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    mu = tl.load(smean_ptr + offs_o, mask=omask, other=0.0)
    invstd = tl.load(sinvstd_ptr + offs_o, mask=omask, other=0.0)
    xhat = tl.where(mask, (y - mu[None, :]) * invstd[None, :], 0.0)
    if AFFINE:
        g = tl.load(gamma_ptr + offs_o, mask=omask, other=0.0).to(tl.float32)
        b = tl.load(beta_ptr + offs_o, mask=omask, other=0.0).to(tl.float32)
        z = xhat * g[None, :] + b[None, :]
    else:
        z = xhat
    if RELU:
        dz = tl.where(z <= 0.0, 0.0, da)  # masked lanes: da = 0; a NaN z passes, as torch's ReLU backward
    else:
        s = tl.sigmoid(z)
        dz = tl.where(mask, da * s * (1.0 - s), 0.0)
    if AFFINE:
        tl.store(dgamma_ptr + offs_o, tl.sum(dz * xhat, axis=0).to(dgamma_ptr.dtype.element_ty), mask=omask)
        tl.store(dbeta_ptr + offs_o, tl.sum(dz, axis=0).to(dbeta_ptr.dtype.element_ty), mask=omask)
        dxhat = dz * g[None, :]
    else:
        dxhat = dz
    if BATCH_STATS:
        m1 = tl.sum(dxhat, axis=0) / N
        m2 = tl.sum(dxhat * xhat, axis=0) / N
        dy = invstd[None, :] * (dxhat - m1[None, :] - xhat * m2[None, :])
    else:
        dy = dxhat * invstd[None, :]
    dy = tl.where(mask, dy, 0.0)
    tl.store(dy_ptr + idx, dy, mask=mask)
    for i0 in range(0, C_IN, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        imask = offs_i < C_IN
        m = tl.load(mean_ptr + offs_n[:, None] * C_IN + offs_i[None, :], mask=nmask[:, None] & imask[None, :],
                    other=0.0)
        dw = tl.sum(dy[:, :, None] * m[:, None, :], axis=0)
        tl.store(dw_ptr + offs_o[:, None] * C_IN + offs_i[None, :], dw.to(dw_ptr.dtype.element_ty),
                 mask=omask[:, None] & imask[None, :])


@triton.jit
def _vecmat_kernel(
    v_ptr,  # fp32 (N, K) contiguous rows
    w_ptr,  # weight (K, C) addressed by strides (a conv weight (C_out, C_in) read as K=C_out, C=C_in)
    out_ptr,  # out: fp32 (N, C) contiguous
    N,  # rows of v
    K,  # reduction length
    C,  # output length
    stride_wk,  # element stride of w along K
    stride_wc,  # element stride of w along C
    scale,  # fp32 factor applied to the result
    BLOCK_N: tl.constexpr,  # >= N, power of two
    BLOCK_K: tl.constexpr,  # reduction step
    BLOCK_C: tl.constexpr,  # outputs per program
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    nmask = offs_n < N
    cmask = offs_c < C
    acc = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < K
        v = tl.load(v_ptr + offs_n[:, None] * K + offs_k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_c[None, :] * stride_wc,
                    mask=kmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(v[:, :, None] * w[None, :, :], axis=1)
    tl.store(out_ptr + offs_n[:, None] * C + offs_c[None, :], acc * scale, mask=nmask[:, None] & cmask[None, :])


def _blocks(n: int, outer: int, inner: int, budget: int = 8192) -> tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_OUTER, BLOCK_INNER)`` for a [BLOCK_N, BLOCK_OUTER, BLOCK_INNER] fp32 product tile."""
    block_n = max(2, triton.next_power_of_2(n))
    block_o = min(triton.next_power_of_2(outer), 16 if INTERPRET else 32)
    block_i = max(1, min(triton.next_power_of_2(inner), budget // (block_n * block_o)))
    return block_n, block_o, block_i


def split_block(split: int, block_n: int, block_i: int, budget: int = 8192) -> int:
    """``BLOCK_S`` for finishing the mean: [BLOCK_S, BLOCK_N, BLOCK_I] fp32 tiles of at most ``budget`` elements."""
    return max(1, min(triton.next_power_of_2(split), budget // (block_n * block_i)))


def vecmat(v: torch.Tensor, w: torch.Tensor, stride_wk: int, stride_wc: int, c: int, scale: float = 1.0
           ) -> torch.Tensor:
    """fp32 ``scale * v @ W`` for fp32 (N, K) ``v`` and a weight read through ``(stride_wk, stride_wc)``."""
    n, k = v.shape
    out = torch.empty((n, c), device=v.device, dtype=torch.float32)
    block_n, block_c, block_k = _blocks(n, c, k)
    _vecmat_kernel[(triton.cdiv(c, block_c),)](v, w, out, n, k, c, stride_wk, stride_wc, scale,
                                               BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_C=block_c)
    return out


def bn_attention_fwd(
    part: torch.Tensor,
    hw: int,
    weight: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    batch_stats: bool,
    update: bool,
    momentum: float | None,
    eps: float,
    out_dtype: torch.dtype,
    num_batches_tracked: torch.Tensor | None = None,
    relu: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Launch the BN-attention forward on fp32 contiguous pixel sums ``part`` (SPLIT, N, C_IN) of maps of
    ``hw`` pixels; returns ``(a (N, C_OUT), y, mean, smean, sinvstd)``: ``a = sigmoid(z)``, or ``relu(z)``
    with ``relu`` (the context path's global-context vector), ``z = BN(W @ mean)``.

    ``momentum=None`` with ``update``: cumulative average, factor ``1 / num_batches_tracked`` read on the
    device (the caller has already counted this call), so no host sync."""
    cumulative = update and momentum is None
    if cumulative and num_batches_tracked is None:
        raise ValueError("momentum=None needs num_batches_tracked")
    part = fold_partials(part)
    split, n, c_in = part.shape
    c_out = weight.shape[0]
    dev = part.device
    a = torch.empty((n, c_out), device=dev, dtype=out_dtype)
    y = torch.empty((n, c_out), device=dev, dtype=torch.float32)
    mean = torch.empty((n, c_in), device=dev, dtype=torch.float32)
    smean = torch.empty((c_out,), device=dev, dtype=torch.float32)
    sinvstd = torch.empty((c_out,), device=dev, dtype=torch.float32)
    dummy = smean
    block_n, block_o, block_i = _blocks(n, c_out, c_in)
    _bn_attention_fwd_kernel[(triton.cdiv(c_out, block_o),)](
        part, weight, gamma if gamma is not None else dummy, beta if beta is not None else dummy,
        running_mean if running_mean is not None else dummy, running_var if running_var is not None else dummy,
        num_batches_tracked if cumulative else dummy,
        a, y, mean, smean, sinvstd, n, c_in, c_out, split, 1.0 / hw, eps, float(momentum or 0.0),
        weight.stride(0), weight.stride(1),
        BATCH_STATS=batch_stats, UPDATE=update, CUMULATIVE=cumulative, AFFINE=gamma is not None, RELU=relu,
        BLOCK_N=block_n, BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_S=split_block(split, block_n, block_i),
    )
    return a, y, mean, smean, sinvstd


def bn_attention_bwd(
    da: torch.Tensor,
    y: torch.Tensor,
    mean: torch.Tensor,
    smean: torch.Tensor,
    sinvstd: torch.Tensor,
    weight: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    batch_stats: bool,
    relu: bool,
    hw: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch the BN-attention backward (``relu`` as in the forward); returns ``(dmean / hw fp32 (N, C_IN),
    dW (C_OUT, C_IN), dgamma, dbeta)``: with the map's ``hw`` pixels, the first is the gradient of every partial
    pixel sum (the 1/HW is applied in the kernel writing it, not by a separate op)."""
    n, c_out = y.shape
    c_in = mean.shape[1]
    dev = y.device
    dy = torch.empty((n, c_out), device=dev, dtype=torch.float32)
    dw = torch.empty((c_out, c_in), device=dev, dtype=weight.dtype)
    dgamma = torch.empty_like(gamma) if gamma is not None else None
    dbeta = torch.empty_like(beta) if beta is not None else None
    block_n, block_o, block_i = _blocks(n, c_out, c_in)
    _bn_attention_bwd_kernel[(triton.cdiv(c_out, block_o),)](
        da, y, mean, smean, sinvstd, gamma if gamma is not None else smean, beta if beta is not None else smean,
        dy, dw, dgamma if dgamma is not None else smean, dbeta if dbeta is not None else smean,
        n, c_in, c_out, BATCH_STATS=batch_stats, AFFINE=gamma is not None, RELU=relu,
        BLOCK_N=block_n, BLOCK_O=block_o, BLOCK_I=block_i,
    )
    dsum = vecmat(dy, weight, weight.stride(0), weight.stride(1), c_in, 1.0 / hw)
    return dsum, dw, dgamma, dbeta


# ------------------------------------------------------------------------------ MLP attention


@triton.jit
def _mlp_attention_fwd_kernel(
    part_ptr,  # fp32 (SPLIT, N, C_IN) partial pixel sums of feat, contiguous
    w1_ptr,  # first 1x1 weight (C_MID, C_IN), strides below
    w2_ptr,  # second 1x1 weight (C_OUT, C_MID), strides below
    a_ptr,  # out: attention (N, C_OUT) in the output dtype
    u_ptr,  # out: fp32 (N, C_MID) pre-ReLU hidden, saved for backward (written by program 0)
    z_ptr,  # out: fp32 (N, C_OUT) pre-sigmoid logits, saved for backward
    mean_ptr,  # out: fp32 (N, C_IN) finished mean, saved for backward (written by program 0)
    N,  # batch size
    C_IN,  # input channels
    C_MID,  # hidden channels (<= BLOCK_H)
    C_OUT,  # output channels
    SPLIT,  # number of partials
    inv_hw,  # 1 / (H * W)
    stride_w1o,  # w1 element stride along C_MID
    stride_w1i,  # w1 element stride along C_IN
    stride_w2o,  # w2 element stride along C_OUT
    stride_w2i,  # w2 element stride along C_MID
    BLOCK_N: tl.constexpr,  # >= N, power of two
    BLOCK_H: tl.constexpr,  # >= C_MID, power of two: the whole hidden vector is held per program
    BLOCK_I: tl.constexpr,  # input channels per loop step
    BLOCK_O: tl.constexpr,  # output channels per program
    BLOCK_S: tl.constexpr,  # partials summed per step when finishing the mean
):
    pid = tl.program_id(0)
    offs_n = tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_H)
    offs_o = pid * BLOCK_O + tl.arange(0, BLOCK_O)
    nmask = offs_n < N
    u = _mean_matvec(part_ptr, mean_ptr, w1_ptr, offs_n, offs_h, N, C_IN, C_MID, SPLIT, inv_hw, stride_w1o,
                     stride_w1i, pid == 0, BLOCK_N, BLOCK_H, BLOCK_I, BLOCK_S)
    if pid == 0:
        tl.store(u_ptr + offs_n[:, None] * C_MID + offs_h[None, :], u, mask=nmask[:, None] & (offs_h < C_MID)[None, :])
    h = tl.maximum(u, 0.0, propagate_nan=tl.PropagateNan.ALL)
    z = _matvec_tile(h, w2_ptr, offs_o, offs_h, C_OUT, C_MID, stride_w2o, stride_w2i)
    mask = nmask[:, None] & (offs_o < C_OUT)[None, :]
    idx = offs_n[:, None] * C_OUT + offs_o[None, :]
    tl.store(z_ptr + idx, z, mask=mask)
    tl.store(a_ptr + idx, tl.sigmoid(z).to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mlp_attention_bwd_kernel(
    da_ptr,  # (N, C_OUT) gradient of the attention, contiguous, any float dtype
    z_ptr,  # fp32 (N, C_OUT) saved pre-sigmoid logits
    u_ptr,  # fp32 (N, C_MID) saved pre-ReLU hidden
    mean_ptr,  # fp32 (N, C_IN) saved mean of feat
    w2_ptr,  # second 1x1 weight (C_OUT, C_MID), strides below
    du_ptr,  # out: fp32 (N, C_MID) gradient of the pre-ReLU hidden
    dw1_ptr,  # out: (C_MID, C_IN) contiguous gradient of w1, in its dtype
    dw2_ptr,  # out: (C_OUT, C_MID) contiguous gradient of w2, in its dtype
    N,  # batch size
    C_IN,  # input channels
    C_MID,  # hidden channels
    C_OUT,  # output channels
    stride_w2o,  # w2 element stride along C_OUT
    stride_w2i,  # w2 element stride along C_MID
    BLOCK_N: tl.constexpr,  # >= N, power of two
    BLOCK_H: tl.constexpr,  # hidden channels per program
    BLOCK_O: tl.constexpr,  # output channels per loop step
    BLOCK_I: tl.constexpr,  # input channels per loop step
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_h = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    nmask = offs_n < N
    hmask = offs_h < C_MID
    nh_mask = nmask[:, None] & hmask[None, :]
    u = tl.load(u_ptr + offs_n[:, None] * C_MID + offs_h[None, :], mask=nh_mask, other=0.0)
    h = tl.maximum(u, 0.0, propagate_nan=tl.PropagateNan.ALL)
    dh = tl.zeros((BLOCK_N, BLOCK_H), tl.float32)
    for o0 in range(0, C_OUT, BLOCK_O):
        offs_o = o0 + tl.arange(0, BLOCK_O)
        omask = offs_o < C_OUT
        no_mask = nmask[:, None] & omask[None, :]
        idx = offs_n[:, None] * C_OUT + offs_o[None, :]
        s = tl.sigmoid(tl.load(z_ptr + idx, mask=no_mask, other=0.0))
        dz = tl.where(no_mask, tl.load(da_ptr + idx, mask=no_mask, other=0.0).to(tl.float32) * s * (1.0 - s), 0.0)
        w2 = tl.load(w2_ptr + offs_o[:, None] * stride_w2o + offs_h[None, :] * stride_w2i,
                     mask=omask[:, None] & hmask[None, :], other=0.0).to(tl.float32)
        dh += tl.sum(dz[:, :, None] * w2[None, :, :], axis=1)
        dw2 = tl.sum(dz[:, :, None] * h[:, None, :], axis=0)
        tl.store(dw2_ptr + offs_o[:, None] * C_MID + offs_h[None, :], dw2.to(dw2_ptr.dtype.element_ty),
                 mask=omask[:, None] & hmask[None, :])
    du = tl.where(u <= 0.0, 0.0, dh)  # NaN passes, as torch's ReLU backward
    tl.store(du_ptr + offs_n[:, None] * C_MID + offs_h[None, :], du, mask=nh_mask)
    for i0 in range(0, C_IN, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        imask = offs_i < C_IN
        m = tl.load(mean_ptr + offs_n[:, None] * C_IN + offs_i[None, :], mask=nmask[:, None] & imask[None, :],
                    other=0.0)
        dw1 = tl.sum(du[:, :, None] * m[:, None, :], axis=0)
        tl.store(dw1_ptr + offs_h[:, None] * C_IN + offs_i[None, :], dw1.to(dw1_ptr.dtype.element_ty),
                 mask=hmask[:, None] & imask[None, :])


MAX_MLP_HIDDEN = 1024


def mlp_attention_fwd(
    part: torch.Tensor, hw: int, w1: torch.Tensor, w2: torch.Tensor, out_dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """Launch the MLP-attention forward on fp32 contiguous pixel sums ``part`` (SPLIT, N, C_IN) of maps of
    ``hw`` pixels; returns ``(a (N, C_OUT), u, z, mean)``."""
    part = fold_partials(part)
    split, n, c_in = part.shape
    c_mid, c_out = w1.shape[0], w2.shape[0]
    if c_mid > MAX_MLP_HIDDEN:
        raise ValueError(f"mlp_attention supports at most {MAX_MLP_HIDDEN} hidden channels, got {c_mid}")
    dev = part.device
    a = torch.empty((n, c_out), device=dev, dtype=out_dtype)
    u = torch.empty((n, c_mid), device=dev, dtype=torch.float32)
    z = torch.empty((n, c_out), device=dev, dtype=torch.float32)
    mean = torch.empty((n, c_in), device=dev, dtype=torch.float32)
    block_n = max(2, triton.next_power_of_2(n))
    block_h = triton.next_power_of_2(c_mid)
    block_o = max(1, min(16, 8192 // (block_n * block_h)))
    block_i = max(1, min(triton.next_power_of_2(c_in), 8192 // (block_n * block_h)))
    _mlp_attention_fwd_kernel[(triton.cdiv(c_out, block_o),)](
        part, w1, w2, a, u, z, mean, n, c_in, c_mid, c_out, split, 1.0 / hw,
        w1.stride(0), w1.stride(1), w2.stride(0), w2.stride(1),
        BLOCK_N=block_n, BLOCK_H=block_h, BLOCK_I=block_i, BLOCK_O=block_o,
        BLOCK_S=split_block(split, block_n, block_i),
    )
    return a, u, z, mean


def mlp_attention_bwd(
    da: torch.Tensor, z: torch.Tensor, u: torch.Tensor, mean: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
    hw: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the MLP-attention backward; returns ``(dmean / hw fp32 (N, C_IN), dW1, dW2)`` (``hw`` as in
    :func:`bn_attention_bwd`)."""
    n, c_out = z.shape
    c_mid, c_in = u.shape[1], mean.shape[1]
    dev = z.device
    du = torch.empty((n, c_mid), device=dev, dtype=torch.float32)
    dw1 = torch.empty((c_mid, c_in), device=dev, dtype=w1.dtype)
    dw2 = torch.empty((c_out, c_mid), device=dev, dtype=w2.dtype)
    block_n, block_h, block_o = _blocks(n, c_mid, c_out)
    block_i = block_o
    _mlp_attention_bwd_kernel[(triton.cdiv(c_mid, block_h),)](
        da, z, u, mean, w2, du, dw1, dw2, n, c_in, c_mid, c_out, w2.stride(0), w2.stride(1),
        BLOCK_N=block_n, BLOCK_H=block_h, BLOCK_O=block_o, BLOCK_I=block_i,
    )
    dsum = vecmat(du, w1, w1.stride(0), w1.stride(1), c_in, 1.0 / hw)
    return dsum, dw1, dw2
