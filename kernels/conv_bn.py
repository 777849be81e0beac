"""Fused convolution + BatchNorm (+ residual) (+ ReLU): Triton kernels and their launch helpers.

Layout: activations are addressed as NHWC matrices. The conv is an implicit GEMM with
``M = N * Ho * Wo`` rows (output pixels), ``N = C_out`` columns and ``K = KH * KW * C_in`` reduction,
accumulated in fp32. The input is read through its four strides, so NCHW (the user's image, no layout
pass) and channels_last inputs both work; every output written here is a contiguous ``(M, C)``
matrix, i.e. an ``(N, C, H, W)`` tensor in ``torch.channels_last``. The weight is pre-packed by the
caller as a row-major ``(K, C_out)`` matrix with row index ``(kh * KW + kw) * C_in + c``.

Why a packed weight and not the module's own ``(C_out, C_in, KH, KW)`` tensor read through its strides:
in that layout a B tile (BLOCK_K input channels x BLOCK_N output channels of one tap) has stride
``KH*KW`` along K and ``C_in*KH*KW`` along N, so for 3x3/7x7 convs no two neighbouring elements of a
tile are adjacent in memory and every load is a scattered 2-4 byte access (only 1x1 convs would be
coalesced along K); under autocast it would also read the fp32 master weight (2x the bytes) and cast
in the inner loop. Packed ``(K, C_out)`` rows are contiguous along N: fully coalesced B loads, in the
activation dtype. The packing is cached by the caller (:mod:`fastbisenet.ops.conv_bn`), so it costs
one copy per weight change, not one per call.

Kernels:
    :func:`conv_bn_fwd_kernel`   implicit GEMM + epilogue (bias, per-channel statistics, eval-mode BN
                                 folded from the raw BN parameters and running statistics, residual,
                                 ReLU), all optional through constexpr flags. An eval-mode conv+BN is
                                 this one launch and nothing else: no host-side fold, no side ops.
                                 POOL also writes per-image pixel sums of the output (the spatial mean
                                 a channel attention needs, gathered here instead of re-reading the map).
    :func:`bn_stats_kernel`      batch mean/invstd from the forward's partial statistics, running-stat update
                                 and ``num_batches_tracked`` count.
    :func:`partials_reduce_kernel`  one parallel level of those reductions for large maps (the finishing
                                 kernels run one program per 64 channels, which alone would read the
                                 32768 partial slots of an 8x1024x1024 stem from a single SM).
    :func:`bn_act_kernel`        ``relu((y - mean) * scale + shift + residual)``: train-mode second pass
                                 (POOL: pixel sums of its output, as the forward kernel's).
    :func:`bn_act_bwd_reduce_kernel`  per-tile partial sums of ``g`` and ``g * xhat`` (``g`` = masked
                                 upstream gradient), the two BN backward reductions in one pass.
    :func:`bn_bwd_coef_kernel`   the sums finished into the coefficients ``a, b, c`` and ``dgamma``/``dbeta``.
    :func:`bn_act_bwd_kernel`    ``dy = a * g + b * (y - mean) + c`` and ``dres = g`` in one pass.

The backward kernels take the pixel sums' gradient as an optional extra input, gathered per slot
and added to the output's gradient before the ReLU mask.

Offsets: the batch index and every ``(M, C)`` row offset are computed in int64; offsets inside one
image (``c * s_c + h * s_h + w * s_w``) stay int32, which the launchers check (one image < 2**31
elements).

Known trap (pytorch issue 173068): Triton has miscompiled flattened-K conv loops at ``num_warps=8``;
the GPU configs below therefore stay at ``num_warps <= 4``. Any new config must be tested compiled.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import INTERPRET, sm_count

# ------------------------------------------------------------------------------------------ configs

STAT_M_DEFAULT: int = 32 if INTERPRET else 64
"""Rows per partial-statistics slot of the forward kernel; every ``BLOCK_M`` is a multiple of it."""

_OFF = ("0", "false", "no", "off")
STEM_ROW_LOOP: bool = os.environ.get("FASTBISENET_STEM_ROW_LOOP", "1").strip().lower() not in _OFF
"""Convs with C_in < 32 (the 7x7 stems on the image) loop per kernel row with a transposed gather (ROW_K):
~2x fewer sm_90 instructions in the stem's K loop than the flattened loop (bench/compile_audit.py), at
40% more MMA work. Not yet timed on a GPU: ``FASTBISENET_STEM_ROW_LOOP=0`` (or setting this to False
before the first launch) selects the flattened loop for an A/B. Both are tested against float64
references in tests/test_conv_bn.py."""

_ELT_BLOCK_M: int = 64
"""Rows per program of the element-wise kernels (fixed: their partial-sum layout depends on it)."""


def _fwd_configs() -> list[triton.Config]:
    if INTERPRET:  # the interpreter runs every program in numpy: one config, no benchmarking
        return [triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 256, "GROUP_M": 8, "ONE_LOOP": False})]
    return gpu_fwd_configs()


def gpu_fwd_configs() -> list[triton.Config]:
    """The forward kernel's autotune configs on a GPU (before :func:`_prune_fwd_configs`): each tile in both
    K-loop forms (``ONE_LOOP``, see :func:`_accumulate`), which autotuning picks between per shape."""
    # num_warps <= 4 on purpose (see the module docstring); all BLOCK_M are multiples of 64.
    cfgs = [
        (128, 128, 32, 3, 4),
        (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4),
        (64, 64, 32, 4, 4),
        (128, 128, 64, 3, 4),
        (64, 32, 32, 4, 2),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "ONE_LOOP": one},
                      num_stages=s, num_warps=w)
        for one in (False, True)
        for bm, bn, bk, s, w in cfgs
    ]


# ------------------------------------------------------------------------------------------ helpers


@triton.jit
def _nhwc_offsets(offs_m, offs_c, HW, W, s_n, s_c, s_h, s_w):
    """int64 offsets of the ``(pixel, channel)`` grid ``offs_m x offs_c`` in a strided (N, C, H, W) tensor."""
    n = offs_m // HW
    hw = offs_m % HW
    h = hw // W
    w = hw % W
    row = n.to(tl.int64) * s_n + (h * s_h + w * s_w)
    return row[:, None] + offs_c[None, :] * s_c


@triton.jit
def _round_tf32(v):
    """fp32 ``v`` rounded to tf32 (10 mantissa bits), to nearest with ties away from zero (PTX ``cvt.rna``);
    NaN kept. Done in integer ops so that the interpreter runs it too (no inline asm there)."""
    r = ((v.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)
    return tl.where(v == v, r, v)


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr):
    """``acc + a @ b`` on the tensor cores. fp32 operands of a ``"tf32"`` dot are first rounded to nearest:
    sm_90's tf32 wgmma reads the raw fp32 bits from shared memory and drops the low 13 (truncation, a bias
    toward zero that compounds through the network: an emulated fp32 v1 model gave logits ~1% too small,
    against 0.01% with rounding); PyTorch's TF32 convs round. bf16/fp16 operands pass through."""
    if DOT_PRECISION == "tf32":
        if a.dtype == tl.float32:
            a = _round_tf32(a)
        if b.dtype == tl.float32:
            b = _round_tf32(b)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _accumulate(
    acc, x_ptr, w_ptr, x_row, ih0, iw0, m_mask, offs_n, n_mask,
    C, H, W, s_c, s_h, s_w, w_row0, C_out,
    KH: tl.constexpr, KW: tl.constexpr, FLAT_C: tl.constexpr, ROW_K: tl.constexpr, ONE_LOOP: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Add one input segment's contribution ``x_seg @ w[w_row0 : w_row0 + KH*KW*C]`` to ``acc``.

    acc: fp32 (BLOCK_M, BLOCK_N) accumulator. x_ptr: the segment's input. w_ptr: packed (K, C_out)
    weight. x_row: int64 (BLOCK_M,) offset of each output pixel's image (``n * s_n``). ih0/iw0:
    (BLOCK_M,) top-left input coordinate of each pixel's window (``oh * stride - pad``). m_mask:
    (BLOCK_M,) valid pixels. offs_n/n_mask: output channels of this tile. C/H/W: the segment's
    channels and spatial size. s_c/s_h/s_w: its strides. w_row0: first weight row of the segment.

    Two loop shapes. The default loops over taps with an inner loop over BLOCK_K-channel blocks: the
    A tile of one step is one tap's channels, so its addresses and bounds mask are per row (1-D);
    ONE_LOOP runs the same steps as a single loop (see the branch below).
    FLAT_C > 0 (the segment's C as a constexpr, for C < 32 such as the 3-channel image) runs one loop
    over the flattened ``KH*KW*C`` axis instead; each A element is then a separate gather, so its cost
    is kept down: the divisions of the K index are by constants, its offset ``c*s_c + kh*s_h + kw*s_w``
    is a 1-D vector per step and one unsigned test per coordinate covers both bounds. On sm_90 this took
    the stem's K loop (128x64 bf16 tiles) from 1761 to 1323 instructions per 4 wgmma with triton 3.6 and
    from 749 to 574 with 3.9 (bench/compile_audit.py); a 3x3 conv's takes ~110. Still gather-bound: the
    ROW_K form below (the default, see STEM_ROW_LOOP) takes about half as many per tile.
    """
    offs_k = tl.arange(0, BLOCK_K)
    if FLAT_C > 0 and ROW_K and KW * FLAT_C <= BLOCK_K:
        # ROW_K (default, see STEM_ROW_LOOP): one K step per kernel row; the (kw, c) pair offsets and the
        # 2-D iw mask are loop-invariant, a step adds a 1-D row offset and ih test, and the gather is built
        # transposed (K, M) so that a thread holds few pixels x many K lanes. sm_90 K loop of the stem
        # (128x64, bf16): 497 instructions x 7 steps vs 1323 x 5 flattened with triton 3.6 (195 vs 575
        # with 3.9), at 40% more MMA work (21 of 32 K lanes used).
        KWC: tl.constexpr = KW * FLAT_C
        j_mask = offs_k < KWC
        kw_j = offs_k // FLAT_C
        pair_off = kw_j * s_w + (offs_k % FLAT_C) * s_c
        iw_j = (iw0[None, :] + kw_j[:, None]).to(tl.uint32)  # negative -> huge: one test covers both bounds
        col_ok = (m_mask[None, :] & j_mask[:, None]) & (iw_j < tl.cast(W, tl.uint32))
        row_base_j = x_row + iw0 * s_w
        for kh_j in range(0, KH):
            ih_j = ih0 + kh_j
            row_ok = (ih_j >= 0) & (ih_j < H)
            a_off = (row_base_j + ih_j * s_h)[None, :] + pair_off[:, None]
            a = tl.trans(tl.load(x_ptr + a_off, mask=col_ok & row_ok[None, :], other=0.0))
            b_off = (w_row0 + kh_j * KWC + offs_k)[:, None] * C_out + offs_n[None, :]
            b = tl.load(w_ptr + b_off, mask=j_mask[:, None] & n_mask[None, :], other=0.0)
            acc = _mma(a, b, acc, DOT_PRECISION)
    elif FLAT_C > 0:
        K_seg: tl.constexpr = KH * KW * FLAT_C
        row_base = x_row + (ih0 * s_h + iw0 * s_w)
        h_lim = tl.cast(H, tl.uint32)
        w_lim = tl.cast(W, tl.uint32)
        for k0 in range(0, K_seg, BLOCK_K):
            kk = k0 + offs_k
            k_mask = kk < K_seg
            c = kk % FLAT_C
            tap = kk // FLAT_C
            kh = tap // KW
            kw = tap % KW
            ih = (ih0[:, None] + kh[None, :]).to(tl.uint32)  # negative -> huge: one test covers both bounds
            iw = (iw0[:, None] + kw[None, :]).to(tl.uint32)
            a_mask = (m_mask[:, None] & k_mask[None, :]) & ((ih < h_lim) & (iw < w_lim))
            a_off = row_base[:, None] + (c * s_c + kh * s_h + kw * s_w)[None, :]
            a = tl.load(x_ptr + a_off, mask=a_mask, other=0.0)
            b_off = (w_row0 + kk)[:, None] * C_out + offs_n[None, :]
            b = tl.load(w_ptr + b_off, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = _mma(a, b, acc, DOT_PRECISION)
    elif ONE_LOOP:
        # One loop over (tap, channel block) steps: Triton software-pipelines only innermost loops, so in
        # the nested form below every tap restarts the cp.async pipeline (C_in = 64 at BLOCK_K = 64 is a
        # one-step inner loop: no overlap at all). Here loads of the next steps are in flight across
        # taps, at the cost of the row masks recomputed every step: sm_90 SASS instructions per wgmma of the
        # loop 42 vs 27 at 128x128x32 and 58 vs 42 at 64x64x32 (bf16, triton 3.9; the nested form also runs
        # a pipeline prologue per tap). Picked per shape by autotuning.
        row_base = x_row + (ih0 * s_h + iw0 * s_w)  # per row, loop-invariant; a step adds scalars
        h_lim = tl.cast(H, tl.uint32)
        w_lim = tl.cast(W, tl.uint32)
        tap = C * 0  # loop-carried (tap, first channel) instead of a runtime division of the step index
        c0 = C * 0
        for _ in range(0, KH * KW * tl.cdiv(C, BLOCK_K)):
            c = c0 + offs_k
            kh = tap // KW
            kw = tap - kh * KW
            ih = ih0 + kh
            iw = iw0 + kw
            # tl.cast, not H.to(): an int argument equal to 1 is specialised to a Python int by the JIT
            row_mask = m_mask & (ih.to(tl.uint32) < h_lim) & (iw.to(tl.uint32) < w_lim)
            c_mask = c < C
            a = tl.load(
                x_ptr + (row_base[:, None] + (kh * s_h + kw * s_w + c * s_c)[None, :]),
                mask=row_mask[:, None] & c_mask[None, :], other=0.0,
            )
            b_off = (w_row0 + tap * C + c)[:, None] * C_out + offs_n[None, :]
            b = tl.load(w_ptr + b_off, mask=c_mask[:, None] & n_mask[None, :], other=0.0)
            acc = _mma(a, b, acc, DOT_PRECISION)
            wrap = (c0 + BLOCK_K >= C).to(tl.int32)
            tap += wrap
            c0 = (c0 + BLOCK_K) * (1 - wrap)
    else:
        for tap in range(0, KH * KW):
            kh = tap // KW
            kw = tap % KW
            ih = ih0 + kh
            iw = iw0 + kw
            row_mask = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            row_off = x_row + (ih * s_h + iw * s_w)
            for c0 in range(0, C, BLOCK_K):
                c = c0 + offs_k
                c_mask = c < C
                a = tl.load(
                    x_ptr + (row_off[:, None] + c[None, :] * s_c),
                    mask=row_mask[:, None] & c_mask[None, :], other=0.0,
                )
                b_off = (w_row0 + tap * C + c)[:, None] * C_out + offs_n[None, :]
                b = tl.load(w_ptr + b_off, mask=c_mask[:, None] & n_mask[None, :], other=0.0)
                acc = _mma(a, b, acc, DOT_PRECISION)
    return acc


@triton.jit
def _segment_rows(pid_m, SEG, BLOCK_M: tl.constexpr):
    """Rows of M-tile ``pid_m`` when rows are tiled in segments of SEG (``M``, or one image's ``H*W`` so
    that no tile straddles two images; ``cdiv(SEG, BLOCK_M)`` tiles per segment).

    Returns ``(seg, row0, offs_m, m_mask)``: the segment, the tile's first row inside it, the tile's
    global rows and which of them exist.
    """
    tiles_per_seg = tl.cdiv(SEG, BLOCK_M)
    seg = pid_m // tiles_per_seg
    row0 = (pid_m % tiles_per_seg) * BLOCK_M
    local_m = row0 + tl.arange(0, BLOCK_M)
    return seg, row0, seg * SEG + local_m, local_m < SEG


@triton.jit
def _store_pixel_sums(
    pool_ptr, stored, mask, n, row0, offs_c, c_mask, N, C, n_slot,
    SLOT_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Pixel sums of an output tile of one image, one per SLOT_M rows: ``pool[slot, n, c]`` (fp32).

    stored: the (BLOCK_M, BLOCK_C) tile as written (in the output dtype: the sums are those of the
    tensor the consumer sees); mask: its valid elements; n: the image; row0: the tile's first row inside
    the image (a multiple of SLOT_M); pool_ptr fp32 (n_slot, N, C).
    """
    S: tl.constexpr = BLOCK_M // SLOT_M
    v = tl.reshape(tl.where(mask, stored.to(tl.float32), 0.0), (S, SLOT_M, BLOCK_C))
    sums = tl.sum(v, axis=1)
    slot = row0 // SLOT_M + tl.arange(0, S)
    off = (slot.to(tl.int64)[:, None] * N + n) * C + offs_c[None, :]
    tl.store(pool_ptr + off, sums, mask=(slot < n_slot)[:, None] & c_mask[None, :])


# ------------------------------------------------------------------------------------------ forward


def _loop_form_may_win(c: triton.Config, c_in: int, nested_only: bool) -> bool:
    """Whether config ``c``'s K-loop form (``ONE_LOOP``) is kept for ``c_in`` input channels per tap."""
    if nested_only:
        return not c.kwargs["ONE_LOOP"]
    steps = triton.cdiv(c_in, c.kwargs["BLOCK_K"])
    return steps < 8 if c.kwargs["ONE_LOOP"] else steps >= 2


def _prune_fwd_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Skip configs that cannot win before autotuning benchmarks them (facts from bench/compile_audit.py, sm_90):

    * ``BLOCK_N`` wider than ``C_out`` (rounded up to a power of two, at least 32): the extra columns
      are masked work, and the 128x128 tiles of the 7x7 stem (C_out = 64) spill inside the K loop;
    * 128x128 tiles on 4-byte (fp32 / tf32) inputs: at BLOCK_K=64, 192 KiB of shared memory for 3 stages
      and ~60-165 spill instructions inside the K loop in every such variant the model launches; at 32, with
      the operands' tf32 rounding in registers (:func:`_mma`), 29-43 in the nested form (triton 3.6) (IEEE
      fp32 dots, with TF32 turned off, lose these tiles too: fp32 is not the fast path);
    * 128x128 tiles on convs with C_in < 32 (FLAT_C, the stems, also merged to C_out = 128): their
      gathered A tile spills inside the K loop with either loop form (triton 3.6, bf16: 22 spill
      instructions per step at BLOCK_K=32, 129 at 64; fp32: 8), while 64x128 tiles do not;
    * ``ONE_LOOP`` where it changes nothing: 1x1 convs (one tap: the nested loop is already one loop)
      and C_in < 32 (FLAT_C: their own loop forms);
    * the K-loop form that cannot win by the sm_90 pipelining facts (see :func:`_accumulate`), by the
      channel steps per tap ``cdiv(C_in, BLOCK_K)``: the nested form at 1 step (every tap a one-step loop,
      no load overlaps an MMA), the one-loop form at >= 8 steps (the nested form's per-tap pipeline drain is
      then <= 1/8 of the steps; predicted, not timed, to cost less than the one-loop form's per-step mask
      math, ~1.5x the instructions per wgmma). In between, autotuning decides (C_in = 64, 128 at
      BLOCK_K = 32, and 256 at 64 in the model).

    Never returns an empty list (a single forced config, as in tests/test_autotune_configs.py, stays).
    """
    args = {**named_args, **kwargs}
    n_max = max(32, triton.next_power_of_2(args["C_out"]))
    wide = args["x_ptr"].element_size() >= 4
    small_c = args["FLAT_C"] > 0
    one_tap = args["KH"] * args["KW"] == 1

    def big(c: triton.Config) -> bool:
        return c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] >= 128 * 128

    kept = [
        c for c in configs
        if c.kwargs["BLOCK_N"] <= n_max
        and not (wide and big(c))
        and not (small_c and big(c))
        and _loop_form_may_win(c, args["C_in"], small_c or one_tap)
    ]
    return kept or configs


@triton.autotune(
    configs=_fwd_configs(),
    key=["M", "C_in", "C_in2", "C_out", "KH", "KW", "STRIDE_H", "FLAT_C", "ROW_K"],
    prune_configs_by={"early_config_prune": _prune_fwd_configs},
)
@triton.jit
def conv_bn_fwd_kernel(
    x_ptr, x2_ptr, w_ptr, bias_ptr, gamma_ptr, beta_ptr, rmean_ptr, rvar_ptr, res_ptr, out_ptr, part_ptr, pool_ptr,
    M, SEG, H, W, Ho, Wo, C_in, C_in2, C_out, n_part, n_slot, eps,
    sx_n, sx_c, sx_h, sx_w,
    sx2_n, sx2_c, sx2_h, sx2_w,
    sr_n, sr_c, sr_h, sr_w,
    KH: tl.constexpr, KW: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    HAS_X2: tl.constexpr, HAS_BIAS: tl.constexpr, STATS: tl.constexpr,
    BN_EVAL: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, HAS_RES: tl.constexpr,
    RELU: tl.constexpr, POOL: tl.constexpr, FLAT_C: tl.constexpr, ROW_K: tl.constexpr, STAT_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ONE_LOOP: tl.constexpr,
):
    """``out = relu?(bn_eval?(conv(x) + bias?) + res?)``; optional channel statistics or pixel sums.

    Pointers: x_ptr input (N, C_in, H, W), any strides; x2_ptr second input (N, C_in2, H, W) when
    HAS_X2 (a channel-concat that is never materialised; 1x1 convs only, weight rows C_in..); w_ptr
    packed (KH*KW*C_in [+ C_in2], C_out) weight; bias_ptr (C_out,) conv bias (HAS_BIAS);
    gamma_ptr/beta_ptr (C_out,) BN weight/bias (HAS_GAMMA/HAS_BETA; absent means 1/0, i.e.
    ``affine=False``) and rmean_ptr/rvar_ptr (C_out,) BN running statistics (BN_EVAL), any float
    dtype, read and folded in fp32; res_ptr residual (N, C_out, Ho, Wo), any strides (HAS_RES); out_ptr
    (M, C_out) contiguous output, its dtype is the output dtype; part_ptr fp32 (2, n_part, C_out)
    per-slot mean and centred sum of squares of ``conv + bias`` (STATS); pool_ptr fp32 (n_slot, N, C_out)
    pixel sums of the output as stored (POOL): slot ``s`` of image ``n`` sums its output pixels
    ``[s * STAT_M, (s + 1) * STAT_M)`` (flat ``oh * Wo + ow``), for the channel attention that follows.
    Sizes: M = N*Ho*Wo; SEG rows per tiling segment: ``Ho*Wo`` with POOL (tiles never straddle two
    images), else ``M``; H/W input, Ho/Wo output spatial size; n_part = cdiv(M, STAT_M);
    n_slot = cdiv(Ho*Wo, STAT_M). eps: fp32 BN epsilon (BN_EVAL).
    Strides: sx_* of x, sx2_* of x2, sr_* of the residual (element units, NCHW order).
    Constexprs: KH/KW kernel size, STRIDE_*/PAD_* conv stride and zero padding; the flags select the
    epilogue stages (applied in this order: bias, statistics, eval BN, residual, ReLU, pixel sums;
    STATS needs SEG == M, POOL needs SEG == Ho*Wo, so the two are exclusive). BN_EVAL folds
    BN per channel in the epilogue, ``scale = gamma * rsqrt(running_var + eps)``,
    ``shift = beta + (bias - running_mean) * scale`` (the conv bias folded into the shift), then
    ``acc * scale + shift``: one FMA per element; STATS and BN_EVAL are exclusive. FLAT_C = C_in
    (< 32) picks the flattened-K loop (ROW_K: its per-kernel-row form), 0 the per-tap loop (see
    :func:`_accumulate`); STAT_M rows per
    statistics slot (divides BLOCK_M); DOT_PRECISION ``"ieee"``/``"tf32"`` for fp32 inputs; BLOCK_*/GROUP_M tiling
    and ONE_LOOP (the per-tap loop's form: nested, or one loop over (tap, channel block) steps) come from
    the autotune config.
    """
    pid = tl.program_id(0)
    num_pid_m = (M // SEG) * tl.cdiv(SEG, BLOCK_M)
    num_pid_n = tl.cdiv(C_out, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_size
    pid_n = (pid % group) // group_size

    seg, seg_row0, offs_m, m_mask = _segment_rows(pid_m, SEG, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < C_out
    HWo = Ho * Wo
    n_img = offs_m // HWo
    hw = offs_m % HWo
    oh = hw // Wo
    ow = hw % Wo
    ih0 = oh * STRIDE_H - PAD_H
    iw0 = ow * STRIDE_W - PAD_W

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _accumulate(
        acc, x_ptr, w_ptr, n_img.to(tl.int64) * sx_n, ih0, iw0, m_mask, offs_n, n_mask,
        C_in, H, W, sx_c, sx_h, sx_w, 0, C_out, KH, KW, FLAT_C, ROW_K, ONE_LOOP, BLOCK_K, DOT_PRECISION,
    )
    if HAS_X2:
        acc = _accumulate(
            acc, x2_ptr, w_ptr, n_img.to(tl.int64) * sx2_n, ih0, iw0, m_mask, offs_n, n_mask,
            C_in2, H, W, sx2_c, sx2_h, sx2_w, C_in, C_out, 1, 1, 0, False, ONE_LOOP, BLOCK_K, DOT_PRECISION,
        )

    if HAS_BIAS and not BN_EVAL:  # with BN_EVAL the bias is folded into the BN shift below
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if STATS:
        # Per-slot (STAT_M rows) mean and centred sum of squares, combined later with Chan's formula:
        # no catastrophic cancellation for inputs with a large mean, unlike raw sum / sum of squares.
        S: tl.constexpr = BLOCK_M // STAT_M
        valid = m_mask[:, None] & n_mask[None, :]
        v3 = tl.reshape(tl.where(valid, acc, 0.0), (S, STAT_M, BLOCK_N))
        cnt = tl.sum(tl.reshape(m_mask.to(tl.float32), (S, STAT_M)), axis=1)
        mean_s = tl.sum(v3, axis=1) / tl.maximum(cnt, 1.0)[:, None]
        d = tl.where(tl.reshape(valid, (S, STAT_M, BLOCK_N)), v3 - mean_s[:, None, :], 0.0)
        m2_s = tl.sum(d * d, axis=1)
        slot = tl.min(tl.reshape(offs_m, (S, STAT_M)), axis=1) // STAT_M
        p_off = slot[:, None] * C_out + offs_n[None, :]
        p_mask = (slot < n_part)[:, None] & n_mask[None, :]
        tl.store(part_ptr + p_off, mean_s, mask=p_mask)
        tl.store(part_ptr + n_part * C_out + p_off, m2_s, mask=p_mask)
    if BN_EVAL:
        # Per-channel fold of this tile's BLOCK_N channels, in fp32 (vector work, negligible next to the GEMM).
        rmean = tl.load(rmean_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        rvar = tl.load(rvar_ptr + offs_n, mask=n_mask, other=1.0).to(tl.float32)
        scale = 1.0 / tl.sqrt_rn(rvar + eps)
        if HAS_GAMMA:
            scale = scale * tl.load(gamma_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            rmean = rmean - tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        shift = -rmean * scale
        if HAS_BETA:
            shift += tl.load(beta_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc = acc * scale[None, :] + shift[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RES:
        r_off = _nhwc_offsets(offs_m, offs_n, HWo, Wo, sr_n, sr_c, sr_h, sr_w)
        acc += tl.load(res_ptr + r_off, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as torch.relu
    out_off = offs_m.to(tl.int64)[:, None] * C_out + offs_n[None, :]
    stored = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + out_off, stored, mask=mask)
    if POOL:
        _store_pixel_sums(pool_ptr, stored, mask, seg, seg_row0, offs_n, n_mask, M // SEG, C_out, n_slot,
                          STAT_M, BLOCK_M, BLOCK_N)


@triton.jit
def bn_act_kernel(
    y_ptr, mean_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr, pool_ptr,
    M, SEG, C, HW, W, n_slot, sr_n, sr_c, sr_h, sr_w,
    HAS_RES: tl.constexpr, RELU: tl.constexpr, POOL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``out = relu?((y - mean) * scale + shift + res?)``: BN normalisation pass of train mode.

    y_ptr (M, C) contiguous conv output; mean_ptr/scale_ptr/shift_ptr (C,) fp32 batch mean,
    ``gamma * invstd`` and ``beta``; res_ptr residual (N, C, H, W), any strides sr_* (HAS_RES); out_ptr
    (M, C) contiguous output. HW/W: output spatial size for the residual's addressing. Rows are tiled
    in segments of SEG (``HW`` with POOL, else ``M``); grid ``((M // SEG) * cdiv(SEG, BLOCK_M), cdiv(C, BLOCK_C))``.
    POOL: pool_ptr fp32 (n_slot, N, C) pixel sums of the output as stored, one slot per BLOCK_M rows of
    an image (n_slot = cdiv(HW, BLOCK_M)), as :func:`conv_bn_fwd_kernel` writes them.
    """
    seg, row0, offs_m, m_mask = _segment_rows(tl.program_id(0), SEG, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    mask = m_mask[:, None] & c_mask[None, :]
    off = offs_m.to(tl.int64)[:, None] * C + offs_c[None, :]
    y = tl.load(y_ptr + off, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + offs_c, mask=c_mask, other=0.0)
    scale = tl.load(scale_ptr + offs_c, mask=c_mask, other=0.0)
    shift = tl.load(shift_ptr + offs_c, mask=c_mask, other=0.0)
    v = (y - mean[None, :]) * scale[None, :] + shift[None, :]
    if HAS_RES:
        r_off = _nhwc_offsets(offs_m, offs_c, HW, W, sr_n, sr_c, sr_h, sr_w)
        v += tl.load(res_ptr + r_off, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        v = tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as torch.relu
    stored = v.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + off, stored, mask=mask)
    if POOL:
        _store_pixel_sums(pool_ptr, stored, mask, seg, row0, offs_c, c_mask, M // SEG, C, n_slot,
                          BLOCK_M, BLOCK_M, BLOCK_C)


@triton.jit
def _combine_partials(
    part_ptr, t_begin, t_end, offs_c, c_mask, M, C, n_part, slot_m,
    CHAN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Combine slots ``[t_begin, t_end)`` of fp32 (2, n_part, C) partials for the channels ``offs_c``.

    CHAN: slot ``t`` holds the mean and centred sum of squares of ``min(slot_m, M - t * slot_m)`` rows;
    returns their ``(mean, M2)``, merged block by block with Chan's formula
    ``M2 = M2_a + M2_b + delta**2 * n_a * n_b / (n_a + n_b)`` (one read of each slot, no cancellation).
    Else the slots are plain sums; returns ``(sum of part[0], sum of part[1])``. BLOCK_T slots per step.
    """
    offs_t = tl.arange(0, BLOCK_T)
    first = tl.zeros((BLOCK_C,), dtype=tl.float32)
    second = tl.zeros((BLOCK_C,), dtype=tl.float32)
    rows = tl.zeros((BLOCK_C,), dtype=tl.float32)  # rows merged so far (the same for every channel)
    for t0 in range(t_begin, t_end, BLOCK_T):
        t = t0 + offs_t
        valid = t < t_end
        mask = valid[:, None] & c_mask[None, :]
        off = t[:, None] * C + offs_c[None, :]
        p0 = tl.load(part_ptr + off, mask=mask, other=0.0)
        p1 = tl.load(part_ptr + n_part * C + off, mask=mask, other=0.0)
        if CHAN:
            cnt = tl.where(valid, tl.minimum(M - t * slot_m, slot_m), 0).to(tl.float32)
            n_b = tl.sum(cnt, axis=0)
            mean_b = tl.sum(cnt[:, None] * p0, axis=0) / n_b
            d = p0 - mean_b[None, :]
            m2_b = tl.sum(tl.where(mask, p1 + cnt[:, None] * d * d, 0.0), axis=0)
            n_ab = rows + n_b
            delta = mean_b - first
            first += delta * (n_b / n_ab)
            second += m2_b + delta * delta * (rows * (n_b / n_ab))
            rows = n_ab
        else:
            first += tl.sum(p0, axis=0)
            second += tl.sum(p1, axis=0)
    return first, second


@triton.jit
def partials_reduce_kernel(
    part_ptr, out_ptr, M, C, n_part, slot_m, chunk,
    CHAN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One level of a parallel reduction of fp32 (2, n_part, C) partials into (2, cdiv(n_part, chunk), C).

    Program ``(j, cb)`` combines slots ``[j * chunk, (j + 1) * chunk)`` for one block of channels
    (:func:`_combine_partials`); with CHAN its output slot ``j`` is the (mean, M2) of
    ``min(slot_m * chunk, M - j * slot_m * chunk)`` rows, i.e. the same layout with ``slot_m * chunk``
    rows per slot. Without it, outputs are plain sums. Grid ``(cdiv(n_part, chunk), cdiv(C, BLOCK_C))``:
    the single-program finish that follows reads ``chunk`` times fewer slots, so the partials of a
    large map (e.g. 32768 slots of the 7x7 stem at 8x1024x1024) are spread over many SMs.
    """
    j = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    t_begin = j * chunk
    t_end = tl.minimum(t_begin + chunk, n_part)
    first, second = _combine_partials(part_ptr, t_begin, t_end, offs_c, c_mask, M, C, n_part, slot_m,
                                      CHAN, BLOCK_T, BLOCK_C)
    n_out = tl.num_programs(0)
    tl.store(out_ptr + j * C + offs_c, first, mask=c_mask)
    tl.store(out_ptr + (n_out + j) * C + offs_c, second, mask=c_mask)


@triton.jit
def bn_stats_kernel(
    part_ptr, gamma_ptr, rmean_ptr, rvar_ptr, nbt_ptr, mean_ptr, invstd_ptr, scale_ptr,
    M, C, n_part, slot_m, eps, momentum,
    HAS_GAMMA: tl.constexpr, UPDATE: tl.constexpr, CUMULATIVE: tl.constexpr, COUNT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Batch statistics from :func:`conv_bn_fwd_kernel`'s partials, and the running-statistics update.

    part_ptr fp32 (2, n_part, C): per-slot mean and centred sum of squares, slot ``t`` holding
    ``min(slot_m, M - t * slot_m)`` rows (combined by :func:`_combine_partials`). gamma_ptr (C,) BN
    weight (HAS_GAMMA, else 1).
    Outputs fp32 (C,): mean_ptr batch mean, invstd_ptr ``1/sqrt(var + eps)`` with the biased variance,
    scale_ptr ``gamma * invstd``. UPDATE: ``r = (1 - f) * r + f * stat`` in place on rmean_ptr/rvar_ptr
    (any float dtype; unbiased variance), ``f = momentum`` or, when CUMULATIVE, ``1 / num_batches_tracked``
    read from nbt_ptr (int64, already incremented by the caller). COUNT: program 0 increments nbt_ptr
    (never with CUMULATIVE, whose programs read it). eps/momentum: fp32 scalars.
    This kernel mutates buffers: never autotune it.
    """
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    mean, m2 = _combine_partials(part_ptr, 0, n_part, offs_c, c_mask, M, C, n_part, slot_m,
                                 True, BLOCK_T, BLOCK_C)
    var = m2 / M
    invstd = 1.0 / tl.sqrt_rn(var + eps)  # IEEE-rounded, as PyTorch (tl.sqrt is approximate on the GPU)
    scale = invstd
    if HAS_GAMMA:
        scale = tl.load(gamma_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32) * invstd
    tl.store(mean_ptr + offs_c, mean, mask=c_mask)
    tl.store(invstd_ptr + offs_c, invstd, mask=c_mask)
    tl.store(scale_ptr + offs_c, scale, mask=c_mask)
    if UPDATE:
        if CUMULATIVE:
            f = 1.0 / tl.load(nbt_ptr).to(tl.float32)
        else:
            f = momentum
        rm = tl.load(rmean_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        rv = tl.load(rvar_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        unbiased = m2 / (M - 1)
        tl.store(rmean_ptr + offs_c, ((1.0 - f) * rm + f * mean).to(rmean_ptr.dtype.element_ty), mask=c_mask)
        tl.store(rvar_ptr + offs_c, ((1.0 - f) * rv + f * unbiased).to(rvar_ptr.dtype.element_ty), mask=c_mask)
    if COUNT:  # program 0 only (the others' read is unused)
        tl.store(nbt_ptr, tl.load(nbt_ptr) + 1, mask=tl.program_id(0) == 0)


# ------------------------------------------------------------------------------------------ backward


@triton.jit
def _masked_grad(
    go_ptr, out_ptr, gs_ptr, offs_m, offs_c, mask, C, HW, W, sg_n, sg_c, sg_h, sg_w, gs_s, gs_n, gs_c, pool_m,
    RELU: tl.constexpr, HAS_GSUM: tl.constexpr,
):
    """fp32 gradient of the op output, masked by ReLU ``out > 0`` (contiguous out_ptr).

    go_ptr: upstream gradient of the output (strides sg_*). HAS_GSUM adds the gradient of the pixel
    sums output: gs_ptr fp32 (n_slot, N, C) with element strides gs_s/gs_n/gs_c (gs_s = 0 for a
    gradient broadcast over slots); output pixel ``p`` of image ``n`` fed slot ``p // pool_m``.
    """
    g = tl.load(go_ptr + _nhwc_offsets(offs_m, offs_c, HW, W, sg_n, sg_c, sg_h, sg_w), mask=mask, other=0.0)
    g = g.to(tl.float32)
    if HAS_GSUM:
        n = offs_m // HW
        slot = (offs_m % HW) // pool_m
        row = slot.to(tl.int64) * gs_s + n.to(tl.int64) * gs_n
        g += tl.load(gs_ptr + row[:, None] + offs_c[None, :] * gs_c, mask=mask, other=0.0)
    if RELU:
        o = tl.load(out_ptr + offs_m.to(tl.int64)[:, None] * C + offs_c[None, :], mask=mask, other=0.0)
        g = tl.where(o <= 0, 0.0, g)  # a NaN output passes its gradient, as torch's ReLU backward
    return g


@triton.jit
def bn_act_bwd_reduce_kernel(
    go_ptr, out_ptr, y_ptr, mean_ptr, invstd_ptr, part_ptr, gs_ptr,
    M, C, HW, W, n_part, sg_n, sg_c, sg_h, sg_w, gs_s, gs_n, gs_c, pool_m,
    RELU: tl.constexpr, HAS_Y: tl.constexpr, HAS_GSUM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per-tile partial sums ``sum(g)`` and ``sum(g * xhat)`` of the BN backward, one read of each input.

    go_ptr upstream gradient (N, C, H, W), any strides sg_*; out_ptr (M, C) op output (ReLU mask,
    RELU); y_ptr (M, C) BN input, mean_ptr/invstd_ptr (C,) fp32, ``xhat = (y - mean) * invstd``
    (HAS_Y, else only ``sum(g)``); part_ptr fp32 (2, n_part, C) with n_part = cdiv(M, BLOCK_M).
    gs_ptr/gs_*/pool_m/HAS_GSUM: the pixel sums' gradient, see :func:`_masked_grad`.
    """
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    mask = (offs_m < M)[:, None] & c_mask[None, :]
    g = _masked_grad(go_ptr, out_ptr, gs_ptr, offs_m, offs_c, mask, C, HW, W, sg_n, sg_c, sg_h, sg_w,
                     gs_s, gs_n, gs_c, pool_m, RELU, HAS_GSUM)
    tl.store(part_ptr + pid_m * C + offs_c, tl.sum(g, axis=0), mask=c_mask)
    if HAS_Y:
        y = tl.load(y_ptr + offs_m.to(tl.int64)[:, None] * C + offs_c[None, :], mask=mask, other=0.0)
        mean = tl.load(mean_ptr + offs_c, mask=c_mask, other=0.0)
        invstd = tl.load(invstd_ptr + offs_c, mask=c_mask, other=0.0)
        xhat = (y.to(tl.float32) - mean[None, :]) * invstd[None, :]
        tl.store(part_ptr + (n_part + pid_m) * C + offs_c, tl.sum(g * xhat, axis=0), mask=c_mask)


@triton.jit
def bn_act_bwd_kernel(
    go_ptr, out_ptr, y_ptr, mean_ptr, a_ptr, b_ptr, c_ptr, dy_ptr, dres_ptr, gs_ptr,
    M, C, HW, W, sg_n, sg_c, sg_h, sg_w, gs_s, gs_n, gs_c, pool_m,
    RELU: tl.constexpr, HAS_Y: tl.constexpr, HAS_DRES: tl.constexpr, HAS_GSUM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``dy = a * g + b * (y - mean) + c`` (conv-output gradient) and ``dres = g``, one pass.

    go_ptr upstream gradient, any strides sg_*; out_ptr (M, C) op output (ReLU mask, RELU); y_ptr
    (M, C) BN input and mean_ptr (C,) fp32 (HAS_Y; else ``dy = a * g + c``); a_ptr/b_ptr/c_ptr (C,)
    fp32 per-channel coefficients; dy_ptr (M, C) output in the conv's dtype; dres_ptr (M, C) residual
    gradient (HAS_DRES). ``g`` is the upstream gradient (plus the pixel sums' gradient with HAS_GSUM,
    see :func:`_masked_grad`) masked by ``out > 0`` when RELU.
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    mask = (offs_m < M)[:, None] & c_mask[None, :]
    off = offs_m.to(tl.int64)[:, None] * C + offs_c[None, :]
    g = _masked_grad(go_ptr, out_ptr, gs_ptr, offs_m, offs_c, mask, C, HW, W, sg_n, sg_c, sg_h, sg_w,
                     gs_s, gs_n, gs_c, pool_m, RELU, HAS_GSUM)
    if HAS_DRES:
        tl.store(dres_ptr + off, g.to(dres_ptr.dtype.element_ty), mask=mask)
    a = tl.load(a_ptr + offs_c, mask=c_mask, other=0.0)
    c = tl.load(c_ptr + offs_c, mask=c_mask, other=0.0)
    dy = g * a[None, :] + c[None, :]
    if HAS_Y:
        y = tl.load(y_ptr + off, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + offs_c, mask=c_mask, other=0.0)
        b = tl.load(b_ptr + offs_c, mask=c_mask, other=0.0)
        dy += b[None, :] * (y - mean[None, :])
    tl.store(dy_ptr + off, dy.to(dy_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bn_bwd_coef_kernel(
    part_ptr, gamma_ptr, invstd_ptr, coef_ptr, dgamma_ptr, dbeta_ptr,
    M, C, n_part,
    HAS_GAMMA: tl.constexpr, BATCH_STATS: tl.constexpr, STORE_DGAMMA: tl.constexpr, STORE_DBETA: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per-channel coefficients of :func:`bn_act_bwd_kernel` and the BN parameter gradients, one launch.

    part_ptr fp32 (2, n_part, C) partial sums of ``g`` and ``g * xhat`` (:func:`bn_act_bwd_reduce_kernel`,
    or one level of :func:`partials_reduce_kernel`; n_part = 0: both sums are 0). gamma_ptr (C,) BN
    weight (HAS_GAMMA, else 1), invstd_ptr (C,) fp32. coef_ptr fp32 (3, C) out: ``a = gamma * invstd``
    and, with BATCH_STATS, ``b = -a * invstd * sum(g * xhat) / M``, ``c = -a * sum(g) / M`` (else 0:
    BN in eval is a fixed affine map). dgamma_ptr ``sum(g * xhat)`` (STORE_DGAMMA), dbeta_ptr ``sum(g)``
    (STORE_DBETA), each (C,) in its own dtype.
    """
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    sum_g, sum_gx = _combine_partials(part_ptr, 0, n_part, offs_c, c_mask, M, C, n_part, 1,
                                      False, BLOCK_T, BLOCK_C)
    invstd = tl.load(invstd_ptr + offs_c, mask=c_mask, other=0.0)
    a = invstd
    if HAS_GAMMA:
        a = tl.load(gamma_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32) * invstd
    b = tl.zeros((BLOCK_C,), dtype=tl.float32)
    c = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if BATCH_STATS:
        b = -a * invstd * (sum_gx / M)
        c = -a * (sum_g / M)
    tl.store(coef_ptr + offs_c, a, mask=c_mask)
    tl.store(coef_ptr + C + offs_c, b, mask=c_mask)
    tl.store(coef_ptr + 2 * C + offs_c, c, mask=c_mask)
    if STORE_DGAMMA:
        tl.store(dgamma_ptr + offs_c, sum_gx.to(dgamma_ptr.dtype.element_ty), mask=c_mask)
    if STORE_DBETA:
        tl.store(dbeta_ptr + offs_c, sum_g.to(dbeta_ptr.dtype.element_ty), mask=c_mask)


# ------------------------------------------------------------------------------------------ launchers


def _nchw_strides(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)  # type: ignore[return-value]


def _check_image_numel(*ts: torch.Tensor | None) -> None:
    """In-image offsets (``c * s_c + h * s_h + w * s_w``) are int32: the largest one, taken from the strides
    (a strided view of a huge tensor can address far more than its own element count), must fit."""
    for t in ts:
        if t is not None and t.dim() == 4:
            extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:], strict=True))
            if extent >= 2**31:
                raise ValueError("one image of a conv_bn tensor must span fewer than 2**31 elements "
                                 f"(shape {tuple(t.shape)}, strides {t.stride()})")


def _segment_tiles(M: int, seg: int, block_m: int) -> int:
    """M-tiles of :func:`_segment_rows` over ``M`` rows in segments of ``seg``."""
    return (M // seg) * triton.cdiv(seg, block_m)


def _elt_block_c(C: int) -> int:
    return max(16, min(64, triton.next_power_of_2(C)))


def _conv_allows_tf32() -> bool:
    """PyTorch's fp32 conv precision: ``cudnn.conv.fp32_precision`` (newer API) or ``cudnn.allow_tf32``.

    Once the newer API has been used, reading the legacy flag raises, so the new one is asked first.
    """
    conv = getattr(torch.backends.cudnn, "conv", None)
    precision = getattr(conv, "fp32_precision", None)
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    return bool(torch.backends.cudnn.allow_tf32)


def dot_precision(x: torch.Tensor) -> str:
    """``DOT_PRECISION`` of a conv on ``x``: fp32 follows PyTorch's conv setting on a GPU (tf32 by
    default), exact fp32 elsewhere; fp16/bf16 dots ignore it (``"tf32"`` keeps one compiled variant)."""
    return "ieee" if x.dtype == torch.float32 and not (x.is_cuda and _conv_allows_tf32()) else "tf32"


def conv_bn_fwd(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    *,
    x2: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    bn_weight: torch.Tensor | None = None,
    bn_bias: torch.Tensor | None = None,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    relu: bool = False,
    stats: bool = False,
    pool: bool = False,
    out_dtype: torch.dtype | None = None,
    stat_m: int | None = None,
    out: torch.Tensor | None = None,
    part: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch :func:`conv_bn_fwd_kernel`; returns ``(out, partials)``.

    ``out`` is (N, C_out, Ho, Wo) channels_last in ``out_dtype`` (default ``x.dtype``). ``partials``:
    with ``stats`` fp32 (2, cdiv(M, stat_m), C_out), per-slot mean and centred sum of squares of
    ``conv(x) + bias``, slot ``i`` covering output rows ``[i*stat_m, (i+1)*stat_m)``; with ``pool``
    fp32 (cdiv(Ho*Wo, stat_m), N, C_out), pixel sums of ``out``, slot ``s`` of image ``n`` covering its
    pixels ``[s*stat_m, (s+1)*stat_m)``; else ``None``. ``out`` and ``part`` may be given as preallocated
    buffers of exactly those shapes (channels_last / contiguous). ``stats`` and ``pool`` are exclusive.

    Eval-mode BN: with ``running_mean``/``running_var`` (contiguous (C_out,), any float dtype) the
    kernel applies ``bn_weight * (conv + bias - running_mean) * rsqrt(running_var + eps) + bn_bias``
    itself (``bn_weight``/``bn_bias`` optional: ``affine=False``); exclusive with ``stats``. Nothing
    but the kernel launch (and the output allocation) runs: no host-side or device-side side ops.
    """
    N, C_in, H, W = x.shape
    KH, KW = kernel_size
    C_in2 = 0 if x2 is None else x2.shape[1]
    if x2 is not None and (KH, KW) != (1, 1):
        raise NotImplementedError("a second (concatenated) input is only supported for 1x1 convs")
    K, C_out = w_packed.shape
    assert w_packed.is_contiguous() and KH * KW * C_in + C_in2 == K
    bn_eval = running_mean is not None
    assert bn_eval == (running_var is not None) and not (bn_eval and stats) and not (stats and pool)
    if not bn_eval:
        assert bn_weight is None and bn_bias is None, "BN parameters without running statistics"
    for v in (bias, bn_weight, bn_bias, running_mean, running_var):
        assert v is None or (v.shape == (C_out,) and v.is_contiguous())
    Ho = (H + 2 * padding[0] - KH) // stride[0] + 1
    Wo = (W + 2 * padding[1] - KW) // stride[1] + 1
    M = N * Ho * Wo
    _check_image_numel(x, x2, residual)
    if out is None:
        out = torch.empty((N, C_out, Ho, Wo), device=x.device, dtype=out_dtype or x.dtype,
                          memory_format=torch.channels_last)
    assert out.shape == (N, C_out, Ho, Wo) and out.is_contiguous(memory_format=torch.channels_last)
    stat_m = stat_m or STAT_M_DEFAULT
    n_part = triton.cdiv(M, stat_m)
    n_slot = triton.cdiv(Ho * Wo, stat_m)
    part_shape = (2, n_part, C_out) if stats else (n_slot, N, C_out)
    if (stats or pool) and part is None:
        part = torch.empty(part_shape, device=x.device, dtype=torch.float32)
    if stats or pool:
        assert part.shape == part_shape and part.is_contiguous() and part.dtype == torch.float32
    else:
        part = None
    seg = Ho * Wo if pool else M  # pixel sums need tiles inside one image
    dummy = out  # never dereferenced: the matching constexpr flag is off
    precision = dot_precision(x)

    def grid(meta: dict) -> tuple[int]:
        assert meta["BLOCK_M"] % stat_m == 0
        return (_segment_tiles(M, seg, meta["BLOCK_M"]) * triton.cdiv(C_out, meta["BLOCK_N"]),)

    conv_bn_fwd_kernel[grid](
        x, x2 if x2 is not None else x, w_packed,
        bias if bias is not None else dummy,
        bn_weight if bn_weight is not None else dummy,
        bn_bias if bn_bias is not None else dummy,
        running_mean if bn_eval else dummy,
        running_var if bn_eval else dummy,
        residual if residual is not None else dummy,
        out, part if stats else dummy, part if pool else dummy,
        M, seg, H, W, Ho, Wo, C_in, C_in2, C_out, n_part, n_slot, float(eps),
        *x.stride(), *_nchw_strides(x2), *_nchw_strides(residual),
        KH=KH, KW=KW, STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_H=padding[0], PAD_W=padding[1],
        HAS_X2=x2 is not None, HAS_BIAS=bias is not None, STATS=stats,
        BN_EVAL=bn_eval, HAS_GAMMA=bn_weight is not None, HAS_BETA=bn_bias is not None,
        HAS_RES=residual is not None, RELU=relu, POOL=pool, FLAT_C=C_in if C_in < 32 else 0, ROW_K=STEM_ROW_LOOP,
        STAT_M=stat_m,
        DOT_PRECISION=precision,
    )
    return out, part


PARTIALS_CHUNK: int = 4 if INTERPRET else 256
"""Most slots a finishing program reads, and per program of :func:`partials_reduce_kernel` (small under
the interpreter, so tests reach several levels, each program merging two loop steps)."""
_PARTIALS_BLOCK_T: int = 2 if INTERPRET else 64


def _partials_chunk(n_part: int, c_blocks: int, device: torch.device) -> int:
    """Slots per program of a reduction level: enough programs for ~2 per SM (mid-size maps have only a
    few thousand slots), at least one full ``BLOCK_T`` step, at most :data:`PARTIALS_CHUNK`."""
    if INTERPRET or device.type != "cuda":
        return PARTIALS_CHUNK
    want = 2 * sm_count(device.index if device.index is not None else 0)
    chunk = triton.next_power_of_2(max(1, triton.cdiv(n_part * c_blocks, want)))
    return max(_PARTIALS_BLOCK_T, min(PARTIALS_CHUNK, chunk))


def _reduce_partials(part: torch.Tensor, M: int, slot_m: int, chan: bool) -> tuple[torch.Tensor, int]:
    """Levels of :func:`partials_reduce_kernel` until at most :data:`PARTIALS_CHUNK` slots remain.

    Returns ``(partials, rows per slot)`` for the single-program finish (``slot_m`` grows by the chunk
    each level; plain sums ignore it).
    """
    _, n_part, C = part.shape
    block_c = _elt_block_c(C)
    c_blocks = triton.cdiv(C, block_c)
    while n_part > PARTIALS_CHUNK:
        chunk = _partials_chunk(n_part, c_blocks, part.device)
        n_out = triton.cdiv(n_part, chunk)
        out = torch.empty((2, n_out, C), device=part.device, dtype=torch.float32)
        partials_reduce_kernel[(n_out, c_blocks)](
            part, out, M, C, n_part, slot_m, chunk, CHAN=chan, BLOCK_T=_PARTIALS_BLOCK_T, BLOCK_C=block_c,
        )
        part, n_part, slot_m = out, n_out, slot_m * chunk
    return part, slot_m


def bn_stats(
    part: torch.Tensor, M: int, stat_m: int, eps: float, gamma: torch.Tensor | None,
    running_mean: torch.Tensor | None = None, running_var: torch.Tensor | None = None,
    num_batches_tracked: torch.Tensor | None = None, momentum: float | None = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch statistics from the forward's partials; returns fp32 ``(mean, invstd, gamma * invstd)`` per channel.

    ``part`` fp32 (2, n_part, C) with ``stat_m`` rows per slot (:func:`conv_bn_fwd` with ``stats``).
    Large partials go through :func:`partials_reduce_kernel` first. With ``running_mean``/``running_var``
    the running statistics are updated in place (momentum ``None``: cumulative average). A given
    ``num_batches_tracked`` is incremented by this call, in the kernel (or, for the cumulative average,
    whose factor reads it, by one small op before it).
    """
    C = part.shape[2]
    assert part.is_contiguous() and part.dtype == torch.float32
    update = running_mean is not None
    cumulative = update and momentum is None
    if cumulative:
        assert num_batches_tracked is not None
        num_batches_tracked.add_(1)
    if update:
        assert running_mean.is_contiguous() and running_var.is_contiguous()
    count = num_batches_tracked is not None and not cumulative
    part, slot_m = _reduce_partials(part, M, stat_m, chan=True)
    mean, invstd, scale = torch.empty((3, C), device=part.device, dtype=torch.float32)
    block_c = _elt_block_c(C)
    bn_stats_kernel[(triton.cdiv(C, block_c),)](
        part, gamma if gamma is not None else part,
        running_mean if update else part, running_var if update else part,
        num_batches_tracked if num_batches_tracked is not None else part,
        mean, invstd, scale, M, C, part.shape[1], slot_m, float(eps), float(momentum or 0.0),
        HAS_GAMMA=gamma is not None, UPDATE=update, CUMULATIVE=cumulative, COUNT=count,
        BLOCK_T=_PARTIALS_BLOCK_T, BLOCK_C=block_c,
    )
    if count:  # as add_ would: caches keyed on versions (the merged stem pair) see the count change
        torch.autograd.graph.increment_version(num_batches_tracked)
    return mean, invstd, scale


POOL_M_ELT: int = _ELT_BLOCK_M
"""Pixels per pixel-sum slot of :func:`bn_act` (the train-mode pass)."""


def bn_act(
    y: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
    residual: torch.Tensor | None, relu: bool, out: torch.Tensor | None = None, *, pool: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch :func:`bn_act_kernel` on a channels_last ``y``; returns ``(out, sums)``.

    ``out`` is channels_last like ``y`` (or the preallocated channels_last ``out`` of ``y``'s shape);
    ``sums`` (with ``pool``, else ``None``) fp32 (cdiv(H*W, POOL_M_ELT), N, C) pixel sums of ``out``.
    """
    N, C, H, W = y.shape
    M = N * H * W
    _check_image_numel(residual)
    assert y.is_contiguous(memory_format=torch.channels_last)
    if out is None:
        out = torch.empty_like(y, memory_format=torch.channels_last)
    assert out.shape == y.shape and out.is_contiguous(memory_format=torch.channels_last)
    block_c = _elt_block_c(C)
    seg = H * W if pool else M
    n_slot = triton.cdiv(H * W, _ELT_BLOCK_M)
    sums = torch.empty((n_slot, N, C), device=y.device, dtype=torch.float32) if pool else None
    grid = (_segment_tiles(M, seg, _ELT_BLOCK_M), triton.cdiv(C, block_c))
    bn_act_kernel[grid](
        y, mean, scale, shift, residual if residual is not None else y, out, sums if pool else out,
        M, seg, C, H * W, W, n_slot, *_nchw_strides(residual),
        HAS_RES=residual is not None, RELU=relu, POOL=pool, BLOCK_M=_ELT_BLOCK_M, BLOCK_C=block_c,
    )
    return out, sums


def _grad_sums_args(grad_sums: torch.Tensor | None, pool_m: int, like: torch.Tensor) -> tuple:
    """Kernel arguments ``(gs_ptr, gs_s, gs_n, gs_c, pool_m)`` for an optional pixel-sums gradient."""
    if grad_sums is None:
        return (like, 0, 0, 0, 1)
    assert grad_sums.dim() == 3 and grad_sums.dtype == torch.float32 and pool_m > 0
    return (grad_sums, *grad_sums.stride(), pool_m)


def bn_act_bwd_reduce(
    grad_out: torch.Tensor, out: torch.Tensor | None, y: torch.Tensor | None,
    mean: torch.Tensor | None, invstd: torch.Tensor | None,
    grad_sums: torch.Tensor | None = None, pool_m: int = 0,
) -> torch.Tensor:
    """fp32 (2, cdiv(M, 64), C) per-tile partial sums of ``g`` and ``g * xhat`` (the second only when
    ``y`` is given, else unwritten), for :func:`bn_bwd_coefficients`.

    ``g`` is ``grad_out`` (plus ``grad_sums``, the fp32 (n_slot, N, C) gradient of pixel sums over
    slots of ``pool_m`` pixels, any strides) masked by ``out > 0`` when ``out`` is given (ReLU).
    ``out``/``y`` are channels_last; ``grad_out`` may have any strides.
    """
    N, C, H, W = grad_out.shape
    M = N * H * W
    _check_image_numel(grad_out)
    n_part = triton.cdiv(M, _ELT_BLOCK_M)
    part = torch.empty((2, n_part, C), device=grad_out.device, dtype=torch.float32)
    if y is None:  # the second half is not written but is read (and unused) downstream: no uninitialised reads
        part[1].zero_()
    gs = _grad_sums_args(grad_sums, pool_m, part)
    block_c = _elt_block_c(C)
    grid = (n_part, triton.cdiv(C, block_c))
    bn_act_bwd_reduce_kernel[grid](
        grad_out, out if out is not None else grad_out, y if y is not None else grad_out,
        mean if mean is not None else part, invstd if invstd is not None else part, part,
        *gs[:1], M, C, H * W, W, n_part, *grad_out.stride(), *gs[1:],
        RELU=out is not None, HAS_Y=y is not None, HAS_GSUM=grad_sums is not None,
        BLOCK_M=_ELT_BLOCK_M, BLOCK_C=block_c,
    )
    return part


def bn_bwd_coefficients(
    part: torch.Tensor | None, M: int, gamma: torch.Tensor | None, invstd: torch.Tensor, *,
    batch_stats: bool, dgamma_dtype: torch.dtype | None = None, dbeta_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:func:`bn_bwd_coef_kernel` on :func:`bn_act_bwd_reduce`'s partials (``None``: no sums needed).

    Returns ``(coef, dgamma, dbeta)``: ``coef`` fp32 (3, C) rows ``a, b, c`` of :func:`bn_act_bwd`
    (``b = c = 0`` without ``batch_stats``); ``dgamma = sum(g * xhat)`` / ``dbeta = sum(g)`` (C,) in
    the given dtypes, ``None`` where no dtype is given. Large partials are first reduced in parallel.
    """
    C = invstd.shape[0]
    assert (part is not None) or not (batch_stats or dgamma_dtype or dbeta_dtype)
    if part is not None:
        part, _ = _reduce_partials(part, M, 1, chan=False)
    n_part = part.shape[1] if part is not None else 0
    dev = invstd.device
    coef = torch.empty((3, C), device=dev, dtype=torch.float32)
    dgamma = torch.empty(C, device=dev, dtype=dgamma_dtype) if dgamma_dtype is not None else None
    dbeta = torch.empty(C, device=dev, dtype=dbeta_dtype) if dbeta_dtype is not None else None
    block_c = _elt_block_c(C)
    bn_bwd_coef_kernel[(triton.cdiv(C, block_c),)](
        part if part is not None else coef, gamma if gamma is not None else invstd, invstd, coef,
        dgamma if dgamma is not None else coef, dbeta if dbeta is not None else coef, M, C, n_part,
        HAS_GAMMA=gamma is not None, BATCH_STATS=batch_stats, STORE_DGAMMA=dgamma is not None,
        STORE_DBETA=dbeta is not None, BLOCK_T=_PARTIALS_BLOCK_T, BLOCK_C=block_c,
    )
    return coef, dgamma, dbeta


def bn_act_bwd(
    grad_out: torch.Tensor, out: torch.Tensor | None, y: torch.Tensor | None, mean: torch.Tensor | None,
    a: torch.Tensor, b: torch.Tensor | None, c: torch.Tensor,
    *, dy_dtype: torch.dtype, dres_dtype: torch.dtype | None,
    grad_sums: torch.Tensor | None = None, pool_m: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch :func:`bn_act_bwd_kernel`; returns channels_last ``(dy, dres)`` (``dres`` if ``dres_dtype``).

    ``grad_sums``/``pool_m``: the pixel sums' gradient, as in :func:`bn_act_bwd_reduce`.
    """
    N, C, H, W = grad_out.shape
    M = N * H * W
    _check_image_numel(grad_out)
    dev = grad_out.device
    dy = torch.empty((N, C, H, W), device=dev, dtype=dy_dtype, memory_format=torch.channels_last)
    dres = None
    if dres_dtype is not None:
        dres = torch.empty((N, C, H, W), device=dev, dtype=dres_dtype, memory_format=torch.channels_last)
    block_c = _elt_block_c(C)
    grid = (triton.cdiv(M, _ELT_BLOCK_M), triton.cdiv(C, block_c))
    has_y = y is not None and b is not None
    gs = _grad_sums_args(grad_sums, pool_m, a)
    bn_act_bwd_kernel[grid](
        grad_out, out if out is not None else grad_out, y if has_y else grad_out,
        mean if has_y else a, a, b if has_y else a, c, dy, dres if dres is not None else dy, *gs[:1],
        M, C, H * W, W, *grad_out.stride(), *gs[1:],
        RELU=out is not None, HAS_Y=has_y, HAS_DRES=dres is not None, HAS_GSUM=grad_sums is not None,
        BLOCK_M=_ELT_BLOCK_M, BLOCK_C=block_c,
    )
    return dy, dres
