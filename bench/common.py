"""What every benchmark module shares: configuration from the environment, the per-op shape table
traced from the model, and the one runner through which every benchmark row is measured.

Environment (all optional):
    FASTBISENET_BENCH_MODE      ``full`` (default) or ``quick`` (bf16, batch-1 op shapes, 2 end-to-end
                                cases, no max-autotune)
    FASTBISENET_BENCH_DTYPES    comma list overriding the dtypes, e.g. ``bf16,fp16``
    FASTBISENET_BENCH_VARIANTS  comma list overriding the variants (of :data:`VARIANTS`)
    FASTBISENET_BENCH_ROUNDS    timed samples per row (default 20, quick 10)
    FASTBISENET_BENCH_SAMPLE_MS device time aimed at per sample (one graph replay), default 2
    FASTBISENET_BENCH_BUDGET_S  wall-clock budget of the session: rows that would start too late are
                                skipped ("time budget"), so the JSON is still written
    FASTBISENET_BENCH_STAGES    comma list of the stages to run (default all, see :data:`STAGES`); rows of
                                other stages are deselected
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

from fastbisenet import benchmark as fb

SESSION_START = time.monotonic()
MODE = os.environ.get("FASTBISENET_BENCH_MODE", "full").strip().lower()
QUICK = MODE == "quick"


def _env_list(name: str, default: Sequence[str], allowed: Sequence[str]) -> tuple[str, ...]:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return tuple(default)
    values = tuple(v.strip() for v in raw.split(",") if v.strip())
    bad = [v for v in values if v not in allowed]
    if bad:
        raise pytest.UsageError(f"{name}: unknown value(s) {bad}; choose from {list(allowed)}")
    return values


STAGES = ("headline", "ab", "sizes", "ops", "more")
"""Every row belongs to one stage; stages run in this order (each can be its own process, see
bench/gpu_suite.sh) and rows within a stage in the order below, so a time budget cuts the least needed:

- ``headline``: the rows the goals are judged on, bf16 end-to-end inference at 1x3x1024x2048 (fastbisenet,
  eager, compile, then max-autotune last: it compiles longest) and the training step at 8x3x1024x1024
  (fastbisenet, eager, compile);
- ``ab``: the A/B rows that decide code defaults (stem loop form, Triton or cuDNN dgrad), bf16;
- ``sizes``: bf16 end-to-end inference at the other batch-1 sizes (1x3x512x1024, 1x3x768x1536: the paper's
  speed resolution), fastbisenet, eager and compile: the latency-by-resolution plot;
- ``ops``: bf16 per-op rows at batch 1 (fastbisenet, eager, compile), each op's variants one after another
  so that a cut leaves whole comparisons;
