"""Tests of pgdpo.train.diagnostics: Gamma against real SGD steps, likelihood probes, range tracking, controller."""

import copy
import math

import pytest
import torch
from torch import nn

from pgdpo import pgdpo_loss
from pgdpo.train.diagnostics import (
    GammaMeter,
    K1K2Controller,
    LikelihoodProbe,
    MarginGradRecorder,
    ProbeBatch,
    WeightRangeTracker,
    gamma_from_pred,
    gamma_statistic,
    make_probe_batch,
    pair_grad_norms,
)

D, B = 3, 4
KW = dict(backend="torch")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D + 1, 16), nn.Tanh(), nn.Linear(16, D))

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None]], 1))


@pytest.fixture
def setup():
    torch.manual_seed(0)
    ref = Tiny().double()
    policy = copy.deepcopy(ref)
    with torch.no_grad():  # away from the reference, so every loss term has a gradient
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    x_w = torch.randn(B, D, dtype=torch.float64, generator=g)
    x_l = x_w + 0.3 * torch.randn(B, D, dtype=torch.float64, generator=g)
    batch = make_probe_batch(x_w, x_l, torch.rand(B, dtype=torch.float64, generator=g), generator=g)
    return ref, policy, batch


def chosen_logp(model, batch):
    """The chosen log-likelihood proxy, written out independently of the library."""
    with torch.no_grad():
        pred = model(batch.noisy, batch.timesteps)
    return float(-((pred[:B] - batch.target[:B]) ** 2).mean())


def after_sgd_step(policy, ref, batch, method, lr, precond=None):
    """logp_w after one real (preconditioned) SGD step of ``method`` from ``policy``."""
    model = copy.deepcopy(policy)
    pred = model(batch.noisy, batch.timesteps)
    with torch.no_grad():
        ref_pred = ref(batch.noisy, batch.timesteps)
    loss = pgdpo_loss(pred, ref_pred, batch.target, method=method, **KW)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    with torch.no_grad():
        for i, (p, g) in enumerate(zip(model.parameters(), grads)):
            p.sub_(lr * (g if precond is None else precond[i] * g))
    return chosen_logp(model, batch)


@pytest.mark.parametrize("method", ["pgdpo", "ars", "ipr"])
def test_gamma_is_first_order_change_of_chosen_logp_vs_dpo(setup, method):
    ref, policy, batch = setup
    rel_err = []
    for lr in (1e-4, 1e-5):
        res = gamma_statistic(policy, batch, lr=lr, ref_model=ref, method=method, loss_kwargs=KW)
        actual = after_sgd_step(policy, ref, batch, method, lr) - after_sgd_step(policy, ref, batch, "dpo", lr)
        assert actual != 0
        rel_err.append(abs(res.gamma - actual) / abs(actual))
    assert rel_err[1] < 1e-3, rel_err
    # first order: the error shrinks with the step (about 10x for a 10x smaller lr)
    assert rel_err[1] < rel_err[0] / 4, rel_err


def test_gamma_components_are_each_methods_own_change(setup):
    ref, policy, batch = setup
    lr = 1e-5
    base = chosen_logp(policy, batch)
    res = gamma_statistic(policy, batch, lr=lr, ref_model=ref, loss_kwargs=KW, components=True)
    own = after_sgd_step(policy, ref, batch, "pgdpo", lr) - base
    dpo = after_sgd_step(policy, ref, batch, "dpo", lr) - base
    assert res.delta_method == pytest.approx(own, rel=1e-3)
    assert res.delta_baseline == pytest.approx(dpo, rel=1e-3)
    assert res.gamma == pytest.approx(own - dpo, rel=1e-3)


def test_gamma_with_diagonal_preconditioner_matches_preconditioned_step(setup):
    ref, policy, batch = setup
    lr = 1e-5
    gen = torch.Generator().manual_seed(3)
    precond = [torch.rand(p.shape, dtype=torch.float64, generator=gen) * 3 + 0.1 for p in policy.parameters()]
    res = gamma_statistic(policy, batch, lr=lr, ref_model=ref, loss_kwargs=KW, precondition=precond)
    actual = (after_sgd_step(policy, ref, batch, "pgdpo", lr, precond)
              - after_sgd_step(policy, ref, batch, "dpo", lr, precond))
    plain = gamma_statistic(policy, batch, lr=lr, ref_model=ref, loss_kwargs=KW).gamma
    assert res.gamma == pytest.approx(actual, rel=1e-3)
    assert abs(plain - actual) > 1e-2 * abs(actual)  # the preconditioner mattered


