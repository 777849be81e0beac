"""BiSeNetV1 with the public layouts ("presets") and the public checkpoints' state_dict keys."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastbisenet import ops
from fastbisenet.backbones import build_backbone
from fastbisenet.nn import ContextPath, FeatureFusion, SegmentationHead, SpatialPath

AUX_MODES = ("train", "eval", "pred")
AUX_HEADS = ("conv_out16", "conv_out32")
MIN_SIZE = 32


@dataclass(frozen=True)
class Preset:
    """What differs between the public BiSeNetV1 layouts."""

    spatial_path: bool
    """v1 has a spatial path; face-parsing feeds the backbone's stride-8 feature to the FFM instead."""
    ffm_attention: str
    """``"bn"``: 1x1 + BN + sigmoid; ``"mlp"``: 1x1 -> ReLU -> 1x1 -> sigmoid."""
    head_bias: bool
    """Whether the heads' 1x1 classifier has a bias."""
    align_corners: bool
    """``align_corners`` of the heads' bilinear resize to the input size."""


PRESETS: dict[str, Preset] = {
    "v1": Preset(spatial_path=True, ffm_attention="bn", head_bias=True, align_corners=False),
    "face-parsing": Preset(spatial_path=False, ffm_attention="mlp", head_bias=False, align_corners=True),
}


def _autocast_on(device_type: str) -> bool | None:
    """Whether autocast is on for ``device_type``; None where it does not exist (e.g. "meta": cost tracing)."""
    if not torch.amp.is_autocast_available(device_type):
        return None
    return torch.is_autocast_enabled(device_type)


def _autocast_input(x: Tensor) -> Tensor:
    """``x`` in the autocast dtype of its device when autocast is on there (what each conv would cast it
    to; autocast leaves float64 alone), else ``x``."""
    if _autocast_on(x.device.type) and x.is_floating_point() and x.dtype != torch.float64:
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


