"""One PG-DPO preference step on a video diffusion model: noise, two forwards, the loss (``docs/loss.md``).

    batch = {"chosen": [B, C, F, H, W], "rejected": [B, C, F, H, W], "encoder_hidden_states": [B, L, D],
             # Wan image-to-video only:
             "image_condition": [B, 20, F, H, W], "encoder_hidden_states_image": [B, Li, image_dim]}
    out = PreferenceStep(policy, reference)(batch, generator)
    out.loss.backward()

The chosen and rejected latents of each pair get one noise draw and one timestep; the policy runs
once on the ``[2B]`` batch with grad, the reference once on the same inputs under ``torch.no_grad()``.
The reference is a frozen copy of the policy, or -- for a LoRA policy and ``reference=None`` -- the
policy itself with its adapters disabled, so no second copy of the weights is held.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..loss import PGDPOLoss, loss_with_options
from ..loss.options import LossOptions
from .data.compat import check_batch
from .diffusion import DDPMSchedule, FlowMatchingSchedule, NoisyPairs, make_schedule
from .models import adapter_for, unwrap_model
from .models import disable_dropout as _disable_dropout  # the name of PreferenceStep's switch too
from .prepare import PrepareOptions, prepare


@dataclass
class StepOutput:
    """Result of one :class:`PreferenceStep` call.

    Attributes:
        loss: the PG-DPO loss (scalar fp32; ``[B]`` with ``reduction="none"``); backward reaches the policy.
        stats: ``pgdpo.STAT_NAMES`` -> ``[B]`` per-pair statistics (detached).
        timesteps: ``[B]`` timestep of each pair in the model's units (flow: ``1000 sigma``).
        sigmas: ``[B]`` noise level of each pair (flow sigma; DDPM ``sqrt(1 - alpha_bar)``).
        sample_weight: ``[B]`` weights fed to the loss, or None.
        num_pairs: ``B``. num_samples: ``2B`` (samples per model forward).
        tokens: tokens in the policy forward, ``2B * tokens_per_sample`` (the throughput unit).
        model_flops: FLOPs of the step without recompute: policy forward + backward (3 forwards) and
            the reference forward (1), i.e. ``4 * 2B * forward_flops_per_sample`` (the MFU numerator).
    """

    loss: Tensor
    stats: dict[str, Tensor]
    timesteps: Tensor
    sigmas: Tensor
    sample_weight: Tensor | None
    num_pairs: int
    num_samples: int
    tokens: int
    model_flops: int


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` carries peft LoRA (or other tuner) layers: diffusers ``add_adapter`` or peft."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run ``model`` as its base network: adapters off inside the block, back on after."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        with model.disable_adapter():
            yield
        return
    base = unwrap_model(model)
    if not getattr(base, "_hf_peft_config_loaded", False):
        raise ValueError(f"{type(base).__name__} has no adapters added through diffusers' add_adapter or "
                         "peft's get_peft_model; cannot disable them")
    base.disable_adapters()
    try:
        yield
    finally:
        base.enable_adapters()


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode inside the block (the reference pass must not apply dropout, e.g. UNet3D's temporal
    convolutions use p=0.1), the model's own train/eval flags restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with ``requires_grad=False`` on every parameter."""
    return copy.deepcopy(model).requires_grad_(False).eval()


