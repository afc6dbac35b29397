"""The implementations timed side by side, and their verification against the float64 reference.

- ``fused``: the device's fused op through the public API: ``pgdpo_loss(backend="triton")`` on CUDA,
  ``pgdpo_loss(backend="cpu")`` (the C++ op of ``csrc/``) on the CPU.
- ``eager``: ``pgdpo_loss(backend="torch")``, the eager reference in plain PyTorch.
- ``compile``: ``torch.compile(pgdpo.loss.reference.pgdpo_loss_reference, dynamic=False, fullgraph=True)``
  (Inductor). Compiled afresh for every case (``torch._dynamo.reset()``); the compile time is the
  wall time of the first forward + backward and is reported apart from the timings.

Every provider returns ``(loss, stats)`` from the same inputs, so all compute the same outputs (the
fused op computes the statistics in its one pass; eager and compiled code compute them too).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from pgdpo import pgdpo_loss
from pgdpo.loss.options import STAT_NAMES, LossOptions
from pgdpo.loss.reference import pgdpo_loss_reference

from .machine import portable_path

PROVIDERS = ("fused", "eager", "compile")

Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple]

#: Agreement with the float64 reference on the same (dtype-rounded) inputs, by input dtype:
#: loss and statistics |x - ref| <= atol + rtol |ref|; gradient max|g - ref| <= grad_rel * max|ref|.
#: bf16/fp16 gradients are rounded to 8/11 bits, so their bound is looser; the loss and statistics
#: are fp32 for every input dtype.
TOLERANCES = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-9, "grad_rel": 1e-9},
    torch.float32: {"atol": 1e-4, "rtol": 1e-3, "grad_rel": 1e-4},
    torch.bfloat16: {"atol": 1e-4, "rtol": 1e-3, "grad_rel": 1e-2},
    torch.float16: {"atol": 1e-4, "rtol": 1e-3, "grad_rel": 2e-3},
}


def fused_backend(device: torch.device) -> str:
    return "triton" if device.type == "cuda" else "cpu"


class Provider:
    name = ""
    backend = ""

    def __init__(self, device: torch.device, options: LossOptions):
        self.device = device
        self.options = options

    def unavailable_reason(self) -> str | None:
        return None

    def describe(self) -> dict:
        """What exactly runs (build, library, versions), for the record."""
        return {}

    def build(self, case) -> Fn:
        """A callable ``fn(pred, ref_pred, target) -> (loss, stats)`` for the inputs of ``case``."""
        raise NotImplementedError

    def api_kwargs(self) -> dict:
        o = self.options
        return dict(method=o.method, beta=o.beta, k1=o.k1, k2=o.k2, eps=o.eps, ipr_target=o.ipr_target,
                    weighting=o.weighting, detach_weights=o.detach_weights, reduction=o.reduction)


class Fused(Provider):
    name = "fused"

    def __init__(self, device, options):
        super().__init__(device, options)
        self.backend = fused_backend(device)

    def unavailable_reason(self) -> str | None:
        from pgdpo import loss as api

        check = api.triton_unavailable_reason if self.backend == "triton" else api.cpu_unavailable_reason
        try:
            return check(self.device.type)
        except Exception as exc:  # e.g. pgdpo.loss.cpu_op missing or failing to build
            return f"{type(exc).__name__}: {exc}"

    def describe(self) -> dict:
        try:
            if self.backend == "cpu":
                from pgdpo.loss import cpu_op

                return {"build": cpu_op.build_info().strip(), "library": portable_path(cpu_op.library_path())}
            import triton

            from pgdpo.kernels import pgdpo_loss as kernels

            return {"triton": triton.__version__, "module": portable_path(kernels.__file__)}
        except Exception as exc:  # noqa: BLE001
            return {"error": f"{type(exc).__name__}: {exc}"}

    def build(self, case) -> Fn:
        kw = dict(self.api_kwargs(), backend=self.backend, return_stats=True)
        return lambda p, r, t: pgdpo_loss(p, r, t, **kw)


class Eager(Provider):
    name = "eager"
    backend = "torch"

    def build(self, case) -> Fn:
        kw = dict(self.api_kwargs(), backend="torch", return_stats=True)
        return lambda p, r, t: pgdpo_loss(p, r, t, **kw)


class Compiled(Provider):
    name = "compile"
    backend = "inductor"

    def unavailable_reason(self) -> str | None:
        if not hasattr(torch, "compile"):
            return "this torch has no torch.compile"
        return None

    def describe(self) -> dict:
        return {"compile": "torch.compile(pgdpo_loss_reference, dynamic=False, fullgraph=True), inductor, "
                           "default mode; dynamo reset per case"}

    def build(self, case) -> Fn:
        options = self.options

        def reference(p, r, t):
            return pgdpo_loss_reference(p, r, t, options)

        # One compiled graph per case: start from a clean cache so earlier cases neither count
        # against the recompile limit nor make this case's compile look cheap.
        torch._dynamo.reset()
        return torch.compile(reference, dynamic=False, fullgraph=True)


def make_providers(names, device: torch.device, options: LossOptions) -> list[Provider]:
    classes = {"fused": Fused, "eager": Eager, "compile": Compiled}
    return [classes[n](device, options) for n in names]


def first_call(fn: Fn, inputs, device: torch.device) -> float:
    """Wall seconds of a first forward + backward (includes compilation, JIT builds, autotuning)."""
    p, r, t = inputs
    t0 = time.perf_counter()
    loss, _ = fn(p, r, t)
    torch.autograd.grad(loss, p)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def oracle(inputs, options: LossOptions) -> dict:
    """The float64 eager reference on the same (already dtype-rounded) inputs: loss, grad, stats."""
    p, r, t = (x.detach().to(torch.float64) for x in inputs)
    p.requires_grad_(True)
    loss, stats = pgdpo_loss_reference(p, r, t, options)
    (grad,) = torch.autograd.grad(loss, p)
    return {"loss": loss.detach(), "grad": grad, "stats": stats}


def verify(fn: Fn, inputs, ref: dict, dtype: torch.dtype) -> dict:
    """Run ``fn`` once and compare its loss, gradient and statistics with the float64 reference."""
    p, r, t = inputs
    loss, stats = fn(p, r, t)
    (grad,) = torch.autograd.grad(loss, p)
    tol = TOLERANCES[dtype]

    def excess(x, x_ref):  # > 0 where |x - ref| exceeds atol + rtol |ref|
        x = x.detach().to(torch.float64)
        return ((x - x_ref).abs() - tol["atol"] - tol["rtol"] * x_ref.abs()).max().item()

    loss_err = (loss.detach().to(torch.float64) - ref["loss"]).abs().max().item()
    grad_err = (grad.to(torch.float64) - ref["grad"]).abs().max().item()
    grad_scale = ref["grad"].abs().max().item()
    stat_errs = {k: (stats[k].detach().to(torch.float64) - ref["stats"][k]).abs().max().item()
                 for k in STAT_NAMES}
    grad_rel = grad_err / grad_scale if grad_scale > 0 else grad_err
    loss_ok = excess(loss, ref["loss"]) <= 0
    stats_ok = all(excess(stats[k], ref["stats"][k]) <= 0 for k in STAT_NAMES)
    grad_ok = grad.dtype == p.dtype and grad_rel <= tol["grad_rel"]
    worst_stat = max(stat_errs, key=stat_errs.get)
    return {
        "ok": bool(loss_ok and stats_ok and grad_ok),
        "loss_ok": bool(loss_ok), "grad_ok": bool(grad_ok), "stats_ok": bool(stats_ok),
        "loss": loss.detach().double().item() if loss.numel() == 1 else None,
        "loss_ref": ref["loss"].item() if ref["loss"].numel() == 1 else None,
        "loss_max_abs_err": loss_err,
        "grad_max_abs_err": grad_err,
        "grad_max_rel_err": grad_rel,
        "grad_ref_max_abs": grad_scale,
        "grad_dtype": str(grad.dtype).replace("torch.", ""),
        "stats_max_abs_err": stat_errs[worst_stat],
        "stats_worst": worst_stat,
        "stats_abs_err": stat_errs,
        "tolerance": tol,
    }
