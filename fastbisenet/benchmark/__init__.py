"""Benchmark machinery shared by ``bench/`` and the ``fastbisenet bench`` subcommand.

- :mod:`.timing`: :func:`time_cuda` warms up, captures the work in a CUDA graph and replays it, timing
  each replay with CUDA events (plain launches + events when capture fails, recorded as such);
  with ``l2_flush=True`` every iteration starts from a cold L2 (see :func:`time_cuda`);
  :func:`feed_benchmark` hands those per-iteration GPU times to pytest-benchmark unchanged.
  Floors: :func:`measure_floors` (bf16 matmul TFLOP/s, device-to-device copy GB/s).
- :mod:`.cases` (cost model): :func:`trace_ops` runs the model on the ``meta`` device and records every call
  that goes through :mod:`fastbisenet.ops`, so per-op shapes come from the model itself;
  :func:`op_cost` / :func:`model_cost` count FLOPs (``torch.utils.flop_counter``, conv/matmul only)
  and the minimal bytes moved (inputs read once + outputs written once).
- :mod:`.workloads`: the steps each row times (:func:`op_workload`, :func:`dgrad_workload`,
  :func:`model_workload`), the environment (:func:`env_info`, :func:`autotune_choices`) and :func:`extra_info`.
- :mod:`.reporting`: :func:`report` turns a pytest-benchmark JSON into ``report.md`` (+ ``end_to_end.png``).
- :mod:`.cli`: :func:`add_parser` / :func:`run` implement ``fastbisenet bench`` (``python -m
  fastbisenet.benchmark``: :func:`main`).

Every benchmark row carries the same ``extra_info`` schema (:data:`SCHEMA`, see :func:`extra_info`).

Every name is re-exported here. A function is looked up in the module that calls it: patch it there
(e.g. ``fastbisenet.benchmark.workloads.resolve_op``, which :func:`op_workload` calls), not here.
"""

from __future__ import annotations

from fastbisenet.benchmark._common import DTYPES, IGNORE_INDEX, SCHEMA, VARIANTS, dtype_name, shape_str
from fastbisenet.benchmark._common import _first_line as _first_line
from fastbisenet.benchmark.cases import (
    BNSpec,
    ConvSpec,
    ListSpec,
    OpCase,
    TensorSpec,
    case_label,
    count_flops,
    materialize,
    model_cost,
    op_cost,
    trace_ops,
)
from fastbisenet.benchmark.cli import add_parser, configure_parser, main, run
from fastbisenet.benchmark.reporting import (
    Row,
    autotune_lines,
    cache_lines,
    duplicate_rows,
    floor_seconds,
    load_rows,
    plot_end_to_end,
    render_markdown,
    report,
    row_metrics,
    speedups,
)
from fastbisenet.benchmark.timing import (
    CACHE_MODES,
    DEFAULT_FLUSH_BYTES,
    Timing,
    cold_samples,
    device_l2_bytes,
    feed_benchmark,
    free_memory,
    l2_flush_bytes,
    measure_floors,
    peak_memory,
    saved_tensor_bytes,
    time_cpu,
    time_cuda,
)
from fastbisenet.benchmark.workloads import (
    COMPILE_MODES,
    DGRAD_VARIANTS,
    REPO_ROOT,
    CapturableOhem,
    ModelWorkload,
    OpUnavailable,
    autotune_choices,
    compile_fn,
    dgrad_cases,
    dgrad_cost,
    dgrad_workload,
    env_info,
    extra_info,
    git_commit,
    make_criterion,
    model_workload,
    ohem_reduce,
    op_workload,
    random_labels,
    resolve_op,
    variant_info,
)

__all__ = [
    "CACHE_MODES", "COMPILE_MODES", "DEFAULT_FLUSH_BYTES", "DGRAD_VARIANTS", "DTYPES", "IGNORE_INDEX", "REPO_ROOT",
    "SCHEMA", "VARIANTS", "BNSpec", "CapturableOhem", "ConvSpec", "ListSpec", "ModelWorkload", "OpCase",
    "OpUnavailable", "Row", "TensorSpec", "Timing", "add_parser", "autotune_choices", "autotune_lines", "cache_lines",
    "case_label", "cold_samples", "compile_fn", "configure_parser", "count_flops", "device_l2_bytes", "dgrad_cases",
    "dgrad_cost", "dgrad_workload", "dtype_name", "duplicate_rows", "env_info", "extra_info", "feed_benchmark",
    "floor_seconds", "free_memory", "git_commit", "l2_flush_bytes", "load_rows", "main", "make_criterion",
    "materialize", "measure_floors", "model_cost", "model_workload", "ohem_reduce", "op_cost", "op_workload",
    "peak_memory", "plot_end_to_end", "random_labels", "render_markdown", "report", "resolve_op", "row_metrics", "run",
    "saved_tensor_bytes", "shape_str", "speedups", "time_cpu", "time_cuda", "trace_ops", "variant_info",
]
