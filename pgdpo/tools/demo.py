"""``pgdpo demo``: the fused PG-DPO loss against the eager one on this machine, in about a minute.

A front end over the benchmark suite (:mod:`pgdpo.tools.benchmark`, the machinery of ``python -m bench``):
a few cases, forward + backward only, no memory measurement. For each shape and dtype the suite puts the
same random inputs (a policy slightly off a reference, as early in training) through the device's fused
op (``backend="cpu"``, the C++ op, on the CPU; ``backend="triton"`` on CUDA), the eager loss
(``backend="torch"``) and, with ``--compile``, ``torch.compile`` of the eager reference; checks each
one's loss, gradient and statistics against the float64 reference with the suite's tolerances; times
them interleaved; and prints the suite's tables: median time with its spread, speed-ups, time over the
copy-bandwidth floor, errors. For the full benchmark (all passes, more shapes, memory, plots):
``python -m bench`` in the repository.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .benchmark.cases import DEFAULT_DTYPES, DTYPES, SHAPES, make_cases
from .benchmark.machine import resolve_device

#: per device: a small video latent and an image latent on the CPU; a Wan2.1 480p latent on CUDA
DEFAULT_SHAPES = {"cpu": ("cpu-target", "sdxl"), "cuda": ("wan480", "cpu-target")}
#: bytes copied to measure the bandwidth behind the floor column (small: the demo is quick)
BANDWIDTH_MIB = {"cpu": 32, "cuda": 256}

DESCRIPTION = __doc__.replace("``", "").replace(":mod:`", "").replace("`", "")

EPILOG = f"""\
shapes: a name of the benchmark's (the first dimension is 2B, chosen half first)
{chr(10).join(f"  {n:11s} {'x'.join(map(str, s)):18s} {text}" for n, (s, text) in SHAPES.items())}
  or explicit dimensions such as 4x16x8x30x52.
defaults: on the CPU {", ".join(DEFAULT_SHAPES["cpu"])}; on CUDA {", ".join(DEFAULT_SHAPES["cuda"])};
dtypes {",".join(DEFAULT_DTYPES)}.

The exit status is 1 when an implementation disagrees with the float64 reference. One that cannot run
here (the fused op without a compiler or a GPU, torch.compile without a working Inductor) is listed as
unavailable with the reason, and the others are still timed.

Timings on a machine shared with other work are noisy: compare the p10-p90 spreads, not only the
medians.

examples:
  pgdpo demo
  pgdpo demo --shapes wan480 --dtypes bf16 --repeats 50
  pgdpo demo --compile            # also torch.compile of the eager loss (compiles once per case)
  pgdpo demo --out demo-results   # also bench.json (every figure), bench.md and bench.png
"""


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="pgdpo demo", description=DESCRIPTION, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", help="comma-separated shape names or dimensions (default: see below)")
    ap.add_argument("--dtypes", default=",".join(DEFAULT_DTYPES),
                    help=f"comma-separated from {', '.join(DTYPES)} (default {','.join(DEFAULT_DTYPES)})")
    ap.add_argument("--device", default="auto",
                    help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    ap.add_argument("--compile", action="store_true",
                    help="also time torch.compile of the eager reference (compiles once per case)")
    ap.add_argument("--repeats", type=int, default=30, help="timed forward+backward calls each (default 30)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first input set (default 0)")
    ap.add_argument("--out", type=Path, help="also write the suite's bench.json, bench.md, bench.png here")
    ap.add_argument("--no-progress", action="store_true",
                    help="no progress bar (default: a tqdm bar on stderr when it is a terminal)")
    return ap.parse_args(argv)


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_config(args):
    """The suite's :class:`~pgdpo.tools.benchmark.suite.Config` for the demo's arguments."""
    from .benchmark.suite import Config

    device = resolve_device(args.device)
    cases = make_cases(_csv(args.shapes) if args.shapes else DEFAULT_SHAPES[device.type], _csv(args.dtypes))
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError("--repeats must be >= 1 and --warmup >= 0")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    return Config(device=str(device), cases=cases,
                  providers=["fused", "eager"] + (["compile"] if args.compile else []),
                  passes=["fwdbwd"], repeats=args.repeats, warmup=args.warmup, budget_s=None,
                  bandwidth_bytes=BANDWIDTH_MIB[device.type] << 20, memory=False, seed=args.seed,
                  progress=False if args.no_progress else None)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = build_config(args)
    except ValueError as exc:
        print(f"pgdpo demo: error: {exc}", file=sys.stderr)
        return 2

    from .benchmark import report
    from .benchmark.suite import run_suite

    print(f"pgdpo demo: {len(cfg.cases)} cases x {', '.join(cfg.providers)}, forward + backward, on "
          f"{cfg.device} ({torch.get_num_threads()} threads)", file=sys.stderr)
    record = run_suite(cfg)
    record["notes"].append("pgdpo demo: forward + backward only, no memory measurement; the full "
                           "suite: python -m bench")
    print(report.markdown(record))
    if args.out is not None:
        paths = report.write_all(record, args.out)
        print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    summary = record["summary"]
    if not summary["all_agree"]:
        print("FAILED: disagrees with the float64 reference: " + ", ".join(summary["mismatches"]))
        return 1
    agreed = [p for p in cfg.providers if p not in summary["unavailable"]]
    verb = "agrees" if len(agreed) == 1 else "agree"
    unavailable = "".join(f"; {name} unavailable: {why}" for name, why in summary["unavailable"].items())
    print(f"{', '.join(agreed)} {verb} with the float64 reference on every case (loss, gradient, statistics "
          f"within the suite's tolerances){unavailable}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
