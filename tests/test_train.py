"""Training recipe: lr schedule, parameter groups, config files, checkpoints, convergence, resume, torchrun."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastbisenet import BiSeNet
from fastbisenet.config import TrainConfig, build_config, read_config_file
from fastbisenet.schedule import WarmupPolyLR, build_optimizer, lr_factor, param_groups
from fastbisenet.train import (
    InfiniteSampler,
    Progress,
    atomic_save,
    load_training_checkpoint,
    train,
    write_meta_sidecar,
)


# ------------------------------------------------------------------------------------------ schedule
def test_lr_factor_at_chosen_iterations():
    kw = dict(max_iter=10000, warmup_iters=1000, warmup_ratio=0.1, warmup="exp", power=0.9)
    assert lr_factor(0, **kw) == pytest.approx(0.1)
    assert lr_factor(500, **kw) == pytest.approx(0.1**0.5)
    assert lr_factor(999, **kw) == pytest.approx(0.1 ** (1 / 1000))
    assert lr_factor(1000, **kw) == pytest.approx(1.0)
    assert lr_factor(5500, **kw) == pytest.approx(0.5**0.9)
    assert lr_factor(10000, **kw) == 0.0
    assert lr_factor(500, **{**kw, "warmup": "linear"}) == pytest.approx(0.55)
    assert lr_factor(50, max_iter=100, warmup_iters=0, power=1.0) == pytest.approx(0.5)


def test_scheduler_drives_every_group():
    model = BiSeNet(3)
    opt = build_optimizer(model, lr=0.01)
    sched = WarmupPolyLR(opt, max_iter=100, warmup_iters=10)
    seen = {}
    for it in range(101):
        seen[it] = [g["lr"] for g in opt.param_groups]
        opt.step()
        sched.step()
    for it, factor in [(0, 0.1), (10, 1.0), (55, 0.5**0.9), (100, 0.0)]:
        for g, lr in zip(opt.param_groups, seen[it], strict=True):
            base = 0.1 if g["name"].startswith("fast") else 0.01
            assert lr == pytest.approx(base * factor, abs=1e-12), (it, g["name"])


def test_param_groups_decay_and_fast_lr():
    model = BiSeNet(5)
    groups = param_groups(model, lr=0.01, weight_decay=5e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(names.values())  # every parameter exactly once
    by_name = {names[id(p)]: g for g in groups for p in g["params"]}
    assert by_name["cp.resnet.conv1.weight"]["weight_decay"] == 5e-4
    assert by_name["cp.resnet.conv1.weight"]["lr"] == 0.01
    assert by_name["cp.resnet.bn1.weight"]["weight_decay"] == 0.0
    assert by_name["cp.arm16.bn_atten.bias"]["weight_decay"] == 0.0
    assert by_name["conv_out.conv_out.bias"]["weight_decay"] == 0.0
    assert by_name["conv_out.conv_out.bias"]["lr"] == pytest.approx(0.1)
    for name in ("ffm.convblk.conv.weight", "conv_out16.conv.conv.weight", "conv_out32.conv_out.weight"):
        assert by_name[name]["lr"] == pytest.approx(0.1) and by_name[name]["weight_decay"] == 5e-4
    assert by_name["ffm.bn.weight"]["lr"] == pytest.approx(0.1) and by_name["ffm.bn.weight"]["weight_decay"] == 0
    assert by_name["sp.conv_out.conv.weight"]["lr"] == 0.01  # spatial path's conv_out is not a head
    for name, g in by_name.items():
        is_conv_weight = name.endswith("weight") and dict(model.named_parameters())[name].dim() == 4
        assert (g["weight_decay"] > 0) == is_conv_weight, name


# ------------------------------------------------------------------------------------------ config
def test_config_files_and_overrides(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('iters = 7\ncrop = 96\nlr = 0.02\n"batch-size" = 4\neval_scales = [0.5, 1.0]\n')
    yml = tmp_path / "c.yaml"
    yml.write_text("train:\n  iters: 9\n  crop: [64, 128]\n")
    cfg = build_config(read_config_file(toml), {"lr": 0.5})
    assert (cfg.iters, cfg.crop, cfg.lr, cfg.batch_size, cfg.eval_scales) == (7, [96, 96], 0.5, 4, [0.5, 1.0])
    pytest.importorskip("yaml")
    cfg = build_config(read_config_file(yml))
    assert (cfg.iters, cfg.crop) == (9, [64, 128])


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("iterations = 5\n")
    with pytest.raises(ValueError, match=r"unknown option.*iterations"):
        read_config_file(bad)
    with pytest.raises(ValueError, match="must end in"):
        (tmp_path / "x.ini").write_text("")
        read_config_file(tmp_path / "x.ini")
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        build_config({"batch_size": 1})
    with pytest.raises(ValueError, match="amp"):
        build_config({"amp": "fp8"})
    for seed in (-1, 2**32):  # numpy's generators take no negative seed; the sampler's seed arithmetic overflows
        with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*32\)"):
            build_config({"seed": seed})


def test_config_values_are_converted_or_named(tmp_path):
    """YAML reads ``1e-3`` as a string and TOML files may quote numbers: values are converted to each option's
    type; what cannot be converted (or a YAML ``no`` given to a string option) is a ValueError naming it."""
    toml = tmp_path / "c.toml"
    toml.write_text('lr = "1e-3"\niters = "5"\nweight_decay = "5e-4"\nflip = "no"\ncrop = "96,128"\n'
                    'eval_scales = [1, "1.5"]\nworkers = 0\n')
    cfg = build_config(read_config_file(toml))
    assert (cfg.lr, cfg.iters, cfg.weight_decay, cfg.flip, cfg.crop, cfg.eval_scales, cfg.workers) == (
        1e-3, 5, 5e-4, False, [96, 128], [1.0, 1.5], 0)
    assert isinstance(cfg.iters, int) and isinstance(cfg.lr, float)
    for option, value, message in [("iters", "2.5", "'iters' must be an int"),
                                   ("iters", True, "'iters' must be an int"),
                                   ("lr", "fast", "'lr' must be a float"), ("flip", "maybe", "'flip' must be a bool"),
                                   ("amp", False, "'amp' must be a string"), ("batch_size", None, "'batch_size'"),
                                   ("synthetic_val_length", 0, "synthetic_val_length must be >= 1"),
                                   ("workers", -1, "workers must be >= 0")]:
        with pytest.raises(ValueError, match=message):
            build_config({option: value})
    pytest.importorskip("yaml")
    yml = tmp_path / "c.yaml"
    yml.write_text("lr: 1e-3\namp: no\n")
    with pytest.raises(ValueError, match="'amp' must be a string"):
        build_config(read_config_file(yml))


def test_sampler_resumes_mid_epoch():
    full = InfiniteSampler(10, seed=1, rank=1, world=2)
    it = iter(full)
    head = [next(it) for _ in range(13)]
    resumed = iter(InfiniteSampler(10, seed=1, rank=1, world=2, start=7))
    assert [next(resumed) for _ in range(6)] == head[7:]
    other = iter(InfiniteSampler(10, seed=1, rank=0, world=2))
    assert not set(head[:5]) & {next(other) for _ in range(5)}  # ranks disjoint within an epoch


def test_atomic_save_leaves_no_temp(tmp_path):
    atomic_save({"a": torch.ones(2)}, tmp_path / "sub" / "x.pt")
    atomic_save({"a": torch.zeros(2)}, tmp_path / "sub" / "x.pt")
    assert os.listdir(tmp_path / "sub") == ["x.pt"]
    assert torch.load(tmp_path / "sub" / "x.pt", weights_only=True)["a"].sum() == 0

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"a": Boom()}, tmp_path / "sub" / "x.pt")
    assert os.listdir(tmp_path / "sub") == ["x.pt"]  # old file intact, temp removed
    side = write_meta_sidecar(tmp_path / "sub" / "x.pt", {"n_classes": 3}, {"seed": 1})
    assert sorted(os.listdir(tmp_path / "sub")) == ["x.json", "x.pt"]
    assert json.loads(side.read_text())["fastbisenet_meta"] == {"n_classes": 3}
    umask = os.umask(0)
    os.umask(umask)
    assert (side.stat().st_mode & 0o777) == (0o666 & ~umask)


def test_progress_plain_lines(capsys):
    import io

    buf = io.StringIO()
    p = Progress(10, desc="train", log_every=5, stream=buf)
    for i in range(1, 11):
        p.update(i, {"loss": 1.5, "lr": 0.01})
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("train 5/10") and "loss 1.5" in lines[1]


# ------------------------------------------------------------------------------------------ training
def tiny(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(data="synthetic", synthetic_size=64, synthetic_length=64, synthetic_val_length=4, crop=[64, 64],
                batch_size=2, iters=6, eval_every=0, save_every=3, workers=0, device="cpu", backend="torch",
                out_dir=str(tmp_path / "run"), log_every=100)
    base.update(kw)
    return build_config(base)


@pytest.fixture
def one_thread():
    """Training tests run single-threaded: on a busy 2-core machine OpenMP's spinning threads make
    2-thread runs up to 10x slower, while 1 thread costs little when the machine is idle."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_resume_reproduces_uninterrupted_run(tmp_path, capsys, one_thread):
    full = train(tiny(tmp_path, out_dir=str(tmp_path / "a"), keep_checkpoints=True))
    assert full["iteration"] == 6
    mid = tmp_path / "a" / "iter_0000003.pt"
    ckpt = load_training_checkpoint(mid)
    assert ckpt["iteration"] == 3 and {"model", "optimizer", "scheduler", "scaler", "rng"} <= set(ckpt)
    train(tiny(tmp_path, out_dir=str(tmp_path / "b"), resume=str(mid)))
    a, b = _state(tmp_path / "a" / "model_final.pt"), _state(tmp_path / "b" / "model_final.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    oa, ob = _state(tmp_path / "a" / "last.pt")["optimizer"], _state(tmp_path / "b" / "last.pt")["optimizer"]
    for k in oa["state"]:
        assert torch.equal(oa["state"][k]["momentum_buffer"], ob["state"][k]["momentum_buffer"])
    assert _state(tmp_path / "b" / "last.pt")["scheduler"]["last_epoch"] == 6
    # a different seed gives different weights (the comparison above is not vacuous)
    c = train(tiny(tmp_path, out_dir=str(tmp_path / "c"), seed=1, iters=3))
    assert c["iteration"] == 3
    assert not torch.equal(_state(tmp_path / "c" / "model_final.pt")["conv_out.conv_out.weight"],
                           _state(tmp_path / "a" / "iter_0000003.pt")["model"]["conv_out.conv_out.weight"])


def test_resume_takes_this_runs_schedule_and_no_initial_weights(tmp_path, capsys, one_thread):
    """``--iters`` extends a finished run (the old schedule would train at lr 0); ``--weights`` of the
    original run is not needed again; checkpoints are ordinary (umask) files."""
    init = tmp_path / "init.pt"
    torch.save(BiSeNet(8, "train").state_dict(), init)
    train(tiny(tmp_path, out_dir=str(tmp_path / "a"), weights=str(init)))
    init.unlink()
    last = tmp_path / "a" / "last.pt"
    umask = os.umask(0)
    os.umask(umask)
    assert (last.stat().st_mode & 0o777) == (0o666 & ~umask)
    before = _state(last)["model"]
    train(tiny(tmp_path, out_dir=str(tmp_path / "b"), resume=str(last), iters=9))
    after = _state(tmp_path / "b" / "last.pt")
    assert after["scheduler"]["max_iter"] == 9 and after["scheduler"]["last_epoch"] == 9
    changed = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after["model"][k])]
    assert "conv_out.conv_out.weight" in changed


