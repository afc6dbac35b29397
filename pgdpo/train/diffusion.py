"""Noise schedules of the preference step: flow matching (Wan) and DDPM (epsilon / v prediction).

A schedule turns a batch of preference pairs of clean latents ``x0`` into the model's noisy inputs
and regression targets. As in Diffusion-DPO, VideoDPO and Flow-DPO, the chosen and the rejected
sample of a pair share one noise draw and one timestep, so their losses differ only through the
content of the videos. The arithmetic comes from diffusers:

- flow: ``FlowMatchEulerDiscreteScheduler``'s shifted sigma table and ``diffusers.training_utils``'s
  ``compute_density_for_timestep_sampling`` (logit-normal / uniform / mode densities), then
  ``x_t = (1 - sigma) x0 + sigma eps`` with target ``eps - x0`` (rectified flow, as Wan trains;
  :func:`flow_matching_noising`, which the diagnostics use too).
- DDPM: ``DDPMScheduler.add_noise`` and ``get_velocity``; target ``eps`` or ``v``.

All random draws go through an optional ``torch.Generator`` and are made in float32 on the
generator's device, so a seed reproduces a step on any latent dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SCHEDULES = ("flow", "ddpm-eps", "ddpm-v")
FLOW_DENSITIES = {"logit_normal": "logit_normal", "uniform": "none", "mode": "mode"}


@dataclass
class NoisyPairs:
    """Model inputs and targets for ``B`` preference pairs, chosen half first.

    Attributes:
        noisy: ``[2B, C, F, H, W]`` noisy latents (chosen ``[:B]``, rejected ``[B:]``), latent dtype.
        target: ``[2B, C, F, H, W]`` regression target (``eps - x0``, ``eps`` or ``v``), latent dtype.
        model_timesteps: ``[2B]`` timesteps in the model's units (``1000 sigma`` for flow, step index
            for DDPM).
        timesteps: ``[B]`` one timestep per pair (same units).
        sigmas: ``[B]`` flow noise levels in ``[0, 1]``; for DDPM ``sqrt(1 - alpha_bar_t)``.
        noise: ``[B, C, F, H, W]`` the noise shared by the two samples of each pair.
    """

    noisy: Tensor
    target: Tensor
    model_timesteps: Tensor
    timesteps: Tensor
    sigmas: Tensor
    noise: Tensor


def draw_noise(shape, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise of ``shape``, drawn in float32 on the generator's device (else ``like``'s),
    returned float32 on ``like``'s device.

    Why float32 whatever the latents' dtype: one seed then gives the same noise for bf16, fp16, fp32 and
    fp64 latents (the training step and a diagnostics probe of the same generator draw the same values),
    and a bf16 draw would round the Gaussian to 8 mantissa bits before the noising formula sees it.
    """
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(like.device)


