"""Iteration-based training with the reference BiSeNet recipe, on one process or under ``torchrun``.

One iteration: next batch -> augmentation on the device (seeded by ``(seed, rank, iteration)``) ->
forward (optional autocast, channels_last) -> OHEM CE on main + out16 + out32 -> SGD step -> lr step.
Checkpoints hold everything needed to continue bit for bit: model, optimizer, scheduler, GradScaler,
iteration and RNG states; the data order is a function of ``(seed, samples consumed)``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from fastbisenet.config import FIELDS, TrainConfig, build_config, read_config_file

CHECKPOINT_VERSION = 1


# ------------------------------------------------------------------------------------------ progress
class Progress:
    """A tiny progress display: a redrawn bar on a TTY, plain lines every ``log_every`` steps otherwise."""

    def __init__(self, total: int, *, desc: str = "", start: int = 0, log_every: int = 20, enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.total, self.desc, self.start, self.log_every = total, desc, start, max(1, log_every)
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self._last_draw = 0.0
        self._drawn = False

    def due(self, step: int) -> bool:
        """Whether :meth:`update` at ``step`` would print (lets callers skip computing the info)."""
        if not self.enabled:
            return False
        if self.tty:
            return step == self.total or time.perf_counter() - self._last_draw >= 0.2
        return step % self.log_every == 0 or step == self.total

    def update(self, step: int, info: Mapping[str, Any] | None = None, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty:
            if not force and not self.due(step):
                return
            self._last_draw = now
            self.stream.write("\r" + self._line(step, now, info, bar=True) + "\033[K")
            self._drawn = True
        elif force or step % self.log_every == 0 or step == self.total:
            self.stream.write(self._line(step, now, info, bar=False) + "\n")
        self.stream.flush()

    def _line(self, step: int, now: float, info: Mapping[str, Any] | None, bar: bool) -> str:
        done = max(step - self.start, 0)
        elapsed = now - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else math.nan
        parts = [f"{self.desc} {step}/{self.total}".strip()]
        if bar:
            width = 20
            filled = int(width * step / max(self.total, 1))
            parts.insert(1, "[" + "#" * filled + "." * (width - filled) + "]")
        parts.append(f"{rate:.2f} it/s" if rate >= 1 or rate == 0 else f"{1 / rate:.2f} s/it")
        if info:
            parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items()]
        parts.append(f"eta {_fmt_time(eta)}")
        return "  ".join(parts)

    def write(self, text: str) -> None:
        """Print a message without breaking the bar."""
        if not self.enabled:
            return
        if self.tty and self._drawn:
            self.stream.write("\r\033[K")
            self._drawn = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()


def _fmt_time(sec: float) -> str:
    if not math.isfinite(sec):
        return "?"
    sec = int(sec)
    return f"{sec // 3600}:{sec // 60 % 60:02d}:{sec % 60:02d}" if sec >= 3600 else f"{sec // 60}:{sec % 60:02d}"


# ------------------------------------------------------------------------------------- distributed
@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> tuple[DistInfo, torch.device]:
    """Join the ``torchrun`` process group when ``WORLD_SIZE > 1`` (NCCL on CUDA, gloo on CPU)."""
    from fastbisenet.evaluate import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), resolve_device(device)
    import torch.distributed as dist

    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        info.owns_group = True
    return info, dev


def _check_out_dir(cfg: TrainConfig) -> None:
    """``FileExistsError`` when ``out_dir`` holds another run's results that this run would replace: a run
    not resumed from that folder's checkpoints needs ``overwrite``."""
    out_dir = Path(cfg.out_dir)
    if cfg.overwrite or (cfg.resume and Path(cfg.resume).resolve().parent == out_dir.resolve()):
        return
    found = [name for name in ("last.pt", "model_final.pt") if (out_dir / name).exists()]
    if found:
        resume = f"--resume {out_dir / 'last.pt'} continues it, " if "last.pt" in found else ""
        raise FileExistsError(f"{out_dir} already holds a training run ({', '.join(found)}): {resume}--overwrite "
                              f"replaces it, or choose another --out-dir")