def test_gamma_from_pred_leaves_training_graph_and_grads_alone(setup):
    ref, policy, batch = setup
    params = list(policy.parameters())
    pred = policy(batch.noisy, batch.timesteps)
    with torch.no_grad():
        ref_pred = ref(batch.noisy, batch.timesteps)
    res = gamma_from_pred(pred, ref_pred, batch.target, params, lr=1e-3, loss_kwargs=KW, components=True)
    assert all(p.grad is None for p in params)
    loss = pgdpo_loss(pred, ref_pred, batch.target, **KW)
    loss.backward()  # the graph is still there
    fresh = torch.autograd.grad(pgdpo_loss(policy(batch.noisy, batch.timesteps), ref_pred, batch.target, **KW),
                                params)
    for p, g in zip(params, fresh):
        torch.testing.assert_close(p.grad, g)
    meter = GammaMeter()
    meter.update(res, 0)
    meter.update(-1.0, 1)
    meter.update(2.0, 2)
    assert meter.running_positive_fraction() == pytest.approx([float(res.gamma > 0), 0.5 * (res.gamma > 0),
                                                               (1 + (res.gamma > 0)) / 3])


def test_gamma_rejects_bad_arguments(setup):
    ref, policy, batch = setup
    pred = policy(batch.noisy, batch.timesteps).detach()
    with pytest.raises(ValueError, match="requires? grad"):
        gamma_from_pred(pred, pred, batch.target, list(policy.parameters()), lr=1e-3, loss_kwargs=KW)
    with pytest.raises(ValueError, match="method"):
        gamma_statistic(policy, batch, lr=1e-3, ref_model=ref, loss_kwargs=dict(method="dpo"))
    with pytest.raises(ValueError, match="ref_pred or ref_model"):
        gamma_statistic(policy, batch, lr=1e-3)


