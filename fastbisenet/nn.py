"""BiSeNet building blocks with the public checkpoints' parameter names.

Every module computes through :func:`fastbisenet.ops.impl`, which picks the Triton kernels or the
reference ops from the module's ``backend`` attribute (set for a whole model by ``BiSeNet.backend``).
"""

from __future__ import annotations

from torch import Tensor, nn

from fastbisenet import ops


def init_conv(conv: nn.Conv2d) -> None:
    """The public BiSeNet init: kaiming normal (a=1) weights, zero bias."""
    nn.init.kaiming_normal_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class ConvBNReLU(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU; keys ``conv.weight``, ``bn.*``."""

    backend: str = "auto"

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, padding: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        init_conv(self.conv)

    def forward(self, x: Tensor) -> Tensor:
        return ops.impl(self.backend, x).conv_bn_act(x, self.conv, self.bn)


class AttentionRefinement(nn.Module):
    """ARM: ``feat = CBR3x3(x)``; ``a = sigmoid(BN(1x1(mean_hw(feat))))``.

    :meth:`forward` returns ``(feat, a)`` rather than ``feat * a``, so that the consumer applies the
    channel multiply in its own pass (:meth:`ContextPath.forward`); :meth:`refine` gives ``feat * a``.
    The fused backend gathers the spatial mean of ``feat`` in the conv's own epilogue (``pool=True``),
    so the attention never re-reads ``feat``; ``self.conv`` is therefore run through its parts, not
    called (forward hooks on it do not fire).
    """

    backend: str = "auto"

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_ch, out_ch, 3, 1, 1)
        self.conv_atten = nn.Conv2d(out_ch, out_ch, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out_ch)
        init_conv(self.conv_atten)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        op = ops.impl(self.backend, x)
        feat, pooled = op.conv_bn_act(x, self.conv.conv, self.conv.bn, pool=True)
        return feat, op.bn_attention(feat, self.conv_atten, self.bn_atten, pooled=pooled)

    def refine(self, x: Tensor) -> Tensor:
        """The public module's output ``feat * a``."""
        feat, a = self(x)
        return feat * a


class FeatureFusion(nn.Module):
    """FFM: ``f = CBR1x1(cat(sp, cp))``, ``out = f * a + f`` with channel attention ``a``.

    ``attention="bn"`` (v1): ``a = sigmoid(BN(1x1(mean_hw(f))))`` with keys ``conv``, ``bn``.
    ``attention="mlp"`` (face-parsing): ``a = sigmoid(1x1(ReLU(1x1(mean_hw(f)))))``, reduction 4,
    keys ``conv1``, ``conv2``.

    The concat is never materialised and, in the fused backend, the spatial mean of ``f`` is gathered in
    the ``convblk`` epilogue (``pool=True``) and handed to the attention op.
    """

    backend: str = "auto"

    def __init__(self, in_ch: int, out_ch: int, attention: str = "bn") -> None:
        super().__init__()
        if attention not in ("bn", "mlp"):
            raise ValueError(f"attention must be 'bn' or 'mlp', got {attention!r}")
        self.attention = attention
        self.convblk = ConvBNReLU(in_ch, out_ch, 1, 1, 0)
        if attention == "bn":
            self.conv = nn.Conv2d(out_ch, out_ch, 1, bias=False)
            self.bn = nn.BatchNorm2d(out_ch)
            init_conv(self.conv)
        else:
            self.conv1 = nn.Conv2d(out_ch, out_ch // 4, 1, bias=False)
            self.conv2 = nn.Conv2d(out_ch // 4, out_ch, 1, bias=False)
            init_conv(self.conv1)
            init_conv(self.conv2)

    def forward(self, sp: Tensor, cp: Tensor) -> Tensor:
        op = ops.impl(self.backend, sp)
        f, pooled = op.concat_conv_bn_act([sp, cp], self.convblk.conv, self.convblk.bn, pool=True)
        if self.attention == "bn":
            a = op.bn_attention(f, self.conv, self.bn, pooled=pooled)
        else:
            a = op.mlp_attention(f, self.conv1, self.conv2, pooled=pooled)
        return op.attend_residual(f, a)


class SegmentationHead(nn.Module):
    """``conv`` = CBR3x3(in, mid), ``conv_out`` = 1x1(mid, n_classes), then bilinear resize.

    ``forward(x, size)`` returns logits at ``size`` (``forward(x, size, labels)`` their per-pixel
    cross-entropy); ``predict(x, size)`` the int32 argmax.
    """

    backend: str = "auto"

    def __init__(self, in_ch: int, mid_ch: int, n_classes: int, *, bias: bool = True, align_corners: bool = False):
        super().__init__()
        self.align_corners = align_corners
        self.conv = ConvBNReLU(in_ch, mid_ch, 3, 1, 1)
        self.conv_out = nn.Conv2d(mid_ch, n_classes, 1, bias=bias)
        init_conv(self.conv_out)

    def forward(self, x: Tensor, size: tuple[int, int], labels: Tensor | None = None,
                ignore_index: int = 255) -> Tensor:
        """Logits at ``size``; with ``labels`` (N, *size) int64, their fp32 (N, H, W) per-pixel
        cross-entropy instead (the Triton backend never writes the full-resolution logits)."""
        if labels is not None and tuple(labels.shape[-2:]) != tuple(size):
            raise ValueError(f"labels of shape {tuple(labels.shape)} do not match the output size {tuple(size)}")
        x = self.conv(x)
        op = ops.impl(self.backend, x)
        if labels is not None:
            return op.head_cross_entropy(x, self.conv_out, labels, self.align_corners, ignore_index)
        return op.head_logits(x, self.conv_out, size, self.align_corners)

    def predict(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        x = self.conv(x)
        return ops.impl(self.backend, x).head_argmax(x, self.conv_out, size, self.align_corners)


class SpatialPath(nn.Module):
    """Three strided CBRs (7x7, 3x3, 3x3) then a 1x1 CBR to 128 channels: stride 8."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(3, 64, 7, 2, 3)
        self.conv2 = ConvBNReLU(64, 64, 3, 2, 1)
        self.conv3 = ConvBNReLU(64, 64, 3, 2, 1)
        self.conv_out = ConvBNReLU(64, 128, 1, 1, 0)

    def forward(self, x: Tensor, stem: Tensor | None = None) -> Tensor:
        """``stem``: ``conv1(x)`` when the caller has computed it already."""
        return self.conv_out(self.conv3(self.conv2(self.conv1(x) if stem is None else stem)))


class ContextPath(nn.Module):
    """Backbone + ARMs + global context; returns ``(feat8, feat_cp8, feat_cp16)``.

    ``feat32_sum = arm32(feat32) + conv_avg(mean_hw(feat32))``, resized to feat16's size,
    ``feat_cp16 = conv_head32(...)``; ``feat16_sum = arm16(feat16) + feat_cp16``, resized to feat8's
    size, ``feat_cp8 = conv_head16(...)``. Resizing is by target size (nearest by default), which is
    the public model's 2x upsampling whenever the sizes divide.

    ``conv_avg`` (CBR 1x1 on the pooled vector) runs as the op ``global_context``, through its parts
    (forward hooks on ``conv_avg`` do not fire): on the fused backend the pixel sums of ``feat32`` come
    from the epilogue of the backbone's last conv and pool + 1x1 + BN + ReLU is one small kernel.
    """

    backend: str = "auto"

    def __init__(self, resnet: nn.Module, channels: tuple[int, int, int], *, mode: str = "nearest",
                 align_corners: bool | None = None) -> None:
        super().__init__()
        _, c16, c32 = channels
        self.resnet = resnet
        self.arm16 = AttentionRefinement(c16, 128)
        self.arm32 = AttentionRefinement(c32, 128)
        self.conv_head32 = ConvBNReLU(128, 128, 3, 1, 1)
        self.conv_head16 = ConvBNReLU(128, 128, 3, 1, 1)
        self.conv_avg = ConvBNReLU(c32, 128, 1, 1, 0)
        self.mode = mode
        self.align_corners = align_corners

    def forward(self, x: Tensor, stem: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``stem``: the backbone's stem conv + BN + ReLU of ``x`` when the caller has computed it already."""
        feat8, feat16, feat32, sums32 = self.resnet(x, stem=stem, pool32=True)
        op = ops.impl(self.backend, x)
        avg = op.global_context(feat32, self.conv_avg.conv, self.conv_avg.bn, pooled=sums32)
        arm32, a32 = self.arm32(feat32)
        up32 = op.attend_add_upsample(arm32, a32, avg, feat16.shape[-2:], self.mode, self.align_corners)
        feat_cp16 = self.conv_head32(up32)
        arm16, a16 = self.arm16(feat16)
        up16 = op.attend_add_upsample(arm16, a16, feat_cp16, feat8.shape[-2:], self.mode, self.align_corners)
        feat_cp8 = self.conv_head16(up16)
        return feat8, feat_cp8, feat_cp16