def test_a_new_run_does_not_replace_an_earlier_one(tmp_path, capsys, one_thread):
    """A fresh run into a folder holding a run raises (no results lost); --overwrite replaces it; resuming from
    the folder's own checkpoint continues it; an inherited --overwrite does not reach another folder."""
    train(tiny(tmp_path, iters=2, overwrite=True))
    first = _state(tmp_path / "run" / "model_final.pt")
    with pytest.raises(FileExistsError, match="already holds a training run"):
        train(tiny(tmp_path, iters=2, seed=1))
    assert all(torch.equal(v, _state(tmp_path / "run" / "model_final.pt")[k]) for k, v in first.items())
    train(tiny(tmp_path, iters=3, resume=str(tmp_path / "run" / "last.pt")))
    train(tiny(tmp_path, iters=2, seed=1, overwrite=True))
    assert _state(tmp_path / "run" / "last.pt")["iteration"] == 2
    train(tiny(tmp_path, iters=2, out_dir=str(tmp_path / "other")))
    from fastbisenet.cli import main

    assert main(["train", "--resume", str(tmp_path / "run" / "last.pt"), "--out-dir", str(tmp_path / "other"),
                 "--iters", "3"]) == 1
    assert "already holds a training run" in capsys.readouterr().err


def test_short_synthetic_run_learns(tmp_path, capsys, one_thread):
    cfg = tiny(tmp_path, iters=40, batch_size=8, synthetic_size=96, synthetic_length=400,
               synthetic_val_length=16, save_every=1000, eval_every=0)
    result = train(cfg)
    chance = 1 / 8
    assert result["miou"] > max(0.3, 2 * chance), result
    out = capsys.readouterr().out
    assert "mIoU" in out and "img/s" in out


