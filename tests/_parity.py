"""Shared helpers of the parity tests in new files: run a backend, run the float64 oracle, compare."""

from __future__ import annotations

import pytest
import torch

from pgdpo import STAT_NAMES, pgdpo_loss
from pgdpo.loss import cpu_unavailable_reason, triton_unavailable_reason
from pgdpo.options import LossOptions
from pgdpo.reference import pgdpo_loss_reference

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


def run(backend, pred, ref, target, upstream=None, **kw):
    """Loss, stats and d loss / d pred (weighted by ``upstream`` for reduction='none')."""
    pred = pred.detach().clone().requires_grad_(True)
    loss, stats = pgdpo_loss(pred, ref, target, backend=backend, return_stats=True, **kw)
    (loss if upstream is None else (loss * upstream).sum()).backward()
    return loss.detach(), stats, pred.grad


def oracle(pred, ref, target, upstream=None, sample_weight=None, **kw):
    """The eager reference in float64 on the same (possibly rounded) inputs; gradient by autograd."""
    p = pred.detach().to(torch.float64).clone().requires_grad_(True)
    loss, stats = pgdpo_loss_reference(p, ref.to(torch.float64), target.to(torch.float64), LossOptions(**kw),
                                       None if sample_weight is None else sample_weight.double())
    (loss if upstream is None else (loss * upstream.double()).sum()).backward()
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
