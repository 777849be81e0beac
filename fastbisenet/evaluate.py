"""Evaluation: mIoU with single-scale, flip and multi-scale inference; loading models from checkpoints."""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from fastbisenet.metrics import ConfusionMatrix, format_iou_table


# ----------------------------------------------------------------------------------------- devices
def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; anything else as given (checked). A CUDA device with
    an index becomes the current CUDA device (Triton launches its kernels there, whatever the tensors' device)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine")
        if dev.index is not None:
            if dev.index >= torch.cuda.device_count():
                raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
            torch.cuda.set_device(dev)
    return dev


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``--amp`` (``auto``: bf16 on CUDA when supported, fp16 otherwise on CUDA, none on CPU)."""
    if amp == "auto":
        if device.type != "cuda":
            return None
        # native bf16 from Ampere (sm_80) on; is_bf16_supported() also says yes where it is emulated (V100, T4)
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
    if amp not in table:
        raise ValueError(f"amp must be one of auto, bf16, fp16, none; got {amp!r}")
    return table[amp]


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalization_for(preset: str, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
                      ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Input mean/std: as given, else the Cityscapes recipe's for ``v1`` and ImageNet's for ``face-parsing``
    (what the public face-parsing model was trained with)."""
    from fastbisenet.data import MEAN, STD

    d_mean, d_std = (IMAGENET_MEAN, IMAGENET_STD) if preset == "face-parsing" else (MEAN, STD)
    mean, std = tuple(mean or d_mean), tuple(std or d_std)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"--mean and --std take 3 values each (std > 0), got {mean}, {std}")
    return mean, std


def add_normalization_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="input mean on RGB in [0, 1] (default: Cityscapes recipe; ImageNet for face-parsing)")
    p.add_argument("--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"), help="input std")


# ------------------------------------------------------------------------------------ checkpoints
def _sidecar(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``<stem>.json`` that ``fastbisenet train`` writes next to ``model_final.pt``, if any."""
    side = Path(path).with_suffix(".json")
    if not side.is_file():
        return {}
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and isinstance(data.get("fastbisenet_meta"), dict) else {}


def read_checkpoint_info(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(state_dict, meta)`` of a checkpoint; ``meta`` (classes, palette, preset, backbone, mean/std and
    ``train_config``, the training options) comes from a fastbisenet training checkpoint or the
    ``<stem>.json`` written beside ``model_final.pt``; what is missing is inferred from the state_dict."""
    from fastbisenet.weights import read_checkpoint, state_dict_of

    raw = read_checkpoint(path)
    state = state_dict_of(raw, path)
    if isinstance(raw, dict) and isinstance(raw.get("meta"), dict):
        meta, config = raw["meta"], raw.get("config")
    else:  # a plain state_dict: the sidecar, read only here
        side = _sidecar(path)
        meta, config = side.get("fastbisenet_meta", {}), side.get("config")
    meta = {**meta, "train_config": dict(config or {})}
    if "conv_out.conv_out.weight" not in state:
        raise ValueError(f"{path} is not a BiSeNet checkpoint (no conv_out.conv_out.weight)")
    meta.setdefault("n_classes", int(state["conv_out.conv_out.weight"].shape[0]))
    meta.setdefault("preset", "v1" if any(k.startswith("sp.") for k in state) else "face-parsing")
    if "backbone" not in meta:
        bottleneck = "cp.resnet.layer1.0.conv3.weight" in state
        blocks = {int(k.split(".")[3]) for k in state if k.startswith("cp.resnet.layer3.")}
        depth = max(blocks) + 1 if blocks else 2
        meta["backbone"] = {(False, 2): "resnet18", (False, 6): "resnet34", (True, 6): "resnet50",
                            (True, 23): "resnet101"}.get((bottleneck, depth), "resnet18")
    return state, meta


def load_model(path: str | os.PathLike[str], aux_mode: str = "eval", *, backend: str = "auto",
               device: torch.device | str = "cpu", n_classes: int | None = None, preset: str | None = None,
               backbone: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A BiSeNet in eval mode with the weights of ``path`` (the file read once, loaded as
    :func:`fastbisenet.load_pretrained` loads it).

    Classes, preset and backbone come from the checkpoint (or are inferred from it) unless given.
    Returns ``(model, meta)``.
    """
    from fastbisenet import BiSeNet
    from fastbisenet.weights import load_state_into

    state, meta = read_checkpoint_info(path)
    if n_classes is not None and n_classes != meta["n_classes"]:
        raise ValueError(f"--n-classes {n_classes} but {path} has {meta['n_classes']} classes")
    meta["preset"] = preset or meta["preset"]
    meta["backbone"] = backbone or meta["backbone"]
    model = BiSeNet(meta["n_classes"], aux_mode, preset=meta["preset"], backbone=meta["backbone"],
                    backend=backend)
    load_state_into(model, state, f"checkpoint {path}")
    return model.to(device).eval(), meta


# -------------------------------------------------------------------------------------- inference
def _main_logits(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    if isinstance(out, (tuple, list)):
        return out[0]
    if not out.is_floating_point():
        raise ValueError("multi-scale / flip inference needs logits: build the model with aux_mode 'eval'")
    return out


@torch.no_grad()
def infer(model: nn.Module, x: Tensor, scales: Sequence[float] = (1.0,), flip: bool = False,
          channels_last: bool = False, amp: torch.dtype | None = None) -> Tensor:
    """Class scores (N, C, H, W) for a normalised batch ``x``.

    One scale without flip returns the model's logits; otherwise the softmax probabilities of every
    scale (input resized bilinearly, at least 32 px) and of the mirrored input are averaged at the
    input size.
    """
    h, w = x.shape[-2:]
    align = bool(getattr(model, "align_corners", False))
    single = len(scales) == 1 and scales[0] == 1.0 and not flip
    total = None
    for s in scales:
        size = (max(32, round(h * s)), max(32, round(w * s)))
        xs = x if size == (h, w) else F.interpolate(x, size=size, mode="bilinear", align_corners=align)
        inputs = [xs, xs.flip(-1)] if flip else [xs]
        for k, inp in enumerate(inputs):
            if channels_last:
                inp = inp.contiguous(memory_format=torch.channels_last)
            with autocast(x.device, amp):
                logits = _main_logits(model, inp)
            logits = logits.float()
            if single:
                return logits
            if k == 1:
                logits = logits.flip(-1)
            if logits.shape[-2:] != (h, w):
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=align)
            prob = logits.softmax(dim=1)
            total = prob if total is None else total + prob
    return total / (len(scales) * (2 if flip else 1))


def group_by_size(images: Sequence[Tensor]) -> Iterator[list[int]]:
    """Index lists of images with equal (H, W), in first-seen order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape[-2:]), []).append(i)
    yield from groups.values()


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """Every ``world``-th index starting at ``rank``: disjoint shards, no padding (exact distributed mIoU)."""
    return list(range(rank, n, world))


