"""A generic image/mask folder dataset with a class-list file."""

from __future__ import annotations

from pathlib import Path

from fastbisenet.data.base import (
    IGNORE_INDEX,
    IMAGE_EXTENSIONS,
    DatasetError,
    Sample,
    SegmentationDataset,
    check_label_range,
    check_pair,
    default_palette,
    read_image,
    read_mask,
    to_sample,
)


def read_class_list(path: str | Path) -> list[str]:
    """Class names, one per line (blank lines and ``#`` comments ignored); index = train id."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class-list file not found: {path}")
    names = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise DatasetError(f"class-list file {path} names no classes")
    if len(names) >= IGNORE_INDEX:
        raise DatasetError(f"class-list file {path} names {len(names)} classes; at most 254 are supported "
                           f"(255 is the ignore label)")
    return names


def is_folder_root(root: str | Path) -> bool:
    root = Path(root)
    return (root / "classes.txt").is_file() or (root / "images").is_dir()


class FolderDataset(SegmentationDataset):
    """``<root>[/<split>]/images/<name>.<ext>`` with ``.../masks/<name>.png`` and ``<root>/classes.txt``.

    Masks hold class indices (0..n-1, 255 = ignore) as single-channel PNGs (mode ``L`` or ``P``).
    If ``<root>/<split>/images`` exists it is used, else ``<root>/images``.

    Args:
        root: dataset root.
        split: optional split folder under ``root``.
        classes_file: the class list (default ``<root>/classes.txt``).
        skip_bad: warn and skip unusable samples instead of raising.
    """

    def __init__(self, root: str | Path, split: str | None = None, classes_file: str | Path | None = None,
                 skip_bad: bool = False, image_dir: str = "images", mask_dir: str = "masks") -> None:
        super().__init__(skip_bad)
        self.root = Path(root)
        base = self.root / split if split and (self.root / split / image_dir).is_dir() else self.root
        self.image_dir = base / image_dir
        self.mask_dir = base / mask_dir
        self.classes = read_class_list(classes_file or self.root / "classes.txt")
        self.palette = default_palette(len(self.classes))
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.image_dir}")
        images = sorted(p for p in self.image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not images:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {self.image_dir}")
        self.samples: list[tuple[Path, Path]] = []
        for img in images:
            mask = self.mask_dir / f"{img.stem}.png"
            if mask.is_file():
                self.samples.append((img, mask))
                continue
            msg = f"no mask for image {img}: expected {mask}"
            if not skip_bad:
                raise DatasetError(msg)
            import warnings

            warnings.warn(f"skipping: {msg}", stacklevel=2)
        if not self.samples:
            raise DatasetError(f"no image/mask pairs in {base}")

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self, index: int) -> str:
        return str(self.samples[index][0])

    def load(self, index: int) -> Sample:
        img_path, mask_path = self.samples[index]
        image = read_image(img_path)
        label = read_mask(mask_path)
        check_pair(image, label, img_path, mask_path)
        check_label_range(label, len(self.classes), mask_path)
        return to_sample(image, label)
