"""Benchmark infrastructure on CPU: report numbers, plot, the ``bench`` CLI, the pytest-benchmark
hand-off, the traced shape table and cost model, cold-L2 timing arithmetic, the training-step recipe,
bench/gpu_suite.sh's control flow, and ``pytest bench/`` skipping cleanly without CUDA."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch

from fastbisenet import benchmark as fb
from fastbisenet.benchmark import workloads

ROOT = Path(__file__).resolve().parents[1]

FLOORS = {"floor_matmul_tflops": 500.0, "floor_copy_gbps": 3000.0}


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """The CPU work here is tiny; one thread avoids OpenMP spinning on a shared, loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _env(*drop: str) -> dict[str, str]:
    """This environment for a child pytest, without the variables that start with ``drop`` nor pytest-xdist's
    (under ``pytest -n``: pytest-benchmark disables itself when it sees ``PYTEST_XDIST_WORKER``)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST_", *drop))}


def _bench(group: str, variant: str, median_s: float, **info: Any) -> dict[str, Any]:
    extra = {"schema": fb.SCHEMA, "variant": variant, "device_name": "Fake GPU", "torch": "x", "git_commit": "abc",
             **FLOORS, **info}
    return {"group": group, "name": f"test[{group}-{variant}]", "extra_info": extra,
            "stats": {"median": median_s, "min": median_s, "max": median_s, "mean": median_s, "rounds": 5}}


def _write_json(path: Path) -> Path:
    # floor of the conv group: max(4e11 / 500e12, 3e9 / 3000e9) = max(0.8 ms, 1.0 ms) = 1 ms
    conv = dict(op="conv_bn_act", pass_="fwd", dtype="bfloat16", flops=4e11, bytes=3e9, shape=[1, 64, 256, 512],
                timing="cuda-graph", cache="cold-l2-flush", l2_flush_bytes=100 << 20, l2_bytes=50 << 20)
    conv = {("pass" if k == "pass_" else k): v for k, v in conv.items()}
    e2e = dict(op="end_to_end", dtype="bfloat16", flops=2.4e11, bytes=5e7, timing="cuda-graph", cache="warm")
    e2e_rows = []
    for shape, t_fast, t_eager in (([1, 3, 512, 1024], 1e-3, 3e-3), ([1, 3, 1024, 2048], 3e-3, 9e-3)):
        g = f"end_to_end pred {fb.shape_str(shape)} bf16"
        e2e_rows += [_bench(g, "fastbisenet", t_fast, shape=shape, peak_mem_bytes=3 * 2**20, **{"pass": "pred"}, **e2e),
                     _bench(g, "eager", t_eager, shape=shape, **{"pass": "pred"}, **e2e)]
    data = {
        "datetime": "2025-01-01T00:00:00",
        "machine_info": {},
        "commit_info": {},
        "benchmarks": [
            _bench("conv A", "fastbisenet", 2e-3, **conv),
            _bench("conv A", "eager", 5e-3, **conv),
            _bench("conv A", "compile", 3e-3, **conv),
            _bench("conv B", "fastbisenet", 1e-3, **conv),
            _bench("conv B", "eager", 4e-3, **conv),
            *e2e_rows,
        ],
    }
    path.write_text(json.dumps(data))
    return path


def test_report_numbers(tmp_path: Path) -> None:
    rows, _ = fb.load_rows(_write_json(tmp_path / "bench.json"))
    sp = fb.speedups(rows)
    assert sp["conv A"] == pytest.approx({"eager": 2.5, "compile": 1.5})
    assert sp["conv B"] == pytest.approx({"eager": 4.0})
    fast_a = next(r for r in rows if r.group == "conv A" and r.variant == "fastbisenet")
    m = fb.row_metrics(fast_a)
    assert m["gbps"] == pytest.approx(1500.0)
    assert m["tflops"] == pytest.approx(200.0)
    assert m["floor_ms"] == pytest.approx(1.0)
    assert m["pct_floor"] == pytest.approx(50.0)
    assert fb.floor_seconds(4e11, 3e9, 500, 3000) == pytest.approx(1e-3)
    assert fb.floor_seconds(4e11, 3e9, None, 3000) is None

    md = fb.render_markdown(rows)
    # per-op: one compact line per shape, fastbisenet's rates
    assert "| conv A | bfloat16 | fwd |  | 2.0000 | 5.0000 | 3.0000 | 2.50x | 1.50x | 1500.0 | 200.00 | 50.0% |" in md
    assert "| conv B | bfloat16 | fwd |  | 1.0000 | 4.0000 | — | 4.00x | — | 3000.0 | 400.00 | 100.0% |" in md
    # end to end: a line per variant; floor = max(2.4e11 / 500e12, 5e7 / 3000e9) = 0.48 ms
    assert "| fastbisenet | 1.0000 | — | 50.0 | 240.00 | 0.4800 | 48.0% | 3 |" in md
    assert "| eager | 3.0000 | 3.00x | 16.7 | 80.00 | 0.4800 | 16.0% | — |" in md
    assert f"{math.sqrt(10):.2f}x (2)" in md
    assert md.index("## end_to_end") < md.index("## conv_bn_act")
    assert "Fake GPU" in md
    # the L2 state of each kind of row is stated at the top and in the timing column
    assert "- L2 cache, per-op rows: `cold-l2-flush` — " in md and "(flush 100 MiB; L2 50 MiB)" in md
    assert "- L2 cache, end-to-end rows: `warm` — " in md
    assert "| 50.0% | cuda-graph, cold-l2-flush |" in md
    assert "| 48.0% | 3 | cuda-graph, warm |" in md


def test_autotune_choices_recorded_and_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What each autotuner picked is listed by kernel, key and config (from the tuner's cache, keyed as Triton
    keys it: the key arguments, then the tensor arguments' dtypes), travels in the JSON's machine_info and
    is rendered as a table in the report."""
    import triton
    from fastbisenet.kernels import conv_bn as K

    picked = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8, "ONE_LOOP": True},
                           num_warps=4, num_stages=3)
    key = (35, 40, 0, 24, 3, 3, 1, 0, True, *["torch.bfloat16"] * 11, "torch.float32")
    monkeypatch.setattr(K.conv_bn_fwd_kernel, "cache", {key: picked})
    conv = [c for c in fb.autotune_choices() if c["kernel"] == "conv_bn_fwd_kernel"]
    assert conv == [{"kernel": "conv_bn_fwd_kernel",
                     "key": {"M": 35, "C_in": 40, "C_in2": 0, "C_out": 24, "KH": 3, "KW": 3, "STRIDE_H": 1,
                             "FLAT_C": 0, "ROW_K": True},
                     "dtypes": ["torch.bfloat16", "torch.float32"],
                     "config": {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8, "ONE_LOOP": True,
                                "num_warps": 4, "num_stages": 3}}]

    data = json.loads(_write_json(tmp_path / "bench.json").read_text())
    data["machine_info"] = {"fastbisenet": {"autotune": json.loads(json.dumps(conv))}}
    (tmp_path / "bench.json").write_text(json.dumps(data))
    rows, meta = fb.load_rows(tmp_path / "bench.json")
    md = fb.render_markdown(rows, meta)
    assert "## Autotune choices" in md and "### conv_bn_fwd_kernel" in md
    assert ("| M=35, C_in=40, C_in2=0, C_out=24, KH=3, KW=3, STRIDE_H=1, FLAT_C=0, ROW_K=True | bfloat16, float32 "
            "| M=64 N=32 K=32 GROUP_M=8 ONE_LOOP=True warps=4 stages=3 |") in md
    assert "Autotune choices" not in fb.render_markdown(rows, {})