class _EvalSamples(Dataset):
    """Each sample of ``dataset`` exactly once: a bad one (``skip_bad``) is ``None``, never a substitute."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        load = getattr(self.dataset, "load_or_none", None)
        return load(index) if load is not None else self.dataset[index]


def _collate_present(batch: Sequence) -> tuple[list[Tensor], list[Tensor], int]:
    """:func:`fastbisenet.data.collate` of the samples that are not ``None``, and how many were."""
    from fastbisenet.data import collate

    present = [b for b in batch if b is not None]
    images, labels = collate(present) if present else ([], [])
    return images, labels, len(batch) - len(present)


@torch.no_grad()
def evaluate(model: nn.Module, dataset, n_classes: int, *, device: torch.device, batch_size: int = 4,
             scales: Sequence[float] = (1.0,), flip: bool = False, channels_last: bool = False,
             amp: torch.dtype | None = None, workers: int = 0, rank: int = 0, world: int = 1,
             progress: bool = False, mean: Sequence[float] | None = None,
             std: Sequence[float] | None = None) -> ConfusionMatrix:
    """Confusion matrix of ``model`` over ``dataset`` (summed across processes when distributed).

    Every sample counts once: with ``skip_bad`` a bad one is left out (``cm.skipped_samples``), not replaced.
    A BiSeNet in ``aux_mode="train"`` runs as ``"eval"`` (no auxiliary heads); its mode and ``training`` flag
    are restored afterwards, also when evaluation raises.
    """
    was_training, aux_mode = model.training, getattr(model, "aux_mode", None)
    model.eval()
    if aux_mode == "train":  # the auxiliary heads' logits would be computed and dropped
        model.aux_mode = "eval"
    try:
        return _confusion(model, dataset, n_classes, device, batch_size, scales, flip, channels_last, amp, workers,
                          rank, world, progress, mean, std)
    finally:
        model.train(was_training)
        if aux_mode == "train":
            model.aux_mode = aux_mode


def _confusion(model: nn.Module, dataset, n_classes: int, device: torch.device, batch_size: int,
               scales: Sequence[float], flip: bool, channels_last: bool, amp: torch.dtype | None, workers: int,
               rank: int, world: int, progress: bool, mean: Sequence[float] | None,
               std: Sequence[float] | None) -> ConfusionMatrix:
    """:func:`evaluate`'s loop, on a model already in eval mode."""
    from torch.utils.data import DataLoader, Subset

    from fastbisenet.data import MEAN, STD, EvalTransform
    from fastbisenet.train import Progress

    samples = _EvalSamples(dataset)
    subset = Subset(samples, shard_indices(len(dataset), rank, world)) if world > 1 else samples
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=_collate_present, pin_memory=device.type == "cuda")
    cm = ConfusionMatrix(n_classes, device=device)
    transform = EvalTransform(mean or MEAN, std or STD)
    bar = Progress(len(loader), desc="eval", enabled=progress)
    for step, (images, labels, skipped) in enumerate(loader, 1):
        cm.skipped_samples += skipped
        for idx in group_by_size(images):
            x, y = transform([images[i].to(device, non_blocking=True) for i in idx],
                             [labels[i].to(device, non_blocking=True) for i in idx])
            scores = infer(model, x, scales, flip, channels_last, amp)
            cm.update(scores.argmax(dim=1), y)
        bar.update(step)
    bar.close()
    cm.all_reduce()
    return cm


