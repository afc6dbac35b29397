"""Supervised fine-tuning on the chosen samples: the plain diffusion loss, no reference (the paper's SFT row).

Same noise and timestep draws as :class:`pgdpo.step.PreferenceStep` (the schedule noises both halves
from one generator), but the policy runs on the chosen half only: one forward of ``B`` samples.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from ..diffusion import make_schedule
from ..models import adapter_for, enable_checkpointing
from ..models import disable_dropout as _disable_dropout
from ..step import PreferenceStep, StepOutput


class SFTStep:
    """``step(batch, generator) -> StepOutput`` with loss ``mean_b w_b mean_S (pred_w - target_w)^2``.

    ``stats`` has ``mse_policy_chosen`` (``[B]``) and ``loss`` (per-pair, before ``sample_weight``).
    ``disable_dropout`` (default True) sets the policy's dropout to 0, as :class:`PreferenceStep` does.
    """

    def __init__(self, policy: nn.Module, schedule: str = "flow", *,
                 sample_weight_fn: Callable[[Tensor], Tensor] | None = None,
                 schedule_options: dict | None = None, attention_backend: str | None = None,
                 checkpointing: int = 0, autocast_dtype: torch.dtype | None = None,
                 disable_dropout: bool = True):
        from ..attention import set_attention_backend

        if not isinstance(disable_dropout, bool):
            raise TypeError(f"disable_dropout must be a bool, got {disable_dropout!r}")
        if disable_dropout:  # as in PreferenceStep: SFT compares runs, so no random thinning by default
            _disable_dropout(policy)

        self.adapter = adapter_for(policy)
        self.policy = policy
        self.schedule = make_schedule(schedule, **(schedule_options or {}))
        self.sample_weight_fn = sample_weight_fn
        self.autocast_dtype = autocast_dtype
        self.reference = None
        self._flops_cache: dict = {}
        if attention_backend is not None:
            set_attention_backend(policy, attention_backend)
        self.checkpointed_blocks = enable_checkpointing(policy, checkpointing) if checkpointing else []

    def validate_batch(self, batch: Mapping) -> None:
        PreferenceStep.validate_batch(self, batch)  # same keys, shapes and device checks

    def __call__(self, batch: Mapping, generator: torch.Generator | None = None) -> StepOutput:
        self.validate_batch(batch)
        a = self.adapter
        chosen = batch["chosen"]
        b = chosen.shape[0]
        pairs = self.schedule.noise_pairs(chosen, batch["rejected"], generator)
        noisy = pairs.noisy[:b].to(a.input_dtype(self.policy))
        ctx = (torch.autocast(chosen.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
               else contextlib.nullcontext())
        with ctx:
            pred = a.predict(self.policy, noisy, pairs.model_timesteps[:b], batch, paired=False)
        mse = (pred.float() - pairs.target[:b].float()).square().flatten(1).mean(1)
        weight = None
        if self.sample_weight_fn is not None:
            weight = self.sample_weight_fn(pairs.timesteps).detach().float().to(mse.device)
        loss = (mse * weight).mean() if weight is not None else mse.mean()
        stats = {"mse_policy_chosen": mse.detach(), "loss": mse.detach()}
        tokens = b * a.tokens_per_sample(chosen.shape)
        return StepOutput(loss=loss, stats=stats, timesteps=pairs.timesteps, sigmas=pairs.sigmas,
                          sample_weight=weight, num_pairs=b, num_samples=b, tokens=tokens,
                          model_flops=3 * b * self._flops(batch))

    def _flops(self, batch: Mapping) -> int:
        """Forward FLOPs per sample (policy forward + backward = 3 of them per sample; no reference)."""
        image = batch.get("encoder_hidden_states_image")
        key = (tuple(batch["chosen"].shape[1:]), batch["encoder_hidden_states"].shape[1],
               image.shape[1] if isinstance(image, Tensor) else 0)
        if key not in self._flops_cache:
            self._flops_cache[key] = self.adapter.forward_flops_per_sample(*key)
        return self._flops_cache[key]