def _finite_on_every_rank(loss: torch.Tensor, world: int) -> bool:
    """Whether ``loss`` is finite in every process. All ranks then raise together: one raising alone would
    leave the others blocked in DDP's gradient all-reduce until the collective times out (a launcher
    other than torchrun does not stop them)."""
    ok = torch.isfinite(loss.detach()).to(torch.int32)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok)


class InfiniteSampler(Sampler[int]):
    """Endless shuffled indices for one rank: epoch ``e`` is ``randperm(n)`` seeded by ``(seed, e)``,
    strided over ranks (each epoch truncated to ``n // world`` per rank); starts after ``start``
    indices of this rank's stream, so a resumed run reads exactly the batches it would have read."""

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world: int = 1, start: int = 0) -> None:
        if n < world:
            raise ValueError(f"the dataset has {n} samples, fewer than the {world} processes")
        self.n, self.seed, self.rank, self.world, self.start = n, seed, rank, world, start
        self.per_rank = n // world

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(self.n, generator=g)[self.rank::self.world][: self.per_rank].tolist()
            yield from perm[offset:]
            offset = 0
            epoch += 1

    def __len__(self) -> int:  # DataLoader only needs a size hint
        return 2**62


def aug_generator(seed: int, rank: int, it: int) -> torch.Generator:
    """The CPU generator whose draws augment iteration ``it`` on process ``rank``."""
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + rank * 1_000_003 + it * 7_919) % (2**63 - 1))


