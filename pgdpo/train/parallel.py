"""The device mesh of a run (HSDP and sequence parallelism) and Ulysses sequence parallelism for long videos.

The mesh. ``N`` ranks, ``distributed.replicate_degree = R``, ``distributed.sp_degree = P``, ``S = N / R``
the ranks of a shard group: one :func:`device_mesh`, ``(replicate, shard)`` of shape ``(R, S)``, whose
``shard`` dim is unflattened into ``(dp_shard, ring, ulysses)`` of shape ``(S/P, 1, P)``: consecutive
ranks innermost (torchtitan's ``ParallelDims`` layout: ``dp_replicate, dp_shard, cp``, with FSDP2 on
``dp_shard x cp``). It serves both parallelisms:

- FSDP2 on the 2-D ``(replicate, shard)`` mesh (HSDP; the sequence ranks hold shards of the weights
  too): parameters ``(Replicate(), Shard(0))``, all-gathers and reduce-scatters inside a shard group of
  ``S`` consecutive ranks (one node), one all-reduce of the reduced shards across the ``R`` groups. With
  ``R = 1`` FSDP2 keeps its default 1-D mesh over the world (the same ranks, as before HSDP existed);
- sequence parallelism on the ``ring`` (size 1) and ``ulysses`` dims, which diffusers'
  ``ContextParallelConfig`` looks up by name: ``P`` consecutive ranks, inside a shard group.

Sequence parallelism (Ulysses).

With ``distributed.sp_degree = P`` the ``N`` ranks form ``N / P`` data-parallel groups of ``P``
consecutive ranks (one node's GPUs for ``P <= 8``). The ranks of a group run the same micro-batch (same
pairs, same noise: chosen and rejected of a pair stay together), each on ``1 / P`` of the video tokens:

- the patch embedding, the condition embedders (text, timestep, 257 CLIP image tokens for I2V) and the
  rotary tables are computed in full on every rank; the video tokens (and the rotary tables) are split
  along the sequence at the first block;
- in each self-attention, an all-to-all turns ``[B, S/P, H, D]`` into ``[B, S, H/P, D]`` (the full
  sequence, ``H/P`` heads), attention runs, and a second all-to-all turns it back (Ulysses,
  arXiv 2309.14509); cross-attention needs no communication (its keys, the text and image tokens, are
  on every rank, its queries are token-local);
- the output projection's result is all-gathered, so the model output, and the loss, are whole and
  identical on the ranks of a group.

This is diffusers' own context parallelism (``ContextParallelConfig(ulysses_degree=P)``, the model's
``_cp_plan``, the ``TemplatedUlyssesAttention`` autograd function with ``all_to_all_single``, which gloo
runs too), checked to compose with FSDP2, activation checkpointing, peft adapters (the adapters-off
reference) and gloo on CPU. It is set up here rather than with ``ModelMixin.enable_parallelism`` because
that one derives the device as ``rank % torch.accelerator.device_count()`` (a division by zero on a CPU
machine) and builds a mesh of its own; the steps are the same (record the config on the model and its
attention processors, install the split / gather hooks of the plan).

Gradients. The all-gather's backward hands each rank the gradient of its own tokens only, so rank ``r``
of a group holds the part ``g_r`` of the group's gradient that flows through its tokens, and the group's
gradient is ``sum_r g_r`` (every parameter, the replicated embedders included, is reached only through
the tokens). FSDP2 shards over all ``N`` ranks and averages: ``(1/N) sum g``. The trainer scales each
rank's loss by ``P`` before the backward (:func:`gradient_scale`), which makes that
``(1/(N/P)) sum_groups sum_r g_r``: the mean over the data-parallel groups, each sample counted once.
Under HSDP the average is taken in two stages, a reduce-scatter over the ``S`` ranks of a shard group
(divided by ``S``) and an all-reduce of the result over the ``R`` groups (divided by ``R``): ``(1/R)
sum_groups (1/S) sum_ranks g = (1/N) sum g``, the same average, so the same factor ``P`` holds (a
sequence group lies inside one shard group, but the argument does not even need that). The replicated
fp32-kept parameters are all-reduced over the world and divided by ``N``
(:func:`pgdpo.train.distributed.sync_replicated_grads`): also ``(1/N) sum g``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from .config import ConfigError
from .layout import check_mesh
from .models import unwrap_model

#: the dims of :func:`device_mesh`, outermost first; ``ring`` / ``ulysses`` are diffusers' names
MESH_DIMS = ("replicate", "dp_shard", "ring", "ulysses")
#: the dims of the mesh FSDP2 shards on under HSDP (``shard`` = ``dp_shard x ring x ulysses``)
FSDP_DIMS = ("replicate", "shard")


def device_mesh(world_size: int, sp_degree: int, replicate_degree: int, device: torch.device):
    """``(fsdp, full)``: the 2-D ``(replicate, shard)`` mesh of shape ``(R, S)`` FSDP2 shards on, and the
    same ranks as ``(replicate, dp_shard, ring, ulysses)`` of shape ``(R, S/P, 1, P)`` (its ``shard`` dim
    unflattened; see the module doc), whose ``ring`` / ``ulysses`` dims sequence parallelism uses.
    Collective: every rank calls it. A ``ConfigError`` naming the key when the degrees do not divide
    (:func:`~pgdpo.train.layout.check_mesh`)."""
    shard_degree = check_mesh(world_size, sp_degree, replicate_degree)
    fsdp = init_device_mesh(device.type, (replicate_degree, shard_degree), mesh_dim_names=FSDP_DIMS)
    full = fsdp._unflatten("shard", (shard_degree // sp_degree, 1, sp_degree), MESH_DIMS[1:])
    return fsdp, full


def gradient_scale(sp_degree: int) -> float:
    """Factor on each rank's loss before the backward so that FSDP2's world average counts each sample
    once (see the module doc)."""
    return float(sp_degree)


def check_divisible(spec, latent_shape, sp_degree: int) -> None:
    """Raise a ConfigError unless the model family (a ``ModelSpec``) supports sequence parallelism and its
    heads and video tokens split evenly over ``sp_degree`` ranks."""
    if sp_degree == 1:
        return
    if not spec.supports_sequence_parallel:
        raise ConfigError(f"distributed.sp_degree > 1 is implemented for Wan transformers (diffusers' "
                          f"_cp_plan); this model is {spec.family}")
    heads = spec.attention_heads
    if heads % sp_degree:
        raise ConfigError(f"distributed.sp_degree ({sp_degree}) must divide the model's attention heads "
                          f"({heads}): Ulysses gives each rank heads / sp_degree heads")
    tokens = spec.tokens_per_sample(latent_shape)
    if tokens % sp_degree:
        raise ConfigError(f"distributed.sp_degree ({sp_degree}) must divide the tokens per video ({tokens} "
                          f"for latents {list(latent_shape)}): each rank holds tokens / sp_degree of them")


def _wan_plan(model: nn.Module) -> dict:
    """The model's diffusers ``_cp_plan`` without the root entry that splits a 2-D per-token timestep
    (Wan2.2 TI2V); Wan2.1's timestep is ``[B]`` and that entry would only log a warning each forward."""
    plan = getattr(type(model), "_cp_plan", None)
    if not plan:
        raise ConfigError(f"{type(model).__name__} has no diffusers _cp_plan: sequence parallelism needs "
                          "diffusers >= 0.38")
    return {name: entry for name, entry in plan.items() if name != ""}


