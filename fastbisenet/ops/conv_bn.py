"""Fused conv + BatchNorm (+ residual) (+ ReLU) on the Triton kernels of :mod:`fastbisenet.kernels.conv_bn`.

Three layers, so that the op can later be registered with ``torch.library`` unchanged:

* :func:`forward` / :func:`backward`: tensor-level functions over plain tensors and Python scalars;
* :class:`ConvBNActFunction`: the ``torch.autograd.Function`` built on them;
* :func:`conv_bn_act` / :func:`concat_conv_bn_act`: module-level wrappers with the signatures of
  :mod:`fastbisenet.reference`, reading ``nn.Conv2d`` / ``nn.BatchNorm2d`` attributes and buffers.

Semantics follow the modules exactly: in train mode (or with ``track_running_stats=False``) the
output is normalised with the batch mean and biased variance, and the running statistics are updated
in place with the unbiased variance (``momentum=None``: cumulative average with factor
``1 / num_batches_tracked``), ``num_batches_tracked += 1``; in eval mode BN is folded into a
per-channel scale/shift from the *current* running statistics on every call, inside the conv kernel's
epilogue: an eval-mode call is one kernel launch plus the output allocation, nothing else (the fold
reads ``gamma``/``beta``/``running_mean``/``running_var`` directly). Outputs are ``channels_last`` in
the input's dtype.

Pixel sums (``pool=True``): the op also returns fp32 per-image partial sums of its output, gathered by
the kernel that writes the output (the conv epilogue in eval, the BN+ReLU pass in train; tiles are then
laid out per image), so a channel attention on the output (ARM, FFM) never re-reads the map. The sums
are differentiable: their gradient is added to the output's, per slot, inside the backward kernels.

Packed weights: the kernels read the weight as a ``(KH*KW*C_in, C_out)`` matrix in the activation
dtype. :func:`_packed_weight` caches that copy per weight tensor and dtype/device and repacks (in
place, into the same buffer) only when the weight changed: a different ``data_ptr`` /shape/strides
(``.data`` replaced, ``.to()``), or a bumped version counter (every in-place write through the
tensor or a view of it: ``optimizer.step()``, ``load_state_dict``, ``with torch.no_grad(): w.add_()``;
a global optimizer step hook moves the counters of what fused optimizers wrote). Other in-place writes
through ``w.data`` bypass version counters (as they bypass autograd's checks): call
:func:`clear_packed_weights` after those. A CUDA graph replays the packed copy it captured; it sees new
weight values only after an eager call has repacked them (see :mod:`fastbisenet.graphs`); captures of
calls that can be followed by a backward (training steps) record the packing instead, so replays of a
captured training step always read the current weights.

Memory kept for backward (per call, besides the small per-channel vectors ``mean``/``invstd``):

* train: ``x`` and the weight, the conv output ``y`` (the BN input), and the op output when ReLU is
  on (its mask; the output is usually kept alive by the next layer anyway). Eager PyTorch saves the
  same ``x``/``y``/ReLU output; it also writes the BN output and (with a residual) the sum, but frees
  them once the ReLU has run, so the saving here is their write + read, not saved memory. The
  convs alone saved about what eager saves (32.4 vs 33.0 MB in a v1 train step at 2x3x128x128 fp32
  under the interpreter, before the fused heads + loss); the whole model's saving comes mostly from the
  heads' fused cross-entropy, which never keeps full-resolution logits (22.8 vs 30.8 MiB for the
  same step now, ``tests/test_bench.py``).
* eval: ``x``, the weight and the output (ReLU mask) only, plus fp32 copies of the running mean and
  ``rsqrt(running_var + eps)``, computed only when autograd will need them (grad mode on and some
  input requires grad; frozen-BN fine-tuning). Eager also keeps the conv output for the BN backward;
  here it is recomputed by one extra conv in backward, and only when the BN weight needs a gradient.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

from fastbisenet.kernels import conv_bn as K
from fastbisenet.ops._library import FLOAT_DTYPES, first_order_only

__all__ = [
    "ConvBNActFunction", "backward", "clear_packed_weights", "concat_conv_bn_act", "conv_bn_act", "conv_bn_act_pair",
    "conv_input_grad", "forget_packed_weights", "forward",
]

TRITON_DGRAD: bool = os.environ.get("FASTBISENET_TRITON_DGRAD", "0").strip().lower() in ("1", "true", "yes", "on")
"""Input gradients of stride-1 single-input convs by the Triton dgrad (:func:`conv_input_grad`) instead of
cuDNN's; off by default until a GPU has timed both (``bench/test_conv_grad.py``: per conv, and a training
step with each). Weight gradients stay with cuDNN either way."""

_STAT_M: int = K.STAT_M_DEFAULT
"""Rows per partial-statistics slot of the forward kernel (see :func:`K.bn_stats_kernel`)."""


def pool_rows(has_bn: bool, batch_stats: bool) -> int:
    """Pixels per slot of the pixel sums (``pool=True``): the pass that writes the output gathers them."""
    return K.POOL_M_ELT if has_bn and batch_stats else _STAT_M


# ---------------------------------------------------------------------------------- tensor level


def _pack_weight(weight: Tensor, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    """(C_out, C_in, KH, KW) -> row-major (KH*KW*C_in, C_out) in ``dtype``: the kernels' B matrix.

    One copy kernel (layout change and cast together), into ``out`` when given (same shape/dtype).
    """
    c_out, c_in, kh, kw = weight.shape
    if out is None:
        out = torch.empty((kh * kw * c_in, c_out), dtype=dtype, device=weight.device)
    out.view(kh, kw, c_in, c_out).copy_(weight.detach().permute(2, 3, 1, 0))
    return out


@dataclass
class _Packings:
    """The cached packings of one weight tensor, valid for its data identified by ``ident``."""

    ident: tuple  # (data_ptr, shape, strides, dtype) of the weight data the packings were made from
    src: Tensor  # a detached alias of that data: keeps its storage (so its address) alive
    by_key: dict  # (dtype, device) -> [version counter at packing, packed tensor]


_PACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""weight tensor (weakly, by identity) -> :class:`_Packings`; entries die with their weight."""


