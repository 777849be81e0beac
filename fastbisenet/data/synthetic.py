"""Procedurally drawn scenes: a segmentation dataset that needs no download.

Each sample is drawn from ``numpy.random.default_rng((seed, index))``, so it is the same for a given
``(seed, index)`` on every machine, in every worker, at any time. Classes differ in colour *and*
texture, and every pixel carries noise, so a model has to look at more than one pixel:

====  ==========  ===============================================================
 id   name        appearance
====  ==========  ===============================================================
 0    background  smooth olive/grey gradient with noise
 1    box         brick-red rectangles with fine horizontal stripes
 2    disc        blue discs with radial shading
 3    stripes     bands of yellow/black diagonal stripes (both colours = class 3)
 4    line        thin pale lines, 1-2 px (fine structures)
 5    triangle    magenta triangles
 6    checker     teal/dark checkerboard patches
 7    ring        orange rings (annuli)
====  ==========  ===============================================================
"""

from __future__ import annotations

import numpy as np

from fastbisenet.data.base import Sample, SegmentationDataset, to_sample

SYNTHETIC_CLASSES = ["background", "box", "disc", "stripes", "line", "triangle", "checker", "ring"]
SYNTHETIC_PALETTE = [(0, 0, 0), (200, 60, 40), (40, 90, 220), (240, 210, 40), (245, 245, 245),
                     (220, 40, 200), (20, 170, 160), (255, 140, 0)]


class SyntheticDataset(SegmentationDataset):
    """``length`` procedurally drawn ``size`` = (H, W) scenes with the 8 classes above.

    ``split`` picks a disjoint stream of scenes (``"train"`` and ``"val"`` never share a sample).
    """

    classes = SYNTHETIC_CLASSES
    palette = SYNTHETIC_PALETTE

    def __init__(self, length: int = 1000, size: int | tuple[int, int] = 128, seed: int = 0,
                 split: str = "train") -> None:
        super().__init__(skip_bad=False)
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        if length < 1 or min(self.size) < 8:
            raise ValueError(f"synthetic dataset needs length >= 1 and size >= 8, got {length}, {self.size}")
        self.length = length
        self.seed = seed
        self.split = split
        self._stream = sum(ord(c) * 131**i for i, c in enumerate(split)) % (2**31)

    def __len__(self) -> int:
        return self.length

    def load(self, index: int) -> Sample:
        image, label = draw_scene(self.size, np.random.default_rng((self.seed, self._stream, index)))
        return to_sample(image, label)


def draw_scene(size: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One scene: uint8 RGB (H, W, 3) and uint8 labels (H, W) in 0..7."""
    h, w = size
    s = float(min(h, w))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    label = np.zeros((h, w), np.uint8)

    # 0: background gradient
    base = rng.uniform(0.25, 0.45, 3).astype(np.float32) * np.array([0.9, 1.0, 0.8], np.float32)
    gy, gx = rng.uniform(-0.15, 0.15, 2)
    img[:] = base + (gy * yy / h + gx * xx / w)[..., None]

    def paint(mask: np.ndarray, cls: int, colour: np.ndarray) -> None:
        img[mask] = colour[mask] if colour.ndim == 3 else colour
        label[mask] = cls

    def rand_colour(rgb: tuple[float, float, float], jitter: float = 0.08) -> np.ndarray:
        return np.clip(np.array(rgb, np.float32) + rng.uniform(-jitter, jitter, 3), 0, 1).astype(np.float32)

    def box() -> None:
        bh, bw = rng.uniform(0.15, 0.45, 2) * s
        y0, x0 = rng.uniform(0, h - bh), rng.uniform(0, w - bw)
        m = (yy >= y0) & (yy < y0 + bh) & (xx >= x0) & (xx < x0 + bw)
        c = rand_colour((0.78, 0.24, 0.16))
        period = rng.uniform(3.0, 5.0)
        tex = c * (0.8 + 0.2 * (np.sin(yy * 2 * np.pi / period) > 0))[..., None]
        paint(m, 1, tex)

    def disc() -> None:
        r = rng.uniform(0.08, 0.2) * s
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        m = d < r
        c = rand_colour((0.16, 0.35, 0.86))
        paint(m, 2, c * (1.1 - 0.5 * (d / r))[..., None])

    def stripes() -> None:
        bh, bw = rng.uniform(0.15, 0.4, 2) * s
        y0, x0 = rng.uniform(0, h - bh), rng.uniform(0, w - bw)
        m = (yy >= y0) & (yy < y0 + bh) & (xx >= x0) & (xx < x0 + bw)
        period = rng.uniform(5.0, 9.0)
        on = ((xx + yy * rng.choice([-1.0, 1.0])) % period) < period / 2
        tex = np.where(on[..., None], rand_colour((0.94, 0.82, 0.16)), rand_colour((0.08, 0.08, 0.06), 0.04))
        paint(m, 3, tex)

    def line() -> None:
        y0, x0, y1, x1 = rng.uniform(0, 1, 4) * np.array([h, w, h, w])
        width = rng.uniform(1.0, 2.2)
        dy, dx = y1 - y0, x1 - x0
        t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / max(dy * dy + dx * dx, 1e-6), 0, 1)
        d = np.hypot(yy - (y0 + t * dy), xx - (x0 + t * dx))
        paint(d < width / 2 + 0.3, 4, rand_colour((0.95, 0.95, 0.92), 0.04))

    def triangle() -> None:
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = rng.uniform(0.1, 0.25) * s
        ang = rng.uniform(0, 2 * np.pi) + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
        py, px = cy + r * np.sin(ang), cx + r * np.cos(ang)
        inside = np.ones((h, w), bool)
        for i in range(3):
            j = (i + 1) % 3
            cross = (px[j] - px[i]) * (yy - py[i]) - (py[j] - py[i]) * (xx - px[i])
            inside &= cross >= 0
        paint(inside, 5, rand_colour((0.86, 0.16, 0.78)))

    def checker() -> None:
        bh, bw = rng.uniform(0.12, 0.35, 2) * s
        y0, x0 = rng.uniform(0, h - bh), rng.uniform(0, w - bw)
        m = (yy >= y0) & (yy < y0 + bh) & (xx >= x0) & (xx < x0 + bw)
        cell = rng.uniform(3.0, 6.0)
        on = ((np.floor(yy / cell) + np.floor(xx / cell)) % 2) == 0
        tex = np.where(on[..., None], rand_colour((0.08, 0.67, 0.63)), rand_colour((0.04, 0.2, 0.22), 0.04))
        paint(m, 6, tex)

    def ring() -> None:
        r = rng.uniform(0.1, 0.22) * s
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        paint((d < r) & (d > r * rng.uniform(0.5, 0.7)), 7, rand_colour((1.0, 0.55, 0.0)))

    painters = [box, disc, stripes, line, triangle, checker, ring]
    jobs = [p for p in painters for _ in range(rng.integers(1, 3))]
    jobs += [line] * int(rng.integers(0, 3))
    for k in rng.permutation(len(jobs)):
        jobs[k]()

    img += rng.normal(0.0, 0.04, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), label
