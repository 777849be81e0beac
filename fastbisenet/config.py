"""Training configuration: defaults, YAML/TOML files, and command-line overrides."""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainConfig:
    """Every training option. Defaults follow the reference recipe (SPEC section 4) where it has one.

    ``None`` means "derived": ``iters`` = 80000 (300 for the synthetic data); ``crop`` = 1024 x 1024
    (64 x 64 for the synthetic data); ``lr`` = 1e-2 x global batch / 16 (the recipe's lr at batch 16,
    scaled linearly); ``warmup_iters`` = min(1000, iters // 10); ``eval_every`` = iters // 5;
    ``amp``/``channels_last`` ``"auto"``/``None`` = bf16 + channels_last on CUDA, fp32 NCHW on CPU.
    """

    # data
    data: str = "synthetic"
    dataset: str = "auto"
    train_split: str = "train"
    val_split: str = "val"
    classes_file: str | None = None
    label_type: str = "auto"
    skip_bad: bool = False
    synthetic_size: int = 128
    synthetic_length: int = 2000
    synthetic_val_length: int = 100
    workers: int | None = None
    # model
    preset: str = "v1"
    backbone: str = "resnet18"
    backend: str = "auto"
    device: str = "auto"
    weights: str | None = None
    reset_classifier: bool = False
    backbone_weights: str | None = None
    sync_bn: bool = False
    # schedule
    iters: int | None = None
    batch_size: int = 8
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_mult: float = 10.0
    warmup_iters: int | None = None
    warmup_ratio: float = 0.1
    warmup: str = "exp"
    power: float = 0.9
    ohem_thresh: float = 0.7
    # augmentation
    crop: list[int] | None = None
    scale_min: float = 0.75
    scale_max: float = 2.0
    flip: bool = True
    jitter: float = 0.4
    # speed
    amp: str = "auto"
    channels_last: bool | None = None
    # evaluation, checkpoints, logging
    eval_every: int | None = None
    eval_scales: list[float] = field(default_factory=lambda: [1.0])
    eval_flip: bool = False
    eval_batch_size: int | None = None
    save_every: int = 1000
    keep_checkpoints: bool = False
    overwrite: bool = False
    out_dir: str = "runs/bisenet"
    resume: str | None = None
    seed: int = 0
    log_every: int = 20

    def __post_init__(self) -> None:
        synthetic = self.data == "synthetic" or self.dataset == "synthetic"
        if self.iters is None:
            self.iters = 300 if synthetic else 80000
        if self.crop is None:
            self.crop = [64, 64] if synthetic else [1024, 1024]
        if isinstance(self.crop, int):
            self.crop = [self.crop, self.crop]
        self.crop = [int(c) for c in self.crop]
        if len(self.crop) == 1:
            self.crop = self.crop * 2
        self.eval_scales = [float(s) for s in self.eval_scales]

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad option."""
        checks = [
            (self.iters >= 1, f"iters must be >= 1, got {self.iters}"),
            (self.batch_size >= 2, f"batch_size must be >= 2 (BatchNorm needs 2 samples), got {self.batch_size}"),
            (len(self.crop) == 2 and min(self.crop) >= 32, f"crop must be 1 or 2 sizes >= 32, got {self.crop}"),
            (0 < self.scale_min <= self.scale_max, f"need 0 < scale_min <= scale_max, got "
                                                   f"{self.scale_min}, {self.scale_max}"),
            (self.amp in ("auto", "bf16", "fp16", "none"), f"amp must be auto|bf16|fp16|none, got {self.amp!r}"),
            (self.backend in ("auto", "triton", "torch"), f"backend must be auto|triton|torch, got {self.backend!r}"),
            (self.warmup in ("exp", "linear"), f"warmup must be exp|linear, got {self.warmup!r}"),
            (0 < self.ohem_thresh < 1, f"ohem_thresh must be in (0, 1), got {self.ohem_thresh}"),
            (self.lr is None or self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 <= self.jitter < 1, f"jitter must be in [0, 1), got {self.jitter}"),
            (self.save_every >= 1, f"save_every must be >= 1, got {self.save_every}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (all(s > 0 for s in self.eval_scales), f"eval_scales must be > 0, got {self.eval_scales}"),
            (self.synthetic_size >= 1, f"synthetic_size must be >= 1, got {self.synthetic_size}"),
            (self.synthetic_length >= 1, f"synthetic_length must be >= 1, got {self.synthetic_length}"),
            (self.synthetic_val_length >= 1, f"synthetic_val_length must be >= 1, got {self.synthetic_val_length}"),
            (self.workers is None or self.workers >= 0, f"workers must be >= 0, got {self.workers}"),
            (self.warmup_iters is None or self.warmup_iters >= 0,
             f"warmup_iters must be >= 0, got {self.warmup_iters}"),
            (self.eval_every is None or self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every}"),
            (self.weights is not None or not self.reset_classifier, "reset_classifier needs weights to load"),
            (self.eval_batch_size is None or self.eval_batch_size >= 1,
             f"eval_batch_size must be >= 1, got {self.eval_batch_size}"),
            (0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A flat mapping of options from a ``.toml``, ``.yaml`` or ``.yml`` file (a ``[train]`` table is
    also accepted); dashes in keys become underscores. Unknown keys raise ``ValueError``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            try:
                import tomli as tomllib
            except ModuleNotFoundError as e:
                raise ModuleNotFoundError("reading TOML on Python 3.10 needs 'pip install tomli'") from e
        data = tomllib.loads(text)
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(f"reading {path} needs PyYAML: pip install pyyaml (or use a .toml file)") from e
        data = yaml.safe_load(text) or {}
    else:
        raise ValueError(f"config file {path} must end in .toml, .yaml or .yml")
    if not isinstance(data, Mapping):
        raise ValueError(f"config file {path} must hold a mapping of option names to values")
    if isinstance(data.get("train"), Mapping) and len(data) == 1:
        data = data["train"]
    out = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(out) - FIELDS)
    if unknown:
        raise ValueError(f"config file {path}: unknown option(s) {', '.join(unknown)}; "
                         f"valid options: {', '.join(sorted(FIELDS))}")
    return out


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _scalar(name: str, value: Any, kind: type) -> Any:
    """``value`` as an ``int``/``float``/``bool``/``str`` option, converting strings of numbers and booleans
    (YAML reads ``1e-3`` as a string); anything else raises ``ValueError`` naming the option."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if isinstance(value, (int, str)) and text in _TRUE + _FALSE:
            return text in _TRUE
    elif kind is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"option {name!r} must be a string, got {value!r} ({type(value).__name__}); "
                         "quote it in a YAML file")
    elif not isinstance(value, bool):
        try:
            number = float(value) if isinstance(value, str) else value
            if kind is float and isinstance(number, (int, float)):
                return float(number)
            if kind is int and isinstance(number, (int, float)) and float(number).is_integer():
                return int(number)
        except ValueError:
            pass
    raise ValueError(f"option {name!r} must be {'an' if kind is int else 'a'} {kind.__name__}, got {value!r}")


def coerce_option(name: str, value: Any) -> Any:
    """``value`` converted to the type of :class:`TrainConfig` field ``name`` (``None`` where the field
    allows it; a single number or a comma-separated string for list fields)."""
    hint = _HINTS[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    if value is None:
        if optional:
            return None
        raise ValueError(f"option {name!r} must not be empty (null)")
    base = args[0] if optional and len(args) == 1 else hint
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        items = value.split(",") if isinstance(value, str) else value
        items = items if isinstance(items, (list, tuple)) else [items]
        return [_scalar(name, v.strip() if isinstance(v, str) else v, item) for v in items]
    return _scalar(name, value, base)


def build_config(*layers: Mapping[str, Any]) -> TrainConfig:
    """Defaults, then each mapping in order (later ones override: checkpoint < file < flags); every value
    is converted to its option's type by :func:`coerce_option`."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for k, v in layer.items():
            if k not in FIELDS:
                raise ValueError(f"unknown training option {k!r}")
            merged[k] = coerce_option(k, v)
    cfg = TrainConfig(**merged)
    cfg.validate()
    return cfg


__all__ = ["FIELDS", "TrainConfig", "build_config", "coerce_option", "read_config_file"]