def clear_packed_weights() -> None:
    """Drop every cached packed weight and merged conv pair (see :func:`conv_bn_act_pair`); needed only
    after writes that move no version counter: in-place writes through ``weight.data`` or a BN buffer's
    ``.data``, and CUDA-graph replays of a step that updates weights or BN buffers (device work only)."""
    _PACKED.clear()
    _MERGED.clear()


def forget_packed_weights(module: nn.Module) -> None:
    """Drop the cache entries of ``module``'s parameters and convs (packings, merged pairs): called before
    ``BiSeNet`` converts or loads its tensors, so that no packing of the old data outlives the conversion
    (``model.half()``, ``.cpu()``) and no weak reference blocks ``torch.utils.swap_tensors``."""
    for m in module.modules():
        pairs = _MERGED.pop(m, None)
        merged_weights = [e.conv.weight for e in pairs.values()] if pairs is not None else []
        for t in (*m.parameters(recurse=False), *merged_weights):
            _PACKED.pop(t, None)


def _bump_versions_after_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    """Global optimizer step post-hook: the version counter of every parameter the step could update (those
    with a gradient) moves, as in-place ops move it. Fused optimizers (``fused=True``) and ``.data`` updates
    write parameters without moving it, which would leave the inference caches above (keyed on versions) stale
    after a training step. Parameters without a gradient are left alone (an optimizer skips them)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                torch.autograd.graph.increment_version(p)


STEP_HOOK = register_optimizer_step_post_hook(_bump_versions_after_step)
"""The handle of :func:`_bump_versions_after_step` (``STEP_HOOK.remove()`` takes it out)."""


def _capturing(weight: Tensor) -> bool:
    """True while a CUDA graph is being captured on the current stream of ``weight``'s device."""
    return weight.is_cuda and torch.cuda.is_current_stream_capturing()


def _packed_weight(weight: Tensor, dtype: torch.dtype, *, may_backward: bool = False) -> Tensor:
    """:func:`_pack_weight`, cached for inference per weight tensor and ``(dtype, device)``.

    ``may_backward`` (training, or autograd recording): packed afresh on every call, never cached, so
    no weight write of any kind (optimizer steps, ``.data`` updates, fused optimizers writing raw
    memory) can leave the forward stale; one copy per call is noise next to a training step.

    Inference: cached, repacked when stale: different weight data (``data_ptr``/shape/strides/dtype:
    ``.data`` was replaced, e.g. by ``.to()``; every packing of the old data is dropped) or a different
    version counter (any in-place write through autograd-visible tensors). Writes through ``weight.data``
    do not bump the version counter: after such writes call :func:`clear_packed_weights`. A repack of a
    changed version reuses the packed buffer, so a CUDA graph captured on it sees the new values once an
    eager call has repacked. The entry keeps a detached alias of the weight data, so its address cannot be
    reused by a later ``.data`` while the entry lives. Inference tensors have no version counter: packed
    per call. While a CUDA graph is being captured, a stale or missing entry is packed afresh inside the
    graph and the cache is left alone (work recorded in a graph is not executed at capture).
    """
    if may_backward or weight.is_inference():
        return _pack_weight(weight, dtype)
    ident = (weight.data_ptr(), weight.shape, weight.stride(), weight.dtype)
    version = weight._version
    key = (dtype, weight.device)
    entry = _PACKED.get(weight)
    slot = entry.by_key.get(key) if entry is not None and entry.ident == ident else None
    if slot is not None and slot[0] == version:
        return slot[1]
    if _capturing(weight):
        return _pack_weight(weight, dtype)
    with torch.inference_mode(False):
        if slot is not None:
            _pack_weight(weight, dtype, out=slot[1])
            slot[0] = version
            return slot[1]
        if entry is None or entry.ident != ident:
            entry = _PACKED[weight] = _Packings(ident, weight.detach(), {})
        entry.by_key[key] = slot = [version, _pack_weight(weight, dtype)]
    return slot[1]


def packed_weights_of(module: torch.nn.Module) -> list[Tensor]:
    """The cached tensors an inference of ``module`` reads besides its own parameters and buffers: packed
    weights, and the merged convs of :func:`conv_bn_act_pair` with their packings (a CUDA graph keeps
    them alive with these)."""
    merged = [e for m in module.modules() if (pairs := _MERGED.get(m)) is not None for e in pairs.values()]
    weights = [*module.parameters(), *(e.conv.weight for e in merged)]
    packed = [slot[1] for p in weights if (entry := _PACKED.get(p)) is not None for slot in entry.by_key.values()]
    return packed + [t for e in merged for t in (*e.conv.parameters(), *e.bn.parameters(), *e.bn.buffers())]


