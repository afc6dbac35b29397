"""Per-call host overhead of the fused loss in eager mode: a tiny [4, 64] fp32 input on the C++ CPU backend,
one thread, so the kernels take ~1-2 us and what is timed is the Python / dispatcher / autograd path.

    python -m bench.call_overhead [--calls 2000] [--repeats 7] [--json out.json]

Prints the median (and spread over repeats) microseconds per forward + backward and per forward under
no_grad. Run it on two commits side by side (interleaved) to compare call paths; bench/NOTES.md has the
history ("Per-call overhead of the custom op").
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch


def measure(calls: int, repeats: int) -> dict:
    import pgdpo

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(4, 64, generator=gen).requires_grad_()
    ref, target = torch.randn(4, 64, generator=gen), torch.randn(4, 64, generator=gen)

    def fwd_bwd():
        pgdpo.pgdpo_loss(pred, ref, target, backend="cpu").backward()

    def fwd_no_grad():
        with torch.no_grad():
            pgdpo.pgdpo_loss(pred, ref, target, backend="cpu")

    out = {}
    for name, fn in (("fwd_bwd_us", fwd_bwd), ("fwd_no_grad_us", fwd_no_grad)):
        for _ in range(200):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - t0) / calls * 1e6)
        out[name] = {"median": statistics.median(times), "min": min(times), "max": max(times)}
    out.update(torch=torch.__version__, python=platform.python_version(), machine=platform.processor()
               or platform.machine(), calls=calls, repeats=repeats)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="calls per timed repeat (default 2000)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats; the median is reported")
    parser.add_argument("--json", help="also write the result to this JSON file")
    args = parser.parse_args(argv)
    result = measure(args.calls, args.repeats)
    for key in ("fwd_bwd_us", "fwd_no_grad_us"):
        r = result[key]
        print(f"{key:16s} median {r['median']:7.1f}  (min {r['min']:.1f}, max {r['max']:.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
