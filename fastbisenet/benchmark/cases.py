"""Per-op cases traced from the model, and the cost model.

:func:`trace_ops` runs the model on the ``meta`` device and records every call that goes through
:mod:`fastbisenet.ops`, so per-op shapes come from the model itself; :func:`materialize` makes real arguments
for a case. :func:`op_cost` / :func:`model_cost` count FLOPs (``torch.utils.flop_counter``, conv/matmul only)
and the minimal bytes moved (inputs read once + outputs written once).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fastbisenet.benchmark._common import IGNORE_INDEX, dtype_name, shape_str


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str = "float"
    """``"float"`` (the benchmark dtype) or a fixed dtype name such as ``"int64"``."""
    channels_last: bool = True
    """4-D float tensors are made channels_last (the fused model's activations) unless this is False."""


@dataclass(frozen=True)
class ListSpec:
    items: tuple[Any, ...]


@dataclass(frozen=True)
class ConvSpec:
    in_ch: int
    out_ch: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    bias: bool


@dataclass(frozen=True)
class BNSpec:
    features: int
    eps: float
    momentum: float | None


@dataclass(frozen=True)
class OpCase:
    """One distinct call of a fused op in a model forward, with how often it occurs."""

    op: str
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...]
    calls: int
    where: tuple[str, ...]
    """Module paths of the call sites."""
    input_shape: tuple[int, ...]
    preset: str

    @property
    def label(self) -> str:
        return case_label(self)


def _spec(v: Any) -> Any:
    if isinstance(v, Tensor):
        return TensorSpec(tuple(v.shape), "float" if v.is_floating_point() else dtype_name(v.dtype))
    if isinstance(v, (list, tuple)) and any(isinstance(t, Tensor) for t in v):
        return ListSpec(tuple(_spec(t) for t in v))
    if isinstance(v, torch.Size):
        return tuple(int(s) for s in v)
    if isinstance(v, nn.Conv2d):
        if v.groups != 1 or v.dilation != (1, 1):
            raise NotImplementedError("grouped/dilated convs are not part of BiSeNet")
        return ConvSpec(v.in_channels, v.out_channels, tuple(v.kernel_size), tuple(v.stride),
                        tuple(v.padding), v.bias is not None)
    if isinstance(v, nn.BatchNorm2d):
        return BNSpec(v.num_features, v.eps, v.momentum)
    if isinstance(v, tuple):
        return tuple(_spec(t) for t in v)
    return v


@contextlib.contextmanager
def _recording_ops(sink: list[tuple[str, str, tuple, tuple]]) -> Iterator[list[str]]:
    """Route every ``ops.impl(...)`` to the reference ops while recording each call; yields the
    stack of module paths that the caller's hooks maintain (the innermost names the call site)."""
    from fastbisenet import ops, reference

    stack: list[str] = []

    class Recorder:
        def __getattr__(self, name: str) -> Callable[..., Any]:
            fn = getattr(reference, name)

            def call(*args: Any, **kwargs: Any) -> Any:
                sink.append((name, stack[-1] if stack else "", tuple(_spec(a) for a in args),
                             tuple(sorted((k, _spec(v)) for k, v in kwargs.items()))))
                return fn(*args, **kwargs)

            return call

    recorder = Recorder()
    original = ops.impl
    ops.impl = lambda backend, x: recorder
    try:
        yield stack
    finally:
        ops.impl = original


def trace_ops(input_shape: Sequence[int], *, aux_mode: str = "train", preset: str = "v1",
              backbone: str = "resnet18", n_classes: int = 19, labels: bool = False) -> list[OpCase]:
    """Distinct fused-op calls of one forward of the model at ``input_shape`` (run on ``meta``); with
    ``labels``, the training loss's forward ``model(x, labels)`` (heads + per-pixel CE)."""
    from fastbisenet.model import BiSeNet

    with torch.device("meta"):
        model = BiSeNet(n_classes, aux_mode, preset=preset, backbone=backbone, backend="torch")
    model.eval()  # shapes do not depend on the mode; batch-1 training fails on 1x1 BN inputs
    sink: list[tuple[str, str, tuple, tuple]] = []
    names = {m: n for n, m in model.named_modules()}
    with _recording_ops(sink) as stack:
        def enter(m: nn.Module, args: Any) -> None:
            stack.append(names[m])

        def leave(m: nn.Module, args: Any, out: Any) -> None:
            stack.pop()

        handles = []
        for m in model.modules():
            handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
        try:
            with torch.no_grad():
                x = torch.empty(*input_shape, device="meta")
                if labels:
                    n, _, h, w = input_shape
                    model(x, torch.empty((n, h, w), dtype=torch.int64, device="meta"), ignore_index=IGNORE_INDEX)
                else:
                    model(x)
        finally:
            for h in handles:
                h.remove()
    cases: dict[tuple, list[str]] = {}
    for name, where, args, kwargs in sink:
        cases.setdefault((name, args, kwargs), []).append(where)
    return [OpCase(op, args, kwargs, len(w), tuple(w), tuple(input_shape), preset)
            for (op, args, kwargs), w in cases.items()]