# ---------------------------------------------------------------------------------------------- CLI
def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from fastbisenet.cli import nonnegative_int, positive_int

    p = subparsers.add_parser("eval", help="mIoU of a checkpoint on a dataset",
                              description="Evaluate a checkpoint: per-class IoU and mIoU (ignore label 255).")
    p.add_argument("weights", help="checkpoint (.pt/.pth): a training checkpoint or a plain state_dict")
    p.add_argument("--data", default=None, help="'synthetic', or a Cityscapes / folder-dataset root (default: the "
                                                "checkpoint's training data, else synthetic)")
    p.add_argument("--dataset", default=None, choices=["auto", "synthetic", "cityscapes", "folder"],
                   help="default: the training run's, else auto")
    p.add_argument("--split", default=None, help="default: the training run's validation split, else val")
    p.add_argument("--classes-file", default=None,
                   help="class list of a folder dataset (default: the training run's, else classes.txt)")
    p.add_argument("--label-type", default=None, choices=["auto", "trainIds", "labelIds"],
                   help="Cityscapes label files (default: the training run's, else auto)")
    p.add_argument("--synthetic-size", type=positive_int, default=None,
                   help="synthetic data: image size (default: the checkpoint's training option, else 128)")
    p.add_argument("--synthetic-length", type=positive_int, default=None,
                   help="synthetic data: images (default: the training run's validation length, else 100)")
    p.add_argument("--seed", type=int, default=None,
                   help="synthetic data: seed (default: the training run's, else 0), so that a checkpoint is "
                        "scored on the validation images its training run reported")
    p.add_argument("--skip-bad", action="store_true", help="warn and skip unreadable/invalid samples")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], metavar="S",
                   help="inference scales, e.g. --scales 0.75 1 1.25 (probabilities averaged)")
    p.add_argument("--flip", action="store_true", help="also average the mirrored input")
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--workers", type=nonnegative_int, default=2)
    p.add_argument("--preset", choices=["v1", "face-parsing"], default=None, help="default: from the checkpoint")
    p.add_argument("--backbone", default=None, help="default: from the checkpoint")
    p.add_argument("--backend", choices=["auto", "triton", "torch"], default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], default="auto")
    add_normalization_args(p)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from fastbisenet.data import build_dataset

    device = resolve_device(args.device)
    model, meta = load_model(args.weights, "eval", backend=args.backend, device=device,
                             preset=args.preset, backbone=args.backbone)
    trained = meta.get("train_config", {})

    def option(value: Any, key: str, default: Any) -> Any:  # flag, else the training run's option, else default
        return value if value is not None else trained.get(key, default)

    if args.data is not None:  # another dataset: none of the training run's dataset options apply
        trained = {k: v for k, v in trained.items() if k not in ("data", "dataset", "val_split", "classes_file",
                                                                  "label_type")}
    data = option(args.data, "data", "synthetic")
    split = option(args.split, "val_split", "val")
    dataset = build_dataset(data, split, kind=option(args.dataset, "dataset", "auto"), skip_bad=args.skip_bad,
                            classes_file=option(args.classes_file, "classes_file", None),
                            label_type=option(args.label_type, "label_type", "auto"),
                            synthetic_size=option(args.synthetic_size, "synthetic_size", 128),
                            synthetic_length=option(args.synthetic_length, "synthetic_val_length", 100),
                            seed=option(args.seed, "seed", 0))
    if dataset.n_classes != meta["n_classes"]:
        raise ValueError(f"the dataset has {dataset.n_classes} classes but {args.weights} predicts "
                         f"{meta['n_classes']}")
    channels_last = device.type == "cuda"
    mean, std = normalization_for(meta["preset"], args.mean or meta.get("mean"), args.std or meta.get("std"))
    cm = evaluate(model, dataset, meta["n_classes"], device=device, batch_size=args.batch_size,
                  scales=args.scales, flip=args.flip, channels_last=channels_last,
                  amp=resolve_amp(args.amp, device), workers=args.workers, progress=True, mean=mean,
                  std=std)
    iou = cm.iou().cpu()
    miou = cm.miou()
    n_images = len(dataset) - cm.skipped_samples
    skipped = f" ({cm.skipped_samples} bad samples left out)" if cm.skipped_samples else ""
    print(f"{args.weights} on {data} [{split}], {n_images} images{skipped}, scales {args.scales}"
          f"{' + flip' if args.flip else ''}")
    print(format_iou_table(iou, dataset.classes, miou))
    if args.json:
        names = dataset.classes
        result = {"miou": miou, "pixel_accuracy": cm.pixel_accuracy(), "images": n_images,
                  "skipped_samples": cm.skipped_samples, "scales": args.scales, "flip": args.flip,
                  "iou": {n: (None if math.isnan(v) else v) for n, v in zip(names, iou.tolist(), strict=True)}}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0
