"""Benchmark machinery shared by ``bench/`` and the ``fastbisenet bench`` subcommand.

- Timing: :func:`time_cuda` warms up, captures the work in a CUDA graph and replays it, timing
  each replay with CUDA events (plain launches + events when capture fails, recorded as such);
  with ``l2_flush=True`` every iteration starts from a cold L2 (see :func:`time_cuda`);
  :func:`feed_benchmark` hands those per-iteration GPU times to pytest-benchmark unchanged.
- Cost model: :func:`trace_ops` runs the model on the ``meta`` device and records every call that
  goes through :mod:`fastbisenet.ops`, so per-op shapes come from the model itself;
  :func:`op_cost` / :func:`model_cost` count FLOPs (``torch.utils.flop_counter``, conv/matmul only)
  and the minimal bytes moved (inputs read once + outputs written once).
- Floors: :func:`measure_floors` (bf16 matmul TFLOP/s, device-to-device copy GB/s).
- Report: :func:`report` turns a pytest-benchmark JSON into ``report.md`` (+ ``end_to_end.png``).
- CLI: :func:`add_parser` / :func:`run` implement ``fastbisenet bench``.

Every benchmark row carries the same ``extra_info`` schema (:data:`SCHEMA`, see :func:`extra_info`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import functools
import gc
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

SCHEMA = "fastbisenet-bench/2"
VARIANTS = ("fastbisenet", "eager", "compile", "max-autotune")
"""fastbisenet = Triton backend; eager = reference ops (cuDNN); compile / max-autotune = torch.compile
of the reference (:data:`COMPILE_MODES`)."""
COMPILE_MODES: dict[str, str] = {"compile": "default", "max-autotune": "max-autotune-no-cudagraphs"}
"""``torch.compile(mode=...)`` of each compile variant. max-autotune runs without Inductor's own
CUDA graphs: the harness captures every step in its own CUDA graph, and Inductor's cudagraph trees
inside that capture would either be captured twice or fall back; kernel selection is the same."""
CACHE_MODES: dict[str, str] = {
    "cold-l2-flush": "a write of an L2-flush buffer (>= 2x L2) before every iteration evicts the op's inputs "
                     "and weights; the flush's own time, measured the same way, is subtracted",
    "warm": "back-to-back iterations: what fits in L2 stays there between iterations (weights, as in a "
            "deployed model running frame after frame)",
}
"""The ``cache`` field of a row's ``extra_info`` and what it means."""
DEFAULT_FLUSH_BYTES = 128 << 20
"""L2-flush buffer when the device does not report its L2 size."""
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
REPO_ROOT = Path(__file__).resolve().parents[1]
IGNORE_INDEX = 255


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


# ----------------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------------