- ``more``: everything else (other sizes and batch 8, max-autotune per op and for training, fp16, ...).
"""
SELECTED_STAGES = _env_list("FASTBISENET_BENCH_STAGES", STAGES, STAGES)
DTYPES = _env_list("FASTBISENET_BENCH_DTYPES", ("bf16",) if QUICK else ("bf16", "fp16"), ("bf16", "fp16", "fp32"))
VARIANTS = _env_list("FASTBISENET_BENCH_VARIANTS", fb.VARIANTS[:3] if QUICK else fb.VARIANTS, fb.VARIANTS)
ROUNDS = int(os.environ.get("FASTBISENET_BENCH_ROUNDS", "10" if QUICK else "20"))
SAMPLE_MS = float(os.environ.get("FASTBISENET_BENCH_SAMPLE_MS", "2"))
WARMUP = 3
DEVICE = "cuda"
BUDGET_S = float(os.environ["FASTBISENET_BENCH_BUDGET_S"]) if os.environ.get("FASTBISENET_BENCH_BUDGET_S") else None

MAIN_SHAPE = (1, 3, 1024, 2048)
TRAIN_SHAPE = (8, 3, 1024, 1024)
OP_INPUTS: tuple[tuple[int, ...], ...] = (MAIN_SHAPE,) if QUICK else (MAIN_SHAPE, TRAIN_SHAPE)
"""Model inputs whose per-op shapes are benchmarked."""
E2E_CASES: tuple[tuple[str, tuple[int, ...]], ...] = (
    (("pred", MAIN_SHAPE), ("train", TRAIN_SHAPE)) if QUICK else
    (("pred", (1, 3, 512, 1024)), ("pred", (1, 3, 768, 1536)), ("pred", MAIN_SHAPE), ("pred", TRAIN_SHAPE),
     ("train", TRAIN_SHAPE))
)
"""(aux_mode, input shape): "pred" = inference, "train" = training step."""

OP_FAMILIES: dict[str, tuple[str, ...]] = {
    "conv_bn": ("conv_bn_act", "concat_conv_bn_act", "conv_bn_act_pair"),
    "attention": ("mean_hw", "bn_attention", "global_context", "mlp_attention", "attend_residual"),
    "upsample": ("attend_add_upsample",),
    "head": ("head_logits", "head_argmax", "head_cross_entropy"),
    "pool": ("max_pool2d",),
    "loss": ("cross_entropy",),  # not a model op: bench/test_loss.py builds its cases
}
INFERENCE_ONLY = frozenset({"head_argmax", "max_pool2d"})
"""Ops without a Triton backward: no forward+backward rows (max_pool2d with a gradient is PyTorch's op)."""

floors_measured: dict[str, float] = {}
"""Filled by the session's ``floors`` fixture; also written to the JSON's machine_info."""


@functools.cache
def traced_cases() -> tuple[fb.OpCase, ...]:
    """Distinct op calls of the model at each of :data:`OP_INPUTS`: v1 with its aux heads (every
    conv, attention, context stage and head), its training loss ``model(x, labels)`` for the fused
    head + CE, v1 "pred" for the argmax head, face-parsing for the MLP attention."""
    out: list[fb.OpCase] = []
    for shape in OP_INPUTS:
        out += fb.trace_ops(shape, aux_mode="train")
        out += [c for c in fb.trace_ops(shape, aux_mode="train", labels=True) if c.op == "head_cross_entropy"]
        out += [c for c in fb.trace_ops(shape, aux_mode="pred") if c.op == "head_argmax"]
        out += [c for c in fb.trace_ops(shape, aux_mode="train", preset="face-parsing") if c.op == "mlp_attention"]
    return tuple(out)


@functools.cache
def trains(case: fb.OpCase) -> bool:
    """Whether the op has a training pass at this shape (BatchNorm cannot train on one value per
    channel, e.g. the global-context conv at batch 1)."""
    if case.op in INFERENCE_ONLY:
        return False
    try:
        fb.op_cost(case, torch.bfloat16, backward=True)
    except (ValueError, RuntimeError):
        return False
    return True


def _slug(text: str) -> str:
    return text.replace(" ", "_").replace(",", "+")


def priority(stage: str, dtype: str = "bf16", variant: str = "fastbisenet", kind: int = 0) -> tuple[int, ...]:
    """A row's ``bench_priority`` key: its stage (:data:`STAGES`), then dtype, max-autotune last, then ``kind``;
    ties keep the collection order (a case's variants are collected one after another)."""
    return (STAGES.index(stage), DTYPES.index(dtype) if dtype in DTYPES else len(DTYPES),
            int(variant == "max-autotune"), kind)


def stage_of(key: tuple[int, ...]) -> str:
    """The stage of a ``bench_priority`` key (rows without one belong to "more")."""
    return STAGES[key[0]] if key and 0 <= key[0] < len(STAGES) else "more"


def run_order(keys: Sequence[tuple[int, ...] | None], stages: Sequence[str] = STAGES) -> list[int]:
    """Indices of the rows to run, in execution order, for rows with these ``bench_priority`` keys (``None``:
    no key, stage "more"): the rows of ``stages`` only, sorted by key, ties in the given order."""
    full = [k if k is not None else (len(STAGES),) for k in keys]
    keep = [i for i, k in enumerate(full) if stage_of(k) in stages]
    return sorted(keep, key=lambda i: (full[i], i))


def op_params(family: str, cases: Sequence[fb.OpCase] | None = None) -> list[Any]:
    """``pytest.param(case, dtype, pass, variant)`` for every op of ``family`` among ``cases`` (default: the
    model's traced cases): one row each."""
    ops = OP_FAMILIES[family]
    params = []
    for case in traced_cases() if cases is None else cases:
        if case.op not in ops:
            continue
        passes = ["fwd", "fwd+bwd"] if trains(case) else ["fwd"]
        for dtype in DTYPES:
            for pass_ in passes:
                for variant in VARIANTS:
                    main = dtype == "bf16" and case.input_shape[0] == 1 and variant != "max-autotune"
                    # forward rows first (the inference goal), then forward + backward
                    prio = priority("ops" if main else "more", dtype, variant, kind=int(pass_ != "fwd"))
                    params.append(pytest.param(
                        case, dtype, pass_, variant, marks=pytest.mark.bench_priority(prio),
                        id=f"{case.op}-{_slug(case.label)}-{dtype}-{pass_}-{variant}"))
    return params


HEADLINE_E2E = (("pred", MAIN_SHAPE), ("train", TRAIN_SHAPE))
"""The end-to-end cases the goals are judged on (stage "headline")."""
AB_STEM_E2E, AB_DGRAD_E2E, AB_STEM_OPS, AB_DGRAD_OPS = range(4)
"""``kind`` of the A/B rows within stage "ab": the whole-model A/Bs first."""


def dgrad_params() -> list[Any]:
    """``pytest.param(case, dtype, variant)`` for the dgrad rows (bench/test_conv_grad.py): every stride-1 conv of
    the model's traced cases, cuDNN and the Triton candidate
    (:data:`fastbisenet.benchmark.workloads.DGRAD_VARIANTS`)."""
    params = []
    for case in fb.dgrad_cases(traced_cases()):
        for dtype in DTYPES:
            for variant in (v for v in fb.DGRAD_VARIANTS if v in VARIANTS):
                prio = priority("ab" if dtype == "bf16" else "more", dtype, variant, kind=AB_DGRAD_OPS)
                params.append(pytest.param(case, dtype, variant, marks=pytest.mark.bench_priority(prio),
                                           id=f"conv_dgrad-{_slug(case.label)}-{dtype}-{variant}"))
    return params


def e2e_params() -> list[Any]:
    """``pytest.param(aux_mode, shape, dtype, variant)`` for the end-to-end rows."""
    params = []
    for aux_mode, shape in E2E_CASES:
        for dtype in DTYPES:
            for variant in VARIANTS:
                headline = dtype == "bf16" and (aux_mode, shape) in HEADLINE_E2E and (
                    variant != "max-autotune" or aux_mode == "pred")
                other_size = dtype == "bf16" and aux_mode == "pred" and shape[0] == 1 and variant != "max-autotune"
                stage = "headline" if headline else "sizes" if other_size else "more"
                prio = priority(stage, dtype, variant)
                params.append(pytest.param(aux_mode, shape, dtype, variant, marks=pytest.mark.bench_priority(prio),
                                           id=f"{aux_mode}-{fb.shape_str(shape)}-{dtype}-{variant}"))
    return params


def _reserve_s(variant: str, e2e: bool) -> float:
    """Wall time a row is expected to need at most (compilation dominates)."""
    if variant == "max-autotune":
        return 240.0 if e2e else 45.0
    if variant == "compile":
        return 90.0 if e2e else 15.0
    if variant == "fastbisenet":  # the first rows autotune every conv shape they meet
        return 60.0 if e2e else 8.0
    return 20.0 if e2e else 4.0


def check_budget(variant: str, e2e: bool) -> None:
    if BUDGET_S is None:
        return
    left = BUDGET_S - (time.monotonic() - SESSION_START)
    if left < _reserve_s(variant, e2e):
        pytest.skip(f"time budget: {left:.0f} s of FASTBISENET_BENCH_BUDGET_S={BUDGET_S:.0f} left")


def _check_variant(variant: str) -> None:
    if variant == "fastbisenet":
        from fastbisenet import kernels

        if kernels.INTERPRET:
            pytest.skip("TRITON_INTERPRET is set: the Triton kernels would run interpreted; unset it")


def measure_row(benchmark: Any, *, make_step: Callable[[], Callable[[], Any]], group: str, variant: str,
                e2e: bool, info: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """Build the step, time it (CUDA graph + events), feed the per-iteration device times to
    pytest-benchmark and attach the shared ``extra_info`` (``extra`` overrides its fields, e.g. an A/B arm's
    ``variant`` label). Missing fused ops skip the row.

    The group and ``extra_info`` are set before the times are fed: pytest-benchmark copies the group when
    ``pedantic`` runs, so a group changed afterwards never reaches the JSON.

    L2: per-op rows are timed cold (``cache: "cold-l2-flush"``, see :func:`fb.time_cuda`): a single
    op replayed back to back would find its inputs and weights still in the ~50 MB L2 and be compared
    with a DRAM-bandwidth floor it never pays. End-to-end rows stay warm (``cache: "warm"``): that is
    how a deployed model runs, weights staying in L2 from one frame to the next, and the activations
    of a whole network at these sizes are far larger than L2 anyway."""
    check_budget(variant, e2e)
    _check_variant(variant)
    fb.free_memory()
    benchmark.group = group
    try:
        step = make_step()
    except fb.OpUnavailable as exc:
        pytest.skip(f"fastbisenet op unavailable: {exc}")
    timing = fb.time_cuda(step, rounds=ROUNDS, warmup=WARMUP, sample_ms=SAMPLE_MS, l2_flush=not e2e)
    resident = torch.cuda.memory_allocated() if torch.cuda.is_available() else None  # the row's own tensors
    mem = fb.peak_memory(step)
    del step
    fb.free_memory()
    after = torch.cuda.memory_allocated() if torch.cuda.is_available() else None  # > 0: an earlier row leaks
    benchmark.extra_info.update(fb.extra_info(timing=timing, peak_mem=mem, variant=variant, **info),
                                allocated_at_peak_start_bytes=resident, allocated_after_row_bytes=after,
                                **(extra or {}))
    fb.feed_benchmark(benchmark, timing.samples_ms)


def op_group(case: fb.OpCase, dtype: str, pass_: str) -> str:
    """The report group of a per-op row (its variants are compared within it)."""
    return f"{case.op} {case.label} {dtype} {pass_}"


def e2e_group(aux_mode: str, shape: tuple[int, ...], dtype: str) -> str:
    """The report group of an end-to-end row."""
    return f"end_to_end {aux_mode} {fb.shape_str(shape)} {dtype}"


def ab_arm(base_group: str, knob: str, arm: str, default: str) -> dict[str, Any]:
    """``group`` and ``extra`` of one A/B row: both arms share the group ``"<knob> A/B: <base group>"``; the
    default arm keeps the variant name "fastbisenet" and the other is "fastbisenet <knob>=<arm>", so the
    report's speedup column reads other-arm time / default-arm time (> 1: the default is faster). The op
    ``"<knob> A/B"`` gives the rows their own report section (and keeps them out of the end-to-end plot)."""
    extra = {"op": f"{knob} A/B", knob: arm}
    if arm != default:
        extra["variant"] = f"fastbisenet {knob}={arm}"
    return {"group": f"{knob} A/B: {base_group}", "extra": extra}


def run_op(benchmark: Any, case: fb.OpCase, dtype: str, pass_: str, variant: str, floors: dict[str, float],
           env: dict[str, Any], *, group: str | None = None, extra: dict[str, Any] | None = None) -> None:
    """One per-op row: the op at ``case`` in ``variant``, forward or forward + backward; ``group``
    (default :func:`op_group`) and ``extra`` as in :func:`measure_row` (A/B rows set both)."""
    torch_dtype = fb.DTYPES[dtype]
    backward = pass_ == "fwd+bwd"
    flops, nbytes = fb.op_cost(case, torch_dtype, backward=backward)
    tensors = [a for a in case.args if isinstance(a, fb.TensorSpec)]
    info = dict(op=case.op, case=case.label, pass_=pass_, dtype=torch_dtype,
                shape=tensors[0].shape if tensors else case.input_shape, flops=flops, nbytes=nbytes,
                floors=floors, env=env, model_input=list(case.input_shape), calls=case.calls,
                call_sites=list(case.where))
    measure_row(benchmark,
                make_step=lambda: fb.op_workload(case, variant, torch_dtype, backward=backward, device=DEVICE),
                group=group or op_group(case, dtype, pass_), variant=variant, e2e=False, info=info, extra=extra)


def run_e2e(benchmark: Any, aux_mode: str, shape: tuple[int, ...], dtype: str, variant: str,
            floors: dict[str, float], env: dict[str, Any], *, group: str | None = None,
            extra: dict[str, Any] | None = None) -> None:
    """One end-to-end row: inference ("pred") or a training step ("train") of BiSeNet v1; ``group``
    (default :func:`e2e_group`) and ``extra`` as in :func:`measure_row`."""
    torch_dtype = fb.DTYPES[dtype]
    flops, nbytes = fb.model_cost(shape, torch_dtype, aux_mode=aux_mode)
    side: dict[str, Any] = {}

    def make_step() -> Callable[[], Any]:
        wl = fb.model_workload(variant, shape, torch_dtype, aux_mode=aux_mode, device=DEVICE)
        side.update(wl.info)
        if wl.saved_bytes is not None and variant not in fb.COMPILE_MODES:  # hooks and dynamo: not mixed
            try:
                side["saved_for_backward_bytes"] = wl.saved_bytes()
            except Exception as exc:  # a side figure: never costs the timed row
                side["saved_for_backward_error"] = fb._first_line(exc)
            fb.free_memory()
        side.update(extra or {})
        return wl.step

    info = dict(op="end_to_end", case=f"{aux_mode} {fb.shape_str(shape)}", pass_=aux_mode, dtype=torch_dtype,
                shape=shape, flops=flops, nbytes=nbytes, floors=floors, env=env, aux_mode=aux_mode)
    measure_row(benchmark, make_step=make_step, group=group or e2e_group(aux_mode, shape, dtype), variant=variant,
                e2e=True, info=info, extra=side)  # filled by make_step
