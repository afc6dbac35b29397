"""The loss contract (docs/loss.md) written out in plain Python floats (no torch, no pgdpo code).

``tests/test_loss.py`` compares the fused backends with ``pgdpo.loss.reference``; a misreading of the contract
shared by all implementations would pass there. This file is the independent check: a scalar
transcription of the formulas, and gradients by central differences of it (with alpha and gamma
frozen at the evaluation point for ``detach_weights=True``).
"""

import itertools
import math

import pytest
import torch

from pgdpo import pgdpo_loss

from ._inputs import LOSS_CASES, case_unavailable_reason

ARS_IPR = {"pgdpo": (True, True), "ars": (True, False), "ipr": (False, True), "dpo": (False, False)}


def sigmoid(x):
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def softplus(x):
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def spec_pair_loss(pw, pl, rw, rl, tw, tl, *, method, ipr_target, weighting, beta, k1, k2, eps,
                   frozen=None):
    """L_b of one pair (lists of N floats); ``frozen=(alpha, gamma)`` holds the weights fixed."""
    ars, ipr = ARS_IPR[method]
    n = len(pw)
    mean = lambda xs: sum(xs) / len(xs)

    def weights(d_w, d_l):
        m = (d_w - d_l) / (d_l + eps)
        return (sigmoid(k1 * m) if ars else 1.0), (sigmoid(-k2 * m) if ipr else 1.0)

    def combine(d_w, d_l, anchor, alpha, gamma):
        l_dpo = softplus(0.5 * beta * (d_w - alpha * d_l))  # softplus(-z), z = -beta/2 (d_w - alpha d_l)
        l_ipr = anchor if ipr_target == "anchor" else d_w
        return gamma * l_dpo + (1 - gamma) * l_ipr

    if weighting == "sample":
        d_w = mean([(pw[i] - tw[i]) ** 2 for i in range(n)]) - mean([(rw[i] - tw[i]) ** 2 for i in range(n)])
        d_l = mean([(pl[i] - tl[i]) ** 2 for i in range(n)]) - mean([(rl[i] - tl[i]) ** 2 for i in range(n)])
        anchor = mean([(pw[i] - rw[i]) ** 2 for i in range(n)])
        alpha, gamma = frozen if frozen else weights(d_w, d_l)
        return combine(d_w, d_l, anchor, alpha, gamma), (alpha, gamma)
    terms, ws = [], []
    for i in range(n):
        d_w = (pw[i] - tw[i]) ** 2 - (rw[i] - tw[i]) ** 2
        d_l = (pl[i] - tl[i]) ** 2 - (rl[i] - tl[i]) ** 2
        alpha, gamma = frozen[i] if frozen else weights(d_w, d_l)
        ws.append((alpha, gamma))
        terms.append(combine(d_w, d_l, (pw[i] - rw[i]) ** 2, alpha, gamma))
    return mean(terms), ws


# Hand-picked values (B = 2 pairs, N = 3 elements): margins of both signs, nothing saturated.
P = [[0.30, -0.20, 0.50], [0.05, 0.25, -0.12], [0.25, -0.10, 0.45], [0.05, 0.55, -0.20]]
R = [[0.20, -0.10, 0.40], [0.00, 0.30, -0.20], [0.30, -0.20, 0.50], [0.10, 0.40, -0.30]]
T = [[0.10, 0.00, 0.30], [0.05, 0.20, -0.10], [0.40, -0.25, 0.60], [0.00, 0.50, -0.40]]
KW = dict(beta=5.0, k1=2.0, k2=3.0, eps=1e-3)


def spec_loss_and_grad(method, ipr_target, weighting, detach, weight=(1.0, 1.0)):
    b = 2

    def total(p, frozen=None):
        losses, ws = [], []
        for j in range(b):
            lb, w = spec_pair_loss(p[j], p[b + j], R[j], R[b + j], T[j], T[b + j], method=method,
                                   ipr_target=ipr_target, weighting=weighting,
                                   frozen=None if frozen is None else frozen[j], **KW)
            losses.append(lb)
            ws.append(w)
        return sum(weight[j] * losses[j] for j in range(b)) / b, losses, ws

    loss, per_pair, ws = total(P)
    frozen = ws if detach else None
    grad, h = [], 1e-6
    for row, col in itertools.product(range(2 * b), range(3)):
        up = [list(x) for x in P]
        down = [list(x) for x in P]
        up[row][col] += h
        down[row][col] -= h
        grad.append((total(up, frozen)[0] - total(down, frozen)[0]) / (2 * h))
    return loss, per_pair, torch.tensor(grad, dtype=torch.float64).reshape(4, 3)


@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("method,ipr_target,weighting,detach",
                         list(itertools.product(["pgdpo", "ars", "ipr", "dpo"], ["anchor", "reward"],
                                                ["sample", "element"], [True, False])))
def test_matches_spec_transcription(case, method, ipr_target, weighting, detach):
    if case_unavailable_reason(case):
        pytest.skip(case_unavailable_reason(case))
    weight = (0.5, 1.5)
    loss, per_pair, grad = spec_loss_and_grad(method, ipr_target, weighting, detach, weight)
    f64 = dict(dtype=torch.float64, device=case.device)
    pred = torch.tensor(P, **f64, requires_grad=True)
    got, stats = pgdpo_loss(pred, torch.tensor(R, **f64), torch.tensor(T, **f64),
                            method=method, ipr_target=ipr_target, weighting=weighting, detach_weights=detach,
                            sample_weight=torch.tensor(weight, **f64), backend=case.backend,
                            return_stats=True, **KW)
    got.backward()
    assert abs(got.item() - loss) < 1e-12
    torch.testing.assert_close(stats["loss"].cpu(), torch.tensor(per_pair, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pred.grad.cpu(), grad, rtol=1e-6, atol=1e-8)


def test_transcription_sees_both_margin_signs():
    """The hand-picked inputs exercise ARS/IPR away from 0.5 in both directions (else the test is weak)."""
    _, ws = spec_pair_loss(P[0], P[2], R[0], R[2], T[0], T[2], method="pgdpo", ipr_target="anchor",
                           weighting="sample", **KW)
    _, ws2 = spec_pair_loss(P[1], P[3], R[1], R[3], T[1], T[3], method="pgdpo", ipr_target="anchor",
                            weighting="sample", **KW)
    alphas = sorted([ws[0], ws2[0]])
    assert alphas[0] < 0.45 and alphas[1] > 0.55, alphas
