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

    def __init__(self, thresh: float = 0.7, ignore_index: int = 255, min_kept_div: int = 16,
                 backend: str = "auto") -> None:
        """``backend``: where the per-pixel CE runs (``ops.impl``): ``"auto"`` takes the Triton kernel for
        CUDA logits (it saves one fp32 log-sum-exp per pixel for backward instead of an fp32
        log-softmax), PyTorch's op on CPU; ``"triton"``/``"torch"`` force one."""
        super().__init__()
        self.backend = ops.check_backend(backend)
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
        labels = labels.long()
        loss = ops.impl(self.backend, logits).cross_entropy(logits, labels, self.ignore_index)
        return self.reduce(loss, labels, logits.shape[1])

    def reduce(self, pixel_loss: Tensor, labels: Tensor, n_classes: int) -> Tensor:
        """The OHEM mean of a per-pixel cross-entropy ``pixel_loss`` (N, H, W) computed against ``labels``
        with this loss's ``ignore_index``, e.g. an output of ``BiSeNet(x, labels)`` (the logits never
        materialised). Raises ``IndexError`` for labels outside ``[0, n_classes)``."""
        _check_shapes(pixel_loss, labels)
        return self._ohem(pixel_loss, self._count_valid(labels, n_classes))

    def _count_valid(self, labels: Tensor, n_classes: int) -> int:
        """Pixels not at ``ignore_index`` (one host sync); ``IndexError`` for labels outside ``[0, n_classes)``."""
        valid = labels != self.ignore_index
        out_of_range = valid & ((labels < 0) | (labels >= n_classes))
        n_valid, n_bad = (int(v) for v in torch.stack([valid.sum(), out_of_range.sum()]).tolist())  # one sync
        if n_bad:
            bad = labels[out_of_range][0].item()
            raise IndexError(f"OhemCELoss: {n_bad} labels outside [0, {n_classes}) and not ignore_index="
                             f"{self.ignore_index}, e.g. {bad}")
        return n_valid

    def _ohem(self, pixel_loss: Tensor, n_valid: int) -> Tensor:
        """The hard-pixel mean of ``pixel_loss`` given its ``n_valid`` labelled pixels."""
        return self._ohem_heads([pixel_loss], n_valid)[0]

    def _ohem_heads(self, pixel_losses: Sequence[Tensor], n_valid: int) -> list[Tensor]:
        """:meth:`_ohem` of each head, with one host sync for all of them (the hard-pixel counts) and no
        boolean indexing (each would sync again to size its result)."""
        n_min = n_valid // self.min_kept_div
        flat = [p.flatten() for p in pixel_losses]
        hard = [f > self.loss_thresh for f in flat]
        counts = torch.stack([h.sum() for h in hard]).tolist()  # the one sync
        means = []
        for f, h, count in zip(flat, hard, counts, strict=True):
            if count < n_min:  # ignored pixels have loss 0: never above a valid one; unsorted: no order needed
                means.append(f.topk(n_min, sorted=False).values.mean())
            elif count == 0:
                means.append(f.sum() * 0.0)
            else:
                means.append(torch.where(h, f, 0.0).sum() / count)
        return means


def total_loss(outputs: Sequence[Tensor], labels: Tensor, criterion: nn.Module) -> Tensor:
    """Sum of ``criterion`` over the model's outputs (main + out16 + out32, all weights 1)."""
    return torch.stack([criterion(o, labels) for o in outputs]).sum()


def total_pixel_loss(pixel_losses: Sequence[Tensor], labels: Tensor, criterion: OhemCELoss, n_classes: int) -> Tensor:
    """:func:`total_loss` from per-pixel losses (``BiSeNet(x, labels)``'s outputs): the sum of
    ``criterion.reduce`` over them, with the labels checked and counted once for all heads."""
    for o in pixel_losses:
        _check_shapes(o, labels)
    n_valid = criterion._count_valid(labels, n_classes)
    return torch.stack(criterion._ohem_heads(pixel_losses, n_valid)).sum()


def _check_shapes(pixel_loss: Tensor, labels: Tensor) -> None:
    if pixel_loss.shape != labels.shape:
        raise ValueError(f"pixel_loss and labels must have the same (N, H, W) shape, got "
                         f"{tuple(pixel_loss.shape)} and {tuple(labels.shape)}")


__all__ = ["OhemCELoss", "total_loss", "total_pixel_loss"]
