"""ONNX export of the reference (plain PyTorch) backend."""

from __future__ import annotations

import argparse
import copy
import os
import warnings
from pathlib import Path

import torch
from torch import nn


class _Wrapped(nn.Module):
    """Returns a single tensor: the logits (``eval``) or the int32 class map (``pred``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out[0] if isinstance(out, (tuple, list)) else out


def export_onnx(model: nn.Module, path: str | os.PathLike[str], *, height: int = 512, width: int = 1024,
                opset: int = 17, dynamic: bool = True, check: bool = True) -> Path:
    """Export a float32 copy of ``model`` (aux_mode ``"eval"`` -> ``logits`` (N, C, H, W); ``"pred"`` -> ``labels``
    (N, H, W) int32) with the reference backend to ONNX via the TorchScript exporter (``model`` is unchanged);
    batch, height and width are dynamic axes when ``dynamic``. Needs the ``onnx`` package (``pip install onnx``)."""
    try:
        import onnx
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("ONNX export needs the onnx package: pip install onnx "
                                  "(or pip install 'fastbisenet[onnx]')") from e
    if getattr(model, "aux_mode", "eval") == "train":
        raise ValueError("export a model built with aux_mode 'eval' or 'pred', not 'train'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a CPU copy (the caller's model keeps its mode, device, dtype and backend): its tensors are copied straight
    # to the CPU, without their gradients, so a GPU model is not duplicated on its device
    memo: dict[int, object] = {id(p): nn.Parameter(p.detach().cpu(), requires_grad=False) for p in model.parameters()}
    memo.update((id(b), b.detach().cpu()) for b in model.buffers())
    model = copy.deepcopy(model, memo)
    if getattr(model, "backend", None) is not None:
        model.backend = "torch"
    wrapped = _Wrapped(model).eval().cpu().float()  # a float32 graph whatever the model's dtype
    out_name = "labels" if getattr(model, "aux_mode", "eval") == "pred" else "logits"
    axes = {"input": {0: "batch", 2: "height", 3: "width"}, out_name: {0: "batch"}}
    axes[out_name].update({1: "height", 2: "width"} if out_name == "labels" else {2: "height", 3: "width"})
    # the model's Python-level shape checks trace as constants; the graph is size-generic (checked
    # against onnxruntime at other sizes), so the TracerWarnings they raise are noise here
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(wrapped, (torch.randn(1, 3, height, width),), str(path), dynamo=False,
                          input_names=["input"], output_names=[out_name], opset_version=opset,
                          dynamic_axes=axes if dynamic else None, do_constant_folding=True)
    if check:
        onnx.checker.check_model(str(path))
    return path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from fastbisenet.cli import positive_int

    p = subparsers.add_parser("export", help="export a checkpoint to ONNX (reference backend)",
                              description="Export to ONNX: input 'input' (N, 3, H, W) float32 normalised RGB; "
                                          "output 'logits' (eval) or int32 'labels' (pred). Needs 'pip install onnx'.")
    p.add_argument("weights", help="checkpoint (.pt/.pth)")
    p.add_argument("-o", "--output", default=None, help="ONNX file (default: the checkpoint's name with .onnx)")
    p.add_argument("--aux-mode", choices=["eval", "pred"], default="eval",
                   help="eval: logits output; pred: int32 class-id output")
    p.add_argument("--height", type=positive_int, default=512, help="height of the example input")
    p.add_argument("--width", type=positive_int, default=1024, help="width of the example input")
    p.add_argument("--opset", type=positive_int, default=17)
    p.add_argument("--static", action="store_true", help="fixed input size (default: dynamic N, H, W)")
    p.add_argument("--preset", choices=["v1", "face-parsing"], default=None)
    p.add_argument("--backbone", default=None)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from fastbisenet.evaluate import load_model

    model, _ = load_model(args.weights, args.aux_mode, backend="torch", device="cpu", preset=args.preset,
                          backbone=args.backbone)
    out = args.output or str(Path(args.weights).with_suffix(".onnx"))
    path = export_onnx(model, out, height=args.height, width=args.width, opset=args.opset,
                       dynamic=not args.static)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, aux_mode {args.aux_mode})")
    return 0
