#!/usr/bin/env python
"""Render a pytest-benchmark JSON into OUTDIR/report.md and OUTDIR/end_to_end.png (matplotlib).

Usage: python bench/report.py BENCH_JSON [BENCH_JSON ...] OUTDIR
    (the files of ``fastbisenet.benchmark.reporting.report``; several JSONs: the stages of one run, rows merged)

Exit status 1 when the JSONs have end-to-end inference rows but no PNG could be made (matplotlib missing):
the report of a suite run is incomplete then. The markdown is still written. Stages without such rows
(``ab``, ``ops``) need no PNG.
"""

from __future__ import annotations

import sys

from fastbisenet.benchmark import report


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        paths = report(argv[:-1], argv[-1])
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {paths['markdown']}" + (f" and {paths['plot']}" if paths["plot"] else ""))
    if paths["plot_rows"] and paths["plot"] is None:
        print(f"error: {paths['plot_rows']} end-to-end inference rows but no end_to_end.png: {paths['plot_skipped']}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
