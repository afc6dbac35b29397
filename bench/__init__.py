"""Benchmarks of the PG-DPO loss: ``python -m bench`` (run from the repository root; ``--help``).

This folder holds the suite's entry points and its results; the machinery they run is installed with
the package, :mod:`pgdpo.tools.benchmark` (``cases``: shapes, dtypes, inputs, byte floors; ``machine``:
what it ran on; ``timing``: timers, summaries, copy bandwidth, peak memory; ``providers``: fused / eager /
compile and their verification against the float64 reference; ``suite``: runs the cases; ``report``:
JSON, markdown, PNG), so that ``pgdpo demo`` runs the same code from an installed wheel.

Here: ``__main__`` (the suite's command line), ``test_bench.py`` (the pytest-benchmark form of the same
cases: ``pytest bench/ --benchmark-only``), ``mixed_dtypes``, ``setup_memory`` and ``guard`` (studies),
``NOTES.md`` (floor arithmetic, findings) and ``results/``.
"""
