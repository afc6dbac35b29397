"""``pgdpo train --compare METHOD``: the same run with another method, printed side by side.

The second run uses the first one's config and dataset with ``method.name = METHOD`` and writes to
``<output_dir>/compare-<METHOD>/``. The table shows, over the last :data:`TAIL` logged steps of each run,
what the paper's Fig. 2 is about: the implicit accuracy and reward margin (does it learn the preference?)
next to the policy's diffusion MSE on chosen and rejected relative to the reference's (a policy MSE
above the reference's on *chosen* is the chosen-likelihood displacement of DPO).
"""

from __future__ import annotations

import copy
import os

from .metrics import read_metrics

TAIL = 20


def compare_config(config, method: str):
    """``config`` for the comparison run: ``method``, its own output folder, the first run's dataset."""
    other = copy.deepcopy(config)
    other.method.name = method
    other.output_dir = os.path.join(config.output_dir, f"compare-{method}")
    other.data.path = os.path.abspath(config.data_path())
    other.data.synthesize = False
    other.checkpoint.resume = None
    return other.validate()


def tail_means(output_dir: str, tail: int = TAIL) -> dict[str, float]:
    records = [r for r in read_metrics(os.path.join(output_dir, "metrics.jsonl")) if "loss" in r][-tail:]
    keys = ("accuracy", "reward_margin", "mse_policy_chosen", "mse_ref_chosen", "mse_policy_rejected",
            "mse_ref_rejected")
    return {k: sum(r[k] for r in records) / len(records) for k in keys
            if records and all(k in r for r in records)}


def format_comparison(runs: list[tuple[str, str]]) -> str:
    """``runs``: (method, output_dir) pairs -> the side-by-side table."""
    rows = [("implicit accuracy", "accuracy", "{:.3f}"), ("reward margin", "reward_margin", "{:.4g}")]
    stats = {method: tail_means(out) for method, out in runs}
    width = max(18, *(len(m) for m, _ in runs))
    lines = [f"pgdpo train --compare: mean of the last {TAIL} steps", " " * 28 + "".join(
        m.rjust(width + 2) for m, _ in runs)]
    for label, key, fmt in rows:
        lines.append(label.ljust(28) + "".join(
            (fmt.format(stats[m][key]) if key in stats[m] else "-").rjust(width + 2) for m, _ in runs))
    for half in ("chosen", "rejected"):
        cells = []
        for m, _ in runs:
            s = stats[m]
            if f"mse_ref_{half}" in s:
                delta = s[f"mse_policy_{half}"] - s[f"mse_ref_{half}"]
                cells.append(f"{s[f'mse_policy_{half}']:.4f} ({delta:+.4f})")
            else:
                cells.append("-")
        lines.append(f"MSE {half} (vs reference)".ljust(28) + "".join(c.rjust(width + 2) for c in cells))
    lines.append("  (policy MSE and its change from the reference's; + on chosen: chosen likelihood fell, "
                 "i.e. likelihood displacement)")
    for m, out in runs:
        lines.append(f"  {m}: {out}")
    return "\n".join(lines)