def forward(
    x: Tensor,
    x2: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    residual: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    eps: float,
    momentum: float | None,
    has_bn: bool,
    batch_stats: bool,
    relu: bool,
    need_stats: bool = True,
    pool: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """``relu?(bn?(conv(cat?(x, x2)) + bias?) + residual?)``; returns ``(out, y, mean, invstd, sums)``.

    ``y`` is the conv output (only with batch statistics, else ``None``); ``mean``/``invstd`` are the
    fp32 per-channel statistics the output was normalised with (batch or running; ``None`` without
    BN), as :func:`backward` needs them. With ``batch_stats`` and running buffers given, the buffers are
    updated in place (train mode).

    Eval (BN with running statistics): the conv kernel folds BN itself, so the call is one kernel
    launch; ``mean``/``invstd`` (fp32 copies of the running mean and ``rsqrt(running_var + eps)`` at this
    call, three small ops) are computed only with ``need_stats``, i.e. when a backward may follow; else
    they are ``None``.

    ``pool``: ``sums`` is fp32 (S, N, C) pixel sums of ``out`` (slot ``s`` of image ``n`` sums its flat
    pixels ``[s * R, (s + 1) * R)``, ``R = pool_rows(has_bn, batch_stats)``), gathered by the kernel
    that writes ``out`` (the conv epilogue, or the train-mode BN pass); else ``None``.
    """
    KH, KW = weight.shape[2], weight.shape[3]
    C = weight.shape[0]
    # a call that may be followed by a backward packs afresh (training), inference uses the cache
    w = _packed_weight(weight, x.dtype, may_backward=(has_bn and batch_stats) or need_stats)
    if not has_bn:
        out, sums = K.conv_bn_fwd(x, w, (KH, KW), stride, padding, x2=x2, bias=bias, residual=residual, relu=relu,
                                  pool=pool, stat_m=_STAT_M)
        return out, None, None, None, sums
    if not batch_stats:  # eval: the kernel folds the current running statistics into its epilogue
        out, sums = K.conv_bn_fwd(
            x, w, (KH, KW), stride, padding, x2=x2, bias=bias, bn_weight=bn_weight, bn_bias=bn_bias,
            running_mean=running_mean, running_var=running_var, eps=eps, residual=residual, relu=relu,
            pool=pool, stat_m=_STAT_M,
        )
        if not need_stats:
            return out, None, None, None, sums
        # snapshots of this call's statistics for backward (the buffers may change before it runs)
        mean = running_mean.detach().to(torch.float32, copy=True)
        invstd = torch.rsqrt(running_var.detach().float() + eps)
        return out, None, mean, invstd, sums

    f32 = {"device": x.device, "dtype": torch.float32}
    beta = bn_bias.detach().float() if bn_bias is not None else torch.zeros(C, **f32)

    y, part = K.conv_bn_fwd(x, w, (KH, KW), stride, padding, x2=x2, bias=bias, stats=True, stat_m=_STAT_M)
    M = y.numel() // C
    if M <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(y.shape)}")
    mean, invstd, scale = K.bn_stats(
        part, M, _STAT_M, eps, bn_weight.detach() if bn_weight is not None else None,
        running_mean, running_var, num_batches_tracked if running_mean is not None else None, momentum,
    )  # counts num_batches_tracked
    out, sums = K.bn_act(y, mean, scale, beta, residual, relu, pool=pool)
    return out, y, mean, invstd, sums


def backward(
    grad_out: Tensor,
    x: Tensor,
    x2: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    bn_weight: Tensor | None,
    out: Tensor | None,
    y: Tensor | None,
    mean: Tensor | None,
    invstd: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    has_bn: bool,
    batch_stats: bool,
    residual_dtype: torch.dtype | None,
    needs: tuple[bool, ...],
    grad_sums: Tensor | None = None,
) -> tuple[Tensor | None, ...]:
    """Gradients ``(dx, dx2, dweight, dbias, dbn_weight, dbn_bias, dresidual)`` (``None`` where not needed).

    ``out`` is the forward output when ReLU was on (its mask), else ``None``; ``y``/``mean``/``invstd``
    as returned by :func:`forward`; ``needs`` flags the seven gradients. ``grad_sums``: gradient of the
    pixel sums output of a ``pool`` forward (fp32 (S, N, C), any strides; ``None`` when there was none
    or it is unused), added to ``grad_out`` per slot inside the kernels. The ReLU mask and the BN
    backward are fused: one pass for the two per-channel reductions ``sum(g)``, ``sum(g * xhat)``,
    one element-wise pass for the conv-output gradient ``dy`` (and ``dresidual = g``). dgrad/wgrad use
    ``aten.convolution_backward`` (cuDNN on GPU). That choice is not yet backed by a GPU measurement (none
    was possible when this was written): ``bench/test_conv_grad.py`` times cuDNN's dgrad against the Triton
    one (:func:`conv_input_grad`) on every stride-1 conv of the model, and decides.
    """
    need_x, need_x2, need_w, need_b, need_gamma, need_beta, need_res = (tuple(needs) + (False,) * 7)[:7]
    C = weight.shape[0]
    M = grad_out.numel() // C
    f32 = {"device": grad_out.device, "dtype": torch.float32}
    KH, KW = weight.shape[2], weight.shape[3]
    dgamma = dbeta = b_coef = None
    gsums = {} if grad_sums is None else {"grad_sums": grad_sums.float(), "pool_m": pool_rows(has_bn, batch_stats)}
    if not has_bn:
        a_coef, c_coef = torch.ones(C, **f32), torch.zeros(C, **f32)
    else:
        # the two reductions (one pass) and, in one small kernel, the coefficients and dgamma/dbeta
        # dgamma/dbeta in the BN weight's dtype (a bias-only BN: fp32, which autograd casts to the bias's)
        param_dtype = bn_weight.dtype if bn_weight is not None else torch.float32
        part = None
        if batch_stats or need_gamma or need_beta:
            if not batch_stats and need_gamma and y is None:  # eval: y (for xhat) recomputed for dgamma only
                w = _packed_weight(weight, x.dtype, may_backward=True)
                y, _ = K.conv_bn_fwd(x, w, (KH, KW), stride, padding, x2=x2, bias=bias)
            part = K.bn_act_bwd_reduce(grad_out, out, y if batch_stats or need_gamma else None, mean, invstd,
                                       **gsums)
        coef, dgamma, dbeta = K.bn_bwd_coefficients(
            part, M, bn_weight.detach() if bn_weight is not None else None, invstd, batch_stats=batch_stats,
            dgamma_dtype=param_dtype if need_gamma else None, dbeta_dtype=param_dtype if need_beta else None,
        )
        a_coef, b_coef, c_coef = coef.unbind(0)
        if not batch_stats:
            y = b_coef = None  # the element-wise pass needs no y in eval

    dx = dx2 = dw = db = dres = None
    if need_x or need_x2 or need_w or need_b or need_res:
        dy, dres = K.bn_act_bwd(
            grad_out, out, y, mean, a_coef, b_coef, c_coef,
            dy_dtype=x.dtype, dres_dtype=residual_dtype if need_res else None, **gsums,
        )
        segments = [(x, 0, x.shape[1], need_x)]
        if x2 is not None:
            segments.append((x2, x.shape[1], x2.shape[1], need_x2))
        dws = []
        if TRITON_DGRAD and x2 is None and need_x and tuple(stride) == (1, 1):
            dx = conv_input_grad(dy, weight, padding)
            segments = [(x, 0, x.shape[1], False)]  # cuDNN: the weight gradient (and bias) only
        for i, (xi, c0, ci, need_in) in enumerate(segments):
            want_b = need_b and i == 0
            if not (need_in or need_w or want_b):
                continue
            if x2 is None:
                wi = weight.detach().to(x.dtype)
            else:  # this segment's weight columns; under autocast sliced and cast in one copy (at the weight's
                # dtype the strided slice goes to convolution_backward as it is)
                wi = weight.detach()[:, c0:c0 + ci].to(dtype=x.dtype, memory_format=torch.contiguous_format)
            gi, gw, gb = torch.ops.aten.convolution_backward(
                dy, xi.detach(), wi, [C] if want_b else None, list(stride), list(padding), [1, 1],
                False, [0, 0], 1, [need_in, need_w, want_b],
            )
            if i == 0:
                dx, db = gi if need_in else dx, gb
            else:
                dx2 = gi
            dws.append(gw)
        if need_w:
            dw = _weight_grad(dws, weight)
        if db is not None:
            db = db.to(bias.dtype)
    return dx, dx2, dw, db, dgamma, dbeta, dres