def test_report_merges_stage_jsons_and_quotes_the_suite_summary(tmp_path: Path) -> None:
    data = json.loads(_write_json(tmp_path / "all.json").read_text())
    conv_a = {"kernel": "conv_bn_fwd_kernel", "key": {"M": 1}, "dtypes": ["torch.bfloat16"], "config": {"num_warps": 4}}
    conv_b = {**conv_a, "key": {"M": 2}}
    first = {**data, "benchmarks": data["benchmarks"][:3],
             "machine_info": {"fastbisenet": {"autotune": [conv_a], "stages": ["headline"]}}}
    second = {**data, "benchmarks": data["benchmarks"][3:],
              "machine_info": {"fastbisenet": {"autotune": [conv_a, conv_b], "stages": ["ab"]}}}
    third = {**data, "benchmarks": [], "machine_info": {"fastbisenet": {"autotune": {"error": "boom"},
                                                                         "stages": ["ops"]}}}
    for name, content in (("a", first), ("b", second), ("c", third)):
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
    rows, meta = fb.load_rows([tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"])
    assert [r.name for r in rows] == [b["name"] for b in data["benchmarks"]]
    assert meta["machine_info"]["fastbisenet"]["autotune"] == [  # each stage tuned on its own: labelled
        {**conv_a, "stage": "headline"}, {**conv_a, "stage": "ab"}, {**conv_b, "stage": "ab"},
        {"error": "boom", "stage": "ops"}]
    tables = "\n".join(fb.autotune_lines(meta["machine_info"]["fastbisenet"]["autotune"]))
    assert "Not recorded (stage ops): boom" in tables and "| M=1 | bfloat16 | warps=4 | ab |" in tables
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.txt").write_text("=== [tests] rc=1 in 300 s\n=== [bench-headline] rc=0 in 200 s\n")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), str(tmp_path / "a.json"),
                           str(tmp_path / "b.json"), str(tmp_path / "c.json"), str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    md = (out / "report.md").read_text()
    assert md.startswith("# fastbisenet benchmark report\n\n## Suite steps")
    assert "[tests] rc=1 in 300 s" in md and md.index("[tests] rc=1") < md.index("- device_name")
    assert md == fb.render_markdown(rows, meta).replace(
        "\n\n", "\n\n## Suite steps (bench/gpu_suite.sh summary.txt)\n\n```\n[tests] rc=1 in 300 s\n"
        "[bench-headline] rc=0 in 200 s\n```\n\n", 1)
    assert "M=2" in md
    # autotune choices that could not be read are said so
    assert "Not recorded: boom" in "\n".join(fb.autotune_lines({"error": "boom"}))
    with pytest.raises(ValueError, match="no benchmark JSON"):
        fb.load_rows([])


def test_report_writes_markdown_and_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    paths = fb.report(_write_json(tmp_path / "bench.json"), tmp_path / "out")
    assert paths["markdown"].read_text().startswith("# fastbisenet benchmark report")
    assert paths["plot"] is not None
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    paths = fb.report(_write_json(tmp_path / "bench.json"), tmp_path / "out")
    assert paths["plot"] is None
    assert paths["markdown"].exists()
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_report_script(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), str(_write_json(tmp_path / "b.json")),
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out" / "report.md").exists()


def _bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastbisenet")
    fb.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", *argv])
    assert args.func is fb.run
    return args


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
@pytest.mark.parametrize(("aux_mode", "batch"), [("pred", 1), ("train", 2)])
def test_bench_cli_cpu(aux_mode: str, batch: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _bench_args("--size", "64x64", "--batch", str(batch), "--iters", "2", "--warmup", "0",
                       "--aux-mode", aux_mode, "--json", str(tmp_path / "r.json"))
    assert args.func(args) == 0
    out = capsys.readouterr()
    assert "Triton kernels need a CUDA GPU" in out.out
    rows = out.out.split("variant", 1)[1].splitlines()[1:]
    assert [r.split()[0] for r in rows] == ["eager"]
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["shape"] == [batch, 3, 64, 64]
    assert [r["variant"] for r in result["results"]] == ["eager"]
    assert result["results"][0]["median_ms"] > 0


def test_bench_cli_report_mode(tmp_path: Path) -> None:
    args = _bench_args("--report", str(_write_json(tmp_path / "b.json")), str(tmp_path / "out"))
    assert fb.run(args) == 0
    assert (tmp_path / "out" / "report.md").exists()


def test_feed_benchmark_reports_exact_samples(tmp_path: Path) -> None:
    """What pytest-benchmark stores is exactly the per-iteration times handed to it."""
    (tmp_path / "test_feed.py").write_text(
        "from fastbisenet.benchmark import feed_benchmark\n"
        "def test_feed(benchmark):\n"
        "    feed_benchmark(benchmark, [1.0, 2.0, 4.0])\n"
    )
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path),
                          "--benchmark-json", str(tmp_path / "feed.json")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path, env=_env())
    assert out.returncode == 0, out.stdout + out.stderr
    stats = json.loads((tmp_path / "feed.json").read_text())["benchmarks"][0]["stats"]
    assert stats["rounds"] == 3
    assert stats["min"] == pytest.approx(1e-3)
    assert stats["median"] == pytest.approx(2e-3)
    assert stats["max"] == pytest.approx(4e-3)


def test_traced_ops_cover_the_model_and_add_up() -> None:
    shape = (1, 3, 1024, 2048)
    cases = fb.trace_ops(shape, aux_mode="eval")
    assert {c.op for c in cases} >= {"conv_bn_act", "concat_conv_bn_act", "global_context", "bn_attention",
                                     "attend_add_upsample", "attend_residual", "head_logits"}
    flops = sum(c.calls * fb.op_cost(c, torch.bfloat16, backward=False)[0] for c in cases)
    model_flops, model_bytes = fb.model_cost(shape, torch.bfloat16, aux_mode="eval")
    assert flops == model_flops
    assert model_flops / 1e9 == pytest.approx(236.7, abs=0.05)  # SPEC section 2
    assert model_bytes > 13_000_000 * 2  # at least the bf16 parameters
    pred = fb.trace_ops(shape, aux_mode="pred")
    assert [c for c in pred if c.op == "head_argmax"]
    # resnet (without its stem) + cp (ARMs, heads 32/16; conv_avg is global_context) + sp (without its stem)
    # + head; the two stems are one pair call
    assert sum(c.calls for c in cases if c.op == "conv_bn_act") == 19 + 4 + 3 + 1
    assert sum(c.calls for c in cases if c.op == "conv_bn_act_pair") == 1
    labels = {c.label for c in cases}
    assert "7x7s2 3->64+64 @1x3x1024x2048" in labels
    assert "3x3s1 64->64 @1x64x256x512 +res" in labels


def test_op_workloads_run_on_cpu() -> None:
    """The same workload builders the GPU rows use, on CPU with the reference ops."""
    cases = fb.trace_ops((2, 3, 32, 64), aux_mode="train")
    cases += [c for c in fb.trace_ops((2, 3, 32, 64), aux_mode="pred") if c.op == "head_argmax"]
    cases += [c for c in fb.trace_ops((2, 3, 32, 64), preset="face-parsing") if c.op == "mlp_attention"]
    loss = [c for c in fb.trace_ops((2, 3, 32, 64), labels=True) if c.op == "head_cross_entropy"]
    assert {c.where for c in loss} == {("conv_out",), ("conv_out16",), ("conv_out32",)}
    cases += loss
    assert len({c.op for c in cases}) == 12
    for case in cases:
        for backward in (False, True) if case.op not in ("head_argmax", "max_pool2d") else (False,):
            step = fb.op_workload(case, "eager", torch.float32, backward=backward, device="cpu")
            step()
            flops, nbytes = fb.op_cost(case, torch.float32, backward=backward)
            assert nbytes > 0 and flops >= 0


def test_dgrad_workloads_agree_on_cpu() -> None:
    """The dgrad rows' two variants (Triton under the interpreter, torch's convolution_backward) compute the
    same input gradient for every stride-1 conv of the model; FLOPs match torch's own count."""
    cases = fb.dgrad_cases(fb.trace_ops((2, 3, 64, 64), aux_mode="train"))
    convs = {(c.args[1].kernel, c.args[1].padding) for c in cases}
    assert {((3, 3), (1, 1)), ((1, 1), (0, 0))} <= convs  # 3x3 and 1x1 convs, none strided
    assert all(c.args[1].stride == (1, 1) and c.args[1].in_ch > 3 for c in cases)
    for case in cases:
        got = fb.dgrad_workload(case, "fastbisenet", torch.float32, device="cpu")()
        want = fb.dgrad_workload(case, "eager", torch.float32, device="cpu")()
        assert got.shape == want.shape == case.args[0].shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        x, conv = case.args[0], case.args[1]
        w = torch.empty(conv.out_ch, conv.in_ch, *conv.kernel, device="meta")
        xm = torch.empty(x.shape, device="meta", requires_grad=True)
        y = torch.nn.functional.conv2d(xm, w, padding=conv.padding)
        flops, _ = fb.count_flops(lambda: torch.autograd.grad(y, xm, torch.empty_like(y)))  # noqa: B023
        assert fb.dgrad_cost(case, torch.bfloat16)[0] == flops
    with pytest.raises(ValueError, match="dgrad variants"):
        fb.dgrad_workload(cases[0], "compile", torch.float32, device="cpu")


def test_ohem_reduce_matches_definition() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 8, 8)
    labels = torch.randint(0, 5, (2, 8, 8))
    labels[0, :2] = fb.IGNORE_INDEX
    pixel_ce = torch.nn.functional.cross_entropy(logits, labels, ignore_index=fb.IGNORE_INDEX, reduction="none")
    ce = pixel_ce.flatten()
    n_min = int((labels != fb.IGNORE_INDEX).sum()) // 16
    thresh = -math.log(0.7)
    hard = ce[ce > thresh]
    expected = hard.mean() if hard.numel() >= n_min else ce.sort(descending=True).values[:n_min].mean()
    assert fb.ohem_reduce(pixel_ce, n_min=n_min) == pytest.approx(float(expected), rel=1e-6)
    # when few pixels are hard, the top n_min are used
    big_n = int((ce > thresh).sum()) + 5
    top = ce.sort(descending=True).values[:big_n].mean()
    assert fb.ohem_reduce(pixel_ce, n_min=big_n) == pytest.approx(float(top), rel=1e-6)
    losses = pytest.importorskip("fastbisenet.losses")
    crit, _ = fb.make_criterion(labels)
    assert float(crit([pixel_ce])) == pytest.approx(float(losses.OhemCELoss()(logits, labels)), rel=1e-6)
    assert crit.topk == [False]
    labels_few = labels.clone()
    labels_few[1] = fb.IGNORE_INDEX
    crit, _ = fb.make_criterion(labels_few)
    few_ce = torch.nn.functional.cross_entropy(logits * 0.01, labels_few, ignore_index=fb.IGNORE_INDEX,
                                               reduction="none")
    assert float(crit([few_ce])) == pytest.approx(float(losses.OhemCELoss()(logits * 0.01, labels_few)), rel=1e-6)
    # heads summed, each with its own branch, as total_pixel_loss
    crit, _ = fb.make_criterion(labels)
    both = crit([pixel_ce, pixel_ce * 0.01])
    assert crit.topk == [False, True]
    assert float(both) == pytest.approx(float(losses.total_pixel_loss([pixel_ce, pixel_ce * 0.01], labels,
                                                                      losses.OhemCELoss(), 5)), rel=1e-6)
    for topk in (False, True):
        assert float(fb.ohem_reduce(pixel_ce, n_min=big_n, topk=topk)) == pytest.approx(
            float(top if topk else hard.mean()), rel=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this would run the benchmarks")
def test_pytest_bench_skips_everything_without_cuda() -> None:
    env = _env("FASTBISENET_BENCH")
    out = subprocess.run([sys.executable, "-m", "pytest", "bench/", "--benchmark-only", "-q", "-rs",
                          "-p", "no:cacheprovider"], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = out.stdout.strip().splitlines()[-1]
    assert "skipped" in summary and "passed" not in summary and "failed" not in summary, summary
    assert "no CUDA device" in out.stdout


def test_bench_stages_run_the_goal_rows_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import common

    if common.QUICK or common.VARIANTS != fb.VARIANTS or common.DTYPES[0] != "bf16":
        pytest.skip("FASTBISENET_BENCH_* overrides change the rows")
    e2e = common.e2e_params()
    keys = [p.marks[0].args[0] for p in e2e]
    main, train = "1x3x1024x2048-bf16", "8x3x1024x1024-bf16"
    assert [e2e[i].id for i in common.run_order(keys, ("headline",))] == [
        f"pred-{main}-fastbisenet", f"pred-{main}-eager", f"pred-{main}-compile",
        f"train-{train}-fastbisenet", f"train-{train}-eager", f"train-{train}-compile", f"pred-{main}-max-autotune"]
    everything = common.run_order(keys)
    assert len(everything) == len(e2e) and everything[:7] == common.run_order(keys, ("headline",))
    assert f"train-{train}-max-autotune" in {e2e[i].id for i in common.run_order(keys, ("more",))}
    assert [e2e[i].id for i in common.run_order(keys, ("sizes",))] == [
        f"pred-1x3x{size}-bf16-{v}" for size in ("512x1024", "768x1536") for v in ("fastbisenet", "eager", "compile")]
    # per-op rows: bf16 batch 1 without max-autotune, each case's variants together, forward rows first
    ops = common.op_params("attention")
    order = common.run_order([p.marks[0].args[0] for p in ops], ("ops",))
    ids = [ops[i].id for i in order]
    assert ids and all("-bf16-" in i and not i.endswith("max-autotune") for i in ids)
    assert all(ops[i].values[0].input_shape[0] == 1 for i in order)
    assert [i.rsplit("-", 1)[1] for i in ids[:3]] == ["fastbisenet", "eager", "compile"]
    assert len({i.rsplit("-", 1)[0] for i in ids[:3]}) == 1
    passes = [ops[i].values[2] for i in order]
    assert passes == sorted(passes, key=lambda p: p != "fwd")
    # no row is lost: every key belongs to exactly one stage
    all_keys = [p.marks[0].args[0] for p in ops]
    staged = [i for st in common.STAGES for i in common.run_order(all_keys, (st,))]
    assert sorted(staged) == list(range(len(ops)))


class _FakeBenchmark:
    """The parts of pytest-benchmark's fixture that bench.common uses (the real hand-off is checked by
    test_feed_benchmark_reports_exact_samples)."""

    def __init__(self) -> None:
        self._timer: Any = None
        self.extra_info: dict[str, Any] = {}
        self.group: str | None = None
        self.reported_group: str | None = None
        self.durations: list[float] = []

    def pedantic(self, target: Any, rounds: int, iterations: int, warmup_rounds: int) -> None:
        self.reported_group = self.group  # as pytest-benchmark: the group is copied here, later changes are lost
        for _ in range(rounds):
            t0 = self._timer()
            target()
            self.durations.append(self._timer() - t0)


def test_benchmark_rows_pipeline_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench.common's row runner end to end on CPU (wall-clock timing and the reference ops standing
    in for CUDA events and the kernels), then the report over the rows it produced."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import common
    from fastbisenet import reference

    samples = [1.5, 2.5, 3.5]
    resolve_op = fb.resolve_op

    def fake_time_cuda(step: Any, **kw: Any) -> fb.Timing:
        step()
        if kw.get("l2_flush"):
            return fb.Timing(list(samples), "cuda-graph", 4, cache="cold-l2-flush", flush_bytes=1 << 27,
                             flush_ms=0.03)
        return fb.Timing(list(samples), "cuda-graph", 4)

    monkeypatch.setattr(common, "DEVICE", "cpu")
    monkeypatch.setattr(common, "_check_variant", lambda variant: None)
    monkeypatch.setattr(fb, "time_cuda", fake_time_cuda)  # bench.common calls fb.time_cuda
    monkeypatch.setattr(workloads, "resolve_op", lambda op, v: getattr(reference, op) if v == "fastbisenet"
                        else resolve_op(op, v))
    env = {"device_name": "cpu-test", "git_commit": "abc"}
    floors = {"matmul_tflops": 1.0, "copy_gbps": 10.0}
    benches = []
    cases = fb.trace_ops((2, 3, 32, 64), aux_mode="train")
    for op in ("conv_bn_act", "attend_add_upsample"):
        case = next(c for c in cases if c.op == op)
        for variant in ("fastbisenet", "eager"):
            benches.append(_FakeBenchmark())
            common.run_op(benches[-1], case, "fp32", "fwd+bwd", variant, floors, env)
    benches.append(_FakeBenchmark())
    common.run_e2e(benches[-1], "train", (2, 3, 32, 64), "fp32", "eager", floors, env)
    # an A/B pair (as bench/test_stem_ab.py): one group, the default arm as "fastbisenet"
    for arm in ("row", "flat"):
        benches.append(_FakeBenchmark())
        common.run_op(benches[-1], case, "fp32", "fwd", "fastbisenet", floors, env,
                      **common.ab_arm(common.op_group(case, "fp32", "fwd"), "stem_loop", arm, "row"))
    ab = benches[-2:]
    assert {b.reported_group for b in ab} == {f"stem_loop A/B: {common.op_group(case, 'fp32', 'fwd')}"}
    assert [b.extra_info["variant"] for b in ab] == ["fastbisenet", "fastbisenet stem_loop=flat"]
    assert [b.extra_info["stem_loop"] for b in ab] == ["row", "flat"]
    assert {b.extra_info["op"] for b in ab} == {"stem_loop A/B"}
    for b in benches:
        assert b.durations == pytest.approx([s * 1e-3 for s in samples])
        info = b.extra_info
        assert info["schema"] == fb.SCHEMA and info["timing"] == "cuda-graph" and info["iters_per_sample"] == 4
        assert info["dtype"] == "float32" and info["bytes"] > 0 and info["floor_copy_gbps"] == 10.0
        assert json.loads(json.dumps(info)) == info
    assert benches[0].extra_info["flops"] > 0 and benches[0].extra_info["pass"] == "fwd+bwd"
    # per-op rows are timed with a cold L2, end-to-end rows warm
    assert [b.extra_info["cache"] for b in benches] == ["cold-l2-flush"] * 4 + ["warm"] + ["cold-l2-flush"] * 2
    assert benches[0].extra_info["l2_flush_bytes"] == 1 << 27 and benches[4].extra_info["l2_flush_bytes"] is None
    train = benches[4].extra_info
    assert train["loss"].startswith("ohem")
    assert train["includes_optimizer_step"] is True and train["precision"] == "fp32 master weights, no autocast"
    assert train["compile_mode"] is None and train["autocast"] is None
    assert benches[4].extra_info["flops"] > 0 and benches[4].reported_group == "end_to_end train 2x3x32x64 fp32"
    data = {"benchmarks": [{"group": b.reported_group, "name": b.reported_group + b.extra_info["variant"],
                            "extra_info": b.extra_info, "stats": {"median": sorted(b.durations)[1]}}
                           for b in benches]}
    (tmp_path / "b.json").write_text(json.dumps(data))
    md = fb.report(tmp_path / "b.json", tmp_path / "out")["markdown"].read_text()
    assert "| 2.5000 | 2.5000 | 1.00x |" in md  # per-op: fastbisenet and eager times, speedup
    assert "| eager | 2.5000 | — |" in md  # end to end: no fastbisenet row, no speedup
    assert "L2 cache, per-op rows: `cold-l2-flush`" in md and "L2 cache, end-to-end rows: `warm`" in md
    assert "## stem_loop A/B" in md and "vs fastbisenet stem_loop=flat" in md and "duplicate" not in md
    # two rows of one (group, variant): the report says so and uses the first
    data["benchmarks"].append({**data["benchmarks"][0], "stats": {"median": 9.0}})
    (tmp_path / "dup.json").write_text(json.dumps(data))
    md = fb.report(tmp_path / "dup.json", tmp_path / "dup")["markdown"].read_text()
    assert "1 duplicate" in md and f"`{benches[0].reported_group}` / `fastbisenet`" in md
    assert "| 2.5000 | 2.5000 | 1.00x |" in md


# ----------------------------------------------------------------------------------------------
# cold-L2 timing, compile modes, training recipe
# ----------------------------------------------------------------------------------------------


def test_l2_flush_size_and_cold_samples() -> None:
    mib = 1 << 20
    assert fb.l2_flush_bytes(50 * mib) == 100 * mib  # 2x L2
    assert fb.l2_flush_bytes(50_000_000) == 96 * mib  # 2 x 47.7 MiB, rounded up to whole MiB
    assert fb.l2_flush_bytes(None) == fb.l2_flush_bytes(0) == fb.DEFAULT_FLUSH_BYTES == 128 * mib
    # (flush+op replay - flush-only replay) / iters, paired; timer noise cannot go negative
    assert fb.cold_samples([2.0, 2.2], [1.8, 2.3], 10) == pytest.approx([0.02, 0.0])
    with pytest.raises(ValueError):
        fb.cold_samples([1.0], [], 1)
    assert set(fb.CACHE_MODES) == {"cold-l2-flush", "warm"}


def test_timing_fields_reach_extra_info() -> None:
    t = fb.Timing([1.0], "cuda-graph", 7, cache="cold-l2-flush", flush_bytes=100 << 20, flush_ms=0.03,
                  l2_bytes=50 << 20)
    info = fb.extra_info(op="x", case="c", variant="max-autotune", pass_="fwd", dtype=torch.bfloat16, shape=[1],
                         flops=1, nbytes=2, timing=t, floors=None, env={})
    assert info["cache"] == "cold-l2-flush" and info["l2_flush_bytes"] == 100 << 20
    assert info["l2_flush_ms"] == 0.03 and info["l2_bytes"] == 50 << 20
    assert info["compile_mode"] == "max-autotune-no-cudagraphs"
    warm = fb.extra_info(op="x", case="c", variant="eager", pass_="fwd", dtype=torch.bfloat16, shape=[1],
                         flops=1, nbytes=2, timing=fb.Timing([1.0], "cuda-graph"), floors=None, env={})
    assert warm["cache"] == "warm" and warm["l2_flush_bytes"] is None and warm["compile_mode"] is None


def test_compile_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    """max-autotune runs without Inductor's cudagraphs: the harness's own graph capture wraps it."""
    seen: list[Any] = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    for variant in ("compile", "max-autotune"):
        assert fb.compile_fn(len, variant) is len
    assert seen == [{"dynamic": False, "mode": None}, {"dynamic": False, "mode": "max-autotune-no-cudagraphs"}]
    assert fb.variant_info("max-autotune") == {"compile_mode": "max-autotune-no-cudagraphs"}
    assert fb.variant_info("compile") == {"compile_mode": "default"}
    with pytest.raises(ValueError):
        fb.compile_fn(len, "eager")


def _train_workload(dtype: torch.dtype, **kw: Any) -> tuple[fb.ModelWorkload, list[torch.Tensor]]:
    wl = fb.model_workload("eager", (2, 3, 32, 64), dtype, aux_mode="train", device="cpu", **kw)
    model = next(c.cell_contents for c in wl.step.__closure__ or () if isinstance(c.cell_contents, torch.nn.Module))
    return wl, list(model.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_train_step_is_the_training_recipe(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 master weights, autocast forward, OHEM on three heads, backward, SGD step (fp16: GradScaler)."""
    wl, params = _train_workload(dtype)
    info = wl.info
    assert info["precision"] == f"fp32 master weights, autocast {fb.dtype_name(dtype)}"
    assert info["autocast"] == fb.dtype_name(dtype) and info["includes_optimizer_step"] is True
    assert info["optimizer"].startswith("SGD(momentum=0.9, weight_decay=0.0005")
    assert (info["grad_scaler"] is not None) == (dtype == torch.float16)
    assert all(p.dtype == torch.float32 for p in params)
    scaler = next(c.cell_contents for c in wl.step.__closure__ or ()
                  if isinstance(c.cell_contents, torch.amp.GradScaler))
    before = [p.detach().clone() for p in params]
    wl.step()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    changed = sum(not torch.equal(a, p) for a, p in zip(before, params, strict=True))
    if dtype == torch.bfloat16:
        assert not scaler.is_enabled()
        assert changed > len(params) // 2
        return
    # fp16 outside capture: exactly GradScaler.step -- a step that overflows (here the first, at the
    # initial scale 65536) is skipped and the scale backs off, as in `fastbisenet train`
    assert scaler.is_enabled()
    skipped = scaler.get_scale() < 65536.0
    assert (changed == 0) if skipped else (changed > 0)
    # inside capture: unscale_, step always taken (even on inf), update -- no host sync
    monkeypatch.setattr(workloads, "_capturing", lambda device_type: True)
    before = [p.detach().clone() for p in params]
    wl.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, params, strict=True))


def test_train_step_without_optimizer() -> None:
    wl, params = _train_workload(torch.float32, optimizer_step=False)
    assert wl.info["includes_optimizer_step"] is False and wl.info["autocast"] is None
    before = [p.detach().clone() for p in params]
    wl.step()
    assert all(torch.equal(a, p) for a, p in zip(before, params, strict=True))
    assert all(p.grad is not None for p in params)


def test_saved_tensor_bytes_counts_each_storage_once() -> None:
    """Distinct saved storages, excluded ones left out, the function's result returned."""
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8)

    def fn() -> torch.Tensor:
        h = x @ w  # saves x (w's gradient needs it; x needs none, so w is not saved)
        return (h * h).sum() + h.sin().sum()  # saves h once (two ops share its storage)

    nbytes, out = fb.saved_tensor_bytes(fn, exclude=[w, x])
    assert nbytes == 4 * 8 * 4 and out.requires_grad
    assert fb.saved_tensor_bytes(fn)[0] == 4 * 8 * 4 * 2  # x counted without the exclusion


def test_fused_training_forward_saves_less_than_eager() -> None:
    """Memory for backward of a v1 training forward (``model(x, labels)``, weights and batch excluded):
    the fused kernels save at most 0.8x what eager saves in fp32 (measured 0.74 at this size; the
    per-pixel losses' lse instead of log-softmax, int8 max-pool positions), and under fp16 autocast
    about half of their own fp32 figure (half-precision activations)."""
    def saved(variant: str, dtype: torch.dtype) -> int:
        wl = fb.model_workload(variant, (2, 3, 128, 128), dtype, aux_mode="train", device="cpu",
                               optimizer_step=False)
        return wl.saved_bytes()

    fused32, eager32 = saved("fastbisenet", torch.float32), saved("eager", torch.float32)
    assert fused32 <= 0.8 * eager32, (fused32, eager32)
    fused16 = saved("fastbisenet", torch.float16)
    assert fused16 <= 0.6 * fused32, (fused16, fused32)


def test_model_cost_train_counts_master_weights_and_optimizer() -> None:
    from fastbisenet.model import BiSeNet

    with torch.device("meta"):
        n_params = sum(p.numel() for p in BiSeNet(19, "train").parameters())
    shape = (8, 3, 1024, 1024)
    flops, nbytes = fb.model_cost(shape, torch.bfloat16, aux_mode="train")
    assert flops > 3 * fb.model_cost(shape, torch.bfloat16, aux_mode="eval")[0] * 0.9  # fwd + bwd
    # fp32 weights read, fp32 gradients written, SGD: gradients read, weights + momentum read and written
    assert nbytes > 7 * 4 * n_params + 8 * 3 * 1024 * 1024 * 4


# ----------------------------------------------------------------------------------------------
# bench/report.py and bench/gpu_suite.sh
# ----------------------------------------------------------------------------------------------


def _report_main() -> Any:
    sys.path.insert(0, str(ROOT))
    try:
        from bench import report as report_script
    finally:
        sys.path.remove(str(ROOT))
    return report_script.main


def test_report_script_fails_without_png(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    main = _report_main()
    js = _write_json(tmp_path / "b.json")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main([str(js), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "matplotlib is not installed" in err and "no end_to_end.png" in err
    assert (tmp_path / "out" / "report.md").exists()
    # an empty JSON has nothing to plot: not a failure; nor have per-op rows alone (the ab and ops stages), and a
    # peer timed at 0 (cold-L2 samples clamped) is left out of the geometric mean instead of failing the report
    (tmp_path / "empty.json").write_text(json.dumps({"benchmarks": []}))
    assert main([str(tmp_path / "empty.json"), str(tmp_path / "out2")]) == 0
    data = json.loads(js.read_text())
    data["benchmarks"] = [b for b in data["benchmarks"] if b["extra_info"]["op"] != "end_to_end"]
    data["benchmarks"][1]["stats"]["median"] = 0.0
    (tmp_path / "ops.json").write_text(json.dumps(data))
    assert main([str(tmp_path / "ops.json"), str(tmp_path / "out4")]) == 0
    assert "| conv_bn_act | fwd | bfloat16 | 4.00x (1) | 1.50x (1) |" in (tmp_path / "out4" / "report.md").read_text()
    # a `fastbisenet bench --json` file is not a pytest-benchmark JSON: said, not rendered as an empty report
    (tmp_path / "cli.json").write_text(json.dumps({"schema": fb.SCHEMA, "results": []}))
    with pytest.raises(ValueError, match="not a pytest-benchmark JSON"):
        fb.report(tmp_path / "cli.json", tmp_path / "out3")


def test_report_script_plots_end_to_end_rows(tmp_path: Path) -> None:
    """With end-to-end inference rows the PNG is written; per-op rows alone (the ab and ops stages) need none."""
    pytest.importorskip("matplotlib")
    data = json.loads(_write_json(tmp_path / "b.json").read_text())
    data["benchmarks"] = [b for b in data["benchmarks"] if b["extra_info"]["op"] != "end_to_end"]
    (tmp_path / "ops.json").write_text(json.dumps(data))
    assert _report_main()([str(tmp_path / "ops.json"), str(tmp_path / "ops")]) == 0
    assert not (tmp_path / "ops" / "end_to_end.png").exists()
    assert _report_main()([str(_write_json(tmp_path / "b.json")), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "end_to_end.png").read_bytes()[:4] == b"\x89PNG"


SUITE = ROOT / "bench" / "gpu_suite.sh"
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash not available")


def _suite(*args: str, env: dict[str, str] | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    base = _env("FASTBISENET_BENCH", "SUITE_")
    return subprocess.run(["bash", str(SUITE), *args], capture_output=True, text=True, timeout=timeout,
                          env={**base, **(env or {})})


@needs_bash
def test_gpu_suite_results_dir_suffix(tmp_path: Path) -> None:
    """--results: <device>_<date>/, then _2, _3, ... when it exists (bench/results/README.md)."""
    env = {"RESULTS_ROOT": str(tmp_path), "SUITE_DRY_RUN": "1"}
    if shutil.which("nvidia-smi"):
        pytest.skip("device name comes from nvidia-smi here")
    days = {dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")}

    def outdir() -> str:
        out = _suite("--results", env=env)
        days.add(dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"))
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().removeprefix("outdir: ")

    first = outdir()
    assert first in {str(tmp_path / f"unknown-device_{d}") for d in days}
    assert not Path(first).exists()  # a dry run creates nothing
    Path(first).mkdir()
    assert outdir() == first + "_2"
    Path(first + "_2").mkdir()
    assert outdir() == first + "_3"
    assert _suite("/some/dir", env={"SUITE_DRY_RUN": "1"}).stdout.strip() == "outdir: /some/dir"


@needs_bash
def test_gpu_suite_refuses_to_pack_into_its_own_outdir(tmp_path: Path) -> None:
    out = _suite(str(tmp_path / "run"), env={"SUITE_PACK": str(tmp_path / "run" / "run.tgz")})
    assert out.returncode == 2 and "must be outside OUTDIR" in out.stderr
    assert not (tmp_path / "run" / "summary.txt").exists()


@needs_bash
@pytest.mark.parametrize("case", ["import-error", "other-checkout"])
def test_gpu_suite_stops_when_fastbisenet_does_not_import(case: str, tmp_path: Path) -> None:
    """The import check stops the suite when fastbisenet does not import, and when it (or its kernels) would
    come from another place than this checkout (simulated: the check run from another directory)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    action = ('echo "ImportError: simulated" >&2; exit 1' if case == "import-error"
              else f'cd "{tmp_path}" && exec "{sys.executable}" "$@"')
    fake.write_text("#!/bin/sh\n"
                    f'case "$*" in *"import fastbisenet, fastbisenet.kernels"*) {action};; esac\n'
                    f'exec "{sys.executable}" "$@"\n')
    fake.chmod(0o755)
    out = _suite(str(tmp_path / "run"), env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "SKIP_INSTALL": "1",
                                             "FASTBISENET_GIT_COMMIT": "feedbeef"})
    assert out.returncode != 0
    summary = (tmp_path / "run" / "summary.txt").read_text()
    assert "stopping: fastbisenet does not import" in summary
    assert summary.rstrip().endswith("failed steps: import(rc=1)")
    import_log = (tmp_path / "run" / "import.log").read_text()
    assert ("ImportError: simulated" if case == "import-error" else "not this checkout") in import_log
    assert "\ncommit: feedbeef\n" in (tmp_path / "run" / "env.log").read_text()  # as on a device without .git
    assert not (tmp_path / "run" / "tests.log").exists() and not (tmp_path / "run" / "bench.log").exists()


FAKE_E2E_BENCH = """
import pytest

from fastbisenet.benchmark import feed_benchmark


@pytest.mark.bench_priority((0,))  # stage "headline" only
def test_fake_end_to_end(benchmark):
    benchmark.group = "end_to_end pred 1x3x64x64 bf16"
    feed_benchmark(benchmark, [1.0, 2.0, 3.0])
    benchmark.extra_info.update({"op": "end_to_end", "pass": "pred", "variant": "eager", "dtype": "bfloat16",
                                 "shape": [1, 3, 64, 64], "timing": "cuda-graph", "cache": "warm"})
"""


@needs_bash
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this would run the benchmarks")
@pytest.mark.parametrize("case", ["no-rows", "rows", "rows-no-matplotlib"])
def test_gpu_suite_flow_on_cpu(case: str, tmp_path: Path) -> None:
    """Without CUDA: env (all versions), import check, the bench/ rows all skipped (rc 0), then the
    report step: no rows -> failed (nothing ran); a stand-in end-to-end row -> report.md + PNG, success;
    the same without matplotlib -> the report step fails."""
    env = {"SKIP_INSTALL": "1", "SKIP_TESTS": "1", "SUITE_BENCH_STAGES": "headline,ab",
           "SUITE_PACK": str(tmp_path / "run.tgz")}
    extra: list[str] = []
    if case != "no-rows":
        (tmp_path / "fake").mkdir()
        (tmp_path / "fake" / "test_fake_bench.py").write_text(FAKE_E2E_BENCH)
        extra = [str(tmp_path / "fake")]
    if case == "rows-no-matplotlib":
        (tmp_path / "mods" / "matplotlib").mkdir(parents=True)
        (tmp_path / "mods" / "matplotlib" / "__init__.py").write_text("raise ImportError('simulated')\n")
        env["PYTHONPATH"] = str(tmp_path / "mods")
    out = _suite(str(tmp_path / "run"), *extra, env=env, timeout=300)
    run = tmp_path / "run"
    summary = (run / "summary.txt").read_text()
    assert "[import] rc=0" in summary and "[bench-headline] rc=0" in summary and "[bench-ab] rc=0" in summary, summary
    env_log = (run / "env.log").read_text()
    for dist in ("triton", "pytest", "pytest-benchmark", "hypothesis", "matplotlib", "numpy"):
        assert f"\n{dist} " in env_log, dist
    assert "no CUDA device" in (run / "bench-headline.log").read_text()
    # each stage ran only its own rows (here all skipped: no CUDA)
    assert " deselected" in (run / "bench-ab.log").read_text()
    with tarfile.open(tmp_path / "run.tgz") as tar:  # packed after the last step
        names = tar.getnames()
        assert "run/summary.txt" in names and "run/bench-ab.log" in names
        packed = tar.extractfile("run/summary.txt").read().decode()
    assert packed == summary
    if case == "no-rows":
        assert out.returncode == 1 and summary.rstrip().endswith("failed steps: report(no json)"), summary
    elif case == "rows":
        assert out.returncode == 0 and summary.rstrip().endswith("failed steps: none"), summary
        assert (run / "end_to_end.png").read_bytes()[:4] == b"\x89PNG"
        report = (run / "report.md").read_text()
        assert "L2 cache, end-to-end rows: `warm`" in report and "[bench-ab] rc=0" in report
        assert "duplicate" not in report  # the stand-in row's key puts it in one stage
        assert "1 passed" in (run / "bench-headline.log").read_text()
        assert " passed" not in (run / "bench-ab.log").read_text()  # the stand-in is deselected there
    else:
        assert out.returncode == 1 and summary.rstrip().endswith("failed steps: report(rc=1)"), summary
        assert "matplotlib is not installed" in (run / "report.log").read_text()
        assert (run / "report.md").exists() and not (run / "end_to_end.png").exists()


@needs_bash
def test_gpu_suite_runs_test_files_in_parallel(tmp_path: Path) -> None:
    """The tests step: one pytest process per file, TEST_JOBS at a time; a log and JUnit XML per file;
    the step fails when any file fails (a file without tests, pytest rc 5, does not count); a file that
    hangs is killed by its own timeout before the step's, so no pytest outlives the step."""
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_ok.py").write_text("def test_ok():\n    assert True\n")
    (tests / "test_bad.py").write_text("def test_bad():\n    assert 1 == 2\n")
    (tests / "test_empty.py").write_text("X = 1\n")
    # a file stuck where SIGINT does not reach (as in a compile or a CUDA sync): killed by its own timeout
    (tests / "test_stuck.py").write_text("import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                                         "def test_stuck():\n    time.sleep(120)\n")
    env = {"SKIP_INSTALL": "1", "SUITE_TESTS_DIR": str(tests), "TEST_JOBS": "2", "SUITE_BUDGET_S": "60",
           "TESTS_TIMEOUT_S": "25"}
    out = _suite(str(tmp_path / "run"), env=env, timeout=300)
    run = tmp_path / "run"
    summary = (run / "summary.txt").read_text()
    assert out.returncode == 1 and "failed steps: tests(rc=123)" in summary, summary
    for name, verdict in (("test_ok", "1 passed"), ("test_bad", "1 failed"), ("test_empty", "no tests ran")):
        assert verdict in (run / "tests" / f"{name}.log").read_text(), name
        assert (run / "tests" / f"{name}.xml").exists(), name
    log = (run / "tests.log").read_text()
    assert "test_ok rc=0" in log and "test_bad rc=1" in log and "test_empty rc=5" in log
    assert "test_stuck rc=137" in log  # INT at TESTS_TIMEOUT_S - 15, ignored, KILL 5 s later



def test_floor_budget_accounts_for_the_whole_forward(monkeypatch) -> None:
    """bench/floor_budget.py: every fused op of the pred forward has a row, nothing runs outside them,
    and an op that bypasses the fused ops shows up as an unfused row."""
    from bench import floor_budget

    shape = (1, 3, 64, 128)
    rows = floor_budget.budget(shape)
    ops = {r.op for r in rows}
    assert {"conv_bn_act", "conv_bn_act_pair", "concat_conv_bn_act", "max_pool2d", "bn_attention",
            "attend_add_upsample", "attend_residual", "head_argmax", "global_context"} == ops
    conv = next(r for r in rows if r.op == "conv_bn_act")
    assert conv.floor_us(1.0, 1.0) == pytest.approx(conv.calls * max(conv.flops / 1e12, conv.nbytes / 1e9) * 1e6)
    text = floor_budget.render(rows, shape=shape, dtype=torch.bfloat16, aux_mode="pred", tflops=790, gbps=4800)
    assert "Sum of per-op floors" in text and "| max_pool2d |" in text
    assert floor_budget.unfused_ops(shape, torch.bfloat16, aux_mode="pred", preset="v1", backbone="resnet18",
                                    n_classes=19) == {}
    # a forward that also pools with PyTorch directly: that aten op is listed (input + output + indices)
    from fastbisenet.model import BiSeNet

    forward = BiSeNet.forward

    def pooling_forward(self, x):
        torch.ops.aten.max_pool2d_with_indices(x, [3, 3], [2, 2], [1, 1])
        out = forward(self, x)
        torch.zeros(16, device=x.device)  # a factory op with device work
        return out.add_(1)  # in-place glue writes too

    monkeypatch.setattr(BiSeNet, "forward", pooling_forward)
    unfused = floor_budget.unfused_ops(shape, torch.bfloat16, aux_mode="pred", preset="v1", backbone="resnet18",
                                      n_classes=19)
    n, c, h, w = shape
    assert unfused == {"max_pool2d_with_indices": [n * c * h * w * 2 + n * c * (h // 2) * (w // 2) * (2 + 8)],
                       "zeros": [16 * 4], "add_": [2 * n * h * w * 4]}
