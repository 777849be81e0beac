"""What a benchmark row runs and records.

The no-argument steps of each variant: :func:`op_workload` (one op, forward or forward + backward),
:func:`dgrad_workload` (a conv's input gradient), :func:`model_workload` (the whole model: inference, or the
training step of ``fastbisenet train``); the environment (:func:`env_info`, :func:`autotune_choices`); and the
one ``extra_info`` schema of every row (:func:`extra_info`).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import platform
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastbisenet.benchmark._common import IGNORE_INDEX, SCHEMA, dtype_name
from fastbisenet.benchmark.cases import ConvSpec, OpCase, TensorSpec, _leaves, _outputs, materialize
from fastbisenet.benchmark.timing import Timing, saved_tensor_bytes

COMPILE_MODES: dict[str, str] = {"compile": "default", "max-autotune": "max-autotune-no-cudagraphs"}
"""``torch.compile(mode=...)`` of each compile variant. max-autotune runs without Inductor's own
CUDA graphs: the harness captures every step in its own CUDA graph, and Inductor's cudagraph trees
inside that capture would either be captured twice or fall back; kernel selection is the same."""
REPO_ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------------


def git_commit() -> str:
    """The checkout's commit (``+dirty`` when the tree has changes), ``$FASTBISENET_GIT_COMMIT``, or
    ``"unknown"``."""
    if os.environ.get("FASTBISENET_GIT_COMMIT"):
        return os.environ["FASTBISENET_GIT_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def env_info(device: str | torch.device | None = None) -> dict[str, Any]:
    """Device name and versions of everything that changes the numbers."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    return {
        "device_name": torch.cuda.get_device_name(device) if cuda else (platform.processor() or "cpu"),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(),
        "git_commit": git_commit(),
    }


def autotune_choices() -> list[dict[str, Any]]:
    """The config each Triton autotuner of :mod:`fastbisenet.kernels` picked in this process, per key.

    One entry per (kernel, key): ``kernel``, ``key`` (the tuner's key arguments by name), ``dtypes`` (of
    its tensor arguments, as Triton appends them to the key) and ``config`` (the config's constexprs plus
    ``num_warps``/``num_stages``). The benchmarks record this so that a GPU run says which tiles and
    K-loop forms won at which shapes.
    """
    import pkgutil

    from triton.runtime.autotuner import Autotuner

    from fastbisenet import kernels

    out = []
    for mod_info in pkgutil.iter_modules(kernels.__path__):
        mod = importlib.import_module(f"{kernels.__name__}.{mod_info.name}")
        for tuner in vars(mod).values():
            if not isinstance(tuner, Autotuner):
                continue
            name = getattr(getattr(tuner, "base_fn", None), "__name__", None) or getattr(tuner.fn, "__name__", "?")
            n = len(tuner.keys)
            for key, cfg in tuner.cache.items():
                values = [v if isinstance(v, (int, float, bool, str)) or v is None else str(v) for v in key]
                out.append({"kernel": name, "key": dict(zip(tuner.keys, values[:n], strict=False)),
                            "dtypes": sorted(set(map(str, values[n:]))),
                            "config": {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}})
    return sorted(out, key=lambda d: (d["kernel"], json.dumps(d["key"], sort_keys=True), d["dtypes"]))


# ----------------------------------------------------------------------------------------------
# workloads
# ----------------------------------------------------------------------------------------------


class OpUnavailable(LookupError):
    """The fused backend has no such op (the benchmark row is skipped, not failed)."""


def resolve_op(op: str, variant: str) -> Callable[..., Any]:
    """The callable for ``op`` in ``variant``; raises :class:`OpUnavailable` when the fused namespace lacks
    it. ``compile`` variants reset dynamo first, so each starts fresh."""
    from fastbisenet import reference

    if variant == "fastbisenet":
        fused = importlib.import_module("fastbisenet.ops.fused")
        if not hasattr(fused, op):
            raise OpUnavailable(f"fastbisenet.ops.fused has no {op!r}")
        return getattr(fused, op)
    fn = getattr(reference, op)
    if variant == "eager":
        return fn
    return compile_fn(fn, variant)