# ------------------------------------------------------------------------------------- checkpoints
def write_meta_sidecar(weights: str | os.PathLike[str], meta: dict[str, Any], config: dict[str, Any]) -> Path:
    """``<weights stem>.json`` next to a plain state_dict file: its classes, palette, preset, backbone and
    normalisation (``meta``) and training options, which ``eval``/``predict`` read as a training
    checkpoint's (:func:`fastbisenet.evaluate.read_checkpoint_info`)."""
    path = Path(weights).with_suffix(".json")
    text = json.dumps({"fastbisenet_meta": meta, "config": config}, indent=1)
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    return path


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``: a reader
    (or a crash) never sees a half-written checkpoint."""
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def _atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """``write`` into a temporary file beside ``path``, fsync it, rename it to ``path`` and fsync the folder
    (the rename itself survives a crash); the temporary file is removed on error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # folders cannot be opened on every platform
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(_tuplify(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def load_training_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A fastbisenet training checkpoint read with ``weights_only=True``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    needed = {"model", "optimizer", "scheduler", "iteration", "config"}
    if not isinstance(ckpt, dict) or not needed <= set(ckpt):
        raise ValueError(f"{path} is not a fastbisenet training checkpoint (needs {sorted(needed)}); "
                         f"use --weights to start from plain model weights")
    return ckpt


# --------------------------------------------------------------------------------------- training
def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def train(cfg: TrainConfig, *, stream: TextIO | None = None) -> dict[str, Any]:
    """Run training as configured; returns ``{"iteration", "miou", "checkpoint", "seconds", "history"}``."""
    from fastbisenet import BiSeNet
    from fastbisenet.data import CityscapesDataset, TrainAugment, build_dataset, collate
    from fastbisenet.evaluate import evaluate, normalization_for, resolve_amp
    from fastbisenet.losses import OhemCELoss, total_pixel_loss
    from fastbisenet.metrics import format_iou_table
    from fastbisenet.schedule import WarmupPolyLR, build_optimizer

    cfg.validate()
    _check_out_dir(cfg)
    dist_info, device = init_distributed(cfg.device)
    is_main = dist_info.is_main
    out_dir = Path(cfg.out_dir)
    stream = stream or sys.stdout

    def log(msg: str) -> None:
        if is_main:
            progress.write(msg) if progress is not None else print(msg, file=stream, flush=True)

    progress: Progress | None = None
    _seed_all(cfg.seed)

    ds_kw = dict(kind=cfg.dataset, skip_bad=cfg.skip_bad, classes_file=cfg.classes_file,
                 synthetic_size=cfg.synthetic_size, seed=cfg.seed, label_type=cfg.label_type)
    train_set = build_dataset(cfg.data, cfg.train_split, synthetic_length=cfg.synthetic_length, **ds_kw)
    val_set = build_dataset(cfg.data, cfg.val_split, synthetic_length=cfg.synthetic_val_length, **ds_kw)
    n_classes = train_set.n_classes
    if getattr(train_set, "image_dir", None) is not None and train_set.image_dir == getattr(val_set, "image_dir", None):
        warnings.warn(f"validation uses the training images ({train_set.image_dir}): there is no "
                      f"{cfg.val_split}/images split folder under {cfg.data}, so the mIoU reported is on seen data",
                      stacklevel=2)

    if is_main:
        for note in recipe_notes(cfg, dist_info.world, isinstance(train_set, CityscapesDataset)):
            warnings.warn(note, stacklevel=2)
    model = BiSeNet(n_classes, "train", preset=cfg.preset, backbone=cfg.backbone, backend=cfg.backend)
    if cfg.backbone_weights and not cfg.resume:  # a resumed run takes every weight from its checkpoint
        from fastbisenet import load_backbone_weights

        load_backbone_weights(model, cfg.backbone_weights)
    if cfg.weights and not cfg.resume:
        from fastbisenet import load_pretrained

        load_pretrained(model, cfg.weights, reset_classifier=cfg.reset_classifier)
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crops: cuDNN's fastest algorithms (as the benchmarks time)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and dist_info.world == 1 and is_main:
        warnings.warn("--sync-bn has no effect in a single process (torchrun --nproc_per_node N for several)",
                      stacklevel=2)
    if cfg.sync_bn and dist_info.world > 1:
        if device.type != "cuda":
            raise ValueError(f"--sync-bn needs CUDA devices (SyncBatchNorm), this run is on {device}")
        # Statistics over the global batch: the fused backend runs ops whose BN is a training SyncBatchNorm on
        # the reference path (cuDNN + all-reduce); see fastbisenet.ops.fused. Off by default, as in the
        # published recipe (each process normalises with its own batch's statistics).
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    raw_model = model

    global_batch = cfg.batch_size * dist_info.world
    lr = cfg.lr if cfg.lr is not None else 1e-2 * global_batch / 16
    warmup_iters = cfg.warmup_iters if cfg.warmup_iters is not None else min(1000, cfg.iters // 10)
    eval_every = cfg.eval_every if cfg.eval_every is not None else max(cfg.iters // 5, 1)
    optimizer = build_optimizer(raw_model, lr, cfg.momentum, cfg.weight_decay, cfg.lr_mult)
    scheduler = WarmupPolyLR(optimizer, cfg.iters, warmup_iters, cfg.warmup_ratio, cfg.warmup, cfg.power)
    amp = resolve_amp(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

    start_it, history = 0, []
    if cfg.resume:
        ckpt = load_training_checkpoint(cfg.resume)
        raw_model.load_state_dict(ckpt["model"])
        fresh_groups = [{k: g[k] for k in ("initial_lr", "momentum", "weight_decay")} for g in optimizer.param_groups]
        fresh_schedule = {k: getattr(scheduler, k) for k in ("max_iter", "warmup_iters", "warmup_ratio", "warmup",
                                                            "power")}
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        # This run's schedule options win over the checkpoint's (e.g. --iters to extend a finished run,
        # a new --lr); unchanged options give back exactly the loaded values, so the run continues exactly.
        for group, fresh in zip(optimizer.param_groups, fresh_groups, strict=True):
            group.update(fresh)
        for k, v in fresh_schedule.items():
            setattr(scheduler, k, v)
        scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        scheduler._last_lr = scheduler.get_lr()
        for group, group_lr in zip(optimizer.param_groups, scheduler._last_lr, strict=True):
            group["lr"] = group_lr
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_it = int(ckpt["iteration"])
        history = list(ckpt.get("history", []))
        if ckpt.get("world_size", 1) != dist_info.world:
            warnings.warn(f"resuming a {ckpt.get('world_size', 1)}-process run on {dist_info.world} "
                          f"processes: the data order differs from the uninterrupted run", stacklevel=2)
        rng = ckpt.get("rng", {})
        if str(dist_info.rank) in rng:
            set_rng_state(rng[str(dist_info.rank)])
        if start_it >= cfg.iters:
            log(f"checkpoint {cfg.resume} is at iteration {start_it} >= iters {cfg.iters}: nothing to do")

    if dist_info.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(raw_model, device_ids=[device.index] if device.type == "cuda" else None)

    workers = cfg.workers if cfg.workers is not None else min(4, max((os.cpu_count() or 1) // 2, 1))
    sampler = InfiniteSampler(len(train_set), cfg.seed, dist_info.rank, dist_info.world,
                              start=start_it * cfg.batch_size)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
                        collate_fn=collate, pin_memory=device.type == "cuda", drop_last=True,
                        persistent_workers=workers > 0)
    mean, std = normalization_for(cfg.preset)
    augment = TrainAugment(tuple(cfg.crop), (cfg.scale_min, cfg.scale_max), cfg.flip, cfg.jitter, mean=mean, std=std)
    criterion = OhemCELoss(cfg.ohem_thresh, backend=cfg.backend)  # reduces the model's per-pixel CE (below)
    meta = {"classes": list(train_set.classes), "palette": [list(c) for c in train_set.palette],
            "n_classes": n_classes, "preset": cfg.preset, "backbone": cfg.backbone,
            "mean": list(mean), "std": list(std)}

    def checkpoint(it: int) -> Path:
        rngs = _gather_rng(dist_info)
        if not is_main:
            return out_dir / "last.pt"
        state = {"version": CHECKPOINT_VERSION, "model": raw_model.state_dict(),
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict(), "iteration": it, "config": cfg.to_dict(), "meta": meta,
                 "rng": rngs, "world_size": dist_info.world, "history": history}
        atomic_save(state, out_dir / "last.pt")
        if cfg.keep_checkpoints:
            atomic_save(state, out_dir / f"iter_{it:07d}.pt")
        return out_dir / "last.pt"

    last_cm = None

    def run_eval(it: int) -> float:
        nonlocal last_cm
        if dist_info.world > 1:  # every rank scores rank 0's model (BN running statistics), the one saved
            import torch.distributed as dist

            for buffer in raw_model.buffers():
                dist.broadcast(buffer, 0)
                torch.autograd.graph.increment_version(buffer)  # a collective's write moves no version counter
        last_cm = evaluate(raw_model, val_set, n_classes, device=device,
                           batch_size=cfg.eval_batch_size or cfg.batch_size, scales=cfg.eval_scales,
                           flip=cfg.eval_flip, channels_last=channels_last, amp=amp, rank=dist_info.rank,
                           world=dist_info.world, mean=mean, std=std)
        miou = last_cm.miou()
        history.append({"iteration": it, "miou": miou})
        log(f"eval @ {it}: mIoU {100 * miou:.2f}  pixel acc {100 * last_cm.pixel_accuracy():.2f}")
        return miou

    amp_name = str(amp).removeprefix("torch.") if amp else "none"
    if is_main:
        log(f"fastbisenet train: {cfg.data} ({len(train_set)} train / {len(val_set)} val images, {n_classes} "
            f"classes), {cfg.preset}/{cfg.backbone} on {device} x{dist_info.world}, backend {cfg.backend}, "
            f"amp {amp_name}, channels_last {channels_last}, batch {cfg.batch_size}x{dist_info.world}, "
            f"crop {cfg.crop}, lr {lr:g} (x{cfg.lr_mult:g} ffm/heads), warmup {warmup_iters}, iters {cfg.iters}")
    progress = Progress(cfg.iters, desc="train", start=start_it, log_every=cfg.log_every, enabled=is_main,
                        stream=stream)
    model.train()
    t_start = time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    window_n, window_t = 0, time.perf_counter()
    data_iter = iter(loader)
    miou = math.nan
    it = start_it
    last_saved = start_it if cfg.resume else -1
    for it in range(start_it + 1, cfg.iters + 1):
        images, labels = next(data_iter)
        images = [im.to(device, non_blocking=True) for im in images]
        labels = [lb.to(device, non_blocking=True) for lb in labels]
        x, y = augment(images, labels, aug_generator(cfg.seed, dist_info.rank, it - 1))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            # the three heads' per-pixel CE (fp32); on the Triton backend the logits are never written
            pixel_losses = model(x, y, ignore_index=criterion.ignore_index)
        loss = total_pixel_loss(pixel_losses, y, criterion, n_classes)
        if not _finite_on_every_rank(loss, dist_info.world):
            where = f"is {loss.item()}" if not torch.isfinite(loss) else "is not finite on another process"
            raise FloatingPointError(f"loss {where} at iteration {it}; lower --lr or use --amp bf16/none")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        lr_now = optimizer.param_groups[0]["lr"]
        scheduler.step()
        loss_sum += loss.detach()
        window_n += 1
        if progress.due(it):
            now = time.perf_counter()
            ips = window_n * global_batch / max(now - window_t, 1e-9)
            progress.update(it, {"loss": float(loss_sum) / window_n, "lr": lr_now, "img/s": round(ips, 1)},
                            force=True)
            if not progress.tty or now - window_t > 5:
                loss_sum.zero_()
                window_n, window_t = 0, now
        if eval_every > 0 and it % eval_every == 0 and it != cfg.iters:
            run_eval(it)
        if it % cfg.save_every == 0 and it != cfg.iters:
            checkpoint(it)
            last_saved = it
    progress.close()
    if it > start_it or not history:
        miou = run_eval(cfg.iters if it > start_it else start_it)
    else:
        miou = history[-1]["miou"]
    if last_saved != it:
        path = checkpoint(it)
    else:
        path = Path(cfg.resume) if cfg.resume and it == start_it else out_dir / "last.pt"
    seconds = time.perf_counter() - t_start
    if is_main:
        atomic_save(raw_model.state_dict(), out_dir / "model_final.pt")  # plain state_dict, as public weights
        write_meta_sidecar(out_dir / "model_final.pt", meta, cfg.to_dict())
        if last_cm is not None:
            log(format_iou_table(last_cm.iou().cpu(), train_set.classes, miou))
        log(f"done: {it} iterations in {_fmt_time(seconds)}, mIoU {100 * miou:.2f}; "
            f"checkpoint {path}, weights {out_dir / 'model_final.pt'}")
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.barrier()
        if dist_info.owns_group:
            dist.destroy_process_group()
    return {"iteration": it, "miou": miou, "checkpoint": str(path), "seconds": seconds, "history": history}


def recipe_notes(cfg: TrainConfig, world: int, cityscapes: bool) -> list[str]:
    """Where a run on real data departs from the published recipe in ways that cost accuracy: a backbone
    without ImageNet weights, a global batch other than 16 on Cityscapes (empty for synthetic data and resumes)."""
    if cfg.data == "synthetic" or cfg.dataset == "synthetic" or cfg.resume:
        return []
    notes = []
    if not (cfg.weights or cfg.backbone_weights):
        notes.append(
            f"training the {cfg.backbone} backbone from random initialisation: the published BiSeNet results start "
            f"from torchvision's ImageNet weights; pass --backbone-weights FILE (e.g. what "
            f"torchvision.models.{cfg.backbone}(weights='IMAGENET1K_V1') downloads to "
            f"~/.cache/torch/hub/checkpoints/), or --weights to fine-tune a BiSeNet checkpoint")
    global_batch = cfg.batch_size * world
    if cityscapes and global_batch != 16:
        notes.append(f"the published Cityscapes recipe trains with a global batch of 16 (2 GPUs x 8); this run's "
                     f"is {global_batch} ({cfg.batch_size} x {world} processes), with the lr scaled linearly "
                     f"unless --lr is given: expect a different mIoU after the same --iters")
    return notes


def _gather_rng(info: DistInfo) -> dict[str, Any]:
    """Every rank's RNG state, keyed by rank (collected on rank 0 when distributed)."""
    mine = rng_state()
    if info.world == 1:
        return {"0": mine}
    import torch.distributed as dist

    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, mine)
    return {str(r): s for r, s in enumerate(out)}


# ---------------------------------------------------------------------------------------------- CLI
_S = argparse.SUPPRESS


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from fastbisenet.cli import nonnegative_int, positive_int

    d = TrainConfig()
    p = subparsers.add_parser(
        "train", help="train BiSeNet (one process or torchrun)",
        description="Iteration-based training with the reference BiSeNet recipe. Options come from the "
                    "defaults, then --config FILE (.toml/.yaml, keys = the long option names), then flags. "
                    "Multi-GPU/multi-process: torchrun --nproc_per_node N -m fastbisenet train ...",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, argument_default=_S)
    p.add_argument("--config", help="TOML or YAML file of options (flags override it)")
    g = p.add_argument_group("data")
    g.add_argument("--data", help=f"'synthetic' or a Cityscapes / folder-dataset root (default {d.data})")
    g.add_argument("--dataset", choices=["auto", "synthetic", "cityscapes", "folder"], help="dataset kind")
    g.add_argument("--train-split", help=f"default {d.train_split}")
    g.add_argument("--val-split", help=f"default {d.val_split}")
    g.add_argument("--classes-file", help="class list of a folder dataset (default <root>/classes.txt)")
    g.add_argument("--label-type", choices=["auto", "trainIds", "labelIds"], help="Cityscapes label files")
    g.add_argument("--skip-bad", action="store_true", help="warn and skip unreadable/invalid samples")
    g.add_argument("--synthetic-size", type=positive_int, help=f"synthetic image size (default {d.synthetic_size})")
    g.add_argument("--synthetic-length", type=positive_int,
                   help=f"synthetic train images (default {d.synthetic_length})")
    g.add_argument("--synthetic-val-length", type=positive_int, help=f"default {d.synthetic_val_length}")
    g.add_argument("--workers", type=nonnegative_int, help="DataLoader workers (default min(4, cpus/2))")
    g = p.add_argument_group("model")
    g.add_argument("--preset", choices=["v1", "face-parsing"], help=f"default {d.preset}")
    g.add_argument("--backbone", choices=["resnet18", "resnet34", "resnet50", "resnet101"],
                   help=f"default {d.backbone}")
    g.add_argument("--backend", choices=["auto", "triton", "torch"], help=f"default {d.backend}")
    g.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (default auto)")
    g.add_argument("--weights", help="initial BiSeNet weights (fine-tuning)")
    g.add_argument("--reset-classifier", action="store_true",
                   help="with --weights: keep the new model's class-specific 1x1 convs (<head>.conv_out.*) and load "
                        "everything else: fine-tuning on a different set of classes")
    g.add_argument("--backbone-weights", help="torchvision ImageNet ResNet weights for the backbone (the published "
                                              "recipe starts from them; without, a warning on real data)")
    g.add_argument("--sync-bn", action=argparse.BooleanOptionalAction,
                   help="multi-process: BatchNorm statistics over the global batch (SyncBatchNorm; those BNs run on "
                        "the reference ops, not the kernels). Default off, as in the published recipe")
    g = p.add_argument_group("schedule")
    g.add_argument("--iters", type=positive_int, help="iterations (default 80000; 300 with --data synthetic)")
    g.add_argument("--batch-size", type=positive_int, help=f"images per process (default {d.batch_size})")
    g.add_argument("--lr", type=float, help="base lr (default 1e-2 x global batch / 16)")
    g.add_argument("--momentum", type=float, help=f"default {d.momentum}")
    g.add_argument("--weight-decay", type=float, help=f"conv weights only (default {d.weight_decay})")
    g.add_argument("--lr-mult", type=float, help=f"lr multiplier of ffm and heads (default {d.lr_mult})")
    g.add_argument("--warmup-iters", type=nonnegative_int, help="default min(1000, iters // 10)")
    g.add_argument("--warmup-ratio", type=float, help=f"default {d.warmup_ratio}")
    g.add_argument("--warmup", choices=["exp", "linear"], help=f"default {d.warmup}")
    g.add_argument("--power", type=float, help=f"poly power (default {d.power})")
    g.add_argument("--ohem-thresh", type=float, help=f"OHEM probability threshold (default {d.ohem_thresh})")
    g = p.add_argument_group("augmentation")
    g.add_argument("--crop", type=positive_int, nargs="+", metavar="SIZE",
                   help="crop size: S or H W (default 1024; 64 with --data synthetic)")
    g.add_argument("--scale-min", type=float, help=f"default {d.scale_min}")
    g.add_argument("--scale-max", type=float, help=f"default {d.scale_max}")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, help="random horizontal flip (default on)")
    g.add_argument("--jitter", type=float, help=f"colour jitter strength (default {d.jitter})")
    g = p.add_argument_group("speed")
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], help="default auto (bf16 on CUDA)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="default: on for CUDA")
    g = p.add_argument_group("evaluation, checkpoints, logging")
    g.add_argument("--eval-every", type=nonnegative_int,
                   help="iterations between evaluations (default iters // 5; 0: end only)")
    g.add_argument("--eval-scales", type=float, nargs="+", help="default 1.0")
    g.add_argument("--eval-flip", action=argparse.BooleanOptionalAction, help="default off")
    g.add_argument("--eval-batch-size", type=positive_int, help="default --batch-size")
    g.add_argument("--save-every", type=positive_int, help=f"iterations between checkpoints (default {d.save_every})")
    g.add_argument("--keep-checkpoints", action="store_true", help="also keep iter_NNNNNNN.pt files")
    g.add_argument("--out-dir", help=f"default {d.out_dir}")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier run in --out-dir (else an error)")
    g.add_argument("--resume", help="continue a training checkpoint (e.g. runs/bisenet/last.pt) exactly")
    g.add_argument("--seed", type=int, help=f"default {d.seed}")
    g.add_argument("--log-every", type=positive_int, help=f"iterations between log lines (default {d.log_every})")
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < the resumed checkpoint's config < ``--config`` file < flags."""
    flags = {k: v for k, v in vars(args).items() if k in FIELDS}
    layers: list[dict[str, Any]] = []
    resume = flags.get("resume")
    file_layer = read_config_file(args.config) if getattr(args, "config", None) else {}
    resume = resume or file_layer.get("resume")
    if resume:
        ckpt = load_training_checkpoint(resume)
        ckpt_cfg = dict(ckpt["config"])
        ckpt_cfg.pop("resume", None)
        ckpt_cfg.pop("overwrite", None)  # a permission for that run's folder, not for this one
        if "sync_bn" not in ckpt_cfg and ckpt.get("world_size", 1) > 1:
            ckpt_cfg["sync_bn"] = True  # runs from before --sync-bn existed used SyncBatchNorm on several GPUs
        layers.append(ckpt_cfg)
    layers += [file_layer, flags]
    return build_config(*layers)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    train(cfg)
    return 0
