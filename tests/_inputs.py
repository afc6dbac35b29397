"""Shared input makers for the loss tests."""

import torch


def make_inputs(shape, dtype=torch.float64, seed=0, device="cpu"):
    """Random (pred, ref_pred, target) with margins spread across pairs, so alpha/gamma are not saturated.

    target ~ N(0,1); the reference is off by 0.3 N(0,1); the policy differs from the reference by a
    per-sample scale in [0.02, 0.4], so d_w and d_l (and the margin m) vary from pair to pair.
    """
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(shape, generator=g, dtype=torch.float64)
    ref = target + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    scale = 0.02 + 0.38 * torch.rand((shape[0],) + (1,) * (len(shape) - 1), generator=g, dtype=torch.float64)
    pred = ref + scale * torch.randn(shape, generator=g, dtype=torch.float64)
    return tuple(x.to(device=device, dtype=dtype) for x in (pred, ref, target))
