"""Prediction: images or folders -> colourised masks and overlays (PNG), optional logits."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from fastbisenet.data.base import IMAGE_EXTENSIONS, default_palette
from fastbisenet.evaluate import add_normalization_args


def collect_images(inputs: Iterable[str | os.PathLike[str]], recursive: bool = False) -> list[Path]:
    """Image files named in ``inputs``: files as given, folders expanded (sorted, by extension)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = p.rglob("*") if recursive else p.iterdir()
            files += sorted(f for f in found if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"input not found: {p}")
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(map(str, inputs))}")
    return files


def colorize(pred: np.ndarray, palette: Sequence[Sequence[int]]):
    """A paletted (mode ``P``) PIL image: the pixel values are the class ids, shown in colour."""
    from PIL import Image

    im = Image.fromarray(pred.astype(np.uint8), mode="P")
    flat = [int(c) for rgb in palette for c in rgb]
    im.putpalette(flat + [0] * (768 - len(flat)))
    return im


def overlay(image: np.ndarray, pred: np.ndarray, palette: Sequence[Sequence[int]], alpha: float = 0.5):
    """``(1 - alpha) * image + alpha * colour(pred)`` as an RGB PIL image."""
    from PIL import Image

    lut = np.zeros((256, 3), np.float32)
    lut[: len(palette)] = np.asarray(palette, np.float32)[:256]
    blend = (1 - alpha) * image.astype(np.float32) + alpha * lut[pred]
    return Image.fromarray(np.clip(blend + 0.5, 0, 255).astype(np.uint8))


def _unique_stems(files: Sequence[Path]) -> list[str]:
    """Output names, distinct for distinct files: the file stem; where stems collide, the path below the
    colliding files' deepest common folder (``a/imgs/x.png``, ``b/imgs/x.png`` -> ``a_imgs_x``, ``b_imgs_x``),
    with the extension where that still collides (``x.png``, ``x.jpg`` -> ``x_png``, ``x_jpg``), then a
    counter (a file given twice)."""
    paths = [f.resolve() for f in files]
    names = [f.stem for f in files]
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name, []).append(i)
    for idx in groups.values():
        if len(idx) < 2:
            continue
        base = Path(os.path.commonpath([paths[i].parent for i in idx]))
        for i in idx:
            rel = paths[i].relative_to(base)
            names[i] = "_".join((*rel.parent.parts, rel.stem))
        suffixes: dict[str, set[str]] = {}
        for i in idx:
            suffixes.setdefault(names[i], set()).add(paths[i].suffix)
        for i in idx:
            if len(suffixes[names[i]]) > 1:
                names[i] += "_" + paths[i].suffix.lstrip(".")
    taken: set[str] = set()
    unique = []
    for name in names:
        candidate, k = name, 1
        while candidate in taken:
            candidate, k = f"{name}_{k}", k + 1
        taken.add(candidate)
        unique.append(candidate)
    return unique


