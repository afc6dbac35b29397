"""Training configuration: typed dataclasses, loaded from YAML and ``--dotted.key value`` overrides.

Every key is checked: a misspelt key is an error naming it (with the closest valid key), a value of the
wrong type or out of range is an error naming the key and the value. YAML is read with
``yaml.safe_load``. ``TrainConfig.to_dict()`` gives back a plain dict (written next to the checkpoints).

One schema, one validation: the dataclasses below are the schema (``pgdpo train --help`` lists every key
with its default); a field's type and ``metadata`` (``choices``, ``min``/``max``/``gt``/``lt``) are checked
as it is set, :meth:`TrainConfig.validate` does the cross-field checks and runs the loss's own validator
on the ``method`` fields marked ``LOSS``. Everything is checked before any weight is read, and the
trainer, ``pgdpo plan`` and ``pgdpo export`` all read configs through :func:`load_config` /
:func:`from_dict`. Adding a key is adding a field (plus, for a loss keyword, ``**LOSS`` in its metadata).

Sections: output_dir, seed, device (top level); model, data, method, optim, train, distributed,
checkpoint, logging, validation.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from ..loss import PGDPOLoss
from ..loss.options import BACKENDS as LOSS_BACKENDS
from ..loss.options import IPR_TARGETS, MARGINS, WEIGHTINGS
from ..loss.options import METHODS as LOSS_METHODS
from .diffusion import SCHEDULES
from .models import MODEL_CONFIGS

#: what `method.name` trains: the loss's methods (pgdpo.loss.options.METHODS) and the SFT baseline
METHODS = (*LOSS_METHODS, "sft")
#: `method.reference`: a frozen copy of the policy, or the LoRA policy with its adapters disabled
REFERENCES = ("copy", "lora")
PRECISIONS = ("fp32", "bf16")
STRATEGIES = ("auto", "fsdp", "ddp", "none")
DIST_BACKENDS = ("auto", "nccl", "gloo")
DEVICES = ("auto", "cpu", "cuda")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
TIMESTEP_WEIGHTINGS = ("none", "inverse-std")
TRACKERS = ("tensorboard", "wandb")


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key."""


def _choice(*choices):
    return {"choices": choices}


#: field metadata of a MethodConfig key that is a keyword of ``pgdpo.PGDPOLoss`` (passed on as it is and
#: validated by the loss's own ``LossOptions`` at config load): a new loss option is one field here.
LOSS = {"loss": True}


@dataclass
class ModelConfig:
    #: a name of ``pgdpo.train.models.MODEL_CONFIGS`` (architecture; random init seeded by ``seed``)
    name: str = "tiny-wan-t2v"
    #: local diffusers folder with pretrained weights (``pgdpo.train.models.load_model``); None = random init
    path: str | None = None
    #: "bf16": FSDP2 MixedPrecisionPolicy (bf16 compute, fp32 master weights and gradient reduction) on
    #: GPU; CPU runs compute in fp32 unless PGDPO_CPU_BF16=1 (pgdpo.train.distributed)
    precision: str = field(default="bf16", metadata=_choice(*PRECISIONS))
    #: diffusers attention backend (``set_attention_backend``): native, _native_flash, flash, xformers
    attention: str | None = None
    #: activation checkpointing of the transformer blocks: true | false | auto (on for a model of at least
    #: ``pgdpo.train.layout.AUTO_CHECKPOINTING_PARAMETERS`` parameters: the Wan2.1 models, not the tiny ones)
    gradient_checkpointing: bool | str = field(default="auto", metadata=_choice(True, False, "auto"))
    #: with gradient_checkpointing: recompute every this many blocks (1: all; k: blocks 0, k, 2k, ... and
    #: the others keep their activations: less recompute, more memory; `pgdpo plan` models both)
    checkpoint_every: int = field(default=1, metadata={"min": 1})
    #: 0: full fine-tuning; > 0: LoRA adapters of this rank (only they are trained)
    lora_rank: int = field(default=0, metadata={"min": 0})
    #: LoRA scale numerator (None = lora_rank)
    lora_alpha: float | None = None
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    #: dropout probabilities of policy and reference set to 0 (as TRL's DPO trainer does): the policy runs
    #: in train mode and the reference in eval mode, so active dropout (UNet3D's temporal convolutions
    #: hard-code 0.1) would bias d_w / d_l and make the loss random from call to call
    disable_dropout: bool = True


