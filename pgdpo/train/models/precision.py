"""Weight dtype of a built model: cast to a low precision while diffusers' fp32-only modules stay fp32.

Its own room because building (:mod:`~pgdpo.train.models.spec`), loading on meta
(:mod:`pgdpo.train.loading`) and the step's dtype switch all cast the same way, and none of them should
have to import the others to do so.
"""

from __future__ import annotations

import torch
from torch import nn

from .wrappers import unwrap_model


def cast_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast to ``dtype`` but keep the modules diffusers marks fp32-only in fp32, as from_pretrained does.

    Uses ``nn.Module.to`` directly: diffusers' ``ModelMixin.to`` warns on any dtype cast because it
    cannot honour ``_keep_in_fp32_modules`` itself; here they are restored right after.
    """
    if dtype == torch.float32:
        return model  # diffusers initialises in fp32 already
    nn.Module.to(model, dtype)
    keep = set(keep_fp32_names(model))
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name in keep:
                tensor.data = tensor.data.float()
    return model


def keep_fp32_names(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers diffusers keeps in fp32 (``_keep_in_fp32_modules``).

    Matched by name component, as ``from_pretrained`` does; this also catches bare Parameters such as
    Wan's per-block ``scale_shift_table``.
    """
    keep = getattr(unwrap_model(model), "_keep_in_fp32_modules", None) or []
    return [name for name, _ in [*model.named_parameters(), *model.named_buffers()]
            if any(k in name.split(".") for k in keep)]
