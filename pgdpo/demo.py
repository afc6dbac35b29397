"""``pgdpo demo``: the fused PG-DPO loss against the eager one on this machine, in well under a minute.

For each shape and dtype: the same random inputs (a policy slightly off a reference, as early in
training) go through the eager reference (``backend="torch"``) and the device's fused op
(``backend="cpu"``, the C++ op, on the CPU; ``backend="triton"`` on CUDA); the demo checks that the
loss, the gradient and every statistic agree, then times forward + backward of each, interleaved, and
prints a table: median time with its spread, speed-up over eager, largest error. ``--compile`` adds
``torch.compile`` of the eager reference. For the full benchmark (floors, bandwidth, memory, plots):
``python -m bench`` in the repository.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

from .loss import cpu_unavailable_reason, pgdpo_loss, triton_unavailable_reason
from .options import STAT_NAMES, LossOptions
from .reference import pgdpo_loss_reference

DEFAULT_SHAPES = {"cpu": "4x16x8x30x52,2x4x128x128", "cuda": "2x16x21x60x104,4x16x8x30x52"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
#: fused vs eager on the same inputs: loss and stats |x - eager| <= ATOL + RTOL |eager|;
#: gradient max|g - eager| <= GRAD_REL[dtype] * max|eager| (bf16/fp16 gradients differ by rounding).
ATOL, RTOL = 1e-4, 1e-3
GRAD_REL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}

DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
DESCRIPTION = __doc__.replace("``", "")

EPILOG = """\
defaults: on the CPU shapes 4x16x8x30x52 (two pairs of a small video latent) and 2x4x128x128
(one SDXL-size image pair); on CUDA 2x16x21x60x104 (one Wan2.1 480p pair) and 4x16x8x30x52.
Shapes are the full [2B, ...] batch, chosen half first. The exit status is 1 when the fused op
disagrees with the eager one; a fused op that cannot run here (no compiler, no GPU) is reported
with the reason and only eager is timed.

Timings on a machine shared with other work are noisy: compare the p10-p90 spreads, not only the
medians.

examples:
  pgdpo demo
  pgdpo demo --shapes 2x16x21x60x104 --dtypes bf16 --repeats 50
  pgdpo demo --compile            # also torch.compile of the eager loss (slow to compile)
"""


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="pgdpo demo", description=DESCRIPTION, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", help="comma-separated shapes like 4x16x8x30x52 (default: see below)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated from fp32, bf16, fp16, fp64 "
                                                          "(default fp32,bf16)")
    ap.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu or cuda")
    ap.add_argument("--backend", default="auto",
                    help="fused backend to compare: auto (triton on CUDA, cpu on the CPU), cpu or triton")
    ap.add_argument("--repeats", type=int, default=30, help="timed forward+backward calls each (default 30)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    ap.add_argument("--compile", action="store_true",
                    help="also time torch.compile of the eager reference (compiles once per case)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default)")
    ap.add_argument("--seed", type=int, default=0, help="input seed (default 0)")
    return ap.parse_args(argv)


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) < 2 or min(dims) <= 0 or dims[0] % 2:
        raise ValueError(f"bad shape {text!r}: give dimensions like 4x16x8x30x52, the first one 2B (even)")
    return dims


def make_inputs(shape, dtype, device, seed):
    """target ~ N(0,1), reference off by 0.3 N(0,1), policy off the reference by a per-sample scale."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(shape, generator=g)
    ref = target + 0.3 * torch.randn(shape, generator=g)
    scale = 0.02 + 0.38 * torch.rand((shape[0],) + (1,) * (len(shape) - 1), generator=g)
    pred = ref + scale * torch.randn(shape, generator=g)
    pred, ref, target = (x.to(device=device, dtype=dtype) for x in (pred, ref, target))
    return pred.requires_grad_(True), ref, target


