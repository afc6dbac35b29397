"""``margin="signed" | "abs"`` and the relative denominator guard ``eps_rel`` (docs/margin.md).

Every backend against the float64 eager reference over the option grid, an independent scalar
transcription of the formulas (gradients by central differences), the d|d_l|/dd_l := 0 convention
at d_l = 0, the sign properties that motivate "abs", and what the guard does at policy == reference.
"""

from __future__ import annotations

import itertools
import math
import zlib

import pytest
import torch

from pgdpo import PGDPOLoss, pgdpo_loss

from ._inputs import make_inputs
from ._parity import assert_matches, oracle, run

GRID = list(itertools.product(["pgdpo", "ars", "ipr", "dpo"], ["anchor", "reward"], ["sample", "element"],
                              [True, False]))


def _seed(*parts) -> int:
    return zlib.crc32("-".join(map(str, parts)).encode()) % 1000


@pytest.mark.parametrize("method,ipr_target,weighting,detach", GRID)
def test_abs_parity_every_option_float64(fused, method, ipr_target, weighting, detach):
    pred, ref, target = make_inputs((6, 3, 37), seed=_seed("abs", method, ipr_target, weighting, detach))
    kw = dict(method=method, ipr_target=ipr_target, weighting=weighting, detach_weights=detach, margin="abs")
    assert_matches(run(fused, pred, ref, target, **kw), oracle(pred, ref, target, **kw), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("margin", ["signed", "abs"])
@pytest.mark.parametrize("weighting", ["sample", "element"])
@pytest.mark.parametrize("detach", [True, False])
def test_eps_rel_parity_float64(fused, margin, weighting, detach):
    pred, ref, target = make_inputs((6, 3, 29), seed=_seed("rel", margin, weighting, detach))
    weight = torch.tensor([0.5, 2.0, 1.25], dtype=torch.float64)
    kw = dict(margin=margin, eps_rel=0.05, weighting=weighting, detach_weights=detach, k1=3.0, k2=7.0)
    assert_matches(run(fused, pred, ref, target, sample_weight=weight, **kw),
                   oracle(pred, ref, target, sample_weight=weight, **kw), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_abs_parity_reduction_low_precision(backend, reduction):
    """fp32 inputs, abs margin, both weightings: fp32 arithmetic against the float64 oracle."""
    pred, ref, target = make_inputs((4, 3, 50), dtype=torch.float32, seed=7)
    upstream = torch.tensor([1.0, -0.5]) if reduction == "none" else None
    for weighting in ("sample", "element"):
        kw = dict(margin="abs", weighting=weighting, reduction=reduction)
        got = run(backend, pred, ref, target, upstream=upstream, **kw)
        assert_matches(got, oracle(pred, ref, target, upstream=upstream, **kw), rtol=2e-4, atol=1e-6,
                       grad_rtol=1e-4, grad_atol=1e-4 * float(got[2].abs().max()))


def test_default_is_signed(backend):
    pred, ref, target = make_inputs((4, 2, 9), seed=3)
    default = run(backend, pred, ref, target)
    signed = run(backend, pred, ref, target, margin="signed")
    assert torch.equal(default[0], signed[0]) and torch.equal(default[2], signed[2])
    assert PGDPOLoss().options.margin == "signed" and PGDPOLoss().options.eps_rel == 0.0


def _pair_with(d_w: float, d_l: float, n: int = 4):
    """One pair with the given d_w, d_l (sample means): reference = target + 1, policy moved by a constant."""
    target = torch.zeros(2, n, dtype=torch.float64)
    ref = target + 1.0
    # (p - t)^2 - (r - t)^2 with p = r + c, r - t = 1: c^2 + 2c = d  ->  c = -1 + sqrt(1 + d)
    shift = torch.tensor([[-1 + math.sqrt(1 + d_w)], [-1 + math.sqrt(1 + d_l)]], dtype=torch.float64)
    return ref + shift, ref, target


@pytest.mark.parametrize("d_w,d_l", [(0.01, 0.05), (-0.05, -0.01), (-0.02, 0.03)])
def test_abs_margin_has_the_reward_margin_sign(backend, d_w, d_l):
    """Correctly ordered pairs (d_w < d_l): "abs" gives m > 0, alpha > 1/2, gamma < 1/2 whatever the sign
    of d_l; "signed" does so only when d_l < 0."""
    pred, ref, target = _pair_with(d_w, d_l)
    _, s_abs = pgdpo_loss(pred, ref, target, margin="abs", backend=backend, return_stats=True)
    _, s_sig = pgdpo_loss(pred, ref, target, margin="signed", backend=backend, return_stats=True)
    assert s_abs["reward_margin"].item() > 0
    assert s_abs["margin"].item() > 0 and s_abs["alpha"].item() > 0.5 and s_abs["gamma"].item() < 0.5
    assert (s_sig["margin"].item() > 0) == (d_l < 0)
    torch.testing.assert_close(s_abs["margin"], torch.tensor([(d_l - d_w) / (abs(d_l) + 1e-6)], dtype=torch.float64))


@pytest.mark.parametrize("weighting", ["sample", "element"])
def test_abs_derivative_at_zero_d_l(backend, weighting):
    """d_l == 0 exactly (rejected half of the policy equals the reference): d|d_l|/dd_l is taken as 0,
    so dm/dd_l = 1/eps there; the fused backends agree with autograd's abs (derivative 0 at 0)."""
    pred, ref, target = make_inputs((4, 3, 8), seed=5)
    pred[2:] = ref[2:]
    kw = dict(margin="abs", weighting=weighting, detach_weights=False, eps=1e-2, k1=0.5, k2=0.5)
    got = run(backend, pred, ref, target, **kw)
    assert torch.all(got[1]["d_l"] == 0)
    assert_matches(got, oracle(pred, ref, target, **kw), rtol=1e-9, atol=1e-12)
    # sign(0) = +1 instead would change the rejected rows' gradient: the convention is observable.
    assert got[2][2:].abs().max() > 0


# --- an independent transcription (plain floats, no torch, no pgdpo) --------------------------------

def _sigmoid(x):
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def _softplus(x):
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _pair_loss(pw, pl, rw, rl, tw, tl, weighting, margin, eps, eps_rel, beta, k1, k2, frozen=None):
    n = len(pw)

    def weights(d_w, d_l, ref_l):
        e = eps + eps_rel * ref_l
        m = (d_l - d_w) / (abs(d_l) + e) if margin == "abs" else (d_w - d_l) / (d_l + e)
        return _sigmoid(k1 * m), _sigmoid(-k2 * m)

    def combine(d_w, d_l, anchor, alpha, gamma):
        return gamma * _softplus(0.5 * beta * (d_w - alpha * d_l)) + (1 - gamma) * anchor

    sq = [[(a[i] - b[i]) ** 2 for i in range(n)] for a, b in ((pw, tw), (rw, tw), (pl, tl), (rl, tl), (pw, rw))]
    if weighting == "sample":
        mpw, mrw, mpl, mrl, anc = (sum(x) / n for x in sq)
        d_w, d_l = mpw - mrw, mpl - mrl
        a, g = frozen if frozen else weights(d_w, d_l, mrl)
        return combine(d_w, d_l, anc, a, g), (a, g)
    out, ws = 0.0, []
    for i in range(n):
        d_w, d_l = sq[0][i] - sq[1][i], sq[2][i] - sq[3][i]
        a, g = frozen[i] if frozen else weights(d_w, d_l, sq[3][i])
        ws.append((a, g))
        out += combine(d_w, d_l, sq[4][i], a, g) / n
    return out, ws


P = [[0.30, -0.20, 0.50], [0.05, 0.25, -0.12], [0.25, -0.10, 0.45], [0.05, 0.55, -0.20]]
R = [[0.20, -0.10, 0.40], [0.00, 0.30, -0.20], [0.30, -0.20, 0.50], [0.10, 0.40, -0.30]]
T = [[0.10, 0.00, 0.30], [0.05, 0.20, -0.10], [0.40, -0.25, 0.60], [0.00, 0.50, -0.40]]
KW = dict(beta=5.0, k1=2.0, k2=3.0, eps=1e-3)


@pytest.mark.parametrize("weighting", ["sample", "element"])
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("eps_rel", [0.0, 0.2])
@pytest.mark.parametrize("margin", ["signed", "abs"])
def test_matches_transcription(backend, weighting, detach, eps_rel, margin):
    def total(p, frozen=None):
        losses, ws = [], []
        for j in range(2):
            lb, w = _pair_loss(p[j], p[2 + j], R[j], R[2 + j], T[j], T[2 + j], weighting, margin,
                               eps_rel=eps_rel, frozen=None if frozen is None else frozen[j], **KW)
            losses.append(lb)
            ws.append(w)
        return sum(losses) / 2, ws

    want, ws = total(P)
    frozen = ws if detach else None
    grad, h = [], 1e-6
    for row, col in itertools.product(range(4), range(3)):
        up, down = [list(x) for x in P], [list(x) for x in P]
        up[row][col] += h
        down[row][col] -= h
        grad.append((total(up, frozen)[0] - total(down, frozen)[0]) / (2 * h))
    pred = torch.tensor(P, dtype=torch.float64, requires_grad=True)
    got = pgdpo_loss(pred, torch.tensor(R, dtype=torch.float64), torch.tensor(T, dtype=torch.float64),
                     weighting=weighting, detach_weights=detach, margin=margin, eps_rel=eps_rel, backend=backend,
                     **KW)
    got.backward()
    assert abs(got.item() - want) < 1e-12
    torch.testing.assert_close(pred.grad, torch.tensor(grad, dtype=torch.float64).reshape(4, 3), rtol=1e-6, atol=1e-8)


# --- the guard at policy == reference ------------------------------------------------------------

@pytest.mark.parametrize("margin", ["signed", "abs"])
@pytest.mark.parametrize("eps_rel", [0.0, 1e-2])
@pytest.mark.parametrize("weighting", ["sample", "element"])
def test_policy_equal_to_reference_any_guard(backend, margin, eps_rel, weighting):
    """Exactly equal policy and reference: m = 0, alpha = gamma = 1/2, L_dpo = log 2 for every option."""
    _, ref, target = make_inputs((4, 2, 33), dtype=torch.float32, seed=2)
    _, stats = pgdpo_loss(ref.clone(), ref, target, margin=margin, eps_rel=eps_rel, weighting=weighting,
                          backend=backend, return_stats=True)
    assert torch.all(stats["margin"] == 0)
    torch.testing.assert_close(stats["gamma"], torch.full((2,), 0.5))
    torch.testing.assert_close(stats["loss_dpo"], torch.full((2,), math.log(2)))


@pytest.mark.parametrize("margin", ["signed", "abs"])
def test_relative_guard_damps_float_noise(backend, margin):
    """Two copies of one model that differ by float noise (here 1e-6 relative): with the absolute eps
    the margin is noise / noise and gamma strays far from 1/2; eps_rel = 1e-2 keeps it within 1e-2."""
    _, ref, target = make_inputs((16, 4, 64), dtype=torch.float32, seed=8)
    g = torch.Generator().manual_seed(0)
    noisy = ref * (1 + 1e-6 * torch.randn(ref.shape, generator=g))
    _, plain = pgdpo_loss(noisy, ref, target, margin=margin, backend=backend, return_stats=True)
    _, guarded = pgdpo_loss(noisy, ref, target, margin=margin, eps_rel=1e-2, backend=backend, return_stats=True)
    assert (plain["gamma"] - 0.5).abs().max() > 0.05
    assert (guarded["gamma"] - 0.5).abs().max() < 1e-2


def test_bad_margin_options():
    with pytest.raises(ValueError, match="margin must be one of"):
        pgdpo_loss(*make_inputs((2, 3)), margin="absolute", backend="torch")
    with pytest.raises(ValueError, match="eps_rel must be >= 0"):
        PGDPOLoss(eps_rel=-1.0)
    with pytest.raises(TypeError, match="eps_rel must be a real number"):
        PGDPOLoss(eps_rel="0.1")
    assert "margin='abs'" in repr(PGDPOLoss(margin="abs"))
