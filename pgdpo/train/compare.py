"""``pgdpo train --compare METHOD``: the same run with another method, printed side by side.

The second run uses the first one's config and dataset with ``method.name = METHOD`` and writes to
``<output_dir>/compare-<METHOD>/``. The table shows, over the last :data:`TAIL` logged steps of each run,
what the paper's Fig. 2 is about: the implicit accuracy and reward margin (does it learn the preference?)
next to the policy's diffusion MSE on chosen and rejected relative to the reference's (a policy MSE
above the reference's on *chosen* is the chosen-likelihood displacement of DPO), and, with validation
samples and a reward, the validation reward at the start and at the end of each run. With validation
samples the first run's ``samples/before_after.png`` gets the second run's last samples as a column
(:func:`merge_samples`).
"""

from __future__ import annotations

import copy
import json
import os

from .metrics import read_metrics
from .validation import write_comparison

TAIL = 20


def compare_config(config, method: str):
    """``config`` for the comparison run: ``method``, its own output folder, the first run's dataset and
    validation prompts."""
    other = copy.deepcopy(config)
    other.method.name = method
    other.output_dir = os.path.join(config.output_dir, f"compare-{method}")
    other.data.path = os.path.abspath(config.data_path())
    other.data.synthesize = False
    if config.validation.data:  # the same validation prompts (held-out ones included)
        other.validation.data = os.path.abspath(os.path.expanduser(
            config.validation.data.replace("{output_dir}", config.output_dir)))
    other.checkpoint.resume = None
    return other.validate()


def tail_means(output_dir: str, tail: int = TAIL) -> dict[str, float]:
    records = [r for r in read_metrics(os.path.join(output_dir, "metrics.jsonl")) if "loss" in r][-tail:]
    keys = ("accuracy", "reward_margin", "mse_policy_chosen", "mse_ref_chosen", "mse_policy_rejected",
            "mse_ref_rejected")
    return {k: sum(r[k] for r in records) / len(records) for k in keys
            if records and all(k in r for r in records)}


def validation_rewards(output_dir: str) -> tuple[float, float] | None:
    """(first, last) mean validation reward of a run (``samples/validation.jsonl``), None without one."""
    path = os.path.join(output_dir, "samples", "validation.jsonl")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        rewards = [r["reward_mean"] for r in map(json.loads, f) if "reward_mean" in r]
    return (rewards[0], rewards[-1]) if rewards else None


def merge_samples(output_dir: str, other_dir: str) -> str | None:
    """Add ``other_dir``'s last validation samples as a column of ``output_dir``'s before/after grid
    (before the data column); returns the PNG's path (None when either run has no grid recipe)."""
    recipes = []
    for out in (output_dir, other_dir):
        path = os.path.join(out, "samples", "before_after.json")
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            recipes.append(json.load(f))
    mine, other = recipes
    mine["columns"].append(other["columns"][-1])
    with open(os.path.join(output_dir, "samples", "before_after.json"), "w") as f:
        json.dump(mine, f, indent=1)
    return write_comparison(os.path.join(output_dir, "samples", "before_after.png"), mine)


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
    rewards = {m: validation_rewards(out) for m, out in runs}
    if any(r is not None for r in rewards.values()):
        cells = [f"{r[0]:+.3f} -> {r[1]:+.3f}" if r else "-" for r in rewards.values()]
        lines.append("validation reward".ljust(28) + "".join(c.rjust(width + 2) for c in cells))
        lines.append("  (mean reward of the validation samples at the first and at the last validation step)")
    for m, out in runs:
        lines.append(f"  {m}: {out}")
    return "\n".join(lines)