def flow_matching_noising(x0: Tensor, noise: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Rectified flow (Wan, SD3): ``x_t = (1 - sigma) x0 + sigma noise``, target ``noise - x0``.

    ``x0``, ``noise``: ``[N, *S]``; ``sigma``: ``[N]`` in ``[0, 1]``. Computed in at least float32
    (``promote_types(x0.dtype, float32)``: bf16 / fp16 latents in fp32, fp64 in fp64) and returned as
    ``(x_t, target)`` in ``x0``'s dtype. The one home of this formula (the step, the probes, the toy lab).
    """
    compute = torch.promote_types(x0.dtype, torch.float32)
    x, n = x0.to(compute), noise.to(compute)
    s = sigma.to(device=x.device, dtype=compute).reshape(-1, *([1] * (x.dim() - 1)))
    return ((1 - s) * x + s * n).to(x0.dtype), (n - x).to(x0.dtype)


def _check_pair(chosen: Tensor, rejected: Tensor) -> None:
    if not isinstance(chosen, Tensor) or not isinstance(rejected, Tensor):
        raise TypeError("chosen and rejected must be torch.Tensors")
    if chosen.shape != rejected.shape:
        raise ValueError(f"chosen has shape {tuple(chosen.shape)} but rejected has shape "
                         f"{tuple(rejected.shape)}; the two videos of a pair must have one shape")
    if chosen.dim() < 2 or chosen.shape[0] == 0:
        raise ValueError(f"latents must be [B, ...] with B > 0, got shape {tuple(chosen.shape)}")


class FlowMatchingSchedule:
    """Rectified-flow noising as Wan2.1 trains: ``x_t = (1 - sigma) x0 + sigma eps``, target ``eps - x0``.

    Args:
        shift: timestep shift ``sigma' = shift sigma / (1 + (shift - 1) sigma)`` (Wan2.1 480p samples
            with 3.0, 720p with 5.0; 1.0 is no shift). Ignored when ``scheduler`` is given.
        density: how ``u`` in ``(0, 1)`` is drawn before the shift: ``"logit_normal"`` (SD3 / Wan
            fine-tuning default), ``"uniform"`` or ``"mode"`` (diffusers' ``training_utils``).
        logit_mean, logit_std: logit-normal parameters; ``mode_scale``: the "mode" density parameter.
        num_train_timesteps: size of the discrete sigma table (1000 for Wan).
        scheduler: an existing ``FlowMatchEulerDiscreteScheduler`` (e.g. loaded from a pipeline folder)
            whose shift and table are used instead. It is copied: inference ``set_timesteps`` calls on
            the original do not change training.
    """

    name = "flow"

    def __init__(self, *, shift: float = 3.0, density: str = "logit_normal", logit_mean: float = 0.0,
                 logit_std: float = 1.0, mode_scale: float = 1.29, num_train_timesteps: int = 1000,
                 scheduler=None):
        from diffusers import FlowMatchEulerDiscreteScheduler

        if density not in FLOW_DENSITIES:
            raise ValueError(f"density must be one of {sorted(FLOW_DENSITIES)}, got {density!r}")
        if scheduler is None:
            if not shift > 0:
                raise ValueError(f"shift must be > 0, got {shift!r}")
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
        elif not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            raise TypeError("scheduler must be a FlowMatchEulerDiscreteScheduler, got "
                            f"{type(scheduler).__name__}")
        else:
            # A fresh scheduler from the same config: its training table, untouched by set_timesteps.
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        if scheduler.config.use_dynamic_shifting:
            raise ValueError("FlowMatchEulerDiscreteScheduler with use_dynamic_shifting=True has no fixed "
                             "training sigma table; pass a scheduler with a static shift")
        self.scheduler = scheduler
        self.density = density
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)
        self.mode_scale = float(mode_scale)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        # Ascending shifted sigmas (the scheduler stores them descending, from 1 down to 1/N shifted).
        self._sigmas = scheduler.sigmas[: self.num_train_timesteps].flip(0).to(torch.float32)

    def sample_sigmas(self, batch_size: int, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> Tensor:
        """``[batch_size]`` noise levels: ``u`` from the density, then the scheduler's shifted table."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        gen_device = generator.device if generator is not None else device
        u = compute_density_for_timestep_sampling(
            FLOW_DENSITIES[self.density], batch_size, logit_mean=self.logit_mean, logit_std=self.logit_std,
            mode_scale=self.mode_scale, device=gen_device, generator=generator)
        # u is the (unshifted) noise level: index the ascending table so a larger u means more noise.
        index = (u * self.num_train_timesteps).long().clamp_(0, self.num_train_timesteps - 1)
        return self._sigmas[index.cpu()].to(device)

    def noise_pairs(self, chosen: Tensor, rejected: Tensor, generator: torch.Generator | None = None,
                    sigmas: Tensor | None = None) -> NoisyPairs:
        """Noisy inputs and ``eps - x0`` targets for ``chosen`` / ``rejected`` latents ``[B, C, F, H, W]``.

        ``sigmas`` (``[B]``) fixes the noise levels instead of sampling them.
        """
        _check_pair(chosen, rejected)
        b = chosen.shape[0]
        if sigmas is None:
            sigma = self.sample_sigmas(b, generator, chosen.device)
        else:
            sigma = sigmas.to(chosen.device)
        noise = draw_noise(chosen.shape, chosen, generator)
        x0 = torch.cat([chosen, rejected], dim=0)
        noisy, target = flow_matching_noising(x0, torch.cat([noise, noise], dim=0), torch.cat([sigma, sigma]))
        timesteps = sigma.float() * self.num_train_timesteps
        return NoisyPairs(noisy=noisy, target=target,
                          model_timesteps=torch.cat([timesteps, timesteps]), timesteps=timesteps,
                          sigmas=sigma.float(), noise=noise.to(chosen.dtype))


class DDPMSchedule:
    """DDPM noising through diffusers' ``DDPMScheduler``: ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``.

    Args:
        prediction_type: ``"epsilon"`` (target ``eps``) or ``"v_prediction"`` (target ``v``).
        beta_schedule, beta_start, beta_end, num_train_timesteps: the scheduler's config; the defaults
            are VideoCrafter2 / Stable Diffusion's ("scaled_linear", 0.00085, 0.012, 1000).
        scheduler: an existing ``DDPMScheduler`` to use instead (its ``prediction_type`` is overridden
            by ``prediction_type``).
    """

    name = "ddpm"

    def __init__(self, *, prediction_type: str = "epsilon", beta_schedule: str = "scaled_linear",
                 beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000,
                 scheduler=None):
        from diffusers import DDPMScheduler

        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        if scheduler is None:
            scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                                      beta_start=beta_start, beta_end=beta_end,
                                      prediction_type=prediction_type)
        elif not isinstance(scheduler, DDPMScheduler):
            raise TypeError(f"scheduler must be a DDPMScheduler, got {type(scheduler).__name__}")
        else:
            scheduler = DDPMScheduler.from_config(scheduler.config, prediction_type=prediction_type)
        self.scheduler = scheduler
        self.prediction_type = prediction_type
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None,
                         device: torch.device | str = "cpu") -> Tensor:
        """``[batch_size]`` int64 timesteps uniform in ``[0, num_train_timesteps)``."""
        gen_device = generator.device if generator is not None else device
        t = torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator, device=gen_device)
        return t.to(device)

    def noise_pairs(self, chosen: Tensor, rejected: Tensor, generator: torch.Generator | None = None,
                    timesteps: Tensor | None = None) -> NoisyPairs:
        """Noisy inputs and ``eps`` / ``v`` targets for ``chosen`` / ``rejected`` latents ``[B, C, F, H, W]``.

        ``timesteps`` (``[B]`` int) fixes the steps instead of sampling them.
        """
        _check_pair(chosen, rejected)
        b = chosen.shape[0]
        t = self.sample_timesteps(b, generator, chosen.device) if timesteps is None else timesteps
        t = t.to(device=chosen.device, dtype=torch.long)
        noise = draw_noise(chosen.shape, chosen, generator)
        x0 = torch.cat([chosen, rejected], dim=0).float()
        eps = torch.cat([noise, noise], dim=0)
        t2 = torch.cat([t, t])
        noisy = self.scheduler.add_noise(x0, eps, t2)
        target = eps if self.prediction_type == "epsilon" else self.scheduler.get_velocity(x0, eps, t2)
        alpha_bar = self.scheduler.alphas_cumprod.to(chosen.device)[t]
        return NoisyPairs(noisy=noisy.to(chosen.dtype), target=target.to(chosen.dtype), model_timesteps=t2,
                          timesteps=t, sigmas=(1 - alpha_bar).sqrt().float(), noise=noise.to(chosen.dtype))


