"""The resolved layout of a run: what a validated config means once the model and the processes are known.

One :class:`Layout` is computed once, by :func:`resolve_layout`, from a validated
:class:`~pgdpo.train.config.TrainConfig` and the number of processes, and read by the trainer,
``pgdpo plan`` and ``pgdpo export``. It is the one home of the rules that turn config keys into decisions:

- the architecture: ``model.path``'s ``config.json`` when a path is set, else the named config
  (``model.name``); the model family (:class:`~pgdpo.train.models.ModelSpec`) follows from it;
- the reference (:func:`reference_kind`): ``none`` for sft, ``ema`` for a copy with
  ``method.ref_ema_every > 0``, else ``method.reference`` (``copy`` or ``lora``);
- the strategy (:func:`resolve_strategy`): ``auto`` is FSDP2 over several processes, none on one;
- the mesh: ``replicate_degree`` replica groups of ``shard_degree = world / replicate_degree`` ranks
  (HSDP: FSDP2 shards inside a group, gradients are all-reduced across groups), ``sp_degree`` ranks per
  sequence-parallel group inside a shard group, ``dp_size = world / sp_degree`` data-parallel groups;
- the batch: micro-batches per optimiser step on each rank (``grad_accum``);
- activation checkpointing (:func:`resolve_checkpointing`): every ``checkpoint_every``-th block, or off;
  ``model.gradient_checkpointing: auto`` (the default) is on for a model of at least
  :data:`AUTO_CHECKPOINTING_PARAMETERS` parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass

from .config import ConfigError, TrainConfig
from .models import ModelSpec, count_parameters, read_model_config, resolve_config, spec_for

#: what the reference of a run is: a frozen copy, an EMA copy, the policy with its LoRA adapters off, none
REFERENCE_KINDS = ("copy", "ema", "lora", "none")


def reference_kind(config: TrainConfig) -> str:
    """``none`` (sft), ``ema`` (``method.reference: copy``, ``ref_ema_every > 0``), ``copy`` or ``lora``."""
    method = config.method
    if method.name == "sft":
        return "none"
    if method.reference == "copy" and method.ref_ema_every > 0:
        return "ema"
    return method.reference


def resolve_strategy(strategy: str, world_size: int, sp_degree: int = 1, replicate_degree: int = 1) -> str:
    """``distributed.strategy`` for ``world_size`` processes: ``auto`` is ``fsdp`` with several, ``none``
    with one; a ``ConfigError`` for a combination that cannot run."""
    if strategy == "auto":
        strategy = "fsdp" if world_size > 1 else "none"
    if strategy == "none" and world_size > 1:
        raise ConfigError(f"distributed.strategy: none cannot run {world_size} processes; use fsdp or ddp")
    if sp_degree > 1 and strategy != "fsdp":
        raise ConfigError(f"distributed.sp_degree: {sp_degree} needs distributed.strategy: fsdp (or auto "
                          f"with several processes), got {strategy}")
    if replicate_degree > 1 and strategy != "fsdp":
        raise ConfigError(f"distributed.replicate_degree: {replicate_degree} (HSDP) needs "
                          f"distributed.strategy: fsdp (or auto with several processes), got {strategy}")
    return strategy


def check_mesh(world_size: int, sp_degree: int, replicate_degree: int) -> int:
    """The shard-group size ``world_size / replicate_degree``; a ``ConfigError`` naming the key unless the
    replica groups divide the processes and the sequence-parallel groups divide a shard group (the one
    home of these rules: the trainer, the planner and export all resolve a :class:`Layout`)."""
    if world_size % replicate_degree:
        raise ConfigError(f"distributed.replicate_degree ({replicate_degree}) must divide the number of "
                          f"processes ({world_size})")
    shard_degree = world_size // replicate_degree
    if shard_degree % sp_degree and replicate_degree == 1:
        raise ConfigError(f"distributed.sp_degree ({sp_degree}) must divide the number of processes "
                          f"({world_size})")
    if shard_degree % sp_degree:
        raise ConfigError(f"distributed.sp_degree ({sp_degree}) must divide the processes of a shard group "
                          f"({shard_degree} = {world_size} processes / replicate_degree {replicate_degree})")
    return shard_degree


#: ``model.gradient_checkpointing: auto`` turns activation checkpointing on from this many parameters.
#: Why 100M: below it a whole fp32 full fine-tuning (weights, gradients, AdamW: 16 B/param) needs under
#: 1.6 GB and the activations of the videos such a model trains on are tens of MB, so recompute's extra
#: forward (~1/3 of a step) buys nothing; from it up, the saved activations are a term of their own: the
#: 304M-parameter, 6-block Wan of bench/run_memory.py peaks at 1.10x its fp32 size per rank without
#: checkpointing and 1.00x with it, at only 80 tokens per video, and a Wan2.1 1.3B / 14B block saves GBs
#: per 480p video (``pgdpo plan``). Every named Wan2.1 model (1.3B, 14B) is above it, the tiny test
#: models (25K-200K parameters) far below.
AUTO_CHECKPOINTING_PARAMETERS = 100_000_000


@functools.lru_cache(maxsize=32)
def _parameters(arch_json: str) -> int:
    return count_parameters(spec_for(json.loads(arch_json)).build(device="meta"))


def model_parameters(arch: dict) -> int:
    """Parameters of the model of config ``arch`` (counted on the meta device: no memory, ~0.3 s for 14B)."""
    return _parameters(json.dumps(arch, sort_keys=True, default=str))


def resolve_checkpointing(setting: bool | str, arch: dict) -> bool:
    """Whether activation checkpointing is on: ``model.gradient_checkpointing`` true / false as given,
    ``auto`` from :data:`AUTO_CHECKPOINTING_PARAMETERS` (the one home of the rule)."""
    if setting == "auto":
        return model_parameters(arch) >= AUTO_CHECKPOINTING_PARAMETERS
    return bool(setting)


def pretrained_config(path: str) -> dict:
    """The ``config.json`` of the diffusers model at ``path`` (a model or pipeline folder); a
    ``ConfigError`` naming ``model.path`` when there is none."""
    try:
        return read_model_config(path, what="model.path")
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def model_architecture(config: TrainConfig) -> dict:
    """The model's config: ``model.path``'s ``config.json`` when a path is set, else ``model.name``'s."""
    return pretrained_config(config.model.path) if config.model.path else resolve_config(config.model.name)


