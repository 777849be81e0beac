"""Batch augmentations as tensor ops on whatever device the batch is on.

Random parameters are drawn on the CPU from a caller-supplied :class:`torch.Generator`, so a batch
is augmented identically on CPU and GPU and a run is reproducible (and resumable) from its seeds.
Scale + crop + flip are a single ``grid_sample`` per image over the crop window only, so the cost
is proportional to the crop, not to the (scaled) image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fastbisenet.data.base import IGNORE_INDEX

MEAN = (0.3257, 0.3690, 0.3223)
STD = (0.2112, 0.2148, 0.2115)
_GREY = (0.299, 0.587, 0.114)


def normalize(images: Tensor, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> Tensor:
    """uint8 (N, 3, H, W) in 0..255 (or float in [0, 1]) -> float32 ``(x/255 - mean) / std``."""
    x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def _grey(x: Tensor) -> Tensor:
    w = torch.tensor(_GREY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def color_jitter(x: Tensor, brightness: Tensor, contrast: Tensor, saturation: Tensor,
                 valid: Tensor | None = None) -> Tensor:
    """Per-image brightness, contrast and saturation factors (N,) applied to RGB in [0, 1]; the contrast
    pivots on each image's mean grey level over its ``valid`` (N, 1, H, W) pixels (all when ``None``).

    The formulas are torchvision's ``ColorJitter`` ones (scale; blend with the mean grey; blend with the
    grey image) in that fixed order, on floats. The public CoinCheung recipe's uint8 tables differ in detail
    (contrast pivots on the fixed level 74/255, saturation mixes with the plain channel mean): same factor
    ranges, slightly different images."""
    f = lambda t: t.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)
    x = (x * f(brightness)).clamp_(0, 1)
    if valid is None:
        m = _grey(x).mean(dim=(2, 3), keepdim=True)
    else:
        m = (_grey(x) * valid).sum(dim=(2, 3), keepdim=True) / valid.sum(dim=(2, 3), keepdim=True).clamp_(min=1)
    x = ((x - m) * f(contrast) + m).clamp_(0, 1)
    g = _grey(x)
    return ((x - g) * f(saturation) + g).clamp_(0, 1)


def _crop_offset(size: Tensor, crop: int, u: Tensor) -> Tensor:
    """Top/left offsets of the crop windows, uniform from ``u`` in [0, 1). A side longer than the crop: every
    offset in ``[0, size - crop]``; a shorter one: the side centred (to +-1 pixel, as the public recipe's
    symmetric padding of ``(crop - size) // 2 + 1``), the window starting before the image."""
    pad = torch.clamp(crop - size, min=0)
    before = torch.where(pad > 0, pad // 2 + 1, 0)
    span = torch.where(pad > 0, 2 * before - pad, size - crop)
    return (u * (span + 1)).floor().long() - before


class TrainAugment:
    """Random scale, random crop (a side shorter than the crop centred; image pad 0, label pad 255), h-flip,
    colour jitter, normalise.

    Call with lists of uint8 images (3, H, W) and uint8/long labels (H, W) on one device (sizes may
    differ) and a CPU generator; returns ``(float (N, 3, ch, cw) normalised, long (N, ch, cw))``.
    """

    def __init__(self, crop: int | tuple[int, int], scale: tuple[float, float] = (0.75, 2.0),
                 flip: bool = True, jitter: float = 0.4,
                 mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> None:
        self.crop = (crop, crop) if isinstance(crop, int) else tuple(crop)
        if min(self.crop) < 1 or not 0 < scale[0] <= scale[1]:
            raise ValueError(f"bad crop {self.crop} or scale range {scale}")
        self.scale = tuple(scale)
        self.flip = flip
        self.jitter = jitter
        self.mean, self.std = tuple(mean), tuple(std)

    def params(self, sizes: Sequence[tuple[int, int]], generator: torch.Generator | None) -> dict[str, Tensor]:
        """The random draws for a batch with these source sizes (all on the CPU)."""
        n = len(sizes)
        u = torch.rand(n, 7, generator=generator, dtype=torch.float64)
        lo, hi = self.scale
        scale = lo + (hi - lo) * u[:, 0]
        ch, cw = self.crop
        hs = torch.tensor([s[0] for s in sizes], dtype=torch.float64)
        ws = torch.tensor([s[1] for s in sizes], dtype=torch.float64)
        sh = torch.clamp((hs * scale).round(), min=1).long()
        sw = torch.clamp((ws * scale).round(), min=1).long()
        y0 = _crop_offset(sh, ch, u[:, 1])
        x0 = _crop_offset(sw, cw, u[:, 2])
        flip = (u[:, 3] < 0.5) if self.flip else torch.zeros(n, dtype=torch.bool)
        j = self.jitter
        factors = (1 - j + 2 * j * u[:, 4:7]).float()
        return dict(scaled_h=sh, scaled_w=sw, y0=y0, x0=x0, flip=flip,
                    brightness=factors[:, 0], contrast=factors[:, 1], saturation=factors[:, 2])

    def __call__(self, images: Sequence[Tensor], labels: Sequence[Tensor],
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        if len(images) != len(labels) or not images:
            raise ValueError(f"need equally many images and labels (>0), got {len(images)} and {len(labels)}")
        device = images[0].device
        p = self.params([tuple(im.shape[-2:]) for im in images], generator)
        ch, cw = self.crop
        iy = torch.arange(ch, device=device, dtype=torch.float32)
        ix = torch.arange(cw, device=device, dtype=torch.float32)
        out_x, out_y, out_valid = [], [], []
        for k, (im, lb) in enumerate(zip(images, labels, strict=True)):
            sh, sw = int(p["scaled_h"][k]), int(p["scaled_w"][k])
            ys = iy + int(p["y0"][k])
            xs = ix + int(p["x0"][k])
            if bool(p["flip"][k]):
                xs = xs.flip(0)
            # output pixel i of a resize H -> sh samples the source at normalised 2 * (i + 0.5) / sh - 1
            gy = (2 * (ys + 0.5) / sh - 1).view(ch, 1).expand(ch, cw)
            gx = (2 * (xs + 0.5) / sw - 1).view(1, cw).expand(ch, cw)
            grid = torch.stack((gx, gy), dim=-1).unsqueeze(0)
            valid = ((ys >= 0) & (ys < sh)).view(ch, 1) & ((xs >= 0) & (xs < sw)).view(1, cw)
            x = F.grid_sample(im.unsqueeze(0).float().div_(255.0), grid, mode="bilinear",
                              padding_mode="border", align_corners=False)
            y = F.grid_sample(lb.view(1, 1, *lb.shape[-2:]).float(), grid, mode="nearest",
                              padding_mode="border", align_corners=False)
            out_x.append(x)
            out_y.append(torch.where(valid, y[0, 0], float(IGNORE_INDEX)))
            out_valid.append(valid)
        x = torch.cat(out_x)
        y = torch.stack(out_y).long()
        valid = torch.stack(out_valid).unsqueeze(1)
        if self.jitter > 0:
            x = color_jitter(x, p["brightness"], p["contrast"], p["saturation"], valid)
        x = x * valid  # the padding is image value 0 (before normalisation)
        return normalize(x, self.mean, self.std), y


class EvalTransform:
    """Stack same-size uint8 images and normalise; labels to long."""

    def __init__(self, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> None:
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, images: Sequence[Tensor], labels: Sequence[Tensor] | None = None
                 ) -> tuple[Tensor, Tensor | None]:
        x = normalize(torch.stack(list(images)), self.mean, self.std)
        y = torch.stack(list(labels)).long() if labels is not None else None
        return x, y