def _fused_reason(backend: str, device: torch.device) -> str | None:
    check = triton_unavailable_reason if backend == "triton" else cpu_unavailable_reason
    try:
        return check(device.type)
    except Exception as exc:  # noqa: BLE001 - reported to the user
        return f"{type(exc).__name__}: {exc}"


def _run(fn, inputs):
    p, r, t = inputs
    loss, stats = fn(p, r, t)
    (grad,) = torch.autograd.grad(loss, p)
    return loss.detach(), {k: v.detach() for k, v in stats.items()}, grad


def _errors(got, ref, dtype) -> dict:
    loss, stats, grad = got
    loss_r, stats_r, grad_r = ref

    def exceeds(x, x_ref):
        x, x_ref = x.double(), x_ref.double()
        return bool(((x - x_ref).abs() > ATOL + RTOL * x_ref.abs()).any())

    grad_err = (grad.double() - grad_r.double()).abs().max().item()
    grad_rel = grad_err / max(grad_r.double().abs().max().item(), 1e-30)
    stat_err = max((stats[k].double() - stats_r[k].double()).abs().max().item() for k in STAT_NAMES)
    ok = (not exceeds(loss, loss_r) and not any(exceeds(stats[k], stats_r[k]) for k in STAT_NAMES)
          and grad.dtype == grad_r.dtype and grad_rel <= GRAD_REL[dtype])
    return {"ok": ok, "loss": (loss.double() - loss_r.double()).abs().max().item(), "grad_rel": grad_rel,
            "stats": stat_err}


def _gpu_sleep_cycles(device) -> int:
    """Cycles of ``torch.cuda._sleep`` lasting about 1 ms (0 when this torch lacks it)."""
    if not hasattr(torch.cuda, "_sleep"):
        return 0
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(100_000)
    a.record()
    torch.cuda._sleep(1_000_000)
    b.record()
    b.synchronize()
    return int(1_000_000 / max(a.elapsed_time(b), 1e-3))


