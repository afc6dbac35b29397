"""Runs the benchmark: for every case, verify each provider, then time them side by side.

Per case: make enough input sets to rotate through more than twice the last-level cache; compute the
float64 reference once; for each provider build it (compiling where needed), time its first call,
verify it; then for each pass time all providers interleaved round by round (round ``i`` runs every
provider once, each on a different input set: call ``k`` overall uses set ``k mod sets``); finally
measure each provider's peak extra memory over one forward + backward.
"""

from __future__ import annotations

import datetime as _dt
import gc
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from pgdpo.loss.options import LossOptions

from . import machine
from .cases import Case, make_inputs, rotation_sets
from .providers import first_call, make_providers, oracle, verify
from .timing import NullTimer, copy_bandwidth, peak_extra_memory, run_interleaved, summarize

SCHEMA = "pgdpo-bench/1"


@dataclass
class Config:
    device: str
    cases: list[Case]
    providers: list[str]
    passes: list[str]
    repeats: int
    warmup: int
    budget_s: float | None
    options: dict = field(default_factory=dict)
    bandwidth_bytes: int = 256 << 20
    max_input_bytes: int = 2 << 30
    memory: bool = True
    smoke: bool = False
    seed: int = 0
    #: progress bar on stderr: True, False, or None = only when stderr is a terminal
    progress: bool | None = None


def _progress(total: int, enabled: bool | None):
    """tqdm's bar on stderr. ``enabled``: True/False, or None for "when stderr is a terminal" (tqdm's
    own rule). tqdm comes with the dev and train extras; without it there is no bar."""
    if enabled is False:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True,
                disable=None if enabled is None else False,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")


class _NoBar:
    """The bar's interface, doing nothing (progress off, or tqdm not installed)."""

    def set_description_str(self, text):
        pass

    def update(self, n=1):
        pass

    def close(self):
        pass


def _make_step(fn, sets, pass_: str, k: int, n_providers: int):
    n_sets = len(sets)

    def step(i, timer):
        p, r, t = sets[(i * n_providers + k) % n_sets]
        if pass_ == "fwd":
            timer.start()
            fn(p, r, t)
            timer.stop()
        elif pass_ == "bwd":  # the forward right before, untimed, as in a training step
            loss, _ = fn(p, r, t)
            timer.start()
            torch.autograd.grad(loss, p)
            timer.stop()
        else:
            timer.start()
            loss, _ = fn(p, r, t)
            torch.autograd.grad(loss, p)
            timer.stop()

    return step