def compile_fn(fn: Any, variant: str) -> Any:
    """``torch.compile`` for the ``compile`` / ``max-autotune`` variants (static shapes, the modes of
    :data:`COMPILE_MODES`)."""
    if variant not in COMPILE_MODES:
        raise ValueError(f"not a torch.compile variant: {variant!r}")
    torch._dynamo.reset()
    mode = COMPILE_MODES[variant]
    return torch.compile(fn, dynamic=False, mode=None if mode == "default" else mode)


def variant_info(variant: str) -> dict[str, Any]:
    """``extra_info`` fields that pin down a variant: the exact ``torch.compile`` mode."""
    return {"compile_mode": COMPILE_MODES.get(variant)}


def op_workload(case: OpCase, variant: str, dtype: torch.dtype, *, backward: bool,
                device: str = "cuda") -> Callable[[], Any]:
    """A no-argument step: the op's forward (modules in eval mode, no grad) or its forward + backward
    (modules in train mode, every input and parameter gradient computed)."""
    fn = resolve_op(case.op, variant)
    args, kwargs = materialize(case, device, dtype, train=backward)
    if not backward:
        def forward() -> Any:
            with torch.no_grad():
                return fn(*args, **kwargs)
        return forward
    leaves = [t for t in _leaves(args, kwargs) if t.requires_grad]
    grads = [torch.randn_like(o) for o in _outputs(fn(*args, **kwargs))]

    def train_step() -> None:
        for t in leaves:
            t.grad = None
        torch.autograd.backward(_outputs(fn(*args, **kwargs)), grads)

    return train_step


DGRAD_VARIANTS = ("fastbisenet", "eager")
"""The dgrad rows: the Triton candidate (:func:`fastbisenet.ops.conv_bn.conv_input_grad`, weight packing
included) and cuDNN's (``aten.convolution_backward``, input gradient only), which the op's backward uses."""


def dgrad_cases(cases: Iterable[OpCase]) -> list[OpCase]:
    """The ``conv_bn_act`` calls among ``cases`` whose input gradient the Triton dgrad can compute (stride 1,
    not on the 3-channel image, which needs no gradient), one per distinct (input shape, conv): calls that
    differ only in their epilogue (residual, ReLU, pixel sums) have the same dgrad, so their counts and call
    sites are merged. (The FFM's concat conv, two column-slice dgrads, is not among them.)"""
    merged: dict[tuple, OpCase] = {}
    for case in cases:
        conv = next((a for a in case.args if isinstance(a, ConvSpec)), None)
        if case.op != "conv_bn_act" or conv is None or conv.stride != (1, 1) or conv.in_ch <= 3:
            continue
        key = (case.input_shape, case.args[0].shape, conv)
        if key in merged:
            old = merged[key]
            case = replace(old, calls=old.calls + case.calls, where=old.where + case.where)
        else:  # labelled by the conv alone
            case = replace(case, kwargs=())
        merged[key] = case
    return list(merged.values())


def _dgrad_shapes(case: OpCase) -> tuple[TensorSpec, ConvSpec, tuple[int, ...]]:
    """``(x spec, conv spec, output shape)`` of a :func:`dgrad_cases` case."""
    x, conv = case.args[0], case.args[1]
    n, _, h, w = x.shape
    ho = (h + 2 * conv.padding[0] - conv.kernel[0]) // conv.stride[0] + 1
    wo = (w + 2 * conv.padding[1] - conv.kernel[1]) // conv.stride[1] + 1
    return x, conv, (n, conv.out_ch, ho, wo)


def dgrad_cost(case: OpCase, dtype: torch.dtype) -> tuple[int, int]:
    """(FLOPs, bytes) of the input gradient of the conv of ``case``: the forward's FLOPs; the output gradient
    and the weight read once, the input gradient written once."""
    x, conv, out_shape = _dgrad_shapes(case)
    size = torch.tensor([], dtype=dtype).element_size()
    k = conv.in_ch * conv.kernel[0] * conv.kernel[1]
    flops = 2 * math.prod(out_shape) * k  # every output-gradient element meets C_in * KH * KW weights
    nbytes = (math.prod(out_shape) + conv.out_ch * k + math.prod(x.shape)) * size
    return flops, nbytes


