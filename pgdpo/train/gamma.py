"""Gamma of Eq. 10 on a training batch, under DDP, FSDP2 or one process: the trainer's diagnostics pass.

    Gamma = -lr * grad_theta(log p_w) . (grad_theta L_pgdpo - grad_theta L_dpo)

at the parameters before the step's update, on the step's first micro-batch with the training's noise;
``log p_w`` is the chosen half's likelihood proxy ``-mean_S (pred_w - target_w)^2``
(:func:`pgdpo.train.diagnostics.logp_proxy`, averaged over the batch), both losses use the run's loss options
(the baseline with ``method="dpo"``). Gamma > 0: PG-DPO's modification raises the chosen likelihood more
(or lowers it less) than DPO would in this step (the paper reports Gamma > 0 on ~77-82% of steps).

Why ``.backward()`` and not ``torch.autograd.grad``: the data-parallel wrappers reduce gradients in their
backward hooks (FSDP2's reduce-scatter, DDP's all-reduce), which ``autograd.grad`` bypasses. So each of
the two gradients is accumulated into ``.grad`` by a backward of its own forward (neither wrapper takes
two backwards through one graph), averaged over data-parallel ranks exactly as the training gradient is
(same ``loss_scale``, :func:`pgdpo.train.distributed.sync_replicated_grads` for the fp32-kept replicated
parameters); the dot product adds the sharded parameters' local products over ranks (DTensor
``full_tensor``) and counts the replicated ones once. The result is the Gamma of the batch made of every
data-parallel rank's micro-batch, identical on every rank. Cost per measured step: one reference forward,
two policy forwards and two backwards, and one copy of the trainable gradients.

The pass leaves no trace on training: the gradients are zeroed (``set_to_none``) before and after, the
noise comes from a generator of its own seeded like the training's, the global RNG state is restored, and
the timestep-weighting statistics are not fed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import Tensor

from ..loss.options import METHODS
from .diagnostics import logp_proxy
from .distributed import DistState, is_sharded, sync_replicated_grads

#: methods whose Gamma is measured: they have a DPO baseline to differ from (for dpo Gamma is 0 by
#: definition, for sft it is not defined)
GAMMA_METHODS = tuple(m for m, (ars, ipr) in METHODS.items() if ars or ipr)  # those that differ from dpo


def _zero_grads(params: list[Tensor]) -> None:
    for p in params:
        p.grad = None


def _backward_into_grads(loss: Tensor, params: list[Tensor], dist: DistState, loss_scale: float) -> None:
    (loss * loss_scale).backward()
    sync_replicated_grads(params, dist)


def grad_dot(a: list[Tensor | None], b: list[Tensor | None]) -> float:
    """``sum_i a_i . b_i`` over parameter gradients of sharded (DTensor) and replicated parameters: the
    sharded local products summed over ranks, the replicated ones (equal on every rank) counted once."""
    sharded, local = None, torch.zeros((), dtype=torch.float64)
    for x, y in zip(a, b):
        if x is None or y is None:  # a parameter outside one of the graphs: zero gradient
            continue
        if is_sharded(x):
            part = (x.double() * y.double()).sum()
            sharded = part if sharded is None else sharded + part
        else:
            local = local + (x.double() * y.double()).sum().to(local.device)
    total = float(local)
    if sharded is not None:
        total += float(sharded.full_tensor())
    return total


def measure_gamma(step_fn, params: list[Tensor], batch: Mapping, generator: torch.Generator, *, lr: float,
                  dist: DistState, loss_scale: float = 1.0) -> float:
    """Gamma (Eq. 10) of ``step_fn`` (a :class:`pgdpo.train.step.PreferenceStep`) on ``batch`` with the
    noise of
    ``generator`` at the current parameters; collective under DDP / FSDP2 (every rank calls it).

    ``params``: the trainable parameters (of the wrapped policy); their ``.grad`` is None on return.
    ``lr``: the step's learning rate. ``loss_scale``: the training backward's gradient scale (sequence
    parallel). Raises ValueError for a method without a DPO baseline (see :data:`GAMMA_METHODS`).
    """
    pairs = step_fn.noise_inputs(batch, generator)
    return gamma_on_pairs(step_fn, params, pairs, batch, lr=lr, dist=dist, loss_scale=loss_scale)


def gamma_on_pairs(step_fn, params: list[Tensor], pairs, batch: Mapping, *, lr: float, dist: DistState,
                   loss_scale: float = 1.0) -> float:
    """:func:`measure_gamma` on already noised inputs (a :class:`pgdpo.train.diffusion.NoisyPairs` of
    ``batch``)."""
    options = step_fn.loss.options
    if options.method not in GAMMA_METHODS:
        raise ValueError(f"Gamma is measured for methods {list(GAMMA_METHODS)}, not {options.method!r}")
    b = batch["chosen"].shape[0]
    target = pairs.target
    ref_pred = step_fn.reference_prediction(pairs, batch)  # once, reused by both losses
    sample_weight = step_fn.sample_weights(pairs)
    devices = [target.device] if target.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # a forward with active dropout must not move training's RNG
        _zero_grads(params)
        pred = step_fn.policy_prediction(pairs, batch)
        logp_w = logp_proxy(pred[:b], target[:b]).mean()
        _backward_into_grads(logp_w, params, dist, loss_scale)
        grad_logp = [None if p.grad is None else p.grad.detach().clone() for p in params]
        del pred, logp_w
        _zero_grads(params)
        pred = step_fn.policy_prediction(pairs, batch)  # a fresh graph: one backward per forward
        loss_method = step_fn.loss_on(pred, ref_pred, pairs, sample_weight)
        loss_dpo = step_fn.loss_on(pred, ref_pred, pairs, sample_weight,
                                   options=dataclasses.replace(options, method="dpo"))
        _backward_into_grads(loss_method - loss_dpo, params, dist, loss_scale)
        dot = grad_dot(grad_logp, [p.grad for p in params])
        _zero_grads(params)
    return -lr * dot
