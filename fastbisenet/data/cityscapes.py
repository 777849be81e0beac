"""Cityscapes (``leftImg8bit`` + ``gtFine``) with the 19 evaluation classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fastbisenet.data.base import (
    IGNORE_INDEX,
    DatasetError,
    Sample,
    SegmentationDataset,
    check_label_range,
    check_pair,
    read_image,
    read_mask,
    to_sample,
)

CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
    "bicycle",
]
CITYSCAPES_PALETTE = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
]
# Cityscapes label id -> train id for ids 0..33 (every other id is ignored).
_ID_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
NUM_LABEL_IDS = 34
LABEL_ID_TO_TRAIN_ID = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _id, _train in _ID_TO_TRAIN.items():
    LABEL_ID_TO_TRAIN_ID[_id] = _train

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIXES = {"trainIds": "_gtFine_labelTrainIds.png", "labelIds": "_gtFine_labelIds.png"}


def label_ids_to_train_ids(label_ids: np.ndarray, path: str | Path = "<array>") -> np.ndarray:
    """Map raw Cityscapes label ids (0..33) to train ids (0..18, 255 = ignore)."""
    bad = label_ids >= NUM_LABEL_IDS
    if bad.any():
        values = np.unique(label_ids[bad])[:10].tolist()
        raise DatasetError(f"mask {path} has Cityscapes label ids {values} outside 0..{NUM_LABEL_IDS - 1}")
    return LABEL_ID_TO_TRAIN_ID[label_ids]


def is_cityscapes_root(root: str | Path) -> bool:
    root = Path(root)
    return (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir()


class CityscapesDataset(SegmentationDataset):
    """``root/leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with ``root/gtFine/<split>/<city>/...``.

    Args:
        root: the Cityscapes root (holding ``leftImg8bit`` and ``gtFine``).
        split: ``"train"``, ``"val"`` or ``"test"`` (any folder name under ``leftImg8bit``).
        label_type: ``"trainIds"`` (``*_gtFine_labelTrainIds.png``, as written by cityscapesScripts),
            ``"labelIds"`` (raw ``*_gtFine_labelIds.png``, mapped with the standard id -> trainId table)
            or ``"auto"``: trainIds where present, else labelIds, per image.
        skip_bad: warn and skip unusable samples (missing/broken files) instead of raising.
    """

    classes = CITYSCAPES_CLASSES
    palette = CITYSCAPES_PALETTE

    def __init__(self, root: str | Path, split: str = "train", label_type: str = "auto",
                 skip_bad: bool = False) -> None:
        super().__init__(skip_bad)
        if label_type not in ("auto", "trainIds", "labelIds"):
            raise ValueError(f"label_type must be 'auto', 'trainIds' or 'labelIds', got {label_type!r}")
        self.root = Path(root)
        self.split = split
        image_dir = self.root / "leftImg8bit" / split
        label_dir = self.root / "gtFine" / split
        if not image_dir.is_dir():
            raise FileNotFoundError(f"Cityscapes images not found: {image_dir} is not a directory")
        images = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
        if not images:
            raise FileNotFoundError(f"no *{IMAGE_SUFFIX} files under {image_dir}/<city>/")
        self.samples: list[tuple[Path, Path, str]] = []
        for img in images:
            stem = img.name[: -len(IMAGE_SUFFIX)]
            candidates = ["trainIds", "labelIds"] if label_type == "auto" else [label_type]
            for kind in candidates:
                lbl = label_dir / img.parent.name / f"{stem}{LABEL_SUFFIXES[kind]}"
                if lbl.is_file():
                    self.samples.append((img, lbl, kind))
                    break
            else:
                names = " or ".join(f"{stem}{LABEL_SUFFIXES[k]}" for k in candidates)
                msg = f"no label for image {img}: expected {names} in {label_dir / img.parent.name}"
                if not skip_bad:
                    raise DatasetError(msg)
                import warnings

                warnings.warn(f"skipping: {msg}", stacklevel=2)
        if not self.samples:
            raise DatasetError(f"no usable Cityscapes samples under {image_dir}")

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self, index: int) -> str:
        return str(self.samples[index][0])

    def load(self, index: int) -> Sample:
        img_path, lbl_path, kind = self.samples[index]
        image = read_image(img_path)
        label = read_mask(lbl_path)
        check_pair(image, label, img_path, lbl_path)
        if kind == "labelIds":
            label = label_ids_to_train_ids(label, lbl_path)
        else:
            check_label_range(label, len(self.classes), lbl_path)
        return to_sample(image, label)
