"""Every autotune config of every kernel gives the reference's result, not only the one autotuning picks.

Autotuning keeps the fastest config per shape, so the other tests exercise one config per kernel; a config
that miscompiles (e.g. ``num_warps=8`` around a flattened-K loop, pytorch issue 173068) would wait for
another shape or GPU. Here each config is forced in turn (``Autotuner.configs = [config]``) and the ops
that launch the kernel are checked against float64 references. Under the interpreter each kernel has one
config, so this checks the harness; on a GPU it checks every config, compiled.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import pkgutil
from collections.abc import Callable, Iterator

import pytest
import torch
import triton
from conftest import cudnn_tf32
from fastbisenet.kernels import attend_add_upsample as k_up
from fastbisenet.kernels import attend_residual as k_res
from fastbisenet.kernels import channel_attention as k_att
from fastbisenet.kernels import conv_bn as k_conv
from fastbisenet.kernels import head_cross_entropy as k_hce
from fastbisenet.kernels import head_upsample as k_head
from fastbisenet.kernels import max_pool as k_pool
from torch import nn
from triton.runtime.autotuner import Autotuner

from fastbisenet import kernels, reference
from fastbisenet.ops import attend_add_upsample as o_up
from fastbisenet.ops import attend_residual as o_res
from fastbisenet.ops import channel_attention as o_att
from fastbisenet.ops import conv_bn as o_conv
from fastbisenet.ops import head_cross_entropy as o_hce
from fastbisenet.ops import head_upsample as o_head
from fastbisenet.ops import max_pool as o_pool

# fp32 on a GPU runs tf32 dots here (PyTorch's default for convs, see _ieee_fp32 below); the interpreter's dots
# are exact fp32.
REL_TOL = 1e-4 if kernels.INTERPRET else 1e-2


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """Overrides conftest's fixture of that name: the forced configs compile and run as a GPU runs fp32 convs
    by default, with TF32 dots (the IEEE variants are what the other fp32 tests run)."""
    with cudnn_tf32(True):
        yield


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def fwd_bwd(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor, params: tuple = ()) -> list[torch.Tensor]:
    """Output and the gradients of every input and parameter for a fixed random output gradient."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(out)
    grads = torch.autograd.grad(out, [*inputs, *params], g)
    return [out.detach(), *grads]