def enable_sequence_parallel(model: nn.Module, mesh, sp_degree: int) -> None:
    """Ulysses attention over the ``ulysses`` dimension of ``mesh`` on a diffusers Wan model (sharded by
    FSDP2 or not, peft adapters or not): what ``ModelMixin.enable_parallelism`` does, on our mesh."""
    from diffusers.hooks.context_parallel import apply_context_parallel
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    base = unwrap_model(model)
    if getattr(base, "_parallel_config", None) is not None:
        raise RuntimeError(f"{type(base).__name__} already has parallelism enabled")
    cp = ContextParallelConfig(ulysses_degree=sp_degree, mesh=mesh)
    config = ParallelConfig(context_parallel_config=cp)
    config.setup(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                 torch.device(mesh.device_type), mesh=mesh)
    processors = [m.processor for m in base.modules()
                  if getattr(m, "processor", None) is not None and hasattr(m.processor, "_parallel_config")]
    if not processors:
        raise ConfigError(f"{type(base).__name__}: no attention processor takes a parallel config")
    for processor in processors:
        name = getattr(processor, "_attention_backend", None)
        backend = AttentionBackendName(name) if name else _AttentionBackendRegistry.get_active_backend()[0]
        if not _AttentionBackendRegistry._is_context_parallel_available(backend):
            raise ConfigError(f"model.attention: backend {backend.value!r} has no sequence-parallel "
                              "(Ulysses) support in diffusers; use one of "
                              f"{sorted(_AttentionBackendRegistry._supports_context_parallel)}")
        processor._parallel_config = config
    base._parallel_config = config
    apply_context_parallel(base, cp, _wan_plan(base))