def dgrad_workload(case: OpCase, variant: str, dtype: torch.dtype, *, device: str = "cuda") -> Callable[[], Tensor]:
    """A no-argument step returning the input gradient of the conv of ``case`` for a random output gradient:
    ``"fastbisenet"`` the Triton dgrad, ``"eager"`` cuDNN's (see :data:`DGRAD_VARIANTS`). The weight is an
    fp32 master copy, as in AMP training: each variant pays its own weight preparation, as the backward
    does (cuDNN: the cast to ``dtype``; Triton: the flipped, transposed packing, which casts too)."""
    from fastbisenet.ops.conv_bn import conv_input_grad

    x, conv, out_shape = _dgrad_shapes(case)
    gen = torch.Generator(device=device).manual_seed(0)
    cl = torch.channels_last
    grad_y = torch.randn(out_shape, generator=gen, device=device).to(dtype).contiguous(memory_format=cl)
    weight = torch.randn(conv.out_ch, conv.in_ch, *conv.kernel, generator=gen, device=device)
    if variant == "fastbisenet":
        return lambda: conv_input_grad(grad_y, weight, conv.padding)
    if variant != "eager":
        raise ValueError(f"dgrad variants are {DGRAD_VARIANTS}, got {variant!r}")
    x_meta = torch.empty(x.shape, device=device, dtype=dtype).contiguous(memory_format=cl)  # only its shape is read

    def cudnn() -> Tensor:  # what fastbisenet.ops.conv_bn.backward runs for the input gradient
        return torch.ops.aten.convolution_backward(
            grad_y, x_meta, weight.to(dtype), None, list(conv.stride), list(conv.padding), [1, 1], False, [0, 0], 1,
            [True, False, False],
        )[0]

    return cudnn


def ohem_reduce(pixel_loss: Tensor, *, n_min: int, thresh: float = 0.7, topk: bool | None = None) -> Tensor:
    """The OHEM mean of a per-pixel CE without host syncs: mean over pixels with CE > -log(thresh), or
    over the ``n_min`` largest CEs when fewer pass (``n_min`` = valid pixels // 16, from the host).

    ``topk``: which of the two to compute, decided by the caller (:class:`CapturableOhem`); ``None``
    computes both and selects on the device (a top-k over every pixel each call, which ``OhemCELoss``
    runs only when few pixels are hard)."""
    loss = pixel_loss.flatten()
    if topk is None or not topk:
        hard = loss > -math.log(thresh)
        n_hard = hard.sum()
        mean_hard = (loss * hard).sum() / n_hard.clamp_min(1)
        if topk is not None:
            return mean_hard
    # sorted=False: the mean needs the n_min largest, not their order (no sort of ~n/16 values)
    mean_top = loss.topk(max(n_min, 1), sorted=False).values.mean()
    return mean_top if topk else torch.where(n_hard >= n_min, mean_hard, mean_top)


class CapturableOhem:
    """``OhemCELoss`` summed over the heads' per-pixel CEs for fixed labels, capturable in a CUDA graph.

    ``OhemCELoss`` picks, per head and step, the hard-pixel mean or the mean of the ``n_min`` largest losses
    from a host sync. A plain call here does the same (one sync for all heads); under CUDA-graph capture,
    where no sync is possible, the branches of the last plain call are replayed (the warm-up calls before
    capture are plain). So no variant pays for a top-k over every pixel that training would not run."""

    def __init__(self, n_min: int, thresh: float = 0.7) -> None:
        self.n_min, self.thresh = n_min, thresh
        self.topk: list[bool] | None = None
        """Per head, whether the last plain call took the top-k branch."""

    def __call__(self, pixel_losses: Sequence[Tensor]) -> Tensor:
        if not _capturing(pixel_losses[0].device.type):
            limit = -math.log(self.thresh)
            counts = torch.stack([(pl > limit).sum() for pl in pixel_losses]).tolist()  # the one sync
            self.topk = [c < self.n_min for c in counts]
        elif self.topk is None or len(self.topk) != len(pixel_losses):
            raise RuntimeError("CapturableOhem: call it once outside CUDA-graph capture first (it picks the "
                               "OHEM branch of each head there)")
        return sum(ohem_reduce(pl, n_min=self.n_min, thresh=self.thresh, topk=k)
                   for pl, k in zip(pixel_losses, self.topk, strict=True))


