"""The registry of model families and of the named model configs, and the lookup of a model's family.

The models are diffusers' own classes, configured (never subclassed); each family is one file of
:mod:`~pgdpo.train.models.families` (:class:`~pgdpo.train.models.spec.ModelSpec`). A new family is its
file and one entry in :data:`FAMILIES`.
"""

from __future__ import annotations

import copy

from torch import nn

from .families.unet3d import UNet3D
from .families.wan_i2v import WanI2V
from .families.wan_t2v import WanT2V
from .spec import ModelSpec
from .wrappers import unwrap_model

#: Every model family; the first whose ``matches`` accepts a config is its family (the more specific first:
#: a Wan I2V config is a Wan config with more input than output channels).
FAMILIES: tuple[type[ModelSpec], ...] = (WanI2V, WanT2V, UNet3D)

#: The diffusers classes the families build, in the order of :data:`FAMILIES`.
_CLASSES = tuple(dict.fromkeys(family.class_name for family in FAMILIES))

#: Named model configs of every family. ``_class_name`` picks the diffusers class; the rest are its
#: constructor arguments.
MODEL_CONFIGS: dict[str, dict] = {name: config for family in FAMILIES
                                  for name, config in family.named_configs.items()}

#: (temporal, spatial) compression of the VAE each diffusers class is trained with.
VAE_FACTORS: dict[str, tuple[int, int]] = {family.class_name: family.vae_factors for family in FAMILIES}

#: Subfolders of a diffusers pipeline folder that hold the denoiser (Wan: transformer/, UNet: unet/).
MODEL_SUBFOLDERS = tuple(dict.fromkeys(family.subfolder for family in FAMILIES))

__all__ = ["FAMILIES", "MODEL_CONFIGS", "VAE_FACTORS", "MODEL_SUBFOLDERS", "resolve_config", "spec_for",
           "tokens_per_sample"]


def _model_class(name: str):
    """The diffusers class called ``name`` (one of the families' classes)."""
    for family in FAMILIES:
        if family.class_name == name:
            return family.model_class()
    raise ValueError(f"model config '_class_name' must be one of {list(_CLASSES)}, got {name!r}")


def resolve_config(name_or_config: str | dict) -> dict:
    """A copy of the named config (a key of ``MODEL_CONFIGS``) or of a config dict with ``_class_name``."""
    if isinstance(name_or_config, str):
        if name_or_config not in MODEL_CONFIGS:
            raise ValueError(f"unknown model name {name_or_config!r}; expected one of "
                             f"{sorted(MODEL_CONFIGS)} or a config dict with a '_class_name' key")
        return copy.deepcopy(MODEL_CONFIGS[name_or_config])
    if isinstance(name_or_config, dict):
        if "_class_name" not in name_or_config:
            raise ValueError(f"model config dict needs a '_class_name' key (one of {list(_CLASSES)}); "
                             f"got keys {sorted(name_or_config)}")
        _model_class(name_or_config["_class_name"])
        return copy.deepcopy(dict(name_or_config))
    raise TypeError("name_or_config must be a model name or a config dict, got "
                    f"{type(name_or_config).__name__}")


def spec_for(model_or_config: nn.Module | str | dict) -> ModelSpec:
    """The :class:`ModelSpec` of a model (diffusers, or peft / DDP-wrapped), a model name, or a config."""
    if isinstance(model_or_config, nn.Module):
        base = unwrap_model(model_or_config)
        # FSDP2 swaps the class for a subclass (FSDPWanTransformer3DModel): look up the diffusers class.
        class_name = next((c.__name__ for c in type(base).__mro__ if c.__name__ in _CLASSES),
                          type(base).__name__)
        if class_name not in _CLASSES:
            raise TypeError(f"unsupported model class {class_name}; expected one of {list(_CLASSES)}")
        config = {**dict(base.config), "_class_name": class_name}  # (FSDP2's config may name its subclass)
    else:
        config = resolve_config(model_or_config)
        class_name = config["_class_name"]
        # Fill constructor defaults so partial config dicts work.
        init = _model_class(class_name).extract_init_dict(config)[0]
        config = {"_class_name": class_name, **dict(init), **config}
    family = next((f for f in FAMILIES if f.matches(config)), None)
    if family is None:  # a class with no family that takes this config (cannot happen for the shipped ones)
        raise TypeError(f"no model family of {[f.family for f in FAMILIES]} takes this {class_name} config")
    return family(config)


def tokens_per_sample(model_or_config, latent_shape) -> int:
    """Tokens per sample of a model, name or config (see :meth:`ModelSpec.tokens_per_sample`)."""
    return spec_for(model_or_config).tokens_per_sample(latent_shape)