def conv_input_grad(grad_y: Tensor, weight: Tensor, padding: tuple[int, int]) -> Tensor:
    """Triton dgrad of a stride-1, ungrouped, undilated conv: the input gradient for the output gradient
    ``grad_y`` (N, C_out, Ho, Wo), channels_last in ``grad_y.dtype``.

    It is the forward kernel run as a plain conv of ``grad_y`` with the weight flipped in H/W and
    transposed in C (packed once per call, like a training forward's weight) and padding ``k - 1 - p``.
    :func:`backward` uses cuDNN (``aten.convolution_backward``) for dgrad/wgrad; this is the Triton
    candidate that ``bench/test_conv_grad.py`` times against cuDNN's dgrad on every stride-1 conv of the
    model (strided convs' dgrad is a transposed conv, which the forward kernel does not do).
    """
    if grad_y.dtype not in FLOAT_DTYPES:
        raise ValueError(f"conv_input_grad: the Triton kernels take float32/float16/bfloat16, got {grad_y.dtype}")
    c_out, c_in, kh, kw = weight.shape
    pad = (kh - 1 - padding[0], kw - 1 - padding[1])
    if grad_y.dim() != 4 or grad_y.shape[1] != c_out or min(pad) < 0 or min(padding) < 0:
        raise ValueError(f"conv_input_grad: grad_y {tuple(grad_y.shape)} does not fit a stride-1 conv with weight "
                         f"{tuple(weight.shape)} and padding {tuple(padding)}")
    w = torch.empty((kh * kw * c_out, c_in), dtype=grad_y.dtype, device=grad_y.device)
    w.view(kh, kw, c_out, c_in).copy_(weight.detach().flip(2, 3).permute(2, 3, 0, 1))
    dx, _ = K.conv_bn_fwd(grad_y, w, (kh, kw), (1, 1), pad)
    return dx


def _weight_grad(parts: list[Tensor], weight: Tensor) -> Tensor:
    """The conv weight's gradient from its input-channel segments' (one, or the FFM concat's two), in the
    weight's dtype and layout with at most one copy.

    cuDNN returns the weight gradient of a channels_last input channels_last; autograd's AccumulateGrad
    copies a gradient whose layout differs from its parameter's into that layout, so a plain ``.to(dtype)``
    meant two passes over every 3x3/7x7 weight gradient under autocast (cast, then relayout), and a
    ``torch.cat`` a third for the FFM. Here the cast, relayout and concat are one copy into a buffer shaped
    like the weight, and none when the segment already matches.
    """
    if len(parts) == 1 and parts[0].dtype == weight.dtype and (
            parts[0].is_contiguous() if weight.is_contiguous() else parts[0].stride() == weight.stride()):
        return parts[0]
    dw = torch.empty_like(weight, memory_format=torch.preserve_format)
    c0 = 0
    for part in parts:
        dw[:, c0:c0 + part.shape[1]].copy_(part)
        c0 += part.shape[1]
    return dw


# ---------------------------------------------------------------------------------- autograd


