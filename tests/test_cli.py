"""The fastbisenet command: help, argument errors, eval, predict, export, train through the CLI."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastbisenet import BiSeNet
from fastbisenet.cli import build_parser, main
from fastbisenet.data import SYNTHETIC_CLASSES, SYNTHETIC_PALETTE


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A plain state_dict of an untrained 8-class train-mode model (aux heads included)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "bisenet.pt"
    torch.save(BiSeNet(8).state_dict(), path)
    return path


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["predict"], ["export"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: fastbisenet" in out


def test_subcommands_registered():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"train", "eval", "predict", "export", "bench"} <= set(sub.choices)


@pytest.mark.parametrize("argv", [
    [],                                         # no command
    ["frobnicate"],                             # unknown command
    ["train", "--amp", "fp8"],                  # bad choice
    ["train", "--iters", "ten"],                # not an int
    ["eval"],                                   # missing weights
    ["predict", "w.pt"],                        # missing inputs
    ["predict", "w.pt", "x.png", "--batch-size", "0"],  # counts are >= 1
    ["eval", "w.pt", "--batch-size", "-1"],
    ["eval", "w.pt", "--workers", "-1"],        # workers >= 0
    ["train", "--iters", "0"],
    ["export", "w.pt", "-o", "m.onnx", "--height", "0"],
])
def test_argument_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_runtime_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "--batch-size", "1", "--out-dir", str(tmp_path)]) == 1
    assert "batch_size must be >= 2" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "missing"), "--out-dir", str(tmp_path)]) == 1
    assert "neither 'synthetic'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nope.pt")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("iterz = 3\n")
    assert main(["train", "--config", str(bad)]) == 1
    assert "unknown option(s) iterz" in capsys.readouterr().err


def test_triton_backend_on_cpu_is_one_line(weights, tmp_path, capsys, monkeypatch):
    """``--backend triton`` where the kernels cannot run (a CPU tensor without Triton's interpreter) is a
    one-line error, not a traceback."""
    from fastbisenet import ops

    monkeypatch.setattr(ops, "interpreter_enabled", lambda: False)
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(img)
    assert main(["predict", str(weights), str(img), "-o", str(tmp_path / "p"), "--backend", "triton",
                 "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastbisenet predict: error: backend='triton' got a CPU tensor") and err.count("\n") == 1


def test_eval_skip_bad_leaves_bad_samples_out(tmp_path, capsys):
    """``eval --skip-bad`` scores each good sample once and says how many were left out; a bad sample is not
    replaced by (a second count of) its neighbour: the confusion matrix equals that of the good ones."""
    torch.manual_seed(0)
    ckpt = tmp_path / "w3.pt"
    torch.save(BiSeNet(3, "eval").state_dict(), ckpt)
    _folder(tmp_path / "all", ["a", "b", "c", "d"])
    _folder(tmp_path / "good", ["a", "c", "d"])
    (tmp_path / "all" / "images" / "b.png").write_bytes(b"not a png")
    results = {}
    for name in ("all", "good"):
        out = tmp_path / f"{name}.json"
        argv = ["eval", str(ckpt), "--data", str(tmp_path / name), "--device", "cpu", "--workers", "0",
                "--batch-size", "2", "--json", str(out)]
        assert main([*argv, "--skip-bad"] if name == "all" else argv) == 0
        results[name] = json.loads(out.read_text())
    text = capsys.readouterr().out
    assert "3 images (1 bad samples left out)" in text
    assert (results["all"]["images"], results["all"]["skipped_samples"]) == (3, 1)
    assert (results["good"]["images"], results["good"]["skipped_samples"]) == (3, 0)
    assert results["all"]["iou"] == results["good"]["iou"]
    assert results["all"]["pixel_accuracy"] == results["good"]["pixel_accuracy"]


def _folder(root: Path, names: list[str]) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("bg\ncat\ndog\n")
    for name in names:
        rng = np.random.default_rng(ord(name))
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(root / "images" / f"{name}.png")
        Image.fromarray(rng.integers(0, 3, (40, 56), dtype=np.uint8)).save(root / "masks" / f"{name}.png")
    return root


def test_train_warns_when_validation_is_the_training_set(tmp_path, capsys):
    """A folder dataset without a val/ split folder validates on its training images: said, not silent."""
    data = _folder(tmp_path / "d", ["a", "b", "c"])
    argv = ["train", "--data", str(data), "--iters", "1", "--batch-size", "2", "--crop", "32", "--workers", "0",
            "--device", "cpu", "--out-dir", str(tmp_path / "run")]
    with pytest.warns(UserWarning, match="validation uses the training images"):
        assert main(argv) == 0
    _folder(data / "val", ["d"])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="validation uses")
        assert main([*argv, "--out-dir", str(tmp_path / "run2")]) == 0


def test_eval_single_flip_multiscale(weights, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["eval", str(weights), "--data", "synthetic", "--synthetic-length", "2", "--synthetic-size", "64",
            "--device", "cpu", "--workers", "0", "--batch-size", "2"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "mIoU" in text and "background" in text
    assert main([*argv, "--scales", "0.75", "1", "1.25", "--flip", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert 0 <= result["miou"] <= 1 and result["flip"] and result["scales"] == [0.75, 1.0, 1.25]
    assert set(result["iou"]) == {"background", "box", "disc", "stripes", "line", "triangle", "checker", "ring"}


def test_predict_writes_pngs_and_logits(weights, tmp_path, capsys):
    src = tmp_path / "imgs"
    src.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"a": (40, 50), "b": (40, 50), "c": (70, 33)}
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(src / f"{name}.png")
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "pred"
    assert main(["predict", str(weights), str(src), "-o", str(out), "--device", "cpu", "--batch-size", "2",
                 "--save-logits", "npy"]) == 0
    for name, (h, w) in sizes.items():
        mask = Image.open(out / f"{name}_mask.png")
        assert mask.mode == "P" and mask.size == (w, h) and np.asarray(mask).max() < 8
        assert Image.open(out / f"{name}_overlay.png").size == (w, h)
        logits = np.load(out / f"{name}_logits.npy")
        assert logits.shape == (8, h, w)
        assert np.array_equal(logits.argmax(0), np.asarray(mask))
    assert main(["predict", str(weights), str(src / "c.png"), "-o", str(tmp_path / "p2"), "--device", "cpu",
                 "--no-overlay", "--save-logits", "pt", "--flip"]) == 0
    assert sorted(p.name for p in (tmp_path / "p2").iterdir()) == ["c_logits.pt", "c_mask.png"]
    assert torch.load(tmp_path / "p2" / "c_logits.pt", weights_only=True).shape == (8, 70, 33)


def test_predict_output_names_never_collide(weights, tmp_path, capsys):
    """Same stems in same-named folders and in one folder with two extensions: one output per input."""
    from fastbisenet.predict import _unique_stems

    rng = np.random.default_rng(1)
    files = [tmp_path / p for p in ("a/x/a.png", "a/x/a.jpg", "b/x/a.png", "a/imgs/0001.png", "b/imgs/0001.png")]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(f)
    names = _unique_stems(files)
    assert names == ["a_x_a_png", "a_x_a_jpg", "b_x_a", "a_imgs_0001", "b_imgs_0001"]
    assert _unique_stems([files[0], files[0], tmp_path / "x.png"]) == ["a", "a_1", "x"]
    assert _unique_stems([tmp_path / "p" / "a.png", tmp_path / "a_1.png", tmp_path / "q" / "a.png"]) == [
        "p_a", "a_1", "q_a"]
    out = tmp_path / "pred"
    assert main(["predict", str(weights), *map(str, files), "-o", str(out), "--device", "cpu", "--no-overlay"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}_mask.png" for n in names)


def test_predict_rejects_tiny_and_broken_images(weights, tmp_path, capsys):
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "tiny.png")
    assert main(["predict", str(weights), str(tmp_path / "tiny.png"), "-o", str(tmp_path / "o")]) == 1
    assert "at least 32x32" in capsys.readouterr().err
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    assert main(["predict", str(weights), str(tmp_path / "broken.png"), "-o", str(tmp_path / "o")]) == 1
    assert "broken.png" in capsys.readouterr().err


@pytest.mark.parametrize("aux_mode", ["eval", "pred"])
def test_export_onnx(weights, tmp_path, aux_mode, capsys):
    onnx = pytest.importorskip("onnx")
    out = tmp_path / f"m_{aux_mode}.onnx"
    assert main(["export", str(weights), "-o", str(out), "--aux-mode", aux_mode, "--height", "64",
                 "--width", "96"]) == 0
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits" if aux_mode == "eval" else "labels"]
    try:
        import onnxruntime as ort
    except ImportError:
        return
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 128)).astype(np.float32)
    (y,) = sess.run(None, {"input": x})
    m = BiSeNet(8, aux_mode, backend="torch")
    from fastbisenet import load_pretrained

    load_pretrained(m, weights).eval()
    with torch.no_grad():
        ref = m(torch.from_numpy(x))
    ref = ref[0] if aux_mode == "eval" else ref
    if aux_mode == "eval":
        np.testing.assert_allclose(y, ref.numpy(), atol=1e-3, rtol=1e-3)
    else:
        assert (y == ref.numpy()).mean() > 0.999


def test_export_leaves_the_model_as_it_was(tmp_path, monkeypatch):
    """export_onnx exports a float32 eval copy: the caller's model keeps its training mode, dtype and backend
    (a bf16 model exports too); the exporter is stubbed (onnx may be absent)."""
    import sys
    import types

    from fastbisenet.export import export_onnx

    monkeypatch.setitem(sys.modules, "onnx", types.SimpleNamespace(checker=types.SimpleNamespace(
        check_model=lambda path: None)))
    seen = []
    monkeypatch.setattr(torch.onnx, "export", lambda module, args, *a, **k: seen.append((module, args)) or
                        module(*args))
    model = BiSeNet(3, "eval", backend="auto").bfloat16().train()
    export_onnx(model, tmp_path / "m.onnx", height=32, width=64)
    (module, (x,)), = seen
    assert model.training and model.backend == "auto" and next(model.parameters()).dtype == torch.bfloat16
    assert not module.training and module.model is not model and x.dtype == torch.float32
    assert {p.dtype for p in module.parameters()} == {torch.float32} and module.model.backend == "torch"


def test_export_without_onnx_is_a_clear_error(weights, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnx", None)
    assert main(["export", str(weights), "-o", str(tmp_path / "m.onnx")]) == 1
    assert "pip install onnx" in capsys.readouterr().err


def test_train_eval_predict_roundtrip(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('data = "synthetic"\nsynthetic_size = 64\nsynthetic_length = 16\nsynthetic_val_length = 2\n'
                   'batch_size = 2\nworkers = 0\neval_every = 0\ndevice = "cpu"\niters = 100\nseed = 3\n')
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--iters", "2", "--out-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "iters 2" in out and "done: 2 iterations" in out
    ckpt = run / "last.pt"

    def miou(*argv: str) -> float:
        assert main(["eval", *argv, "--workers", "0", "--json", str(tmp_path / "e.json")]) == 0
        return json.loads((tmp_path / "e.json").read_text())["miou"]

    # eval scores a checkpoint on its training run's validation images (size, length, seed) by default,
    # from the training checkpoint and from the sidecar beside the plain model_final.pt alike
    same = miou(str(ckpt), "--synthetic-length", "2", "--synthetic-size", "64", "--seed", "3")
    assert miou(str(ckpt)) == same and miou(str(run / "model_final.pt")) == same
    assert f"mIoU {100 * same:.2f}" in out  # what training reported at its end
    assert miou(str(ckpt), "--seed", "0") != same
    side = json.loads((run / "model_final.json").read_text())
    assert side["fastbisenet_meta"]["classes"] == list(SYNTHETIC_CLASSES) and side["config"]["seed"] == 3
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(img)
    assert main(["predict", str(run / "model_final.pt"), str(img), "-o", str(tmp_path / "p")]) == 0
    mask = Image.open(tmp_path / "p" / "x_mask.png")
    assert mask.getpalette()[:3 * len(SYNTHETIC_PALETTE)] == [v for c in SYNTHETIC_PALETTE for v in c]
    # resuming a finished run is a no-op that still reports
    assert main(["train", "--resume", str(ckpt), "--out-dir", str(run)]) == 0


def test_eval_defaults_to_the_training_runs_data(tmp_path, capsys):
    """A checkpoint trained on a folder dataset is scored on that dataset's validation split, not on
    synthetic scenes (which an 8-class run would silently accept)."""
    root = tmp_path / "ds"
    rng = np.random.default_rng(0)
    for sub, n in (("", 2), ("val", 3)):
        for i in range(n):
            for kind, array in (("images", rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)),
                                ("masks", rng.integers(0, 3, (40, 48), dtype=np.uint8))):
                (root / sub / kind).mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(root / sub / kind / f"im{i}.png")
    (root / "classes.txt").write_text("bg\ncat\ndog\n")
    run = tmp_path / "run"
    assert main(["train", "--data", str(root), "--dataset", "folder", "--iters", "1", "--batch-size", "2", "--crop",
                 "32", "--workers", "0", "--eval-every", "0", "--device", "cpu", "--out-dir", str(run)]) == 0
    capsys.readouterr()
    assert main(["eval", str(run / "last.pt"), "--workers", "0"]) == 0
    assert f"on {root} [val], 3 images" in capsys.readouterr().out
    assert main(["eval", str(run / "model_final.pt"), "--workers", "0", "--split", "train"]) == 0
    assert f"on {root} [train], 2 images" in capsys.readouterr().out
    # other data: none of the run's dataset options (--dataset folder would make 'synthetic' a missing folder)
    assert main(["eval", str(run / "last.pt"), "--workers", "0", "--data", "synthetic"]) == 1
    assert "the dataset has 8 classes but" in capsys.readouterr().err


def test_predict_face_parsing_checkpoint_is_recognised(tmp_path, capsys):
    path = tmp_path / "face.pt"
    torch.save(BiSeNet(19, preset="face-parsing").state_dict(), path)
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "face.png")
    assert main(["predict", str(path), str(tmp_path / "face.png"), "-o", str(tmp_path / "o"), "--no-overlay"]) == 0
    mask = Image.open(tmp_path / "o" / "face_mask.png")
    assert mask.getpalette()[:3] == [0, 0, 0]  # generated palette, not Cityscapes' (road is 128, 64, 128)