class DiffusionStep:
    """What every training step on a diffusion model shares; :class:`PreferenceStep` and
    :class:`pgdpo.train.sft.SFTStep` are built on it.

    The batch check (:func:`pgdpo.train.data.compat.check_batch`), the autocast context, the noising of a pair
    (:meth:`noise_inputs`: one noise draw and one timestep per pair from ``generator``), the policy's
    prediction (:meth:`policy_prediction`), the per-pair sample weights and the per-sample forward FLOP
    count (cached per batch shape). Subclasses build the policy's speed switches and define ``__call__``.

    Args: ``policy``, ``schedule``, ``sample_weight_fn``, ``schedule_options``, ``autocast_dtype`` and
    ``disable_dropout`` as in :class:`PreferenceStep`.
    """

    def __init__(self, policy: nn.Module, schedule: str | FlowMatchingSchedule | DDPMSchedule = "flow", *,
                 sample_weight_fn: Callable[[Tensor], Tensor] | None = None,
                 schedule_options: dict | None = None, autocast_dtype: torch.dtype | None = None,
                 disable_dropout: bool = True):
        if not isinstance(policy, nn.Module):
            raise TypeError(f"policy must be an nn.Module, got {type(policy).__name__}")
        if sample_weight_fn is not None and not callable(sample_weight_fn):
            raise TypeError(f"sample_weight_fn must be callable, got {type(sample_weight_fn).__name__}")
        _check_dtype("autocast_dtype", autocast_dtype)
        if not isinstance(disable_dropout, bool):
            raise TypeError(f"disable_dropout must be a bool, got {disable_dropout!r}")
        if disable_dropout:  # before a reference copy is taken, so the copy has none either
            _disable_dropout(policy)
        self.adapter = adapter_for(policy)
        self.policy = policy
        self.schedule = make_schedule(schedule, **(schedule_options or {}))
        self.sample_weight_fn = sample_weight_fn
        self.autocast_dtype = autocast_dtype
        self.reference = None
        self._flops_cache: dict = {}

    # ------------------------------------------------------------------------------------------ batch

    def validate_batch(self, batch: Mapping) -> None:
        """Raise a clear error naming the bad key when ``batch`` does not fit the policy."""
        check_batch(self.adapter, batch, _model_device(self.policy))

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def noise_inputs(self, batch: Mapping, generator: torch.Generator | None = None) -> NoisyPairs:
        """Check ``batch``, then noise its pairs: ``[2B]`` noisy inputs (chosen half first), targets,
        timesteps; ``generator`` drives the timestep and noise draws (reproducible steps)."""
        self.validate_batch(batch)
        return self.schedule.noise_pairs(batch["chosen"], batch["rejected"], generator)

    def policy_prediction(self, pairs: NoisyPairs, batch: Mapping, *, chosen_only: bool = False) -> Tensor:
        """The policy's prediction on ``pairs`` (with grad where grad is enabled): ``[2B, C, F, H, W]``,
        or ``[B, ...]`` of the chosen half with ``chosen_only``."""
        a = self.adapter
        noisy, t = pairs.noisy, pairs.model_timesteps
        if chosen_only:
            b = batch["chosen"].shape[0]
            noisy, t = noisy[:b], t[:b]
        with self._autocast(noisy.device):
            return a.predict(self.policy, noisy.to(a.input_dtype(self.policy)), t, batch,
                             paired=not chosen_only)

    def sample_weights(self, pairs: NoisyPairs) -> Tensor | None:
        """``sample_weight_fn(timesteps)`` as a detached fp32 ``[B]`` tensor, or None without one."""
        if self.sample_weight_fn is None:
            return None
        b = pairs.timesteps.shape[0]
        weight = self.sample_weight_fn(pairs.timesteps)
        if not isinstance(weight, Tensor) or tuple(weight.shape) != (b,):
            got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight)
            raise ValueError(f"sample_weight_fn must return a [B={b}] tensor, got {got}")
        return weight.detach().float().to(pairs.timesteps.device)

    def _flops(self, batch: Mapping) -> int:
        """Forward FLOPs per sample for this batch's shapes (cached: the UNet count runs a meta forward)."""
        text_len = batch["encoder_hidden_states"].shape[1]
        image = batch.get("encoder_hidden_states_image")
        image_len = image.shape[1] if isinstance(image, Tensor) else 0
        key = (tuple(batch["chosen"].shape[1:]), text_len, image_len)
        if key not in self._flops_cache:
            self._flops_cache[key] = self.adapter.forward_flops_per_sample(key[0], text_len, image_len)
        return self._flops_cache[key]


