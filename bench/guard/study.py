"""The noise guard study (docs/margin.md): what the margin's denominator does with float noise.

Part 1, policy == reference up to noise: two copies of one model whose outputs differ by a relative
noise delta (fp32 nondeterminism ~1e-7, bf16 ~4e-3). Exact arithmetic gives m = 0, alpha = gamma = 1/2;
we report the spread of gamma for the absolute eps (the paper's), the relative guard eps_rel, and a clamp
of |m| (the other candidate), for both margin readings.

Part 2, the cost on real signal: the distribution of |d_l| / MSE_ref,l during the toy's PG-DPO training,
i.e. how often the guard eps_rel * MSE_ref,l would dominate the denominator.

    python -m bench.guard.study [--out bench/results/guard-study.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from pgdpo import pgdpo_loss


def noise_study(n: int, pairs: int, delta: float, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(2 * pairs, n, generator=g, dtype=torch.float64)
    ref = target + 0.3 * torch.randn(2 * pairs, n, generator=g, dtype=torch.float64)
    pred = ref * (1 + delta * torch.randn(ref.shape, generator=g, dtype=torch.float64))
    out = {}
    for margin in ("signed", "abs"):
        for eps_rel in (0.0, 1e-3, 1e-2, 1e-1):
            _, st = pgdpo_loss(pred, ref, target, margin=margin, eps_rel=eps_rel, backend="torch",
                               return_stats=True)
            dev = (st["gamma"] - 0.5).abs()
            out[f"{margin} eps_rel={eps_rel:g}"] = {"gamma_dev_median": float(dev.median()),
                                                   "gamma_dev_max": float(dev.max())}
        _, st = pgdpo_loss(pred, ref, target, margin=margin, backend="torch", return_stats=True)
        for clip in (0.1, 1.0):
            dev = (torch.sigmoid(-10 * st["margin"].clamp(-clip, clip)) - 0.5).abs()
            out[f"{margin} clamp|m|<={clip:g}"] = {"gamma_dev_median": float(dev.median()),
                                                  "gamma_dev_max": float(dev.max())}
    return out


def signal_study(steps: int, seed: int = 0) -> dict:
    """|d_l| / MSE_ref,l on the toy's training batches (PG-DPO, margin='abs', both pair sets)."""
    from pgdpo.tools import toy

    ratios = {}
    real = toy.pgdpo_loss

    def spy(*args, **kw):
        res = real(*args, **kw)
        if kw.get("return_stats"):
            st = res[1]
            ratios.setdefault(current[0], []).append((st["d_l"].abs() / st["mse_ref_rejected"]).detach())
        return res

    cfg = toy.ToyConfig(seeds=1, steps=steps, methods=("pgdpo",), margin="abs", gamma_every=0)
    ref = toy.pretrain(cfg, seed)
    current = [None]
    toy.pgdpo_loss = spy
    try:
        for si, s in enumerate(cfg.pair_sets):
            current[0] = s
            pairs = toy.make_pairs(s, cfg, torch.Generator().manual_seed(40_000 + 97 * seed + si))
            toy.align(cfg, ref, pairs, "pgdpo", seed, si)
    finally:
        toy.pgdpo_loss = real
    out = {}
    for s, rs in ratios.items():
        r = torch.cat(rs).double()
        q = torch.quantile(r, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64))
        out[s] = {"quantiles_10_25_50_75_90": [float(x) for x in q],
                  **{f"below_{t:g}": float((r < t).double().mean()) for t in (1e-3, 1e-2, 1e-1)}}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.guard.study", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/guard-study.json")
    ap.add_argument("--steps", type=int, default=600, help="toy alignment steps for part 2 (default 600)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    res = {"noise": {}, "signal": signal_study(args.steps)}
    for n in (4096, 262144):
        for delta in (1e-7, 4e-3):
            res["noise"][f"N={n} delta={delta:g}"] = noise_study(n, 16, delta)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    for case, rows in res["noise"].items():
        print(case)
        for k, v in rows.items():
            print(f"  {k:24s} |gamma-1/2| median {v['gamma_dev_median']:.3g} max {v['gamma_dev_max']:.3g}")
    for s, v in res["signal"].items():
        print(s, {k: (round(x, 4) if isinstance(x, float) else [round(y, 4) for y in x])
                  for k, x in v.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
