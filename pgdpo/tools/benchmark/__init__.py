"""The PG-DPO loss benchmark's machinery, installed with the package: ``pgdpo demo`` (a few cases,
fwd+bwd) and ``python -m bench`` (the full suite, run from the repository; results in ``bench/results/``)
both run it.

Modules, one job each: ``cases`` (shapes, dtypes, inputs, byte floors), ``machine`` (what it ran on),
``timing`` (timers, summaries, copy bandwidth, GPU sleep calibration, peak memory), ``providers`` (fused /
eager / compile, the float64 oracle and its tolerances), ``suite`` (runs the cases into a record),
``report`` (JSON, markdown, PNG). Needs torch alone, plus tqdm for the progress bar and matplotlib for
the plot when they are installed.
"""
