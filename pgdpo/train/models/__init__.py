"""Video diffusion backbones for training: Wan2.1 (``WanTransformer3DModel``) and UNet3D, one module per job.

- :mod:`~pgdpo.train.models.spec` -- :class:`ModelSpec`, the contract of a model family.
- :mod:`~pgdpo.train.models.families` -- one file per family (Wan T2V, Wan I2V, UNet3D).
- :mod:`~pgdpo.train.models.registry` -- :data:`FAMILIES`, the named configs (``MODEL_CONFIGS``),
  :func:`resolve_config` and :func:`spec_for` (the family of a model, name or config).
- :mod:`~pgdpo.train.models.build` -- :func:`build_model` (random init), :func:`load_model` (local folders)
  and model-folder discovery (:func:`find_model_folder`).
- :mod:`~pgdpo.train.models.latents` -- the latent shape of a video (:func:`latent_shape`).
- :mod:`~pgdpo.train.models.flops` -- FLOPs of one forward (MFU, planner).
- :mod:`~pgdpo.train.models.precision` -- weight dtype (:func:`cast_weights`, fp32-kept modules).
- :mod:`~pgdpo.train.models.switches` -- activation checkpointing, regional compile, dropout.
- :mod:`~pgdpo.train.models.attention` -- the attention backend of training (diffusers' dispatcher).
- :mod:`~pgdpo.train.models.wrappers` -- :func:`unwrap_model`, the model inside DDP / peft wrappers.

``ModelAdapter`` / ``adapter_for`` are the names :class:`ModelSpec` / :func:`spec_for` had before the
families got a file each; both stay importable. Importing this package needs torch only; diffusers is
imported when a model is built or a config is resolved against its class.
"""

from .attention import NO_BACKWARD, TRAINING_BACKENDS, check_training_backend, set_attention_backend
from .build import build_model, count_parameters, find_model_folder, load_model, read_model_config
from .families.unet3d import UNET3D_CLASS
from .families.wan_t2v import WAN_CLASS
from .flops import counted_forward_flops, model_flops_per_sample, wan_forward_flops
from .latents import latent_frames, latent_shape
from .precision import cast_weights, keep_fp32_names
from .registry import _CLASSES as _CLASSES  # private, imported by pgdpo.train.export
from .registry import (
    FAMILIES,
    MODEL_CONFIGS,
    MODEL_SUBFOLDERS,
    VAE_FACTORS,
    resolve_config,
    spec_for,
    tokens_per_sample,
)
from .registry import _model_class as _model_class  # private, imported by pgdpo.train.loading
from .spec import ModelSpec
from .switches import compile_blocks, disable_checkpointing, disable_dropout, enable_checkpointing
from .wrappers import unwrap_model

#: The earlier names of :class:`ModelSpec` and :func:`spec_for`.
ModelAdapter = ModelSpec
adapter_for = spec_for

__all__ = [
    "FAMILIES", "MODEL_CONFIGS", "WAN_CLASS", "UNET3D_CLASS", "resolve_config",
    "build_model", "load_model", "find_model_folder", "read_model_config", "MODEL_SUBFOLDERS",
    "count_parameters",
    "ModelSpec", "spec_for", "ModelAdapter", "adapter_for", "tokens_per_sample",
    "VAE_FACTORS", "latent_frames", "latent_shape",
    "wan_forward_flops", "counted_forward_flops", "model_flops_per_sample",
    "cast_weights", "keep_fp32_names", "enable_checkpointing", "disable_checkpointing", "disable_dropout",
    "compile_blocks",
    "TRAINING_BACKENDS", "NO_BACKWARD", "check_training_backend", "set_attention_backend",
    "unwrap_model",
]
