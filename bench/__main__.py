"""``python -m bench``: the PG-DPO loss benchmark (run from the repository root). ``--help`` explains.

The command line of the suite; the machinery it runs (cases, timing, providers, the float64 oracle,
the report) is the package's :mod:`pgdpo.tools.benchmark`, which ``pgdpo demo`` runs too.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import tempfile
from pathlib import Path

import torch

from pgdpo.tools.benchmark.cases import (
    DEFAULT_DTYPES,
    DEFAULT_SHAPES,
    PASSES,
    SHAPES,
    SMOKE_CASES,
    SMOKE_SHAPES,
    Case,
    make_cases,
    parse_dtype,
    parse_shape,
)
from pgdpo.tools.benchmark.machine import resolve_device
from pgdpo.tools.benchmark.providers import PROVIDERS

#: where runs are kept (machine, versions and commit with each): the repository's bench/results/
RESULTS = Path(__file__).resolve().parent / "results"

DESCRIPTION = """\
Times the PG-DPO loss side by side, in one run, on the same inputs:
  fused    the device's fused op: backend "triton" on CUDA, "cpu" (the C++ op of csrc/) on the CPU
  eager    the eager reference, pgdpo_loss(backend="torch")
  compile  torch.compile(pgdpo.loss.reference.pgdpo_loss_reference, dynamic=False, fullgraph=True),
           compiled afresh per case; its compile time is reported apart
for the forward, the backward (timed right after its untimed forward) and forward+backward.