def case_label(case: OpCase) -> str:
    """A short readable id, e.g. ``3x3s2 64->128 @1x64x256x512 +res``."""
    kw = dict(case.kwargs)
    tensors = [a for a in case.args if isinstance(a, (TensorSpec, ListSpec))]

    def shp(t: Any) -> str:
        if isinstance(t, ListSpec):
            return "cat(" + ",".join(shp(i) for i in t.items) + ")"
        return shape_str(t.shape)

    convs = [a for a in case.args if isinstance(a, ConvSpec)]
    pairs = [a[0] for a in case.args if isinstance(a, tuple) and a and isinstance(a[0], ConvSpec)]
    if case.op == "conv_bn_act_pair" and pairs:
        c = pairs[0]
        widths = "+".join(str(p.out_ch) for p in pairs)
        return f"{c.kernel[0]}x{c.kernel[1]}s{c.stride[0]} {c.in_ch}->{widths} @{shp(tensors[0])}"
    if case.op in ("conv_bn_act", "concat_conv_bn_act") and convs:
        c = convs[0]
        s = f"{c.kernel[0]}x{c.kernel[1]}s{c.stride[0]} {c.in_ch}->{c.out_ch} @{shp(tensors[0])}"
        if isinstance(kw.get("residual"), TensorSpec):
            s += " +res"
        if kw.get("relu", True) is False:
            s += " norelu"
        if kw.get("pool"):
            s += " +pool"
        return s
    parts = [shp(t) for t in tensors]
    sizes = [a for a in case.args if isinstance(a, tuple) and all(isinstance(i, int) for i in a)]
    if sizes:
        parts.append("->" + shape_str(sizes[0]))
    if case.op.startswith("head") and convs:
        parts.insert(1, f"1x1 {convs[0].in_ch}->{convs[0].out_ch}")
    extra = [a for a in case.args if isinstance(a, (str, bool))]
    if extra:
        parts.append(",".join(str(e) for e in extra))
    return " ".join(parts)


def _make_tensor(spec: TensorSpec, device: torch.device | str, dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    if spec.dtype != "float":
        return torch.zeros(spec.shape, dtype=getattr(torch, spec.dtype), device=device)
    if torch.device(device).type == "meta":
        t = torch.empty(spec.shape, device="meta", dtype=dtype)
    else:  # generated on the device: fast for the large activations
        t = torch.randn(spec.shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 and spec.channels_last else t


def _make_module(spec: ConvSpec | BNSpec, device: torch.device | str, dtype: torch.dtype,
                 gen: torch.Generator) -> nn.Module:
    if isinstance(spec, ConvSpec):
        m: nn.Module = nn.Conv2d(spec.in_ch, spec.out_ch, spec.kernel, spec.stride, spec.padding, bias=spec.bias)
        with torch.no_grad():
            m.weight.normal_(0, math.sqrt(2 / (spec.in_ch * spec.kernel[0] * spec.kernel[1])), generator=gen)
    else:
        m = nn.BatchNorm2d(spec.features, eps=spec.eps, momentum=spec.momentum)
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5, generator=gen)
            m.bias.normal_(0, 0.1, generator=gen)
            m.running_mean.normal_(0, 0.1, generator=gen)
            m.running_var.uniform_(0.5, 1.5, generator=gen)
    return m.to(device=device, dtype=dtype, memory_format=torch.channels_last)


def materialize(case: OpCase, device: torch.device | str, dtype: torch.dtype, *, train: bool,
                seed: int = 0) -> tuple[list[Any], dict[str, Any]]:
    """Real arguments for ``case``: random channels_last tensors in ``dtype``, fresh modules in
    train or eval mode; with ``train`` the float tensors and the parameters require grad."""
    gen = torch.Generator().manual_seed(seed)
    dev_gen = gen if torch.device(device).type in ("cpu", "meta") else \
        torch.Generator(device=device).manual_seed(seed)

    def make(spec: Any) -> Any:
        if isinstance(spec, TensorSpec):
            t = _make_tensor(spec, device, dtype, dev_gen)
            return t.requires_grad_(train and t.is_floating_point())
        if isinstance(spec, ListSpec):
            return [make(s) for s in spec.items]
        if isinstance(spec, (ConvSpec, BNSpec)):
            return _make_module(spec, device, dtype, gen).train(train).requires_grad_(train)
        if isinstance(spec, tuple):  # a (conv, bn) pair of conv_bn_act_pair
            return tuple(make(s) for s in spec)
        return spec

    return [make(a) for a in case.args], {k: make(v) for k, v in case.kwargs}


def _leaves(args: Sequence[Any], kwargs: dict[str, Any]) -> list[Tensor]:
    """Tensors and parameters of a call, flattened, each once."""
    out: dict[int, Tensor] = {}
    for v in [*args, *kwargs.values()]:
        items = v if isinstance(v, (list, tuple)) else [v]
        for item in items:
            if isinstance(item, Tensor):
                out[id(item)] = item
            elif isinstance(item, nn.Module):
                for t in [*item.parameters(), *item.buffers()]:
                    out[id(t)] = t
    return list(out.values())


def _outputs(out: Any) -> list[Tensor]:
    """The tensors an op returned (``conv_bn_act(pool=True)`` returns ``(out, sums)``; the reference's
    ``sums`` is ``None``)."""
    return [t for t in (out if isinstance(out, (list, tuple)) else [out]) if isinstance(t, Tensor)]


def _nbytes(tensors: Any) -> int:
    if isinstance(tensors, Tensor):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, (list, tuple)):
        return sum(_nbytes(t) for t in tensors)
    return 0


