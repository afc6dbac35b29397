"""``pgdpo toy``: the likelihood-displacement lab. DPO vs ARS vs IPR vs PG-DPO on a toy diffusion model.

What it does (all on CPU, a few minutes with the defaults):

1. Pre-trains a small flow-matching denoiser (an MLP with a time embedding) on a 2-D mixture of 8
   Gaussians on a ring: the *reference*. One reference per seed.
2. Builds preference pair sets the way the paper describes its two failure modes (Sec. 3.2). The
   reward prefers samples higher along the y axis (``r(x) = x_y``):
   - ``near``: near-identical pairs, chosen and rejected a small perturbation apart within one mode
     (optimization conflict, small reward margins);
   - ``far``: well-separated pairs, chosen from the 4 upper modes, rejected from the 4 lower modes
     (DPO separates them fast: large margins, suboptimal maximization).
   Chosen and rejected of a pair share one noise draw and one timestep.
3. From the same reference and the same data stream (pairs, noise, timesteps) aligns a copy with each
   of ``dpo``, ``ars``, ``ipr``, ``pgdpo`` (``pgdpo_loss``, eager backend; plain SGD by default, so the
   paper's Gamma, defined for SGD, is exactly the first-order effect of the step that was taken).
   Tracked with :mod:`pgdpo.train.diagnostics`: the chosen / rejected log-likelihood proxies
   (``-mean (pred - target)^2``, appendix A.5.2) of a fixed probe set (the first ``--probe-pairs``
   training pairs, ``--probe-noise`` fixed noise / timestep draws each); Gamma (Eq. 10) of every
   ``--gamma-every``-th training step against DPO, and each method's own first-order change of the
   chosen proxy; alpha / gamma ranges; per-pair parameter-gradient norm of the method's loss against
   the reward margin (Fig. 1a).
4. Writes ``OUT/summary.json`` and PNG plots, and prints the findings.

``summary.json`` schema (numbers are floats, ``null`` where not applicable)::

    schema: "pgdpo.toy/1"; settings: {every option}; runtime_s; paper: {its reference numbers}
    methods.<name>:                 # dpo, ars, ipr, pgdpo (+ pgdpo_ctl with --controller)
        chosen_logp_change          # final - initial chosen proxy, mean over probe rows, pair sets, seeds
        rejected_logp_change        # same for rejected
        chosen_logp_change_std      # std over (pair set, seed) runs
        chosen_rose_fraction        # fraction of probe rows whose chosen proxy rose
        chosen_rose_runs            # fraction of (pair set, seed) runs with chosen_logp_change > 0
        gamma_positive_fraction     # steps with Gamma > 0 against DPO (null for dpo)
        gamma_mean
        own_step_chosen_up_fraction # steps whose own SGD step raised the batch's chosen proxy (1st order)
        own_step_chosen_delta_mean  # mean of that first-order change per step
        alpha, gamma: {mean, min, max, inside_fraction, target_range, count} (null where the method
                                    does not use the weight)
        margin_positive_fraction    # pair-steps with normalised margin m > 0 (alpha > 0.5, gamma < 0.5)
        d_l_positive_fraction       # pair-steps where the policy is worse than the reference on rejected
        grad_norm_vs_margin: {spearman, top_to_bottom_ratio, count, margin_range, binned: {...}}
        final_k1, final_k2          # the controller's last K (constants without it)
        curves: {step, chosen_logp_change, rejected_logp_change, logp_gap (mean over seeds);
                 gamma_step, gamma_positive_running}
    pair_sets.<near|far>: {description, clean_distance_mean, methods: {<name>: same keys as above,
                           for this pair set only, plus chosen_logp_change_per_seed}}
    findings: [plain sentences computed from the numbers]
    verdict: {claim: true/false} for the paper's claims on this toy

Plots: ``fig2_likelihood.png`` (chosen / rejected proxy change per method over steps: the paper's
Fig. 2), ``fig1a_gradnorm_margin.png`` (gradient norm vs reward margin: Fig. 1a),
``weight_ranges.png`` (alpha and gamma over training, target ranges shaded), ``gamma_statistic.png``
(Gamma per step and the running fraction positive).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..loss import pgdpo_loss
from ..loss.options import MARGINS
from ..train.diagnostics import (
    ALPHA_RANGE,
    GAMMA_RANGE,
    GammaMeter,
    K1K2Controller,
    LikelihoodProbe,
    MarginGradRecorder,
    WeightRangeTracker,
    flow_matching_noising,
    gamma_from_pred,
    make_probe_batch,
    pair_grad_norms,
)

METHOD_ORDER = ("dpo", "ars", "ipr", "pgdpo")
PAIR_SETS = {
    "near": "near-identical pairs: rejected = chosen + small perturbation within one mode (small margins)",
    "far": "well-separated pairs: chosen from the 4 upper modes, rejected from the 4 lower ones "
           "(large margins)",
}
_MARGIN_FORMULA = {"signed": "(d_w - d_l)/(d_l + e)", "abs": "(d_l - d_w)/(|d_l| + e)"}
PAPER = {"gamma_positive_fraction": {"Wan2.1-14B": 0.817, "VideoCrafter2": 0.769},
         "alpha_range": list(ALPHA_RANGE), "gamma_range": list(GAMMA_RANGE)}


@dataclass
class ToyConfig:
    seeds: int = 3
    steps: int = 600
    pair_sets: tuple = ("near", "far")
    controller: bool = False
    # data
    modes: int = 8
    radius: float = 1.0
    mode_std: float = 0.08
    near_delta: float = 0.02
    pairs: int = 512
    # model and pretraining
    hidden: int = 128
    depth: int = 3
    pretrain_steps: int = 2000
    pretrain_batch: int = 512
    pretrain_lr: float = 2e-3
    # alignment
    optimizer: str = "sgd"
    lr: float = 3e-4
    batch_pairs: int = 16
    beta: float = 100.0
    k1: float = 10.0
    k2: float = 10.0
    margin: str = "signed"  # the normalised margin's reading (docs/margin.md)
    eps_rel: float = 0.0  # its relative denominator guard (docs/margin.md)
    # diagnostics
    probe_pairs: int = 64
    probe_noise: int = 4
    probe_every: int = 20
    gamma_every: int = 1
    gradnorm_pairs: int = 32
    gradnorm_every: int = 100
    threads: int = 1
    methods: tuple = field(default=METHOD_ORDER)


QUICK = dict(seeds=1, steps=40, pretrain_steps=300, pairs=128, probe_pairs=16, probe_noise=2, probe_every=10,
             gamma_every=2, gradnorm_pairs=8, gradnorm_every=20, hidden=64)


# ----------------------------------------------------------------------------------------------------
# model and data
# ----------------------------------------------------------------------------------------------------


class Denoiser(nn.Module):
    """MLP flow-matching denoiser ``v(x_t, sigma)`` with sinusoidal features of ``sigma``."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, freqs: int = 8):
        super().__init__()
        self.register_buffer("freqs", torch.arange(1, freqs + 1, dtype=torch.float32) * math.pi)
        layers, width = [], dim + 2 * freqs + 1
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        a = sigma[:, None].to(x.dtype) * self.freqs
        return self.net(torch.cat([x, a.sin(), a.cos(), sigma[:, None].to(x.dtype)], 1))