class BiSeNet(nn.Module):
    """Bilateral Segmentation Network (BiSeNetV1).

    Args:
        n_classes: number of output classes.
        aux_mode: ``"train"`` returns ``(out, out16, out32)`` logits at the input size; ``"eval"``
            returns ``(out,)``; ``"pred"`` returns the int32 class map ``(N, H, W)``. Only
            ``"train"`` builds the auxiliary heads ``conv_out16``/``conv_out32``.
        preset: ``"v1"`` (the common Cityscapes layout) or ``"face-parsing"``.
        backbone: ``"resnet18"`` (the public checkpoints), ``"resnet34"``, ``"resnet50"``, ``"resnet101"``.
        backend: ``"auto"`` (Triton kernels for CUDA inputs, reference ops otherwise), ``"triton"`` or
            ``"torch"``; changeable later through the :attr:`backend` property. The state_dict does not
            depend on it.

    Input: a float tensor (N, 3, H, W), NCHW or channels_last, with H, W >= 32 (any size; the public
    model needs multiples of 32 and gives the same outputs on those).

    ``model(x, labels)`` (aux_mode ``"train"`` or ``"eval"``) returns, in place of each output's logits,
    their per-pixel cross-entropy against ``labels`` (N, H, W) integer class ids: fp32 (N, H, W), 0 where
    the label is ``ignore_index`` (default 255), the input to an OHEM or mean reduction
    (:meth:`fastbisenet.losses.OhemCELoss.reduce`). The Triton backend then never writes the
    full-resolution logits (a fused head + loss kernel; less memory and traffic in training).
    """

    def __init__(
        self,
        n_classes: int,
        aux_mode: str = "train",
        *,
        preset: str = "v1",
        backbone: str = "resnet18",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if aux_mode not in AUX_MODES:
            raise ValueError(f"aux_mode must be one of {AUX_MODES}, got {aux_mode!r}")
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
        if not isinstance(n_classes, int) or n_classes < 1:
            raise ValueError(f"n_classes must be a positive int, got {n_classes!r}")
        self.n_classes = n_classes
        self._aux_mode = aux_mode
        self.preset = preset
        self.backbone = backbone
        cfg = PRESETS[preset]
        self.align_corners = cfg.align_corners

        resnet = build_backbone(backbone)
        c8 = resnet.channels[0]
        self.cp = ContextPath(resnet, resnet.channels)
        if cfg.spatial_path:
            self.sp = SpatialPath()
            ffm_in = 128 + 128
        else:
            self.sp = None
            ffm_in = c8 + 128
        self.ffm = FeatureFusion(ffm_in, 256, attention=cfg.ffm_attention)
        head = dict(bias=cfg.head_bias, align_corners=cfg.align_corners)
        self.conv_out = SegmentationHead(256, 256, n_classes, **head)
        if aux_mode == "train":
            self.conv_out16 = SegmentationHead(128, 64, n_classes, **head)
            self.conv_out32 = SegmentationHead(128, 64, n_classes, **head)
        self.backend = backend
        self.register_load_state_dict_pre_hook(_drop_missing_aux_head_keys)
        self.register_load_state_dict_pre_hook(_forget_packed_weights_before_swap)

    @property
    def aux_mode(self) -> str:
        """``"train"``, ``"eval"`` or ``"pred"``; a model built without aux heads cannot switch to ``"train"``."""
        return self._aux_mode

    @aux_mode.setter
    def aux_mode(self, value: str) -> None:
        if value not in AUX_MODES:
            raise ValueError(f"aux_mode must be one of {AUX_MODES}, got {value!r}")
        if value == "train" and not self.has_aux_heads:
            raise ValueError("aux_mode='train' needs the auxiliary heads: this model was built without them "
                             "(construct it with aux_mode='train')")
        self._aux_mode = value

    @property
    def backend(self) -> str:
        """The compute backend of every submodule; assigning it switches the whole model."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        ops.check_backend(value)
        self._backend = value
        for m in self.modules():
            if m is not self and hasattr(type(m), "backend"):
                m.backend = value

    def __setattr__(self, name: str, value: object) -> None:
        """A submodule assigned to the model (e.g. a new head for fine-tuning) takes the model's backend."""
        super().__setattr__(name, value)
        if isinstance(value, nn.Module) and "_backend" in self.__dict__:
            for m in value.modules():
                if hasattr(type(m), "backend"):
                    m.backend = self._backend

    def _apply(self, fn, recurse: bool = True):
        """``.to()``, ``.half()``, ``.cpu()``...: the inference caches of the old tensors are dropped first (no
        packing of the old data outlives the conversion; swap_tensors finds no weak reference)."""
        _forget_packed_weights(self)
        return super()._apply(fn, recurse)

    @property
    def has_aux_heads(self) -> bool:
        """Whether ``conv_out16``/``conv_out32`` exist (built with ``aux_mode="train"``)."""
        return "conv_out16" in self._modules

    def extra_repr(self) -> str:
        return f"n_classes={self.n_classes}, aux_mode={self.aux_mode!r}, preset={self.preset!r}, " \
               f"backbone={self.backbone!r}, backend={self.backend!r}"

    def _check_input_matches(self, x: Tensor) -> None:
        """``ValueError`` for an input on another device than the parameters, or of another float dtype outside
        autocast (each backend would fail or convert differently: the reference ops raise, the kernels cast);
        device types without autocast (meta: cost tracing) are not checked for dtype."""
        p = next(self.parameters(), None)
        if p is None or torch.compiler.is_compiling():
            return
        if x.device != p.device:
            raise ValueError(f"input is on {x.device} but the model's parameters are on {p.device}: "
                             "move one with .to()")
        if x.dtype != p.dtype and _autocast_on(x.device.type) is False:
            raise ValueError(f"input dtype {x.dtype} does not match the model's {p.dtype} parameters: convert "
                             "the input or the model with .to(dtype), or run under torch.autocast")

    def forward(self, x: Tensor, labels: Tensor | None = None, *, ignore_index: int = 255
                ) -> tuple[Tensor, ...] | Tensor:
        check_input(x)
        self._check_input_matches(x)
        with on_device_of(x):  # Triton launches on the current CUDA device, not the tensors'
            return self._forward(x, labels, ignore_index)

    def _forward(self, x: Tensor, labels: Tensor | None, ignore_index: int) -> tuple[Tensor, ...] | Tensor:
        size = (x.shape[-2], x.shape[-1])
        if labels is not None:
            labels = self._check_labels(x, labels)
        if self.sp is not None and not self.training:
            # eval: the two 7x7 stems read the same image, one conv on the fused backend (ops
            # conv_bn_act_pair); forward hooks of the two stem modules do not fire on this path
            resnet = self.cp.resnet
            stem_cp, stem_sp = ops.impl(self.backend, x).conv_bn_act_pair(
                x, (resnet.conv1, resnet.bn1), (self.sp.conv1.conv, self.sp.conv1.bn)
            )
            feat8, feat_cp8, feat_cp16 = self.cp(x, stem=stem_cp)
            feat_sp = self.sp(x, stem=stem_sp)
        else:
            if self.sp is not None:  # two stems read the image: one autocast cast and one saved copy, not two
                x = _autocast_input(x)
            feat8, feat_cp8, feat_cp16 = self.cp(x)
            feat_sp = self.sp(x) if self.sp is not None else feat8
        feat_fuse = self.ffm(feat_sp, feat_cp8)
        if labels is not None:
            heads = [(self.conv_out, feat_fuse)]
            if self.aux_mode == "train":
                heads += [(self.conv_out16, feat_cp8), (self.conv_out32, feat_cp16)]
            return tuple(head(feat, size, labels, ignore_index) for head, feat in heads)
        if self.aux_mode == "pred":
            return self.conv_out.predict(feat_fuse, size)
        out = self.conv_out(feat_fuse, size)
        if self.aux_mode == "eval":
            return (out,)
        return out, self.conv_out16(feat_cp8, size), self.conv_out32(feat_cp16, size)

    def _check_labels(self, x: Tensor, labels: Tensor) -> Tensor:
        """``labels`` as int64, or ``ValueError`` naming what is wrong with them."""
        if self.aux_mode == "pred":
            raise ValueError("labels are for the losses of aux_mode 'train' or 'eval'; aux_mode 'pred' returns "
                             "the class map")
        if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex() \
                or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got "
                             f"{labels.dtype if isinstance(labels, Tensor) else type(labels).__name__}")
        want = (x.shape[0], *x.shape[2:])
        if tuple(labels.shape) != want:
            raise ValueError(f"labels must have shape (N, H, W) = {want} for input {tuple(x.shape)}, got "
                             f"{tuple(labels.shape)}")
        if labels.device != x.device:
            raise ValueError(f"labels are on {labels.device}, the input on {x.device}")
        return labels.long()


