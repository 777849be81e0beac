"""Roofline budget of one model forward, per op, from shapes alone (``meta`` device: no GPU needed).

For every fused op the model calls (:func:`fastbisenet.benchmark.cases.trace_ops`) the floor is
``max(FLOPs / matmul rate, bytes / bandwidth)`` with bytes = inputs read once + outputs written once
(:func:`fastbisenet.benchmark.cases.op_cost`), times the number of calls. Every aten op with device work that
the model runs outside the fused ops is listed too, with its bytes (in-place ops included; allocations
and views are not work), so the table accounts for the whole forward: today that list is empty. The
sum is the latency the model cannot beat with its current fusion boundaries at the given rates;
comparing it with a goal (0.8 ms for ``pred`` at 1x3x1024x2048) says how much efficiency the kernels
need, and the rows say where the time must go.

The default rates are assumptions, not measurements: 790 TFLOP/s, the bf16 matmul rate the project's
brief and device notes give for the H200 (the datasheet's dense bf16 peak is 989), and the datasheet's
4.8 TB/s HBM bandwidth. A GPU run replaces them with measured ones
(``fastbisenet.benchmark.timing.measure_floors``).

Usage: python bench/floor_budget.py [--shape 1,3,1024,2048] [--aux-mode pred] [--dtype bf16]
                                    [--tflops 790] [--gbps 4800] [--md OUT.md]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastbisenet import benchmark as fb

NOMINAL_H200 = {"tflops": 790.0, "gbps": 4800.0}
"""Assumed H200 rates: bf16 matmul TFLOP/s as the brief gives it (datasheet dense peak 989), HBM3e GB/s."""
NO_WORK = frozenset({"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"})
"""Allocations: no device work."""


@dataclass
class BudgetRow:
    op: str
    label: str
    calls: int
    flops: int
    nbytes: int
    """Per call."""

    def floor_us(self, tflops: float, gbps: float) -> float:
        return self.calls * max(self.flops / (tflops * 1e12), self.nbytes / (gbps * 1e9)) * 1e6

    def bound(self, tflops: float, gbps: float) -> str:
        return "FLOPs" if self.flops / (tflops * 1e12) >= self.nbytes / (gbps * 1e9) else "bytes"


class _UnfusedOps(TorchDispatchMode):
    """Records the bytes of every aten op that runs while no fused op is running (views excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.ops: dict[str, list[int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket.__name__)
        # a view returns an alias it does not write; in-place and out= ops alias what they write (work)
        view = any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
        if self.depth == 0 and not view and name not in NO_WORK:
            tensors_in = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            tensors_out = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            nbytes = sum(t.numel() * t.element_size() for t in [*tensors_in, *tensors_out])
            if tensors_out:
                self.ops.setdefault(name, []).append(nbytes)
        return out


@contextlib.contextmanager
def _marking_fused(mode: _UnfusedOps) -> Iterator[None]:
    """Route ``ops.impl`` to the reference ops with ``mode.depth`` raised while a fused op runs."""
    from fastbisenet import ops, reference

    class Marked:
        def __getattr__(self, name: str):
            fn = getattr(reference, name)

            def call(*args, **kwargs):
                mode.depth += 1
                try:
                    return fn(*args, **kwargs)
                finally:
                    mode.depth -= 1

            return call

    original = ops.impl
    ops.impl = lambda backend, x: Marked()
    try:
        yield
    finally:
        ops.impl = original


def unfused_ops(input_shape: tuple[int, ...], dtype: torch.dtype, *, aux_mode: str, preset: str,
                backbone: str, n_classes: int) -> dict[str, list[int]]:
    """``{aten op: [bytes per call]}`` of the aten ops a forward runs outside the fused ops."""
    from fastbisenet.model import BiSeNet

    with torch.device("meta"):
        model = BiSeNet(n_classes, aux_mode, preset=preset, backbone=backbone, backend="torch")
    model = model.to(dtype=dtype).eval()
    x = torch.empty(*input_shape, device="meta", dtype=dtype)
    mode = _UnfusedOps()
    with torch.no_grad(), _marking_fused(mode), mode:
        model(x)
    return mode.ops


def budget(input_shape: tuple[int, ...], dtype: torch.dtype = torch.bfloat16, *, aux_mode: str = "pred",
           preset: str = "v1", backbone: str = "resnet18", n_classes: int = 19) -> list[BudgetRow]:
    """One row per distinct fused-op call and per unfused aten op of a forward (no backward)."""
    rows = []
    for case in fb.trace_ops(input_shape, aux_mode=aux_mode, preset=preset, backbone=backbone,
                             n_classes=n_classes):
        flops, nbytes = fb.op_cost(case, dtype, backward=False)
        rows.append(BudgetRow(case.op, case.label, case.calls, flops, nbytes))
    for op, sizes in unfused_ops(input_shape, dtype, aux_mode=aux_mode, preset=preset, backbone=backbone,
                                 n_classes=n_classes).items():
        for nbytes in sorted(set(sizes)):
            rows.append(BudgetRow(f"{op} (unfused)", "", sizes.count(nbytes), 0, nbytes))
    return rows


def render(rows: list[BudgetRow], *, shape: tuple[int, ...], dtype: torch.dtype, aux_mode: str,
           tflops: float, gbps: float) -> str:
    total = sum(r.floor_us(tflops, gbps) for r in rows)
    flop_us = sum(r.calls * r.flops for r in rows) / (tflops * 1e12) * 1e6
    byte_us = sum(r.calls * r.nbytes for r in rows) / (gbps * 1e9) * 1e6
    lines = [
        f"# Floor budget: {aux_mode} forward at {fb.shape_str(shape)}, {fb.dtype_name(dtype)}",
        "",
        f"Rates: {tflops:g} TFLOP/s (matmul), {gbps:g} GB/s (memory). Per op: calls x max(FLOPs / rate, "
        "bytes / bandwidth), bytes = inputs read once + outputs written once; FLOPs count convs/matmuls only.",
        "",
        f"**Sum of per-op floors: {total:.1f} us** (all FLOPs alone: {flop_us:.1f} us; all bytes alone: "
        f"{byte_us:.1f} us).",
        "",
        "| op | call | calls | GFLOP/call | MB/call | bound | floor us (all calls) | share |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in sorted(rows, key=lambda r: -r.floor_us(tflops, gbps)):
        us = r.floor_us(tflops, gbps)
        lines.append(f"| {r.op} | {r.label} | {r.calls} | {r.flops / 1e9:.2f} | {r.nbytes / 1e6:.1f} | "
                     f"{r.bound(tflops, gbps)} | {us:.1f} | {100 * us / total:.1f}% |")
    by_op: dict[str, float] = {}
    for r in rows:
        by_op[r.op] = by_op.get(r.op, 0.0) + r.floor_us(tflops, gbps)
    lines += ["", "| op | floor us | share |", "| --- | ---: | ---: |"]
    lines += [f"| {op} | {us:.1f} | {100 * us / total:.1f}% |" for op, us in sorted(by_op.items(), key=lambda i: -i[1])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="1,3,1024,2048", help="input N,C,H,W (default 1,3,1024,2048)")
    parser.add_argument("--aux-mode", default="pred", choices=("pred", "eval"))
    parser.add_argument("--dtype", default="bf16", choices=tuple(fb.DTYPES))
    parser.add_argument("--preset", default="v1")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--tflops", type=float, default=NOMINAL_H200["tflops"])
    parser.add_argument("--gbps", type=float, default=NOMINAL_H200["gbps"])
    parser.add_argument("--md", type=Path, help="write the markdown here (default: stdout)")
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    if len(shape) != 4:
        parser.error(f"--shape needs N,C,H,W, got {args.shape!r}")
    dtype = fb.DTYPES[args.dtype]
    rows = budget(shape, dtype, aux_mode=args.aux_mode, preset=args.preset, backbone=args.backbone)
    text = render(rows, shape=shape, dtype=dtype, aux_mode=args.aux_mode, tflops=args.tflops, gbps=args.gbps)
    if args.md:
        args.md.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
