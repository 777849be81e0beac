"""The ``fastbisenet`` command: train, eval, predict, export, bench."""

from __future__ import annotations

import argparse
import os
import sys

from fastbisenet import __version__
from fastbisenet.ops import BackendUnavailableError

USER_ERRORS = (OSError, ValueError, ImportError, ArithmeticError, BackendUnavailableError)
"""Reported as one ``error:`` line (exit status 1); set FASTBISENET_TRACEBACK=1 for the traceback."""


def _int_at_least(low: int) -> type:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = "positive int" if low == 1 else f"int >= {low}"  # argparse's "invalid <name> value"
    return parse  # type: ignore[return-value]


positive_int = _int_at_least(1)
"""argparse ``type`` for counts and sizes (batch sizes, iterations, image sizes)."""
nonnegative_int = _int_at_least(0)
"""argparse ``type`` for counts where 0 means none (DataLoader workers, warm-up iterations)."""


def build_parser() -> argparse.ArgumentParser:
    from fastbisenet import evaluate, export, predict, train

    parser = argparse.ArgumentParser(
        prog="fastbisenet",
        description="BiSeNet semantic segmentation with fused Triton kernels: training, evaluation, "
                    "prediction, ONNX export and benchmarks.",
        epilog="Start here: fastbisenet train --data synthetic --device cpu --iters 300 --batch-size 8 --crop 64 "
               "(no download needed). 'fastbisenet <command> --help' lists a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"fastbisenet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    train.add_parser(sub)
    evaluate.add_parser(sub)
    predict.add_parser(sub)
    export.add_parser(sub)
    _add_bench(sub)
    return parser


def _add_bench(sub: argparse._SubParsersAction) -> None:
    """``bench`` comes from :mod:`fastbisenet.benchmark` when that package is present."""
    try:
        from fastbisenet import benchmark
    except ImportError as e:
        reason = str(e)

        def unavailable(args: argparse.Namespace) -> int:
            print(f"fastbisenet bench is unavailable: {reason}", file=sys.stderr)
            return 2

        p = sub.add_parser("bench", help="benchmarks (unavailable in this install)")
        p.set_defaults(func=unavailable)
        return
    benchmark.add_parser(sub)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script and of ``python -m fastbisenet``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        if os.environ.get("FASTBISENET_TRACEBACK"):
            raise
        print(f"fastbisenet {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
