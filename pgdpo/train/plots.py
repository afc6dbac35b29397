"""PNG plots of a run from its ``metrics.jsonl``: loss, alpha / gamma ranges, Gamma, likelihood proxies.

``likelihood.png`` is the picture of the paper's Fig. 2: the diffusion MSE of the policy on the chosen and
on the rejected samples (a lower MSE is a higher likelihood) next to the reference's. Likelihood
displacement shows as the policy's chosen MSE rising above the reference's while the reward margin grows.
"""

from __future__ import annotations

import math
import os

from .metrics import read_metrics


def _series(records: list[dict], key: str):
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def _smooth(ys: list[float], window: int) -> list[float]:
    """Trailing moving average (the raw curve of a small batch is noisy)."""
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _plot(ax, xs, ys, *args, window: int, **kwargs):
    """The curve smoothed over ``window`` steps, over a faint raw curve (raw only when short)."""
    if window > 1 and len(ys) > 2 * window:
        line = ax.plot(xs, _smooth(ys, window), *args, **kwargs)[0]
        ax.plot(xs, ys, *args, color=line.get_color(), alpha=0.25, linewidth=0.8)
    else:
        ax.plot(xs, ys, *args, **kwargs)


def write_plots(output_dir: str) -> list[str]:
    """Write ``loss.png``, ``alpha_gamma.png``, ``weight_ranges.png``, ``gamma_statistic.png`` (Eq. 10's
    Gamma, with ``logging.diagnostics_every``) and ``likelihood.png`` (those with data); returns paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(os.path.join(output_dir, "metrics.jsonl"))
               if isinstance(r.get("step"), int)]
    written = []
    if not records:
        return written
    window = max(1, len(records) // 20)

    def save(fig, name):
        path = os.path.join(output_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for key, label in (("loss", "loss"), ("loss_dpo", "L_dpo"), ("loss_ipr", "L_ipr")):
        xs, ys = _series(records, key)
        if xs:
            _plot(axes[0], xs, ys, label=label, window=window)
    axes[0].set_xlabel("step")
    axes[0].set_title("loss")
    axes[0].legend()
    for key, label in (("reward_margin", "reward margin"), ("accuracy", "implicit accuracy")):
        xs, ys = _series(records, key)
        if xs:
            _plot(axes[1], xs, ys, label=label, window=window)
    axes[1].set_xlabel("step")
    axes[1].set_title("reward margin / accuracy" + (f" ({window}-step mean)" if window > 1 else ""))
    if axes[1].lines:
        axes[1].legend()
    save(fig, "loss.png")

    if any("alpha_mean" in r for r in records):
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        for name, color in (("alpha", "tab:blue"), ("gamma", "tab:orange")):
            xs, mean = _series(records, f"{name}_mean")
            _, lo = _series(records, f"{name}_min")
            _, hi = _series(records, f"{name}_max")
            if xs:
                ax.plot(xs, mean, color=color, label=f"{name} (mean)")
                if len(lo) == len(xs) == len(hi):
                    ax.fill_between(xs, lo, hi, color=color, alpha=0.2, label=f"{name} (min-max)")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("step")
        ax.set_title("ARS weight alpha and IPR switch gamma")
        ax.legend()
        save(fig, "alpha_gamma.png")

    if any("alpha_in_range" in r or "k1" in r for r in records):
        # The paper's ranges (alpha in [0.5, 0.8], gamma in [0, 0.5]) and the K1/K2 controller, if on.
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for key, label in (("alpha_in_range", "alpha in [0.5, 0.8]"),
                           ("gamma_in_range", "gamma in [0, 0.5]")):
            xs, ys = _series(records, key)
            if xs:
                _plot(axes[0], xs, ys, label=label, window=window)
        axes[0].set_ylim(-0.05, 1.05)
        axes[0].set_xlabel("step")
        axes[0].set_title("fraction of pairs inside the paper's ranges")
        if axes[0].lines:
            axes[0].legend()
        for key in ("k1", "k2"):
            xs, ys = _series(records, key)
            if xs:
                axes[1].plot(xs, ys, label=key.upper())
        axes[1].set_xlabel("step")
        axes[1].set_title("K1 / K2" + ("" if axes[1].lines else " (method.k_controller off)"))
        if axes[1].lines:
            axes[1].set_yscale("log")
            axes[1].legend()
        save(fig, "weight_ranges.png")

    if any("Gamma" in r for r in records):
        # Eq. 10 on the measured steps (logging.diagnostics_every) and the running fraction with Gamma > 0
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        xs, ys = _series(records, "Gamma")
        axes[0].axhline(0.0, color="gray", linewidth=0.8)
        axes[0].plot(xs, ys, ".-", color="tab:purple", label="Gamma")
        axes[0].set_xlabel("step")
        axes[0].set_title("Gamma (Eq. 10): PG-DPO vs DPO chosen-likelihood change")
        axes[0].legend()
        xs, ys = _series(records, "Gamma_positive_fraction")
        axes[1].axhspan(0.77, 0.82, color="tab:green", alpha=0.2, label="paper: 77-82%")
        axes[1].plot(xs, ys, color="tab:purple", label="measured steps with Gamma > 0")
        axes[1].set_ylim(-0.05, 1.05)
        axes[1].set_xlabel("step")
        axes[1].set_title("running fraction of measured steps with Gamma > 0")
        axes[1].legend()
        save(fig, "gamma_statistic.png")

    if any("mse_policy_chosen" in r for r in records):
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        styles = (("mse_policy_chosen", "policy, chosen", "tab:green", "-"),
                  ("mse_policy_rejected", "policy, rejected", "tab:red", "-"),
                  ("mse_ref_chosen", "reference, chosen", "tab:green", "--"),
                  ("mse_ref_rejected", "reference, rejected", "tab:red", "--"))
        for key, label, color, style in styles:
            xs, ys = _series(records, key)
            if xs:
                _plot(ax, xs, ys, style, color=color, label=label, window=window)
        ax.set_xlabel("step")
        ax.set_ylabel("diffusion MSE (lower = more likely)")
        ax.set_title("likelihood proxies (paper Fig. 2)")
        ax.legend()
        save(fig, "likelihood.png")
    return written