def make_criterion(labels: Tensor) -> tuple[CapturableOhem, str]:
    """:class:`CapturableOhem` for fixed ``labels``, applied to the per-pixel CEs of the heads
    (``BiSeNet(x, labels)``'s outputs): ``fastbisenet.losses.total_pixel_loss`` with the OHEM branch of
    each head decided outside capture, so the whole training step can be captured in a CUDA graph."""
    n_min = int((labels != IGNORE_INDEX).sum().item()) // 16
    return (CapturableOhem(n_min),
            "ohem (OhemCELoss.reduce per head, branch chosen by a plain call before capture) of model(x, labels)'s "
            "per-pixel CE: fused head + CE kernels on backend triton, head logits + F.cross_entropy on backend "
            "torch")


def random_labels(shape: Sequence[int], n_classes: int, device: str, seed: int = 0) -> Tensor:
    """(N, H, W) int64 labels in [0, n_classes) with ~5% ignored pixels."""
    gen = torch.Generator().manual_seed(seed)
    n, _, h, w = shape
    labels = torch.randint(0, n_classes, (n, h, w), generator=gen)
    labels[torch.rand((n, h, w), generator=gen) < 0.05] = IGNORE_INDEX
    return labels.to(device)


@dataclass
class ModelWorkload:
    step: Callable[[], Any]
    info: dict[str, Any] = field(default_factory=dict)
    saved_bytes: Callable[[], int] | None = None
    """Training: :func:`.timing.saved_tensor_bytes` of the step's forward (weights and batch excluded)."""


def _train_settings() -> dict[str, Any]:
    """SGD settings of ``fastbisenet train`` (its defaults, lr for the benchmark's batch irrelevant)."""
    try:
        from fastbisenet.config import TrainConfig

        d = TrainConfig()
        return {"momentum": d.momentum, "weight_decay": d.weight_decay, "lr_mult": d.lr_mult}
    except Exception:  # pragma: no cover - the config module is part of the package
        return {"momentum": 0.9, "weight_decay": 5e-4, "lr_mult": 10.0}


def _capturing(device_type: str) -> bool:
    """Whether the current CUDA stream is being captured into a graph."""
    return device_type == "cuda" and torch.cuda.is_current_stream_capturing()