def mode_centers(cfg: ToyConfig) -> torch.Tensor:
    ang = (torch.arange(cfg.modes, dtype=torch.float32) + 0.5) * (2 * math.pi / cfg.modes)
    return cfg.radius * torch.stack([ang.cos(), ang.sin()], 1)


def sample_data(n: int, cfg: ToyConfig, gen: torch.Generator,
                modes: torch.Tensor | None = None) -> torch.Tensor:
    centers = mode_centers(cfg)
    pool = torch.arange(cfg.modes) if modes is None else modes
    k = pool[torch.randint(len(pool), (n,), generator=gen)]
    return centers[k] + cfg.mode_std * torch.randn(n, 2, generator=gen)


def reward(x: torch.Tensor) -> torch.Tensor:
    return x[:, 1]


def make_pairs(kind: str, cfg: ToyConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_w, x_l)``, each ``[pairs, 2]``, chosen = higher reward."""
    if kind == "near":
        a = sample_data(cfg.pairs, cfg, gen)
        b = a + cfg.near_delta * torch.randn(a.shape, generator=gen)
    elif kind == "far":
        y = mode_centers(cfg)[:, 1]
        a = sample_data(cfg.pairs, cfg, gen, modes=torch.nonzero(y > 0).flatten())
        b = sample_data(cfg.pairs, cfg, gen, modes=torch.nonzero(y < 0).flatten())
    else:
        raise ValueError(f"unknown pair set {kind!r}; choose from {sorted(PAIR_SETS)}")
    a_wins = (reward(a) >= reward(b))[:, None]
    return torch.where(a_wins, a, b), torch.where(a_wins, b, a)


def pretrain(cfg: ToyConfig, seed: int) -> Denoiser:
    gen = torch.Generator().manual_seed(10_000 + seed)
    torch.manual_seed(10_000 + seed)
    model = Denoiser(2, cfg.hidden, cfg.depth)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.pretrain_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(cfg.pretrain_steps, 1))
    for _ in range(cfg.pretrain_steps):
        x0 = sample_data(cfg.pretrain_batch, cfg, gen)
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.rand(x0.shape[0], generator=gen)
        x_t, target = flow_matching_noising(x0, noise, sigma)
        loss = (model(x_t, sigma) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------------------
# one alignment run
# ----------------------------------------------------------------------------------------------------


def _loss_method(name: str) -> str:
    return "pgdpo" if name == "pgdpo_ctl" else name


def align(cfg: ToyConfig, ref: Denoiser, pairs, method: str, seed: int, set_index: int, bar=None) -> dict:
    """Align a copy of ``ref`` on ``pairs`` with ``method``; returns the run's diagnostics."""
    x_w, x_l = pairs
    loss_method = _loss_method(method)
    policy = copy.deepcopy(ref).train()
    for p in policy.parameters():
        p.requires_grad_(True)
    params = list(policy.parameters())
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr)
    else:
        opt = torch.optim.Adam(params, lr=cfg.lr)

    # The probe: first probe_pairs training pairs, probe_noise fixed (noise, timestep) draws each.
    pgen = torch.Generator().manual_seed(20_000 + 97 * seed + set_index)
    rep = lambda x: x[:cfg.probe_pairs].repeat_interleave(cfg.probe_noise, 0)
    n_probe = min(cfg.probe_pairs, x_w.shape[0]) * cfg.probe_noise
    probe_batch = make_probe_batch(rep(x_w), rep(x_l), torch.rand(n_probe, generator=pgen), generator=pgen)
    probe = LikelihoodProbe(probe_batch, every=cfg.probe_every)
    grad_idx = torch.arange(0, min(cfg.gradnorm_pairs * cfg.probe_noise, n_probe), cfg.probe_noise)
    half = n_probe
    grad_rows = torch.cat([grad_idx, grad_idx + half])
    grad_x, grad_t, grad_y = (probe_batch.noisy[grad_rows], probe_batch.timesteps[grad_rows],
                              probe_batch.target[grad_rows])

    ranges, meter, gradrec = WeightRangeTracker(), GammaMeter(), MarginGradRecorder()
    weights = []  # [2, B] (alpha, gamma) per step, for the histograms
    ctl = K1K2Controller(cfg.k1, cfg.k2, enabled=(method == "pgdpo_ctl"))
    k1, k2 = cfg.k1, cfg.k2

    def record_gradnorms(step):
        pred = policy(grad_x, grad_t)
        with torch.no_grad():
            ref_pred = ref(grad_x, grad_t)
        margin, norm = pair_grad_norms(pred, ref_pred, grad_y, params=params, method=loss_method,
                                       loss_kwargs=dict(beta=cfg.beta, k1=k1, k2=k2, margin=cfg.margin,
                                                        eps_rel=cfg.eps_rel, backend="torch"))
        gradrec.record(margin, norm, step)

    # Same data stream (pair indices, noise, timesteps) for every method of this seed and pair set.
    dgen = torch.Generator().manual_seed(30_000 + 97 * seed + set_index)
    probe.maybe_measure(0, policy)
    record_gradnorms(0)
    for step in range(cfg.steps):
        idx = torch.randint(x_w.shape[0], (cfg.batch_pairs,), generator=dgen)
        noise = torch.randn(cfg.batch_pairs, 2, generator=dgen)
        sigma = torch.rand(cfg.batch_pairs, generator=dgen)
        sigma2 = torch.cat([sigma, sigma])
        x0 = torch.cat([x_w[idx], x_l[idx]])
        x_t, target = flow_matching_noising(x0, torch.cat([noise, noise]), sigma2)
        pred = policy(x_t, sigma2)
        with torch.no_grad():
            ref_pred = ref(x_t, sigma2)
        kw = dict(beta=cfg.beta, k1=k1, k2=k2, margin=cfg.margin, eps_rel=cfg.eps_rel, backend="torch")
        loss, stats = pgdpo_loss(pred, ref_pred, target, method=loss_method, return_stats=True, **kw)
        ranges.update(stats, step)
        weights.append(torch.stack([stats["alpha"], stats["gamma"]]).float())
        if cfg.gamma_every and step % cfg.gamma_every == 0:
            meter.update(gamma_from_pred(pred, ref_pred, target, params, lr=cfg.lr, method=loss_method,
                                         loss_kwargs=kw, components=True), step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        k1, k2 = ctl.update(stats)
        done = step + 1
        if probe.maybe_measure(done, policy) is not None and done % cfg.gradnorm_every == 0:
            record_gradnorms(done)
        if bar is not None:
            bar.update(1)
    if probe.history[-1].step != cfg.steps:
        probe.measure(policy, cfg.steps)
    return {"probe": probe, "ranges": ranges, "gamma": meter, "gradrec": gradrec, "k1": k1, "k2": k2,
            "weights": torch.cat(weights, 1)}


# ----------------------------------------------------------------------------------------------------
# aggregation
# ----------------------------------------------------------------------------------------------------


def _mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def _std(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.pstdev(xs) if len(xs) > 1 else 0.0 if xs else None


def _merge_ranges(parts: list[dict]) -> dict | None:
    parts = [p for p in parts if p["count"]]
    if not parts:
        return None
    n = sum(p["count"] for p in parts)
    return {"mean": sum(p["mean"] * p["count"] for p in parts) / n, "min": min(p["min"] for p in parts),
            "max": max(p["max"] for p in parts),
            "inside_fraction": sum(p["inside_fraction"] * p["count"] for p in parts) / n,
            "target_range": parts[0]["target_range"], "count": n}


def aggregate(method: str, runs: list[dict]) -> dict:
    """Summary of one method over a list of runs (seeds, and possibly pair sets)."""
    lm = _loss_method(method)
    summaries = [r["probe"].summary() for r in runs]
    curves = [r["probe"].curves() for r in runs]
    gsum = [r["gamma"].summary() for r in runs]
    rsum = [r["ranges"].summary() for r in runs]
    gradrec = MarginGradRecorder()
    for r in runs:
        gradrec.margins += r["gradrec"].margins
        gradrec.norms += r["gradrec"].norms
    own = [x for r in runs for x in r["gamma"].delta_method if x is not None]
    # Steps at which Gamma was measured are the same in every run; average the running fractions.
    running = [r["gamma"].running_positive_fraction() for r in runs]
    n_gamma = min(len(x) for x in running) if running else 0
    step_curve = curves[0]["step"]
    out = {
        "chosen_logp_change": _mean([s["chosen_logp_change"] for s in summaries]),
        "rejected_logp_change": _mean([s["rejected_logp_change"] for s in summaries]),
        "chosen_logp_change_std": _std([s["chosen_logp_change"] for s in summaries]),
        "rejected_logp_change_std": _std([s["rejected_logp_change"] for s in summaries]),
        "chosen_rose_fraction": _mean([s["chosen_rose_fraction"] for s in summaries]),
        "chosen_rose_runs": _mean([float(s["chosen_logp_change"] > 0) for s in summaries]),
        "gamma_positive_fraction": None if lm == "dpo" else _mean([g["positive_fraction"] for g in gsum]),
        "gamma_mean": None if lm == "dpo" else _mean([g["mean"] for g in gsum]),
        "own_step_chosen_up_fraction": (sum(x > 0 for x in own) / len(own)) if own else None,
        "own_step_chosen_delta_mean": _mean(own),
        "alpha": _merge_ranges([s["alpha"] for s in rsum]) if lm in ("ars", "pgdpo") else None,
        "gamma": _merge_ranges([s["gamma"] for s in rsum]) if lm in ("ipr", "pgdpo") else None,
        "margin_positive_fraction": _mean([s["margin_positive_fraction"] for s in rsum]),
        "d_l_positive_fraction": _mean([s["d_l_positive_fraction"] for s in rsum]),
        "grad_norm_vs_margin": {**gradrec.summary(), "binned": gradrec.binned(10)},
        "final_k1": _mean([r["k1"] for r in runs]),
        "final_k2": _mean([r["k2"] for r in runs]),
        "curves": {
            "step": step_curve,
            **{key: [_mean([c[key][i] for c in curves]) for i in range(len(step_curve))]
               for key in ("chosen_logp_change", "rejected_logp_change", "logp_gap")},
            "gamma_step": runs[0]["gamma"].steps[:n_gamma],
            "gamma_positive_running": [_mean([x[i] for x in running]) for i in range(n_gamma)],
        },
    }
    if lm == "dpo":
        out["curves"].pop("gamma_positive_running")
        out["curves"].pop("gamma_step")
    return out


def _fmt(x, digits=3):
    return "n/a" if x is None else f"{x:.{digits}g}"


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _peak(m: dict) -> str:
    c = m["curves"]
    i = max(range(len(c["step"])), key=lambda k: c["chosen_logp_change"][k])
    if i == 0:
        return "the seed-mean chosen curve never rose above its start"
    return (f"the seed-mean chosen curve peaked at {_fmt(c['chosen_logp_change'][i])} at step "
            f"{c['step'][i]} of {c['step'][-1]}")


def _sem(xs: list[float]) -> float:
    """Standard error of the mean over seeds (0 for a single seed)."""
    return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0


def _direction(m: dict) -> tuple[bool, bool, str]:
    """(rose, fell, words): the chosen change is called a rise / fall only beyond 2 standard errors over
    seeds (with one seed: its sign)."""
    xs = m["chosen_logp_change_per_seed"]
    mu, se = sum(xs) / len(xs), _sem(xs)
    rose, fell = mu - 2 * se > 0, mu + 2 * se < 0
    n_up = sum(x > 0 for x in xs)
    words = (f"{_fmt(mu)} (± {_fmt(se)} s.e. over {len(xs)} seeds; up in {n_up}/{len(xs)} seeds): "
             + ("a rise" if rose else "a fall" if fell else "no change beyond noise"))
    return rose, fell, words


def findings(summary: dict) -> tuple[list[str], dict]:
    """Plain sentences and true/false verdicts computed from the numbers."""
    lines, verdict = [], {}
    margin = summary.get("settings", {}).get("margin", "signed")
    paper_low = min(PAPER["gamma_positive_fraction"].values())
    for name, ps in summary["pair_sets"].items():
        ms = ps["methods"]
        dpo = ms.get("dpo")
        if dpo:
            _, fell, words = _direction(dpo)
            verdict[f"dpo_displaces_chosen_{name}"] = fell
            lines.append(f"[{name}] DPO: chosen log-likelihood proxy change {words}; rejected "
                         f"{_fmt(dpo['rejected_logp_change'])}; {_peak(dpo)}.")
        for mname in ("pgdpo", "ars", "ipr", "pgdpo_ctl"):
            m = ms.get(mname)
            if not m:
                continue
            rose, _, words = _direction(m)
            gp = m["gamma_positive_fraction"]
            label = {"pgdpo": "PG-DPO", "pgdpo_ctl": "PG-DPO + K1/K2 controller"}.get(mname, mname.upper())
            lines.append(f"[{name}] {label}: chosen change {words}; rejected "
                         f"{_fmt(m['rejected_logp_change'])}; {_peak(m)}; Gamma against DPO > 0 on "
                         f"{_pct(gp)} of the measured steps (paper: 81.7% Wan2.1-14B, 76.9% VideoCrafter2).")
            if mname == "pgdpo":
                verdict[f"pgdpo_chosen_rises_{name}"] = rose
                if dpo:
                    above = m["chosen_logp_change"] > dpo["chosen_logp_change"]
                    verdict[f"pgdpo_chosen_above_dpo_{name}"] = above
                verdict[f"pgdpo_gamma_positive_majority_{name}"] = gp is not None and gp > 0.5
                verdict[f"pgdpo_gamma_positive_at_paper_level_{name}"] = gp is not None and gp >= paper_low
            a, g = m["alpha"], m["gamma"]
            if mname in ("pgdpo", "pgdpo_ctl") and a and g:
                lines.append(
                    f"[{name}] {label} weights: alpha mean {_fmt(a['mean'])}, inside [0.5, 0.8] for "
                    f"{_pct(a['inside_fraction'])} of pair-steps; gamma mean {_fmt(g['mean'])}, inside "
                    f"[0, 0.5] for {_pct(g['inside_fraction'])}; final K1 {_fmt(m['final_k1'])}, K2 "
                    f"{_fmt(m['final_k2'])}. "
                    f"The normalised margin m = {_MARGIN_FORMULA[margin]} was positive (the only case with "
                    f"alpha > 0.5, gamma < 0.5) on {_pct(m['margin_positive_fraction'])} of pair-steps; the "
                    f"rejected half was worse than the reference (d_l > 0"
                    + (", which makes m < 0 for a correctly ordered pair" if margin == "signed" else "")
                    + f") on {_pct(m['d_l_positive_fraction'])}.")
        if dpo:
            gn = dpo["grad_norm_vs_margin"]
            ratio = gn.get("top_to_bottom_ratio")
            verdict[f"dpo_grad_vanishes_at_large_margin_{name}"] = ratio is not None and ratio < 0.5
            lines.append(f"[{name}] DPO gradient norm vs reward margin (Fig. 1a): Spearman "
                         f"{_fmt(gn.get('spearman'))}; the median norm in the top margin quintile is "
                         f"{_fmt(ratio)}x that of the bottom quintile (reward margins "
                         f"{_fmt(gn.get('margin_range', [None])[0])} to "
                         f"{_fmt(gn.get('margin_range', [None, None])[-1])}).")
    claims = [k for k in verdict if k.startswith(("pgdpo_chosen_rises", "pgdpo_gamma_positive_at_paper"))]
    verdict["all_pgdpo_claims_hold"] = bool(claims) and all(verdict[k] for k in claims)
    failed = [k for k in claims if not verdict[k]]
    lines.append("Overall: " + ("on this toy the paper's PG-DPO claims (the chosen likelihood rises; "
                                f"Gamma > 0 on at least {_pct(paper_low)} of steps) hold in every pair set."
                                if verdict["all_pgdpo_claims_hold"] else
                                "on this toy the paper's PG-DPO claims do NOT all hold; false: "
                                + ", ".join(failed) + "."))
    return lines, verdict


# ----------------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------------


def plot_all(summary: dict, runs: dict, out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(summary["pair_sets"])
    methods = list(summary["methods"])
    colors = {"near": "tab:purple", "far": "tab:green"}
    files = []

    # Fig. 2 analogue: one panel per (pair set, quantity), one line per method, so methods compare
    # directly (the chosen curve is the question; the rejected one can be 10x larger).
    mcolors = {"dpo": "tab:red", "ars": "tab:orange", "ipr": "tab:cyan", "pgdpo": "tab:blue",
               "pgdpo_ctl": "tab:gray"}
    panels = (("chosen_logp_change", "chosen: Δ log-lik. proxy"),
              ("rejected_logp_change", "rejected: Δ log-lik. proxy"),
              ("logp_gap", "chosen - rejected proxy"))
    fig, axes = plt.subplots(len(sets), 3, figsize=(12, 3.0 * len(sets)), squeeze=False)
    for i, s in enumerate(sets):
        for j, (key, label) in enumerate(panels):
            ax = axes[i][j]
            for m in methods:
                rs = runs[(s, m)]
                steps = rs[0]["probe"].curves()["step"]
                ys = torch.tensor([r["probe"].curves()[key] for r in rs], dtype=torch.float64)
                mu = ys.mean(0)
                ax.plot(steps, mu, "--" if m == "dpo" else "-", color=mcolors.get(m), label=m, lw=1.4)
                if len(rs) > 1:
                    sd = ys.std(0)
                    ax.fill_between(steps, mu - sd, mu + sd, color=mcolors.get(m), alpha=0.12, lw=0)
            if key != "logp_gap":
                ax.axhline(0, color="k", lw=0.6)
            ax.set_title(f"{s} pairs: {label}", fontsize=9)
            if i == len(sets) - 1:
                ax.set_xlabel("step")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Log-likelihood proxy -mean (pred - target)^2 on the fixed probe set, change since the "
                 "reference (mean ± sd over seeds)", fontsize=10)
    fig.tight_layout()
    files.append(os.path.join(out, "fig2_likelihood.png"))
    fig.savefig(files[-1], dpi=90)
    plt.close(fig)

    # Fig. 1a analogue
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 3.0), squeeze=False)
    for j, m in enumerate(methods):
        ax = axes[0][j]
        for s in sets:
            mg = [x for r in runs[(s, m)] for x in r["gradrec"].margins]
            gn = [max(x, 1e-12) for r in runs[(s, m)] for x in r["gradrec"].norms]
            ax.scatter(mg, gn, s=4, alpha=0.4, color=colors.get(s), label=s)
        b = summary["methods"][m]["grad_norm_vs_margin"]["binned"]
        ax.plot(b["margin"], [max(x, 1e-12) for x in b["grad_norm_median"]], "k-", lw=1.2,
                label="binned median")
        ax.set_yscale("log")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("reward margin -β/2 (d_w - d_l)")
        ax.set_title(f"‖∇θ L_{m}‖ per pair", fontsize=9)
    axes[0][0].set_ylabel("gradient norm")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    files.append(os.path.join(out, "fig1a_gradnorm_margin.png"))
    fig.savefig(files[-1], dpi=90)
    plt.close(fig)

    # alpha / gamma ranges: histograms over all pair-steps, target ranges shaded
    wm = [m for m in methods if _loss_method(m) != "dpo"]
    if wm:
        fig, axes = plt.subplots(2, len(wm), figsize=(3.2 * len(wm), 5.0), squeeze=False)
        for j, m in enumerate(wm):
            for i, (w, rng) in enumerate((("alpha", ALPHA_RANGE), ("gamma", GAMMA_RANGE))):
                ax = axes[i][j]
                ax.axvspan(*rng, color="0.88", zorder=0, label=f"paper's range {list(rng)}")
                for s in sets:
                    v = torch.cat([r["weights"][i] for r in runs[(s, m)]]).double()
                    ax.hist(v.numpy(), bins=40, range=(0, 1), density=True, histtype="step", lw=1.3,
                            color=colors.get(s), label=f"{s}: mean {float(v.mean()):.2f}")
                ax.set_yscale("log")
                ax.set_title(f"{w} ({m})", fontsize=9)
                ax.set_xlabel(w)
                ax.legend(fontsize=6)
        fig.suptitle("ARS weight α and IPR switch γ over all pair-steps (density; 1 where the method has no "
                     "such weight)", fontsize=10)
        fig.tight_layout()
        files.append(os.path.join(out, "weight_ranges.png"))
        fig.savefig(files[-1], dpi=90)
        plt.close(fig)

        fig, axes = plt.subplots(2, len(wm), figsize=(3.2 * len(wm), 5.0), squeeze=False)
        for j, m in enumerate(wm):
            for s in sets:
                rs = runs[(s, m)]
                for r in rs:
                    axes[0][j].scatter(r["gamma"].steps, r["gamma"].values, s=2, alpha=0.3,
                                       color=colors.get(s))
                run = summary["pair_sets"][s]["methods"][m]["curves"]
                axes[1][j].plot(run["gamma_step"], run["gamma_positive_running"], color=colors.get(s),
                                label=s)
            axes[0][j].axhline(0, color="k", lw=0.6)
            axes[0][j].set_yscale("symlog", linthresh=1e-6)
            axes[0][j].set_title(f"Γ({m} vs dpo) per step", fontsize=9)
            for v in PAPER["gamma_positive_fraction"].values():
                axes[1][j].axhline(v, ls=":", color="0.4", lw=0.8)
            axes[1][j].set_ylim(0, 1)
            axes[1][j].set_title("running fraction Γ > 0 (dotted: paper)", fontsize=9)
            axes[1][j].set_xlabel("step")
        axes[1][0].legend(fontsize=7)
        fig.tight_layout()
        files.append(os.path.join(out, "gamma_statistic.png"))
        fig.savefig(files[-1], dpi=90)
        plt.close(fig)
    return files