class ConvBNActFunction(torch.autograd.Function):
    """Autograd Function over :func:`forward` / :func:`backward` (see the module docstring for what is saved).

    ``apply(x, x2, weight, bias, bn_weight, bn_bias, residual, running_mean, running_var,
    num_batches_tracked, stride, padding, eps, momentum, has_bn, batch_stats, relu[, need_stats[, pool]])``;
    ``need_stats`` (default ``True``) as in :func:`forward`: pass ``False`` when no backward can follow
    (``ctx.needs_input_grad`` cannot tell: it ignores grad mode). ``pool`` (default ``False``): return
    ``(out, sums)``, both differentiable, instead of ``out``.
    """

    @staticmethod
    def forward(ctx, x, x2, weight, bias, bn_weight, bn_bias, residual, running_mean, running_var,
                num_batches_tracked, stride, padding, eps, momentum, has_bn, batch_stats, relu, need_stats=True,
                pool=False):
        out, y, mean, invstd, sums = forward(
            x, x2, weight, bias, bn_weight, bn_bias, residual, running_mean, running_var,
            num_batches_tracked, stride, padding, eps, momentum, has_bn, batch_stats, relu, need_stats, pool,
        )
        ctx.save_for_backward(x, x2, weight, bias, bn_weight, out if relu else None, y, mean, invstd)
        ctx.geometry = (stride, padding)
        ctx.flags = (has_bn, batch_stats, None if residual is None else residual.dtype)
        return (out, sums) if pool else out

    @staticmethod
    @first_order_only
    def backward(ctx, grad_out, grad_sums=None):
        x, x2, weight, bias, bn_weight, out, y, mean, invstd = ctx.saved_tensors
        has_bn, batch_stats, residual_dtype = ctx.flags
        grads = backward(
            grad_out, x, x2, weight, bias, bn_weight, out, y, mean, invstd, *ctx.geometry,
            has_bn, batch_stats, residual_dtype, tuple(ctx.needs_input_grad[:7]), grad_sums,
        )
        return (*grads, *([None] * 12))


# ---------------------------------------------------------------------------------- torch.library
# ``register_autograd`` refuses ops that mutate their inputs, so ``fastbisenet::conv_bn_act`` is
# functional: it runs :func:`forward` on copies of the running statistics and returns the updated copies
# (empty when there is nothing to update); the wrapper writes them back with ``copy_``, a buffer
# mutation that torch.compile traces natively. ``None`` outputs become empty tensors.


def _none_if_empty(t: Tensor) -> Tensor | None:
    return None if t.numel() == 0 else t


