"""FLOPs of one model forward, by model or config: the family's closed form (Wan) or a count on meta.

Used for MFU in the training metrics and for step-time estimates in the planner (``pgdpo plan``); the
formulas live with their family (:meth:`pgdpo.train.models.spec.ModelSpec.forward_flops_per_sample`).
"""

from __future__ import annotations

from .families.wan_t2v import wan_forward_flops
from .registry import spec_for

__all__ = ["wan_forward_flops", "counted_forward_flops", "model_flops_per_sample"]


def counted_forward_flops(name_or_config: str | dict, latent_shape, text_len: int = 512,
                          image_len: int = 257) -> int:
    """FLOPs of one forward of one sample as counted by ``torch.utils.flop_counter.FlopCounterMode`` on the
    meta device (:meth:`~pgdpo.train.models.spec.ModelSpec.counted_forward_flops`): the count for UNet3D,
    and the check of :func:`wan_forward_flops`."""
    spec = spec_for(name_or_config)
    return spec.counted_forward_flops(latent_shape, text_len=text_len, image_len=image_len)


def model_flops_per_sample(model_or_config, latent_shape, text_len: int = 512, image_len: int = 257) -> int:
    """Forward FLOPs per sample of a model, name or config (:meth:`ModelSpec.forward_flops_per_sample`)."""
    return spec_for(model_or_config).forward_flops_per_sample(latent_shape, text_len, image_len)