# ----------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    d = ToyConfig()
    p = argparse.ArgumentParser(
        prog="pgdpo toy",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "The likelihood-displacement lab: pre-train a tiny flow-matching denoiser on a 2-D mixture\n"
            "of Gaussians (the reference), then align it with DPO, ARS, IPR and PG-DPO from the same\n"
            "reference, seeds and data stream, on near-identical pairs (small margins) and well-separated\n"
            "pairs (large margins). Tracks the chosen / rejected log-likelihood proxies of a fixed probe\n"
            "set (paper Fig. 2), the Γ statistic of Eq. 10 (PG-DPO's first-order chosen-likelihood gain\n"
            "over DPO per step), α / γ ranges and the gradient norm against the reward margin (Fig. 1a)."),
        epilog=(
            "Writes OUT/summary.json (schema in the module docstring: python -c 'import pgdpo.tools.toy; "
            "help(pgdpo.tools.toy)')\nand OUT/*.png. The findings (plain sentences computed from the "
            "numbers) are printed and stored\nunder 'findings' / 'verdict'. Defaults take about five minutes "
            "on 2 CPU cores; --quick (< 30 s) is for CI."))
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--quick", action="store_true",
                   help="tiny settings for CI: 1 seed, 40 steps, small model and probe (< 30 s)")
    p.add_argument("--seeds", type=int, help=f"number of seeds (reference, pairs, noise) (default {d.seeds})")
    p.add_argument("--steps", type=int, help=f"alignment steps per run (default {d.steps})")
    p.add_argument("--lr", type=float, help=f"alignment learning rate (default {d.lr})")
    p.add_argument("--optimizer", choices=("sgd", "adam"),
                   help="alignment optimiser (default sgd: the paper's Γ is defined for an SGD step)")
    p.add_argument("--batch-pairs", type=int, help=f"pairs per alignment step (default {d.batch_pairs})")
    p.add_argument("--beta", type=float, help=f"DPO temperature β (default {d.beta:g}, the paper's)")
    p.add_argument("--k1", type=float, help=f"ARS sharpness K1 (default {d.k1:g})")
    p.add_argument("--k2", type=float, help=f"IPR sharpness K2 (default {d.k2:g})")
    p.add_argument("--margin", choices=MARGINS,
                   help="normalised margin: 'signed' = the paper's printed Eq. 7, (d_w - d_l)/(d_l + eps) "
                        "(default); 'abs' = (d_l - d_w)/(|d_l| + eps), the sign of the reward margin")
    p.add_argument("--eps-rel", type=float,
                   help="relative guard of the margin's denominator: e = eps + EPS_REL * MSE_ref,l "
                        "(default 0: the paper's absolute eps)")
    p.add_argument("--pair-sets", help="comma-separated pair sets: near, far (default near,far)")
    p.add_argument("--methods", help="comma-separated methods among dpo,ars,ipr,pgdpo (default all four)")
    p.add_argument("--controller", action="store_true",
                   help="also run 'pgdpo_ctl': PG-DPO with the K1/K2 controller of pgdpo.train.diagnostics")
    p.add_argument("--probe-every", type=int,
                   help=f"steps between probe measurements (default {d.probe_every})")
    p.add_argument("--gamma-every", type=int,
                   help=f"measure Γ every N steps (3 extra backward passes each) (default {d.gamma_every})")
    p.add_argument("--threads", type=int, help=f"torch CPU threads (default {d.threads})")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(args) -> ToyConfig:
    cfg = ToyConfig(**(QUICK if args.quick else {}))
    for name in ("seeds", "steps", "lr", "optimizer", "batch_pairs", "beta", "k1", "k2", "margin", "eps_rel",
                 "probe_every", "gamma_every", "threads"):
        v = getattr(args, name)
        if v is not None:
            setattr(cfg, name, v)
    if args.pair_sets:
        cfg.pair_sets = tuple(s.strip() for s in args.pair_sets.split(",") if s.strip())
    if args.methods:
        cfg.methods = tuple(s.strip() for s in args.methods.split(",") if s.strip())
    cfg.controller = args.controller
    return cfg