def make_schedule(schedule: str | FlowMatchingSchedule | DDPMSchedule = "flow", **kwargs):
    """A schedule from its name (``"flow"``, ``"ddpm-eps"``, ``"ddpm-v"``) and keyword options, or as is."""
    if isinstance(schedule, (FlowMatchingSchedule, DDPMSchedule)):
        if kwargs:
            raise ValueError(f"schedule options {sorted(kwargs)} given with an already built schedule")
        return schedule
    if schedule == "flow":
        return FlowMatchingSchedule(**kwargs)
    if schedule in ("ddpm-eps", "ddpm-v"):
        if "prediction_type" in kwargs:
            raise ValueError(f"schedule={schedule!r} already fixes prediction_type; do not pass it")
        kind = "epsilon" if schedule == "ddpm-eps" else "v_prediction"
        return DDPMSchedule(prediction_type=kind, **kwargs)
    raise ValueError(f"schedule must be one of {list(SCHEDULES)} or a schedule object, got {schedule!r}")


def flow_loss_weight(scheme: str = "none", num_train_timesteps: int = 1000):
    """A ``sample_weight_fn(timesteps)`` for flow matching from diffusers' SD3 loss weightings.

    ``scheme``: ``"none"`` (ones), ``"sigma_sqrt"`` (``sigma^-2``) or ``"cosmap"``. The returned
    function maps ``[B]`` flow timesteps (``num_train_timesteps * sigma``) to ``[B]`` float32 weights.
    """
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    if scheme not in ("none", "sigma_sqrt", "cosmap"):
        raise ValueError(f"scheme must be one of ['cosmap', 'none', 'sigma_sqrt'], got {scheme!r}")

    def weight(timesteps: Tensor) -> Tensor:
        return compute_loss_weighting_for_sd3(scheme, timesteps.float() / num_train_timesteps).float()

    return weight
