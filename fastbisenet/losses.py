"""OHEM cross-entropy, the loss of the BiSeNet training recipe."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastbisenet import ops


class OhemCELoss(nn.Module):
    """Online hard example mining cross-entropy.

    Per-pixel CE (``ignore_index`` pixels excluded); keep the pixels whose loss exceeds
    ``-log(thresh)``; if fewer than ``n_min = valid // min_kept_div`` remain, keep the ``n_min``
    largest losses instead; return their mean (0, with a gradient path, when nothing is valid).
    """

    backend: str = "auto"
    """Per-pixel CE through ``ops.impl(backend, logits)``: the Triton kernel for CUDA logits by default
    (saves one fp32 log-sum-exp per pixel for backward instead of an fp32 log-softmax), PyTorch's op
    on CPU or with ``"torch"``."""

    def __init__(self, thresh: float = 0.7, ignore_index: int = 255, min_kept_div: int = 16) -> None:
        super().__init__()
        if not 0 < thresh < 1:
            raise ValueError(f"thresh is a probability in (0, 1), got {thresh}")
        self.thresh = thresh
        self.loss_thresh = -math.log(thresh)
        self.ignore_index = ignore_index
        self.min_kept_div = min_kept_div

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        if logits.dim() != 4 or labels.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(f"logits (N, C, H, W) and labels (N, H, W) expected, got "
                             f"{tuple(logits.shape)} and {tuple(labels.shape)}")
        loss = ops.impl(self.backend, logits).cross_entropy(logits, labels.long(), self.ignore_index).flatten()
        n_valid = int((labels != self.ignore_index).sum())
        n_min = n_valid // self.min_kept_div
        hard = loss[loss > self.loss_thresh]
        if hard.numel() < n_min:
            hard = loss.topk(n_min).values  # ignored pixels have loss 0: never above a valid one
        if hard.numel() == 0:
            return loss.sum() * 0.0
        return hard.mean()


def total_loss(outputs: Sequence[Tensor], labels: Tensor, criterion: nn.Module) -> Tensor:
    """Sum of ``criterion`` over the model's outputs (main + out16 + out32, all weights 1)."""
    return torch.stack([criterion(o, labels) for o in outputs]).sum()


__all__ = ["OhemCELoss", "total_loss"]