def test_recipe_notes_on_real_data(tmp_path):
    from fastbisenet.train import recipe_notes

    assert recipe_notes(tiny(tmp_path), 1, cityscapes=False) == []
    folder = dict(data=str(tmp_path), dataset="folder")
    (note,) = recipe_notes(tiny(tmp_path, **folder), 1, cityscapes=False)
    assert "random initialisation" in note and "--backbone-weights" in note
    assert recipe_notes(tiny(tmp_path, backbone_weights="r18.pth", **folder), 1, cityscapes=False) == []
    assert recipe_notes(tiny(tmp_path, weights="w.pth", **folder), 1, cityscapes=False) == []
    assert recipe_notes(tiny(tmp_path, resume="last.pt", **folder), 1, cityscapes=True) == []
    city = dict(data=str(tmp_path), dataset="cityscapes", backbone_weights="r18.pth")
    (note,) = recipe_notes(tiny(tmp_path, batch_size=8, **city), 1, cityscapes=True)
    assert "global batch of 16" in note and "is 8 (8 x 1 processes)" in note
    assert recipe_notes(tiny(tmp_path, batch_size=8, **city), 2, cityscapes=True) == []


def test_sync_bn_is_off_by_default_and_needs_cuda(tmp_path, monkeypatch):
    import argparse

    import fastbisenet.train as train_module
    from fastbisenet.train import DistInfo, config_from_args

    assert TrainConfig().sync_bn is False and tiny(tmp_path, sync_bn="yes").sync_bn is True
    def stop(*args, **kwargs):
        raise RuntimeError("stop")

    with monkeypatch.context() as m, pytest.warns(UserWarning, match="no effect in a single process"), \
            pytest.raises(RuntimeError, match="stop"):
        m.setattr("fastbisenet.schedule.build_optimizer", stop)  # the model is built: no need to train
        train(tiny(tmp_path, sync_bn=True))
    monkeypatch.setattr(train_module, "init_distributed", lambda device: (DistInfo(0, 2), torch.device("cpu")))
    with pytest.raises(ValueError, match="--sync-bn needs CUDA"):
        train(tiny(tmp_path, sync_bn=True))
    # a multi-process run from before the option existed used SyncBatchNorm: its resume keeps it
    for world, legacy in ((2, True), (1, False)):
        cfg = tiny(tmp_path).to_dict()
        del cfg["sync_bn"]
        path = tmp_path / f"legacy{world}.pt"
        torch.save({"model": {}, "optimizer": {}, "scheduler": {}, "iteration": 1, "config": cfg,
                    "world_size": world}, path)
        assert config_from_args(argparse.Namespace(resume=str(path))).sync_bn is legacy


