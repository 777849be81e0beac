"""The reference model (backend="torch"): layouts, parity with the public implementations, inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from public_bisenet import PublicBiSeNetFace, PublicBiSeNetV1, randomize_
from torch import nn

from fastbisenet import BiSeNet
from fastbisenet.model import count_parameters
from fastbisenet.nn import AttentionRefinement, FeatureFusion, SegmentationHead

BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def torchvision_resnet_keys(layers: tuple[int, ...], bottleneck: bool) -> set[str]:
    """torchvision's ResNet state_dict keys without ``fc``, written out independently."""
    keys = {"conv1.weight"} | {f"bn1.{k}" for k in BN_KEYS}
    n_conv = 3 if bottleneck else 2
    for i, depth in enumerate(layers):
        for j in range(depth):
            p = f"layer{i + 1}.{j}"
            for c in range(1, n_conv + 1):
                keys |= {f"{p}.conv{c}.weight"} | {f"{p}.bn{c}.{k}" for k in BN_KEYS}
            if j == 0 and (i > 0 or bottleneck):
                keys |= {f"{p}.downsample.0.weight"} | {f"{p}.downsample.1.{k}" for k in BN_KEYS}
    return keys


def cbr_keys(name: str) -> set[str]:
    return {f"{name}.conv.weight"} | {f"{name}.bn.{k}" for k in BN_KEYS}


def expected_keys(preset: str, aux: bool, layers=(2, 2, 2, 2), bottleneck=False) -> set[str]:
    keys = {f"cp.resnet.{k}" for k in torchvision_resnet_keys(layers, bottleneck)}
    for arm in ("cp.arm16", "cp.arm32"):
        keys |= cbr_keys(f"{arm}.conv") | {f"{arm}.conv_atten.weight"} | {f"{arm}.bn_atten.{k}" for k in BN_KEYS}
    keys |= cbr_keys("cp.conv_head32") | cbr_keys("cp.conv_head16") | cbr_keys("cp.conv_avg")
    keys |= cbr_keys("ffm.convblk")
    if preset == "v1":
        keys |= set().union(*(cbr_keys(f"sp.{c}") for c in ("conv1", "conv2", "conv3", "conv_out")))
        keys |= {"ffm.conv.weight"} | {f"ffm.bn.{k}" for k in BN_KEYS}
    else:
        keys |= {"ffm.conv1.weight", "ffm.conv2.weight"}
    heads = ("conv_out", "conv_out16", "conv_out32") if aux else ("conv_out",)
    for h in heads:
        keys |= cbr_keys(f"{h}.conv") | {f"{h}.conv_out.weight"}
        if preset == "v1":
            keys.add(f"{h}.conv_out.bias")
    return keys


@pytest.mark.parametrize("aux_mode", ["train", "eval", "pred"])
def test_v1_resnet18_counts_match_public(aux_mode):
    m = BiSeNet(19, aux_mode)
    n_params, n_entries = (13_425_721, 222) if aux_mode == "train" else (13_275_539, 206)
    assert count_parameters(m) == n_params
    assert len(m.state_dict()) == n_entries


@pytest.mark.parametrize("preset", ["v1", "face-parsing"])
@pytest.mark.parametrize("aux_mode", ["train", "eval", "pred"])
@pytest.mark.parametrize(
    "backbone,layers,bottleneck",
    [("resnet18", (2, 2, 2, 2), False), ("resnet34", (3, 4, 6, 3), False),
     ("resnet50", (3, 4, 6, 3), True), ("resnet101", (3, 4, 23, 3), True)],
)
def test_state_dict_keys(preset, aux_mode, backbone, layers, bottleneck):
    m = BiSeNet(5, aux_mode, preset=preset, backbone=backbone)
    assert set(m.state_dict()) == expected_keys(preset, aux_mode == "train", layers, bottleneck)
    sd = m.state_dict()
    c16, c32 = (1024, 2048) if bottleneck else (256, 512)
    assert sd["cp.arm16.conv.conv.weight"].shape == (128, c16, 3, 3)
    assert sd["cp.arm32.conv.conv.weight"].shape == (128, c32, 3, 3)
    assert sd["cp.conv_avg.conv.weight"].shape == (128, c32, 1, 1)
    assert sd["conv_out.conv_out.weight"].shape == (5, 256, 1, 1)


def test_face_parsing_shapes():
    sd = BiSeNet(19, preset="face-parsing").state_dict()
    assert sd["ffm.conv1.weight"].shape == (64, 256, 1, 1)
    assert sd["ffm.conv2.weight"].shape == (256, 64, 1, 1)
    assert sd["conv_out16.conv.conv.weight"].shape == (64, 128, 3, 3)
    assert "conv_out.conv_out.bias" not in sd


