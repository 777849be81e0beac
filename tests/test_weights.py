"""Checkpoint loading: public/DDP/training checkpoints, aux-head dropping, safety, backbone weights."""

from __future__ import annotations

import os

import pytest
import torch
from public_bisenet import Resnet18, randomize_

from fastbisenet import BiSeNet, load_backbone_weights, load_pretrained
from fastbisenet.backbones import build_backbone


def _same_state(a: torch.nn.Module, b: torch.nn.Module, skip: tuple[str, ...] = ()) -> None:
    sb = b.state_dict()
    for k, v in a.state_dict().items():
        if not k.startswith(skip):
            torch.testing.assert_close(v, sb[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("preset", ["v1", "face-parsing"])
@pytest.mark.parametrize("target_mode", ["train", "eval", "pred"])
def test_train_checkpoint_loads_into_every_mode(tmp_path, preset, target_mode):
    src = randomize_(BiSeNet(6, "train", preset=preset))
    path = tmp_path / "ckpt.pth"
    torch.save(src.state_dict(), path)
    dst = load_pretrained(BiSeNet(6, target_mode, preset=preset), path)
    _same_state(dst, src)
    n_aux = sum(k.startswith(("conv_out16.", "conv_out32.")) for k in src.state_dict())
    assert n_aux == (16 if preset == "v1" else 14)
    assert len(dst.state_dict()) == len(src.state_dict()) - (0 if target_mode == "train" else n_aux)


def test_ddp_prefix_and_nested_training_checkpoint(tmp_path):
    src = randomize_(BiSeNet(4, "train"))
    ddp = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, ddp)
    _same_state(load_pretrained(BiSeNet(4, "eval"), ddp), src)
    nested = tmp_path / "train_state.pth"
    torch.save({"model": src.state_dict(), "iteration": 12, "optimizer": {"state": {}}}, nested)
    _same_state(load_pretrained(BiSeNet(4, "train"), nested), src)


@pytest.mark.parametrize("nested", [False, True])
def test_load_model_reads_the_file_once(tmp_path, monkeypatch, nested):
    from fastbisenet.evaluate import load_model

    src = randomize_(BiSeNet(5, "train", preset="face-parsing"))
    path = tmp_path / "ckpt.pth"
    torch.save({"model": src.state_dict(), "meta": {"classes": list("abcde")}} if nested else src.state_dict(), path)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    model, meta = load_model(path, "eval")
    assert len(loads) == 1
    assert meta["preset"] == "face-parsing" and meta["n_classes"] == 5
    assert meta.get("classes") == (list("abcde") if nested else None)
    _same_state(model, src)


def test_mismatch_lists_missing_unexpected_and_shape(tmp_path):
    state = BiSeNet(4, "train").state_dict()
    state.pop("ffm.bn.weight")
    state["extra.weight"] = torch.zeros(1)
    state["conv_out.conv_out.weight"] = torch.zeros(9, 256, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        load_pretrained(BiSeNet(4, "train"), path)
    msg = str(err.value)
    assert "missing (1): ffm.bn.weight" in msg
    assert "unexpected (1): extra.weight" in msg
    assert "conv_out.conv_out.weight: checkpoint (9, 256, 1, 1) vs model (4, 256, 1, 1)" in msg


def test_aux_keys_are_not_dropped_for_a_train_model(tmp_path):
    state = BiSeNet(4, "eval").state_dict()  # lacks the aux heads a train model needs
    path = tmp_path / "eval.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing \(16\)"):
        load_pretrained(BiSeNet(4, "train"), path)


def test_only_aux_keys_are_dropped(tmp_path):
    state = BiSeNet(4, "train").state_dict()
    state["conv_out16_extra.weight"] = torch.zeros(1)  # looks like, but is not, an aux-head key
    path = tmp_path / "x.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"unexpected .*conv_out16_extra\.weight"):
        load_pretrained(BiSeNet(4, "eval"), path)


class _Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weights": _Payload()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_pretrained(BiSeNet(4, "eval"), path)


def test_missing_file_and_non_state_dict(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_pretrained(BiSeNet(4, "eval"), tmp_path / "nope.pth")
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="state_dict"):
        load_pretrained(BiSeNet(4, "eval"), path)
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(ValueError, match="is not a PyTorch checkpoint"):
        load_pretrained(BiSeNet(4, "eval"), text)


def test_torchvision_resnet_weights_into_backbone(tmp_path):
    tv = randomize_(Resnet18())  # torchvision key names
    state = dict(tv.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    model = load_backbone_weights(BiSeNet(19, "eval"), path)
    _same_state(model.cp.resnet, tv)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for got, want in zip(model.cp.resnet.eval()(x), tv.eval()(x), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_backbone_weights_without_batch_counters(tmp_path):
    """torchvision's ImageNet files predate BatchNorm's ``num_batches_tracked``: they load all the same (the
    model keeps its counters, as ``load_state_dict`` does), and nothing else may be missing."""
    tv = randomize_(Resnet18())
    state = {k: v for k, v in tv.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(state) == 100  # 102 keys of torchvision's resnet18 file, less fc.weight / fc.bias
    path = tmp_path / "resnet18-old.pth"
    torch.save(state, path)
    model = BiSeNet(19, "eval")
    with torch.no_grad():
        model.cp.resnet.bn1.num_batches_tracked.fill_(7)
    load_backbone_weights(model, path)
    torch.testing.assert_close(model.cp.resnet.layer1[0].bn1.running_var, tv.layer1[0].bn1.running_var)
    assert int(model.cp.resnet.bn1.num_batches_tracked) == 7
    del state["layer1.0.bn1.running_var"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing \(1\): layer1\.0\.bn1\.running_var$"):
        load_backbone_weights(BiSeNet(19, "eval"), path)
    full = {k: v for k, v in BiSeNet(19, "eval").state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(full, path)
    load_pretrained(BiSeNet(19, "eval"), path)  # whole-model checkpoints without counters too


def test_reset_classifier_fine_tunes_to_other_classes(tmp_path):
    """A 19-class checkpoint into a 5-class model: refused with a hint, or with ``reset_classifier=True``
    every weight but the heads' class-specific 1x1s loaded (those keep the model's values)."""
    src = randomize_(BiSeNet(19, "train"))
    path = tmp_path / "city.pth"
    torch.save(src.state_dict(), path)
    with pytest.raises(ValueError, match="reset_classifier=True"):
        load_pretrained(BiSeNet(5, "train"), path)
    model = BiSeNet(5, "train")
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    load_pretrained(model, path, reset_classifier=True)
    heads = ("conv_out.conv_out.", "conv_out16.conv_out.", "conv_out32.conv_out.")
    reset = sorted(k for k in fresh if k.startswith(heads))
    assert reset == [f"{h}.conv_out.{p}" for h in ("conv_out", "conv_out16", "conv_out32") for p in ("bias", "weight")]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, fresh[k] if k in reset else src.state_dict()[k], rtol=0, atol=0, msg=k)
    # the heads' 3x3 (conv_out.conv.*) is not class-specific: loaded
    assert not torch.equal(model.conv_out.conv.conv.weight, fresh["conv_out.conv.conv.weight"])
    # a real mismatch elsewhere is still an error
    bad = dict(src.state_dict())
    bad["ffm.convblk.conv.weight"] = torch.zeros(1)
    torch.save(bad, path)
    with pytest.raises(ValueError, match=r"ffm\.convblk\.conv\.weight: checkpoint"):
        load_pretrained(BiSeNet(5, "train"), path, reset_classifier=True)


def test_backbone_weights_of_the_wrong_depth_are_refused(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(build_backbone("resnet34").state_dict(), path)
    with pytest.raises(ValueError, match="unexpected"):
        load_backbone_weights(BiSeNet(19, "eval"), path)


@pytest.mark.parametrize("mode", ["eval", "pred"])
def test_plain_load_state_dict_of_a_train_checkpoint(mode):
    """SPEC: an eval/pred model accepts a train-mode state_dict by dropping exactly the aux-head keys."""
    src = randomize_(BiSeNet(4, "train"))
    state = src.state_dict()
    dst = BiSeNet(4, mode)
    dst.load_state_dict(state)
    assert len(state) == 222  # the caller's dict is untouched
    _same_state(dst, src)
    state["conv_out16_extra.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="conv_out16_extra"):
        dst.load_state_dict(state)


def test_aux_mode_switching():
    m = BiSeNet(3, "train")
    m.aux_mode = "eval"
    assert m.has_aux_heads
    m.aux_mode = "train"
    e = BiSeNet(3, "pred")
    with pytest.raises(ValueError, match="auxiliary heads"):
        e.aux_mode = "train"
    with pytest.raises(ValueError, match="aux_mode"):
        e.aux_mode = "logits"