def count_flops(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Conv/matmul FLOPs of ``fn()`` counted by ``torch.utils.flop_counter``, and its result."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        result = fn()
    return int(counter.get_total_flops()), result


def op_cost(case: OpCase, dtype: torch.dtype, *, backward: bool) -> tuple[int, int]:
    """(FLOPs, bytes) of one call: bytes = inputs (tensors, parameters, BN buffers) read once +
    outputs written once; with ``backward`` also the output gradient read and every input/parameter
    gradient written. Computed on the ``meta`` device, no GPU needed."""
    from fastbisenet import reference

    args, kwargs = materialize(case, "meta", dtype, train=backward)
    fn = getattr(reference, case.op)
    leaves = _leaves(args, kwargs)

    def work() -> Any:
        out = fn(*args, **kwargs)
        if backward:
            outs = _outputs(out)
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        return out

    if backward:
        flops, out = count_flops(work)
    else:
        with torch.no_grad():
            flops, out = count_flops(work)
    nbytes = _nbytes(leaves) + _nbytes(out)
    if backward:
        nbytes += _nbytes(out) + sum(_nbytes(t) for t in leaves if t.requires_grad)
    return flops, nbytes


def model_cost(input_shape: Sequence[int], dtype: torch.dtype, *, aux_mode: str, n_classes: int = 19,
               preset: str = "v1", backbone: str = "resnet18") -> tuple[int, int]:
    """(FLOPs, bytes) of a forward (``aux_mode`` "pred"/"eval") or a training step (``"train"``) of the
    whole model: input, labels, parameters and buffers read once, outputs written once.

    Inference runs in ``dtype`` throughout. A training step is what :func:`.workloads.model_workload` runs
    (the recipe of ``fastbisenet train``): fp32 input and master weights read, activations and outputs in
    ``dtype`` (autocast), fp32 parameter gradients written, then the SGD step reading the gradients
    and reading + writing the parameters and momentum buffers."""
    from fastbisenet.model import BiSeNet

    with torch.device("meta"):
        model = BiSeNet(n_classes, aux_mode, preset=preset, backbone=backbone, backend="torch")
    model = model.to(dtype=dtype).train(aux_mode == "train")
    x = torch.empty(*input_shape, device="meta", dtype=dtype)
    train = aux_mode == "train"

    def work() -> Any:
        if not train:
            return model(x)
        n, _, h, w = input_shape
        out = model(x, torch.zeros((n, h, w), dtype=torch.int64, device="meta"))  # the heads' per-pixel CE
        torch.autograd.backward(sum(o.sum() for o in out))
        return out

    with torch.set_grad_enabled(train):
        flops, out = count_flops(work)
    if not train:
        return flops, _nbytes(x) + _nbytes([*model.parameters(), *model.buffers()]) + _nbytes(out)
    n, _, h, w = input_shape
    n_params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() * (4 if b.is_floating_point() else b.element_size()) for b in model.buffers())
    fp32 = 4
    nbytes = (x.numel() * fp32 + n * h * w * 8 + n_params * fp32 + buffers + _nbytes(out)  # forward
              + n_params * fp32  # parameter gradients written
              + n_params * fp32 * 5)  # SGD: gradients read, parameters and momentum read + written
    return flops, nbytes