@torch.no_grad()
def predict_files(model: torch.nn.Module, files: Sequence[Path], out_dir: str | os.PathLike[str], *,
                  palette: Sequence[Sequence[int]], device: torch.device, batch_size: int = 4,
                  scales: Sequence[float] = (1.0,), flip: bool = False, amp: torch.dtype | None = None,
                  channels_last: bool = False, save_overlay: bool = True, alpha: float = 0.5,
                  save_logits: str | None = None, progress: bool = False, mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None) -> list[Path]:
    """Segment ``files`` (batched: images of equal size share a forward) and write
    ``<stem>_mask.png`` (paletted: values = class ids), ``<stem>_overlay.png`` and optionally
    ``<stem>_logits.npy``/``.pt`` (float32 (C, H, W) scores) into ``out_dir``. Returns written paths."""
    from fastbisenet.data import MEAN, STD, normalize, read_image
    from fastbisenet.evaluate import infer
    from fastbisenet.train import Progress

    if save_logits not in (None, "npy", "pt"):
        raise ValueError(f"save_logits must be 'npy' or 'pt', got {save_logits!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = _unique_stems(files)
    sizes: dict[tuple[int, int], list[int]] = {}
    from PIL import Image

    for i, f in enumerate(files):  # group by size from the headers, without decoding
        try:
            with Image.open(f) as im:
                w, h = im.size
        except Exception as e:
            raise ValueError(f"cannot read image {f}: {type(e).__name__}: {e}") from e
        if min(h, w) < 32:
            raise ValueError(f"image {f} is {w}x{h}; BiSeNet needs at least 32x32")
        sizes.setdefault((h, w), []).append(i)
    batches = [idx[k:k + batch_size] for idx in sizes.values() for k in range(0, len(idx), batch_size)]
    written: list[Path] = []
    bar = Progress(len(files), desc="predict", enabled=progress)
    done = 0
    for batch in batches:
        arrays = [read_image(files[i]) for i in batch]
        x = normalize(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(device), mean or MEAN, std or STD)
        scores = infer(model, x, scales, flip, channels_last, amp)
        preds = scores.argmax(dim=1).to(torch.uint8).cpu().numpy()
        for k, i in enumerate(batch):
            stem = names[i]
            p = out / f"{stem}_mask.png"
            colorize(preds[k], palette).save(p)
            written.append(p)
            if save_overlay:
                p = out / f"{stem}_overlay.png"
                overlay(arrays[k], preds[k], palette, alpha).save(p)
                written.append(p)
            if save_logits:
                p = out / f"{stem}_logits.{save_logits}"
                s = scores[k].float().cpu()
                np.save(p, s.numpy()) if save_logits == "npy" else torch.save(s.clone(), p)
                written.append(p)
        done += len(batch)
        bar.update(done)
    bar.close()
    return written


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from fastbisenet.cli import positive_int

    p = subparsers.add_parser("predict", help="segment images: colourised masks and overlays",
                              description="Segment images (files and/or folders) of any size and write "
                                          "<name>_mask.png (paletted PNG whose pixel values are the class ids) "
                                          "and <name>_overlay.png; <name> is the file's stem, prefixed by its "
                                          "folders (and suffixed by its extension) where stems collide, and by "
                                          "_1, _2... for a file given twice.")
    p.add_argument("weights", help="checkpoint (.pt/.pth): a training checkpoint or a plain state_dict")
    p.add_argument("inputs", nargs="+", help="image files and/or folders of images")
    p.add_argument("-o", "--out-dir", default="predictions")
    p.add_argument("--recursive", action="store_true", help="search folders recursively")
    p.add_argument("--batch-size", type=positive_int, default=4,
                   help="images per forward (same-size images are grouped)")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], metavar="S")
    p.add_argument("--flip", action="store_true")
    p.add_argument("--no-overlay", action="store_true", help="write only the masks")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the mask colours")
    p.add_argument("--save-logits", choices=["npy", "pt"], default=None,
                   help="also save the (C, H, W) float32 scores as .npy or .pt")
    p.add_argument("--palette", choices=["auto", "checkpoint", "cityscapes", "generated"], default="auto",
                   help="auto: the checkpoint's palette, else Cityscapes' for 19 classes, else generated")
    add_normalization_args(p)
    p.add_argument("--preset", choices=["v1", "face-parsing"], default=None)
    p.add_argument("--backbone", default=None)
    p.add_argument("--backend", choices=["auto", "triton", "torch"], default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], default="auto")
    p.set_defaults(func=run)
    return p


def pick_palette(choice: str, meta: dict, n_classes: int) -> list[tuple[int, int, int]]:
    from fastbisenet.data import CITYSCAPES_PALETTE

    if choice in ("auto", "checkpoint") and meta.get("palette"):
        return [tuple(c) for c in meta["palette"]]
    if choice == "checkpoint":
        raise ValueError("the checkpoint carries no palette; use --palette cityscapes or generated")
    if choice == "cityscapes" or (choice == "auto" and n_classes == 19 and meta.get("preset") == "v1"):
        if n_classes > len(CITYSCAPES_PALETTE):
            raise ValueError(f"the Cityscapes palette has 19 colours, the model {n_classes} classes")
        return list(CITYSCAPES_PALETTE)
    return default_palette(n_classes)


def run(args: argparse.Namespace) -> int:
    from fastbisenet.evaluate import load_model, normalization_for, resolve_amp, resolve_device

    device = resolve_device(args.device)
    model, meta = load_model(args.weights, "eval", backend=args.backend, device=device, preset=args.preset,
                             backbone=args.backbone)
    files = collect_images(args.inputs, args.recursive)
    palette = pick_palette(args.palette, meta, meta["n_classes"])
    mean, std = normalization_for(meta["preset"], args.mean or meta.get("mean"), args.std or meta.get("std"))
    written = predict_files(model, files, args.out_dir, palette=palette, device=device,
                            batch_size=args.batch_size, scales=args.scales, flip=args.flip,
                            amp=resolve_amp(args.amp, device), channels_last=device.type == "cuda",
                            save_overlay=not args.no_overlay, alpha=args.alpha, save_logits=args.save_logits,
                            progress=True, mean=mean, std=std)
    print(f"{len(files)} images -> {len(written)} files in {args.out_dir}")
    return 0
