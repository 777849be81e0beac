"""Benchmark session setup: skip everything without CUDA, order rows for a time budget, measure the
machine floors once, and record the environment and the autotuners' choices in the JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from bench import common
from fastbisenet import benchmark as fb

BENCH_DIR = Path(__file__).resolve().parent
HAS_CUDA = torch.cuda.is_available()
NO_CUDA_REASON = (
    "no CUDA device (torch.cuda.is_available() is False): the benchmarks time the Triton kernels, cuDNN "
    "and torch.compile on a GPU; run them on a CUDA machine (bench/gpu_suite.sh)"
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "bench_priority(key): execution order under a time budget (lower first)")
    if HAS_CUDA:
        torch.backends.cudnn.benchmark = True  # eager baseline: cuDNN picks its fastest algorithms


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # the rows of bench/, and any other test that carries a bench_priority key (it then runs in its key's stage
    # only; one without a key runs in every stage process)
    in_bench = {id(i) for i in items if Path(i.path).is_relative_to(BENCH_DIR)}
    mine = in_bench | {id(i) for i in items if i.get_closest_marker("bench_priority") is not None}

    def key(item: pytest.Item) -> tuple | None:
        m = item.get_closest_marker("bench_priority")
        return m.args[0] if m else None

    others = [it for it in items if id(it) not in mine]
    bench = [it for it in items if id(it) in mine]
    order = common.run_order([key(it) for it in bench], common.SELECTED_STAGES)  # FASTBISENET_BENCH_STAGES
    kept = {id(bench[i]) for i in order}
    dropped = [it for it in bench if id(it) not in kept]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = others + [bench[i] for i in order]
    if not HAS_CUDA:
        skip = pytest.mark.skip(reason=NO_CUDA_REASON)
        for item in items:
            if id(item) in in_bench:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def bench_env() -> dict[str, Any]:
    """Device name, versions, commit and the suite's settings (same for every row)."""
    info = fb.env_info("cuda")
    info.update(cudnn_benchmark=torch.backends.cudnn.benchmark, bench_mode=common.MODE,
                rounds=common.ROUNDS, precision="dtype weights and activations, channels_last")
    return info


@pytest.fixture(scope="session")
def floors() -> dict[str, float]:
    """bf16 matmul TFLOP/s and copy GB/s, measured once per session."""
    if not common.floors_measured:
        common.floors_measured.update(fb.measure_floors())
    return common.floors_measured


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    try:  # runs as the JSON is written: a failure here must not cost the measured rows
        autotune: Any = fb.autotune_choices()
    except Exception as exc:
        autotune = {"error": fb._first_line(exc)}
    machine_info["fastbisenet"] = {**fb.env_info("cuda" if HAS_CUDA else "cpu"), "floors": dict(common.floors_measured),
                                   "bench_mode": common.MODE, "stages": list(common.SELECTED_STAGES),
                                   "autotune": autotune}
