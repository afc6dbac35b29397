"""Seeing through wrappers: the diffusers model inside a DDP and/or peft ``PeftModel`` wrapper.

The one unwrap helper of pgdpo. FSDP2 (``fully_shard``) needs none: it keeps the module itself and only
swaps its class for a subclass (``FSDPWanTransformer3DModel``), so ``isinstance`` checks still hold.
"""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel


def unwrap_model(model: nn.Module) -> nn.Module:
    """The diffusers model inside ``model``: DDP's ``.module`` and peft's ``get_base_model()`` peeled off,
    in whatever order they nest; ``model`` itself when it is not wrapped."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
            continue
        get_base = getattr(model, "get_base_model", None)
        inner = get_base() if callable(get_base) else model
        if inner is model:
            return model
        model = inner
