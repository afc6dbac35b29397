"""Noise schedules: flow matching and DDPM (eps / v), shared noise and timestep per pair, seeding."""

import math

import pytest
import torch

from pgdpo.train.diffusion import DDPMSchedule, FlowMatchingSchedule, flow_loss_weight, make_schedule

B, SHAPE = 3, (4, 2, 3, 5)


def pairs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, *SHAPE, generator=g).to(dtype), torch.randn(B, *SHAPE, generator=g).to(dtype)


def col(x):
    return x.view(-1, *([1] * len(SHAPE)))


def sd_alpha_bar(t):
    """Stable Diffusion / VideoCrafter2 "scaled_linear" betas: linspace in sqrt space, then squared."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)[t].float()


def test_flow_inputs_and_target_are_rectified_flow():
    chosen, rejected = pairs()
    out = make_schedule("flow").noise_pairs(chosen, rejected, torch.Generator().manual_seed(1))
    x0 = torch.cat([chosen, rejected])
    eps = torch.cat([out.noise, out.noise])
    s = col(torch.cat([out.sigmas, out.sigmas]))
    torch.testing.assert_close(out.noisy, (1 - s) * x0 + s * eps)
    torch.testing.assert_close(out.target, eps - x0)
    assert out.noise.shape == chosen.shape and out.target.shape == (2 * B, *SHAPE)
    torch.testing.assert_close(out.timesteps, 1000 * out.sigmas)
    assert torch.equal(out.model_timesteps, torch.cat([out.timesteps, out.timesteps]))
    assert ((out.sigmas > 0) & (out.sigmas <= 1)).all()


@pytest.mark.parametrize("name", ["flow", "ddpm-eps", "ddpm-v"])
def test_chosen_and_rejected_share_noise_and_timestep(name):
    chosen, rejected = pairs()
    out = make_schedule(name).noise_pairs(chosen, rejected, torch.Generator().manual_seed(2))
    t = out.model_timesteps
    assert torch.equal(t[:B], t[B:])
    # Remove each half's signal; what is left is the noise term, identical across the pair.
    if name == "flow":
        keep = col(1 - out.sigmas)
    else:
        keep = col(sd_alpha_bar(out.timesteps).sqrt())
    torch.testing.assert_close(out.noisy[:B] - keep * chosen, out.noisy[B:] - keep * rejected)
    # ...while different pairs get different noise.
    residual = out.noisy[:B] - keep * chosen
    assert not torch.allclose(residual[0] / residual[0].norm(), residual[1] / residual[1].norm())


def test_ddpm_eps_and_v_targets():
    chosen, rejected = pairs()
    for name in ("ddpm-eps", "ddpm-v"):
        out = make_schedule(name).noise_pairs(chosen, rejected, torch.Generator().manual_seed(3))
        x0 = torch.cat([chosen, rejected])
        eps = torch.cat([out.noise, out.noise])
        ab = col(sd_alpha_bar(out.model_timesteps))
        torch.testing.assert_close(out.noisy, ab.sqrt() * x0 + (1 - ab).sqrt() * eps)
        expected = eps if name == "ddpm-eps" else ab.sqrt() * eps - (1 - ab).sqrt() * x0
        torch.testing.assert_close(out.target, expected)
        assert out.timesteps.dtype == torch.long and ((out.timesteps >= 0) & (out.timesteps < 1000)).all()


@pytest.mark.parametrize("name", ["flow", "ddpm-eps", "ddpm-v"])
def test_reproducible_with_a_generator(name):
    chosen, rejected = pairs()
    schedule = make_schedule(name)
    a = schedule.noise_pairs(chosen, rejected, torch.Generator().manual_seed(7))
    b = schedule.noise_pairs(chosen, rejected, torch.Generator().manual_seed(7))
    c = schedule.noise_pairs(chosen, rejected, torch.Generator().manual_seed(8))
    assert torch.equal(a.noisy, b.noisy) and torch.equal(a.timesteps, b.timesteps)
    assert not torch.equal(a.noise, c.noise)


def test_low_precision_latents_get_the_same_draws():
    chosen, rejected = pairs()
    schedule = make_schedule("flow")
    full = schedule.noise_pairs(chosen, rejected, torch.Generator().manual_seed(5))
    half = schedule.noise_pairs(chosen.bfloat16(), rejected.bfloat16(), torch.Generator().manual_seed(5))
    assert half.noisy.dtype == half.target.dtype == torch.bfloat16
    assert torch.equal(full.sigmas, half.sigmas)
    torch.testing.assert_close(half.noise.float(), full.noise, atol=0.02, rtol=0.01)


def test_uniform_density_with_shift_follows_the_shift_formula():
    # u ~ U(0,1), sigma = shift u / (1 + (shift - 1) u): E[sigma] by quadrature, vs the sample mean.
    n, shift = 20000, 3.0
    schedule = FlowMatchingSchedule(density="uniform", shift=shift)
    sigmas = schedule.sample_sigmas(n, torch.Generator().manual_seed(0))
    u = (torch.arange(100000, dtype=torch.float64) + 0.5) / 100000
    expected = (shift * u / (1 + (shift - 1) * u)).mean().item()
    assert abs(sigmas.double().mean().item() - expected) < 0.01
    unshifted = FlowMatchingSchedule(density="uniform", shift=1.0).sample_sigmas(n, torch.Generator().manual_seed(0))
    assert abs(unshifted.mean().item() - 0.5) < 0.01


def test_logit_normal_density():
    n = 20000
    plain = FlowMatchingSchedule(shift=1.0, logit_mean=0.0, logit_std=1.0).sample_sigmas(n, torch.Generator())
    assert abs(plain.median().item() - 0.5) < 0.02  # sigmoid(N(0, 1)) has median 1/2
    noisier = FlowMatchingSchedule(shift=1.0, logit_mean=1.0).sample_sigmas(n, torch.Generator())
    assert abs(noisier.median().item() - 1 / (1 + math.exp(-1.0))) < 0.02


def test_given_scheduler_is_used_and_insulated_from_inference_calls():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=5.0)
    schedule = FlowMatchingSchedule(scheduler=sched, density="uniform")
    before = schedule.sample_sigmas(1000, torch.Generator().manual_seed(0))
    sched.set_timesteps(4)  # an inference call on the original
    after = schedule.sample_sigmas(1000, torch.Generator().manual_seed(0))
    assert torch.equal(before, after)
    assert before.mean() > 0.7  # shift 5 pushes the uniform mean 0.5 up (E = 0.75)


def test_fixed_timesteps_and_sigmas():
    chosen, rejected = pairs()
    flow = make_schedule("flow").noise_pairs(chosen, rejected, sigmas=torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(flow.noisy[0], chosen[0])  # sigma 0: clean
    torch.testing.assert_close(flow.noisy[2], flow.noise[2])  # sigma 1: pure noise
    ddpm = make_schedule("ddpm-eps").noise_pairs(chosen, rejected, timesteps=torch.tensor([0, 10, 999]))
    assert ddpm.timesteps.tolist() == [0, 10, 999]


def test_flow_loss_weight_uses_sd3_formulas():
    t = torch.tensor([250.0, 500.0])
    s = t / 1000
    torch.testing.assert_close(flow_loss_weight("cosmap")(t), 2 / (math.pi * (1 - 2 * s + 2 * s ** 2)))
    torch.testing.assert_close(flow_loss_weight("sigma_sqrt")(t), s ** -2)
    torch.testing.assert_close(flow_loss_weight()(t), torch.ones(2))


def test_errors_name_the_bad_argument():
    chosen, rejected = pairs()
    with pytest.raises(ValueError, match="schedule must be one of"):
        make_schedule("ddim")
    with pytest.raises(ValueError, match="density must be one of"):
        FlowMatchingSchedule(density="normal")
    with pytest.raises(ValueError, match="prediction_type"):
        DDPMSchedule(prediction_type="sample")
    with pytest.raises(ValueError, match="already fixes prediction_type"):
        make_schedule("ddpm-v", prediction_type="epsilon")
    with pytest.raises(ValueError, match="rejected has shape"):
        make_schedule("flow").noise_pairs(chosen, rejected[:, :2])
    with pytest.raises(TypeError, match="FlowMatchEulerDiscreteScheduler"):
        FlowMatchingSchedule(scheduler=DDPMSchedule().scheduler)


def test_flow_noising_has_one_home_and_computes_in_fp32():
    from pgdpo.train import diagnostics
    from pgdpo.train.diffusion import flow_matching_noising

    assert diagnostics.flow_matching_noising is flow_matching_noising
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    noise = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    sigma = torch.rand(4, generator=g, dtype=torch.float64)
    s = sigma.view(-1, 1, 1)
    noisy, target = flow_matching_noising(x0, noise, sigma)
    assert noisy.dtype == target.dtype == torch.float64  # fp64 stays fp64 (compared to the fp64 formula)
    torch.testing.assert_close(noisy, (1 - s) * x0 + s * noise, rtol=0, atol=1e-15)
    torch.testing.assert_close(target, noise - x0, rtol=0, atol=1e-15)
    # bf16 latents with fp32 noise: the result is the exact value rounded once to bf16 (within bf16's
    # relative precision 2^-8), not a bf16 chain of roundings
    xb, nf = x0.to(torch.bfloat16), noise.float()
    noisy_b, target_b = flow_matching_noising(xb, nf, sigma.float())
    assert noisy_b.dtype == target_b.dtype == torch.bfloat16
    exact = (1 - s) * xb.double() + s * nf.double()
    torch.testing.assert_close(noisy_b.double(), exact, rtol=2 ** -8, atol=1e-6)
    torch.testing.assert_close(target_b.double(), nf.double() - xb.double(), rtol=2 ** -8, atol=1e-6)


def test_probe_noise_is_the_training_steps_noise_for_any_latent_dtype():
    from pgdpo.train.diagnostics import make_probe_batch

    chosen, rejected = pairs()
    sigmas = torch.full((B,), 0.5)
    step = make_schedule("flow").noise_pairs(chosen, rejected, torch.Generator().manual_seed(7), sigmas=sigmas)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x_w, x_l = chosen.to(dtype), rejected.to(dtype)
        probe = make_probe_batch(x_w, x_l, sigmas, generator=torch.Generator().manual_seed(7))
        assert probe.noisy.dtype == probe.target.dtype == dtype
        # noise = target + x0 (chosen half): the float32 noise of the step, whatever the latents' dtype
        recovered = probe.target[:B].double() + x_w.double()
        tol = 5e-2 if dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(recovered, step.noise.double(), rtol=0, atol=tol)
