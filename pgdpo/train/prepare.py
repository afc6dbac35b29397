"""One preparation of a model for training, in one written order, for the policy and the reference alike.

:func:`prepare` applies, in this order (torchtitan's ``parallelize_*``):

1. weight dtype (:func:`~pgdpo.train.models.cast_weights`; fp32-only modules stay fp32),
2. dropout off (:func:`~pgdpo.train.models.disable_dropout`),
3. attention backend (:func:`~pgdpo.train.models.set_attention_backend`),
4. activation checkpointing of every k-th block (the trained model only),
5. on a CPU device, the heap trimmed before each block (:mod:`pgdpo.train.host_memory`; not with compile),
6. regional ``torch.compile`` of the repeated blocks,
7. Ulysses sequence parallelism (:func:`~pgdpo.train.parallel.enable_sequence_parallel`; after the
   attention backend, which it checks for Ulysses support),
8. DDP (the trained model only): the wrapper the step calls.

FSDP2 sharding comes first of all, at build time (:func:`pgdpo.train.loading.build_models` shards the
model while it is still on the meta device, so no rank ever holds it whole), which is why it is not a
step here; everything above composes with a sharded model. :class:`~pgdpo.train.step.PreferenceStep`
receives prepared models (its own switches are this function too).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .distributed import wrap_model
from .host_memory import trim_heap_before_blocks
from .models import (
    cast_weights,
    compile_blocks,
    disable_dropout,
    enable_checkpointing,
    set_attention_backend,
    spec_for,
    unwrap_model,
)
from .parallel import enable_sequence_parallel

#: the steps of :func:`prepare`, in the order they are applied
ORDER = ("dtype", "dropout", "attention", "checkpointing", "host_heap", "compile", "sequence_parallel", "ddp")


@dataclass(frozen=True)
class PrepareOptions:
    """What :func:`prepare` does; the defaults do nothing but switch dropout off.

    Attributes:
        weights_dtype: cast the weights to this dtype (None: leave them).
        disable_dropout: set every dropout probability to 0.
        attention_backend: diffusers dispatcher backend (None: keep the model's).
        checkpoint_every: activation checkpointing of blocks 0, k, 2k, ... of a trained model (0: off).
        trim_host_heap: return glibc's free heap pages to the OS before each block's forward (CPU runs;
            ignored with ``compile``).
        compile: regional ``torch.compile``; ``compile_options`` its keyword arguments.
        sp_degree, mesh: Ulysses sequence parallelism over the mesh's ``ulysses`` dimension (1: off).
        dist, precision: a :class:`~pgdpo.train.distributed.DistState` whose strategy ``ddp`` wraps the
            trained model (with ``precision``); None: no wrapper.
    """

    weights_dtype: torch.dtype | None = None
    disable_dropout: bool = True
    attention_backend: str | None = None
    checkpoint_every: int = 0
    trim_host_heap: bool = False
    compile: bool = False
    compile_options: dict = field(default_factory=dict)
    sp_degree: int = 1
    mesh: object = None
    dist: object = None
    precision: str = "fp32"


@dataclass
class Prepared:
    """A prepared model: ``module`` is what a step calls (the DDP wrapper, or the model itself);
    ``checkpointed_blocks`` the indices of the blocks recomputed in the backward."""

    module: nn.Module
    checkpointed_blocks: list[int]


def prepare(model: nn.Module, options: PrepareOptions, *, trainable: bool = True) -> Prepared:
    """Apply :data:`ORDER` to ``model`` in place (``trainable=False``: a frozen reference, which gets
    neither activation checkpointing nor a DDP wrapper)."""
    if options.weights_dtype is not None:
        cast_weights(unwrap_model(model), options.weights_dtype)
    if options.disable_dropout:
        disable_dropout(model)
    if options.attention_backend is not None:
        set_attention_backend(model, options.attention_backend)
    blocks = enable_checkpointing(model, options.checkpoint_every) if trainable and options.checkpoint_every \
        else []
    if options.trim_host_heap and not options.compile:
        trim_heap_before_blocks(spec_for(model).blocks(model))
    if options.compile:
        compile_blocks(model, **options.compile_options)
    if options.sp_degree > 1:
        enable_sequence_parallel(model, options.mesh, options.sp_degree)
    module = model
    if trainable and options.dist is not None and options.dist.strategy == "ddp":  # DDP wraps a filled model
        module = wrap_model(model, [], options.dist, precision=options.precision)
    return Prepared(module, blocks)
