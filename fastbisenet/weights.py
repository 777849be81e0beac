"""Loading checkpoints: public BiSeNet weights and torchvision ImageNet ResNets.

Files are read with ``torch.load(..., weights_only=True)``: tensors and plain containers only, never
arbitrary pickled objects.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fastbisenet.model import AUX_HEADS, BiSeNet

# Keys under which training scripts commonly nest the model's state_dict.
_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "net")


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a state_dict from ``path`` safely, unwrapping one level of nesting and ``module.`` prefixes.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a safe (weights-only) checkpoint or holds no state_dict.
    """
    return state_dict_of(read_checkpoint(path), path)


def read_checkpoint(path: str | os.PathLike[str]) -> Any:
    """The object ``torch.save`` wrote to ``path``, loaded with ``weights_only=True`` on the CPU.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a PyTorch checkpoint, or not a safe (weights-only) one.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(2)
    if head != b"PK" and head[:1] != b"\x80":  # torch.save writes a zip archive (legacy format: a pickle)
        raise ValueError(f"{path} is not a PyTorch checkpoint (a file written by torch.save)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler reports unsafe globals as UnpicklingError
        raise ValueError(
            f"cannot load {path} with weights_only=True (only tensors and plain containers are "
            f"accepted, never pickled objects): {e}"
        ) from e
    return obj


def state_dict_of(obj: Any, path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The state_dict held by a checkpoint object (:func:`read_checkpoint`) read from ``path``: the object
    itself or one level down (``"model"``, ``"state_dict"``, ...), ``module.`` prefixes stripped."""
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        for key in _NESTED_KEYS:
            if isinstance(obj.get(key), Mapping) and _is_state_dict(obj[key]):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not _is_state_dict(obj):
        raise ValueError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return strip_prefix(obj, "module.")


def _is_state_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def strip_prefix(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Remove ``prefix`` from every key that has it (e.g. ``module.`` of DDP checkpoints)."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def load_state_dict_checked(module: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    """``module.load_state_dict(state)``, failing with one message that lists every problem.

    The message names missing keys, unexpected keys and keys whose shapes differ. BatchNorm's
    ``num_batches_tracked`` counters may be absent from BatchNorms whose other entries are there
    (checkpoints written before PyTorch had them, such as torchvision's ImageNet ResNets): the module
    keeps its own, as ``load_state_dict`` does for such files.
    ``state`` itself is not modified.
    """
    own = module.state_dict()
    state = dict(state)
    for k in set(own) - set(state):
        prefix, _, name = k.rpartition(".")
        if name == "num_batches_tracked" and (f"{prefix}.running_mean" if prefix else "running_mean") in state:
            state[k] = own[k]  # the rest of this BatchNorm is there: only its counter is absent
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or mismatched:
        lines = [f"{what} does not match the model:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys))
        raise ValueError("\n".join(lines))
    module.load_state_dict(state, strict=True)


CLASSIFIER_HEADS = ("conv_out", *AUX_HEADS)
"""Heads whose final 1x1 ``<head>.conv_out.*`` maps features to classes."""


def is_classifier_key(key: str) -> bool:
    """Whether ``key`` belongs to a head's class-specific 1x1 (``conv_out.conv_out.weight``, ...)."""
    head, _, rest = key.partition(".")
    return head in CLASSIFIER_HEADS and rest.startswith("conv_out.")


def load_pretrained(model: BiSeNet, path: str | os.PathLike[str], *, reset_classifier: bool = False) -> BiSeNet:
    """Load a BiSeNet checkpoint file into ``model`` and return the model.

    Accepts the public checkpoints (a plain state_dict), DDP checkpoints (``module.`` prefix) and
    fastbisenet training checkpoints (state_dict under ``"model"``). When ``model`` has no auxiliary
    heads (aux_mode ``"eval"``/``"pred"``), exactly the ``conv_out16.*``/``conv_out32.*`` keys are
    dropped; any other difference raises ``ValueError`` listing missing, unexpected and
    shape-mismatched keys. ``reset_classifier=True`` (fine-tuning on other classes) loads everything but
    the heads' class-specific 1x1 convs (``<head>.conv_out.*``), which keep the model's own values.
    """
    return load_state_into(model, read_state_dict(path), f"checkpoint {path}", reset_classifier=reset_classifier)


def load_state_into(model: BiSeNet, state: Mapping[str, Tensor], source: str, *,
                    reset_classifier: bool = False) -> BiSeNet:
    """:func:`load_pretrained` of a state_dict already read (``source`` names it in errors)."""
    if not model.has_aux_heads:
        state = {k: v for k, v in state.items() if k.split(".", 1)[0] not in AUX_HEADS}
    if reset_classifier:
        own = model.state_dict()
        state = {k: v for k, v in state.items() if not is_classifier_key(k)}
        state.update({k: v for k, v in own.items() if is_classifier_key(k)})
    try:
        load_state_dict_checked(model, state, source)
    except ValueError as e:
        if not reset_classifier and "conv_out.conv_out.weight: checkpoint" in str(e):
            raise ValueError(f"{e}\n(the checkpoint has another number of classes: to fine-tune it on this "
                             "model's classes, load it with reset_classifier=True, or --reset-classifier in "
                             "'fastbisenet train')") from None
        raise
    return model


def load_backbone_weights(model: BiSeNet, path: str | os.PathLike[str]) -> BiSeNet:
    """Load torchvision-layout ImageNet ResNet weights (e.g. ``resnet18-f37072fd.pth``) into the backbone.

    The classifier (``fc.*``) is dropped; everything else must match ``model.cp.resnet`` exactly.
    """
    state = read_state_dict(path)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    load_state_dict_checked(model.cp.resnet, state, f"backbone weights {path}")
    return model
