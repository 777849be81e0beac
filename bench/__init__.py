"""fastbisenet benchmarks (``pytest bench/ --benchmark-only``); a package so that module names never
clash with ``tests/``."""
