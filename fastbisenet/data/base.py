"""Shared pieces of the datasets: errors, image/mask reading, bad-sample skipping, collation."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

IGNORE_INDEX = 255
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

Sample = tuple[Tensor, Tensor]
"""``(image uint8 (3, H, W) RGB, label uint8 (H, W) with 255 = ignore)``."""


class DatasetError(ValueError):
    """A sample that cannot be used (unreadable file, size mismatch, label out of range)."""


def read_image(path: str | Path) -> np.ndarray:
    """RGB uint8 array (H, W, 3) of an image file; :class:`DatasetError` naming the file if unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise DatasetError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def read_mask(path: str | Path) -> np.ndarray:
    """Single-channel uint8 class-index array (H, W) of a PNG mask (mode L, P, or 16-bit < 256)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.asarray(im)
    except Exception as e:
        raise DatasetError(f"cannot read mask {path}: {type(e).__name__}: {e}") from e
    if arr.ndim != 2:
        raise DatasetError(
            f"mask {path} must be a single-channel image of class indices (mode L or P), got mode {mode}"
        )
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise DatasetError(f"mask {path} has values outside 0..255 (min {arr.min()}, max {arr.max()})")
        arr = arr.astype(np.uint8)
    return np.array(arr, dtype=np.uint8, copy=True)


def check_pair(image: np.ndarray, label: np.ndarray, image_path: Path | str, label_path: Path | str) -> None:
    """Raise :class:`DatasetError` naming both files unless image and mask have the same H, W."""
    if image.shape[:2] != label.shape[:2]:
        raise DatasetError(
            f"mask {label_path} is {label.shape[1]}x{label.shape[0]} (WxH) but its image {image_path} is "
            f"{image.shape[1]}x{image.shape[0]}"
        )


def check_label_range(label: np.ndarray, n_classes: int, path: Path | str) -> None:
    """Raise :class:`DatasetError` naming the file if a label is neither < n_classes nor 255."""
    bad = (label >= n_classes) & (label != IGNORE_INDEX)
    if bad.any():
        values = np.unique(label[bad])[:10].tolist()
        raise DatasetError(
            f"mask {path} has label ids {values} outside 0..{n_classes - 1} (and 255 = ignore)"
        )


def to_sample(image: np.ndarray, label: np.ndarray) -> Sample:
    """(H, W, 3) uint8 + (H, W) uint8 arrays -> CHW uint8 image tensor, HW uint8 label tensor."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), torch.from_numpy(label)


class SegmentationDataset(Dataset):
    """Base class: subclasses implement :meth:`load` and set ``classes`` / ``palette``.

    ``skip_bad=True``: a sample that raises :class:`DatasetError` is reported once with a warning and
    replaced by the next good sample (deterministically, by index), instead of stopping the run;
    :meth:`load_or_none` returns ``None`` for it instead (evaluation leaves bad samples out).
    """

    classes: list[str]
    palette: list[tuple[int, int, int]]
    ignore_index: int = IGNORE_INDEX

    def __init__(self, skip_bad: bool = False) -> None:
        self.skip_bad = skip_bad
        self._warned: set[int] = set()

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def load(self, index: int) -> Sample:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """A human-readable name of sample ``index`` (file name) for messages."""
        return f"sample {index}"

    def __getitem__(self, index: int) -> Sample:
        n = len(self)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} samples")
        if not self.skip_bad:
            return self.load(index)
        for k in range(n):
            sample = self.load_or_none((index + k) % n)
            if sample is not None:
                return sample
        raise DatasetError(f"every sample of {type(self).__name__} is bad")

    def load_or_none(self, index: int) -> Sample | None:
        """Sample ``index`` itself, or with ``skip_bad`` ``None`` (and a warning, once) when it is bad:
        evaluation drops bad samples instead of counting a substitute twice."""
        try:
            return self.load(index)
        except DatasetError as e:
            if not self.skip_bad:
                raise
            if index not in self._warned:
                self._warned.add(index)
                warnings.warn(f"skipping bad sample: {e}", stacklevel=2)
            return None


def collate(batch: Sequence[Sample]) -> tuple[list[Tensor], list[Tensor]]:
    """Keep samples as lists (images may differ in size); augmentation stacks them on the device."""
    images, labels = zip(*batch, strict=True)
    return list(images), list(labels)


def default_palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct, deterministic RGB colours (golden-ratio hue walk; class 0 black)."""
    import colorsys

    colours = [(0, 0, 0)]
    for i in range(1, n):
        h = (i * 0.618033988749895) % 1.0
        s = 0.65 + 0.35 * ((i // 7) % 2)
        v = 0.95 - 0.3 * ((i // 3) % 2)
        r, g, b = colorsys.hsv_to_rgb(h, s, v)
        colours.append((round(r * 255), round(g * 255), round(b * 255)))
    return colours[:n]