def validate(cfg: ToyConfig) -> None:
    bad = [s for s in cfg.pair_sets if s not in PAIR_SETS]
    if bad or not cfg.pair_sets:
        raise SystemExit(f"pgdpo toy: unknown pair set(s) {bad}; choose from {sorted(PAIR_SETS)}")
    bad = [m for m in cfg.methods if m not in METHOD_ORDER]
    if bad or not cfg.methods:
        raise SystemExit(f"pgdpo toy: unknown method(s) {bad}; choose from {list(METHOD_ORDER)}")
    for name in ("seeds", "steps", "batch_pairs", "probe_every", "threads"):
        if getattr(cfg, name) < 1:
            raise SystemExit(f"pgdpo toy: --{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.gamma_every < 0:
        raise SystemExit("pgdpo toy: --gamma-every must be >= 0 (0: off)")
    if not (cfg.eps_rel >= 0 and math.isfinite(cfg.eps_rel)):
        raise SystemExit(f"pgdpo toy: --eps-rel must be >= 0, got {cfg.eps_rel}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise SystemExit(f"pgdpo toy: --lr must be > 0, got {cfg.lr}")


def _clean(x):
    """JSON-safe: NaN / inf become null, tuples lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def run(cfg: ToyConfig, out: str, *, plots: bool = True, progress: bool = True) -> dict:
    validate(cfg)
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    methods = list(cfg.methods) + (["pgdpo_ctl"] if cfg.controller else [])
    runs: dict[tuple[str, str], list[dict]] = {(s, m): [] for s in cfg.pair_sets for m in methods}
    distances = {s: [] for s in cfg.pair_sets}
    total = cfg.seeds * len(cfg.pair_sets) * len(methods) * cfg.steps
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="pgdpo toy: alignment steps", unit="step", file=sys.stderr,
                   dynamic_ncols=True)
    try:
        for seed in range(cfg.seeds):
            if bar is not None:
                bar.set_postfix_str(f"seed {seed}: pre-training the reference")
            ref = pretrain(cfg, seed)
            for si, s in enumerate(cfg.pair_sets):
                pairs = make_pairs(s, cfg, torch.Generator().manual_seed(40_000 + 97 * seed + si))
                distances[s].append(float((pairs[0] - pairs[1]).norm(dim=1).mean()))
                for m in methods:
                    if bar is not None:
                        bar.set_postfix_str(f"seed {seed} {s} {m}")
                    torch.manual_seed(50_000 + seed)
                    runs[(s, m)].append(align(cfg, ref, pairs, m, seed, si, bar))
    finally:
        if bar is not None:
            bar.close()

    summary = {"schema": "pgdpo.toy/1", "settings": {**asdict(cfg), "methods": methods}, "paper": PAPER,
               "methods": {}, "pair_sets": {}}
    for s in cfg.pair_sets:
        ms = {}
        for m in methods:
            ms[m] = aggregate(m, runs[(s, m)])
            ms[m]["chosen_logp_change_per_seed"] = [r["probe"].summary()["chosen_logp_change"]
                                                    for r in runs[(s, m)]]
        summary["pair_sets"][s] = {"description": PAIR_SETS[s], "clean_distance_mean": _mean(distances[s]),
                                   "methods": ms}
    for m in methods:
        summary["methods"][m] = aggregate(m, [r for s in cfg.pair_sets for r in runs[(s, m)]])
    summary["findings"], summary["verdict"] = findings(summary)
    summary["runtime_s"] = time.perf_counter() - t0
    summary = _clean(summary)
    if plots:
        summary["plots"] = [os.path.basename(f) for f in plot_all(summary, runs, out)]
    summary["runtime_s"] = time.perf_counter() - t0
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, allow_nan=False)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    summary = run(cfg, args.out, plots=not args.no_plots, progress=not args.no_progress)
    print(f"pgdpo toy: {summary['runtime_s']:.1f} s; wrote {os.path.join(args.out, 'summary.json')}"
          + (f" and {len(summary.get('plots', []))} plots" if summary.get("plots") else ""))
    print("\n".join(summary["findings"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
