"""Confusion-matrix segmentation metrics: per-class IoU and mIoU."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


class ConfusionMatrix:
    """``n x n`` int64 counts (rows = ground truth, columns = prediction) kept on ``device``.

    :meth:`update` is one ``index_add_`` on the device: no host round trip per batch. Pixels labelled
    ``ignore_index`` (or any label outside ``0..n-1``) are not counted.
    """

    def __init__(self, n_classes: int, ignore_index: int = 255, device: torch.device | str = "cpu") -> None:
        self.n = n_classes
        self.ignore_index = ignore_index
        # one bin past the matrix collects the pixels not counted, so update() needs no boolean indexing
        self._bins = torch.zeros(n_classes * n_classes + 1, dtype=torch.int64, device=device)
        self.mat = self._bins[:-1].view(n_classes, n_classes)
        self.skipped_samples = 0
        """Samples the evaluation left out (bad files under ``skip_bad``), summed by :meth:`all_reduce`."""

    def update(self, pred: Tensor, target: Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        target = target.to(self.mat.device).long().flatten()
        pred = pred.to(self.mat.device).long().flatten()
        keep = (target >= 0) & (target < self.n) & (target != self.ignore_index)
        idx = torch.where(keep, target * self.n + pred.clamp(0, self.n - 1), self.n * self.n)
        self._bins.index_add_(0, idx, torch.ones_like(idx))  # no host sync (bincount sizes its output from the data)

    def all_reduce(self) -> None:
        """Sum the counts (and skipped samples) over the processes of the default group (no-op without one)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.mat)
            skipped = torch.tensor([self.skipped_samples], dtype=torch.int64, device=self.mat.device)
            dist.all_reduce(skipped)
            self.skipped_samples = int(skipped.item())

    def iou(self) -> Tensor:
        return iou_from_confusion(self.mat)

    def miou(self) -> float:
        return mean_iou(self.mat)

    def pixel_accuracy(self) -> float:
        total = int(self.mat.sum())
        return float(self.mat.diag().sum()) / total if total else math.nan


def iou_from_confusion(mat: Tensor) -> Tensor:
    """Per-class IoU = TP / (TP + FP + FN) as float64; NaN for a class absent from gt and prediction."""
    mat = mat.double()
    tp = mat.diag()
    union = mat.sum(0) + mat.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))


def mean_iou(mat: Tensor) -> float:
    """Mean IoU over the classes that occur in ground truth or prediction (NaN classes excluded)."""
    iou = iou_from_confusion(mat)
    return float(iou.nanmean()) if (~iou.isnan()).any() else math.nan


def format_iou_table(iou: Tensor, class_names: Sequence[str] | None = None, miou: float | None = None) -> str:
    """A plain-text table of per-class IoU (percent), absent classes shown as ``-``."""
    names = list(class_names) if class_names else [str(i) for i in range(len(iou))]
    width = max(12, *(len(n) for n in names))
    lines = [f"{'class':<{width}}  IoU (%)", f"{'-' * width}  -------"]
    for name, v in zip(names, iou.tolist(), strict=True):
        lines.append(f"{name:<{width}}  {'-' if math.isnan(v) else f'{100 * v:7.2f}':>7}")
    if miou is None:
        miou = float(iou.nanmean())
    lines.append(f"{'-' * width}  -------")
    lines.append(f"{'mIoU':<{width}}  {100 * miou:7.2f}")
    return "\n".join(lines)


__all__ = ["ConfusionMatrix", "format_iou_table", "iou_from_confusion", "mean_iou"]
