"""Checks of the loss's tensor inputs, done once per call before any backend runs, with errors that name
the bad argument; and the flat ``[2B, N]`` layout the fused op takes.

The kernels' host code (``kernels/pgdpo_loss.py``, ``csrc/pgdpo_cpu_ops.cpp``) asserts only the raw op's
memory-safety preconditions (2-D, contiguous, matching shapes) for callers of ``torch.ops.pgdpo.fused_loss``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def as_full_batch(name: str, value) -> Tensor:
    """Accept ``[2B, *S]`` or a ``(chosen, rejected)`` pair of ``[B, *S]`` tensors."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        chosen, rejected = value
        for half, which in ((chosen, "chosen"), (rejected, "rejected")):
            if not isinstance(half, Tensor):
                raise TypeError(f"{name}: the {which} half must be a torch.Tensor, got {type(half).__name__}")
        if chosen.shape != rejected.shape:
            raise ValueError(f"{name}: chosen half has shape {tuple(chosen.shape)} but rejected half "
                             f"has shape {tuple(rejected.shape)}; they must match")
        if chosen.device != rejected.device:
            raise ValueError(f"{name}: chosen half is on {chosen.device}, rejected on {rejected.device}")
        if chosen.dim() == 0:
            raise ValueError(f"{name}: halves must have a batch dimension, got 0-d tensors")
        return torch.cat([chosen, rejected.to(chosen.dtype)], dim=0)
    raise TypeError(f"{name} must be a torch.Tensor of shape [2B, ...] or a (chosen, rejected) pair "
                    f"of tensors, got {type(value).__name__}")


def validate_inputs(pred: Tensor, ref_pred: Tensor, target: Tensor, sample_weight) -> None:
    named = (("pred", pred), ("ref_pred", ref_pred), ("target", target))
    for name, t in named:
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor (float32, bfloat16, float16 or "
                            f"float64), got {t.dtype}")
    for name, t in named[1:]:
        if t.shape != pred.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but pred has shape "
                             f"{tuple(pred.shape)}; they must match")
        if t.device != pred.device:
            raise ValueError(f"{name} is on {t.device} but pred is on {pred.device}; move them to one device")
        if t.requires_grad:
            raise ValueError(f"{name} requires grad, but only pred receives a gradient in PG-DPO: "
                             f"pass {name}.detach() (the reference model runs under torch.no_grad())")
    if pred.dim() == 0 or pred.shape[0] == 0 or pred.shape[0] % 2:
        got = "a 0-d tensor" if pred.dim() == 0 else f"first dimension {pred.shape[0]}"
        raise ValueError(f"pred must have shape [2B, ...] with the B chosen samples first and the B "
                         f"rejected samples second (first dimension even and > 0), got {got}")
    if pred.numel() == 0:
        raise ValueError(f"pred is empty (shape {tuple(pred.shape)}): each sample needs at least one element")
    if sample_weight is not None:
        b = pred.shape[0] // 2
        if not isinstance(sample_weight, Tensor):
            raise TypeError(f"sample_weight must be a torch.Tensor of shape [{b}] or None, "
                            f"got {type(sample_weight).__name__}")
        if not sample_weight.is_floating_point():
            raise TypeError(f"sample_weight must be floating-point, got {sample_weight.dtype}")
        if sample_weight.shape != (b,):
            raise ValueError(f"sample_weight must have shape [{b}] (one weight per pair), got "
                             f"{tuple(sample_weight.shape)}")
        if sample_weight.device != pred.device:
            raise ValueError(f"sample_weight is on {sample_weight.device} but pred is on {pred.device}")
        if sample_weight.requires_grad:
            raise ValueError("sample_weight requires grad; weights are constants of the loss: pass "
                             "sample_weight.detach()")