@dataclass
class DataConfig:
    #: dataset folder (dataset.json, index.jsonl, safetensors shards); "{output_dir}" is replaced by the
    #: output folder; other relative paths are relative to the working directory
    path: str = "{output_dir}/data"
    #: write a synthetic dataset (``pgdpo data synth``) at ``path`` when it does not exist
    synthesize: bool = False
    #: random (noise latents, rejected = noisier chosen) | motion (a blob moving the prompt's way in
    #: chosen, another way or jittering in rejected: a preference to learn; pgdpo.train.data.synth)
    #: motion-mix: the first clip of half the pairs moves, of the others jitters (SFT data of the demo's
    #: base model, which then does both)
    #: motion-wrong: rejected moves another way instead of jittering
    synth_kind: str = field(default="random", metadata=_choice("random", "motion", "motion-wrong",
                                                                "motion-mix"))
    #: pairs in the synthetic dataset
    synth_pairs: int = field(default=64, metadata={"min": 1})
    #: synthetic rejected = sqrt(1 - d^2) chosen + d noise (d in [0, 1])
    synth_difference: float = field(default=0.5, metadata={"min": 0, "max": 1})
    #: video size in pixels (the latents are /8 in space, (frames-1)/4+1 in time); the planner reads these
    height: int = field(default=480, metadata={"min": 8})
    width: int = field(default=832, metadata={"min": 8})
    frames: int = field(default=81, metadata={"min": 1})
    #: text tokens per prompt (synthetic data)
    text_len: int = field(default=512, metadata={"min": 1})
    #: reshuffle the pairs every epoch (deterministically from ``seed`` and the epoch)
    shuffle: bool = True


@dataclass
class MethodConfig:
    #: pgdpo | dpo | ars | ipr (the PG-DPO loss, paper Tab. 2 rows) | sft (diffusion MSE on chosen)
    name: str = field(default="pgdpo", metadata=_choice(*METHODS))
    beta: float = field(default=100.0, metadata={"gt": 0, **LOSS})
    k1: float = field(default=10.0, metadata={"min": 0, **LOSS})
    k2: float = field(default=10.0, metadata={"min": 0, **LOSS})
    #: margin denominator guard; 0 would make the margin 0/0 at initialisation (policy == reference)
    eps: float = field(default=1e-6, metadata={"gt": 0, **LOSS})
    ipr_target: str = field(default="anchor", metadata={**_choice(*IPR_TARGETS), **LOSS})
    weighting: str = field(default="sample", metadata={**_choice(*WEIGHTINGS), **LOSS})
    #: normalised margin: signed (the paper's Eq. 7) | abs (the reward-margin sign); docs/margin.md
    margin: str = field(default="signed", metadata={**_choice(*MARGINS), **LOSS})
    #: relative guard of the margin's denominator, eps + eps_rel * MSE_ref (0 = the paper's); docs/margin.md
    eps_rel: float = field(default=0.0, metadata={"min": 0, **LOSS})
    #: adapt K1 / K2 each step to keep alpha / gamma in the paper's ranges
    # (pgdpo.train.diagnostics.K1K2Controller;
    #: its state is checkpointed); off by default
    k_controller: bool = False
    detach_weights: bool = field(default=True, metadata=LOSS)
    #: loss backend: auto (triton on CUDA, fused C++ on CPU), triton, cpu, torch
    backend: str = field(default="auto", metadata={**_choice(*LOSS_BACKENDS), **LOSS})
    #: noise schedule: flow (Wan, flow matching) | ddpm-eps | ddpm-v (VideoCrafter2-style UNets)
    schedule: str = field(default="flow", metadata=_choice(*SCHEDULES))
    #: flow schedule: timestep shift (Wan2.1: 3.0 at 480p, 5.0 at 720p) and the density of the draws
    flow_shift: float = field(default=3.0, metadata={"gt": 0})
    flow_density: str = field(default="logit_normal", metadata=_choice("logit_normal", "uniform", "mode"))
    #: reference: copy (a frozen copy of the initial policy) | lora (the policy with adapters off)
    reference: str = field(default="copy", metadata=_choice(*REFERENCES))
    #: every this many optimiser steps the reference moves toward the policy (0 = frozen; needs copy)
    ref_ema_every: int = field(default=0, metadata={"min": 0})
    #: ref <- (1 - rate) ref + rate policy at each update
    ref_ema_rate: float = field(default=0.05, metadata={"gt": 0, "max": 1})
    #: timestep-aware weighting of the pairs (arXiv 2505.18736): none | inverse-std (1 / running std
    #: of the reward signal in the timestep's bin, normalised to mean 1 over the batch)
    timestep_weighting: str = field(default="none", metadata=_choice(*TIMESTEP_WEIGHTINGS))
    timestep_bins: int = field(default=10, metadata={"min": 1})
    timestep_momentum: float = field(default=0.9, metadata={"min": 0, "lt": 1})