def run_suite(cfg: Config) -> dict:
    device = torch.device(cfg.device)
    options = LossOptions(**cfg.options)
    providers = make_providers(cfg.providers, device, options)
    started = _dt.datetime.now().astimezone()
    record = {
        "schema": SCHEMA,
        "created": started.isoformat(timespec="seconds"),
        "machine": machine.machine_info(device),
        "versions": machine.versions(),
        "git": machine.git_info(),
        "config": {
            "device": str(device), "providers": cfg.providers, "passes": cfg.passes,
            "repeats": cfg.repeats, "warmup": cfg.warmup, "budget_s": cfg.budget_s,
            "smoke": cfg.smoke, "seed": cfg.seed, "memory": cfg.memory, "options": asdict(options),
            "cases": [{"name": c.name, "shape": list(c.shape), "dtype": c.dtype_name} for c in cfg.cases],
            "timing": ("CUDA events around each call, a GPU sleep queued before each so the host runs "
                       "ahead (GPU time of the call's kernels, no launch gaps); fwdbwd also "
                       "back_to_back_ms: host wall time per call with no sleep" if device.type == "cuda"
                       else "time.perf_counter per call"),
            "interleaved": True,
            "inductor_caches": _inductor_caches(),
        },
        "load_average_start": machine.load_average(),
        "notes": [],
    }
    cache = machine.cache_bytes(device)
    record["config"]["rotation_cache_bytes"] = cache

    units = 2 + len(cfg.cases) * (len(cfg.passes) + 1 + int(cfg.memory))
    bar = _progress(units, cfg.progress)
    try:
        bar.set_description_str("copy bandwidth")
        bw_start = copy_bandwidth(device, cfg.bandwidth_bytes, repeats=max(5, min(cfg.repeats, 50)))
        bar.update()
        reasons = {p.name: p.unavailable_reason() for p in providers}
        record["providers"] = {p.name: {**(p.describe() if reasons[p.name] is None else {}),
                                        "backend": p.backend, "available": reasons[p.name] is None,
                                        "reason": reasons[p.name]}
                               for p in providers}
        cases = []
        for case in cfg.cases:
            cases.append(_run_case(case, cfg, device, options, providers, reasons, cache, bar))
            gc.collect()
        bar.set_description_str("copy bandwidth")
        bw_end = copy_bandwidth(device, cfg.bandwidth_bytes, repeats=max(5, min(cfg.repeats, 50)))
        bar.update()
    finally:
        bar.close()

    # The floor uses the better of the two bandwidth measurements (the device's capability; on a
    # shared machine the worse one mostly measures the neighbours).
    best = max(bw_start["gbps_median"], bw_end["gbps_median"])
    record["bandwidth"] = {"start": bw_start, "end": bw_end, "gbps_for_floor": best,
                           "method": f"dst.copy_(src), fp32, {bw_start['bytes'] // 2} bytes per tensor"}
    for c in cases:
        _add_floor_figures(c, best)
    record["cases"] = cases
    record["load_average_end"] = machine.load_average()
    record["duration_s"] = (_dt.datetime.now().astimezone() - started).total_seconds()
    record["summary"] = _summary(record)
    return record


