"""Tolerances from error bounds, not from one machine.

Two float32 computations of one quantity that reduce in a different order (compiled vs eager, fused vs
eager, several processes vs one, sequence-parallel vs not) differ by their rounding errors, which depend on
the instruction set, the thread count and the library's blocking: whatever tolerance fits their difference
on one machine can fail on the next. Each is instead compared with a float64 computation of the same
thing, within the error a float32 computation of that quantity can have.

The bound (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., eq. 3.4): a sum of ``n``
terms in float32, in any order, errs by at most ``gamma_n * sum |terms|`` with
``gamma_n = n u / (1 - n u)``, ``u = eps32 / 2``. Where a test knows the terms it uses :func:`sum_bound`.
Where a quantity is a whole network's output or gradient, it measures the float32 error of one ordering
(the eager one, on this machine) and allows the other ordering :data:`ORDER_FACTOR` times that error (both
obey the same worst-case bound; their typical errors are of one size), never less than a few ulps of the
float64 value's norm.
"""

from __future__ import annotations

import math

import torch

EPS32 = torch.finfo(torch.float32).eps
#: a second reduction order's rounding error may be this many times the first's (both are sums of the same
#: terms, bounded by the same gamma_n * sum|terms|; seen: at most ~3x across AVX-512 / AVX2 / default
#: kernels and 1 or 2 threads on the tiny models of the suite)
ORDER_FACTOR = 8.0
#: floor of the allowed normwise error, in units of eps32 * ||float64 value||: a computation whose error
#: happened to be ~0 on this machine does not make the other one's allowance ~0
ULP_FLOOR = 16.0


def gamma(n: int, unit: float = EPS32 / 2) -> float:
    """``gamma_n = n u / (1 - n u)``: the relative error bound of an ``n``-term float sum."""
    return n * unit / (1 - n * unit)


def sum_bound(terms: torch.Tensor, n: int | None = None) -> float:
    """The worst-case float32 error of summing ``terms`` (any order): ``gamma_n * sum |terms|``."""
    n = terms.numel() if n is None else n
    return gamma(n) * float(terms.double().abs().sum())


def network_bound(model: torch.nn.Module, tokens: int) -> float:
    """First-order worst-case relative error of a float32 pass through ``model``: each of its leaf modules
    is at most a few reductions of length ``n`` (its widest dimension, or the ``tokens`` a weight gradient
    sums over), erring by ``gamma_n``, and the errors of the layers in a chain add (forward and backward:
    twice the depth). Vectorised transcendental functions (Sleef, up to a few ulps) stay inside it."""
    leaves = [m for m in model.modules() if not list(m.children())]
    n = max([tokens] + [max(q.shape) for q in model.parameters()])
    return 2 * len(leaves) * gamma(n)


def normwise_error(x: torch.Tensor, ref64: torch.Tensor) -> float:
    return float((x.detach().double() - ref64.detach().double()).norm())


def assert_float32_orders_agree(got: torch.Tensor, baseline: torch.Tensor, ref64: torch.Tensor, name: str = "",
                                bound: float = 0.0, factor: float = ORDER_FACTOR) -> None:
    """``got`` and ``baseline`` are float32 computations of ``ref64`` (float64) in different reduction
    orders. Each must be within float32 error of ``ref64``, normwise: at most ``bound`` (a relative worst-case
    bound from the caller, e.g. :func:`network_bound`), :data:`ULP_FLOOR` ulps, or, for ``got``, ``factor``
    times the error ``baseline`` shows here, whichever is largest. A wrong result (a missing term, a bad
    scale) is orders of magnitude outside."""
    ref_norm = float(ref64.detach().double().norm())
    floor = max(bound, ULP_FLOOR * EPS32) * ref_norm
    base_err = normwise_error(baseline, ref64)
    got_err = normwise_error(got, ref64)
    assert base_err <= floor, (
        f"{name}: the float32 baseline is {base_err:.3g} from float64 (norm {ref_norm:.3g}), above the bound "
        f"{floor:.3g}")
    allowed = max(factor * base_err, floor)
    assert got_err <= allowed, (
        f"{name}: {got_err:.3g} from float64 (norm {ref_norm:.3g}), allowed {allowed:.3g} = max({factor} x "
        f"the baseline's {base_err:.3g}, the bound {floor:.3g})")


def relative_spread(values: list[float]) -> float:
    """max |a - b| / max |a| over ``values``: the spread of one figure across settings."""
    top = max(abs(v) for v in values)
    return (max(values) - min(values)) / top if top else 0.0


__all__ = ["EPS32", "ORDER_FACTOR", "ULP_FLOOR", "gamma", "sum_bound", "network_bound", "normwise_error",
           "assert_float32_orders_agree", "relative_spread", "math"]