def _time(fns: dict, sets, device, warmup: int, repeats: int) -> dict:
    """Forward + backward of every fn, interleaved round by round; call k overall uses set k mod len.

    CPU: ``perf_counter`` per call. CUDA: events around each call with a ~1 ms GPU sleep queued first,
    so the host runs ahead and the events hold the GPU's time for the call's kernels (as in a training
    step, where the model keeps the GPU busy while the host issues the loss).
    """
    names, samples = list(fns), {n: [] for n in fns}
    cuda = device.type == "cuda"
    cycles = _gpu_sleep_cycles(device) if cuda else 0
    events = {n: [] for n in fns}
    calls = 0
    for i in range(warmup + repeats):
        for name in names:
            p, r, t = sets[calls % len(sets)]
            calls += 1
            if cuda:
                if cycles:
                    torch.cuda._sleep(cycles)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            loss, _ = fns[name](p, r, t)
            torch.autograd.grad(loss, p)
            if cuda:
                end.record()
                if i >= warmup:
                    events[name].append((start, end))
            elif i >= warmup:
                samples[name].append((time.perf_counter() - t0) * 1e3)
    if cuda:
        torch.cuda.synchronize(device)
        samples = {n: [a.elapsed_time(b) for a, b in evs] for n, evs in events.items()}
    out = {}
    for name, xs in samples.items():
        xs.sort()
        out[name] = (statistics.median(xs), xs[int(0.1 * (len(xs) - 1))], xs[math.ceil(0.9 * (len(xs) - 1))])
    return out


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                              else args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: this torch sees no CUDA device")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {args.device!r}")
        backend = args.backend if args.backend != "auto" else ("triton" if device.type == "cuda" else "cpu")
        if backend not in ("cpu", "triton"):
            raise ValueError(f"--backend must be auto, cpu or triton, got {args.backend!r}")
        shapes = [_shape(s) for s in (args.shapes or DEFAULT_SHAPES[device.type]).split(",") if s.strip()]
        dtypes = []
        for d in args.dtypes.split(","):
            if d.strip() not in DTYPES:
                raise ValueError(f"unknown dtype {d!r}: choose from {', '.join(DTYPES)}")
            dtypes.append(DTYPES[d.strip()])
        if args.repeats < 1 or args.warmup < 0:
            raise ValueError("--repeats must be >= 1 and --warmup >= 0")
        if args.threads is not None:
            torch.set_num_threads(max(1, args.threads))
    except ValueError as exc:
        print(f"pgdpo demo: error: {exc}", file=sys.stderr)
        return 2

    reason = _fused_reason(backend, device)
    options = LossOptions()
    eager = lambda p, r, t: pgdpo_loss(p, r, t, backend="torch", return_stats=True)
    fused = lambda p, r, t: pgdpo_loss(p, r, t, backend=backend, return_stats=True)
    print(f"pgdpo demo: PG-DPO loss (method=pgdpo, beta=100, k1=k2=10), fused {backend!r} vs eager 'torch' "
          f"on {device} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    if reason is not None:
        print(f"fused backend {backend!r} unavailable: {reason}\n(only eager is timed)")
    print(f"forward + backward, median (p10-p90) of {args.repeats} calls after {args.warmup} warm-up, "
          "inputs rotated; errors vs eager on the same inputs"
          + ("; CUDA: GPU time per call (host kept ahead)" if device.type == "cuda" else "") + "\n")
    head = (f"{'shape':>16} {'dtype':>5} {'backend':>8} {'ms median':>10} {'(p10-p90)':>17} "
            f"{'vs eager':>9}  max error")
    print(head)
    print("-" * len(head))
    failed = []
    for shape in shapes:
        for dtype in dtypes:
            set_bytes = 3 * math.prod(shape) * dtype.itemsize
            n_sets = min(8, max(2, math.ceil((64 << 20) / set_bytes)))  # > 2x a 32 MiB cache
            sets = [make_inputs(shape, dtype, device, args.seed + i) for i in range(n_sets)]
            fns = {"torch": eager}
            ref = _run(eager, sets[0])
            errors = {"torch": None}
            notes = {}
            if reason is None:
                fns[backend] = fused
                errors[backend] = _errors(_run(fused, sets[0]), ref, dtype)
            if args.compile:
                torch._dynamo.reset()
                compiled = torch.compile(lambda p, r, t: pgdpo_loss_reference(p, r, t, options),
                                         dynamic=False, fullgraph=True)
                t0 = time.perf_counter()
                got = _run(compiled, sets[0])
                notes["compile"] = f"  (compile {time.perf_counter() - t0:.1f} s)"
                fns["compile"] = compiled
                errors["compile"] = _errors(got, ref, dtype)
            times = _time(fns, sets, device, args.warmup, args.repeats)
            shape_s, dt = "x".join(map(str, shape)), DTYPE_NAMES[dtype]
            for name, (med, p10, p90) in times.items():
                err = errors[name]
                if err is None:
                    err_s = "(reference)"
                else:
                    err_s = (f"loss {err['loss']:.1e}, grad {err['grad_rel']:.1e} rel, "
                             f"stats {err['stats']:.1e}" + ("" if err["ok"] else "  DISAGREES"))
                    if not err["ok"]:
                        failed.append(f"{shape_s} {dt} {name}")
                speed = times["torch"][0] / med
                print(f"{shape_s:>16} {dt:>5} {name:>8} {med:10.3f} {f'({p10:.3f}-{p90:.3f})':>17} "
                      f"{speed:8.2f}x  {err_s}{notes.get(name, '')}", flush=True)
            del sets
    print()
    if failed:
        print("FAILED: disagrees with the eager loss: " + ", ".join(failed))
        return 1
    if reason is None:
        print(f"fused {backend!r} agrees with eager on every case "
              f"(loss, gradient, {len(STAT_NAMES)} statistics).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
