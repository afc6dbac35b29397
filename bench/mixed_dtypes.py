"""Mixed input dtypes: bf16 pred / ref_pred with an fp32 target, read in place vs promoted by copy.

Under autocast the two predictions are bf16 while the target (``noise - x0`` from fp32 latents) is
fp32. The fused backends read each input in its own dtype; before, ``pgdpo_loss`` promoted all three
to fp32 (two full-size copies, kept alive until the backward) and the gradient came back in fp32 and
was cast to bf16. ``promoted`` below is that old path, spelled out by the caller (the same kernels on
fp32 copies, the same copies and casts), so both run side by side in one process on one build.

    python -m bench.mixed_dtypes [--shape cpu-target] [--backend cpu] [--repeats 30] [--out DIR]

Writes ``mixed.json`` and ``mixed.md`` (medians and p10/p90 of fwd+bwd, peak extra memory).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from pgdpo import pgdpo_loss
from pgdpo.tools.benchmark.cases import parse_shape
from pgdpo.tools.benchmark.machine import git_info, machine_info, slug, versions
from pgdpo.tools.benchmark.timing import peak_extra_memory, run_interleaved, summarize


def _inputs(shape, sets: int):
    out = []
    for s in range(sets):
        g = torch.Generator().manual_seed(s)
        target = torch.randn(shape, generator=g)
        ref = target + 0.3 * torch.randn(shape, generator=g)
        pred = ref + 0.1 * torch.randn(shape, generator=g)
        out.append((pred.bfloat16().requires_grad_(True), ref.bfloat16(), target))
    return out


def _providers(backend: str, weighting: str):
    def in_place(p, r, t):
        pgdpo_loss(p, r, t, backend=backend, weighting=weighting).backward()
        return p.grad

    def promoted(p, r, t):  # what pgdpo_loss did before: fp32 copies, fp32 gradient, cast back
        pgdpo_loss(p.float(), r.float(), t, backend=backend, weighting=weighting).backward()
        return p.grad

    return {"in place": in_place, "promoted (old)": promoted}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.mixed_dtypes", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="cpu-target", help="a bench shape name or 2Bx... (default cpu-target)")
    ap.add_argument("--backend", default="cpu", choices=["cpu", "triton"], help="fused backend (default cpu)")
    ap.add_argument("--repeats", type=int, default=30, help="timed repeats per provider (default 30)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--sets", type=int, default=4, help="input sets rotated through (default 4)")
    ap.add_argument("--out", default=None, help="output folder (default bench/results/mixed-<machine>)")
    args = ap.parse_args(argv)
    name, shape = parse_shape(args.shape)
    device = torch.device("cuda" if args.backend == "triton" and torch.cuda.is_available() else "cpu")
    sets = [tuple(x.to(device) if i else x.detach().to(device).requires_grad_(True) for i, x in enumerate(s))
            for s in _inputs(shape, args.sets)]
    rows = []
    for weighting in ("sample", "element"):
        provs = _providers(args.backend, weighting)

        def step_for(fn):
            def step(i, timer):
                p, r, t = sets[i % len(sets)]
                p.grad = None
                timer.start()
                fn(p, r, t)
                timer.stop()
            return step

        samples, errors = run_interleaved({k: step_for(f) for k, f in provs.items()}, device,
                                          warmup=args.warmup, repeats=args.repeats)
        for prov, fn in provs.items():
            if prov in errors:
                rows.append({"weighting": weighting, "provider": prov, "error": errors[prov]})
                continue
            p, r, t = sets[0]

            def call(fn=fn, p=p, r=r, t=t):
                p.grad = None
                return fn(p, r, t)

            mem = peak_extra_memory(call, device)
            rows.append({"weighting": weighting, "provider": prov, **summarize(samples[prov]),
                         "extra_bytes": mem["extra_bytes"], "memory_method": mem["method"]})
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"mixed-{slug(device)}")
    os.makedirs(out, exist_ok=True)
    record = {"shape": list(shape), "shape_name": name, "backend": args.backend, "rows": rows,
              "machine": machine_info(device), "versions": versions(), "git": git_info()}
    with open(os.path.join(out, "mixed.json"), "w") as f:
        json.dump(record, f, indent=1)
    n_bytes = 1
    for d in shape:
        n_bytes *= d
    lines = [f"# bf16 pred / ref_pred + fp32 target, fwd+bwd, backend={args.backend}, shape {name} "
             f"{'x'.join(map(str, shape))}", "",
             f"commit {record['git'].get('commit', '?')}, torch {record['versions'].get('torch')}, "
             f"{record['machine']['cpu_model']}, {record['machine']['torch_threads']} threads; "
             f"{args.repeats} interleaved repeats, {args.sets} rotating input sets.", "",
             "| weighting | provider | median ms | p10 ms | p90 ms | peak extra memory MB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['weighting']} | {r['provider']} | error: {r['error']} | | | |")
        else:
            lines.append(f"| {r['weighting']} | {r['provider']} | {r['median_ms']:.3f} | {r['p10_ms']:.3f} | "
                         f"{r['p90_ms']:.3f} | {r['extra_bytes'] / 1e6:.2f} |")
    lines += ["", f"One bf16 tensor is {n_bytes * 2 / 1e6:.2f} MB, one fp32 tensor "
                  f"{n_bytes * 4 / 1e6:.2f} MB."]
    with open(os.path.join(out, "mixed.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
