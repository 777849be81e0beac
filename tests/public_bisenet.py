"""An independent, plain-PyTorch transcription of the public BiSeNetV1 layouts, for parity tests.

Written the way the public repositories write it (scale-factor upsampling, ``nn.Upsample`` heads,
``F.avg_pool2d`` in face-parsing), sharing no code with fastbisenet, so the tests compare two
implementations rather than one with itself. It accepts only H, W divisible by 32, like the originals.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CBR(nn.Module):
    def __init__(self, cin, cout, ks=3, stride=1, padding=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, ks, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class Block(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if cin != cout or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        residual = F.relu(self.bn1(self.conv1(x)))
        residual = self.bn2(self.conv2(residual))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


class Resnet18(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(Block(64, 64), Block(64, 64))
        self.layer2 = nn.Sequential(Block(64, 128, 2), Block(128, 128))
        self.layer3 = nn.Sequential(Block(128, 256, 2), Block(256, 256))
        self.layer4 = nn.Sequential(Block(256, 512, 2), Block(512, 512))

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        feat8 = self.layer2(self.layer1(x))
        feat16 = self.layer3(feat8)
        return feat8, feat16, self.layer4(feat16)


class ARM(nn.Module):
    def __init__(self, cin, cout, face=False):
        super().__init__()
        self.face = face
        self.conv = CBR(cin, cout)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x):
        feat = self.conv(x)
        if self.face:
            atten = F.avg_pool2d(feat, feat.size()[2:])
        else:
            atten = torch.mean(feat, dim=(2, 3), keepdim=True)
        atten = torch.sigmoid(self.bn_atten(self.conv_atten(atten)))
        return torch.mul(feat, atten)


class ContextPathV1(nn.Module):
    def __init__(self):
        super().__init__()
        self.resnet = Resnet18()
        self.arm16 = ARM(256, 128)
        self.arm32 = ARM(512, 128)
        self.conv_head32 = CBR(128, 128)
        self.conv_head16 = CBR(128, 128)
        self.conv_avg = CBR(512, 128, 1, 1, 0)
        self.up32 = nn.Upsample(scale_factor=2.0)
        self.up16 = nn.Upsample(scale_factor=2.0)

    def forward(self, x):
        _, feat16, feat32 = self.resnet(x)
        avg = self.conv_avg(torch.mean(feat32, dim=(2, 3), keepdim=True))
        feat32_sum = self.arm32(feat32) + avg
        feat32_up = self.conv_head32(self.up32(feat32_sum))
        feat16_sum = self.arm16(feat16) + feat32_up
        feat16_up = self.conv_head16(self.up16(feat16_sum))
        return feat16_up, feat32_up


class ContextPathFace(nn.Module):
    def __init__(self):
        super().__init__()
        self.resnet = Resnet18()
        self.arm16 = ARM(256, 128, face=True)
        self.arm32 = ARM(512, 128, face=True)
        self.conv_head32 = CBR(128, 128)
        self.conv_head16 = CBR(128, 128)
        self.conv_avg = CBR(512, 128, 1, 1, 0)

    def forward(self, x):
        feat8, feat16, feat32 = self.resnet(x)
        h8, w8 = feat8.size()[2:]
        h16, w16 = feat16.size()[2:]
        h32, w32 = feat32.size()[2:]
        avg = self.conv_avg(F.avg_pool2d(feat32, feat32.size()[2:]))
        avg_up = F.interpolate(avg, (h32, w32), mode="nearest")
        feat32_up = F.interpolate(self.arm32(feat32) + avg_up, (h16, w16), mode="nearest")
        feat32_up = self.conv_head32(feat32_up)
        feat16_up = F.interpolate(self.arm16(feat16) + feat32_up, (h8, w8), mode="nearest")
        return feat8, self.conv_head16(feat16_up), feat32_up


class SpatialPath(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = CBR(3, 64, 7, 2, 3)
        self.conv2 = CBR(64, 64, 3, 2, 1)
        self.conv3 = CBR(64, 64, 3, 2, 1)
        self.conv_out = CBR(64, 128, 1, 1, 0)

    def forward(self, x):
        return self.conv_out(self.conv3(self.conv2(self.conv1(x))))


class FFMV1(nn.Module):
    def __init__(self):
        super().__init__()
        self.convblk = CBR(256, 256, 1, 1, 0)
        self.conv = nn.Conv2d(256, 256, 1, bias=False)
        self.bn = nn.BatchNorm2d(256)

    def forward(self, fsp, fcp):
        feat = self.convblk(torch.cat([fsp, fcp], dim=1))
        atten = torch.sigmoid(self.bn(self.conv(torch.mean(feat, dim=(2, 3), keepdim=True))))
        return torch.mul(feat, atten) + feat


class FFMFace(nn.Module):
    def __init__(self):
        super().__init__()
        self.convblk = CBR(256, 256, 1, 1, 0)
        self.conv1 = nn.Conv2d(256, 64, 1, bias=False)
        self.conv2 = nn.Conv2d(64, 256, 1, bias=False)

    def forward(self, fsp, fcp):
        feat = self.convblk(torch.cat([fsp, fcp], dim=1))
        atten = F.avg_pool2d(feat, feat.size()[2:])
        atten = torch.sigmoid(self.conv2(F.relu(self.conv1(atten))))
        return torch.mul(feat, atten) + feat


class OutputV1(nn.Module):
    def __init__(self, cin, mid, n, up):
        super().__init__()
        self.conv = CBR(cin, mid)
        self.conv_out = nn.Conv2d(mid, n, 1, bias=True)
        self.up = nn.Upsample(scale_factor=up, mode="bilinear", align_corners=False)

    def forward(self, x):
        return self.up(self.conv_out(self.conv(x)))


class OutputFace(nn.Module):
    def __init__(self, cin, mid, n):
        super().__init__()
        self.conv = CBR(cin, mid)
        self.conv_out = nn.Conv2d(mid, n, 1, bias=False)

    def forward(self, x):
        return self.conv_out(self.conv(x))


class PublicBiSeNetV1(nn.Module):
    def __init__(self, n, aux_mode="train"):
        super().__init__()
        self.aux_mode = aux_mode
        self.cp = ContextPathV1()
        self.sp = SpatialPath()
        self.ffm = FFMV1()
        self.conv_out = OutputV1(256, 256, n, 8)
        if aux_mode == "train":
            self.conv_out16 = OutputV1(128, 64, n, 8)
            self.conv_out32 = OutputV1(128, 64, n, 16)

    def forward(self, x):
        feat_cp8, feat_cp16 = self.cp(x)
        feat_fuse = self.ffm(self.sp(x), feat_cp8)
        out = self.conv_out(feat_fuse)
        if self.aux_mode == "train":
            return out, self.conv_out16(feat_cp8), self.conv_out32(feat_cp16)
        if self.aux_mode == "eval":
            return (out,)
        return out.argmax(dim=1)


class PublicBiSeNetFace(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.cp = ContextPathFace()
        self.ffm = FFMFace()
        self.conv_out = OutputFace(256, 256, n)
        self.conv_out16 = OutputFace(128, 64, n)
        self.conv_out32 = OutputFace(128, 64, n)

    def forward(self, x):
        h, w = x.size()[2:]
        feat_res8, feat_cp8, feat_cp16 = self.cp(x)
        feat_fuse = self.ffm(feat_res8, feat_cp8)
        outs = (self.conv_out(feat_fuse), self.conv_out16(feat_cp8), self.conv_out32(feat_cp16))
        return tuple(F.interpolate(o, (h, w), mode="bilinear", align_corners=True) for o in outs)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and BN buffer random, well-scaled values (so BN is not the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model