@dataclass
class OptimConfig:
    name: str = field(default="adamw", metadata=_choice("adamw"))
    lr: float = field(default=1e-6, metadata={"gt": 0})
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = field(default=0.0, metadata={"min": 0})
    eps: float = field(default=1e-8, metadata={"gt": 0})
    #: clip the global gradient norm to this (0 = no clipping; the norm is still logged)
    grad_clip: float = field(default=1.0, metadata={"min": 0})
    #: diffusers.optimization.get_scheduler name
    scheduler: str = field(default="constant_with_warmup", metadata=_choice(*LR_SCHEDULERS))
    warmup_steps: int = field(default=0, metadata={"min": 0})


@dataclass
class TrainLoopConfig:
    max_steps: int = field(default=3000, metadata={"min": 1})
    #: preference pairs per optimiser step over all ranks (= micro_batch_size x ranks x accumulation)
    batch_size: int = field(default=16, metadata={"min": 1})
    #: pairs per forward per rank
    micro_batch_size: int = field(default=1, metadata={"min": 1})
    #: write a metrics line / tracker point every this many steps
    log_every: int = field(default=1, metadata={"min": 1})


@dataclass
class DistributedConfig:
    #: auto: fsdp with several processes, none with one | fsdp (FSDP2 fully_shard) | ddp | none
    strategy: str = field(default="auto", metadata=_choice(*STRATEGIES))
    #: process-group backend: auto (nccl on GPU, gloo on CPU), nccl, gloo
    backend: str = field(default="auto", metadata=_choice(*DIST_BACKENDS))
    #: FSDP2: free the gathered parameters after each block's forward (ZeRO-3); False keeps them (ZeRO-2)
    reshard_after_forward: bool = True
    #: ranks per sequence-parallel group (Ulysses attention, Wan only; pgdpo.train.parallel): each video's
    #: tokens are split over this many consecutive ranks, which run the same pairs; must divide the
    #: processes, the attention heads and the tokens per video. 1: plain data parallelism
    sp_degree: int = field(default=1, metadata={"min": 1})
    #: HSDP (FSDP2 on a (replicate, shard) mesh): the processes form this many replica groups of
    #: world / replicate_degree consecutive ranks (one node's GPUs, typically); parameters are sharded inside
    #: a group (all-gathers on the fast intra-node link) and gradients all-reduced across groups (one
    #: inter-node all-reduce per step). Sequence-parallel groups lie inside a shard group. 1: plain FSDP2
    replicate_degree: int = field(default=1, metadata={"min": 1})
    #: FSDP2 CPUOffloadPolicy: the policy's sharded fp32 weights, gradients and AdamW states live in host
    #: memory (copied to the GPU block by block for the forward and backward; the optimiser step runs on
    #: the CPU). Saves 16 bytes per parameter / ranks of GPU memory for host memory and PCIe time
    cpu_offload: bool = False
    #: the frozen reference sharded like the policy (True) or a full copy on every rank (False: no
    #: all-gathers in its forward, at 2 bytes per parameter of memory; when it fits)
    reference_sharded: bool = True


