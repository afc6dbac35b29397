"""A reference that follows the policy: ``ref <- (1 - rate) ref + rate policy`` every k steps.

The stable reference update of "Rethinking DPO in Diffusion Models" (arXiv 2505.18736). diffusers'
``training_utils.EMAModel`` keeps its own shadow copy of the weights and copies it into a model for
use; here the reference model itself is the shadow (it is needed as a model for its forward anyway),
so the update is one in-place ``lerp`` per parameter and no third copy of the weights exists. With
FSDP2 the policy and the reference are sharded identically, so each rank updates its own shards.
"""

from __future__ import annotations

import torch
from torch import nn

from .models import unwrap_model


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def ema_update_(reference: nn.Module, policy: nn.Module, rate: float) -> None:
    """Move every reference parameter toward the policy's: ``ref += rate (policy - ref)``."""
    if not 0 < rate <= 1:
        raise ValueError(f"EMA rate must be in (0, 1], got {rate}")
    ref = dict(unwrap_model(reference).named_parameters())
    pol = dict(unwrap_model(policy).named_parameters())
    if ref.keys() != pol.keys():
        missing = sorted(set(pol) ^ set(ref))[:5]
        raise ValueError(f"the reference and the policy have different parameters (e.g. {missing}); an EMA "
                         "reference must be a copy of the policy")
    dst, src = [], []
    for name, r in ref.items():
        r_local, p_local = _local(r.data), _local(pol[name].data)
        if r_local.shape != p_local.shape:
            raise ValueError(f"parameter {name}: reference shard {tuple(r_local.shape)} vs policy shard "
                             f"{tuple(p_local.shape)}; they must be sharded the same way")
        dst.append(r_local)
        src.append(p_local.to(r_local.dtype))
    if dst:
        torch._foreach_lerp_(dst, src, float(rate))
