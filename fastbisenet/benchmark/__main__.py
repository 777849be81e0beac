"""``python -m fastbisenet.benchmark ...``: the ``fastbisenet bench`` subcommand without the main CLI."""

from fastbisenet.benchmark.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