@dataclass
class CheckpointConfig:
    #: save every this many optimiser steps (0 = only at the end)
    save_every: int = field(default=500, metadata={"min": 0})
    #: DCP async_save: the shards are copied to host memory and written in the background while training
    #: goes on; the checkpoint is renamed into place (complete) once every rank's write has finished
    async_save: bool = False
    #: keep the newest this many complete checkpoints (0 = keep all)
    keep_last: int = field(default=3, metadata={"min": 0})
    #: "latest" (newest complete checkpoint in output_dir; fresh start when there is none) or a path; a
    #: restarted worker group of a torchrun --max-restarts launch resumes from its own latest checkpoint
    #: whatever this says (docs/resume.md)
    resume: str | None = None
    #: without resume, a previous run in output_dir is moved to output_dir/previous-<n>; overwrite: it is
    #: replaced instead (its checkpoints are deleted when the first new one is written)
    overwrite: bool = False


@dataclass
class LoggingConfig:
    #: accelerate trackers: tensorboard, wandb (wandb only when installed)
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    run_name: str = "pgdpo"
    #: PNG plots (loss, alpha/gamma, likelihood proxies) in output_dir at the end
    plots: bool = True
    #: tqdm progress bar on rank 0
    progress: bool = True
    #: every this many steps: the likelihood probe and Eq. 10's Gamma on the step's batch (pgdpo.train.gamma;
    #: 2 extra policy forwards + backwards per measured step); 0 = off
    diagnostics_every: int = field(default=0, metadata={"min": 0})


@dataclass
class ValidationConfig:
    """Validation samples (pgdpo.train.validation): GIFs in output_dir/samples/, a before/after grid."""

    #: sample every this many optimiser steps, and at step 0 and at the end (0 = off)
    every: int = field(default=0, metadata={"min": 0})
    #: how many fixed prompts: the first pairs' conditions of ``data``
    num_prompts: int = field(default=4, metadata={"min": 1})
    #: dataset folder with the validation prompts' embeddings (None = the training dataset); "{output_dir}"
    #: is replaced; with data.synthesize, held-out synthetic prompts are written there when it is missing
    data: str | None = None
    #: sampler steps (flow: Euler; UNet: DDIM)
    steps: int = field(default=20, metadata={"min": 1})
    #: seed of the initial noise (the same at every validation step)
    seed: int = 0
    #: the reward is the mean over seeds seed .. seed + num_seeds - 1 (the GIFs are of the first)
    num_seeds: int = field(default=1, metadata={"min": 1})
    #: local diffusers VAE folder to decode with (None = the linear latent-to-RGB preview)
    vae: str | None = None
    #: optional "module:function" scoring the decoded samples: fn(videos [N,F,H,W,3] in [0,1], prompts)
    reward: str | None = None
    #: upscale factor of the written frames (nearest neighbour), and GIF frame rate
    scale: int = field(default=16, metadata={"min": 1})
    fps: int = field(default=4, metadata={"min": 1})


