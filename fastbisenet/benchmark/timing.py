"""Timing and memory of a workload.

:func:`time_cuda` warms up, captures the work in a CUDA graph and replays it, timing each replay with CUDA
events (plain launches + events when capture fails, recorded as such); with ``l2_flush=True`` every iteration
starts from a cold L2. :func:`feed_benchmark` hands those per-iteration GPU times to pytest-benchmark unchanged.
Also: wall time on the CPU (:func:`time_cpu`), peak memory, the memory saved for backward
(:func:`saved_tensor_bytes`) and the floors (:func:`measure_floors`: bf16 matmul TFLOP/s, device-to-device
copy GB/s).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fastbisenet.benchmark._common import _first_line

CACHE_MODES: dict[str, str] = {
    "cold-l2-flush": "a write of an L2-flush buffer (>= 2x L2) before every iteration evicts the op's inputs "
                     "and weights; the flush's own time, measured the same way, is subtracted",
    "warm": "back-to-back iterations: what fits in L2 stays there between iterations (weights, as in a "
            "deployed model running frame after frame)",
}
"""The ``cache`` field of a row's ``extra_info`` and what it means."""
DEFAULT_FLUSH_BYTES = 128 << 20
"""L2-flush buffer when the device does not report its L2 size."""


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


def time_cpu(fn: Callable[[], Any], *, rounds: int = 10, warmup: int = 1,
             tick: Callable[[int], None] | None = None) -> Timing:
    """Wall time per call on the CPU; ``tick(i)`` after the i-th timed call (progress display)."""
    for _ in range(warmup):
        fn()
    samples = []
    for i in range(rounds):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        if tick is not None:
            tick(i + 1)
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

    __name__ = "fastbisenet.benchmark.timing.cuda_event_time"

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