@torch.library.custom_op("fastbisenet::conv_bn_act", mutates_args=())
def conv_bn_act_op(
    x: Tensor, x2: Tensor | None, weight: Tensor, bias: Tensor | None, bn_weight: Tensor | None,
    bn_bias: Tensor | None, residual: Tensor | None, running_mean: Tensor | None, running_var: Tensor | None,
    num_batches_tracked: Tensor | None, stride: list[int], padding: list[int], eps: float,
    momentum: float | None, has_bn: bool, batch_stats: bool, relu: bool, need_stats: bool = True,
    pool: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Functional :func:`forward`: ``(out, y, mean, invstd, new_running_mean, new_running_var, new_nbt, sums)``.

    In eval (``has_bn and not batch_stats``) ``mean``/``invstd`` are empty unless ``need_stats``;
    ``sums`` is empty unless ``pool``.
    """
    update = has_bn and batch_stats and running_mean is not None
    rm = running_mean.clone() if update else running_mean
    rv = running_var.clone() if update else running_var
    nbt = num_batches_tracked.clone() if update and num_batches_tracked is not None else None
    out, y, mean, invstd, sums = forward(
        x, x2, weight, bias, bn_weight, bn_bias, residual, rm, rv, nbt,
        tuple(stride), tuple(padding), eps, momentum, has_bn, batch_stats, relu, need_stats, pool,
    )

    def empty(dtype: torch.dtype = torch.float32) -> Tensor:  # a fresh one each time: outputs must not alias
        return x.new_empty(0, dtype=dtype)

    if invstd is not None and batch_stats:
        invstd = invstd.clone()  # batch statistics: a view of the same buffer as ``mean``
    # (eval: ``mean``/``invstd`` are fresh copies already, and ``out``/``y`` fresh kernel outputs)
    return (
        out, empty(x.dtype) if y is None else y, empty() if mean is None else mean,
        empty() if invstd is None else invstd,
        rm if update else empty(), rv if update else empty(),
        nbt if nbt is not None else empty(torch.long), empty() if sums is None else sums,
    )


@conv_bn_act_op.register_fake
def _(x, x2, weight, bias, bn_weight, bn_bias, residual, running_mean, running_var, num_batches_tracked,
      stride, padding, eps, momentum, has_bn, batch_stats, relu, need_stats=True, pool=False):
    c_out, _, kh, kw = weight.shape
    ho = (x.shape[2] + 2 * padding[0] - kh) // stride[0] + 1
    wo = (x.shape[3] + 2 * padding[1] - kw) // stride[1] + 1
    out = x.new_empty((x.shape[0], c_out, ho, wo)).contiguous(memory_format=torch.channels_last)
    update = has_bn and batch_stats and running_mean is not None
    n_stats = c_out if has_bn and (batch_stats or need_stats) else 0

    def vec(n, dtype=torch.float32):  # fresh tensors: outputs must not alias each other
        return x.new_empty(n, dtype=dtype)

    return (
        out, torch.empty_like(out) if has_bn and batch_stats else vec(0, x.dtype),
        vec(n_stats), vec(n_stats),
        torch.empty_like(running_mean) if update else vec(0), torch.empty_like(running_var) if update else vec(0),
        torch.empty_like(num_batches_tracked) if update and num_batches_tracked is not None else vec(0, torch.long),
        x.new_empty((-(-ho * wo // pool_rows(has_bn, batch_stats)), x.shape[0], c_out), dtype=torch.float32)
        if pool else vec(0),
    )


@torch.library.custom_op("fastbisenet::conv_bn_act_backward", mutates_args=())
def conv_bn_act_backward_op(
    grad_out: Tensor, x: Tensor, x2: Tensor | None, weight: Tensor, bias: Tensor | None,
    bn_weight: Tensor | None, out: Tensor | None, y: Tensor | None, mean: Tensor | None,
    invstd: Tensor | None, stride: list[int], padding: list[int], has_bn: bool, batch_stats: bool,
    residual_dtype: torch.dtype | None, needs: list[bool], grad_sums: Tensor | None = None,
) -> list[Tensor]:
    """:func:`backward` with ``None`` gradients as empty tensors; ``dx``/``dx2`` in their input's layout."""
    grads = backward(
        grad_out.contiguous(memory_format=torch.channels_last), x, x2, weight, bias, bn_weight, out, y, mean,
        invstd, tuple(stride), tuple(padding), has_bn, batch_stats, residual_dtype, tuple(needs), grad_sums,
    )
    result, seen = [], {t.untyped_storage().data_ptr() for t in (grad_out, x, x2, weight) if t is not None}
    for i, g in enumerate(grads):
        g = x.new_empty(0) if g is None else g.contiguous(memory_format=_grad_format(i, x, x2, weight))
        ptr = g.untyped_storage().data_ptr()
        if g.numel() and (ptr in seen or g.storage_offset()):  # dgamma/dbeta are views of one buffer
            g = g.clone()
        seen.add(ptr)
        result.append(g)
    return result


def _grad_format(i: int, x: Tensor, x2: Tensor | None, weight: Tensor) -> torch.memory_format:
    """Layout of gradient ``i`` of :func:`backward`: inputs and the conv weight keep theirs (as
    :func:`_weight_grad` writes it), the 1-D parameters are contiguous, the residual's is channels_last
    (as the forward output)."""
    if i in (0, 1, 2):
        t = (x, x2, weight)[i]
        cl = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
        return torch.channels_last if cl else torch.contiguous_format
    return torch.contiguous_format if i < 6 else torch.channels_last


@conv_bn_act_backward_op.register_fake
def _(grad_out, x, x2, weight, bias, bn_weight, out, y, mean, invstd, stride, padding, has_bn, batch_stats,
      residual_dtype, needs, grad_sums=None):
    like = (x, x2, weight, bias, bn_weight, bn_weight, grad_out)
    grads = []
    for i, need in enumerate(list(needs) + [False] * (7 - len(needs))):
        if i in (4, 5) and need and has_bn:  # dgamma/dbeta: (C_out,) in the BN weight's dtype, else fp32
            grads.append(x.new_empty(weight.shape[0], dtype=torch.float32 if bn_weight is None else bn_weight.dtype))
        elif not need or like[i] is None:
            grads.append(x.new_empty(0))
        else:
            dtype = residual_dtype if i == 6 else like[i].dtype
            grads.append(torch.empty_like(like[i], dtype=dtype, memory_format=_grad_format(i, x, x2, weight)))
    return grads


def _conv_setup(ctx, inputs, output):
    (x, x2, weight, bias, bn_weight, _, residual, _, _, _, stride, padding, _, _, has_bn, batch_stats,
     relu, *rest) = inputs
    pool = len(rest) > 1 and rest[1]
    out, y, mean, invstd = output[:4]
    ctx.save_for_backward(x, x2, weight, bias, bn_weight, out if relu else None, y, mean, invstd)
    ctx.geometry = (list(stride), list(padding))
    ctx.flags = (has_bn, batch_stats, None if residual is None else residual.dtype)
    ctx.pool = pool
    ctx.mark_non_differentiable(*output[1:7], *(() if pool else output[7:]))


def _conv_backward(ctx, grad_out, *rest):
    x, x2, weight, bias, bn_weight, out, y, mean, invstd = ctx.saved_tensors
    has_bn, batch_stats, residual_dtype = ctx.flags
    needs = [bool(n) for n in ctx.needs_input_grad[:7]]
    grad_sums = rest[6] if ctx.pool else None
    grads = torch.ops.fastbisenet.conv_bn_act_backward(
        grad_out, x, x2, weight, bias, bn_weight, out, _none_if_empty(y), _none_if_empty(mean),
        _none_if_empty(invstd), *ctx.geometry, has_bn, batch_stats, residual_dtype, needs, grad_sums,
    )
    return (*(g if need else None for g, need in zip(grads, needs, strict=True)), *([None] * 12))


conv_bn_act_op.register_autograd(_conv_backward, setup_context=_conv_setup)


# ---------------------------------------------------------------------------------- module level


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _check_conv(conv: nn.Conv2d) -> tuple[tuple[int, int], tuple[int, int]]:
    if isinstance(conv.padding, str):
        raise NotImplementedError(f"conv_bn_act: string padding {conv.padding!r} is not supported")
    if conv.groups != 1 or _pair(conv.dilation) != (1, 1) or conv.padding_mode != "zeros":
        raise NotImplementedError("conv_bn_act supports groups=1, dilation=1 and zero padding only")
    return _pair(conv.stride), _pair(conv.padding)


def _autocast(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Under ``torch.autocast`` cast the activations to its dtype, as autocast does for ``conv2d``.

    The weight follows the input's dtype inside :func:`forward`; BN parameters stay fp32 (as in
    PyTorch's BN under autocast), so outputs have the reference's dtypes.
    """
    ref = next(t for t in tensors if t is not None)
    device_type = ref.device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.dtype in FLOAT_DTYPES else t for t in tensors)  # not float64


def _apply(
    x: Tensor, x2: Tensor | None, conv: nn.Conv2d, bn: nn.BatchNorm2d | None,
    residual: Tensor | None, relu: bool, pool: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    stride, padding = _check_conv(conv)
    x, x2, residual = _autocast(x, x2, residual)
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"conv_bn_act: the Triton kernels take float32/float16/bfloat16, got {x.dtype} "
                         "(use backend='torch' for other dtypes)")
    if residual is not None and residual.dtype != x.dtype:
        raise ValueError(f"conv_bn_act: residual dtype {residual.dtype} differs from the input's {x.dtype} "
                         "(the fused output keeps the input's dtype; cast one of them)")
    c_in = x.shape[1] + (0 if x2 is None else x2.shape[1])
    if x.dim() != 4 or c_in != conv.in_channels:
        raise ValueError(f"conv_bn_act: expected (N, {conv.in_channels}, H, W) input, got {tuple(x.shape)}")
    if bn is None:
        has_bn, batch_stats, eps, momentum = False, False, 0.0, 0.0
        bn_w = bn_b = rm = rv = nbt = None
    else:
        if bn.num_features != conv.out_channels:
            raise ValueError(f"conv_bn_act: bn has {bn.num_features} features, conv {conv.out_channels} channels")
        has_bn = True
        # exactly nn.BatchNorm2d.forward: batch statistics in training or without buffers; the buffers are
        # read in eval and updated in training only while track_running_stats is on (it can be turned
        # off after construction, leaving the buffers in place)
        batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
        bn_w, bn_b, eps, momentum = bn.weight, bn.bias, float(bn.eps), bn.momentum
        use_buffers = not bn.training or bn.track_running_stats
        rm, rv = (bn.running_mean, bn.running_var) if use_buffers else (None, None)
        nbt = bn.num_batches_tracked if bn.training and bn.track_running_stats else None
    if residual is not None:
        H, W = x.shape[2], x.shape[3]
        kh, kw = conv.kernel_size
        ho = (H + 2 * padding[0] - kh) // stride[0] + 1
        wo = (W + 2 * padding[1] - kw) // stride[1] + 1
        if tuple(residual.shape) != (x.shape[0], conv.out_channels, ho, wo):
            raise ValueError(f"conv_bn_act: residual shape {tuple(residual.shape)} != conv output shape "
                             f"{(x.shape[0], conv.out_channels, ho, wo)}")
    args = (x, x2, conv.weight, conv.bias, bn_w, bn_b, residual, rm, rv, nbt)
    # eval BN needs its statistics saved only if a backward can follow
    need_stats = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:7])
    if not torch.compiler.is_compiling():
        return ConvBNActFunction.apply(
            *args, stride, padding, eps, momentum, has_bn, batch_stats, relu, need_stats, pool
        )
    out, _, _, _, new_rm, new_rv, new_nbt, sums = torch.ops.fastbisenet.conv_bn_act(
        *args, list(stride), list(padding), eps, momentum, has_bn, batch_stats, relu, need_stats, pool
    )
    if has_bn and batch_stats and rm is not None:
        rm.copy_(new_rm)
        rv.copy_(new_rv)
        if nbt is not None:
            nbt.copy_(new_nbt)
    return (out, sums) if pool else out


def conv_bn_act(
    x: Tensor,
    conv: nn.Conv2d,
    bn: nn.BatchNorm2d | None,
    *,
    residual: Tensor | None = None,
    relu: bool = True,
    pool: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``relu?(bn?(conv(x)) + residual?)`` with the modules' own train/eval semantics (fused kernels).

    Same signature and semantics as :func:`fastbisenet.reference.conv_bn_act`, including ``conv.bias``
    and the in-place running-statistics update of ``bn``. ``x`` may be NCHW or channels_last; the
    output is channels_last in ``x.dtype``. ``pool=True`` returns ``(out, sums)``: fp32 (S, N, C) pixel
    sums of ``out`` gathered by the kernel that writes it (see :func:`forward`), which the attention
    ops of :mod:`fastbisenet.ops.channel_attention` take as ``pooled=`` instead of re-reading ``out``;
    both outputs are differentiable.
    """
    return _apply(x, None, conv, bn, residual, relu, pool)


def concat_conv_bn_act(
    xs: list[Tensor], conv: nn.Conv2d, bn: nn.BatchNorm2d, *, pool: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """``relu(bn(conv(cat(xs, dim=1))))`` without materialising the concat (two K segments of one GEMM).

    Supported: one input (any conv), or two inputs with a 1x1 conv (the FFM's ``convblk``). ``pool`` as
    in :func:`conv_bn_act`.
    """
    xs = list(xs)
    if len(xs) == 1:
        return _apply(xs[0], None, conv, bn, None, True, pool)
    if len(xs) != 2:
        raise NotImplementedError(f"concat_conv_bn_act supports 1 or 2 inputs, got {len(xs)}")
    if tuple(conv.kernel_size) != (1, 1):
        raise NotImplementedError(
            f"concat_conv_bn_act supports two inputs only for 1x1 convs, got kernel {tuple(conv.kernel_size)}"
        )
    a, b = xs
    if a.dim() != 4 or b.dim() != 4 or (a.shape[0], *a.shape[2:]) != (b.shape[0], *b.shape[2:]):
        raise ValueError(f"concat_conv_bn_act: inputs {tuple(a.shape)} and {tuple(b.shape)} differ in N, H, W")
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError("concat_conv_bn_act: inputs must share dtype and device")
    return _apply(a, b, conv, bn, None, True, pool)


# ---------------------------------------------------------------------------------- two convs on one input

ConvBN = tuple[nn.Conv2d, nn.BatchNorm2d | None]
"""A conv and the BatchNorm after it (``None``: no BN)."""


@dataclass
class _Merged:
    """One conv + eval BN with the output channels of two, refreshed from them when they change."""

    ident: tuple  # :func:`_ident` of the sources when last copied
    src: list  # detached aliases of the sources: their addresses cannot be reused while the entry lives
    conv: nn.Conv2d
    bn: nn.BatchNorm2d


_MERGED: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""first conv -> second conv -> :class:`_Merged` (both keys weak, by identity)."""


def _pair_sources(a: ConvBN, b: ConvBN) -> list[Tensor | None]:
    """The tensors a merged pair is copied from, then each BN's ``num_batches_tracked``: running-statistics
    updates (PyTorch's BN or the kernels) write the buffers without bumping their version counters, but
    every training-mode forward that updates them increments ``num_batches_tracked`` through autograd-
    visible ops, which does."""
    copied = [t for conv, bn in (a, b)
              for t in (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)]
    return [*copied, a[1].num_batches_tracked, b[1].num_batches_tracked]


def _ident(a: ConvBN, b: ConvBN, tensors: list[Tensor | None]) -> tuple[tuple, tuple]:
    """What the merged pair depends on: ``(storage, versions)``. ``storage``: the hyper-parameters and every
    source's address, dtype, device and shape (a change needs new merged modules); ``versions``: the
    sources' version counters (a change needs a refresh of the values in place)."""
    hyper = tuple((c.kernel_size, c.stride, c.padding, bn.eps) for c, bn in (a, b))
    storage = hyper + tuple(None if t is None else (t.data_ptr(), t.dtype, t.device, t.shape) for t in tensors)
    return storage, tuple(None if t is None else t._version for t in tensors)


def _mergeable(x: Tensor, a: ConvBN, b: ConvBN, sources: list[Tensor | None]) -> bool:
    """Inference (nothing needs a gradient), both BNs in eval with running statistics and the same eps, and
    the two convs the same geometry on the same parameter dtype/device. ``sources``: :func:`_pair_sources`."""
    (ca, ba), (cb, bb) = a, b
    if torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad for t in sources)):
        return False
    if any(t is not None and t.is_inference() for t in sources):  # no version counter to watch
        return False
    try:  # what the kernel does not support stays on the unmerged path, which raises its usual errors
        _check_conv(ca)
        _check_conv(cb)
    except NotImplementedError:
        return False
    geometry = ("in_channels", "kernel_size", "stride", "padding")
    return (
        not ba.training and not bb.training
        and all(t is not None for t in (ba.running_mean, ba.running_var, bb.running_mean, bb.running_var))
        and ba.eps == bb.eps and ba.running_mean.dtype == bb.running_mean.dtype
        and all(getattr(ca, g) == getattr(cb, g) for g in geometry)
        and ca.weight.dtype == cb.weight.dtype and ca.weight.device == cb.weight.device
    )


def _merged(a: ConvBN, b: ConvBN, sources: list[Tensor | None]) -> _Merged | None:
    """The cached merged conv + BN of ``a`` and ``b``, refreshed (in place: a CUDA graph captured on it sees
    the new values after an eager call) when any source tensor changed, as :func:`_packed_weight` does;
    ``None`` while a CUDA graph is captured and the entry is missing or stale."""
    (ca, ba), (cb, bb) = a, b
    ident = _ident(a, b, sources)
    pairs = _MERGED.get(ca)
    entry = pairs.get(cb) if pairs is not None else None
    if entry is not None and entry.ident == ident:
        return entry
    if _capturing(ca.weight):
        return None
    w = ca.weight
    with torch.inference_mode(False), torch.no_grad():
        if entry is None or entry.ident[0] != ident[0]:  # new storage or hyper-parameters: new modules
            c_out = ca.out_channels + cb.out_channels
            conv = nn.Conv2d(ca.in_channels, c_out, ca.kernel_size, ca.stride, ca.padding,
                             bias=ca.bias is not None or cb.bias is not None, device=w.device, dtype=w.dtype)
            bn = nn.BatchNorm2d(c_out, eps=ba.eps, device=w.device, dtype=ba.running_mean.dtype).eval()
            entry = _Merged(ident, [], conv.requires_grad_(False), bn.requires_grad_(False))
            _MERGED.setdefault(ca, WeakIdKeyDictionary())[cb] = entry
        conv, bn = entry.conv, entry.bn
        conv.weight.copy_(torch.cat([ca.weight, cb.weight]))
        if conv.bias is not None:
            conv.bias.copy_(torch.cat([c.bias if c.bias is not None else torch.zeros_like(c.weight[:, 0, 0, 0])
                                       for c in (ca, cb)]))
        for name, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", None), ("running_var", None)):
            parts = [getattr(n, name) if getattr(n, name) is not None else torch.full_like(n.running_mean, fill)
                     for n in (ba, bb)]
            getattr(bn, name).copy_(torch.cat(parts))
        entry.ident = ident
        entry.src = [t.detach() if t is not None else None for t in sources]
    return entry


def conv_bn_act_pair(x: Tensor, a: ConvBN, b: ConvBN) -> tuple[Tensor, Tensor]:
    """``(conv_bn_act(x, *a), conv_bn_act(x, *b))``: two conv + BN + ReLU on the same input (v1's two 7x7
    stems on the image), as one conv with both sets of output channels where that is exact.

    Layout: merged outputs are channel slices of one channels_last tensor (not dense on their own:
    ``.view`` may fail on them, as on any slice); unmerged ones are dense channels_last tensors.

    Merged in inference (no gradient needed, both BNs in eval, same conv geometry and eps): the two
    weights and BN parameters are concatenated once into a cached merged conv (refreshed when any of them
    changes, see :func:`_merged`) and one kernel launch writes both outputs, returned as channel slices of
    one channels_last tensor. The saving is the input gather of the conv's K loop, which dominates these
    3-channel convs and is then done once per pixel tile for both. Otherwise: two :func:`conv_bn_act`
    calls (training, autograd, ``torch.compile``).
    """
    merged = None
    if not torch.compiler.is_compiling() and a[1] is not None and b[1] is not None:
        sources = _pair_sources(a, b)
        if _mergeable(x, a, b, sources):
            merged = _merged(a, b, sources)
    if merged is None:
        return conv_bn_act(x, *a), conv_bn_act(x, *b)
    out = _apply(x, None, merged.conv, merged.bn, None, True)
    c = a[0].out_channels
    return out[:, :c], out[:, c:]