def test_evaluate_skips_the_aux_heads_and_restores_the_model(monkeypatch):
    from fastbisenet.data import SyntheticDataset
    from fastbisenet.evaluate import evaluate

    model = BiSeNet(8, "train", backend="torch").train()
    calls = []
    model.conv_out16.register_forward_hook(lambda *_: calls.append(1))
    ds = SyntheticDataset(2, 64, seed=1, split="val")
    cm = evaluate(model, ds, 8, device=torch.device("cpu"), batch_size=2)
    assert int(cm.mat.sum()) > 0 and not calls
    assert model.training and model.aux_mode == "train"
    model.eval()
    monkeypatch.setattr(model.conv_out, "forward", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        evaluate(model, ds, 8, device=torch.device("cpu"), batch_size=2)
    assert not model.training and model.aux_mode == "train"


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("FASTBISENET_SLOW"), reason="set FASTBISENET_SLOW=1 to run (minutes on CPU)")
def test_longer_synthetic_run_reaches_high_miou(tmp_path, capsys):
    cfg = tiny(tmp_path, iters=300, batch_size=8, synthetic_size=128, synthetic_length=2000,
               synthetic_val_length=50, save_every=1000, eval_every=0)
    assert train(cfg)["miou"] > 0.6


def _subprocess_env() -> dict[str, str]:
    """Single-threaded child processes that import the fastbisenet under test (not another installed copy)."""
    import fastbisenet

    root = str(Path(fastbisenet.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def test_torchrun_two_processes(tmp_path):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    out = tmp_path / "ddp"
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "fastbisenet", "train", "--device", "cpu",
           "--backend", "torch", "--iters", "3", "--batch-size", "2", "--crop", "64", "--synthetic-size", "64",
           "--synthetic-length", "16", "--synthetic-val-length", "4", "--workers", "0", "--eval-every", "0",
           "--out-dir", str(out)]
    env = _subprocess_env()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = load_training_checkpoint(out / "last.pt")
    assert ckpt["iteration"] == 3 and ckpt["world_size"] == 2 and set(ckpt["rng"]) == {"0", "1"}
    assert "x2" in proc.stdout and "mIoU" in proc.stdout
    assert not any(k.startswith("module.") for k in ckpt["model"])
    # the mIoU training reported is that of the saved model (rank 0's BN statistics on every rank)
    proc = subprocess.run([sys.executable, "-m", "fastbisenet", "eval", str(out / "model_final.pt"), "--device", "cpu",
                           "--workers", "0", "--batch-size", "2", "--backend", "torch", "--json", str(out / "e.json")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # measured: equal; 1.3e-3 apart when each rank scored its own BN statistics
    assert abs(ckpt["history"][-1]["miou"] - json.loads((out / "e.json").read_text())["miou"]) <= 1e-4


def _nan_loss_at(iteration: int):
    """A ``total_pixel_loss`` that returns NaN from its ``iteration``-th call on."""
    from fastbisenet import losses

    real, calls = losses.total_pixel_loss, []

    def total_pixel_loss(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) >= iteration else loss
    return total_pixel_loss


def test_non_finite_loss_raises(tmp_path, capsys, monkeypatch, one_thread):
    from fastbisenet import losses

    monkeypatch.setattr(losses, "total_pixel_loss", _nan_loss_at(2))
    with pytest.raises(FloatingPointError, match="loss is nan at iteration 2"):
        train(tiny(tmp_path, iters=4))


def test_torchrun_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    """A NaN loss on rank 1 alone: rank 0 raises too (instead of waiting in DDP's all-reduce)."""
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    out = tmp_path / "ddp"
    script = tmp_path / "nan_on_rank_1.py"
    # each rank writes its error to a file; rank 1 exits only after rank 0 has written (torchrun stops the other
    # processes as soon as one exits with an error)
    script.write_text(f"""import os, sys, time
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).parent)!r})
from fastbisenet import losses
from fastbisenet.config import build_config
from fastbisenet.train import train
from test_train import _nan_loss_at

rank, out = os.environ["RANK"], Path({str(out)!r})
if rank == "1":
    losses.total_pixel_loss = _nan_loss_at(2)
cfg = build_config(dict(data="synthetic", synthetic_size=64, synthetic_length=16, synthetic_val_length=4,
                        crop=[64, 64], batch_size=2, iters=4, eval_every=0, workers=0, device="cpu",
                        backend="torch", out_dir=str(out)))
try:
    train(cfg)
except FloatingPointError as e:
    (out / f"rank{{rank}}.txt").write_text(str(e))
    deadline = time.time() + 60
    while rank == "1" and not (out / "rank0.txt").exists() and time.time() < deadline:
        time.sleep(0.1)
    sys.exit(1)
""")
    out.mkdir()
    env = _subprocess_env()
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode != 0
    errors = {p.name: p.read_text() for p in out.glob("rank*.txt")}
    assert errors.get("rank1.txt", "").startswith("loss is nan at iteration 2"), (errors, proc.stderr[-3000:])
    assert errors.get("rank0.txt", "").startswith("loss is not finite on another process at iteration 2"), (
        errors, proc.stderr[-3000:])


def test_python_dash_m_help():
    proc = subprocess.run([sys.executable, "-m", "fastbisenet", "train", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "--resume" in proc.stdout


def test_face_parsing_trains_and_records_its_normalisation(tmp_path, capsys, one_thread):
    """Training, the checkpoint's eval/predict and the public face-parsing weights share one normalisation."""
    from fastbisenet.evaluate import IMAGENET_MEAN, IMAGENET_STD

    train(tiny(tmp_path, preset="face-parsing", iters=2, save_every=100))
    meta = _state(tmp_path / "run" / "last.pt")["meta"]
    assert tuple(meta["mean"]) == tuple(IMAGENET_MEAN) and tuple(meta["std"]) == tuple(IMAGENET_STD)