def test_probe_at_policy_equal_reference_is_equal_and_moves_after(setup):
    ref, _, batch = setup
    policy = copy.deepcopy(ref).train()
    probe = LikelihoodProbe(batch, every=5)
    r_ref = probe.measure(ref)
    r_pol = probe.measure(policy, step=0)
    # Two copies of one model are two computations (kernels may take other paths for other allocations):
    # equal up to float rounding, not necessarily bitwise.
    torch.testing.assert_close(r_pol.chosen, r_ref.chosen, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(r_pol.rejected, r_ref.rejected, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        pred = ref(batch.noisy, batch.timesteps)
    expected = -((pred - batch.target) ** 2).mean(1)
    torch.testing.assert_close(r_ref.chosen, expected[:B])
    torch.testing.assert_close(r_ref.rejected, expected[B:])
    assert policy.training  # the probe restored train mode
    assert probe.maybe_measure(3, policy) is None and len(probe.history) == 1
    with torch.no_grad():
        policy.net[2].bias.add_(0.1)
    assert probe.maybe_measure(5, policy) is not None
    s = probe.summary()
    assert s["chosen_logp_change"] == pytest.approx(float((probe.history[1].chosen - r_ref.chosen).mean()))
    assert s["chosen_logp_change"] != 0
    assert probe.curves()["step"] == [0, 5]


def test_probe_accepts_any_batch_with_predict_fn(setup):
    ref, _, batch = setup
    dict_batch = {"x": batch.noisy, "t": batch.timesteps, "y": batch.target}
    probe = LikelihoodProbe([dict_batch, dict_batch], predict_fn=lambda m, b: (m(b["x"], b["t"]), b["y"]))
    rec = probe.measure(ref)
    ref_rec = LikelihoodProbe(batch).measure(ref)
    torch.testing.assert_close(rec.chosen, torch.cat([ref_rec.chosen, ref_rec.chosen]))
    with pytest.raises(ValueError, match=r"\[2B"):
        ProbeBatch(batch.noisy[:3], batch.target[:3])


def test_weight_range_tracker_counts_ranges():
    tr = WeightRangeTracker()
    tr.update({"alpha": torch.tensor([0.4, 0.5]), "gamma": torch.tensor([0.0, 0.6]),
               "margin": torch.tensor([-1.0, 2.0])}, step=0)
    tr.update({"alpha": torch.tensor([0.7, 0.9]), "gamma": torch.tensor([0.3, 0.5]),
               "margin": torch.tensor([1.0, 1.0])}, step=1)
    s = tr.summary()
    assert s["alpha"]["mean"] == pytest.approx(0.625)
    assert (s["alpha"]["min"], s["alpha"]["max"]) == (pytest.approx(0.4), pytest.approx(0.9))
    assert s["alpha"]["inside_fraction"] == pytest.approx(0.5)  # 0.5 and 0.7 in [0.5, 0.8]
    assert s["gamma"]["inside_fraction"] == pytest.approx(0.75)  # 0.0, 0.3, 0.5 in [0, 0.5]
    assert s["margin_positive_fraction"] == pytest.approx(0.75)
    assert tr.per_step()["alpha_max"] == pytest.approx([0.5, 0.9])
    assert tr.latest()["alpha_mean"] == pytest.approx(0.8) and tr.latest()["gamma_min"] == pytest.approx(0.3)


def test_pair_grad_norms_match_single_pair_gradients(setup):
    ref, policy, batch = setup
    params = list(policy.parameters())
    pred = policy(batch.noisy, batch.timesteps)
    with torch.no_grad():
        ref_pred = ref(batch.noisy, batch.timesteps)
    margin, norms = pair_grad_norms(pred, ref_pred, batch.target, params=params, loss_kwargs=KW)
    margin_out, norms_out = pair_grad_norms(pred.detach(), ref_pred, batch.target, loss_kwargs=KW)
    for i in range(B):
        rows = [i, B + i]
        p_i = policy(batch.noisy[rows], batch.timesteps[rows])
        loss_i = pgdpo_loss(p_i, ref_pred[rows], batch.target[rows], method="dpo", **KW)
        g = torch.autograd.grad(loss_i, params)
        assert norms[i] == pytest.approx(math.sqrt(sum(float((x ** 2).sum()) for x in g)), rel=1e-9)
        leaf = p_i.detach().requires_grad_()
        (go,) = torch.autograd.grad(pgdpo_loss(leaf, ref_pred[rows], batch.target[rows], method="dpo", **KW),
                                    leaf)
        assert norms_out[i] == pytest.approx(float(go.norm()), rel=1e-9)
        d = ((p_i.detach() - batch.target[rows]) ** 2).mean(1) - ((ref_pred[rows] - batch.target[rows]) ** 2).mean(1)
        assert margin[i] == pytest.approx(float(-50.0 * (d[0] - d[1])), rel=1e-9)
    torch.testing.assert_close(margin, margin_out)


def test_margin_grad_recorder_sees_a_vanishing_gradient():
    rec = MarginGradRecorder()
    m = torch.linspace(0, 10, 50)
    rec.record(m, torch.sigmoid(-m))  # the DPO factor sigma(-z)
    s = rec.summary()
    assert s["spearman"] == pytest.approx(-1.0)
    assert s["top_to_bottom_ratio"] < 0.01


def margin_stream(mean, sd, steps, batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield mean + sd * torch.randn(batch, generator=g, dtype=torch.float64)


def inside(values, lo, hi):
    return float(((values >= lo) & (values <= hi)).double().mean())


def test_controller_moves_alpha_into_range():
    test_m = next(margin_stream(0.4, 0.1, 1, batch=4000, seed=99))
    assert inside(torch.sigmoid(10.0 * test_m), 0.5, 0.8) < 0.05  # K1 = 10 puts alpha near 0.98
    ctl = K1K2Controller(k1=10.0, k2=10.0, enabled=True, control_k2=False)
    for m in margin_stream(0.4, 0.1, 400):
        k1, k2 = ctl.update({"margin": m})
    assert k2 == 10.0
    assert k1 < 10.0
    assert inside(torch.sigmoid(k1 * test_m), 0.5, 0.8) > 0.9


def test_controller_moves_gamma_up_into_a_range():
    test_m = next(margin_stream(0.4, 0.1, 1, batch=4000, seed=99))
    assert inside(torch.sigmoid(-10.0 * test_m), 0.1, 0.4) < 0.1  # K2 = 10 puts gamma near 0.02
    ctl = K1K2Controller(enabled=True, gamma_range=(0.1, 0.4), control_k1=False)
    for m in margin_stream(0.4, 0.1, 400):
        _, k2 = ctl.update(m)
    assert inside(torch.sigmoid(-k2 * test_m), 0.1, 0.4) > 0.9


def test_controller_off_by_default_and_unreachable_range_goes_to_k_min():
    off = K1K2Controller(k1=7.0, k2=3.0)
    for m in margin_stream(0.4, 0.1, 20):
        assert off.update(m) == (7.0, 3.0)
    ctl = K1K2Controller(enabled=True, k_min=0.05)
    for m in margin_stream(-0.5, 0.1, 600):  # m < 0: alpha < 0.5 for every K1
        k1, _ = ctl.update(m)
    assert k1 == pytest.approx(0.05)
    assert ctl.state["k1_at_k_min"]


def test_controller_steers_the_loss_it_is_given_and_refuses_a_missing_state():
    from pgdpo import PGDPOLoss

    loss = PGDPOLoss()
    ctl = K1K2Controller(k1=10.0, k2=10.0, enabled=True, control_k2=False, loss=loss)
    for m in margin_stream(0.4, 0.1, 50):
        k1, k2 = ctl.update(m)
    assert k1 < 10.0 and (loss.options.k1, loss.options.k2) == (k1, k2)  # the next step's loss uses them
    saved = ctl.state_dict()
    other_loss = PGDPOLoss()
    resumed = K1K2Controller(enabled=True, loss=other_loss)
    resumed.load_state_dict(saved)
    assert (other_loss.options.k1, other_loss.options.k2) == (k1, k2)
    with pytest.raises(ValueError, match="no K1/K2 controller state"):
        resumed.load_state_dict(None)