Before timing, each provider's loss, gradient and statistics are checked against the float64
reference on the same inputs (errors recorded; a mismatch makes the exit status 1). Providers are
timed interleaved round by round, each call on another input set, the sets together larger than
twice the last-level cache; figures are medians with p10/p90, min/max and quartiles. The device's
copy bandwidth is measured in the same run (start and end) and gives the floor:
read pred, ref_pred, target once and write the gradient once, 4 * 2B * N * itemsize bytes;
achieved GB/s and time/floor are reported. Peak extra memory of one forward+backward beyond the
inputs and the gradient: CUDA from torch.cuda.max_memory_allocated, CPU from torch.profiler's
memory events (torch's CPU allocator only).

Writes bench.json (every figure, machine, versions, commit), bench.md (tables) and bench.png
(log-scale bars per case and provider) to --out.
"""

EPILOG = f"""\
shapes (the first dimension is 2B, chosen half first):
{chr(10).join(f"  {n:11s} {'x'.join(map(str, s)):18s} {text}" for n, (s, text) in SHAPES.items())}
  or explicit dimensions such as 4x16x8x30x52; "all" = every named non-smoke shape.

default shapes: on CUDA {", ".join(DEFAULT_SHAPES["cuda"])};
on the CPU {", ".join(DEFAULT_SHAPES["cpu"])}, a few minutes on 2 cores (the Wan shapes take eager
PyTorch 0.1-0.5 s per call on such a machine: ask for them by name, e.g. --shapes wan480).
--smoke: {", ".join(" ".join(c) for c in SMOKE_CASES)}, 5 repeats: a check that the suite runs (CI);
--shapes/--dtypes still apply.

examples:
  python -m bench                                   # this machine's default suite
  python -m bench --shapes cpu-target --dtypes fp32 --passes fwdbwd --repeats 100
  python -m bench --device cuda --shapes wan480,wan720 --dtypes bf16
  python -m bench --smoke --out /tmp/bench-smoke
"""


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench", description=DESCRIPTION, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto",
                    help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    ap.add_argument("--shapes", help="comma-separated shape names or AxBx... dimensions (see below)")
    ap.add_argument("--dtypes",
                    help=f"comma-separated, from fp32, bf16, fp16, fp64 (default {','.join(DEFAULT_DTYPES)})")
    ap.add_argument("--providers", default=",".join(PROVIDERS),
                    help="comma-separated, from fused, eager, compile (default all)")
    ap.add_argument("--passes", default=",".join(PASSES),
                    help="comma-separated, from fwd, bwd, fwdbwd (default all)")
    ap.add_argument("--repeats", type=int,
                    help="timed calls per provider and pass (default: CUDA 200, CPU 50)")
    ap.add_argument("--warmup", type=int, help="untimed calls first (default: CUDA 20, CPU 5)")
    ap.add_argument("--budget", type=float,
                    help="stop a (case, pass) after this many seconds of timed repeats, never below 5 "
                         "repeats (default: CPU 10, CUDA none); 0 = no limit")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes, few repeats: checks the suite runs (CI)")
    ap.add_argument("--out", type=Path,
                    help="output folder (default bench/results/<machine>-<date>; with --smoke a new "
                         "temporary folder)")
    ap.add_argument("--note", action="append", default=[],
                    help="a remark stored with the results, e.g. 'machine shared with other jobs' "
                         "(repeatable)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default)")
    ap.add_argument("--method", default="pgdpo", help="loss method: pgdpo, ars, ipr, dpo (default pgdpo)")
    ap.add_argument("--weighting", default="sample", help="sample (default) or element")
    ap.add_argument("--bandwidth-mib", type=int,
                    help="size of the tensor copied to measure bandwidth (default: CUDA 1024, CPU 256)")
    ap.add_argument("--cold-compile", action="store_true",
                    help="disable Inductor's on-disk caches, so compile times are those of a first compile "
                         "(default: caches as configured; a repeated run then compiles faster)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--no-progress", action="store_true",
                    help="no progress bar (default: a tqdm bar on stderr when it is a terminal)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first input set (default 0)")
    return ap.parse_args(argv)


def build_config(args):
    from pgdpo.tools.benchmark.suite import Config

    dev = resolve_device(args.device)
    device = str(dev)
    cuda = dev.type == "cuda"

    if args.shapes == "all":
        shape_names = [n for n in SHAPES if n not in SMOKE_SHAPES]
    elif args.shapes:
        shape_names = _csv(args.shapes)
    else:
        shape_names = list(SMOKE_SHAPES if args.smoke else DEFAULT_SHAPES[dev.type])
    dtype_names = _csv(args.dtypes) if args.dtypes else list(DEFAULT_DTYPES)
    cases = make_cases(shape_names, dtype_names)
    if args.smoke and not args.shapes and not args.dtypes:
        cases = [Case(name, parse_shape(name)[1], parse_dtype(dt)) for name, dt in SMOKE_CASES]
    providers = _csv(args.providers)
    passes = _csv(args.passes)
    for what, got, allowed in (("--providers", providers, PROVIDERS), ("--passes", passes, PASSES)):
        bad = [x for x in got if x not in allowed]
        if bad or not got:
            raise ValueError(f"{what}: {', '.join(bad) or 'empty'} not among {', '.join(allowed)}")
    providers = [p for p in PROVIDERS if p in providers]
    passes = [p for p in PASSES if p in passes]

    if args.smoke:
        repeats, warmup, budget, bw_mib = 5, 1, None, 32
    else:
        repeats, warmup = (200, 20) if cuda else (50, 5)
        budget, bw_mib = (None, 1024) if cuda else (10.0, 256)
    repeats = args.repeats if args.repeats is not None else repeats
    warmup = args.warmup if args.warmup is not None else warmup
    if args.budget is not None:
        budget = args.budget or None
    bw_mib = args.bandwidth_mib or bw_mib
    if repeats < 1 or warmup < 0:
        raise ValueError("--repeats must be >= 1 and --warmup >= 0")
    if args.cold_compile:
        import torch._inductor.config as inductor_config

        inductor_config.force_disable_caches = True
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError("--threads must be >= 1")
        torch.set_num_threads(args.threads)

    return Config(device=device, cases=cases, providers=providers, passes=passes, repeats=repeats,
                  warmup=warmup, budget_s=budget,
                  options={"method": args.method, "weighting": args.weighting},
                  bandwidth_bytes=bw_mib << 20, memory=not args.no_memory, smoke=args.smoke, seed=args.seed,
                  progress=False if args.no_progress else None)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = build_config(args)
        from pgdpo.loss.options import LossOptions

        LossOptions(**cfg.options)
    except (ValueError, TypeError) as exc:
        print(f"python -m bench: error: {exc}", file=sys.stderr)
        return 2

    from pgdpo.tools.benchmark import machine, report
    from pgdpo.tools.benchmark.suite import run_suite

    out = args.out
    if out is None and args.smoke:
        out = Path(tempfile.mkdtemp(prefix="pgdpo-bench-smoke-"))
    elif out is None:
        date = _dt.date.today().strftime("%Y%m%d")
        out = RESULTS / f"{machine.slug(torch.device(cfg.device))}-{date}"
    print(f"pgdpo bench: {len(cfg.cases)} cases x {len(cfg.providers)} providers x {len(cfg.passes)} passes "
          f"on {cfg.device} ({torch.get_num_threads()} threads) -> {out}", file=sys.stderr)
    record = run_suite(cfg)
    record["notes"] += args.note
    if record["machine"]["cpus_available"] <= 4 and cfg.device == "cpu":
        record["notes"].append("CPU timings on a small machine are noisy when other work shares it: "
                               "compare the spreads, not just the medians")
    paths = report.write_all(record, out)
    md = paths["md"].read_text()
    print(md)
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    summ = record["summary"]
    for name, reason in summ["unavailable"].items():
        print(f"note: {name} unavailable: {reason}", file=sys.stderr)
    if not summ["all_agree"]:
        print("error: disagreement with the float64 reference: " + ", ".join(summ["mismatches"]),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
