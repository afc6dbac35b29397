"""Video diffusion backbones for training: Wan2.1 (``WanTransformer3DModel``) and UNet3D, one module per job.

- :mod:`~pgdpo.train.models.registry` -- the named configs (``MODEL_CONFIGS``) and :func:`resolve_config`.
- :mod:`~pgdpo.train.models.build` -- :func:`build_model` (random init), :func:`load_model` (local folders)
  and
  model-folder discovery (:func:`find_model_folder`).
- :mod:`~pgdpo.train.models.adapters` -- :class:`ModelAdapter` / :func:`adapter_for`: how each family is
  called.
- :mod:`~pgdpo.train.models.latents` -- the latent shape of a video (:func:`latent_shape`, ``VAE_FACTORS``).
- :mod:`~pgdpo.train.models.flops` -- FLOPs of one forward (MFU, planner).
- :mod:`~pgdpo.train.models.switches` -- weight dtype, activation checkpointing, regional compile, dropout.
- :mod:`~pgdpo.train.models.attention` -- the attention backend of training (diffusers' dispatcher).
- :mod:`~pgdpo.train.models.wrappers` -- :func:`unwrap_model`, the model inside DDP / peft wrappers.

Every name is importable from ``pgdpo.train.models`` itself, as before the split. Importing this package needs
torch only; diffusers is imported when a model is built or a config is resolved against its class.
"""

from .adapters import ModelAdapter, adapter_for, tokens_per_sample
from .attention import NO_BACKWARD, TRAINING_BACKENDS, check_training_backend, set_attention_backend
from .build import (
    MODEL_SUBFOLDERS,
    build_model,
    count_parameters,
    find_model_folder,
    load_model,
    read_model_config,
)
from .flops import counted_forward_flops, model_flops_per_sample, wan_forward_flops
from .latents import VAE_FACTORS, latent_frames, latent_shape
from .registry import _CLASSES as _CLASSES  # private, imported by pgdpo.train.export
from .registry import MODEL_CONFIGS, UNET3D_CLASS, WAN_CLASS, resolve_config
from .registry import _model_class as _model_class  # private, imported by pgdpo.train.loading
from .switches import (
    cast_weights,
    compile_blocks,
    disable_checkpointing,
    disable_dropout,
    enable_checkpointing,
    keep_fp32_names,
)
from .wrappers import unwrap_model

__all__ = [
    "MODEL_CONFIGS", "WAN_CLASS", "UNET3D_CLASS", "resolve_config",
    "build_model", "load_model", "find_model_folder", "read_model_config", "MODEL_SUBFOLDERS",
    "count_parameters",
    "ModelAdapter", "adapter_for", "tokens_per_sample",
    "VAE_FACTORS", "latent_frames", "latent_shape",
    "wan_forward_flops", "counted_forward_flops", "model_flops_per_sample",
    "cast_weights", "keep_fp32_names", "enable_checkpointing", "disable_checkpointing", "disable_dropout",
    "compile_blocks",
    "TRAINING_BACKENDS", "NO_BACKWARD", "check_training_backend", "set_attention_backend",
    "unwrap_model",
]
