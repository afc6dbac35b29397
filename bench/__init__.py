"""Benchmarks of the PG-DPO loss: ``python -m bench`` (run from the repository root; ``--help``).

Modules, one job each: ``cases`` (shapes, dtypes, inputs, byte floors), ``machine`` (what it ran on),
``timing`` (timers, summaries, copy bandwidth, peak memory), ``providers`` (fused / eager / compile and
their verification), ``suite`` (runs the cases), ``report`` (JSON, markdown, PNG). ``test_bench.py``
is the pytest-benchmark form of the same cases: ``pytest bench/ --benchmark-only``. Floor arithmetic
and results: ``NOTES.md`` and ``results/``.
"""