def compare(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.shape == b.shape, (what, i)
        assert rel_err(a, b) < REL_TOL, (what, i, rel_err(a, b))


def _conv_fwd_bwd(op, conv: nn.Conv2d, bn: nn.BatchNorm2d, *inputs: torch.Tensor) -> list[torch.Tensor]:
    return fwd_bwd(lambda x, *res: op(x, conv, bn, residual=res[0] if res else None), *inputs,
                   params=(conv.weight, bn.weight, bn.bias))


def conv_case(device: str) -> None:
    for cin, k, stride, train, res in [(3, 7, 2, True, False), (40, 3, 1, True, True), (20, 3, 2, False, True),
                                       (24, 1, 1, False, False)]:
        conv = nn.Conv2d(cin, 24, k, stride, k // 2, bias=False).to(device)
        bn = nn.BatchNorm2d(24).to(device).train(train)
        with torch.no_grad():
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
        conv64, bn64 = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()
        x = torch.randn(2, cin, 13, 11, device=device)
        ho = (13 + 2 * (k // 2) - k) // stride + 1
        wo = (11 + 2 * (k // 2) - k) // stride + 1
        r = torch.randn(2, 24, ho, wo, device=device) if res else None
        inputs = [x, r] if res else [x]
        got = _conv_fwd_bwd(o_conv.conv_bn_act, conv, bn, *inputs)
        want = _conv_fwd_bwd(reference.conv_bn_act, conv64, bn64, *(t.double() for t in inputs))
        compare(got, want, f"conv cin={cin} k={k} s={stride} train={train} res={res}")
        compare(_pooled_arm(o_conv.conv_bn_act, o_att.bn_attention, conv, bn, *inputs),
                _pooled_arm(reference.conv_bn_act, reference.bn_attention, conv64, bn64, *(t.double() for t in inputs)),
                f"pooled conv + attention cin={cin} k={k} s={stride} train={train} res={res}")


def _pooled_arm(conv_op, attention_op, conv: nn.Conv2d, bn: nn.BatchNorm2d, *inputs: torch.Tensor):
    """``feat * attention(feat)`` with the mean taken from the conv's pixel sums (``pool=True``): exercises
    the POOL epilogue (eval) / BN pass (train) and the sums' gradient in the conv backward."""
    att = nn.Conv2d(conv.out_channels, conv.out_channels, 1, bias=False).to(conv.weight)
    with torch.no_grad():
        att.weight.copy_(torch.randn(att.weight.shape, generator=torch.Generator().manual_seed(3)))
    att_bn = nn.BatchNorm2d(conv.out_channels).to(conv.weight).eval()  # batch stats over N=2: ill-conditioned

    def arm(x, *res):
        feat, pooled = conv_op(x, conv, bn, residual=res[0] if res else None, pool=True)
        return feat * attention_op(feat, att, att_bn, pooled=pooled)

    return fwd_bwd(arm, *inputs, params=(conv.weight, bn.weight, bn.bias))


def attention_case(device: str) -> None:
    feat = torch.randn(3, 40, 9, 13, device=device).to(memory_format=torch.channels_last)
    conv, bn = nn.Conv2d(40, 40, 1, bias=False).to(device), nn.BatchNorm2d(40).to(device).train()
    conv64, bn64 = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()
    compare(fwd_bwd(lambda f: o_att.bn_attention(f, conv, bn), feat, params=(conv.weight, bn.weight)),
            fwd_bwd(lambda f: reference.bn_attention(f, conv64, bn64), feat.double(),
                    params=(conv64.weight, bn64.weight)), "bn_attention")
    compare(fwd_bwd(o_att.mean_hw, feat), fwd_bwd(reference.mean_hw, feat.double()), "mean_hw")


def upsample_case(device: str) -> None:
    x = torch.randn(2, 24, 7, 9, device=device).to(memory_format=torch.channels_last)
    a = torch.rand(2, 24, 1, 1, device=device)
    for mode, ac, other_shape in [("nearest", None, (2, 24, 1, 1)), ("bilinear", False, (2, 24, 7, 9)),
                                  ("bilinear", True, (2, 24, 1, 1))]:
        other = torch.randn(other_shape, device=device)
        got = fwd_bwd(functools.partial(o_up.attend_add_upsample, size=(13, 18), mode=mode, align_corners=ac),
                      x, a, other)
        want = fwd_bwd(functools.partial(reference.attend_add_upsample, size=(13, 18), mode=mode, align_corners=ac),
                       x.double(), a.double(), other.double())
        compare(got, want, f"attend_add_upsample {mode} {ac}")


def residual_case(device: str) -> None:
    f = torch.randn(2, 40, 9, 13, device=device).to(memory_format=torch.channels_last)
    a = torch.rand(2, 40, 1, 1, device=device)
    compare(fwd_bwd(o_res.attend_residual, f, a), fwd_bwd(reference.attend_residual, f.double(), a.double()),
            "attend_residual")


def head_case(device: str) -> None:
    x = torch.randn(2, 24, 6, 7, device=device).to(memory_format=torch.channels_last)
    conv = nn.Conv2d(24, 5, 1).to(device)
    conv64 = copy.deepcopy(conv).double()
    for ac in (False, True):
        got = fwd_bwd(functools.partial(o_head.head_logits, conv_out=conv, size=(48, 56), align_corners=ac), x,
                      params=(conv.weight, conv.bias))
        want = fwd_bwd(functools.partial(reference.head_logits, conv_out=conv64, size=(48, 56), align_corners=ac),
                       x.double(), params=(conv64.weight, conv64.bias))
        compare(got, want, f"head_logits {ac}")
        with torch.no_grad():
            labels = o_head.head_argmax(x, conv, (48, 56), ac)
            logits = reference.head_logits(x.double(), conv64, (48, 56), ac)
        picked = logits.gather(1, labels.long().unsqueeze(1)).squeeze(1)
        assert (logits.max(1).values - picked).max() <= 1e-3 * logits.abs().max(), f"head_argmax {ac}"
    head_ce_case(device)  # its backward's pass 2 is head_upsample's H reduction (pixel-major t)


def head_ce_case(device: str) -> None:
    # 40 low-res columns: several column blocks per row and several output-column chunks per block
    x = torch.randn(2, 24, 3, 40, device=device).to(memory_format=torch.channels_last)
    conv = nn.Conv2d(24, 19, 1).to(device)
    conv64 = copy.deepcopy(conv).double()
    labels = torch.randint(0, 19, (2, 11, 321), device=device)
    labels[0, 0] = 255
    for ac in (False, True):
        got = fwd_bwd(functools.partial(o_hce.head_cross_entropy, conv_out=conv, labels=labels, align_corners=ac,
                                        ignore_index=255), x, params=(conv.weight, conv.bias))
        want = fwd_bwd(functools.partial(reference.head_cross_entropy, conv_out=conv64, labels=labels,
                                         align_corners=ac, ignore_index=255),
                       x.double(), params=(conv64.weight, conv64.bias))
        compare(got, want, f"head_cross_entropy {ac}")


def max_pool_case(device: str) -> None:
    x = torch.randn(3, 70, 11, 13, device=device).to(memory_format=torch.channels_last)
    with torch.no_grad():
        got = o_pool.max_pool2d(x, 3, 2, 1)
    assert torch.equal(got.double().cpu(), reference.max_pool2d(x.double(), 3, 2, 1).cpu()), "max_pool2d"
    x = torch.relu(x)  # ties: the gradient goes to the first zero of all-zero windows
    compare(fwd_bwd(functools.partial(o_pool.max_pool2d, kernel_size=3, stride=2, padding=1), x),
            fwd_bwd(functools.partial(reference.max_pool2d, kernel_size=3, stride=2, padding=1), x.double()),
            "max_pool2d train")


CASES: dict[str, tuple[object, Callable[[str], None]]] = {
    "conv_bn": (k_conv, conv_case),
    "channel_attention": (k_att, attention_case),
    "attend_add_upsample": (k_up, upsample_case),
    "attend_residual": (k_res, residual_case),
    "head_upsample": (k_head, head_case),
    "head_cross_entropy": (k_hce, head_ce_case),
    "max_pool": (k_pool, max_pool_case),
}


def kernel_configs() -> Iterator[tuple[str, str, Autotuner, int]]:
    for module_name, (module, _) in CASES.items():
        for name in sorted(vars(module)):
            obj = getattr(module, name)
            if isinstance(obj, Autotuner):
                for i in range(len(obj.configs)):
                    yield module_name, name, obj, i


PARAMS = list(kernel_configs())


@contextlib.contextmanager
def forced(kernel: Autotuner, index: int) -> Iterator[list[int]]:
    """Run ``kernel`` with its config ``index`` only (a one-config autotuner does not benchmark); yields a
    list that counts the kernel's launches, so a case that never reaches the kernel is caught."""
    configs, cache = kernel.configs, kernel.cache
    launches: list[int] = []
    real_run = kernel.run

    def counting_run(*args, **kwargs):
        launches.append(1)
        return real_run(*args, **kwargs)

    kernel.configs, kernel.cache, kernel.run = [configs[index]], {}, counting_run
    try:
        yield launches
    finally:
        kernel.configs, kernel.cache = configs, cache
        del kernel.run  # back to the class's method


def test_every_kernel_module_has_autotuned_kernels():
    assert {p[0] for p in PARAMS} == set(CASES)
    # ... and every kernel module with an autotuned kernel has a case here
    modules = {m.name: importlib.import_module(f"fastbisenet.kernels.{m.name}")
               for m in pkgutil.iter_modules(kernels.__path__)}
    tuned = {name for name, m in modules.items() if any(isinstance(v, Autotuner) for v in vars(m).values())}
    assert tuned == set(CASES)


@pytest.mark.parametrize(("module_name", "kernel_name", "kernel", "index"), PARAMS,
                         ids=[f"{m}.{k}[{i}]" for m, k, _, i in PARAMS])
def test_forced_config_matches_reference(module_name, kernel_name, kernel, index, device, monkeypatch):
    module, case = CASES[module_name]
    torch.manual_seed(index)
    with forced(kernel, index) as launches:
        case(device)
    if not launches and kernels.INTERPRET:
        # a GPU-only launch (under the interpreter the launcher takes fixed, larger blocks, e.g. one window step
        # instead of several): take the GPU branch under the interpreter too
        # (the module's other autotuned kernels then take their GPU branch as well: one config each, no benchmark)
        monkeypatch.setattr(module, "INTERPRET", False)
        torch.manual_seed(index)
        with contextlib.ExitStack() as stack:
            for other in {id(p[2]): p[2] for p in PARAMS if p[0] == module_name and p[2] is not kernel}.values():
                stack.enter_context(forced(other, 0))
            launches = stack.enter_context(forced(kernel, index))
            case(device)
    assert launches, f"{kernel_name} was never launched by the {module_name} case"


def _tiles(configs: list) -> set[tuple[int, int, int]]:
    return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in configs}


def _loops(configs: list) -> set[bool]:
    return {c.kwargs["ONE_LOOP"] for c in configs}


def test_conv_config_pruning():
    """The forward conv's pre-autotune pruning drops exactly the configs the sm_90 compile audit rules out."""
    gpu = k_conv.gpu_fwd_configs()
    prune = k_conv._prune_fwd_configs
    bf16, fp32 = torch.empty(1, dtype=torch.bfloat16), torch.empty(1, dtype=torch.float32)
    k3, k1 = {"KH": 3, "KW": 3, "C_in": 128}, {"KH": 1, "KW": 1, "C_in": 128}
    assert prune(gpu, {"C_out": 256, "FLAT_C": 0, "x_ptr": bf16, **k3}) == gpu
    assert _tiles(gpu) == _tiles([c for c in gpu if c.kwargs["ONE_LOOP"]])  # every tile in both loop forms
    # 1x1 convs and the C_in < 32 stems keep the nested loop only (the one-loop form would be the same loop)
    assert _loops(prune(gpu, {"C_out": 256, "FLAT_C": 0, "x_ptr": bf16, **k1})) == {False}
    assert _loops(prune(gpu, {"C_out": 64, "FLAT_C": 3, "x_ptr": bf16, "KH": 7, "KW": 7, "C_in": 3})) == {False}
    assert _loops(prune(gpu, {"C_out": 64, "FLAT_C": 0, "x_ptr": bf16, "KH": 1, "KW": 3, "C_in": 64})) == {False, True}

    def forms(c_in: int) -> set[tuple[int, bool]]:  # (BLOCK_K, ONE_LOOP) kept for a 3x3 conv
        kept = prune(gpu, {"C_out": 256, "FLAT_C": 0, "x_ptr": bf16, "KH": 3, "KW": 3, "C_in": c_in})
        return {(c.kwargs["BLOCK_K"], c.kwargs["ONE_LOOP"]) for c in kept}

    # one channel step per tap: the one-loop form only; >= 8 steps: the nested form only; both in between
    assert forms(64) == {(32, False), (32, True), (64, True)}
    assert forms(256) == {(32, False), (64, False), (64, True)}
    assert forms(512) == {(32, False), (64, False)}
    # C_out = 64 (the 7x7 stem, ResNet stage 1): no 128-wide N tiles; C_out = 19 rounds up to 32
    assert {n for _, n, _ in _tiles(prune(gpu, {"C_out": 64, "FLAT_C": 0, "x_ptr": bf16, **k3}))} == {32, 64}
    assert {n for _, n, _ in _tiles(prune(gpu, {"C_out": 19, "FLAT_C": 0, "x_ptr": bf16, **k3}))} == {32}
    # fp32 (tf32 dots): no 128x128 tile, everything else stays
    assert _tiles(gpu) - _tiles(prune(gpu, {"C_out": 256, "FLAT_C": 0, "x_ptr": fp32, **k3})) == {(128, 128, 32),
                                                                                                  (128, 128, 64)}
    # the merged stems (C_in = 3, C_out = 128): no 128x128 tile, 64x128 stays
    stem = _tiles(prune(gpu, {"C_out": 128, "FLAT_C": 3, "x_ptr": bf16, "KH": 7, "KW": 7, "C_in": 3}))
    assert _tiles(gpu) - stem == {(128, 128, 32), (128, 128, 64)} and (64, 128, 32) in stem
    # a single forced config (as test_forced_config_matches_reference forces them) is never pruned away
    wide = [c for c in gpu if c.kwargs["BLOCK_N"] == 128 and c.kwargs["ONE_LOOP"]][:1]
    assert prune(wide, {"C_out": 16, "FLAT_C": 0, **k1}, x_ptr=bf16) == wide


def test_max_pool_config_pruning():
    """Training (ARGMAX) on fp32 drops the 64-pixel tiles that spilled for sm_90; nothing else changes."""
    tiles = [triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=w)
             for p, c, w in [(32, 64, 4), (64, 64, 4), (16, 128, 4), (64, 128, 8)]]
    prune = k_pool._prune_fwd_configs
    fp32, bf16 = torch.empty(1), torch.empty(1, dtype=torch.bfloat16)
    kept = prune(tiles, {"x_ptr": fp32, "ARGMAX": True})
    assert [(c.kwargs["BLOCK_P"], c.kwargs["BLOCK_C"]) for c in kept] == [(32, 64), (16, 128)]
    assert prune(tiles, {"x_ptr": bf16, "ARGMAX": True}) == tiles
    assert prune(tiles, {"x_ptr": fp32, "ARGMAX": False}) == tiles
    assert prune(tiles[1:2], {"x_ptr": fp32, "ARGMAX": True}) == tiles[1:2]  # a forced config stays


def test_attend_add_upsample_config_pruning():
    """Bilinear drops the tiles over 16 elements per thread that spilled for sm_90 (forward: 4-byte inputs only;
    backward: any dtype); nearest keeps every tile."""
    fwd = [triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=w)
           for p, c, w in [(32, 64, 4), (64, 64, 4), (32, 128, 4), (64, 128, 8)]]
    bwd = [triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=4) for p, c in [(32, 64), (64, 64), (16, 128)]]
    fp32, bf16 = torch.empty(1), torch.empty(1, dtype=torch.bfloat16)
    tiles = lambda configs: [(c.kwargs["BLOCK_P"], c.kwargs["BLOCK_C"]) for c in configs]
    assert tiles(k_up._prune_fwd_configs(fwd, {"x_ptr": fp32, "MODE": k_up.BILINEAR})) == [(32, 64)]
    assert k_up._prune_fwd_configs(fwd, {"x_ptr": bf16, "MODE": k_up.BILINEAR}) == fwd
    assert k_up._prune_fwd_configs(fwd, {"x_ptr": fp32, "MODE": k_up.NEAREST}) == fwd
    assert tiles(k_up._prune_bwd_configs(bwd, {"MODE": k_up.BILINEAR})) == [(32, 64), (16, 128)]
    assert k_up._prune_bwd_configs(bwd, {"MODE": k_up.NEAREST}) == bwd
    assert k_up._prune_bwd_configs(bwd[1:2], {"MODE": k_up.BILINEAR}) == bwd[1:2]  # a forced config stays

