"""Supervised fine-tuning on the chosen samples: the plain diffusion loss, no reference (the paper's SFT row).

Same noise and timestep draws as :class:`pgdpo.train.step.PreferenceStep` (the schedule noises both halves
from one generator), but the policy runs on the chosen half only: one forward of ``B`` samples. The batch
check, noising, policy prediction, sample weights and FLOP count are
:class:`pgdpo.train.step.DiffusionStep`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from .prepare import PrepareOptions, prepare
from .step import DiffusionStep, StepOutput


class SFTStep(DiffusionStep):
    """``step(batch, generator) -> StepOutput`` with loss ``mean_b w_b mean_S (pred_w - target_w)^2``.

    ``stats`` has ``mse_policy_chosen`` (``[B]``) and ``loss`` (per-pair, before ``sample_weight``).
    ``disable_dropout`` (default True) sets the policy's dropout to 0, as :class:`PreferenceStep` does.
    """

    def __init__(self, policy: nn.Module, schedule: str = "flow", *,
                 sample_weight_fn: Callable[[Tensor], Tensor] | None = None,
                 schedule_options: dict | None = None, attention_backend: str | None = None,
                 checkpointing: int = 0, autocast_dtype: torch.dtype | None = None,
                 disable_dropout: bool = True):
        super().__init__(policy, schedule, sample_weight_fn=sample_weight_fn,
                         schedule_options=schedule_options, autocast_dtype=autocast_dtype,
                         disable_dropout=disable_dropout)
        # the speed switches: pgdpo.train.prepare (dropout is off already, see above)
        options = PrepareOptions(disable_dropout=False, attention_backend=attention_backend,
                                 checkpoint_every=checkpointing or 0)
        self.checkpointed_blocks = prepare(policy, options).checkpointed_blocks

    def __call__(self, batch: Mapping, generator: torch.Generator | None = None) -> StepOutput:
        pairs = self.noise_inputs(batch, generator)
        chosen = batch["chosen"]
        b = chosen.shape[0]
        pred = self.policy_prediction(pairs, batch, chosen_only=True)
        mse = (pred.float() - pairs.target[:b].float()).square().flatten(1).mean(1)
        weight = self.sample_weights(pairs)
        loss = (mse * weight).mean() if weight is not None else mse.mean()
        stats = {"mse_policy_chosen": mse.detach(), "loss": mse.detach()}
        tokens = b * self.adapter.tokens_per_sample(chosen.shape)
        # policy forward + backward = 3 forwards per sample; no reference
        return StepOutput(loss=loss, stats=stats, timesteps=pairs.timesteps, sigmas=pairs.sigmas,
                          sample_weight=weight, num_pairs=b, num_samples=b, tokens=tokens,
                          model_flops=3 * b * self._flops(batch))