def _run_case(case: Case, cfg: Config, device, options, providers, reasons, cache, bar) -> dict:
    n_sets = rotation_sets(case, cache, cfg.max_input_bytes)
    bar.set_description_str(f"{case.label}: inputs")
    sets = [make_inputs(case, device, seed=cfg.seed + i) for i in range(n_sets)]
    ref = oracle(sets[0], options)
    out = {
        "name": case.name, "shape": list(case.shape), "dtype": case.dtype_name, "numel": case.numel,
        "tensor_bytes": case.tensor_bytes, "rotation_sets": n_sets,
        "rotation_bytes": n_sets * 3 * case.tensor_bytes,
        "floor": {p: {"bytes": case.floor_bytes(p)} for p in cfg.passes},
        "providers": {},
    }
    fns = {}
    bar.set_description_str(f"{case.label}: verify")
    for prov in providers:
        entry = {"backend": prov.backend, "available": False}
        out["providers"][prov.name] = entry
        if reasons[prov.name] is not None:
            entry["reason"] = reasons[prov.name]
            continue
        try:
            fn = prov.build(case)
            entry["first_call_s"] = first_call(fn, sets[0], device)
            entry["verify"] = verify(fn, sets[0], ref, case.dtype)
        except Exception as exc:  # noqa: BLE001 - the table says why
            entry["reason"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
            continue
        entry["available"] = True
        if prov.name == "compile":
            entry["compile_s"] = entry["first_call_s"]
        entry["passes"] = {}
        fns[prov.name] = fn
    bar.update()

    names = list(fns)
    for pass_ in cfg.passes:
        bar.set_description_str(f"{case.label}: {pass_}")
        steps = {name: _make_step(fns[name], sets, pass_, k, len(names)) for k, name in enumerate(names)}
        samples, errors = run_interleaved(steps, device, warmup=cfg.warmup, repeats=cfg.repeats,
                                          budget_s=cfg.budget_s)
        for name, err in errors.items():
            out["providers"][name]["passes"][pass_] = {"error": err}
        for name, s in samples.items():
            out["providers"][name]["passes"][pass_] = summarize(s)
        if device.type == "cuda" and pass_ == "fwdbwd":
            _back_to_back(out, fns, sets, cfg, device)
        bar.update()

    if cfg.memory:
        bar.set_description_str(f"{case.label}: memory")
        for name, fn in fns.items():
            p, r, t = sets[0]

            def fwdbwd(fn=fn, p=p, r=r, t=t):
                loss, _ = fn(p, r, t)
                return torch.autograd.grad(loss, p)[0]

            try:
                out["providers"][name]["memory"] = peak_extra_memory(fwdbwd, device)
            except Exception as exc:  # noqa: BLE001
                out["providers"][name]["memory"] = {"method": "unavailable",
                                                    "reason": f"{type(exc).__name__}: {exc}"}
        bar.update()

    out["speedups"] = _speedups(out, cfg.passes)
    del sets, ref, fns
    return out


def _back_to_back(out: dict, fns: dict, sets, cfg: Config, device) -> None:
    """CUDA: wall time per forward + backward issued back to back with no GPU sleep, sync at the end.
    Above the GPU time when the host cannot issue the call's launches as fast as the GPU runs them
    (small shapes, Python overhead): the cost of the call when nothing else keeps the GPU busy."""
    for k, (name, fn) in enumerate(fns.items()):
        fig = out["providers"][name]["passes"].get("fwdbwd", {})
        if "median_ms" not in fig:
            continue
        step = _make_step(fn, sets, "fwdbwd", k, len(fns))
        n = max(5, min(cfg.repeats, 50))
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for i in range(n):
            step(i, NullTimer())
        torch.cuda.synchronize(device)
        fig["back_to_back_ms"] = (time.perf_counter() - t0) / n * 1e3


def _inductor_caches() -> str:
    try:
        import torch._inductor.config as inductor_config
    except ImportError:
        return "unknown"
    if getattr(inductor_config, "force_disable_caches", False):
        return "disabled (cold compiles)"
    return "enabled (compile times shorter when an earlier run compiled the same graphs)"


def _speedups(case_out: dict, passes) -> dict:
    """Ratios of times: ``a_vs_b`` = median(b) / median(a), > 1 when ``a`` is faster; ``a_vs_b_p10``
    the same with the 10th percentiles (the calls least disturbed by other work on a shared machine)."""
    provs = case_out["providers"]

    def fig(name, pass_):
        return provs.get(name, {}).get("passes", {}).get(pass_, {})

    out = {}
    for pass_ in passes:
        ratios = {}
        for a, b in (("fused", "eager"), ("fused", "compile"), ("compile", "eager")):
            fa, fb = fig(a, pass_), fig(b, pass_)
            if fa.get("median_ms") and fb.get("median_ms"):
                ratios[f"{a}_vs_{b}"] = fb["median_ms"] / fa["median_ms"]
                ratios[f"{a}_vs_{b}_p10"] = fb["p10_ms"] / fa["p10_ms"]
        out[pass_] = ratios
    return out


def _add_floor_figures(case_out: dict, gbps: float) -> None:
    for pass_, floor in case_out["floor"].items():
        floor["ms"] = floor["bytes"] / gbps / 1e6
        for entry in case_out["providers"].values():
            fig = entry.get("passes", {}).get(pass_)
            if fig and "median_ms" in fig:
                fig["gbps"] = floor["bytes"] / fig["median_ms"] / 1e6
                fig["time_over_floor"] = fig["median_ms"] / floor["ms"]


def _summary(record: dict) -> dict:
    """Headline flags: did every available provider agree with the reference; which were unavailable."""
    mismatches, unavailable = [], {}
    for c in record["cases"]:
        for name, entry in c["providers"].items():
            if not entry["available"]:
                unavailable.setdefault(name, entry.get("reason", "?"))
            elif not entry["verify"]["ok"]:
                mismatches.append(f"{c['name']} {c['dtype']} {name}")
    return {"all_agree": not mismatches, "mismatches": mismatches, "unavailable": unavailable}