def _forget_packed_weights(module: nn.Module) -> None:
    """Drop ``module``'s inference caches (:func:`fastbisenet.ops.conv_bn.forget_packed_weights`) if the conv
    op, which keeps them, was ever imported (a model that never ran the kernels has none)."""
    conv_bn = sys.modules.get("fastbisenet.ops.conv_bn")
    if conv_bn is not None:
        conv_bn.forget_packed_weights(module)


def _forget_packed_weights_before_swap(module: nn.Module, *_: object) -> None:
    """``load_state_dict`` pre-hook: with ``torch.__future__.set_swap_module_params_on_conversion(True)`` loading
    swaps tensors, which a weak reference from the caches would block. Otherwise loading copies in place and
    the caches repack into their own buffers (a captured CUDA graph then sees the loaded weights after an
    eager call)."""
    if torch.__future__.get_swap_module_params_on_conversion():
        _forget_packed_weights(module)


def _drop_missing_aux_head_keys(module: BiSeNet, state_dict: dict, prefix: str, *_) -> None:
    """``load_state_dict`` pre-hook: a model without aux heads accepts a training checkpoint by dropping
    exactly the ``conv_out16.*``/``conv_out32.*`` keys (the caller's dict is not modified: PyTorch hands
    hooks its own copy)."""
    if module.has_aux_heads:
        return
    heads = tuple(f"{prefix}{h}." for h in AUX_HEADS)
    for key in [k for k in state_dict if k.startswith(heads)]:
        del state_dict[key]


def on_device_of(x: Tensor) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(x.device)`` when ``x`` is on a CUDA device other than the current one, else a no-op.

    Triton launches its kernels on the current CUDA device whatever device the tensors are on (PyTorch's own
    ops follow the tensors), so a model on ``cuda:1`` while ``cuda:0`` is current would hand device-1 pointers
    to kernels running on device 0. Autograd's backward runs on a thread already set to the tensors' device."""
    if not x.is_cuda or torch.compiler.is_compiling() or x.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(x.device)


def check_input(x: Tensor) -> None:
    """Raise ``ValueError`` naming the problem unless ``x`` is a float (N, 3, H>=32, W>=32) tensor."""
    if not isinstance(x, Tensor):
        raise ValueError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"input must be 4-D (N, 3, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"input must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[1] != 3:
        raise ValueError(f"input must have 3 channels (RGB), got {x.shape[1]} in shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h < MIN_SIZE or w < MIN_SIZE:
        raise ValueError(f"input H and W must be at least {MIN_SIZE}, got {h}x{w}")
    if x.shape[0] == 0:
        raise ValueError("input batch is empty")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["AUX_HEADS", "AUX_MODES", "PRESETS", "BiSeNet", "check_input", "count_parameters"]
