"""Switches applied to a built model: activation checkpointing, regional compile, dropout.

Each one changes how a model runs, never what it computes (dropout aside, which is why it is switched
off); all see through peft / DDP wrappers (:func:`pgdpo.train.models.unwrap_model`).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn
from torch._inductor.runtime.cache_dir_utils import default_cache_dir
from torch.utils.checkpoint import checkpoint

from .registry import spec_for
from .wrappers import unwrap_model


def _checkpointed_block_forward(block: nn.Module, *args, **kwargs):
    """The class ``forward`` of ``block``, recomputed in the backward (non-reentrant checkpoint)."""
    forward = type(block).forward.__get__(block)
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)  # reference / eval passes keep no activations anyway


def _selective_checkpoint(module: nn.Module, *args):
    """diffusers ``gradient_checkpointing_func`` that recomputes only blocks marked for it."""
    if getattr(module, "_pgdpo_checkpoint", False):
        return checkpoint(module.__call__, *args, use_reentrant=False)
    return module(*args)


def _blocks(model: nn.Module) -> list[nn.Module]:
    return spec_for(model).blocks(model)


def enable_checkpointing(model: nn.Module, every: int = 1) -> list[int]:
    """Activation checkpointing of every ``every``-th repeated block (blocks 0, k, 2k, ...).

    Wan (diffusers supports it): ``enable_gradient_checkpointing``, with a checkpoint function that
    recomputes only the marked blocks when ``every > 1``. UNet3D (diffusers' UNet3D blocks have no
    checkpointing): the chosen down/mid/up blocks get an instance ``forward`` that runs the class
    forward under ``torch.utils.checkpoint``. Both survive ``copy.deepcopy`` (no closures over modules).
    Gradients are unchanged; memory drops, compute rises by about one forward of the chosen blocks.
    Returns the indices of the checkpointed blocks.
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"checkpointing every must be an int >= 1 (1 = every block), got {every!r}")
    disable_checkpointing(model)
    base = unwrap_model(model)
    blocks = _blocks(model)
    chosen = list(range(0, len(blocks), every))
    if getattr(base, "_supports_gradient_checkpointing", False):
        if every == 1:
            base.enable_gradient_checkpointing()
        else:
            for i in chosen:
                blocks[i]._pgdpo_checkpoint = True
            base.enable_gradient_checkpointing(_selective_checkpoint)
    else:
        for i in chosen:
            blocks[i].forward = functools.partial(_checkpointed_block_forward, blocks[i])
    return chosen


def disable_checkpointing(model: nn.Module) -> None:
    """Undo :func:`enable_checkpointing`."""
    base = unwrap_model(model)
    if getattr(base, "_supports_gradient_checkpointing", False):
        base.disable_gradient_checkpointing()
    for block in _blocks(model):
        block.__dict__.pop("_pgdpo_checkpoint", None)
        forward = block.__dict__.get("forward")
        if isinstance(forward, functools.partial) and forward.func is _checkpointed_block_forward:
            del block.__dict__["forward"]  # back to the class's forward


def disable_dropout(model: nn.Module) -> int:
    """Set ``p = 0`` on every ``nn.Dropout`` of ``model`` (as TRL's DPO trainer does by default).

    Why: the policy runs in train mode and the reference in eval mode, so any active dropout makes
    ``d_w`` / ``d_l`` compare a randomly thinned network with a full one: a bias in the margin and a loss
    that changes from call to call with the same generator. diffusers' ``UNet3DConditionModel`` builds
    its temporal convolutions with dropout 0.1 (hard-coded); it is harmless only while their last
    convolution is still at its zero init. Returns the number of dropout layers that were active.
    """
    active = 0
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            module.p = 0.0
            active += 1
    return active


def inductor_cache_for_this_cpu() -> str | None:
    """Give Inductor's on-disk cache a folder per CPU instruction set and thread count, unless the user
    chose one (``TORCHINDUCTOR_CACHE_DIR``); returns the folder set, or None.

    Inductor's FX graph cache keys a compiled CPU graph without the instruction set its C++ was generated
    for (``ATEN_CPU_CAPABILITY``) and, before torch 2.14, without the thread count it was specialised to.
    A cache filled under one setting and read under another returned kernels of the wrong vector width:
    NaN from a compiled Wan block (AVX-512 cache read under ``avx2``, torch 2.13) or a C++ compile error
    (under ``default``); with a fresh folder each setting is correct. Reproduced in
    ``tests/test_step.py::test_regional_compile_survives_another_instruction_set``.
    """
    default = os.path.abspath(default_cache_dir())
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # importing torch._dynamo already wrote the default folder into the environment: not a user's choice
    if chosen and os.path.abspath(chosen) != default:
        return None
    isa = torch.backends.cpu.get_cpu_capability().lower()
    folder = os.path.join(default, f"cpu-{isa}-threads{torch.get_num_threads()}")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    return folder


def compile_blocks(model: nn.Module, **compile_kwargs) -> int:
    """Regional ``torch.compile``: compile each repeated block in place, not the whole model.

    Uses diffusers' ``compile_repeated_blocks`` where the class declares its blocks (Wan), else
    ``nn.Module.compile`` on each down/mid/up block (UNet3D). Identical blocks share one compiled
    graph, so compile time is that of one block. Returns the number of blocks compiled.
    """
    base = unwrap_model(model)
    blocks = _blocks(model)
    if any(p.device.type == "cpu" for p in base.parameters()):
        inductor_cache_for_this_cpu()
    if getattr(base, "_repeated_blocks", None):
        base.compile_repeated_blocks(**compile_kwargs)
    else:
        for block in blocks:
            block.compile(**compile_kwargs)
    return len(blocks)
