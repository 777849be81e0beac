"""Datasets, augmentations and the synthetic scene generator.

Every dataset returns ``(image uint8 (3, H, W) RGB, label uint8 (H, W))`` with 255 = ignore and
exposes ``classes``, ``n_classes`` and ``palette``; augmentation runs after collation, on the device
(:mod:`fastbisenet.data.transforms`).
"""

from __future__ import annotations

from pathlib import Path

from fastbisenet.data.base import (
    IGNORE_INDEX,
    DatasetError,
    SegmentationDataset,
    collate,
    default_palette,
    read_image,
    read_mask,
)
from fastbisenet.data.cityscapes import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    LABEL_ID_TO_TRAIN_ID,
    CityscapesDataset,
    is_cityscapes_root,
    label_ids_to_train_ids,
)
from fastbisenet.data.folder import FolderDataset, is_folder_root, read_class_list
from fastbisenet.data.synthetic import SYNTHETIC_CLASSES, SYNTHETIC_PALETTE, SyntheticDataset
from fastbisenet.data.transforms import MEAN, STD, EvalTransform, TrainAugment, normalize

DATASET_KINDS = ("auto", "synthetic", "cityscapes", "folder")


def build_dataset(data: str, split: str = "train", *, kind: str = "auto", skip_bad: bool = False,
                  classes_file: str | None = None, synthetic_size: int | tuple[int, int] = 128,
                  synthetic_length: int | None = None, seed: int = 0,
                  label_type: str = "auto") -> SegmentationDataset:
    """A dataset from a ``--data`` value: ``"synthetic"`` or a Cityscapes / folder-dataset root.

    ``kind="auto"`` recognises a Cityscapes root by its ``leftImg8bit`` and ``gtFine`` folders and a
    folder dataset by ``classes.txt`` or ``images/``.
    """
    if kind not in DATASET_KINDS:
        raise ValueError(f"dataset kind must be one of {DATASET_KINDS}, got {kind!r}")
    if kind == "synthetic" or (kind == "auto" and data == "synthetic"):
        length = synthetic_length or (2000 if split == "train" else 100)
        return SyntheticDataset(length, synthetic_size, seed=seed, split=split)
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {data!r} is neither 'synthetic' nor an existing directory")
    if kind == "cityscapes" or (kind == "auto" and is_cityscapes_root(root)):
        return CityscapesDataset(root, split, label_type=label_type, skip_bad=skip_bad)
    if kind == "folder" or (kind == "auto" and is_folder_root(root)):
        return FolderDataset(root, split, classes_file=classes_file, skip_bad=skip_bad)
    raise FileNotFoundError(
        f"cannot tell what dataset {root} is: expected leftImg8bit/ + gtFine/ (Cityscapes) or "
        f"images/ + masks/ + classes.txt (folder dataset)"
    )


__all__ = [
    "CITYSCAPES_CLASSES", "CITYSCAPES_PALETTE", "DATASET_KINDS", "IGNORE_INDEX", "LABEL_ID_TO_TRAIN_ID",
    "MEAN", "STD", "SYNTHETIC_CLASSES", "SYNTHETIC_PALETTE", "CityscapesDataset", "DatasetError",
    "EvalTransform", "FolderDataset", "SegmentationDataset", "SyntheticDataset", "TrainAugment",
    "build_dataset", "collate", "default_palette", "is_cityscapes_root", "is_folder_root",
    "label_ids_to_train_ids", "normalize", "read_class_list", "read_image", "read_mask",
]