class PreferenceStep(DiffusionStep):
    """Callable training step ``step(batch, generator=None) -> StepOutput`` for PG-DPO (and DPO).

    Args:
        policy: the trained diffusers model (``WanTransformer3DModel`` / ``UNet3DConditionModel``),
            possibly with LoRA adapters (diffusers ``add_adapter`` or peft ``get_peft_model``).
        reference: a frozen reference model (made ``requires_grad=False`` and eval here); ``"copy"``
            for a frozen deep copy of ``policy`` taken now; or None to use ``policy`` with its adapters
            disabled (requires adapters).
        schedule: ``"flow"`` (Wan), ``"ddpm-eps"``, ``"ddpm-v"``, or a schedule from
        ``pgdpo.train.diffusion``.
        loss: a :class:`PGDPOLoss` (its options and backend are used; statistics are always returned),
            or None for ``PGDPOLoss()`` (method "pgdpo", paper defaults, backend "auto").
        sample_weight_fn: optional ``fn(timesteps [B]) -> [B]`` per-pair weights (timestep-aware
            weighting, e.g. ``pgdpo.train.diffusion.flow_loss_weight("cosmap")``); passed as the loss's
            ``sample_weight``.
        schedule_options: keyword options of the schedule when ``schedule`` is a name (e.g. ``shift``).
        attention_backend: diffusers dispatcher backend for policy and reference: ``"native"``,
            ``"_native_flash"``, ``"flash"``, ``"xformers"``, ... (see ``pgdpo.train.models.attention``);
            None keeps
            the model's current one.
        checkpointing: activation checkpointing of the policy: None / 0 off, ``"every"`` or 1 every
            block, ``k`` every k-th block.
        weights_dtype: cast policy (and a copied / given reference) weights to this dtype, fp32-only
            modules kept fp32 (e.g. ``torch.bfloat16``). None leaves them as they are.
        autocast_dtype: run both forwards under ``torch.autocast`` in this dtype (fp32 master weights).
        compile: regionally ``torch.compile`` the repeated blocks of policy and reference.
        compile_options: keyword arguments of ``torch.compile`` (e.g. ``{"fullgraph": True}``).
        disable_dropout: set every dropout probability of policy and reference to 0 (default, as TRL's
            DPO trainer does): the policy runs in train mode and the reference in eval mode, so active
            dropout would bias ``d_w`` / ``d_l`` and make the loss random (see
            :func:`pgdpo.train.models.disable_dropout`). ``False`` keeps the models' dropout.

    A step is :meth:`noise_inputs`, :meth:`reference_prediction`, :meth:`policy_prediction` and
    :meth:`loss_on`; :mod:`pgdpo.train.gamma` reuses the same pieces.
    """

    def __init__(self, policy: nn.Module, reference: nn.Module | str | None = None,
                 schedule: str | FlowMatchingSchedule | DDPMSchedule = "flow", loss: PGDPOLoss | None = None,
                 *, sample_weight_fn: Callable[[Tensor], Tensor] | None = None,
                 schedule_options: dict | None = None, attention_backend: str | None = None,
                 checkpointing: int | str | None = None, weights_dtype: torch.dtype | None = None,
                 autocast_dtype: torch.dtype | None = None, compile: bool = False,
                 compile_options: dict | None = None, disable_dropout: bool = True):
        _check_dtype("weights_dtype", weights_dtype)
        if loss is None:
            loss = PGDPOLoss()
        if not isinstance(loss, PGDPOLoss):
            raise TypeError(f"loss must be a pgdpo.PGDPOLoss or None, got {type(loss).__name__}")
        super().__init__(policy, schedule, sample_weight_fn=sample_weight_fn,
                         schedule_options=schedule_options, autocast_dtype=autocast_dtype,
                         disable_dropout=disable_dropout)
        self.loss = loss
        every = _checkpoint_every(checkpointing)

        # The reference, made before any speed switch touches the policy so a copy is a plain model.
        if reference is None:
            if not has_adapters(policy):
                raise ValueError("reference=None needs a policy with LoRA adapters (diffusers add_adapter or "
                                 "peft get_peft_model), whose disabled state is the reference; for full "
                                 "fine-tuning pass reference='copy' or a frozen copy of the base model")
            self.reference = None
        else:
            if isinstance(reference, str):
                if reference != "copy":
                    raise ValueError(f"reference must be an nn.Module, 'copy' or None, got {reference!r}")
                reference = copy.deepcopy(policy)
            self.reference = self._freeze_reference(policy, reference)
            if disable_dropout:
                _disable_dropout(self.reference)
            if adapter_for(self.reference).family != self.adapter.family:
                raise ValueError(f"reference is a {adapter_for(self.reference).family} model but the policy "
                                 f"is a {self.adapter.family} model")

        # The speed switches: pgdpo.train.prepare, in its order (dropout is off already, see above).
        options = PrepareOptions(weights_dtype=weights_dtype, disable_dropout=False,
                                 attention_backend=attention_backend, checkpoint_every=every, compile=compile,
                                 compile_options=compile_options or {})
        self.checkpointed_blocks = prepare(policy, options).checkpointed_blocks
        if self.reference is not None:
            prepare(self.reference, options, trainable=False)

    # ------------------------------------------------------------------------------------------ setup

    @staticmethod
    def _freeze_reference(policy: nn.Module, reference: nn.Module) -> nn.Module:
        if not isinstance(reference, nn.Module):
            raise TypeError(f"reference must be an nn.Module, 'copy' or None, got {type(reference).__name__}")
        if reference is policy:
            raise ValueError("reference is the policy itself; pass reference=None to use the policy with its "
                             "LoRA adapters disabled, or a frozen copy of the base model")
        shared = {id(p) for p in policy.parameters()} & {id(p) for p in reference.parameters()}
        if shared:
            raise ValueError(f"reference shares {len(shared)} parameter tensors with the policy; freezing it "
                             "would freeze the policy too. Pass a separate copy (reference='copy')")
        return reference.requires_grad_(False).eval()

    def _models(self) -> list[nn.Module]:
        return [self.policy] + ([self.reference] if self.reference is not None else [])

    # ------------------------------------------------------------------------------------------- step

    def reference_prediction(self, pairs: NoisyPairs, batch: Mapping) -> Tensor:
        """The reference's prediction ``[2B, C, F, H, W]`` on ``pairs``, under ``torch.no_grad()`` (the
        frozen copy, or the policy with its adapters disabled and in eval mode)."""
        a = self.adapter
        noisy = pairs.noisy.to(a.input_dtype(self.policy))
        with torch.no_grad(), self._autocast(noisy.device):
            if self.reference is not None:  # its own input dtype: a replicated bf16 copy has no FSDP cast
                ref_noisy = noisy.to(a.input_dtype(self.reference))
                return a.predict(self.reference, ref_noisy, pairs.model_timesteps, batch)
            with adapters_disabled(self.policy), _eval_mode(self.policy):
                return a.predict(self.policy, noisy, pairs.model_timesteps, batch)

    def loss_on(self, pred: Tensor, ref_pred: Tensor, pairs: NoisyPairs, sample_weight: Tensor | None, *,
                options: LossOptions | None = None, return_stats: bool = False):
        """The step's loss (``self.loss``'s options and backend; ``options`` overrides the options, e.g. a
        DPO baseline) of the predictions on ``pairs``."""
        return loss_with_options(pred, ref_pred, pairs.target, options or self.loss.options,
                                 sample_weight=sample_weight, backend=self.loss.backend,
                                 return_stats=return_stats)

    def __call__(self, batch: Mapping, generator: torch.Generator | None = None) -> StepOutput:
        """One step: noise the pairs, run reference (no grad) and policy (grad), return the loss.

        ``generator`` drives the timestep and noise draws (reproducible steps).
        """
        pairs = self.noise_inputs(batch, generator)
        ref_pred = self.reference_prediction(pairs, batch)
        pred = self.policy_prediction(pairs, batch)
        sample_weight = self.sample_weights(pairs)
        loss, stats = self.loss_on(pred, ref_pred, pairs, sample_weight, return_stats=True)
        stats = {k: v.detach() for k, v in stats.items()}  # logging values; keep them off the graph
        chosen = batch["chosen"]
        b = chosen.shape[0]
        tokens_per_sample = self.adapter.tokens_per_sample(chosen.shape)
        return StepOutput(loss=loss, stats=stats, timesteps=pairs.timesteps, sigmas=pairs.sigmas,
                          sample_weight=sample_weight, num_pairs=b, num_samples=2 * b,
                          tokens=2 * b * tokens_per_sample, model_flops=4 * 2 * b * self._flops(batch))


def _check_dtype(name: str, dtype) -> None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{name} must be a floating-point torch.dtype or None, got {dtype!r}")


def _checkpoint_every(checkpointing) -> int:
    """0 (off) or k >= 1 (every k-th block) from the ``checkpointing`` argument."""
    if checkpointing is None or checkpointing is False or checkpointing == "none":
        return 0
    if checkpointing is True or checkpointing == "every":
        return 1
    if isinstance(checkpointing, int) and checkpointing >= 0:
        return checkpointing
    raise ValueError(f"checkpointing must be None/'none'/0 (off), 'every'/1 (every block) or an int k >= 1 "
                     f"(every k-th block), got {checkpointing!r}")


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    raise ValueError("the policy has no parameters")