@dataclass(frozen=True)
class Layout:
    """What a run is, once resolved (see the module doc). ``arch`` is the model's config dict."""

    arch: dict
    #: model.path, or model.name without one
    model: str
    family: str
    reference: str
    world_size: int
    strategy: str
    sp_degree: int
    #: HSDP replica groups (1: plain FSDP2) and the ranks of one shard group (world / replicate_degree)
    replicate_degree: int
    shard_degree: int
    dp_size: int
    batch_size: int
    micro_batch_size: int
    grad_accum: int
    #: checkpoint every k-th block; None: activation checkpointing off
    checkpoint_every: int | None
    precision: str
    lora_rank: int
    lora_targets: tuple[str, ...]

    @property
    def spec(self) -> ModelSpec:
        return spec_for(self.arch)

    @property
    def with_reference_copy(self) -> bool:
        """Whether a second model (a frozen or EMA copy) is built for the reference."""
        return self.reference in ("copy", "ema")

    def resume_problem(self, trainer_state: dict) -> str | None:
        """Why a checkpoint's ``trainer_state.json`` cannot continue in this layout, or None."""
        saved_sp = trainer_state.get("sp_degree", 1)
        if saved_sp != self.sp_degree:
            return (f"written with distributed.sp_degree {saved_sp}, this run has {self.sp_degree}: the "
                    "data shards and noise streams follow the data-parallel groups; resume with the same "
                    "sp_degree")
        saved_accum = trainer_state.get("grad_accum")
        saved_world = trainer_state.get("world_size", self.world_size)
        if saved_world == self.world_size and saved_accum != self.grad_accum:
            return (f"written with {saved_accum} micro-batches per step per rank, this run has "
                    f"{self.grad_accum} (train.batch_size / micro_batch_size); resume with the same batch "
                    "settings")
        saved_batch = trainer_state.get("batch_size")
        if saved_world != self.world_size and saved_batch is None:
            saved_batch = saved_accum * (saved_world // saved_sp) * self.micro_batch_size  # (older files)
        if saved_batch is not None and saved_batch != self.batch_size:
            return (f"written with train.batch_size {saved_batch} pairs per step, this run has "
                    f"{self.batch_size}; resume with the same train.batch_size (the LR schedule, the data "
                    "position and the noise seeds count whole steps of it)")
        return None

    def resume_changes(self, trainer_state: dict) -> list[str]:
        """What differs from the uninterrupted run when a checkpoint written by another number of processes
        or another HSDP mesh resumes in this layout (one sentence each, for the log); [] for the same. The
        one home of these rules: docs/resume.md explains them."""
        changes = []
        saved_replicate = trainer_state.get("replicate_degree", 1)
        if saved_replicate != self.replicate_degree:
            changes.append(f"written with distributed.replicate_degree {saved_replicate}, this run has "
                           f"{self.replicate_degree}: DCP re-shards the weights and optimizer states onto "
                           "this mesh; the data order and the noise streams (per data-parallel group) are "
                           "unchanged")
        saved_world = trainer_state.get("world_size", self.world_size)
        if saved_world == self.world_size:
            return changes
        saved_dp = saved_world // trainer_state.get("sp_degree", 1)
        saved_accum = trainer_state.get("grad_accum")
        saved_micro = trainer_state.get("micro_batch_size", self.micro_batch_size)
        exact_noise = saved_micro == self.micro_batch_size == 1
        noise = ("each pair keeps the noise and timestep it had in the uninterrupted run (seeded by its "
                 "place in the step)" if exact_noise else
                 "the pairs are grouped into micro-batches differently (micro_batch_size > 1), so their "
                 "noise and timesteps differ from the uninterrupted run's")
        return changes + [
            f"written by {saved_world} processes ({saved_dp} data-parallel x {saved_accum} micro-batch(es) "
            f"of {saved_micro} per step), this run has {self.world_size} ({self.dp_size} x {self.grad_accum} "
            f"of {self.micro_batch_size}): DCP reshards the model and optimiser state",
            f"continuing exactly: the step count, the LR schedule, train.batch_size {self.batch_size} pairs "
            "per step and the order of the pairs (the data position is a global pair index); " + noise,
            "changing: gradients and statistics are summed over ranks and micro-batches in another order "
            "(losses agree with the uninterrupted run's to rounding, not bitwise); a rank the checkpoint's "
            "run did not have seeds its global RNGs from seed + rank (the training step draws nothing from "
            "them with model.disable_dropout)",
        ]

    def as_dict(self) -> dict:
        """The layout without the architecture dict, for reports and comparisons."""
        out = dataclasses.asdict(self)
        out.pop("arch")
        out["lora_targets"] = list(self.lora_targets)
        return out


def resolve_layout(config: TrainConfig, world_size: int = 1, *, arch: dict | None = None,
                   exact_batch: bool = True) -> Layout:
    """The :class:`Layout` of ``config`` (validated) on ``world_size`` processes. ``arch``: the model's
    config when the caller has read it already (else read from ``model.path`` / ``model.name``).
    ``exact_batch=False`` (the planner, which reports it instead): a ``train.batch_size`` that is not a
    multiple of ``micro_batch_size x dp_size`` is rounded up to whole micro-batches, not refused."""
    d, m = config.distributed, config.model
    shard_degree = check_mesh(world_size, d.sp_degree, d.replicate_degree)  # (as init_distributed: first)
    strategy = resolve_strategy(d.strategy, world_size, d.sp_degree, d.replicate_degree)
    dp_size = world_size // d.sp_degree
    arch = model_architecture(config) if arch is None else arch
    checkpointing = resolve_checkpointing(m.gradient_checkpointing, arch)
    return Layout(arch=arch, model=m.path or m.name, family=spec_for(arch).family,
                  reference=reference_kind(config), world_size=world_size, strategy=strategy,
                  sp_degree=d.sp_degree, replicate_degree=d.replicate_degree, shard_degree=shard_degree,
                  dp_size=dp_size, batch_size=config.train.batch_size,
                  micro_batch_size=config.train.micro_batch_size,
                  grad_accum=config.grad_accum(dp_size) if exact_batch else max(1, math.ceil(
                      config.train.batch_size / (config.train.micro_batch_size * dp_size))),
                  checkpoint_every=m.checkpoint_every if checkpointing else None,
                  precision=m.precision, lora_rank=m.lora_rank, lora_targets=tuple(m.lora_targets))
