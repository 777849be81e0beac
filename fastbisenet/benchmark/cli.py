"""``fastbisenet bench`` (also ``python -m fastbisenet.benchmark``): time each available variant of the whole
model on the current device and print a table; ``--report`` renders a pytest-benchmark JSON instead.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fastbisenet.benchmark._common import DTYPES, SCHEMA, _first_line, dtype_name, shape_str
from fastbisenet.benchmark.reporting import report
from fastbisenet.benchmark.timing import free_memory, peak_memory, time_cpu, time_cuda
from fastbisenet.benchmark.workloads import env_info, model_workload


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
                timing = time_cpu(wl.step, rounds=iters, warmup=warmup, tick=lambda i, tag=tag: progress(
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