def _loaded_pair(public: nn.Module, ours: BiSeNet, seed: int = 0):
    randomize_(public, seed)
    ours.load_state_dict(public.state_dict(), strict=True)
    return public.eval(), ours.eval()


@pytest.mark.parametrize("aux_mode", ["train", "eval", "pred"])
def test_v1_matches_public_implementation(aux_mode):
    public, ours = _loaded_pair(PublicBiSeNetV1(7, aux_mode), BiSeNet(7, aux_mode, backend="torch"))
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        want, got = public(x), ours(x)
    if aux_mode == "pred":
        assert got.dtype == torch.int32 and got.shape == (2, 64, 96)
        torch.testing.assert_close(got, want.to(torch.int32), rtol=0, atol=0)
    else:
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_v1_train_mode_forward_backward_matches_public():
    public, ours = _loaded_pair(PublicBiSeNetV1(4, "train"), BiSeNet(4, "train", backend="torch"), seed=3)
    public.train()
    ours.train()
    x = torch.randn(2, 3, 64, 64)
    want, got = public(x), ours(x)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    sum(o.square().mean() for o in want).backward()
    sum(o.square().mean() for o in got).backward()
    theirs = dict(public.named_parameters())
    for name, p in ours.named_parameters():
        # fp32 sums in another order (e.g. one thread): atol relative to the gradient's largest element
        ref = theirs[name].grad
        torch.testing.assert_close(p.grad, ref, rtol=1e-5, atol=1e-6 * (1 + ref.abs().max().item()), msg=name)
    their_bufs = dict(public.named_buffers())
    for name, b in ours.named_buffers():
        torch.testing.assert_close(b, their_bufs[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_training_under_autocast_casts_the_image_once(backend, device):
    """Both 7x7 stems read the image: under autocast it is cast once (and one copy is saved for backward);
    on the reference backend with exactly the outputs autocast gives the public model."""
    from torch.utils._python_dispatch import TorchDispatchMode

    image_casts = []

    class Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            src = args[0] if args else None
            if func.overloadpacket.__name__ == "_to_copy" and getattr(src, "shape", None) == x.shape:
                image_casts.append((src.dtype, (kwargs or {}).get("dtype")))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    public = PublicBiSeNetV1(5, "train")
    randomize_(public)
    model = BiSeNet(5, "train", backend=backend)
    model.load_state_dict(public.state_dict())
    public, model = public.to(device), model.to(device)
    x = torch.randn(2, 3, 64, 96, device=device)
    with torch.autocast(x.device.type, dtype=torch.float16):
        ref = public(x)
        with Casts():
            out = model(x)
    assert image_casts == [(torch.float32, torch.float16)]
    if backend == "torch":  # the same casts as autocast's own, once: the same outputs, bit for bit
        for o, r in zip(out, ref, strict=True):
            torch.testing.assert_close(o, r, rtol=0, atol=0)
    else:  # fp16 kernels at batch 2 in train mode: values are the fused parity tests' business
        assert all(o.dtype == torch.float16 and torch.isfinite(o).all() for o in out)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backbone_pool32_returns_the_stride32_sums_and_stage_hooks_fire(backend, device):
    """``pool32=True`` (the context path's call) returns the same features plus ``feat32``'s pixel sums from the
    last block's fused conv (``None`` on the reference ops); the stage still runs as a module (hooks fire)."""
    from fastbisenet.backbones import build_backbone

    torch.manual_seed(0)
    net = build_backbone("resnet18").to(device).eval()
    for m in net.modules():  # (BiSeNet.backend does this for a whole model)
        if hasattr(type(m), "backend"):
            m.backend = backend
    outputs = []
    net.layer4.register_forward_hook(lambda module, args, out: outputs.append(out))
    x = torch.randn(2, 3, 64, 96, device=device)
    with torch.no_grad():
        feats = net(x)
        *same, sums = net(x, pool32=True)
    assert len(feats) == 3 and len(outputs) == 2
    for got, want in zip(same, feats, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    if backend == "torch":
        assert sums is None
    else:
        feat32 = feats[2]
        assert sums.dtype == torch.float32 and sums.shape[1:] == feat32.shape[:2]
        torch.testing.assert_close(sums.sum(0), feat32.double().sum((2, 3)).float(), rtol=1e-5, atol=1e-4)


def test_face_parsing_matches_public_implementation():
    public, ours = _loaded_pair(PublicBiSeNetFace(19), BiSeNet(19, preset="face-parsing", backend="torch"))
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        want, got = public(x), ours(x)
    for g, w in zip(got, want, strict=True):
        # avg_pool2d and mean round differently in the last bit; logits here are O(100).
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6 * w.abs().max().item())


@pytest.mark.parametrize("size", [(70, 90), (33, 47), (32, 32), (97, 45)])
@pytest.mark.parametrize("preset", ["v1", "face-parsing"])
def test_any_size_at_least_32(size, preset):
    m = BiSeNet(3, "train", preset=preset).eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        outs = m(x)
        pred = BiSeNet(3, "pred", preset=preset).eval()(x)
    assert all(o.shape == (1, 3, *size) and torch.isfinite(o).all() for o in outs)
    assert pred.shape == (1, *size) and pred.dtype == torch.int32


def test_pred_is_argmax_of_eval_logits_and_channels_last_input_agrees():
    m = randomize_(BiSeNet(5, "eval")).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        (logits,) = m(x)
        m.aux_mode = "pred"
        pred = m(x)
        pred_cl = m(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(pred, logits.argmax(1).to(torch.int32), rtol=0, atol=0)
    torch.testing.assert_close(pred_cl, pred, rtol=0, atol=0)


def _bn(c: int, seed: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.copy_(1 + 0.3 * torch.randn(c, generator=g))
        bn.bias.copy_(0.3 * torch.randn(c, generator=g))
        bn.running_mean.copy_(0.2 * torch.randn(c, generator=g))
        bn.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return bn


def _bn_eval(y: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    shape = (1, -1, 1, 1)
    inv = (bn.running_var + bn.eps).rsqrt().view(shape)
    return (y - bn.running_mean.view(shape)) * inv * bn.weight.view(shape) + bn.bias.view(shape)


def test_attention_refinement_formula():
    arm = AttentionRefinement(6, 5).eval()
    arm.conv.bn.load_state_dict(_bn(5, 1).state_dict())
    arm.bn_atten.load_state_dict(_bn(5, 2).state_dict())
    x = torch.randn(2, 6, 9, 11)
    with torch.no_grad():
        feat = F.relu(_bn_eval(F.conv2d(x, arm.conv.conv.weight, padding=1), arm.conv.bn))
        gap = feat.sum(dim=(2, 3), keepdim=True) / (9 * 11)
        a = 1 / (1 + torch.exp(-_bn_eval(F.conv2d(gap, arm.conv_atten.weight), arm.bn_atten)))
        got = arm.refine(x)
    torch.testing.assert_close(got, feat * a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attention", ["bn", "mlp"])
def test_feature_fusion_formula(attention):
    ffm = FeatureFusion(12, 8, attention=attention).eval()
    ffm.convblk.bn.load_state_dict(_bn(8, 3).state_dict())
    if attention == "bn":
        ffm.bn.load_state_dict(_bn(8, 4).state_dict())
    sp, cp = torch.randn(3, 5, 7, 10), torch.randn(3, 7, 7, 10)
    with torch.no_grad():
        w = ffm.convblk.conv.weight[:, :, 0, 0]
        y = torch.einsum("oc,nchw->nohw", w[:, :5], sp) + torch.einsum("oc,nchw->nohw", w[:, 5:], cp)
        f = F.relu(_bn_eval(y, ffm.convblk.bn))
        gap = f.mean(dim=(2, 3))
        if attention == "bn":
            z = _bn_eval((gap @ ffm.conv.weight[:, :, 0, 0].T)[:, :, None, None], ffm.bn)
        else:
            hidden = F.relu(gap @ ffm.conv1.weight[:, :, 0, 0].T)
            z = (hidden @ ffm.conv2.weight[:, :, 0, 0].T)[:, :, None, None]
        want = f * (1 + torch.sigmoid(z))
        got = ffm(sp, cp)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("align_corners", [False, True])
def test_segmentation_head_formula(align_corners):
    head = SegmentationHead(6, 4, 3, align_corners=align_corners).eval()
    head.conv.bn.load_state_dict(_bn(4, 5).state_dict())
    nn.init.normal_(head.conv_out.bias)
    x = torch.randn(2, 6, 5, 7)
    size = (40, 56)
    with torch.no_grad():
        mid = F.relu(_bn_eval(F.conv2d(x, head.conv.conv.weight, padding=1), head.conv.bn))
        logits = F.conv2d(mid, head.conv_out.weight, head.conv_out.bias)
        # Bilinear resize written out: separable interpolation matrices.
        def interp_matrix(n_in, n_out):
            m = torch.zeros(n_out, n_in)
            for o in range(n_out):
                if align_corners:
                    src = o * (n_in - 1) / (n_out - 1)
                else:
                    src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
                i0 = min(math.floor(src), n_in - 1)
                i1 = min(i0 + 1, n_in - 1)
                t = src - i0
                m[o, i0] += 1 - t
                m[o, i1] += t
            return m
        want = torch.einsum("yh,nchw,xw->ncyx", interp_matrix(5, 40), logits, interp_matrix(7, 56))
        got = head(x, size)
        pred = head.predict(x, size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pred, got.argmax(1).to(torch.int32), rtol=0, atol=0)


def test_nearest_by_size_equals_scale_factor_when_sizes_divide():
    x = torch.randn(2, 3, 5, 7)
    torch.testing.assert_close(
        F.interpolate(x, size=(10, 14), mode="nearest"), F.interpolate(x, scale_factor=2.0), rtol=0, atol=0
    )


def test_init_follows_public_model():
    m = BiSeNet(19)
    w = m.cp.conv_head32.conv.weight  # kaiming normal a=1: std = sqrt(2 / (1 + 1) / fan_in)
    assert abs(w.std().item() - (1 / (128 * 9)) ** 0.5) < 0.05 * (1 / (128 * 9)) ** 0.5
    assert torch.count_nonzero(m.conv_out.conv_out.bias) == 0
    bn = m.sp.conv1.bn
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


@pytest.mark.parametrize(
    "x,match",
    [
        (torch.randn(1, 3, 31, 64), "at least 32"),
        (torch.randn(1, 3, 64, 16), "at least 32"),
        (torch.randn(1, 4, 64, 64), "3 channels"),
        (torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8), "floating-point"),
        (torch.randn(3, 64, 64), "4-D"),
        (torch.randn(0, 3, 64, 64), "empty"),
        (torch.randn(1, 3, 64, 64, dtype=torch.float16), "dtype torch.float16 does not match"),
        (torch.randn(1, 3, 64, 64, dtype=torch.float64), "dtype torch.float64 does not match"),
        (torch.randn(1, 3, 64, 64, device="meta"), "input is on meta"),
    ],
)
def test_bad_input_raises_value_error(x, match):
    with pytest.raises(ValueError, match=match):
        BiSeNet(2, "eval")(x)


def test_other_input_dtype_under_autocast_is_accepted():
    model = BiSeNet(2, "eval").eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        (out,) = model(torch.randn(1, 3, 64, 64, dtype=torch.bfloat16))
    assert out.shape == (1, 2, 64, 64)


def test_float64_model_under_autocast_stays_float64(device):
    """Autocast leaves float64 alone (PyTorch's rule): float64 logits from the reference ops, and the kernels,
    which take no float64, raise as they do outside autocast (they computed it in bf16)."""
    model = BiSeNet(2, "eval", backend="torch").double().to(device).eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64, device=device)
    with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        assert model(x)[0].dtype == torch.float64
        model.backend = "triton"
        with pytest.raises(ValueError, match="float64"):
            model(x)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"aux_mode": "infer"}, "aux_mode"), ({"preset": "v2"}, "preset"), ({"backbone": "vgg"}, "backbone"),
     ({"backend": "cuda"}, "backend"), ({"n_classes": 0}, "n_classes")],
)
def test_bad_arguments_raise(kwargs, match):
    args = {"n_classes": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        BiSeNet(**args)


def test_backend_switch_reaches_every_module():
    m = BiSeNet(3, backend="torch")
    m.backend = "auto"
    typed = [mod for mod in m.modules() if hasattr(type(mod), "backend") and mod is not m]
    assert typed and all(mod.backend == "auto" for mod in typed)
    with pytest.raises(ValueError, match="backend"):
        m.backend = "cudnn"
    m.backend = "torch"  # a head assigned later (fine-tuning) takes the model's backend
    m.conv_out = type(m.conv_out)(256, 256, 7, bias=True, align_corners=False)
    assert all(mod.backend == "torch" for mod in m.conv_out.modules() if hasattr(type(mod), "backend"))


def test_forward_makes_the_input_device_current(monkeypatch):
    """Triton launches on the current CUDA device: the model enters its input's device when another is current."""
    import contextlib
    import types

    from fastbisenet import model as model_module

    entered = []

    @contextlib.contextmanager
    def fake_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    on_cuda1 = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    with model_module.on_device_of(on_cuda1):
        pass
    assert entered == [torch.device("cuda", 1)]
    with model_module.on_device_of(types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))):
        pass
    with model_module.on_device_of(torch.zeros(1)):
        pass
    assert entered == [torch.device("cuda", 1)]
