"""ResNet 18/34/50/101 feature extractors with torchvision's parameter names (no ``fc``).

``forward`` returns the features at strides 8, 16 and 32 (``layer2``, ``layer3``, ``layer4``), and with
``pool32=True`` also the stride-32 feature's pixel sums, gathered by the last block's fused conv (the
context path's global context then never re-reads that map). Every conv + BatchNorm (+ residual) (+ ReLU)
goes through :func:`fastbisenet.ops.impl`.
"""

from __future__ import annotations

from torch import Tensor, nn

from fastbisenet import ops


class _ResidualBlock(nn.Module):
    """What both block types share: the backend attribute and the (projection) shortcut."""

    backend: str = "auto"
    downsample: nn.Sequential | None

    def shortcut(self, op, x: Tensor) -> Tensor:
        if self.downsample is None:
            return x
        return op.conv_bn_act(x, self.downsample[0], self.downsample[1], relu=False)


class BasicBlock(_ResidualBlock):
    """Two 3x3 conv+BN with an identity or 1x1 conv+BN shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_ch: int, ch: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = ch * self.expansion
        self.conv1 = nn.Conv2d(in_ch, ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: Tensor, pool: bool = False) -> Tensor | tuple[Tensor, Tensor | None]:
        """``pool``: return ``(out, pixel sums of out)`` (see :func:`fastbisenet.reference.conv_bn_act`)."""
        op = ops.impl(self.backend, x)
        shortcut = self.shortcut(op, x)
        y = op.conv_bn_act(x, self.conv1, self.bn1)
        return op.conv_bn_act(y, self.conv2, self.bn2, residual=shortcut, pool=pool)


class Bottleneck(_ResidualBlock):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with a shortcut (ResNet-50/101, torchvision v1.5)."""

    expansion = 4

    def __init__(self, in_ch: int, ch: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = ch * self.expansion
        self.conv1 = nn.Conv2d(in_ch, ch, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.conv3 = nn.Conv2d(ch, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.downsample = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: Tensor, pool: bool = False) -> Tensor | tuple[Tensor, Tensor | None]:
        """``pool`` as in :meth:`BasicBlock.forward`."""
        op = ops.impl(self.backend, x)
        shortcut = self.shortcut(op, x)
        y = op.conv_bn_act(x, self.conv1, self.bn1)
        y = op.conv_bn_act(y, self.conv2, self.bn2)
        return op.conv_bn_act(y, self.conv3, self.bn3, residual=shortcut, pool=pool)


class ResNetStage(nn.Sequential):
    """A stage's blocks in sequence (an ``nn.Sequential``: same keys); ``pool=True`` returns ``(out, pixel sums of
    out)``, the sums gathered by the last block's fused conv."""

    def forward(self, x: Tensor, pool: bool = False) -> Tensor | tuple[Tensor, Tensor | None]:
        if not pool:
            return super().forward(x)
        *blocks, last = self
        for block in blocks:
            x = block(x)
        return last(x, pool=True)


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))


class ResNet(nn.Module):
    """ResNet stem + four stages; returns ``(feat8, feat16, feat32)``."""

    backend: str = "auto"

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_ch = 64
        for i, (width, depth) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(depth):
                blocks.append(block(in_ch, width, stride if j == 0 else 1))
                in_ch = width * block.expansion
            self.add_module(f"layer{i + 1}", ResNetStage(*blocks))
        self.channels = tuple(w * block.expansion for w in (128, 256, 512))
        """Channels of ``(feat8, feat16, feat32)``."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor, stem: Tensor | None = None, *, pool32: bool = False) -> tuple[Tensor, ...]:
        """``(feat8, feat16, feat32)``, with ``pool32`` ``(feat8, feat16, feat32, sums32)``: ``feat32``'s fp32
        pixel sums (S, N, C) from the fused backend, ``None`` from the reference ops (see ``pool`` of
        :func:`fastbisenet.reference.conv_bn_act`). ``stem``: ``relu(bn1(conv1(x)))`` when the caller has
        computed it already (before the max-pool)."""
        if stem is None:
            stem = ops.impl(self.backend, x).conv_bn_act(x, self.conv1, self.bn1)
        x = ops.impl(self.backend, stem).max_pool2d(stem, 3, 2, 1)
        x = self.layer1(x)
        feat8 = self.layer2(x)
        feat16 = self.layer3(feat8)
        if not pool32:
            return feat8, feat16, self.layer4(feat16)
        out = self.layer4(feat16, pool=True)
        if not (isinstance(out, tuple) and len(out) == 2):  # e.g. a forward hook on layer4 replaced the output
            raise TypeError(f"layer4(x, pool=True) must return (feat32, pixel sums), got {type(out).__name__}: a "
                            "forward hook on layer4 sees and must return that pair")
        return feat8, feat16, *out


BACKBONES: dict[str, tuple[type[BasicBlock | Bottleneck], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


def build_backbone(name: str) -> ResNet:
    """A randomly initialised ResNet by name (one of :data:`BACKBONES`)."""
    if name not in BACKBONES:
        raise ValueError(f"backbone must be one of {tuple(BACKBONES)}, got {name!r}")
    block, layers = BACKBONES[name]
    return ResNet(block, layers)