def model_workload(variant: str, input_shape: Sequence[int], dtype: torch.dtype, *, aux_mode: str,
                   device: str = "cuda", n_classes: int = 19, preset: str = "v1",
                   backbone: str = "resnet18", optimizer_step: bool = True) -> ModelWorkload:
    """End-to-end step. Variant ``fastbisenet`` uses backend "triton", the others "torch";
    channels_last on CUDA.

    Inference (``aux_mode`` "pred"/"eval"): eval mode, no grad, ``dtype`` weights and activations.

    Training (``"train"``): what one iteration of ``fastbisenet train`` runs on the device -- fp32
    master weights and fp32 input; forward under ``torch.autocast(dtype)`` (none for fp32); OHEM CE
    on the three heads (main + out16 + out32: ``model(x, labels)``, the per-pixel CE as ``fastbisenet
    train`` computes it, fused with the heads on the Triton backend, fp32); backward; the
    SGD step of ``fastbisenet.schedule.build_optimizer`` (momentum, weight decay, foreach: no host
    syncs, so it is captured in the CUDA graph with the rest). fp16 adds the ``GradScaler``: scale,
    backward, ``unscale_`` (the inf check is a device kernel), step, ``update``. Only the scaler's
    skip-on-inf decision (``found_inf.item()``, a host sync) cannot be captured: outside capture
    (warm-up, plain launches) the step is ``scaler.step`` exactly; inside it the step is always taken.
    Autocast runs with ``cache_enabled=False`` (required around CUDA-graph capture; BiSeNet uses
    each weight once per forward, so the casts are the same). Not included: data loading and
    augmentation, the host-side lr schedule, the loss ``isfinite`` check (a host sync).
    """
    from fastbisenet.model import BiSeNet

    torch.manual_seed(0)
    backend = "triton" if variant == "fastbisenet" else "torch"
    model = BiSeNet(n_classes, aux_mode, preset=preset, backbone=backbone, backend=backend)
    # channels_last is the fast layout on GPUs (and the kernels'); on CPU it is much slower here
    fmt = torch.channels_last if torch.device(device).type == "cuda" else torch.contiguous_format
    train = aux_mode == "train"
    model = model.to(device=device, dtype=torch.float32 if train else dtype, memory_format=fmt)
    model.train(train)
    runner: Any = compile_fn(model, variant) if variant in COMPILE_MODES else model
    info: dict[str, Any] = {"backend": backend, **variant_info(variant)}
    if not train:
        x = torch.randn(*input_shape).to(device=device, dtype=dtype, memory_format=fmt)
        info["precision"] = f"{dtype_name(dtype)} weights and activations"

        def infer() -> Any:
            with torch.no_grad():
                return runner(x)
        return ModelWorkload(infer, info)

    from fastbisenet.schedule import build_optimizer

    x = torch.randn(*input_shape).to(device=device, dtype=torch.float32, memory_format=fmt)
    labels = random_labels(input_shape, n_classes, device)
    criterion, info["loss"] = make_criterion(labels)
    amp = None if dtype == torch.float32 else dtype
    dev_type = torch.device(device).type
    settings = _train_settings()
    batch = int(input_shape[0])
    optimizer = build_optimizer(model, 1e-2 * batch / 16, settings["momentum"], settings["weight_decay"],
                                settings["lr_mult"]) if optimizer_step else None
    scaler = torch.amp.GradScaler(dev_type, enabled=amp == torch.float16)
    params = list(model.parameters())
    info.update(precision="fp32 master weights" + (f", autocast {dtype_name(amp)}" if amp else ", no autocast"),
                autocast=dtype_name(amp) if amp else None, includes_optimizer_step=optimizer is not None,
                optimizer=(f"SGD(momentum={settings['momentum']}, weight_decay={settings['weight_decay']}; "
                           "foreach on CUDA) from fastbisenet.schedule.build_optimizer") if optimizer else None,
                grad_scaler=("GradScaler: scale, unscale_, step, update; the step is not skipped on inf "
                             "inside the CUDA graph (that check is a host sync)") if scaler.is_enabled() else None)

    def train_step() -> None:
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        else:
            for p in params:
                p.grad = None
        with torch.autocast(dev_type, dtype=amp, enabled=amp is not None, cache_enabled=False):
            pixel_losses = runner(x, labels, ignore_index=IGNORE_INDEX)
        loss = criterion(pixel_losses)
        scaler.scale(loss).backward()
        if optimizer is None:
            return
        if scaler.is_enabled() and _capturing(dev_type):
            scaler.unscale_(optimizer)
            optimizer.step()
        else:
            scaler.step(optimizer)
        scaler.update()

    def saved_bytes() -> int:
        with torch.autocast(dev_type, dtype=amp, enabled=amp is not None, cache_enabled=False):
            nbytes, _ = saved_tensor_bytes(lambda: runner(x, labels, ignore_index=IGNORE_INDEX),
                                           exclude=[*params, *model.buffers(), x, labels])
        return nbytes

    return ModelWorkload(train_step, info, saved_bytes)


def extra_info(*, op: str, case: str, variant: str, pass_: str, dtype: torch.dtype, shape: Sequence[int],
               flops: int, nbytes: int, timing: Timing | None, floors: dict[str, float] | None,
               env: dict[str, Any], peak_mem: int | None = None, **more: Any) -> dict[str, Any]:
    """The one ``extra_info`` schema of every benchmark row."""
    info: dict[str, Any] = {
        "schema": SCHEMA,
        "op": op,
        "case": case,
        "variant": variant,
        "pass": pass_,
        "dtype": dtype_name(dtype),
        "shape": list(shape),
        "flops": int(flops),
        "bytes": int(nbytes),
        "timing": timing.method if timing else None,
        "iters_per_sample": timing.iters_per_sample if timing else None,
        "timing_note": timing.note if timing else "",
        "floor_matmul_tflops": (floors or {}).get("matmul_tflops"),
        "floor_copy_gbps": (floors or {}).get("copy_gbps"),
        "cache": timing.cache if timing else None,
        "l2_flush_bytes": timing.flush_bytes if timing else None,
        "l2_flush_ms": timing.flush_ms if timing else None,
        "l2_bytes": timing.l2_bytes if timing else None,
        "peak_mem_bytes": peak_mem,
        **variant_info(variant),
        **env,
    }
    info.update(more)
    return info