def git_commit() -> str:
    """The checkout's commit (``+dirty`` when the tree has changes), ``$FASTBISENET_GIT_COMMIT``, or
    ``"unknown"``."""
    if os.environ.get("FASTBISENET_GIT_COMMIT"):
        return os.environ["FASTBISENET_GIT_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def env_info(device: str | torch.device | None = None) -> dict[str, Any]:
    """Device name and versions of everything that changes the numbers."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    return {
        "device_name": torch.cuda.get_device_name(device) if cuda else (platform.processor() or "cpu"),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(),
        "git_commit": git_commit(),
    }


def autotune_choices() -> list[dict[str, Any]]:
    """The config each Triton autotuner of :mod:`fastbisenet.kernels` picked in this process, per key.

    One entry per (kernel, key): ``kernel``, ``key`` (the tuner's key arguments by name), ``dtypes`` (of
    its tensor arguments, as Triton appends them to the key) and ``config`` (the config's constexprs plus
    ``num_warps``/``num_stages``). The benchmarks record this so that a GPU run says which tiles and
    K-loop forms won at which shapes.
    """
    import pkgutil

    from triton.runtime.autotuner import Autotuner

    from fastbisenet import kernels

    out = []
    for mod_info in pkgutil.iter_modules(kernels.__path__):
        mod = importlib.import_module(f"{kernels.__name__}.{mod_info.name}")
        for tuner in vars(mod).values():
            if not isinstance(tuner, Autotuner):
                continue
            name = getattr(getattr(tuner, "base_fn", None), "__name__", None) or getattr(tuner.fn, "__name__", "?")
            n = len(tuner.keys)
            for key, cfg in tuner.cache.items():
                values = [v if isinstance(v, (int, float, bool, str)) or v is None else str(v) for v in key]
                out.append({"kernel": name, "key": dict(zip(tuner.keys, values[:n], strict=False)),
                            "dtypes": sorted(set(map(str, values[n:]))),
                            "config": {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}})
    return sorted(out, key=lambda d: (d["kernel"], json.dumps(d["key"], sort_keys=True), d["dtypes"]))


def autotune_lines(choices: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown tables of :func:`autotune_choices`: per kernel, each key's winning config (``choices`` may be
    ``{"error": ...}`` when they could not be read)."""
    if not choices:
        return []
    if isinstance(choices, dict):
        choices = [choices]
    lines = ["## Autotune choices", "",
             "The config Triton's autotuner picked for each key the run launched (ONE_LOOP: the conv's K loop as "
             "one loop over (tap, channel block) steps; else nested per tap). Each benchmark stage is its own "
             "process and tunes afresh: a key can have one choice per stage.", ""]
    for c in choices:
        if "error" in c:
            lines += [f"Not recorded{' (stage ' + c['stage'] + ')' if c.get('stage') else ''}: {c['error']}", ""]
    by_kernel: dict[str, list[dict[str, Any]]] = {}
    for c in choices:
        if "kernel" in c:
            by_kernel.setdefault(c["kernel"], []).append(c)
    staged = any(c.get("stage") for cs in by_kernel.values() for c in cs)
    for kernel, cs in sorted(by_kernel.items()):
        lines += [f"### {kernel}", "", "| key | dtypes | config |" + (" stage |" if staged else ""),
                  "|---|---|---|" + ("---|" if staged else "")]
        for c in cs:
            key = ", ".join(f"{k}={v}" for k, v in c["key"].items())
            dts = ", ".join(d.removeprefix("torch.") for d in c["dtypes"])
            cfg = " ".join(f"{k.removeprefix('BLOCK_').removeprefix('num_')}={v}" for k, v in c["config"].items())
            lines.append(f"| {key} | {dts} | {cfg} |" + (f" {c.get('stage', '')} |" if staged else ""))
        lines.append("")
    return lines


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Per-iteration times of one measured workload."""

    samples_ms: list[float]
    """One entry per sample: the GPU (or wall) time of ``iters_per_sample`` iterations / iters."""
    method: str
    """``"cuda-graph"`` (events around graph replays), ``"events"`` (plain launches timed with CUDA
    events) or ``"wall"`` (CPU, ``time.perf_counter``)."""
    iters_per_sample: int = 1
    note: str = ""
    """Why graph capture was not used, when it was requested and failed."""
    cache: str = "warm"
    """:data:`CACHE_MODES` key: ``"warm"`` or ``"cold-l2-flush"``."""
    flush_bytes: int | None = None
    """Size of the L2-flush buffer written before each iteration (cold-L2 timing)."""
    flush_ms: float | None = None
    """Median time of one flush, measured the same way and subtracted from every sample."""
    l2_bytes: int | None = None
    """The device's L2 size as reported by ``torch.cuda.get_device_properties`` (None if unknown)."""

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def l2_flush_bytes(l2_bytes: int | None) -> int:
    """Size of the L2-flush buffer: twice the L2 (rounded up to MiB), or :data:`DEFAULT_FLUSH_BYTES`
    when the L2 size is unknown. Twice, because L2 replacement is not strict LRU and H100-class parts
    split L2 in two partitions that may each hold a copy of a line."""
    if not l2_bytes or l2_bytes <= 0:
        return DEFAULT_FLUSH_BYTES
    mib = 1 << 20
    return -(-2 * int(l2_bytes) // mib) * mib


def device_l2_bytes(device: Any = None) -> int | None:
    """``L2_cache_size`` of the CUDA device (None when torch does not report it)."""
    size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None)
    return int(size) if size else None


def cold_samples(with_flush_ms: Sequence[float], flush_only_ms: Sequence[float], iters: int) -> list[float]:
    """Per-iteration op times from paired replays: (flush+op replay - flush-only replay) / iters,
    floored at 0 (only possible through timer noise on an op far shorter than the flush)."""
    if len(with_flush_ms) != len(flush_only_ms):
        raise ValueError("paired samples expected")
    return [max(t - f, 0.0) / iters for t, f in zip(with_flush_ms, flush_only_ms, strict=True)]


def time_cuda(fn: Callable[[], Any], *, rounds: int = 20, warmup: int = 3, sample_ms: float = 2.0,
              max_iters: int = 200, use_graph: bool = True, l2_flush: bool = False) -> Timing:
    """Device-side time per call of ``fn`` (which must only launch work on the current device).

    Warm-up on a side stream (as CUDA-graph capture requires), then ``iters`` calls are captured in
    one graph, ``iters`` chosen so one replay lasts about ``sample_ms``; each sample is one replay
    timed with CUDA events, divided by ``iters``. If capture fails the same loop runs as plain
    launches between the events and the result says so.

    ``l2_flush`` (cold L2): back to back, a small op would re-read inputs and weights that the
    previous iteration left in L2 (50 MB on an H100), and beat a DRAM floor that it never pays.
    So every iteration first writes a flush buffer of >= 2x L2 (:func:`l2_flush_bytes`), which
    evicts everything the op touched. The flush's own time is measured the same way -- a second
    graph of ``iters`` flushes alone -- and the two graphs are replayed in pairs, each sample being
    (flush+op - flush) / iters (:func:`cold_samples`); pairing cancels clock and thermal drift. The
    dirty flush lines that the op evicts are written back during the op, but the flush-only graph
    pays the same write-backs in its next flush, so the difference is the op's cold cost. Cost: a
    flush is ~bytes / write bandwidth (about 30 us for 100 MB on an H100) per iteration and a second
    replay per sample, so a row takes about twice the replay time of a warm one plus one more capture.
    """
    torch.cuda.synchronize()
    flush_buf: Tensor | None = None
    l2 = device_l2_bytes() if l2_flush else None
    nflush = l2_flush_bytes(l2) if l2_flush else None
    if nflush:
        flush_buf = torch.empty(nflush // 4, dtype=torch.int32, device="cuda")

    def flush() -> None:
        assert flush_buf is not None
        flush_buf.fill_(1)  # a write: evicts every line, and is an SM kernel (not a copy-engine memset)

    def body() -> None:
        if flush_buf is not None:
            flush()
        fn()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(warmup, 1)):
            body()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def elapsed(run: Callable[[], Any]) -> float:
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    estimate = min(elapsed(body) for _ in range(3))
    iters = max(1, min(max_iters, math.ceil(sample_ms / max(estimate, 1e-3))))

    def loop(call: Callable[[], Any]) -> Callable[[], None]:
        def run_loop() -> None:
            for _ in range(iters):
                call()
        return run_loop

    run: Callable[[], Any] = loop(body)
    run_flush: Callable[[], Any] | None = loop(flush) if flush_buf is not None else None
    method, note = "events", ""
    graphs: list[Any] = []
    if use_graph:
        try:
            for target in [run, run_flush] if run_flush else [run]:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    target()
                graph.replay()
                torch.cuda.synchronize()
                graphs.append(graph)
            run, method = graphs[0].replay, "cuda-graph"
            if run_flush:
                run_flush = graphs[1].replay
        except Exception as exc:  # capture is best effort: anything that syncs or allocs on host fails
            note = "graph capture failed: " + _first_line(exc)
            graphs = []
            with contextlib.suppress(Exception):
                torch.cuda.synchronize()
    if run_flush is None:
        samples = [elapsed(run) / iters for _ in range(rounds)]
        timing = Timing(samples, method, iters, note)
    else:
        pairs = [(elapsed(run), elapsed(run_flush)) for _ in range(rounds)]
        samples = cold_samples([p[0] for p in pairs], [p[1] for p in pairs], iters)
        flush_ms = statistics.median(p[1] for p in pairs) / iters
        timing = Timing(samples, method, iters, note, cache="cold-l2-flush", flush_bytes=nflush,
                        flush_ms=flush_ms, l2_bytes=l2)
    del graphs  # the flush buffer goes with this frame
    return timing


def time_cpu(fn: Callable[[], Any], *, rounds: int = 10, warmup: int = 1) -> Timing:
    """Wall time per call on the CPU."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return Timing(samples, "wall", 1)


def peak_memory(fn: Callable[[], Any]) -> int | None:
    """``torch.cuda.max_memory_allocated`` over one plain call of ``fn`` (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


def saved_tensor_bytes(fn: Callable[[], Any], exclude: Iterable[Tensor] = ()) -> tuple[int, Any]:
    """``(bytes, fn())``: the distinct storages autograd saves for backward while ``fn`` runs (a training
    forward), each counted once, those of ``exclude`` (parameters, inputs) left out; on any device.

    This is what a training step holds between forward and backward beyond its weights and batch (the
    bulk of its peak memory), read from ``saved_tensors_hooks`` (custom ``autograd.Function``s
    included). Keep the returned result alive as long as the figure should hold.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    sizes: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            sizes[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(sizes.values()), out


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def measure_floors(*, matmul_size: int = 8192, copy_bytes: int = 1 << 30, rounds: int = 10) -> dict[str, float]:
    """Best-of-``rounds`` bf16 matmul rate (TFLOP/s) and device-to-device copy bandwidth (GB/s,
    bytes read + bytes written per second) on the current CUDA device."""
    n = matmul_size
    a, b, c = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mm = time_cuda(functools.partial(torch.mm, a, b, out=c), rounds=rounds, warmup=3, sample_ms=5.0,
                   use_graph=False)
    src, dst = (torch.empty(copy_bytes // 2, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cp = time_cuda(functools.partial(dst.copy_, src), rounds=rounds, warmup=3, sample_ms=5.0, use_graph=False)
    floors = {
        "matmul_tflops": 2 * n**3 / (min(mm.samples_ms) * 1e-3) / 1e12,
        "copy_gbps": 2 * copy_bytes / (min(cp.samples_ms) * 1e-3) / 1e9,
    }
    del a, b, c, src, dst
    free_memory()
    return floors


class _ReplayClock:
    """A pytest-benchmark timer that advances only by the samples it is given (in seconds)."""

    __name__ = "fastbisenet.benchmark.cuda_event_time"

    def __init__(self, samples_s: Sequence[float]) -> None:
        self.samples = list(samples_s)
        self.now = 0.0
        self.i = 0

    def __call__(self) -> float:
        return self.now

    def advance(self) -> None:
        self.now += self.samples[self.i]
        self.i += 1


def feed_benchmark(benchmark: Any, samples_ms: Sequence[float]) -> None:
    """Record ``samples_ms`` as the rounds of a pytest-benchmark ``benchmark`` fixture, exactly.

    The fixture times each round with its timer; swapping in a clock that moves by one measured
    sample per round makes every reported statistic the measured per-iteration device time.
    """
    if not samples_ms:
        raise ValueError("no samples to record")
    if not hasattr(benchmark, "_timer"):
        raise RuntimeError("this pytest-benchmark version has no BenchmarkFixture._timer to replace")
    clock = _ReplayClock([s * 1e-3 for s in samples_ms])
    benchmark._timer = clock
    benchmark.pedantic(clock.advance, rounds=len(samples_ms), iterations=1, warmup_rounds=0)


# ----------------------------------------------------------------------------------------------
# per-op cases traced from the model
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str = "float"
    """``"float"`` (the benchmark dtype) or a fixed dtype name such as ``"int64"``."""
    channels_last: bool = True
    """4-D float tensors are made channels_last (the fused model's activations) unless this is False."""


@dataclass(frozen=True)
class ListSpec:
    items: tuple[Any, ...]


@dataclass(frozen=True)
class ConvSpec:
    in_ch: int
    out_ch: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    bias: bool


@dataclass(frozen=True)
class BNSpec:
    features: int
    eps: float
    momentum: float | None


@dataclass(frozen=True)
class OpCase:
    """One distinct call of a fused op in a model forward, with how often it occurs."""

    op: str
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...]
    calls: int
    where: tuple[str, ...]
    """Module paths of the call sites."""
    input_shape: tuple[int, ...]
    preset: str

    @property
    def label(self) -> str:
        return case_label(self)


def _spec(v: Any) -> Any:
    if isinstance(v, Tensor):
        return TensorSpec(tuple(v.shape), "float" if v.is_floating_point() else dtype_name(v.dtype))
    if isinstance(v, (list, tuple)) and any(isinstance(t, Tensor) for t in v):
        return ListSpec(tuple(_spec(t) for t in v))
    if isinstance(v, torch.Size):
        return tuple(int(s) for s in v)
    if isinstance(v, nn.Conv2d):
        if v.groups != 1 or v.dilation != (1, 1):
            raise NotImplementedError("grouped/dilated convs are not part of BiSeNet")
        return ConvSpec(v.in_channels, v.out_channels, tuple(v.kernel_size), tuple(v.stride),
                        tuple(v.padding), v.bias is not None)
    if isinstance(v, nn.BatchNorm2d):
        return BNSpec(v.num_features, v.eps, v.momentum)
    if isinstance(v, tuple):
        return tuple(_spec(t) for t in v)
    return v


@contextlib.contextmanager
def _recording_ops(sink: list[tuple[str, str, tuple, tuple]]) -> Iterator[list[str]]:
    """Route every ``ops.impl(...)`` to the reference ops while recording each call; yields the
    stack of module paths that the caller's hooks maintain (the innermost names the call site)."""
    from fastbisenet import ops, reference

    stack: list[str] = []

    class Recorder:
        def __getattr__(self, name: str) -> Callable[..., Any]:
            fn = getattr(reference, name)

            def call(*args: Any, **kwargs: Any) -> Any:
                sink.append((name, stack[-1] if stack else "", tuple(_spec(a) for a in args),
                             tuple(sorted((k, _spec(v)) for k, v in kwargs.items()))))
                return fn(*args, **kwargs)

            return call

    recorder = Recorder()
    original = ops.impl
    ops.impl = lambda backend, x: recorder
    try:
        yield stack
    finally:
        ops.impl = original


def trace_ops(input_shape: Sequence[int], *, aux_mode: str = "train", preset: str = "v1",
              backbone: str = "resnet18", n_classes: int = 19, labels: bool = False) -> list[OpCase]:
    """Distinct fused-op calls of one forward of the model at ``input_shape`` (run on ``meta``); with
    ``labels``, the training loss's forward ``model(x, labels)`` (heads + per-pixel CE)."""
    from fastbisenet.model import BiSeNet

    with torch.device("meta"):
        model = BiSeNet(n_classes, aux_mode, preset=preset, backbone=backbone, backend="torch")
    model.eval()  # shapes do not depend on the mode; batch-1 training fails on 1x1 BN inputs
    sink: list[tuple[str, str, tuple, tuple]] = []
    names = {m: n for n, m in model.named_modules()}
    with _recording_ops(sink) as stack:
        def enter(m: nn.Module, args: Any) -> None:
            stack.append(names[m])

        def leave(m: nn.Module, args: Any, out: Any) -> None:
            stack.pop()

        handles = []
        for m in model.modules():
            handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
        try:
            with torch.no_grad():
                x = torch.empty(*input_shape, device="meta")
                if labels:
                    n, _, h, w = input_shape
                    model(x, torch.empty((n, h, w), dtype=torch.int64, device="meta"), ignore_index=IGNORE_INDEX)
                else:
                    model(x)
        finally:
            for h in handles:
                h.remove()
    cases: dict[tuple, list[str]] = {}
    for name, where, args, kwargs in sink:
        cases.setdefault((name, args, kwargs), []).append(where)
    return [OpCase(op, args, kwargs, len(w), tuple(w), tuple(input_shape), preset)
            for (op, args, kwargs), w in cases.items()]


def case_label(case: OpCase) -> str:
    """A short readable id, e.g. ``3x3s2 64->128 @1x64x256x512 +res``."""
    kw = dict(case.kwargs)
    tensors = [a for a in case.args if isinstance(a, (TensorSpec, ListSpec))]

    def shp(t: Any) -> str:
        if isinstance(t, ListSpec):
            return "cat(" + ",".join(shp(i) for i in t.items) + ")"
        return shape_str(t.shape)

    convs = [a for a in case.args if isinstance(a, ConvSpec)]
    pairs = [a[0] for a in case.args if isinstance(a, tuple) and a and isinstance(a[0], ConvSpec)]
    if case.op == "conv_bn_act_pair" and pairs:
        c = pairs[0]
        widths = "+".join(str(p.out_ch) for p in pairs)
        return f"{c.kernel[0]}x{c.kernel[1]}s{c.stride[0]} {c.in_ch}->{widths} @{shp(tensors[0])}"
    if case.op in ("conv_bn_act", "concat_conv_bn_act") and convs:
        c = convs[0]
        s = f"{c.kernel[0]}x{c.kernel[1]}s{c.stride[0]} {c.in_ch}->{c.out_ch} @{shp(tensors[0])}"
        if isinstance(kw.get("residual"), TensorSpec):
            s += " +res"
        if kw.get("relu", True) is False:
            s += " norelu"
        if kw.get("pool"):
            s += " +pool"
        return s
    parts = [shp(t) for t in tensors]
    sizes = [a for a in case.args if isinstance(a, tuple) and all(isinstance(i, int) for i in a)]
    if sizes:
        parts.append("->" + shape_str(sizes[0]))
    if case.op.startswith("head") and convs:
        parts.insert(1, f"1x1 {convs[0].in_ch}->{convs[0].out_ch}")
    extra = [a for a in case.args if isinstance(a, (str, bool))]
    if extra:
        parts.append(",".join(str(e) for e in extra))
    return " ".join(parts)


def _make_tensor(spec: TensorSpec, device: torch.device | str, dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    if spec.dtype != "float":
        return torch.zeros(spec.shape, dtype=getattr(torch, spec.dtype), device=device)
    if torch.device(device).type == "meta":
        t = torch.empty(spec.shape, device="meta", dtype=dtype)
    else:  # generated on the device: fast for the large activations
        t = torch.randn(spec.shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 and spec.channels_last else t


def _make_module(spec: ConvSpec | BNSpec, device: torch.device | str, dtype: torch.dtype,
                 gen: torch.Generator) -> nn.Module:
    if isinstance(spec, ConvSpec):
        m: nn.Module = nn.Conv2d(spec.in_ch, spec.out_ch, spec.kernel, spec.stride, spec.padding, bias=spec.bias)
        with torch.no_grad():
            m.weight.normal_(0, math.sqrt(2 / (spec.in_ch * spec.kernel[0] * spec.kernel[1])), generator=gen)
    else:
        m = nn.BatchNorm2d(spec.features, eps=spec.eps, momentum=spec.momentum)
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5, generator=gen)
            m.bias.normal_(0, 0.1, generator=gen)
            m.running_mean.normal_(0, 0.1, generator=gen)
            m.running_var.uniform_(0.5, 1.5, generator=gen)
    return m.to(device=device, dtype=dtype, memory_format=torch.channels_last)


def materialize(case: OpCase, device: torch.device | str, dtype: torch.dtype, *, train: bool,
                seed: int = 0) -> tuple[list[Any], dict[str, Any]]:
    """Real arguments for ``case``: random channels_last tensors in ``dtype``, fresh modules in
    train or eval mode; with ``train`` the float tensors and the parameters require grad."""
    gen = torch.Generator().manual_seed(seed)
    dev_gen = gen if torch.device(device).type in ("cpu", "meta") else \
        torch.Generator(device=device).manual_seed(seed)

    def make(spec: Any) -> Any:
        if isinstance(spec, TensorSpec):
            t = _make_tensor(spec, device, dtype, dev_gen)
            return t.requires_grad_(train and t.is_floating_point())
        if isinstance(spec, ListSpec):
            return [make(s) for s in spec.items]
        if isinstance(spec, (ConvSpec, BNSpec)):
            return _make_module(spec, device, dtype, gen).train(train).requires_grad_(train)
        if isinstance(spec, tuple):  # a (conv, bn) pair of conv_bn_act_pair
            return tuple(make(s) for s in spec)
        return spec

    return [make(a) for a in case.args], {k: make(v) for k, v in case.kwargs}


def _leaves(args: Sequence[Any], kwargs: dict[str, Any]) -> list[Tensor]:
    """Tensors and parameters of a call, flattened, each once."""
    out: dict[int, Tensor] = {}
    for v in [*args, *kwargs.values()]:
        items = v if isinstance(v, (list, tuple)) else [v]
        for item in items:
            if isinstance(item, Tensor):
                out[id(item)] = item
            elif isinstance(item, nn.Module):
                for t in [*item.parameters(), *item.buffers()]:
                    out[id(t)] = t
    return list(out.values())


def _outputs(out: Any) -> list[Tensor]:
    """The tensors an op returned (``conv_bn_act(pool=True)`` returns ``(out, sums)``; the reference's
    ``sums`` is ``None``)."""
    return [t for t in (out if isinstance(out, (list, tuple)) else [out]) if isinstance(t, Tensor)]


def _nbytes(tensors: Any) -> int:
    if isinstance(tensors, Tensor):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, (list, tuple)):
        return sum(_nbytes(t) for t in tensors)
    return 0


def count_flops(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Conv/matmul FLOPs of ``fn()`` counted by ``torch.utils.flop_counter``, and its result."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        result = fn()
    return int(counter.get_total_flops()), result


def op_cost(case: OpCase, dtype: torch.dtype, *, backward: bool) -> tuple[int, int]:
    """(FLOPs, bytes) of one call: bytes = inputs (tensors, parameters, BN buffers) read once +
    outputs written once; with ``backward`` also the output gradient read and every input/parameter
    gradient written. Computed on the ``meta`` device, no GPU needed."""
    from fastbisenet import reference

    args, kwargs = materialize(case, "meta", dtype, train=backward)
    fn = getattr(reference, case.op)
    leaves = _leaves(args, kwargs)

    def work() -> Any:
        out = fn(*args, **kwargs)
        if backward:
            outs = _outputs(out)
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        return out

    if backward:
        flops, out = count_flops(work)
    else:
        with torch.no_grad():
            flops, out = count_flops(work)
    nbytes = _nbytes(leaves) + _nbytes(out)
    if backward:
        nbytes += _nbytes(out) + sum(_nbytes(t) for t in leaves if t.requires_grad)
    return flops, nbytes


def model_cost(input_shape: Sequence[int], dtype: torch.dtype, *, aux_mode: str, n_classes: int = 19,
               preset: str = "v1", backbone: str = "resnet18") -> tuple[int, int]:
    """(FLOPs, bytes) of a forward (``aux_mode`` "pred"/"eval") or a training step (``"train"``) of the
    whole model: input, labels, parameters and buffers read once, outputs written once.

    Inference runs in ``dtype`` throughout. A training step is what :func:`model_workload` runs (the
    recipe of ``fastbisenet train``): fp32 input and master weights read, activations and outputs in
    ``dtype`` (autocast), fp32 parameter gradients written, then the SGD step reading the gradients
    and reading + writing the parameters and momentum buffers."""
    from fastbisenet.model import BiSeNet

    with torch.device("meta"):
        model = BiSeNet(n_classes, aux_mode, preset=preset, backbone=backbone, backend="torch")
    model = model.to(dtype=dtype).train(aux_mode == "train")
    x = torch.empty(*input_shape, device="meta", dtype=dtype)
    train = aux_mode == "train"

    def work() -> Any:
        if not train:
            return model(x)
        n, _, h, w = input_shape
        out = model(x, torch.zeros((n, h, w), dtype=torch.int64, device="meta"))  # the heads' per-pixel CE
        torch.autograd.backward(sum(o.sum() for o in out))
        return out

    with torch.set_grad_enabled(train):
        flops, out = count_flops(work)
    if not train:
        return flops, _nbytes(x) + _nbytes([*model.parameters(), *model.buffers()]) + _nbytes(out)
    n, _, h, w = input_shape
    n_params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() * (4 if b.is_floating_point() else b.element_size()) for b in model.buffers())
    fp32 = 4
    nbytes = (x.numel() * fp32 + n * h * w * 8 + n_params * fp32 + buffers + _nbytes(out)  # forward
              + n_params * fp32  # parameter gradients written
              + n_params * fp32 * 5)  # SGD: gradients read, parameters and momentum read + written
    return flops, nbytes


# ----------------------------------------------------------------------------------------------
# workloads
# ----------------------------------------------------------------------------------------------


class OpUnavailable(LookupError):
    """The fused backend has no such op (the benchmark row is skipped, not failed)."""


def resolve_op(op: str, variant: str) -> Callable[..., Any]:
    """The callable for ``op`` in ``variant``; raises :class:`OpUnavailable` when the fused namespace lacks
    it. ``compile`` variants reset dynamo first, so each starts fresh."""
    from fastbisenet import reference

    if variant == "fastbisenet":
        fused = importlib.import_module("fastbisenet.ops.fused")
        if not hasattr(fused, op):
            raise OpUnavailable(f"fastbisenet.ops.fused has no {op!r}")
        return getattr(fused, op)
    fn = getattr(reference, op)
    if variant == "eager":
        return fn
    return compile_fn(fn, variant)


def compile_fn(fn: Any, variant: str) -> Any:
    """``torch.compile`` for the ``compile`` / ``max-autotune`` variants (static shapes, the modes of
    :data:`COMPILE_MODES`)."""
    if variant not in COMPILE_MODES:
        raise ValueError(f"not a torch.compile variant: {variant!r}")
    torch._dynamo.reset()
    mode = COMPILE_MODES[variant]
    return torch.compile(fn, dynamic=False, mode=None if mode == "default" else mode)


def variant_info(variant: str) -> dict[str, Any]:
    """``extra_info`` fields that pin down a variant: the exact ``torch.compile`` mode."""
    return {"compile_mode": COMPILE_MODES.get(variant)}


def op_workload(case: OpCase, variant: str, dtype: torch.dtype, *, backward: bool,
                device: str = "cuda") -> Callable[[], Any]:
    """A no-argument step: the op's forward (modules in eval mode, no grad) or its forward + backward
    (modules in train mode, every input and parameter gradient computed)."""
    fn = resolve_op(case.op, variant)
    args, kwargs = materialize(case, device, dtype, train=backward)
    if not backward:
        def forward() -> Any:
            with torch.no_grad():
                return fn(*args, **kwargs)
        return forward
    leaves = [t for t in _leaves(args, kwargs) if t.requires_grad]
    grads = [torch.randn_like(o) for o in _outputs(fn(*args, **kwargs))]

    def train_step() -> None:
        for t in leaves:
            t.grad = None
        torch.autograd.backward(_outputs(fn(*args, **kwargs)), grads)

    return train_step


DGRAD_VARIANTS = ("fastbisenet", "eager")
"""The dgrad rows: the Triton candidate (:func:`fastbisenet.ops.conv_bn.conv_input_grad`, weight packing
included) and cuDNN's (``aten.convolution_backward``, input gradient only), which the op's backward uses."""


def dgrad_cases(cases: Iterable[OpCase]) -> list[OpCase]:
    """The ``conv_bn_act`` calls among ``cases`` whose input gradient the Triton dgrad can compute (stride 1,
    not on the 3-channel image, which needs no gradient), one per distinct (input shape, conv): calls that
    differ only in their epilogue (residual, ReLU, pixel sums) have the same dgrad, so their counts and call
    sites are merged. (The FFM's concat conv, two column-slice dgrads, is not among them.)"""
    merged: dict[tuple, OpCase] = {}
    for case in cases:
        conv = next((a for a in case.args if isinstance(a, ConvSpec)), None)
        if case.op != "conv_bn_act" or conv is None or conv.stride != (1, 1) or conv.in_ch <= 3:
            continue
        key = (case.input_shape, case.args[0].shape, conv)
        if key in merged:
            old = merged[key]
            case = replace(old, calls=old.calls + case.calls, where=old.where + case.where)
        else:  # labelled by the conv alone
            case = replace(case, kwargs=())
        merged[key] = case
    return list(merged.values())


def _dgrad_shapes(case: OpCase) -> tuple[TensorSpec, ConvSpec, tuple[int, ...]]:
    """``(x spec, conv spec, output shape)`` of a :func:`dgrad_cases` case."""
    x, conv = case.args[0], case.args[1]
    n, _, h, w = x.shape
    ho = (h + 2 * conv.padding[0] - conv.kernel[0]) // conv.stride[0] + 1
    wo = (w + 2 * conv.padding[1] - conv.kernel[1]) // conv.stride[1] + 1
    return x, conv, (n, conv.out_ch, ho, wo)


def dgrad_cost(case: OpCase, dtype: torch.dtype) -> tuple[int, int]:
    """(FLOPs, bytes) of the input gradient of the conv of ``case``: the forward's FLOPs; the output gradient
    and the weight read once, the input gradient written once."""
    x, conv, out_shape = _dgrad_shapes(case)
    size = torch.tensor([], dtype=dtype).element_size()
    k = conv.in_ch * conv.kernel[0] * conv.kernel[1]
    flops = 2 * math.prod(out_shape) * k  # every output-gradient element meets C_in * KH * KW weights
    nbytes = (math.prod(out_shape) + conv.out_ch * k + math.prod(x.shape)) * size
    return flops, nbytes


def dgrad_workload(case: OpCase, variant: str, dtype: torch.dtype, *, device: str = "cuda") -> Callable[[], Tensor]:
    """A no-argument step returning the input gradient of the conv of ``case`` for a random output gradient:
    ``"fastbisenet"`` the Triton dgrad, ``"eager"`` cuDNN's (see :data:`DGRAD_VARIANTS`). The weight is an
    fp32 master copy, as in AMP training: each variant pays its own weight preparation, as the backward
    does (cuDNN: the cast to ``dtype``; Triton: the flipped, transposed packing, which casts too)."""
    from fastbisenet.ops.conv_bn import conv_input_grad

    x, conv, out_shape = _dgrad_shapes(case)
    gen = torch.Generator(device=device).manual_seed(0)
    cl = torch.channels_last
    grad_y = torch.randn(out_shape, generator=gen, device=device).to(dtype).contiguous(memory_format=cl)
    weight = torch.randn(conv.out_ch, conv.in_ch, *conv.kernel, generator=gen, device=device)
    if variant == "fastbisenet":
        return lambda: conv_input_grad(grad_y, weight, conv.padding)
    if variant != "eager":
        raise ValueError(f"dgrad variants are {DGRAD_VARIANTS}, got {variant!r}")
    x_meta = torch.empty(x.shape, device=device, dtype=dtype).contiguous(memory_format=cl)  # only its shape is read

    def cudnn() -> Tensor:  # what fastbisenet.ops.conv_bn.backward runs for the input gradient
        return torch.ops.aten.convolution_backward(
            grad_y, x_meta, weight.to(dtype), None, list(conv.stride), list(conv.padding), [1, 1], False, [0, 0], 1,
            [True, False, False],
        )[0]

    return cudnn


def ohem_reduce(pixel_loss: Tensor, *, n_min: int, thresh: float = 0.7, topk: bool | None = None) -> Tensor:
    """The OHEM mean of a per-pixel CE without host syncs: mean over pixels with CE > -log(thresh), or
    over the ``n_min`` largest CEs when fewer pass (``n_min`` = valid pixels // 16, from the host).

    ``topk``: which of the two to compute, decided by the caller (:class:`CapturableOhem`); ``None``
    computes both and selects on the device (a top-k over every pixel each call, which ``OhemCELoss``
    runs only when few pixels are hard)."""
    loss = pixel_loss.flatten()
    if topk is None or not topk:
        hard = loss > -math.log(thresh)
        n_hard = hard.sum()
        mean_hard = (loss * hard).sum() / n_hard.clamp_min(1)
        if topk is not None:
            return mean_hard
    # sorted=False: the mean needs the n_min largest, not their order (no sort of ~n/16 values)
    mean_top = loss.topk(max(n_min, 1), sorted=False).values.mean()
    return mean_top if topk else torch.where(n_hard >= n_min, mean_hard, mean_top)


class CapturableOhem:
    """``OhemCELoss`` summed over the heads' per-pixel CEs for fixed labels, capturable in a CUDA graph.

    ``OhemCELoss`` picks, per head and step, the hard-pixel mean or the mean of the ``n_min`` largest losses
    from a host sync. A plain call here does the same (one sync for all heads); under CUDA-graph capture,
    where no sync is possible, the branches of the last plain call are replayed (the warm-up calls before
    capture are plain). So no variant pays for a top-k over every pixel that training would not run."""

    def __init__(self, n_min: int, thresh: float = 0.7) -> None:
        self.n_min, self.thresh = n_min, thresh
        self.topk: list[bool] | None = None
        """Per head, whether the last plain call took the top-k branch."""

    def __call__(self, pixel_losses: Sequence[Tensor]) -> Tensor:
        if not _capturing(pixel_losses[0].device.type):
            limit = -math.log(self.thresh)
            counts = torch.stack([(pl > limit).sum() for pl in pixel_losses]).tolist()  # the one sync
            self.topk = [c < self.n_min for c in counts]
        elif self.topk is None or len(self.topk) != len(pixel_losses):
            raise RuntimeError("CapturableOhem: call it once outside CUDA-graph capture first (it picks the "
                               "OHEM branch of each head there)")
        return sum(ohem_reduce(pl, n_min=self.n_min, thresh=self.thresh, topk=k)
                   for pl, k in zip(pixel_losses, self.topk, strict=True))


def make_criterion(labels: Tensor) -> tuple[CapturableOhem, str]:
    """:class:`CapturableOhem` for fixed ``labels``, applied to the per-pixel CEs of the heads
    (``BiSeNet(x, labels)``'s outputs): ``fastbisenet.losses.total_pixel_loss`` with the OHEM branch of
    each head decided outside capture, so the whole training step can be captured in a CUDA graph."""
    n_min = int((labels != IGNORE_INDEX).sum().item()) // 16
    return (CapturableOhem(n_min),
            "ohem (OhemCELoss.reduce per head, branch chosen by a plain call before capture) of model(x, labels)'s "
            "per-pixel CE: fused head + CE kernels on backend triton, head logits + F.cross_entropy on backend "
            "torch")


def random_labels(shape: Sequence[int], n_classes: int, device: str, seed: int = 0) -> Tensor:
    """(N, H, W) int64 labels in [0, n_classes) with ~5% ignored pixels."""
    gen = torch.Generator().manual_seed(seed)
    n, _, h, w = shape
    labels = torch.randint(0, n_classes, (n, h, w), generator=gen)
    labels[torch.rand((n, h, w), generator=gen) < 0.05] = IGNORE_INDEX
    return labels.to(device)


@dataclass
class ModelWorkload:
    step: Callable[[], Any]
    info: dict[str, Any] = field(default_factory=dict)
    saved_bytes: Callable[[], int] | None = None
    """Training: :func:`saved_tensor_bytes` of the step's forward (weights and batch excluded)."""


def _train_settings() -> dict[str, Any]:
    """SGD settings of ``fastbisenet train`` (its defaults, lr for the benchmark's batch irrelevant)."""
    try:
        from fastbisenet.config import TrainConfig

        d = TrainConfig()
        return {"momentum": d.momentum, "weight_decay": d.weight_decay, "lr_mult": d.lr_mult}
    except Exception:  # pragma: no cover - the config module is part of the package
        return {"momentum": 0.9, "weight_decay": 5e-4, "lr_mult": 10.0}


def _capturing(device_type: str) -> bool:
    """Whether the current CUDA stream is being captured into a graph."""
    return device_type == "cuda" and torch.cuda.is_current_stream_capturing()


def model_workload(variant: str, input_shape: Sequence[int], dtype: torch.dtype, *, aux_mode: str,
                   device: str = "cuda", n_classes: int = 19, preset: str = "v1",
                   backbone: str = "resnet18", optimizer_step: bool = True) -> ModelWorkload:
    """End-to-end step. Variant ``fastbisenet`` uses backend "triton", the others "torch";
    channels_last on CUDA.

    Inference (``aux_mode`` "pred"/"eval"): eval mode, no grad, ``dtype`` weights and activations.

    Training (``"train"``): what one iteration of ``fastbisenet train`` runs on the device -- fp32
    master weights and fp32 input; forward under ``torch.autocast(dtype)`` (none for fp32); OHEM CE
    on the three heads (main + out16 + out32: ``model(x, labels)``, the per-pixel CE as ``fastbisenet
    train`` computes it, fused with the heads on the Triton backend, fp32); backward; the
    SGD step of ``fastbisenet.schedule.build_optimizer`` (momentum, weight decay, foreach: no host
    syncs, so it is captured in the CUDA graph with the rest). fp16 adds the ``GradScaler``: scale,
    backward, ``unscale_`` (the inf check is a device kernel), step, ``update``. Only the scaler's
    skip-on-inf decision (``found_inf.item()``, a host sync) cannot be captured: outside capture
    (warm-up, plain launches) the step is ``scaler.step`` exactly; inside it the step is always taken.
    Autocast runs with ``cache_enabled=False`` (required around CUDA-graph capture; BiSeNet uses
    each weight once per forward, so the casts are the same). Not included: data loading and
    augmentation, the host-side lr schedule, the loss ``isfinite`` check (a host sync).
    """
    from fastbisenet.model import BiSeNet

    torch.manual_seed(0)
    backend = "triton" if variant == "fastbisenet" else "torch"
    model = BiSeNet(n_classes, aux_mode, preset=preset, backbone=backbone, backend=backend)
    # channels_last is the fast layout on GPUs (and the kernels'); on CPU it is much slower here
    fmt = torch.channels_last if torch.device(device).type == "cuda" else torch.contiguous_format
    train = aux_mode == "train"
    model = model.to(device=device, dtype=torch.float32 if train else dtype, memory_format=fmt)
    model.train(train)
    runner: Any = compile_fn(model, variant) if variant in COMPILE_MODES else model
    info: dict[str, Any] = {"backend": backend, **variant_info(variant)}
    if not train:
        x = torch.randn(*input_shape).to(device=device, dtype=dtype, memory_format=fmt)
        info["precision"] = f"{dtype_name(dtype)} weights and activations"

        def infer() -> Any:
            with torch.no_grad():
                return runner(x)
        return ModelWorkload(infer, info)

    from fastbisenet.schedule import build_optimizer

    x = torch.randn(*input_shape).to(device=device, dtype=torch.float32, memory_format=fmt)
    labels = random_labels(input_shape, n_classes, device)
    criterion, info["loss"] = make_criterion(labels)
    amp = None if dtype == torch.float32 else dtype
    dev_type = torch.device(device).type
    settings = _train_settings()
    batch = int(input_shape[0])
    optimizer = build_optimizer(model, 1e-2 * batch / 16, settings["momentum"], settings["weight_decay"],
                                settings["lr_mult"]) if optimizer_step else None
    scaler = torch.amp.GradScaler(dev_type, enabled=amp == torch.float16)
    params = list(model.parameters())
    info.update(precision="fp32 master weights" + (f", autocast {dtype_name(amp)}" if amp else ", no autocast"),
                autocast=dtype_name(amp) if amp else None, includes_optimizer_step=optimizer is not None,
                optimizer=(f"SGD(momentum={settings['momentum']}, weight_decay={settings['weight_decay']}; "
                           "foreach on CUDA) from fastbisenet.schedule.build_optimizer") if optimizer else None,
                grad_scaler=("GradScaler: scale, unscale_, step, update; the step is not skipped on inf "
                             "inside the CUDA graph (that check is a host sync)") if scaler.is_enabled() else None)

    def train_step() -> None:
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        else:
            for p in params:
                p.grad = None
        with torch.autocast(dev_type, dtype=amp, enabled=amp is not None, cache_enabled=False):
            pixel_losses = runner(x, labels, ignore_index=IGNORE_INDEX)
        loss = criterion(pixel_losses)
        scaler.scale(loss).backward()
        if optimizer is None:
            return
        if scaler.is_enabled() and _capturing(dev_type):
            scaler.unscale_(optimizer)
            optimizer.step()
        else:
            scaler.step(optimizer)
        scaler.update()

    def saved_bytes() -> int:
        with torch.autocast(dev_type, dtype=amp, enabled=amp is not None, cache_enabled=False):
            nbytes, _ = saved_tensor_bytes(lambda: runner(x, labels, ignore_index=IGNORE_INDEX),
                                           exclude=[*params, *model.buffers(), x, labels])
        return nbytes

    return ModelWorkload(train_step, info, saved_bytes)


def extra_info(*, op: str, case: str, variant: str, pass_: str, dtype: torch.dtype, shape: Sequence[int],
               flops: int, nbytes: int, timing: Timing | None, floors: dict[str, float] | None,
               env: dict[str, Any], peak_mem: int | None = None, **more: Any) -> dict[str, Any]:
    """The one ``extra_info`` schema of every benchmark row."""
    info: dict[str, Any] = {
        "schema": SCHEMA,
        "op": op,
        "case": case,
        "variant": variant,
        "pass": pass_,
        "dtype": dtype_name(dtype),
        "shape": list(shape),
        "flops": int(flops),
        "bytes": int(nbytes),
        "timing": timing.method if timing else None,
        "iters_per_sample": timing.iters_per_sample if timing else None,
        "timing_note": timing.note if timing else "",
        "floor_matmul_tflops": (floors or {}).get("matmul_tflops"),
        "floor_copy_gbps": (floors or {}).get("copy_gbps"),
        "cache": timing.cache if timing else None,
        "l2_flush_bytes": timing.flush_bytes if timing else None,
        "l2_flush_ms": timing.flush_ms if timing else None,
        "l2_bytes": timing.l2_bytes if timing else None,
        "peak_mem_bytes": peak_mem,
        **variant_info(variant),
        **env,
    }
    info.update(more)
    return info


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


@dataclass
class Row:
    group: str
    name: str
    time_s: float
    info: dict[str, Any]

    @property
    def variant(self) -> str:
        return self.info.get("variant", self.name)


def load_rows(json_path: str | Path | Sequence[str | Path]) -> tuple[list[Row], dict[str, Any]]:
    """Benchmark rows (median time) and the file's machine/commit info; for several files (the stages of one
    suite run), their rows in order, the first file's info and every file's autotune choices."""
    if not isinstance(json_path, (str, Path)):
        paths = list(json_path)
        if not paths:
            raise ValueError("no benchmark JSON given")
        rows, meta = load_rows(paths[0])
        choices = _autotune_of(meta, staged=True)
        for path in paths[1:]:
            more_rows, more_meta = load_rows(path)
            rows += more_rows
            choices += [c for c in _autotune_of(more_meta, staged=True) if c not in choices]
        if choices:
            meta["machine_info"] = {**meta["machine_info"],
                                    "fastbisenet": {**meta["machine_info"].get("fastbisenet", {}), "autotune": choices}}
        return rows, meta
    data = json.loads(Path(json_path).read_text())
    if not isinstance(data, dict) or "benchmarks" not in data:
        raise ValueError(f"{json_path} is not a pytest-benchmark JSON (pytest bench/ --benchmark-only "
                         "--benchmark-json FILE); a 'fastbisenet bench --json' file holds its table already")
    rows = [Row(b.get("group") or b["name"], b["name"], float(b["stats"]["median"]), b.get("extra_info") or {})
            for b in data.get("benchmarks", [])]
    meta = {"datetime": data.get("datetime"), "machine_info": data.get("machine_info", {}),
            "commit_info": data.get("commit_info", {})}
    return rows, meta


def _autotune_of(meta: dict[str, Any], *, staged: bool = False) -> list[dict[str, Any]]:
    """A JSON's autotune choices as a list (an ``{"error": ...}`` kept as one entry); ``staged``: each tagged
    with the file's benchmark stages."""
    info = meta.get("machine_info", {}).get("fastbisenet", {})
    choices = info.get("autotune") or []
    choices = [choices] if isinstance(choices, dict) else list(choices)
    stage = "/".join(info.get("stages") or [])
    return [{**c, "stage": stage} for c in choices] if staged and stage else choices


def floor_seconds(flops: float, nbytes: float, tflops: float | None, gbps: float | None) -> float | None:
    """Speed-of-light time: max(FLOPs / matmul rate, bytes / copy bandwidth)."""
    if not tflops or not gbps:
        return None
    return max(flops / (tflops * 1e12), nbytes / (gbps * 1e9))


def row_metrics(row: Row) -> dict[str, float | None]:
    """Achieved GB/s and TFLOP/s, floor time and % of floor (floor / time) of one row."""
    i, t = row.info, row.time_s
    flops, nbytes = i.get("flops") or 0, i.get("bytes") or 0
    floor = floor_seconds(flops, nbytes, i.get("floor_matmul_tflops"), i.get("floor_copy_gbps"))
    return {
        "ms": t * 1e3,
        "gbps": nbytes / t / 1e9 if t > 0 else None,
        "tflops": flops / t / 1e12 if t > 0 else None,
        "floor_ms": floor * 1e3 if floor is not None else None,
        "pct_floor": 100 * floor / t if floor is not None and t > 0 else None,
    }


def _fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "—" if v is None else format(v, spec) + suffix


def _variant_rank(v: str) -> int:
    return VARIANTS.index(v) if v in VARIANTS else len(VARIANTS)


def duplicate_rows(rows: Sequence[Row]) -> list[tuple[str, str]]:
    """(group, variant) pairs that more than one row claims (the report uses the first of each)."""
    seen: set[tuple[str, str]] = set()
    dups: list[tuple[str, str]] = []
    for r in rows:
        key = (r.group, r.variant)
        if key in seen and key not in dups:
            dups.append(key)
        seen.add(key)
    return dups


def speedups(rows: Sequence[Row]) -> dict[str, dict[str, float]]:
    """Per group: {peer variant: peer time / fastbisenet time} (the first row of a duplicated variant)."""
    out: dict[str, dict[str, float]] = {}
    by_group: dict[str, dict[str, Row]] = {}
    for r in rows:
        by_group.setdefault(r.group, {}).setdefault(r.variant, r)
    for g, vs in by_group.items():
        fast = vs.get("fastbisenet")
        if fast is None or fast.time_s <= 0:
            continue
        out[g] = {v: r.time_s / fast.time_s for v, r in vs.items() if v != "fastbisenet"}
    return out


def render_markdown(rows: Sequence[Row], meta: dict[str, Any] | None = None) -> str:
    """The markdown report: environment, geometric-mean speedups, one table per group."""
    meta = meta or {}
    lines = ["# fastbisenet benchmark report", ""]
    first = rows[0].info if rows else {}
    env_keys = ("device_name", "torch", "triton", "cuda", "cudnn", "git_commit")
    lines += [f"- {k}: `{first.get(k)}`" for k in env_keys if k in first]
    if meta.get("datetime"):
        lines.append(f"- date: `{meta['datetime']}`")
    if first.get("floor_matmul_tflops"):
        lines.append(f"- measured floors: bf16 matmul {first['floor_matmul_tflops']:.1f} TFLOP/s, "
                     f"copy {first.get('floor_copy_gbps') or 0:.0f} GB/s (read + write)")
    lines += cache_lines(rows)
    lines += ["", "Times are medians of per-iteration device time. Speedup = peer time / fastbisenet time. "
              "floor = max(FLOPs / matmul rate, bytes / copy bandwidth); % of floor = floor / time.", ""]
    if not rows:
        return "\n".join([*lines, "_No benchmark rows._", ""])
    dups = duplicate_rows(rows)
    if dups:
        lines += [f"**Warning: {len(dups)} duplicate (group, variant) pair(s)**; each table and speedup uses the "
                  "first row of the pair: " + ", ".join(f"`{g}` / `{v}`" for g, v in dups), ""]
        first_rows = {}
        for r in rows:
            first_rows.setdefault((r.group, r.variant), r)
        rows = list(first_rows.values())

    sp = speedups(rows)
    by_op: dict[tuple[str, str, str], list[float]] = {}
    peers: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    group_info = {r.group: r.info for r in rows}
    for g, d in sp.items():
        i = group_info[g]
        key = (i.get("op", g), i.get("pass", ""), i.get("dtype", ""))
        by_op.setdefault(key, [])
        for v, s in d.items():
            peers.setdefault(key, {}).setdefault(v, []).append(s)
    if peers:
        peer_names = sorted({v for d in peers.values() for v in d}, key=_variant_rank)
        lines += ["## Summary: geometric-mean speedup of fastbisenet", "",
                  "| op | pass | dtype | " + " | ".join(f"vs {p}" for p in peer_names) + " |",
                  "|---|---|---|" + "---:|" * len(peer_names)]
        for key in sorted(peers):
            cells = []
            for p in peer_names:
                vals = peers[key].get(p)
                cells.append(f"{math.exp(statistics.fmean(math.log(v) for v in vals)):.2f}x ({len(vals)})"
                             if vals else "—")
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
        lines += ["", "(n) = number of shapes.", ""]

    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.group, []).append(r)
    ops_order: dict[str, list[str]] = {}
    for g, rs in groups.items():
        ops_order.setdefault(rs[0].info.get("op", "other"), []).append(g)
    for op in sorted(ops_order, key=lambda o: (o != "end_to_end", o)):
        lines += [f"## {op}", ""]
        if op == "end_to_end":
            for g in ops_order[op]:
                lines += _group_table(g, groups[g], sp.get(g, {}))
        else:
            lines += _op_table([groups[g] for g in ops_order[op]], sp)
    lines += autotune_lines(meta.get("machine_info", {}).get("fastbisenet", {}).get("autotune") or [])
    return "\n".join(lines)


def _group_table(group: str, rows: Sequence[Row], sp: dict[str, float]) -> list[str]:
    """Detailed table of one group: a line per variant."""
    rs = sorted(rows, key=lambda r: _variant_rank(r.variant))
    i = rs[0].info
    lines = [f"### {group}", "", f"{i.get('flops', 0) / 1e9:.3f} GFLOP, {i.get('bytes', 0) / 1e6:.2f} MB", "",
             "| variant | time (ms) | fastbisenet speedup | GB/s | TFLOP/s | floor (ms) | % of floor "
             "| peak mem (MiB; saved for backward) | timing |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rs:
        m = row_metrics(r)
        s = sp.get(r.variant)
        speed = "—" if r.variant == "fastbisenet" or s is None else f"{s:.2f}x"
        mem = r.info.get("peak_mem_bytes")
        saved = r.info.get("saved_for_backward_bytes")
        mem_cell = _fmt(mem / 2**20 if mem else None, '.0f') + (f" (saved {saved / 2**20:.0f})" if saved else "")
        lines.append(
            f"| {r.variant} | {m['ms']:.4f} | {speed} | {_fmt(m['gbps'], '.1f')} | {_fmt(m['tflops'], '.2f')} | "
            f"{_fmt(m['floor_ms'], '.4f')} | {_fmt(m['pct_floor'], '.1f', '%')} | "
            f"{mem_cell} | {_timing(r)} |")
    return [*lines, ""]


def _timing(r: Row) -> str:
    t = r.info.get("timing") or ""
    t += " (graph capture failed)" if r.info.get("timing_note") else ""
    return f"{t}, {r.info['cache']}" if r.info.get("cache") else t


def cache_lines(rows: Sequence[Row]) -> list[str]:
    """Report lines saying in which L2 state each kind of row was timed (``extra_info["cache"]``)."""
    kinds: dict[str, dict[str, list[Row]]] = {}
    for r in rows:
        kind = "end-to-end rows" if r.info.get("op") == "end_to_end" or r.info.get("aux_mode") else "per-op rows"
        kinds.setdefault(kind, {}).setdefault(r.info.get("cache") or "unknown", []).append(r)
    lines = []
    for kind in sorted(kinds, key=lambda k: k != "per-op rows"):
        for mode, rs in sorted(kinds[kind].items()):
            text = CACHE_MODES.get(mode, "not recorded (rows from an older schema)")
            flush = [r.info["l2_flush_bytes"] for r in rs if r.info.get("l2_flush_bytes")]
            if flush:
                l2 = next((r.info["l2_bytes"] for r in rs if r.info.get("l2_bytes")), None)
                text += (f" (flush {max(flush) / 2**20:.0f} MiB; L2 "
                         + (f"{l2 / 2**20:.0f} MiB" if l2 else "size not reported") + ")")
            lines.append(f"- L2 cache, {kind}: `{mode}` — {text}")
    return lines


def _op_table(groups: Sequence[Sequence[Row]], sp: dict[str, dict[str, float]]) -> list[str]:
    """Compact table of one op: a line per shape/dtype/pass, the variants' times side by side, the
    fastbisenet speedups and the fastbisenet row's achieved rates."""
    variants = sorted({r.variant for rs in groups for r in rs}, key=_variant_rank)
    peers = [v for v in variants if v != "fastbisenet"]
    lines = ["| case | dtype | pass | calls | " + " | ".join(f"{v} (ms)" for v in variants) + " | "
             + " | ".join(f"vs {p}" for p in peers) + " | GB/s | TFLOP/s | % of floor | timing |",
             "|---|---|---|---:|" + "---:|" * (len(variants) + len(peers) + 3) + "---|"]
    for rs in groups:
        by_v = {r.variant: r for r in rs}
        i = rs[0].info
        fast = by_v.get("fastbisenet")
        m = row_metrics(fast) if fast else {}
        g = rs[0].group
        times = [f"{by_v[v].time_s * 1e3:.4f}" if v in by_v else "—" for v in variants]
        speed = [f"{sp[g][p]:.2f}x" if p in sp.get(g, {}) else "—" for p in peers]
        lines.append(f"| {i.get('case', g)} | {i.get('dtype', '')} | {i.get('pass', '')} | {i.get('calls', '')} | "
                     + " | ".join(times) + " | " + " | ".join(speed) + " | "
                     f"{_fmt(m.get('gbps'), '.1f')} | {_fmt(m.get('tflops'), '.2f')} | "
                     f"{_fmt(m.get('pct_floor'), '.1f', '%')} | {_timing(fast) if fast else ''} |")
    return [*lines, "", "GB/s, TFLOP/s and % of floor are those of fastbisenet.", ""]


def plot_end_to_end(rows: Sequence[Row], path: str | Path) -> bool:
    """PNG of end-to-end inference latency by input size, one line per variant and dtype.

    Returns False (and writes nothing) when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e2e = [r for r in rows if r.info.get("op") == "end_to_end" and r.info.get("pass") != "train"]
    if not e2e:
        return False
    shapes = sorted({tuple(r.info["shape"]) for r in e2e}, key=lambda s: (math.prod(s), s))
    fig, ax = plt.subplots(figsize=(8, 5))
    series: dict[tuple[str, str], dict[int, float]] = {}
    for r in e2e:
        series.setdefault((r.variant, r.info.get("dtype", "")), {})[shapes.index(tuple(r.info["shape"]))] = \
            r.time_s * 1e3
    for (variant, dt), pts in sorted(series.items(), key=lambda kv: (_variant_rank(kv[0][0]), kv[0][1])):
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], marker="o", linestyle="-" if dt == "bfloat16" else "--",
                label=f"{variant} ({dt})")
    ax.set_xticks(range(len(shapes)), [shape_str(s) for s in shapes])
    ax.set_xlabel("input (N x C x H x W)")
    ax.set_ylabel("latency (ms, median)")
    ax.set_yscale("log")
    device = e2e[0].info.get("device_name", "")
    ax.set_title(f"BiSeNet end-to-end inference latency — {device}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def report(json_path: str | Path | Sequence[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Write ``report.md`` and (with matplotlib) ``end_to_end.png`` into ``out_dir`` from one pytest-benchmark
    JSON or several (:func:`load_rows`). A ``summary.txt`` in ``out_dir`` (bench/gpu_suite.sh's step log:
    the test suite's status among them) is quoted at the top, so no table is read without it.

    Returns ``markdown`` and ``plot`` (paths; ``plot`` None when not written), ``plot_skipped`` (why
    not, else None) and ``rows`` (number of benchmark rows)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, meta = load_rows(json_path)
    md = out / "report.md"
    text = render_markdown(rows, meta)
    summary = out / "summary.txt"
    if summary.is_file() and summary.read_text().strip():
        head, _, rest = text.partition("\n\n")
        steps = [line.removeprefix("=== ") for line in summary.read_text().splitlines() if line.strip()]
        text = "\n".join([head, "", "## Suite steps (bench/gpu_suite.sh summary.txt)", "", "```", *steps, "```",
                           "", rest])
    md.write_text(text)
    png: Path | None = out / "end_to_end.png"
    reason = None
    try:
        if not plot_end_to_end(rows, png):
            reason = "no end-to-end inference rows: plot skipped"
    except ImportError:
        reason = "matplotlib is not installed: plot skipped (pip install matplotlib)"
    if reason:
        print(reason, file=sys.stderr)
        png = None
    return {"markdown": md, "plot": png, "plot_skipped": reason, "rows": len(rows)}


# ----------------------------------------------------------------------------------------------
# CLI: fastbisenet bench
# ----------------------------------------------------------------------------------------------


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HxW, e.g. 1024x2048; got {text!r}") from None
    return h, w


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``fastbisenet bench``."""
    from fastbisenet.cli import nonnegative_int, positive_int

    p.add_argument("--size", type=_size, default=None,
                   help="input HxW (default 1024x2048 on CUDA, 256x512 on CPU)")
    p.add_argument("--batch", type=positive_int, default=1, help="batch size (default 1)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--aux-mode", choices=("pred", "eval", "train"), default="pred",
                   help="pred/eval: inference; train: a training step as `fastbisenet train` runs it (fp32 "
                        "master weights, autocast forward, OHEM CE on 3 heads, backward, SGD step)")
    p.add_argument("--iters", type=positive_int, default=None, help="timed samples (default 30 on CUDA, 5 on CPU)")
    p.add_argument("--warmup", type=nonnegative_int, default=None, help="warm-up calls (default 5 on CUDA, 2 on CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile of the reference (default: on for CUDA, off for CPU)")
    p.add_argument("--max-autotune", action="store_true",
                   help="also time torch.compile(mode='max-autotune-no-cudagraphs'): the timing loop is "
                        "already one CUDA graph")
    p.add_argument("--no-graph", action="store_true", help="CUDA: time plain launches, no CUDA graph")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--preset", default="v1", help="model preset (default v1)")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--n-classes", type=positive_int, default=19)
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.add_argument("--report", nargs=2, metavar=("JSON", "OUTDIR"), default=None,
                   help="only render a pytest-benchmark JSON into OUTDIR (report.md, end_to_end.png)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    return p


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser("bench", help="measure end-to-end latency and throughput on this device",
                              description="Measure BiSeNet end-to-end latency and throughput for each "
                                          "backend (and torch.compile) on the current device.")
    configure_parser(p)
    p.set_defaults(func=run)
    return p


class _Progress:
    """One status line on stderr, rewritten in place on a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()

    def __call__(self, text: str, final: bool = False) -> None:
        if not self.enabled:
            return
        sys.stdout.flush()
        if self.tty:
            sys.stderr.write("\r\033[K" + text + ("\n" if final else ""))
        elif final:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    """``fastbisenet bench``: time each available variant of the model, print a table."""
    if args.report:
        paths = report(*args.report)
        print(f"wrote {paths['markdown']}" + (f" and {paths['plot']}" if paths["plot"] else ""))
        return 0
    from fastbisenet.evaluate import resolve_device

    try:  # checked, and a cuda:N made the current device (Triton launches there, and timing uses it)
        device = str(resolve_device(args.device or "auto"))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cuda = torch.device(device).type == "cuda"
    h, w = args.size or ((1024, 2048) if cuda else (256, 512))
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    iters = args.iters or (30 if cuda else 5)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    use_compile = args.compile if args.compile is not None else cuda
    shape = (args.batch, 3, h, w)
    variants = ["fastbisenet"] if cuda else []
    variants.append("eager")
    if use_compile:
        variants.append("compile")
    if args.max_autotune:
        variants.append("max-autotune")
    env = env_info(device)
    print(f"fastbisenet bench: {env['device_name']} | torch {env['torch']} | triton {env['triton']} | "
          f"input {shape_str(shape)} {dtype_name(dtype)} | aux_mode {args.aux_mode}")
    if not cuda:
        print("note: the Triton kernels need a CUDA GPU; on CPU only the reference (torch) backend is timed.")
    if cuda:
        torch.backends.cudnn.benchmark = True
    progress = _Progress(not args.quiet)
    results: list[dict[str, Any]] = []
    for k, variant in enumerate(variants, 1):
        tag = f"[{k}/{len(variants)}] {variant}"
        progress(f"{tag}: building / compiling ...")
        try:
            wl = model_workload(variant, shape, dtype, aux_mode=args.aux_mode, device=device,
                                n_classes=args.n_classes, preset=args.preset, backbone=args.backbone)
            progress(f"{tag}: warm-up + timing {iters} samples ...")
            if cuda:
                timing = time_cuda(wl.step, rounds=iters, warmup=warmup, use_graph=not args.no_graph)
                mem = peak_memory(wl.step)
            else:
                timing = _time_cpu_progress(wl.step, iters, warmup, lambda i, tag=tag: progress(
                    f"{tag}: {i}/{iters}"))
                mem = None
        except Exception as exc:
            progress(f"{tag}: failed: {_first_line(exc)}", final=True)
            results.append({"variant": variant, "error": _first_line(exc)})
            if _cuda_broken():  # a sticky CUDA error (e.g. an illegal access): later variants would fail too
                results += [{"variant": v, "error": "not run: the CUDA context failed in an earlier variant"}
                            for v in variants[k:]]
                break
            continue
        finally:
            try:
                free_memory()
            except Exception as exc:  # a CUDA error surfacing here must not cost the table and the JSON
                progress(f"{tag}: cleanup failed: {_first_line(exc)}", final=True)
        med = timing.median_ms
        results.append({"variant": variant, "median_ms": med, "min_ms": min(timing.samples_ms),
                        "images_per_s": args.batch / (med * 1e-3), "timing": timing.method,
                        "timing_note": timing.note, "peak_mem_bytes": mem, **wl.info})
        progress(f"{tag}: {med:.3f} ms", final=True)
    _print_table(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"schema": SCHEMA, "shape": list(shape), "dtype": dtype_name(dtype),
                                         "aux_mode": args.aux_mode, "env": env, "results": results,
                                         "date": _dt.datetime.now().isoformat(timespec="seconds")}, indent=2))
    return 0 if all("error" not in r for r in results) else 1


def _cuda_broken() -> bool:
    """Whether the CUDA context is in an error state (a synchronize raises)."""
    if not torch.cuda.is_available():
        return False
    try:
        torch.cuda.synchronize()
    except Exception:
        return True
    return False


def _time_cpu_progress(fn: Callable[[], Any], iters: int, warmup: int, tick: Callable[[int], None]) -> Timing:
    for _ in range(warmup):
        fn()
    samples = []
    for i in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        tick(i + 1)
    return Timing(samples, "wall", 1)


def _print_table(results: Sequence[dict[str, Any]]) -> None:
    ok = [r for r in results if "error" not in r]
    base = {r["variant"]: r["median_ms"] for r in ok}
    fast = base.get("fastbisenet")
    print(f"{'variant':<14}{'median ms':>12}{'min ms':>10}{'img/s':>10}{'vs fastbisenet':>16}"
          f"{'peak MiB':>10}  timing")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<14}  failed: {r['error']}")
            continue
        rel = f"{r['median_ms'] / fast:.2f}x" if fast else "—"
        mem = f"{r['peak_mem_bytes'] / 2**20:.0f}" if r.get("peak_mem_bytes") else "—"
        print(f"{r['variant']:<14}{r['median_ms']:>12.3f}{r['min_ms']:>10.3f}{r['images_per_s']:>10.1f}"
              f"{rel:>16}{mem:>10}  {r['timing']}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fastbisenet.benchmark ...``: the bench subcommand without the main CLI."""
    parser = configure_parser(argparse.ArgumentParser(prog="fastbisenet bench"))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "SCHEMA", "VARIANTS", "OpCase", "Row", "Timing", "add_parser", "autotune_choices", "autotune_lines", "env_info",
    "extra_info", "feed_benchmark",
    "floor_seconds", "load_rows", "materialize", "measure_floors", "model_cost", "model_workload",
    "op_cost", "op_workload", "render_markdown", "report", "run", "saved_tensor_bytes", "time_cuda", "trace_ops",
]
