#!/usr/bin/env python
"""Render a pytest-benchmark JSON into OUTDIR/report.md (+ OUTDIR/end_to_end.png with matplotlib).

Usage: python bench/report.py BENCH_JSON OUTDIR   (same as ``fastbisenet.benchmark.report``)
"""

from __future__ import annotations

import sys

from fastbisenet.benchmark import report


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    paths = report(argv[0], argv[1])
    print(f"wrote {paths['markdown']}" + (f" and {paths['plot']}" if paths["plot"] else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
