"""Timing: per-call samples (CUDA events on the GPU, ``perf_counter`` on the CPU), their summary
(median and spread), the device's copy bandwidth, and the peak extra memory of a call."""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch


def summarize(samples_s: list[float]) -> dict:
    """Median and spread of per-call times, in milliseconds: median, min, max, p10, p90, q1, q3, n."""
    xs = sorted(x * 1e3 for x in samples_s)
    if not xs:
        raise ValueError("no samples")

    def pct(q: float) -> float:  # linear interpolation, like numpy's default
        pos = (len(xs) - 1) * q
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {"median_ms": statistics.median(xs), "min_ms": xs[0], "max_ms": xs[-1],
            "p10_ms": pct(0.10), "p90_ms": pct(0.90), "q1_ms": pct(0.25), "q3_ms": pct(0.75),
            "mean_ms": statistics.fmean(xs), "n": len(xs)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Collects one sample per ``start()``/``stop()`` pair.

    CUDA: a pair of events per sample, read after one synchronisation at the end (no host sync between
    calls). With ``sleep_cycles``, ``start()`` first queues a GPU sleep kernel of that many cycles, so
    the host gets ahead of the GPU and the timed span holds the call's kernels back to back, without
    launch gaps: the GPU's own time for the call, which is what a training step sees when the host
    runs ahead of the GPU (the usual case: the model's kernels keep it busy). CPU: ``perf_counter``.
    """

    def __init__(self, device: torch.device, sleep_cycles: int | None = None):
        self.device = device
        self.cuda = device.type == "cuda"
        self.sleep_cycles = sleep_cycles
        self._events: list = []
        self._samples: list[float] = []
        self._t0 = 0.0

    def start(self) -> None:
        if self.cuda:
            if self.sleep_cycles:
                torch.cuda._sleep(self.sleep_cycles)
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._events.append([ev, None])
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._events[-1][1] = ev
        else:
            self._samples.append(time.perf_counter() - self._t0)

    def samples(self) -> list[float]:
        """Per-sample seconds."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return [a.elapsed_time(b) / 1e3 for a, b in self._events]
        return list(self._samples)


def run_timed(step: Callable[[int, Timer], None], device: torch.device, *, warmup: int, repeats: int,
              budget_s: float | None = None, min_repeats: int = 5) -> list[float]:
    """Call ``step(i, timer)`` ``warmup`` times untimed, then up to ``repeats`` times timed.

    ``step`` must call ``timer.start()`` / ``timer.stop()`` around the part to time (so it can do
    untimed set-up, e.g. the forward before a backward). With ``budget_s``, stops early once that
    many wall-clock seconds are spent on the timed repeats (never before ``min_repeats``).
    """
    for i in range(warmup):
        step(i, NullTimer())
    synchronize(device)
    timer = Timer(device)
    t_end = None if budget_s is None else time.perf_counter() + budget_s
    for i in range(repeats):
        step(warmup + i, timer)
        if t_end is not None and i + 1 >= min_repeats and time.perf_counter() > t_end:
            break
    return timer.samples()


def run_interleaved(steps: dict[str, Callable[[int, Timer], None]], device: torch.device, *, warmup: int,
                    repeats: int, budget_s: float | None = None, min_repeats: int = 5
                    ) -> tuple[dict[str, list[float]], dict[str, str]]:
    """:func:`run_timed` for several implementations at once, interleaved: round ``i`` calls every
    step once. On a shared, noisy machine a slow period then hits all implementations alike instead of
    whichever happened to run during it. A step that raises is dropped; returns
    ``(samples per name, error per dropped name)``.
    """
    live = dict(steps)
    errors: dict[str, str] = {}
    host: dict[str, list[float]] = {name: [] for name in steps}

    def call(name, i, timer):
        try:
            live[name](i, timer)
        except Exception as exc:  # noqa: BLE001 - reported, not hidden
            errors[name] = f"{type(exc).__name__}: {exc}"
            del live[name]

    for i in range(warmup):
        for name in list(live):
            t0 = time.perf_counter()
            call(name, i, NullTimer())
            host[name].append(time.perf_counter() - t0)
    synchronize(device)
    sleep = None
    if device.type == "cuda":
        # Host time to issue one call (no sync inside): the GPU sleep before each timed call must
        # outlast it. Twice the slowest provider's median, at least 0.2 ms; 2 ms without warm-up.
        per_call = [statistics.median(h[1:] or h) for h in host.values() if h]
        sleep = gpu_sleep_cycles(max(2 * max(per_call), 2e-4) if per_call else 2e-3, device)
    timers = {name: Timer(device, sleep) for name in live}
    t_end = None if budget_s is None else time.perf_counter() + budget_s
    for i in range(repeats):
        for name in list(live):
            call(name, warmup + i, timers[name])
        if t_end is not None and i + 1 >= min_repeats and time.perf_counter() > t_end:
            break
    samples = {name: timers[name].samples() for name in live}
    return samples, errors


class NullTimer:
    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


_CYCLES_PER_S: dict[int, float] = {}


def gpu_sleep_cycles(seconds: float, device: torch.device) -> int | None:
    """Cycles of ``torch.cuda._sleep`` that last about ``seconds`` on ``device`` (calibrated once);
    None when this torch has no ``torch.cuda._sleep``."""
    if not hasattr(torch.cuda, "_sleep"):
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CYCLES_PER_S:
        with torch.cuda.device(index):
            rates = []
            for _ in range(3):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                torch.cuda._sleep(1_000_000)
                b.record()
                b.synchronize()
                rates.append(1_000_000 / (a.elapsed_time(b) / 1e3))
        _CYCLES_PER_S[index] = statistics.median(rates)
    return int(seconds * _CYCLES_PER_S[index])


def copy_bandwidth(device: torch.device, nbytes: int, *, warmup: int = 3, repeats: int = 20) -> dict:
    """Device copy bandwidth: ``dst.copy_(src)`` of an ``nbytes`` fp32 tensor; bytes read + written
    (``2 * nbytes``) per copy over its time. Returns the time summary plus ``gbps`` figures (GB = 1e9 B;
    ``gbps_median`` from the median time, ``gbps_p10``/``gbps_p90`` from the p90/p10 times)."""
    n = max(1, nbytes // 4)
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)

    def step(i, timer):
        timer.start()
        dst.copy_(src)
        timer.stop()

    samples = run_timed(step, device, warmup=warmup, repeats=repeats)
    stats = summarize(samples)
    moved = 2 * n * 4
    stats.update(bytes=moved, gbps_median=moved / stats["median_ms"] / 1e6,
                 gbps_p10=moved / stats["p90_ms"] / 1e6, gbps_p90=moved / stats["p10_ms"] / 1e6,
                 gbps_max=moved / stats["min_ms"] / 1e6)
    return stats


def peak_extra_memory(call: Callable[[], torch.Tensor], device: torch.device) -> dict:
    """Peak memory a call allocates beyond what it returns, in bytes.

    ``call`` runs the work and returns the tensor that is its product and stays alive (the gradient);
    its bytes are subtracted. CUDA: ``torch.cuda.max_memory_allocated`` over the call minus the memory
    allocated before it (inputs) minus the result. CPU: torch has no peak counter for CPU tensors, so
    the call runs under ``torch.profiler`` with ``profile_memory=True`` and the peak of the running sum
    of its allocation events is taken: this counts every tensor allocated through torch's CPU
    allocator (eager ops, custom C++ ops, Inductor's buffers), but not memory a kernel takes with
    plain ``malloc``/``new`` (e.g. per-thread scratch inside a C++ op).
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = call()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        kept = result.untyped_storage().nbytes()
        del result
        return {"method": "torch.cuda.max_memory_allocated", "peak_bytes": peak, "result_bytes": kept,
                "extra_bytes": peak - kept}
    return _cpu_peak(call)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence fd 2 while the profiler starts and stops (its C++ side logs a line each time, which
    breaks the progress bar); Python exceptions still propagate."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _cpu_peak(call: Callable[[], torch.Tensor]) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = call()
    kept = result.untyped_storage().nbytes()
    del result
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    mem = sorted((e for e in events if e.get("name") == "[memory]" and "Bytes" in e.get("args", {})
                  and e["args"].get("Device Type", 0) == 0), key=lambda e: float(e["ts"]))
    if not mem:
        return {"method": "unavailable", "reason": "the profiler recorded no CPU memory events"}
    running = peak = 0
    for e in mem:
        running += int(e["args"]["Bytes"])
        peak = max(peak, running)
    return {"method": "torch.profiler memory events (torch CPU allocator)", "peak_bytes": peak,
            "result_bytes": kept, "extra_bytes": peak - kept}
