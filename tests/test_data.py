"""Datasets (Cityscapes layout, folder, synthetic), bad-file handling and the batch augmentation."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastbisenet.data import (
    CityscapesDataset,
    DatasetError,
    FolderDataset,
    SyntheticDataset,
    TrainAugment,
    build_dataset,
    collate,
    normalize,
)
from fastbisenet.data.transforms import color_jitter


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def make_cityscapes(root: Path, split: str = "val", kind: str = "trainIds") -> list[np.ndarray]:
    """Two cities, three images; returns the expected train-id masks in dataset order."""
    expected = []
    rng = np.random.default_rng(0)
    for k, (city, stem) in enumerate([("aachen", "aachen_000000_000019"), ("bonn", "bonn_000001_000019"),
                                      ("bonn", "bonn_000002_000019")]):
        _png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", _rgb(16, 24, k))
        if kind == "trainIds":
            lab = rng.integers(0, 19, (16, 24)).astype(np.uint8)
            lab[0] = 255
            expected.append(lab)
            _png(root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png", lab)
        else:
            ids = rng.integers(0, 34, (16, 24)).astype(np.uint8)
            ids[0, :4] = [7, 26, 0, 33]
            _png(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", ids)
            expected.append(ids)
    return expected


def test_cityscapes_train_ids(tmp_path):
    expected = make_cityscapes(tmp_path, "val", "trainIds")
    ds = CityscapesDataset(tmp_path, "val")
    assert len(ds) == 3 and ds.n_classes == 19 and ds.classes[13] == "car"
    for i in range(3):
        img, lab = ds[i]
        assert img.dtype == torch.uint8 and img.shape == (3, 16, 24)
        assert lab.dtype == torch.uint8 and np.array_equal(lab.numpy(), expected[i])
    assert np.array_equal(ds[0][0].permute(1, 2, 0).numpy(), _rgb(16, 24, 0))


def test_cityscapes_label_ids_are_mapped(tmp_path):
    ids = make_cityscapes(tmp_path, "train", "labelIds")
    ds = CityscapesDataset(tmp_path, "train", label_type="auto")
    _, lab = ds[0]
    assert lab[0, :4].tolist() == [0, 13, 255, 18]  # road, car, unlabeled, bicycle
    table = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
             26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
    want = np.vectorize(lambda v: table.get(int(v), 255))(ids[0]).astype(np.uint8)
    assert np.array_equal(lab.numpy(), want)
    with pytest.raises(DatasetError, match="no label for image"):
        CityscapesDataset(tmp_path, "train", label_type="trainIds")


def test_cityscapes_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="leftImg8bit"):
        CityscapesDataset(tmp_path, "val")
    make_cityscapes(tmp_path, "val", "labelIds")
    bad = tmp_path / "gtFine/val/bonn/bonn_000001_000019_gtFine_labelIds.png"
    _png(bad, np.full((16, 24), 40, np.uint8))
    ds = CityscapesDataset(tmp_path, "val")
    with pytest.raises(DatasetError, match=r"bonn_000001_000019_gtFine_labelIds\.png.*\[40\]"):
        ds[1]


def make_folder(root: Path, n: int = 3, classes=("bg", "cat", "dog")) -> None:
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("# my classes\n" + "\n".join(classes) + "\n\n")
    for i in range(n):
        _png(root / "images" / f"im{i}.jpg", _rgb(20, 30, i))
        lab = np.random.default_rng(i).integers(0, len(classes), (20, 30)).astype(np.uint8)
        _png(root / "masks" / f"im{i}.png", lab)


def test_folder_dataset(tmp_path):
    make_folder(tmp_path)
    ds = FolderDataset(tmp_path)
    assert len(ds) == 3 and ds.classes == ["bg", "cat", "dog"] and len(ds.palette) == 3
    img, lab = ds[2]
    assert img.shape == (3, 20, 30) and lab.shape == (20, 30) and int(lab.max()) <= 2
    assert isinstance(build_dataset(str(tmp_path)), FolderDataset)
    # a split folder takes precedence
    make_folder(tmp_path / "val", n=1)
    assert len(FolderDataset(tmp_path, "val")) == 1


def test_bad_files_raise_with_file_name(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "images" / "im1.jpg").write_bytes(b"this is not a jpeg")
    _png(tmp_path / "masks" / "im2.png", np.zeros((10, 30), np.uint8))  # wrong size
    ds = FolderDataset(tmp_path)
    with pytest.raises(DatasetError, match=r"cannot read image .*im1\.jpg"):
        ds[1]
    with pytest.raises(DatasetError, match=r"im2\.png is 30x10 \(WxH\) but its image .*im2\.jpg is 30x20"):
        ds[2]
    _png(tmp_path / "masks" / "im0.png", np.full((20, 30), 7, np.uint8))  # id 7 with 3 classes
    with pytest.raises(DatasetError, match=r"im0\.png has label ids \[7\] outside 0\.\.2"):
        ds[0]


def test_rgb_mask_and_missing_mask(tmp_path):
    make_folder(tmp_path, n=2)
    _png(tmp_path / "masks" / "im0.png", _rgb(20, 30, 9))
    with pytest.raises(DatasetError, match="single-channel"):
        FolderDataset(tmp_path)[0]
    (tmp_path / "masks" / "im1.png").unlink()
    with pytest.raises(DatasetError, match=r"no mask for image .*im1\.jpg"):
        FolderDataset(tmp_path)


def test_skip_bad_warns_and_skips(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "images" / "im1.jpg").write_bytes(b"garbage")
    ds = FolderDataset(tmp_path, skip_bad=True)
    with pytest.warns(UserWarning, match=r"skipping bad sample: cannot read image .*im1\.jpg"):
        img, _ = ds[1]
    assert np.array_equal(img.permute(1, 2, 0).numpy(), np.asarray(Image.open(tmp_path / "images/im2.jpg")))


def test_build_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither 'synthetic'"):
        build_dataset(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="cannot tell"):
        build_dataset(str(tmp_path))
    with pytest.raises(ValueError, match="dataset kind"):
        build_dataset("synthetic", kind="imagenet")


def test_synthetic_is_deterministic_and_varied():
    a = SyntheticDataset(10, (48, 80), seed=3)
    b = SyntheticDataset(10, (48, 80), seed=3)
    img, lab = a[4]
    assert img.shape == (3, 48, 80) and lab.shape == (48, 80)
    assert torch.equal(img, b[4][0]) and torch.equal(lab, b[4][1])
    assert not torch.equal(img, a[5][0])
    assert not torch.equal(img, SyntheticDataset(10, (48, 80), seed=3, split="val")[4][0])
    labels = torch.cat([a[i][1].flatten() for i in range(10)])
    assert set(labels.unique().tolist()) == set(range(8))
    assert a.n_classes == 8 and len(a.palette) == 8


def test_collate_keeps_sizes():
    images, labels = collate([SyntheticDataset(2, 40)[0], SyntheticDataset(2, (50, 60))[1]])
    assert [tuple(i.shape) for i in images] == [(3, 40, 40), (3, 50, 60)] and len(labels) == 2


def test_augment_deterministic_and_shapes(device):
    ds = SyntheticDataset(4, (60, 90))
    images, labels = collate([ds[i] for i in range(4)])
    images = [i.to(device) for i in images]
    labels = [lb.to(device) for lb in labels]
    aug = TrainAugment(64)
    x1, y1 = aug(images, labels, torch.Generator().manual_seed(7))
    x2, y2 = aug(images, labels, torch.Generator().manual_seed(7))
    x3, _ = aug(images, labels, torch.Generator().manual_seed(8))
    assert x1.shape == (4, 3, 64, 64) and y1.shape == (4, 64, 64) and y1.dtype == torch.long
    assert x1.device.type == torch.device(device).type
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert set(y1.unique().tolist()) <= set(range(8)) | {255}


def test_augment_identity_flip_and_padding():
    ds = SyntheticDataset(2, (40, 50))
    images, labels = collate([ds[0], ds[1]])
    g = torch.Generator().manual_seed(0)
    x, y = TrainAugment((40, 50), scale=(1, 1), flip=False, jitter=0)(images, labels, g)
    assert torch.allclose(x, normalize(torch.stack(images)), atol=1e-4)
    assert torch.equal(y, torch.stack(labels).long())
    # always flipped: mirror image of the identity
    aug = TrainAugment((40, 50), scale=(1, 1), flip=True, jitter=0)
    aug.params = lambda sizes, generator: {**TrainAugment.params(aug, sizes, generator),
                                           "flip": torch.ones(len(sizes), dtype=torch.bool)}
    xf, yf = aug(images, labels, g)
    assert torch.allclose(xf, x.flip(-1), atol=1e-4) and torch.equal(yf, y.flip(-1))
    # scale 1 of a 20x25 image into a 40x50 crop: centred (+-1 pixel, as the public recipe pads), the rest
    # label 255 and image value 0
    small = [im[:, ::2, ::2].contiguous() for im in images]
    small_labels = [lb[::2, ::2].contiguous() for lb in labels]
    zero = normalize(torch.zeros(1, 3, 40, 50))[0]
    corners = set()
    for seed in range(40):
        x, y = TrainAugment((40, 50), scale=(1, 1), flip=False, jitter=0)(
            small, small_labels, torch.Generator().manual_seed(seed))
        for k in range(2):
            top = int((y[k] != 255).any(dim=1).nonzero()[0])
            left = int((y[k] != 255).any(dim=0).nonzero()[0])
            inside = (slice(top, top + 20), slice(left, left + 25))
            assert torch.equal(y[k][inside], small_labels[k].long()) and int((y[k] != 255).sum()) == 20 * 25
            assert torch.allclose(x[k][(slice(None), *inside)], normalize(small[k][None])[0], atol=1e-4)
            pad = torch.ones(3, 40, 50, dtype=torch.bool)
            pad[(slice(None), *inside)] = False
            assert torch.equal(x[k][pad], zero[pad])
            corners.add((top, left))
    assert {t for t, _ in corners} == {9, 10, 11} and {c for _, c in corners} == {12, 13}


def test_color_jitter_contrast_ignores_padding():
    x = torch.rand(2, 3, 12, 16, generator=torch.Generator().manual_seed(1))
    valid = torch.zeros(2, 1, 12, 16, dtype=torch.bool)
    valid[:, :, 2:9, 3:14] = True
    factors = [torch.tensor([0.8, 1.3]), torch.tensor([0.6, 1.4]), torch.tensor([1.2, 0.7])]
    padded = torch.where(valid, x, torch.rand(2, 3, 12, 16))  # whatever lies outside must not matter
    out = color_jitter(padded, *factors, valid)
    alone = color_jitter(x[:, :, 2:9, 3:14].contiguous(), *factors)
    assert torch.allclose(out[:, :, 2:9, 3:14], alone, atol=1e-6)
    assert not torch.allclose(color_jitter(padded, *factors)[:, :, 2:9, 3:14], alone, atol=1e-3)