@dataclass
class TrainConfig:
    output_dir: str = "runs/pgdpo"
    seed: int = 0
    #: auto (cuda when available), cpu, cuda
    device: str = field(default="auto", metadata=_choice(*DEVICES))
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))

    def validate(self) -> TrainConfig:
        """Every check that needs no file and no weights: the one place a config is validated (the
        trainer, ``pgdpo plan`` and the CLI all load configs through :func:`load_config` /
        :func:`from_dict`, which end here). Single fields are checked as they are set; here the
        cross-field rules, and the loss options by the loss's own validator."""
        if self.model.path is None and self.model.name not in MODEL_CONFIGS:
            raise ConfigError(f"model.name must be one of {sorted(MODEL_CONFIGS)} (or set model.path to a "
                              f"diffusers folder), got {self.model.name!r}")
        m = self.method
        if m.name != "sft":
            try:
                loss_from_config(m)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"method: {exc}") from None
        if m.ref_ema_every and m.reference != "copy":
            raise ConfigError("method.ref_ema_every > 0 needs method.reference: copy (an EMA reference is a "
                              f"separate copy of the weights), got method.reference: {m.reference}")
        if m.reference == "lora" and self.model.lora_rank == 0 and m.name != "sft":
            raise ConfigError("method.reference: lora needs model.lora_rank > 0 (the reference is the policy "
                              "with its LoRA adapters disabled)")
        if m.ref_ema_every and self.model.lora_rank:
            raise ConfigError("method.ref_ema_every > 0 (EMA reference) is for full fine-tuning; with "
                              "model.lora_rank > 0 use method.reference: lora or copy without EMA")
        if m.name == "sft" and m.k_controller:
            raise ConfigError("method.k_controller steers PG-DPO's alpha / gamma, which sft does not have; "
                              "set method.k_controller: false for sft")
        if m.name == "sft" and m.ref_ema_every:
            raise ConfigError("method.name: sft uses no reference; set method.ref_ema_every: 0")
        if m.name == "sft" and m.timestep_weighting != "none":
            raise ConfigError("method.timestep_weighting weighs pairs by their reward signal, which sft "
                              "does not have; set method.timestep_weighting: none for sft")
        if self.train.batch_size % self.train.micro_batch_size:
            raise ConfigError(f"train.batch_size ({self.train.batch_size}) must be a multiple of "
                              f"train.micro_batch_size ({self.train.micro_batch_size})")
        if self.optim.warmup_steps and self.optim.scheduler == "constant":
            raise ConfigError("optim.warmup_steps > 0 needs optim.scheduler: constant_with_warmup (or "
                              "linear / cosine); 'constant' has no warm-up")
        for t in self.logging.trackers:
            if t not in TRACKERS:
                raise ConfigError(f"logging.trackers: unknown tracker {t!r}; expected some of "
                                  f"{list(TRACKERS)}")
        if self.validation.reward is not None and ":" not in self.validation.reward:
            raise ConfigError(f"validation.reward must be 'module:function', got {self.validation.reward!r}")
        if len(self.optim.betas) != 2 or not all(0 <= b < 1 for b in self.optim.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {list(self.optim.betas)}")
        return self

    def grad_accum(self, world_size: int) -> int:
        """Micro-batches per optimiser step on each rank; an error when the batch does not divide."""
        per_step = self.train.micro_batch_size * world_size
        if self.train.batch_size % per_step:
            raise ConfigError(f"train.batch_size ({self.train.batch_size}) must be a multiple of "
                              f"train.micro_batch_size x processes ({self.train.micro_batch_size} x "
                              f"{world_size} = {per_step})")
        return self.train.batch_size // per_step

    def data_path(self) -> str:
        return os.path.expanduser(self.data.path.replace("{output_dir}", self.output_dir))


def loss_kwargs(method: MethodConfig) -> dict:
    """The ``pgdpo.PGDPOLoss`` keywords of a method section: ``method`` and the fields marked LOSS."""
    return {"method": method.name, **{f.name: getattr(method, f.name) for f in dataclasses.fields(method)
                                      if f.metadata.get("loss")}}


def loss_from_config(method: MethodConfig):
    """The configured ``pgdpo.PGDPOLoss`` (its ``LossOptions`` validates the values)."""
    return PGDPOLoss(**loss_kwargs(method))


# ------------------------------------------------------------------------------------------ loading


def _to_plain(value):
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def yaml_word(value) -> str:
    """A choice as a config file spells it (``true``, ``false``, ``auto``)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp, meta: dict):
    """``value`` converted to the annotated type ``tp``; ConfigError naming ``key`` otherwise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null", "~") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(key, value, inner[0], meta)
        # several types (``bool | str``: true, false or a word): the first that takes the value
        for tp_ in inner:
            try:
                return _coerce(key, value, tp_, meta)
            except ConfigError:
                pass
        choices = meta.get("choices")
        shown = ", ".join(yaml_word(c) for c in choices) if choices else " or ".join(map(_type_name, inner))
        raise ConfigError(f"{key} must be one of {shown}, got {value!r}")
    if origin in (list, tuple):
        (elem, *rest) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if origin is tuple and rest and rest[0] is not Ellipsis and len(value) != len(typing.get_args(tp)):
            raise ConfigError(f"{key} must have {len(typing.get_args(tp))} items, got {list(value)!r}")
        out = [_coerce(f"{key}[{i}]", v, elem, {}) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise ConfigError(f"{key} must be an integer, got {value!r}") from None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-6 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be finite, got {value!r}")
    elif tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
    else:  # pragma: no cover - every field type is handled above
        raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{key} must be one of {list(meta['choices'])}, got {value!r}")
    for bound, test, word in (("min", lambda v, b: v >= b, ">="), ("max", lambda v, b: v <= b, "<="),
                              ("gt", lambda v, b: v > b, ">"), ("lt", lambda v, b: v < b, "<")):
        if bound in meta and not test(value, meta[bound]):
            raise ConfigError(f"{key} must be {word} {meta[bound]}, got {value!r}")
    return value


def _fields(cls) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def _unknown(key: str, valid) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    prefix = key[: -len(leaf)]
    close = difflib.get_close_matches(leaf, list(valid), n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}; valid keys here: {sorted(valid)}")


def set_key(config, dotted: str, value) -> None:
    """Set ``config.<dotted>`` to ``value`` with type and range checks (ConfigError names the key)."""
    obj, parts = config, dotted.split(".")
    for i, part in enumerate(parts):
        fields = _fields(type(obj))
        key = ".".join(parts[: i + 1])
        if part not in fields:
            raise _unknown(key, fields)
        f, tp = fields[part]
        if dataclasses.is_dataclass(tp):
            if i == len(parts) - 1:
                if not isinstance(value, dict):
                    raise ConfigError(f"{key} is a section; give a mapping of its keys, got {value!r}")
                for k, v in value.items():
                    set_key(config, f"{key}.{k}", v)
                return
            obj = getattr(obj, part)
            continue
        if i != len(parts) - 1:
            raise ConfigError(f"{key} is a value, not a section: '{dotted}' is not a config key")
        setattr(obj, part, _coerce(key, value, tp, dict(f.metadata)))
        return


def _flatten(prefix: str, mapping: dict, out: list) -> None:
    for k, v in mapping.items():
        if not isinstance(k, str):
            raise ConfigError(f"config keys must be strings, got {k!r} under '{prefix or '<top>'}'")
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            _flatten(key + ".", v, out)
        else:
            out.append((key, v))


def from_dict(mapping: dict | None, overrides: list[tuple[str, Any]] = (), *,
              validate: bool = True) -> TrainConfig:
    """A validated :class:`TrainConfig` from a nested mapping plus ``(dotted_key, value)`` overrides."""
    config = TrainConfig()
    items: list = []
    if mapping:
        if not isinstance(mapping, dict):
            raise ConfigError(f"a config must be a mapping of sections, got {type(mapping).__name__}")
        _flatten("", mapping, items)
    for key, value in [*items, *overrides]:
        set_key(config, key, value)
    return config.validate() if validate else config


def load_config(path: str | os.PathLike | None, overrides: list[tuple[str, Any]] = ()) -> TrainConfig:
    """Read a YAML config (``yaml.safe_load``) and apply overrides; errors name the file and key."""
    import yaml

    mapping = None
    if path is not None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            try:
                mapping = yaml.safe_load(f)
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        config = from_dict(mapping, validate=False)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None
    for key, value in overrides:
        set_key(config, key, value)
    return config.validate()


def parse_value(text: str):
    """A command-line override value, read as YAML (``1e-5``, ``true``, ``[a, b]``, ``null``)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text
