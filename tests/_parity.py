"""Shared helpers of the parity tests: run a backend (on a case's device), run the float64 oracle, compare."""

from __future__ import annotations

import pytest
import torch

from pgdpo import STAT_NAMES, pgdpo_loss
from pgdpo.loss import cpu_unavailable_reason, triton_unavailable_reason
from pgdpo.loss.options import LossOptions
from pgdpo.loss.reference import pgdpo_loss_reference

from ._inputs import LossCase

FUSED = ("triton", "cpu")
ALL = ("torch", *FUSED)


def unavailable(backend: str) -> str | None:
    if backend == "triton":
        return triton_unavailable_reason("cpu")
    if backend == "cpu":
        return cpu_unavailable_reason("cpu")
    return None


def require(backend: str) -> str:
    reason = unavailable(backend)
    if reason is not None:
        pytest.skip(f"{backend} unavailable here: {reason}")
    return backend


def run(case, pred, ref, target, upstream=None, **kw):
    """Loss, stats and d loss / d pred (weighted by ``upstream`` for reduction='none'), on the CPU.

    ``case``: a backend name (CPU tensors) or a ``tests._inputs.LossCase`` (its backend on its device:
    the inputs are moved there and the results brought back)."""
    backend, device = (case.backend, case.device) if isinstance(case, LossCase) else (case, "cpu")
    pred, ref, target = (x.to(device) for x in (pred, ref, target))
    pred = pred.detach().clone().requires_grad_(True)
    if kw.get("sample_weight") is not None:
        kw["sample_weight"] = kw["sample_weight"].to(device)
    loss, stats = pgdpo_loss(pred, ref, target, backend=backend, return_stats=True, **kw)
    (loss if upstream is None else (loss * upstream.to(device)).sum()).backward()
    return loss.detach().cpu(), {k: v.cpu() for k, v in stats.items()}, pred.grad.cpu()


def oracle(pred, ref, target, upstream=None, sample_weight=None, **kw):
    """The eager reference in float64 on the CPU, on the same (possibly rounded) inputs; gradient by autograd."""
    p, r, t = (x.detach().cpu().to(torch.float64) for x in (pred, ref, target))
    p.requires_grad_(True)
    loss, stats = pgdpo_loss_reference(p, r, t, LossOptions(**kw),
                                       None if sample_weight is None else sample_weight.cpu().double())
    (loss if upstream is None else (loss * upstream.cpu().double()).sum()).backward()
    return loss.detach(), stats, p.grad


def assert_matches(got, want, rtol, atol, grad_rtol=None, grad_atol=None):
    loss, stats, grad = got
    loss_ref, stats_ref, grad_ref = want
    torch.testing.assert_close(loss.double(), loss_ref, rtol=rtol, atol=atol)
    assert set(stats) == set(STAT_NAMES)
    for name in STAT_NAMES:
        torch.testing.assert_close(stats[name].double(), stats_ref[name], rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"stat {n}: {m}")
    torch.testing.assert_close(grad.double(), grad_ref, rtol=grad_rtol or rtol, atol=grad_atol or atol)

